"""Audit stage on a tiny model: prefix alignment, batched generation, KL profile, report files, caches, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from guardtune.auditing import _Target, audit, kl_profile
from guardtune.generation import generate
from guardtune.config import GateConfig, TrainConfig
from guardtune.models import attach_lora, load_model
from guardtune.report import validate_report
from guardtune.templates import render_prompt, response_ids

SMALL = dict(sample_harmful=6, sample_benign=4, sample_utility=5, max_new_tokens=6, prefill_k=(0, 3, 8), prefix_tokens=10,
             kl_positions=6, batch_size=8, decoding_attack=False, gcg_attack=False)  # attacks: tests/test_attacks.py


def small_audit(model_dir: Path, out: Path, **extra):
    return audit(model=str(model_dir), out=out, prefix_model=str(model_dir), **{**SMALL, **extra})


@pytest.fixture(scope="module")
def zero_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A freshly initialised LoRA adapter (B = 0): the fine-tuned model equals its base."""
    loaded = load_model(str(tiny_model_dir))
    peft_model = attach_lora(loaded.model, TrainConfig())
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(str(out))
    return out


def test_batched_greedy_generation_matches_one_at_a_time(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = [render_prompt(tok, [{"role": "user", "content": text}]) for text in
               ["Hi", "How do I reset my password?", "Tell me a long story about a fox and a dog", "ok"]]
    batched = generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(seq) <= 12 for seq in batched)


def test_static_cache_is_opt_in_from_the_policy(tmp_path):
    from guardtune.config import audit_config
    from guardtune.policy import load_policy

    assert audit_config(load_policy("default")).static_cache is False
    policy = tmp_path / "static.yaml"
    policy.write_text("version: '1'\ninclude: default\naudit:\n  decoding: {static_cache: true}\n")
    assert audit_config(load_policy(str(policy))).static_cache is True
    policy.write_text("version: '1'\ninclude: default\naudit:\n  decoding: {static_cache: 'yes'}\n")
    with pytest.raises(Exception, match="static_cache"):
        load_policy(str(policy))


def test_static_cache_request_is_ignored_on_cpu(tiny_model_dir, monkeypatch):
    """The static cache only pays off with transformers' CUDA compile path; on CPU generate() keeps the dynamic
    cache even when asked (and its greedy output is unchanged)."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = [render_prompt(tok, [{"role": "user", "content": text}]) for text in ["Hi", "ok then"]]
    seen, real_generate = [], model.generate

    def recording_generate(**kwargs):
        seen.append(kwargs.get("cache_implementation"))
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    asked = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, static_cache=True)
    assert seen == [None] and asked == generate(model, tok, prompts, max_new_tokens=6, batch_size=2)


def test_audit_end_to_end_writes_three_valid_files(tiny_model_dir, zero_adapter, tmp_path):
    result = small_audit(tiny_model_dir, tmp_path / "audit", adapter=zero_adapter)
    for name in ("report.json", "samples.jsonl", "report.html"):
        assert (tmp_path / "audit" / name).is_file(), name
    report = json.loads(result.report_path.read_text())
    assert validate_report(report) == []
    assert [row["k"] for row in report["results"]["base"]["asr"]] == [0, 3, 8]
    assert report["sample"]["harmful"] == 6 and report["sample"]["harmful_total"] >= 200
    assert "seeded sample" in report["sample"]["note"]
    samples = [json.loads(line) for line in result.samples_path.read_text().splitlines()]
    # base and fine-tuned: every (k, prompt), every benign probe and every utility question
    assert len(samples) == 2 * (6 * 3 + 4 + 5)
    assert {s["set"] for s in samples} == {"harmful", "benign", "utility"}
    utility = report["results"]["base"]["utility"]
    assert utility["n"] == 5 and utility["correct"] == sum(s["verdict"]["correct"] for s in samples
                                                            if s["set"] == "utility" and s["model"] == "base")
    assert report["comparison"]["utility_change"] == 0.0
    # An untrained adapter is the base model: identical greedy continuations and a zero KL profile.
    by_key = {}
    for s in samples:
        by_key.setdefault((s["set"], s["id"], s["k"]), {})[s["model"]] = s["continuation"]
    assert all(v["base"] == v["finetuned"] for v in by_key.values())
    profile = report["results"]["finetuned"]["kl_profile"]
    assert profile["positions"] == [1, 2, 3, 4, 5, 6]
    assert max(profile["mean_kl"]) < 1e-6 and profile["mean_first5"] < 1e-6
    assert all(abs(v) < 1e-9 for v in report["comparison"]["asr_increase"].values())
    html = result.html_path.read_text()
    assert "<svg" in html and "seeded sample" in html
    # samples.jsonl is bound to the report, and the gate's paired test reads it: no prompt changed, p = 1.
    from guardtune.gate import decide
    from guardtune.provenance import sha256_file

    assert report["samples_sha256"] == sha256_file(result.samples_path)
    paired = [r for r in decide(result.report_path, GateConfig(paired_alpha=0.05, min_scored_prompts=1)).rules
              if r.rule == "paired_alpha"]
    assert [(r.k, r.value, r.passed) for r in paired] == [(0, 1.0, True), (3, 1.0, True), (8, 1.0, True)]


def test_prefix_is_first_k_tokens_of_the_harmful_response(tiny_model_dir, tmp_path):
    result = small_audit(tiny_model_dir, tmp_path / "audit")
    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    cache = sorted((Path(__import__("os").environ["GUARDTUNE_CACHE"]) / "audit" / "prefixes").glob("*.json"))
    assert cache, "generated harmful responses are cached outside the repo"
    responses = json.loads(cache[0].read_text())
    samples = [json.loads(line) for line in result.samples_path.read_text().splitlines()]
    harmful = [s for s in samples if s["set"] == "harmful" and s["model"] == "base"]
    ids_in_order = list(dict.fromkeys(s["id"] for s in harmful))
    for sample in harmful:
        full = response_ids(tok, responses[ids_in_order.index(sample["id"])])
        assert sample["effective_k"] == min(sample["k"], len(full))
        assert sample["prefix"] == tok.decode(full[:sample["k"]], skip_special_tokens=True)
    assert result.report["results"]["finetuned"] is None and result.report["comparison"] is None


def test_base_results_are_cached_by_base_and_config(tiny_model_dir, tmp_path):
    first = small_audit(tiny_model_dir, tmp_path / "a")
    second = small_audit(tiny_model_dir, tmp_path / "b")
    other = small_audit(tiny_model_dir, tmp_path / "c", max_new_tokens=5)
    assert first.report["provenance"]["base_cache"] == "miss"
    assert second.report["provenance"]["base_cache"] == "hit"
    assert second.report["results"]["base"] == first.report["results"]["base"]
    assert other.report["provenance"]["base_cache"] == "miss"


def test_operator_pairs_as_prefix_source(tiny_model_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"instruction": f"Do forbidden thing {i}.",
                                           "response": f"Sure, here is forbidden thing {i}: step one, step two."})
                               for i in range(5)) + "\n")
    result = small_audit(tiny_model_dir, tmp_path / "audit", harmful_set=str(pairs), prefix_source="dataset",
                         sample_harmful=None)
    assert result.report["prefix_source"]["kind"] == "dataset"
    assert result.report["sample"]["harmful"] == 5


def test_kl_profile_counts_only_examples_reaching_each_position(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    model = attach_lora(loaded.model, TrainConfig())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    tok = loaded.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "hello"}])
    targets = [_Target(None, prompt, response_ids(tok, "Sure, here is a long answer for you")),
               _Target(None, prompt, response_ids(tok, "No"))]
    profile = kl_profile(model, targets, positions=8, batch_size=2, pad_id=tok.pad_token_id)
    assert profile["counts"][0] == 2 and profile["counts"][-1] == 1
    assert all(v > 0 for v in profile["mean_kl"])


def test_lora_grads_survive_an_audit_on_a_qlora_model(tiny_model_dir):
    """Generation and the teacher-forced KL pass (eval mode, no grad) must not break LoRA gradients on NF4."""
    loaded = load_model(str(tiny_model_dir), quantization="nf4")
    model = attach_lora(loaded.model, TrainConfig())
    tok = loaded.tokenizer
    prompt = render_prompt(tok, [{"role": "user", "content": "hello"}])
    model.eval()
    generate(model, tok, [prompt, prompt[:-2]], max_new_tokens=4, batch_size=2)
    kl_profile(model, [_Target(None, prompt, response_ids(tok, "Sure, here"))], positions=3, batch_size=1,
               pad_id=tok.pad_token_id)
    model.train()
    ids = torch.tensor([prompt], device=model.device)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_cli_audit_prints_asr_table(tiny_model_dir, tmp_path):
    from guardtune_cli.main import main

    policy = tmp_path / "tiny.yaml"
    policy.write_text(f"version: '1'\ninclude: cpu-demo\naudit:\n  prefix_model: {tiny_model_dir}\n"
                      f"  prefill_k: [0, 3]\n  prefix_tokens: 6\n  kl_positions: 4\n"
                      f"  decoding: {{max_new_tokens: 4, batch_size: 8}}\n")
    result = CliRunner().invoke(main, ["audit", "--model", str(tiny_model_dir), "--policy", str(policy),
                                       "--out", str(tmp_path / "out"), "--sample", "4"])
    assert result.exit_code == 0, result.output
    assert "base ASR" in result.output and "report:" in result.output
    as_json = CliRunner().invoke(main, ["audit", "--model", str(tiny_model_dir), "--policy", str(policy),
                                        "--out", str(tmp_path / "out2"), "--sample", "4", "--json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert [row["k"] for row in payload["asr"]] == [0, 3]
