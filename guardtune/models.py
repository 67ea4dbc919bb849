"""Load a model (fp32/bf16/NF4) from a model spec, attach LoRA, and give the frozen reference."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch

from .config import TrainConfig, choices
from .distributed import local_rank, world_size
from .errors import ConfigError, MissingDependencyError, ModelError
from .modelspec import classify_spec, quiet_peft_wrapping, resolve_model_dir, weights_sha256
from .templates import ensure_pad_token

log = logging.getLogger(__name__)

QUANTIZATIONS = choices(TrainConfig, "quantization")


@dataclass
class ModelInfo:
    """Where a loaded model came from and how it was loaded (recorded in reports and manifests)."""

    spec: str
    kind: str  # "embedded" | "local" | "hub"
    path: str
    revision: str | None  # hub commit hash; None for embedded and local models
    weights_sha256: str
    quantization: str  # "none" | "nf4"
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A model with its tokenizer. The tokenizer always has a pad token (eos when it had none); padding side is
    left as the checkpoint ships it: training pads right, batched generation pads left, so callers choose."""

    model: Any
    tokenizer: Any
    info: ModelInfo


# --- loading ----------------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    """torch dtype for a dtype name: auto = bfloat16 on a bf16-capable CUDA GPU, else float32."""
    on_cuda = str(device).startswith("cuda")
    if dtype == "auto":
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"model.dtype is {dtype!r}; use auto, float32, bfloat16 or float16.")
    if dtype == "float16" and not on_cuda:
        raise ConfigError("model.dtype float16 is not supported on CPU (many kernels are missing or slow); "
                          "use auto, float32 or bfloat16.")
    return names[dtype]


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off while a local directory loads (it says nothing a job's own progress
    does not; guardtune loads several models per job); the caller's setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_model(spec: str, *, quantization: str = "none", dtype: str = "auto", device: str | None = None,
               trust_remote_code: bool = False, revision: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from an embedded name, a local directory or a hub id.

    quantization="nf4" loads the base in 4-bit NF4 (QLoRA) through bitsandbytes, on CPU or CUDA. The model
    comes back as `from_pretrained` leaves it (eval mode, all parameters trainable until `attach_lora`).
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization is {quantization!r}; use one of: {', '.join(QUANTIZATIONS)}.")
    kind = classify_spec(spec)
    path = resolve_model_dir(spec, revision)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available here; use device='cpu'.")
    if torch_device.type == "cuda" and torch_device.index is None:  # under a launcher: this process's own GPU
        torch_device = torch.device("cuda", local_rank() if world_size() > 1 else torch.cuda.current_device())
    torch_dtype = resolve_dtype(dtype, torch_device.type)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                              "device_map": {"": str(torch_device)}}
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        with _no_loading_bar():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not load model {spec!r} from {path}: {exc}") from exc
    if quantization == "nf4":
        disable_cpu_weight_repacking(model)
    ensure_pad_token(tokenizer, repr(spec))
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    info = ModelInfo(spec=spec, kind=kind, path=str(path),
                     revision=path.name if kind == "hub" else None,  # HF snapshot folders are named by commit
                     weights_sha256=weights_sha256(path), quantization=quantization,
                     dtype=str(torch_dtype).removeprefix("torch."), device=str(torch_device))
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def nf4_config(compute_dtype: Any) -> Any:
    """QLoRA's quantization: NF4 with double quantization, computing in `compute_dtype` (bf16 GPU, fp32 CPU)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError("quantization nf4 needs bitsandbytes: pip install bitsandbytes")
    quiet_bitsandbytes_kernels_warning()  # before anything imports bitsandbytes: the warning comes at import
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


class _KernelsNotice(logging.Filter):
    """Replaces bitsandbytes' import-time warning on AVX512-BF16 CPUs ("Failed to load CPU gemm_4bit_forward from
    kernels-community ... pip install kernels"): the optional `kernels` package fetches that kernel from the Hugging
    Face Hub; without it NF4 runs on bitsandbytes' own CPU kernels, which is what guardtune needs anyway (it turns
    the AVX512-BF16 weight repacking off: disable_cpu_weight_repacking). Said once, at info level."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "kernels-community" not in record.getMessage():
            return True
        if not _KernelsNotice.said:
            _KernelsNotice.said = True
            log.info("bitsandbytes' optional CPU kernel (package `kernels`, fetched from the Hugging Face Hub) is not "
                     "in use; NF4 runs on bitsandbytes' built-in CPU kernels. Nothing to do.")
        return False


def quiet_bitsandbytes_kernels_warning() -> None:
    """Install _KernelsNotice on the bitsandbytes logger that warns (idempotent)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _KernelsNotice) for f in logger.filters):
        logger.addFilter(_KernelsNotice())


def disable_cpu_weight_repacking(model: Any) -> int:
    """Turn off bitsandbytes' CPU weight repacking on every Linear4bit; return how many layers were touched.

    On CPUs with AVX512-BF16, an eval-mode forward without grad repacks a Linear4bit's weight in place into a
    kernel-specific layout, after which the backward pass no longer reaches the LoRA parameters (their grads are
    silently None). Generation and reference passes happen between training steps, so repacking is never safe.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


# --- LoRA and the reference model -------------------------------------------------------------------------------


def attach_lora(model: Any, config: TrainConfig) -> Any:
    """Wrap `model` in a peft LoRA adapter (CAUSAL_LM) from a TrainConfig; the base weights are frozen.

    For NF4 bases, peft's prepare_model_for_kbit_training first freezes everything and upcasts the non-4-bit
    bf16/fp16 parameters (norms, embeddings) to fp32 for stable training; on an fp32 CPU model that is a no-op
    besides freezing. Gradient checkpointing stays off (its input-grad hook is not needed without it).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # LoRA A is randomly initialised: same seed, same adapter at step 0
    with quiet_peft_wrapping():
        return get_peft_model(model, lora)


@contextlib.contextmanager
def reference(model: Any) -> Iterator[Any]:
    """The frozen reference model: the same PeftModel with its adapter disabled, under torch.no_grad().

    One copy of the weights serves as both policy and reference (TRL's DPO reference-by-disabling). The module
    train/eval mode is deliberately NOT switched: an eval-mode no-grad forward is exactly what triggers
    bitsandbytes' CPU weight repacking (see disable_cpu_weight_repacking), and switching modes mid-training is
    easy to leave wrong. With the adapter disabled, LoRA dropout is bypassed; any nn.Dropout of the base model
    itself is put in eval mode for the duration (and restored), so the reference is deterministic either way.
    A plain (non-peft) model is its own reference: just no_grad, with the same dropout handling.
    """
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training and m.p > 0]
    disable = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        for module in dropouts:
            module.training = False
        with torch.no_grad(), disable:
            yield model
    finally:
        for module in dropouts:
            module.training = True
