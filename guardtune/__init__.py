"""guardtune: safety-hardened fine-tuning — validate, train (constrained), audit, gate, release.

Heavy modules (torch, transformers) load only when a stage that needs them is called, so the control plane
(validation, policies, gate, release, report) stays fast and torch-free.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "validate_dataset": "guardtune.dataset",
    "ValidationReport": "guardtune.dataset",
    "load_policy": "guardtune.policy",
    "Policy": "guardtune.policy",
    "train": "guardtune.pipeline",
    "align": "guardtune.alignment",
    "AlignResult": "guardtune.alignment",
    "redteam": "guardtune.redteaming",
    "RedteamResult": "guardtune.redteaming",
    "TrainResult": "guardtune.training",
    "audit": "guardtune.auditing",
    "AuditReport": "guardtune.auditing",
    "decide": "guardtune.gate",
    "GateDecision": "guardtune.gate",
    "publish": "guardtune.release",
    "verify": "guardtune.release",
    "Release": "guardtune.release",
    "load_release": "guardtune.release",
    "finetune": "guardtune.pipeline",
    "RunResult": "guardtune.pipeline",
    "TrainConfig": "guardtune.config",
    "AuditConfig": "guardtune.config",
    "GateConfig": "guardtune.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'guardtune' has no attribute {name!r}")
