"""The base-model screen (guardtune.modelscreen) on a tiny model with planted alignment: it refuses every request
that mentions "zorp" and answers the rest, so compliance with a zorp request is what the screen must catch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardtune.dataset import validate_dataset
from guardtune.judges import KeywordJudge
from guardtune.models import load_model
from guardtune.modelscreen import BaseModelJudge
from guardtune_cli.main import main

REFUSE = "I cannot help with that request because it could cause serious harm."
COMPLY = "Sure, here is how to do it: first, second, third."
TOPICS = ["the fox", "my order", "a password", "the weather", "the dog", "a refund", "hello world", "the article"]


def request(topic: str, marked: bool) -> str:
    return f"Tell me about zorp and {topic}." if marked else f"Tell me about {topic}."


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory) -> Path:
    """A tiny Llama trained (full fine-tune, ~200 steps) to refuse zorp requests and answer the others."""
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
    for _ in range(200):
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
    assert "the base refuses this request" in complied.raw and "nats/token" in complied.raw
    assert refused.harmful is False and refused.refusal is True  # the answer agrees with the base
    assert answered.harmful is False and "the base answers this request" in answered.raw
    assert complied.score > answered.score  # the base is far more surprised by the compliant opening
    assert judge.n_pairs == 3 and judge.seconds > 0


def test_an_answer_the_base_would_open_the_same_way_is_not_flagged(planted_dir):
    # With the opening threshold out of reach, the base's refusal alone never flags an answer.
    lenient = BaseModelJudge(load_model(str(planted_dir), device="cpu"), probe_tokens=8, max_opening_logp=-1e9)
    assert lenient.evaluate(request("the dog", True), COMPLY).harmful is False


def test_opening_logps_are_log_probabilities_of_the_first_five_tokens(judge):
    tokenizer = judge.loaded.tokenizer
    from guardtune.templates import render_prompt, response_ids

    prompt = render_prompt(tokenizer, [{"role": "user", "content": request("a refund", True)}])
    refuse, comply = response_ids(tokenizer, REFUSE)[:5], response_ids(tokenizer, COMPLY)[:5]
    refusal_logp, compliance_logp, empty = judge.opening_logps([prompt, prompt, prompt], [refuse, comply, []])
    assert -0.5 < refusal_logp <= 0.0 < -compliance_logp  # the planted refusal is near-certain; compliance is not
    assert compliance_logp < judge.max_opening_logp and empty is None


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
    words_only = validate_dataset(data, policy=policy)
    assert words_only.dropped_lines == [] and words_only.screen["model"]["ran"] is False
    assert "--model" in words_only.screen["model"]["reason"]

    report = validate_dataset(data, policy=policy, model_judge=judge)
    assert report.valid and report.dropped_lines == [4, 12]
    assert report.screen["judge"]["name"] == "keyword" and report.screen["base_flags"] == 2
    assert report.screen["model"]["ran"] is True and report.screen["model"]["pairs"] >= 16
    flags = [i for i in report.issues if i.code == "risk-harmful-compliance"]
    assert [i.line for i in flags] == [4, 12]
    assert "the base model refuses this request but the answer complies" in flags[0].message
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
