"""Typed errors: every failure says what failed, why, and how to fix it, and carries structured issues."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Issue:
    """One problem found in an input (a dataset line, a policy key, a report field)."""

    code: str
    message: str
    severity: str = "error"  # "error" | "warning"
    line: int | None = None  # 1-based line in the input file, when there is one
    path: str = ""  # JSON pointer inside the record or document ("" = the whole thing)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else ""
        if self.path:
            where = f"{where} {self.path}".strip()
        prefix = f"{where}: " if where else ""
        return f"{prefix}[{self.code}] {self.message}"


class GuardtuneError(Exception):
    """Base class. `issues` holds the structured problems behind the message, if any."""

    exit_code = 1

    def __init__(self, message: str, issues: Iterable[Issue] = ()):
        super().__init__(message)
        self.issues = list(issues)


class DatasetError(GuardtuneError, ValueError):
    """The training data is unusable (bad file, bad records, risk screen rejection)."""


class PolicyError(GuardtuneError, ValueError):
    """A policy file is missing, malformed, or fails its schema."""


class ConfigError(GuardtuneError, ValueError):
    """Option values contradict each other or the policy."""


class ModelError(GuardtuneError):
    """A model spec cannot be resolved or loaded."""


class TemplateError(GuardtuneError, ValueError):
    """A chat template cannot render an example the way training needs."""


class JudgeError(GuardtuneError):
    """A judge is misconfigured or cannot run at all (single unscorable samples are verdict errors, not this)."""


class ReportError(GuardtuneError, ValueError):
    """An audit report or manifest is missing, malformed, or fails its schema."""


class VerificationError(GuardtuneError):
    """A released directory does not match its manifest."""


class GateRejected(GuardtuneError):
    """The gate rejected the fine-tuned adapter; `decision` holds the per-rule reasons."""

    exit_code = 3

    def __init__(self, message: str, decision: Any = None):
        super().__init__(message)
        self.decision = decision


class MissingDependencyError(GuardtuneError, ImportError):
    """An optional dependency or model package is not installed."""


def did_you_mean(name: str, available: Iterable[str]) -> str:
    """'Did you mean …? Available: …' suffix for an unknown name (lm-eval registry style)."""
    choices = sorted(set(available))
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Available: {', '.join(choices) if choices else '(none)'}."
