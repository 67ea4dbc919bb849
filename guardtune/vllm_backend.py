"""The audit's vLLM backend (`audit.backend: vllm`, `pip install 'guardtune[vllm]'`, a CUDA machine).

It makes the same continuations as `generation.generate`: each prompt, with its prefilled harmful prefix, is
passed as token ids (exactly the ids the transformers backend feeds `generate`), decoded greedily (or with the
policy's sampling settings), and cut at the first stop token. The fine-tuned model is the base plus the adapter
through vLLM's LoRA support, so one engine serves both sides of the audit. Only the continuations move to vLLM:
the harmful prefixes, the judge and the KL profile (a teacher-forced pass) stay on the transformers model, which
shares the GPU, hence `audit.vllm.gpu_memory_utilization` below vLLM's own 0.9.

vLLM parallelises inside its own engine (`audit.vllm.tensor_parallel_size`; `audit.vllm.engine_args` passes any
other `vllm.LLM` argument such as data_parallel_size, max_model_len or enforce_eager), so this backend runs in
one process: under torchrun / accelerate launch use the transformers backend, which shards prompts over the
processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from . import distributed
from .errors import ConfigError, MissingDependencyError

# Arguments guardtune sets from the model and audit settings; engine_args may not override them.
OWNED_ENGINE_ARGS = frozenset({"model", "tokenizer", "revision", "dtype", "quantization", "seed", "enable_lora",
                               "max_lora_rank", "max_loras", "tensor_parallel_size", "gpu_memory_utilization",
                               "trust_remote_code"})
# vLLM allocates LoRA buffers for one of these ranks; the adapter's rank is rounded up to the next one.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_NAME = "guardtune-adapter"


def _vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise MissingDependencyError("audit.backend is 'vllm' but vLLM is not installed. Install it on a CUDA "
                                     "machine with `pip install 'guardtune[vllm]'`, or set audit.backend: hf.") from exc
    return vllm


def lora_rank(adapter: str | Path) -> int:
    """The adapter's LoRA rank (`r` in adapter_config.json), rounded up to a rank vLLM allocates for."""
    try:
        r = int(json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"Cannot read the LoRA rank from {adapter}/adapter_config.json ({exc}); the vLLM backend "
                          f"needs a PEFT LoRA adapter directory.") from exc
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise ConfigError(f"The adapter's LoRA rank {r} is above {LORA_RANKS[-1]}, the largest vLLM serves; audit it "
                      f"with audit.backend: hf.")


def engine_options(model_dir: str | Path, *, adapter: str | Path | None, dtype: str, quantization: str, seed: int,
                   tensor_parallel_size: int, gpu_memory_utilization: float, engine_args: dict[str, Any],
                   trust_remote_code: bool) -> dict[str, Any]:
    """The `vllm.LLM(**options)` for one audit: guardtune's settings plus the policy's engine_args."""
    clash = sorted(set(engine_args) & OWNED_ENGINE_ARGS)
    if clash:
        raise ConfigError(f"audit.vllm.engine_args sets {', '.join(clash)}, which guardtune sets from the model and "
                          f"audit settings (model.*, audit.vllm.tensor_parallel_size / gpu_memory_utilization). "
                          f"Remove them from engine_args.")
    options: dict[str, Any] = {"model": str(model_dir), "dtype": dtype, "seed": seed,
                               "tensor_parallel_size": tensor_parallel_size,
                               "gpu_memory_utilization": gpu_memory_utilization,
                               "trust_remote_code": trust_remote_code, **engine_args}
    if quantization == "nf4":
        options["quantization"] = "bitsandbytes"  # vLLM's in-flight NF4, the QLoRA base
    if adapter is not None:
        options.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank(adapter))
    return options


class VLLMGenerator:
    """One vLLM engine over the base model (and the adapter, when there is one) for the audit's continuations."""

    def __init__(self, model_dir: str | Path, *, adapter: str | Path | None = None, **options: Any):
        if distributed.world_size() > 1:
            raise ConfigError("audit.backend 'vllm' runs in one process (vLLM parallelises inside its engine: "
                              "audit.vllm.tensor_parallel_size); launch the audit without torchrun/accelerate, or "
                              "use audit.backend: hf, which shards prompts over the processes.")
        self._vllm = _vllm()
        self.options = engine_options(model_dir, adapter=adapter, **options)
        self.llm = self._vllm.LLM(**self.options)
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(ADAPTER_NAME, 1, str(adapter))

    def describe(self) -> dict[str, Any]:
        """What report.json records about the engine (provenance.generation)."""
        return {"vllm": getattr(self._vllm, "__version__", None), "adapter_via": "vllm-lora" if self.lora else None,
                "engine": {k: v for k, v in self.options.items() if k != "model"}}

    def generate(self, prompts: Sequence[Sequence[int]], *, finetuned: bool, max_new_tokens: int,
                 stop_ids: Sequence[int], do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
        """Continue each prompt (token ids) with the base (`finetuned=False`) or base + adapter; the new token
        ids, cut at the first stop token (the transformers backend's convention)."""
        if finetuned and self.lora is None:
            raise ValueError("This engine was built without an adapter; there is no fine-tuned model to run.")
        sampling = {"temperature": temperature, "top_p": top_p, "seed": seed} if do_sample else {"temperature": 0.0}
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, stop_token_ids=list(stop_ids), **sampling)
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]  # vllm.inputs.TokensPrompt
        outputs = self.llm.generate(requests, params, lora_request=self.lora if finetuned else None, use_tqdm=False)
        stop = set(stop_ids)
        continuations = []
        for output in outputs:
            tokens = list(output.outputs[0].token_ids)
            cut = next((j for j, t in enumerate(tokens) if t in stop), len(tokens))
            continuations.append(tokens[:cut])
        if on_batch:
            on_batch(len(prompts))
        return continuations
