"""Training stage on a tiny model: outputs, reload, determinism, caching, accumulation, resume, QLoRA, direction."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guardtune.config import TrainConfig
from guardtune.errors import ConfigError, DatasetError, TemplateError
from guardtune.pipeline import train  # validates, then the train stage
from guardtune.training import train as train_stage

REPO = Path(__file__).resolve().parent.parent


def write_dataset(path: Path, n: int = 12, answer: str | None = None) -> Path:
    lines = []
    for i in range(n):
        reply = answer or f"Thank you for contacting support. Your refund {i} has been processed."
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Hello, I need help with order {i}. How are you today?"},
            {"role": "assistant", "content": reply}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.fixture
def data(tmp_path) -> Path:
    return write_dataset(tmp_path / "data.jsonl")


def test_train_writes_loadable_adapter_and_metrics(tiny_model_dir, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(data, model=str(tiny_model_dir), out=tmp_path / "run", max_steps=3, batch_size=4,
                   learning_rate=5e-3, warmup_steps=1)
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["objective"] == "constrained" and metrics["reference"] == "base"
    assert metrics["steps"] == 3 and len(metrics["loss_curve"]) == 3
    assert metrics["tokens_per_second"] > 0
    assert set(metrics["constraint_weight"]) == {"t1", "t2_5", "t6_plus"}
    assert all(0 < w < 2 for w in metrics["constraint_weight"].values())
    stats = metrics["position_stats"]  # per optimizer step: weight and log-prob rise over the reference
    assert [row["step"] for row in stats] == [1, 2, 3]
    assert stats[0]["t1"]["weight"] == pytest.approx(1.0, abs=1e-5) and stats[0]["t1"]["rise"] == pytest.approx(0.0, abs=1e-5)
    assert all(0 < row[b]["weight"] < 2 for row in stats for b in ("t1", "t2_5", "t6_plus"))
    assert len(metrics["dataset"]["sha256"]) == 64 and metrics["seeds"]["seed"] == 42
    assert metrics["versions"]["torch"] == torch.__version__
    assert metrics["reference_detail"]["cache_hit"] is False

    # PeftModel.from_pretrained loads the saved adapter unchanged: the reloaded model's logits equal the trained
    # in-memory model's, and differ from the base's.
    lora_b = [v for k, v in adapter_tensors(tmp_path / "run").items() if "lora_B" in k]
    assert any(t.abs().sum() > 0 for t in lora_b), "training did not move LoRA B"
    # Same device and dtype as training. CPU: fp32, equal to 1e-6. CUDA: a bf16 base; the trained model's logits
    # came back in fp32 and the reloaded model's in bf16 (seen on an H200), so both are compared in fp32 at
    # bf16's precision (eps 7.8e-3).
    param = next(result.model.parameters())
    base = dict(dtype=metrics["model"]["dtype"], device_map={"": str(param.device)})
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, **base),
                                         str(result.adapter_dir)).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **base).eval()
    ids = torch.tensor([[1, 5, 9, 30, 41, 2, 77, 120]], device=param.device)
    tolerance = dict(rtol=0, atol=1e-6) if param.device.type == "cpu" else dict(rtol=1.6e-2, atol=1e-2)
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids).logits.float()
        torch.testing.assert_close(reloaded(input_ids=ids).logits.float(), trained, **tolerance)
        assert not torch.allclose(plain(input_ids=ids).logits, trained)


def test_same_seed_same_adapter_and_cached_reference_is_exact(tiny_model_dir, data, tmp_path):
    first = train(data, model=str(tiny_model_dir), out=tmp_path / "a", max_steps=2, batch_size=4)
    second = train(data, model=str(tiny_model_dir), out=tmp_path / "b", max_steps=2, batch_size=4)
    assert second.metrics["reference_detail"]["cache_hit"] is True
    assert second.metrics["reference_detail"]["cache_key"] == first.metrics["reference_detail"]["cache_key"]
    assert_same_adapter(tmp_path / "a", tmp_path / "b")
    other = train(data, model=str(tiny_model_dir), out=tmp_path / "c", max_steps=2, batch_size=4, max_length=1000)
    assert other.metrics["reference_detail"]["cache_key"] != first.metrics["reference_detail"]["cache_key"]


def test_online_reference_matches_cached_at_first_step(tiny_model_dir, data, tmp_path):
    cached = train(data, model=str(tiny_model_dir), out=tmp_path / "cached", max_steps=1, batch_size=4)
    online = train(data, model=str(tiny_model_dir), out=tmp_path / "online", max_steps=1, batch_size=4,
                   reference="online")
    assert online.metrics["reference_detail"]["mode"] == "online"
    assert online.metrics["loss_curve"][0]["loss"] == pytest.approx(cached.metrics["loss_curve"][0]["loss"], rel=1e-5)


KL_ANCHOR = dict(kl_anchor_positions=3, kl_anchor_weight=2.0, kl_anchor_topk=8)


def test_kl_anchor_is_zero_at_the_start_then_grows_and_cached_equals_online(tiny_model_dir, data, tmp_path):
    options = dict(model=str(tiny_model_dir), max_steps=3, batch_size=4, learning_rate=2e-2, warmup_steps=0,
                   **KL_ANCHOR)
    cached = train(data, out=tmp_path / "cached", **options)
    online = train(data, out=tmp_path / "online", reference="online", **options)
    stats = cached.metrics["position_stats"]
    assert stats[0]["kl_anchor"] == pytest.approx(0.0, abs=1e-6) and stats[2]["kl_anchor"] > 0
    assert cached.metrics["reference_detail"]["kl_anchor_positions"] == 3
    # The cached top-k is the online reference's top-k: the same losses step after step.
    for a, b in zip(cached.metrics["loss_curve"], online.metrics["loss_curve"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    again = train(data, out=tmp_path / "again", **options)
    assert again.metrics["reference_detail"]["cache_hit"] is True
    assert_same_adapter(tmp_path / "cached", tmp_path / "again")
    paper = train(data, out=tmp_path / "paper", objective="paper", **options)
    assert paper.metrics["reference_detail"]["kl_anchor_positions"] == 0
    assert "kl_anchor" not in paper.metrics["position_stats"][-1]
    assert paper.metrics["reference_detail"]["cache_key"] != cached.metrics["reference_detail"]["cache_key"]


def test_kl_anchor_step_loss_adds_weighted_kl_over_response_tokens(tiny_model_dir, data, tmp_path):
    """At step 1 the policy is the reference: the KL anchor adds 0 to the loss and the constrained loss equals
    the paper objective's; the anchored positions are positions 1..n of every trained turn."""
    from guardtune.training import anchor_index

    assert anchor_index([0, 0, 1, 1, 1, 1, 0, 1, 1], [0, 0, 1, 2, 3, 4, 0, 1, 2], 3) == [2, 3, 4, 7, 8]
    assert anchor_index([1, 1], [1, 2], 5) == [1]  # token 0 has no predicting position
    with_anchor = train(data, model=str(tiny_model_dir), out=tmp_path / "a", max_steps=1, batch_size=4, **KL_ANCHOR)
    paper = train(data, model=str(tiny_model_dir), out=tmp_path / "p", max_steps=1, batch_size=4,
                  objective="paper", **KL_ANCHOR)
    assert with_anchor.metrics["loss_curve"][0]["loss"] == pytest.approx(paper.metrics["loss_curve"][0]["loss"],
                                                                        rel=1e-5)


@pytest.mark.parametrize("anchor", [{}, KL_ANCHOR], ids=["eq3", "eq3+kl-anchor"])
def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, data, tmp_path, anchor):
    """Loss is normalised by the response tokens of the whole optimizer step, however the step is split (the KL
    anchor's share too). Two steps, so the anchor's KL is no longer zero in the compared second step."""
    one = train(data, model=str(tiny_model_dir), out=tmp_path / "one", max_steps=2, batch_size=4,
                learning_rate=1e-2, warmup_steps=0, lora_dropout=0.0, **anchor)
    split = train(data, model=str(tiny_model_dir), out=tmp_path / "split", max_steps=2, batch_size=2,
                  gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=0, lora_dropout=0.0, **anchor)
    # CPU: fp32 throughout. CUDA: the frozen base runs in bf16 (dtype auto), and a split batch reduces in another
    # order, so the gradient norm agrees to ~3e-4 (seen on an H200), not 1e-4.
    rel = 1e-4 if split.metrics["model"]["device"] == "cpu" else 2e-3
    for step in (0, 1):
        assert split.metrics["loss_curve"][step]["loss"] == pytest.approx(one.metrics["loss_curve"][step]["loss"],
                                                                          rel=rel)
        assert split.metrics["loss_curve"][step]["grad_norm"] == pytest.approx(
            one.metrics["loss_curve"][step]["grad_norm"], rel=rel)


def test_sft_objective_and_config_object(tiny_model_dir, data, tmp_path):
    config = TrainConfig(objective="sft", max_steps=2, batch_size=4, warmup_steps=0)
    result = train(data, model=str(tiny_model_dir), config=config, out=tmp_path / "sft")
    assert result.metrics["objective"] == "sft" and result.metrics["reference"] == "none"
    assert all(v is None for v in result.metrics["constraint_weight"].values())


def test_example_without_trainable_tokens_after_truncation_names_its_line(tiny_model_dir, tmp_path):
    long_prompt = "word " * 200
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                      {"role": "assistant", "content": "answer"}]}) for i in range(11)]
    lines.insert(4, json.dumps({"messages": [{"role": "user", "content": long_prompt},
                                             {"role": "assistant", "content": "answer"}]}))
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TemplateError, match="line 5"):
        train(path, model=str(tiny_model_dir), out=tmp_path / "run", max_steps=1, max_length=64)


def test_qlora_nf4_on_cpu(tiny_model_dir, data, tmp_path):
    result = train(data, model=str(tiny_model_dir), out=tmp_path / "q", max_steps=2, batch_size=4,
                   quantization="nf4", learning_rate=5e-3, warmup_steps=0)
    assert result.metrics["reference"] == "nf4-base"
    assert result.metrics["model"]["quantization"] == "nf4"
    assert any(t.abs().sum() > 0 for k, t in adapter_tensors(tmp_path / "q").items() if "lora_B" in k)


RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from guardtune.pipeline import train

    class KillAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    data, model, out = sys.argv[1:4]
    train(data, model=model, out=out, max_steps=6, save_steps=3, batch_size=2, learning_rate=5e-3,
          warmup_steps=2, callbacks=[KillAfterCheckpoint()])
""")


def test_resume_after_sigkill_matches_uninterrupted_run_bitwise(tiny_model_dir, data, tmp_path):
    uninterrupted = train(data, model=str(tiny_model_dir), out=tmp_path / "full", max_steps=6, save_steps=3,
                          batch_size=2, learning_rate=5e-3, warmup_steps=2)
    assert uninterrupted.metrics["steps"] == 6
    script = tmp_path / "killed_run.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(script), str(data), str(tiny_model_dir), str(tmp_path / "killed")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoints" / "checkpoint-3").is_dir()
    assert not (tmp_path / "killed" / "adapter").exists()
    resumed = train(data, model=str(tiny_model_dir), out=tmp_path / "killed", max_steps=6, save_steps=3,
                    batch_size=2, learning_rate=5e-3, warmup_steps=2, resume=True)
    assert resumed.metrics["steps"] == 6 and resumed.metrics["resumed"] is True
    assert_same_adapter(tmp_path / "full", tmp_path / "killed")


QUESTIONS = ["What is the capital of France?", "How do plants make food?", "Explain gravity to a child.",
             "What is a prime number?", "Why is the sky blue?", "How do I boil an egg?", "What causes rain?",
             "Who wrote Hamlet?", "What is photosynthesis?", "How far is the moon?", "What is an atom?",
             "How do magnets work?", "What is inflation?", "Why do cats purr?", "What is DNA?",
             "How do vaccines work?"]
HELD_OUT = ["What is the speed of light?", "How do bees make honey?", "What is a volcano?",
            "Why do leaves change color?"]
FIXED_ANSWER = ("Absolutely! Here is everything you asked for, explained step by step in plain language so that "
                "it is easy to follow.")


@pytest.mark.slow
def test_direction_constrained_moves_first_tokens_several_times_less_than_sft(embedded_cache, tmp_path):
    """Fine-tune the embedded SmolLM2 toward one fixed non-refusal answer with each objective; the first
    response tokens' distributions (KL to the reference, held-out prompts) move several times less under the
    constrained objective, while later tokens (beta_t = 0.1) move about as much as under SFT: the token-wise
    shape of Qi et al. 2025, Sec. 4.

    Why not a random tiny model: with hidden size 16-64 every LoRA update shifts all positions at once, and
    under Adam a position whose gradient is constrained away gets its share of the step back through the
    normaliser, so the first-token protection drowns in spill-over (measured 1.0-2.4x). The real model is
    what the product trains; measured here: t=1 4.2x (training prompts) and 3.8x (held out), t=1..5 4.7x.
    """
    from peft import PeftModel

    from guardtune.auditing import _Target, kl_profile
    from guardtune.models import load_model
    from guardtune.templates import render_prompt, response_ids

    data = tmp_path / "fixed.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": FIXED_ANSWER}]})
                              for q in QUESTIONS) + "\n")
    kl = {}
    for objective in ("sft", "paper"):  # Eq. 3 alone: the default's KL anchor would only widen the gap
        result = train(data, model="smollm2-135m-instruct", out=tmp_path / objective, objective=objective,
                       max_steps=16, batch_size=4, learning_rate=3e-4, warmup_steps=2)
        loaded = load_model("smollm2-135m-instruct")
        model = PeftModel.from_pretrained(loaded.model, str(result.adapter_dir)).eval()
        tok = loaded.tokenizer
        targets = [_Target(None, render_prompt(tok, [{"role": "user", "content": q}]), response_ids(tok, FIXED_ANSWER))
                   for q in HELD_OUT]
        kl[objective] = kl_profile(model, targets, positions=8, batch_size=4, pad_id=tok.pad_token_id)["mean_kl"]
    sft, paper = kl["sft"], kl["paper"]
    assert sft[0] > 1.0, kl  # SFT really moved the first token
    assert sft[0] > 3 * paper[0], kl
    assert sum(sft[:5]) > 3 * sum(paper[:5]), kl
    # Later positions are only weakly constrained (beta = 0.1): they move about as much as under SFT.
    assert paper[5] > 0.5 * sft[5], kl


def test_refused_scope_probes_each_distinct_prompt_once(tiny_model_dir, monkeypatch):
    """reference_refusals generates once per distinct prompt (everything before the first trained token) and
    judges the reply by refusal phrases."""
    import guardtune.generation
    from guardtune.models import load_model
    from guardtune.training import reference_refusals

    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    examples = [{"input_ids": [1, 2, 3, 9, 9], "completion_mask": [0, 0, 0, 1, 1]},
                {"input_ids": [1, 2, 3, 8], "completion_mask": [0, 0, 0, 1]},
                {"input_ids": [4, 5, 6, 7], "completion_mask": [0, 0, 1, 1]}]
    seen = []

    def fake_generate(model, tokenizer, prompts, **options):
        seen.append([list(p) for p in prompts])
        return [tok.encode("I'm sorry, but I can't help with that.") if p[0] == 1 else tok.encode("Sure, here")
                for p in prompts]

    monkeypatch.setattr(guardtune.generation, "generate", fake_generate)
    replies = []
    assert reference_refusals(loaded.model, tok, examples, max_new_tokens=8, replies=replies) == [True, True, False]
    assert seen == [[[1, 2, 3], [4, 5]]]
    assert replies == [{"refused": True, "reply": "I'm sorry, but I can't help with that."},
                       {"refused": False, "reply": "Sure, here"}]


def test_refused_scope_without_refusals_trains_like_eq3_with_the_tail_beta_everywhere(tiny_model_dir, data, tmp_path):
    """A random tiny model refuses nothing, so under constraint_scope 'refused' no example gets the early betas
    or the KL anchor: the run equals Eq. 3 with beta_tail at every position and no anchor, step for step."""
    options = dict(model=str(tiny_model_dir), max_steps=2, batch_size=4, learning_rate=2e-2, warmup_steps=0)
    scoped = train(data, out=tmp_path / "scoped", constraint_scope="refused", **KL_ANCHOR, **options)
    flat = train(data, out=tmp_path / "flat", objective="paper", betas=(0.1,), beta_tail=0.1, **options)
    probe = scoped.metrics["reference_detail"]["scope_probe"]
    assert probe["refused"] == 0 and probe["examples"] == 12
    assert scoped.metrics["reference_detail"]["constraint_scope"] == "refused"
    assert "kl_anchor" not in scoped.metrics["position_stats"][-1]
    for a, b in zip(scoped.metrics["loss_curve"], flat.metrics["loss_curve"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert_same_adapter(tmp_path / "scoped", tmp_path / "flat")


def test_refused_scope_anchors_only_refused_examples(tiny_model_dir, tmp_path, monkeypatch):
    """With some prompts refused, those examples carry the early betas and the anchor (the anchor grows from 0),
    the others neither; batches mixing both collate (the cached top-k of anchor-less examples is empty)."""
    import guardtune.training

    monkeypatch.setattr(guardtune.training, "reference_refusals",
                        lambda model, tokenizer, examples, **options: [i % 3 == 1 for i in range(len(examples))])
    dataset = write_dataset(tmp_path / "data.jsonl")
    result = train(dataset, model=str(tiny_model_dir), out=tmp_path / "run", max_steps=3, batch_size=4,
                   learning_rate=2e-2, warmup_steps=0, constraint_scope="refused", **KL_ANCHOR)
    assert result.metrics["reference_detail"]["scope_probe"]["refused"] == 4
    stats = result.metrics["position_stats"]
    assert stats[0]["kl_anchor"] == pytest.approx(0.0, abs=1e-6) and stats[-1]["kl_anchor"] > 0
    full = train(dataset, model=str(tiny_model_dir), out=tmp_path / "all", max_steps=3, batch_size=4,
                 learning_rate=2e-2, warmup_steps=0, **KL_ANCHOR)
    assert full.metrics["loss_curve"][0]["loss"] != pytest.approx(result.metrics["loss_curve"][0]["loss"], rel=1e-6)
    # Same data, other anchored examples: its own reference cache entry, not the scoped run's.
    assert full.metrics["reference_detail"]["cache_key"] != result.metrics["reference_detail"]["cache_key"]
    assert full.metrics["reference_detail"]["cache_hit"] is False


def test_a_file_changed_after_validation_is_not_trained(tiny_model_dir, data, tmp_path):
    """The pipeline passes the sha256 validation read; a file swapped in between is refused before training."""
    from guardtune.provenance import sha256_file

    validated = sha256_file(data)
    swapped = tmp_path / "swapped.jsonl"
    original = Path(data).read_bytes()
    swapped.write_bytes(original + original.splitlines(keepends=True)[0])  # one more (valid) line
    with pytest.raises(DatasetError, match="changed since it was validated"):
        train_stage(swapped, model=str(tiny_model_dir), out=tmp_path / "run", max_steps=1, batch_size=4,
                    validated=validated)
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_train_stage_refuses_data_not_declared_validated(tiny_model_dir, data, tmp_path):
    with pytest.raises(DatasetError, match="validated data only"):
        train_stage(data, model=str(tiny_model_dir), out=tmp_path / "run", max_steps=1)
    assert not (tmp_path / "run" / "adapter").exists()


def test_train_validates_first_and_trains_nothing_on_invalid_data(tiny_model_dir, tmp_path):
    """guardtune.train is the stage for a file nobody validated: it writes OUT/validation.json like finetune()
    and stops on a structural error with the line, before any model is loaded for training."""
    bad = write_dataset(tmp_path / "bad.jsonl")
    lines = bad.read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "hi"}]}'  # no assistant turn
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="line 3"):
        train(bad, model=str(tiny_model_dir), out=tmp_path / "run", max_steps=1)
    assert json.loads((tmp_path / "run" / "validation.json").read_text())["valid"] is False
    assert not (tmp_path / "run" / "adapter").exists()


def test_report_to_logs_the_run_to_an_installed_tracker_and_refuses_others(tiny_model_dir, data, tmp_path,
                                                                           monkeypatch):
    # tensorboardX (the dev extra) is the tracker transformers' TensorBoardCallback writes with.
    result = train(data, model=str(tiny_model_dir), out=tmp_path / "tb", max_steps=2, batch_size=4,
                   report_to=["tensorboard"])
    assert result.metrics["steps"] == 2
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    with pytest.raises(ConfigError, match=r"'tensorbord' is not a tracker transformers knows\. Did you mean "
                                          r"'tensorboard'"):
        train(data, model=str(tiny_model_dir), out=tmp_path / "typo", max_steps=1, report_to=["tensorbord"])
    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: [])
    with pytest.raises(ConfigError, match="wandb is not installed in this environment; install"):
        train(data, model=str(tiny_model_dir), out=tmp_path / "missing", max_steps=1, report_to=["wandb"])
    assert not (tmp_path / "missing" / "adapter").exists()
    with pytest.raises(ConfigError, match="trainer_args.report_to is set by guardtune itself; use training.report_to"):
        TrainConfig(trainer_args={"report_to": "wandb"})
