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
