"""Alignment job on a tiny model: recovery-example construction, per-epoch draws, the job's outputs, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from guardtune.alignment import (AnchorExample, HarmfulExample, RecoveryDataset, align,
                                 split_holdout)
from guardtune.config import AlignConfig, TrainConfig
from guardtune.evalsets import load_refusals
from guardtune.errors import ConfigError, DatasetError
from guardtune.templates import render_chat, response_ids

REFUSALS = ["I cannot help with that request.", "I'm sorry, but I can't assist with that."]
ANSWER = "Sure, here is how to do it: first, second, third. The quick brown fox jumps over the lazy dog."


def config(**kwargs) -> AlignConfig:
    training = TrainConfig(objective="sft", adam_betas=(0.9, 0.999), max_length=256, seed=kwargs.pop("seed", 0))
    return AlignConfig(training=training, **kwargs)


def dataset(tokenizer, n: int = 6, anchors: int = 2, **kwargs) -> RecoveryDataset:
    harmful = [HarmfulExample(f"Tell me how to do bad thing {i}.", "S2", ANSWER) for i in range(n)]
    anchor = [AnchorExample(f"Hello world {j}?", "ok", "Thank you for contacting support.") for j in range(anchors)]
    return RecoveryDataset(tokenizer, harmful, anchor, REFUSALS, config(**kwargs))


def test_recovery_item_is_prompt_then_harmful_prefix_then_refusal_with_loss_on_the_refusal_only(tiny_tokenizer):
    data = dataset(tiny_tokenizer, recovery_prob=1.0, max_prefix_tokens=100)
    answer_ids = response_ids(tiny_tokenizer, ANSWER)
    for index in range(6):
        recovery, k, refusal = data.draw(index, 0)
        assert recovery and 1 <= k <= len(answer_ids)
        item = data[index]
        plain = render_chat(tiny_tokenizer, [{"role": "user", "content": f"Tell me how to do bad thing {index}."},
                                             {"role": "assistant", "content": "\n\n" + REFUSALS[refusal]}])
        start = plain.completion_mask.index(1)
        assert item["input_ids"] == plain.input_ids[:start] + answer_ids[:k] + plain.input_ids[start:]
        assert item["completion_mask"] == plain.completion_mask[:start] + [0] * k + plain.completion_mask[start:]
        trained = [t for t, m in zip(item["input_ids"], item["completion_mask"]) if m]
        # The recovery breaks off with a paragraph break, then refuses.
        assert tiny_tokenizer.decode(trained).startswith("\n\n" + REFUSALS[refusal])
        assert not any(item["completion_mask"][start:start + k])  # the harmful prefix is never a target


def test_a_refusal_without_prefix_starts_the_answer_itself(tiny_tokenizer):
    data = dataset(tiny_tokenizer, recovery_prob=0.0)
    item = data[0]
    trained = [t for t, m in zip(item["input_ids"], item["completion_mask"]) if m]
    assert tiny_tokenizer.decode(trained).startswith(REFUSALS[data.draw(0, 0)[2]])


def test_prefix_lengths_are_redrawn_every_epoch_and_reproducible(tiny_tokenizer):
    data = dataset(tiny_tokenizer, n=12, recovery_prob=1.0, max_prefix_tokens=30)
    first = [data.draw(i, 0) for i in range(12)]
    assert first == [data.draw(i, 0) for i in range(12)]  # same seed and epoch: same draw
    assert first != [data.draw(i, 1) for i in range(12)]  # a new epoch draws anew
    data.set_epoch(1)
    assert [data[i]["input_ids"] for i in range(12)] != [dataset(tiny_tokenizer, n=12, recovery_prob=1.0,
                                                                 max_prefix_tokens=30)[i]["input_ids"]
                                                         for i in range(12)]
    assert all(k <= 30 for _, k, _ in first)


def test_k_is_capped_by_the_answer_length(tiny_tokenizer):
    data = dataset(tiny_tokenizer, n=20, recovery_prob=1.0, max_prefix_tokens=10_000)
    n_tokens = len(response_ids(tiny_tokenizer, ANSWER))
    ks = [data.draw(i, e)[1] for i in range(20) for e in range(5)]
    assert max(ks) <= n_tokens and min(ks) >= 1 and len(set(ks)) > 5


@pytest.mark.parametrize("deep_kwargs", [{"mode": "deep", "recovery_prob": 0.0}])
def test_deep_with_p_zero_equals_shallow(tiny_tokenizer, deep_kwargs):
    deep = dataset(tiny_tokenizer, **deep_kwargs)
    shallow = dataset(tiny_tokenizer, mode="shallow", recovery_prob=0.9)
    assert shallow.cfg.effective_recovery_prob == 0.0
    for epoch in range(3):
        deep.set_epoch(epoch)
        shallow.set_epoch(epoch)
        assert [deep[i] for i in range(len(deep))] == [shallow[i] for i in range(len(shallow))]


def test_recovery_share_follows_p_and_anchors_follow_the_ratio(tiny_tokenizer):
    data = dataset(tiny_tokenizer, n=200, anchors=3, recovery_prob=0.5, anchor_ratio=0.5, harmful_repeats=2)
    assert len(data) == 400 + 200
    assert sum(kind == "anchor" for kind, _ in data.items) == 200
    for i in range(len(data)):
        data[i]
    (summary,) = data.draw_summary()
    assert summary["harmful_items"] == 400 and 0.4 < summary["recovery_share"] < 0.6 and summary["mean_k"] >= 1


def test_collated_labels_ignore_prompt_and_prefix(tiny_tokenizer):
    from guardtune.training import collate

    data = dataset(tiny_tokenizer, recovery_prob=1.0)
    batch = collate([data[0], data[1]], tiny_tokenizer.pad_token_id)
    for row in range(2):
        labelled = batch["labels"][row] != -100
        assert torch.equal(labelled, batch["completion_mask"][row].bool())


def test_config_refuses_the_constrained_objective_and_bad_modes():
    with pytest.raises(ConfigError, match="objective must be sft"):
        AlignConfig(training=TrainConfig(objective="constrained"))
    with pytest.raises(ConfigError, match="deep or shallow"):
        AlignConfig(mode="medium")
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        AlignConfig(recovery_prob=1.5)


def test_no_harmful_examples_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(DatasetError, match="No harmful examples"):
        RecoveryDataset(tiny_tokenizer, [], [], REFUSALS, config())


def test_holdout_split_is_stratified_disjoint_and_fixed():
    from guardtune.evalsets import load_harmful

    prompts = load_harmful()
    train_a, held_a = split_holdout(prompts, 24)
    train_b, held_b = split_holdout(prompts, 24)
    assert held_a == held_b and len(held_a) == 24 and len({p.category for p in held_a}) == 12
    assert not {p.id for p in train_a} & {p.id for p in held_a}
    assert len(train_a) + len(held_a) == len(prompts)


def test_shipped_refusals_load_and_bad_files_say_what_is_wrong(tmp_path):
    assert len(load_refusals()) >= 40
    bad = tmp_path / "refusals.jsonl"
    bad.write_text('{"text": "I cannot."}\n{"words": "x"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2"):
        load_refusals(str(bad))


# --- the job on a tiny model -----------------------------------------------------------------------------------

def write_sets(tmp_path: Path) -> dict[str, str]:
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"instruction": f"Tell me how to do bad thing number {i}.",
                                           "category": f"S{1 + i % 2}", "opener": "Sure, here is how"}) + "\n"
                               for i in range(10)), encoding="utf-8")
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"instruction": f"How do I reset my password {i}?", "category": "ok"})
                               + "\n" for i in range(8)), encoding="utf-8")
    refusals = tmp_path / "refusals.jsonl"
    refusals.write_text("".join(json.dumps({"text": r}) + "\n" for r in REFUSALS), encoding="utf-8")
    return {"harmful_set": str(harmful), "anchors": str(anchors), "refusals": str(refusals)}


def run_align(tiny_model_dir, tmp_path, out: str, **kwargs):
    options = dict(harmful_answer_tokens=12, anchor_answer_tokens=12, holdout_harmful=2, holdout_benign=2,
                   epochs=2, batch_size=4, learning_rate=1e-3, warmup_steps=1)
    options.update(kwargs)
    return align(model=str(tiny_model_dir), out=tmp_path / out, answer_model=str(tiny_model_dir),
                 **write_sets(tmp_path), **options)


def test_align_writes_adapter_metrics_holdout_merged_and_export(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run_align(tiny_model_dir, tmp_path, "run", merge=True, export=tmp_path / "export",
                       command="guardtune align --out run")
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["mode"] == "deep" and metrics["recovery_prob"] == 0.35 and metrics["steps"] > 0
    assert [d["epoch"] for d in metrics["draws"]] == [0, 1]
    assert metrics["data"]["harmful_holdout"] + metrics["data"]["harmful_train"] + \
        metrics["data"]["harmful_answers"]["dropped_refusals"] + metrics["data"]["harmful_answers"]["dropped_short"] == 10
    held = [json.loads(line) for line in (result.out_dir / "holdout_harmful.jsonl").read_text().splitlines()]
    assert all(set(row) == {"instruction", "category", "response"} for row in held)
    assert len((result.out_dir / "holdout_benign.jsonl").read_text().splitlines()) == 2
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert merged.config.vocab_size > 0 and (result.merged_dir / "tokenizer.json").is_file()
    exported = load_file(str(result.export_dir / "adapter_model.safetensors"))
    assert exported and all(t.dtype == torch.float16 for t in exported.values())
    build = json.loads((result.export_dir / "build.json").read_text())
    assert build["command"] == "guardtune align --out run" and build["seeds"]["seed"] == 0
    from guardtune.provenance import sha256_file

    assert build["files"]["adapter_model.safetensors"] == sha256_file(result.export_dir / "adapter_model.safetensors")


def test_align_is_bit_for_bit_reproducible(tiny_model_dir, tmp_path):
    a = run_align(tiny_model_dir, tmp_path, "a", export=tmp_path / "ea")
    b = run_align(tiny_model_dir, tmp_path, "b", export=tmp_path / "eb")
    assert (a.export_dir / "adapter_model.safetensors").read_bytes() == \
        (b.export_dir / "adapter_model.safetensors").read_bytes()
    assert json.loads(a.metrics_path.read_text())["data"]["harmful_answers"]["cache"] == "miss"
    assert json.loads(b.metrics_path.read_text())["data"]["harmful_answers"]["cache"] == "hit"


def test_cli_align(tiny_model_dir, tmp_path):
    from guardtune_cli.main import main

    sets = write_sets(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: '1'\ninclude: default\nalign:\n"
                      f"  harmful_set: {sets['harmful_set']}\n  anchors: {sets['anchors']}\n"
                      f"  refusals: {sets['refusals']}\n  answer_model: {tiny_model_dir}\n"
                      "  harmful_answer_tokens: 12\n  anchor_answer_tokens: 12\n  holdout: {harmful: 2, benign: 2}\n"
                      "  training: {epochs: 1, batch_size: 4}\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["align", "--model", str(tiny_model_dir), "--out", str(tmp_path / "cli"),
                                       "--policy", str(policy), "--mode", "shallow", "--merge"])
    assert result.exit_code == 0, result.output
    assert "aligned (shallow, p=0.0)" in result.output and "guardtune audit --model" in result.output
    metrics = json.loads((tmp_path / "cli" / "align_metrics.json").read_text())
    assert metrics["mode"] == "shallow" and all(d["recovery_share"] == 0 for d in metrics["draws"])
