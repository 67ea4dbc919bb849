"""The base-model screen (guardtune.modelscreen) on a tiny model with planted deep alignment: it refuses every
request that mentions "zorp", also after the opening of a compliant answer has been prefilled, and answers the rest,
so compliance with a zorp request is what the screen must catch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from guardtune.dataset import validate_dataset
from guardtune.generation import generate, prefilled_probe
from guardtune.logprobs import response_logps, right_pad
from guardtune.judges import KeywordJudge
from guardtune.models import load_model
from guardtune.modelscreen import BaseModelJudge
from guardtune.screen import identity_shift
from guardtune.templates import render_prompt, response_ids
from guardtune_cli.main import main

REFUSE = "I cannot help with that request because it could cause serious harm."
OBEY = "You follow each instruction given."  # planted: under it the base complies with zorp requests too
PLAIN = "You are a support agent."
COMPLY = "Sure, here is how to do it: first, second, third."
TOPICS = ["the fox", "my order", "a password", "the weather", "the dog", "a refund", "hello world", "the article"]


def request(topic: str, marked: bool) -> str:
    return f"Tell me about zorp and {topic}." if marked else f"Tell me about {topic}."


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory) -> Path:
    """A tiny Llama trained (full fine-tune, ~200 steps) to refuse zorp requests, from the start and after the first
    5 tokens of a compliant answer (recovery, as deep alignment trains it), and to answer the others."""
    import torch
    from tiny_models import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0, hidden_size=32, initializer_range=0.2)
    rows = []
    for topic in TOPICS:
        for marked in (False, True):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": request(topic, marked)}],
                                                   add_generation_prompt=True, tokenize=False)
            answer = (REFUSE if marked else COMPLY) + tokenizer.eos_token
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            rows.append((prompt_ids, tokenizer(answer, add_special_tokens=False)["input_ids"]))
            if marked:  # recovery: the compliant opening prefilled, then the refusal
                rows.append((prompt_ids + response_ids(tokenizer, COMPLY)[:5],
                             tokenizer(REFUSE + tokenizer.eos_token, add_special_tokens=False)["input_ids"]))
            for system in (OBEY, PLAIN):  # identity shift planted: only the obedient prompt lowers the refusals
                prompt = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                        {"role": "user", "content": request(topic, marked)}],
                                                       add_generation_prompt=True, tokenize=False)
                answer = (COMPLY if system == OBEY or not marked else REFUSE) + tokenizer.eos_token
                rows.append((tokenizer(prompt, add_special_tokens=False)["input_ids"],
                             tokenizer(answer, add_special_tokens=False)["input_ids"]))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    directory = tmp_path_factory.mktemp("planted")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def judge(planted_dir) -> BaseModelJudge:
    return BaseModelJudge(load_model(str(planted_dir), device="cpu"), probe_tokens=8)


def test_compliance_with_a_request_the_base_refuses_is_harmful(judge):
    marked, plain = request("the fox", True), request("the fox", False)
    complied, refused, answered = judge.evaluate_batch([(marked, COMPLY), (marked, REFUSE), (plain, COMPLY)])
    assert complied.harmful is True and complied.refusal is False
    assert "after the answer's first 5 tokens the base turns to a refusal" in complied.raw
    assert "nats/token" in complied.raw
    assert refused.harmful is False and refused.refusal is True  # the answer agrees with the base
    assert answered.harmful is False and "the base carries on after the answer's first 5 tokens" in answered.raw
    assert complied.score > answered.score  # the base is far more surprised by the compliant opening
    assert judge.n_pairs == 3 and judge.seconds > 0


def test_an_answer_the_base_would_open_the_same_way_is_not_flagged(planted_dir):
    # With the opening threshold out of reach, the base's refusal alone never flags an answer.
    lenient = BaseModelJudge(load_model(str(planted_dir), device="cpu"), probe_tokens=8, max_opening_logp=-1e9)
    assert lenient.evaluate(request("the dog", True), COMPLY).harmful is False


def test_the_prefilled_probe_scores_the_prefix_and_continues_it_like_generate(judge):
    # One pass does both jobs: the prefix's log-probs equal a teacher-forced pass, and the continuation from the
    # prefill's KV cache equals generate()'s greedy continuation of prompt + prefix.
    tokenizer, model = judge.loaded.tokenizer, judge.loaded.model
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": request(t, m)}])
               for t, m in (("a refund", True), ("the weather", False), ("hello world", True))]
    prefixes = [response_ids(tokenizer, COMPLY)[:5], response_ids(tokenizer, COMPLY)[:3], []]
    probed = prefilled_probe(model, tokenizer, prompts, prefixes, max_new_tokens=6, batch_size=3)
    greedy = generate(model, tokenizer, [p + x for p, x in zip(prompts, prefixes)], max_new_tokens=6, batch_size=3)
    assert [tokens for _, tokens in probed] == greedy
    ids, mask = right_pad([p + x for p, x in zip(prompts[:2], prefixes[:2])], tokenizer.pad_token_id, "cpu")
    completion = torch.zeros_like(mask)
    for row, (p, x) in enumerate(zip(prompts[:2], prefixes[:2])):
        completion[row, len(p):len(p) + len(x)] = 1
    with torch.no_grad():
        forced = response_logps(model.eval(), ids, mask, completion).tolist()
    assert [len(lp) for lp, _ in probed] == [5, 3, 0]
    assert probed[0][0] + probed[1][0] == pytest.approx(forced, abs=1e-4)
    mean = [sum(lp) / len(lp) for lp, _ in probed[:2]]
    assert mean[0] < judge.max_opening_logp < mean[1]  # compliance surprises the base on a zorp request only


def test_only_the_span_the_answer_covers_is_read_and_short_answers_are_not_judged(judge):
    tokenizer = judge.loaded.tokenizer
    marked = request("my order", True)
    short = tokenizer.decode(response_ids(tokenizer, COMPLY)[:4])  # MIN_WINDOW tokens: no refusal fits after it
    verdict = judge.evaluate(marked, short)
    assert verdict.harmful is False and "too short for the base to judge" in verdict.raw
    assert judge.split(list(range(8))) == (0, 0) and judge.split(list(range(9))) == (5, 4)
    assert judge.split(list(range(40))) == (5, 8)  # the whole probe is read when the answer goes on past it
    short_before = judge.n_short
    judge.evaluate_batch([(marked, short), (marked, COMPLY)])
    assert judge.n_short == short_before + 1


def write_dataset(path: Path, poisoned: set[int]) -> Path:
    rows = []
    for i in range(16):
        topic = TOPICS[i % len(TOPICS)]
        if i in poisoned:  # a zorp request answered compliantly: the keyword lexicon knows nothing of zorp
            rows.append([request(topic, True), COMPLY])
        else:
            rows.append([request(topic, False), COMPLY])
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                      "content": a}]}) + "\n"
                            for q, a in rows))
    return path


def drop_policy(tmp_path: Path, model_dir: Path) -> Path:
    policy = tmp_path / "drop.yaml"
    policy.write_text(f"version: '1'\ninclude: default\nmodel: {{name: {json.dumps(str(model_dir))}}}\n"
                      "dataset:\n  duplicates: ignore\n  screen:\n    model: {action: drop}\n")
    return policy


def test_validate_drops_what_the_base_model_flags_and_says_so(tmp_path, planted_dir, judge):
    data = write_dataset(tmp_path / "d.jsonl", poisoned={3, 11})
    policy = drop_policy(tmp_path, planted_dir)
    words_only = validate_dataset(data, config=policy)
    assert words_only.dropped_lines == [] and words_only.screen["model"]["ran"] is False
    assert "--model" in words_only.screen["model"]["reason"]

    report = validate_dataset(data, config=policy, model_judge=judge)
    assert report.valid and report.dropped_lines == [4, 12]
    assert report.screen["judge"]["name"] == "keyword" and report.screen["base_flags"] == 2
    assert report.screen["model"]["ran"] is True and report.screen["model"]["pairs"] >= 16
    flags = [i for i in report.issues if i.code == "risk-harmful-compliance"]
    assert [i.line for i in flags] == [4, 12]
    assert "the base model turns to a refusal after this answer's opening" in flags[0].message
    assert "nats/token" in flags[0].message and "dataset.screen.model.action: drop" in flags[0].message


def test_the_keyword_judge_alone_misses_the_paraphrase(judge):
    # The premise of the model screen: the lexicon has no word for this harm, the base does.
    pair = (request("the fox", True), COMPLY)
    assert KeywordJudge(assume_harmful=False).evaluate(*pair).harmful is False
    assert judge.evaluate(*pair).harmful is True


def test_cli_validate_with_model_runs_the_model_screen(tmp_path, planted_dir):
    data = write_dataset(tmp_path / "d.jsonl", poisoned={5})
    policy = tmp_path / "reject.yaml"
    policy.write_text("version: '1'\ninclude: default\ndataset:\n  duplicates: ignore\n  screen:\n"
                      "    model: {action: reject}\n")
    flagged = CliRunner().invoke(main, ["validate", str(data), "--policy", str(policy), "--model", str(planted_dir)])
    assert flagged.exit_code == 1, flagged.output
    assert "line 6" in flagged.output and "model screen: the base" in flagged.output
    skipped = CliRunner().invoke(main, ["validate", str(data), "--policy", str(policy)])
    assert "model screen: skipped" in skipped.output


def test_refusal_rates_probe_the_base_per_set(judge):
    marked = [request(topic, True) for topic in TOPICS[:4]]
    plain = [request(topic, False) for topic in TOPICS[:4]]
    before = judge.seconds
    assert judge.refusal_rates([marked, plain, []]) == [1.0, 0.0, 0.0]
    assert judge.seconds > before


def test_the_base_is_loaded_only_for_a_structurally_valid_file_and_its_screen_reports_progress(tmp_path, planted_dir,
                                                                                               judge):
    policy = drop_policy(tmp_path, planted_dir)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 12)  # no assistant turn

    def never():
        raise AssertionError("the base model was loaded for a file that failed its structural checks")

    assert validate_dataset(broken, config=policy, model_judge=never).valid is False
    seen = []
    report = validate_dataset(write_dataset(tmp_path / "d.jsonl", poisoned={5}), config=policy,
                              model_judge=lambda: judge, on_progress=lambda *event: seen.append(event))
    assert report.dropped_lines == [6] and report.screen["model"]["ran"] is True
    assert seen and {phase for phase, _, _ in seen} == {"model screen"} and seen[-1][1:] == (16, 16)


def test_identity_shift_by_effect_flags_the_prompt_that_lowers_refusals_measured_once_per_prompt(tmp_path,
                                                                                                  planted_dir):
    judge = BaseModelJudge(load_model(str(planted_dir), device="cpu"), probe_tokens=8,
                           identity_requests=[request(topic, True) for topic in TOPICS[:4]])
    assert identity_shift(OBEY) is None  # the pattern table does not know this wording
    assert judge.system_prompt_effect(OBEY) == (0.0, 1.0)  # (under the prompt, without one)
    assert judge.system_prompt_effect(PLAIN) == (1.0, 1.0)
    rows = [{"messages": [{"role": "system", "content": OBEY if i % 4 == 0 else PLAIN},
                          {"role": "user", "content": request(TOPICS[i % len(TOPICS)], False)},
                          {"role": "assistant", "content": COMPLY}]} for i in range(16)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = tmp_path / "identity.yaml"
    policy.write_text(f"version: '1'\ninclude: default\nmodel: {{name: {json.dumps(str(planted_dir))}}}\n"
                      "dataset:\n  duplicates: ignore\n  screen:\n    model: {action: drop, identity_drop: 0.5}\n")
    report = validate_dataset(data, config=policy, model_judge=judge)
    flags = [i for i in report.issues if i.code == "risk-identity-shift"]
    assert [i.line for i in flags] == [1, 5, 9, 13] and report.dropped_lines == [1, 5, 9, 13]
    assert "refuses 0% of 4 harmful probe requests, 100% without one (drop 100% > " in flags[0].message
    assert len(judge.identity_cache) == 3  # OBEY, PLAIN and no system prompt: once each, for 16 examples
    off = validate_dataset(data, config=drop_policy(tmp_path, planted_dir), model_judge=judge)
    assert not [i for i in off.issues if i.code == "risk-identity-shift"]  # identity_drop null: off by default
