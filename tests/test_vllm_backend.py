"""The audit's vLLM backend: its engine options, and an audit through it against a stand-in `vllm` module that
records what guardtune hands the engine (prompt token ids, sampling, LoRA request) and continues with the tiny
model, so the report must equal the transformers backend's. With vLLM and a GPU at hand, the real engine's greedy
continuations are compared to transformers' (skipped otherwise: CI has neither)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from guardtune.errors import ConfigError, MissingDependencyError
from guardtune.vllm_backend import LORA_RANKS, VLLMGenerator, engine_options, lora_rank

SMALL = dict(sample_harmful=6, sample_benign=4, sample_utility=5, max_new_tokens=6, prefill_k=(0, 3, 8),
             prefix_tokens=10, kl_positions=6, batch_size=8, decoding_attack=False, gcg_attack=False)


@pytest.fixture(scope="module")
def moved_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter with random B (the fine-tuned model differs from its base)."""
    from tiny_models import save_moved_adapter

    return save_moved_adapter(tiny_model_dir, tmp_path_factory.mktemp("moved-adapter"))


def options(**changes):
    base = dict(adapter=None, dtype="float32", quantization="none", seed=0, tensor_parallel_size=2,
                gpu_memory_utilization=0.5, engine_args={"max_model_len": 2048}, trust_remote_code=False)
    return {**base, **changes}


def test_engine_options_carry_the_model_settings_and_refuse_owned_engine_args(moved_adapter):
    opts = engine_options("/models/base", **options(adapter=moved_adapter, quantization="nf4"))
    assert opts["model"] == "/models/base" and opts["tensor_parallel_size"] == 2 and opts["max_model_len"] == 2048
    assert opts["quantization"] == "bitsandbytes" and opts["enable_lora"] is True and opts["max_lora_rank"] == 8
    assert "enable_lora" not in engine_options("/m", **options())
    with pytest.raises(ConfigError, match="dtype, seed"):
        engine_options("/m", **options(engine_args={"seed": 1, "dtype": "half"}))


def test_lora_rank_rounds_up_to_a_rank_vllm_serves(tmp_path):
    for r, served in ((4, 8), (8, 8), (12, 16), (512, 512)):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r}))
        assert lora_rank(tmp_path) == served
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": LORA_RANKS[-1] + 1}))
    with pytest.raises(ConfigError, match="largest vLLM serves"):
        lora_rank(tmp_path)
    with pytest.raises(ConfigError, match="adapter_config.json"):
        lora_rank(tmp_path / "missing")


def test_without_vllm_the_backend_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(MissingDependencyError, match=r"guardtune\[vllm\]"):
        VLLMGenerator("/m", **{k: v for k, v in options().items() if k != "adapter"})


class _Output:
    def __init__(self, token_ids):
        self.outputs = [types.SimpleNamespace(token_ids=token_ids)]


def fake_vllm(calls: list) -> types.ModuleType:
    """A stand-in `vllm`: LLM(**options) loads the model directory with transformers; generate() continues the
    given token ids greedily (with the adapter when a LoRARequest is passed), appending the stop token the way
    vLLM reports it, and records every call."""
    from peft import PeftModel

    from guardtune.generation import generate
    from guardtune.models import load_model

    module = types.ModuleType("vllm")
    module.__version__ = "stand-in"

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **options):
            calls.append(("init", options))
            self.loaded = load_model(options["model"])
            self.adapters: dict[str, object] = {}

        def generate(self, requests, params, lora_request=None, use_tqdm=True):
            calls.append(("generate", requests, params.kwargs, lora_request))
            model = self.loaded.model
            if lora_request is not None:
                path = lora_request.lora_path
                if path not in self.adapters:
                    self.adapters[path] = PeftModel.from_pretrained(load_model(self.options_model).model, path)
                model = self.adapters[path]
            ids = [r["prompt_token_ids"] for r in requests]
            stop = params.kwargs["stop_token_ids"]
            out = generate(model.eval(), self.loaded.tokenizer, ids, max_new_tokens=params.kwargs["max_tokens"],
                           batch_size=5)
            return [_Output(o + stop[:1] if len(o) < params.kwargs["max_tokens"] else o) for o in out]

        @property
        def options_model(self):
            return next(o for kind, o, *_ in calls if kind == "init")["model"]

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    module.LLM, module.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    module.lora, lora.request = lora, request
    return module, {"vllm": module, "vllm.lora": lora, "vllm.lora.request": request}


def test_an_audit_through_vllm_hands_the_engine_the_hf_token_ids_and_reports_the_same(
        tiny_model_dir, moved_adapter, tmp_path, monkeypatch):
    from guardtune.auditing import audit

    common = dict(model=str(tiny_model_dir), prefix_model=str(tiny_model_dir), use_cache=False, **SMALL)
    hf = audit(moved_adapter, out=tmp_path / "hf", **common)
    calls: list = []
    _, modules = fake_vllm(calls)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    vl = audit(moved_adapter, out=tmp_path / "vllm", backend="vllm", vllm_engine_args={"enforce_eager": True},
               **common)

    init = calls[0][1]
    assert init["enable_lora"] and init["max_lora_rank"] == 8 and init["enforce_eager"] is True
    assert init["dtype"] == "float32" and init["tensor_parallel_size"] == 1
    generates = [c for c in calls if c[0] == "generate"]
    assert [c[3] is None for c in generates] == [True, False]  # the base, then base + adapter through LoRA
    assert str(generates[1][3].lora_path) == str(moved_adapter)
    assert all(c[2]["temperature"] == 0.0 and c[2]["max_tokens"] == SMALL["max_new_tokens"] for c in generates)
    # The exact prompt + prefilled-prefix ids of the transformers backend: the same samples, continuation by
    # continuation, and the same results on both sides.
    hf_samples = [json.loads(line) for line in hf.samples_path.read_text().splitlines()]
    vl_samples = [json.loads(line) for line in vl.samples_path.read_text().splitlines()]
    assert len(generates[0][1]) == len([s for s in hf_samples if s["model"] == "base"])
    assert [s["continuation"] for s in vl_samples] == [s["continuation"] for s in hf_samples]
    assert vl.results == hf.results
    assert any(a["continuation"] != b["continuation"] for a, b in zip(
        [s for s in hf_samples if s["model"] == "base"], [s for s in hf_samples if s["model"] == "finetuned"]))
    generation = vl.report["provenance"]["generation"]
    assert generation["backend"] == "vllm" and generation["vllm"] == "stand-in"
    assert hf.report["provenance"]["generation"] == {"backend": "hf", "processes": 1}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the vLLM engine needs a CUDA GPU")
def test_real_vllm_greedy_continuations_match_transformers(tiny_model_dir, moved_adapter, tmp_path):
    pytest.importorskip("vllm")
    from guardtune.auditing import audit

    common = dict(model=str(tiny_model_dir), prefix_model=str(tiny_model_dir), use_cache=False,
                  **{**SMALL, "sample_harmful": 20, "max_new_tokens": 32})
    hf = [json.loads(s) for s in audit(moved_adapter, out=tmp_path / "hf", **common)
          .samples_path.read_text().splitlines()]
    vl = [json.loads(s) for s in audit(moved_adapter, out=tmp_path / "vl", backend="vllm", **common)
          .samples_path.read_text().splitlines()]
    same = sum(a["continuation"] == b["continuation"] for a, b in zip(hf, vl)) / len(hf)
    assert same >= 0.99, f"greedy match {same:.3f}"
