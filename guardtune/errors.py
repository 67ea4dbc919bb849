"""Typed errors: every failure says what failed, why, and how to fix it, and carries structured issues.

Each kind has a stable `code` and an exit code for job runners (documented in the README and `guardtune --help`):
0 done / released, 1 bad input (the data, the policy, the options, the model, judge or report named), 2
command-line usage, 3 rejected by the gate, 4 infrastructure or internal failure (a missing optional package,
anything unexpected such as a crash or out of memory: worth a retry or a bug report, not a change of the input).
"""

from __future__ import annotations

import difflib
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_REJECTED, EXIT_INFRASTRUCTURE = 0, 1, 2, 3, 4


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
    """Base class. `issues` holds the structured problems behind the message, if any; `hint` the general fix for
    this kind of error (the message carries the specific one); `stage` the pipeline stage it stopped, once known."""

    exit_code = EXIT_BAD_INPUT
    code = "error"
    hint = ""

    def __init__(self, message: str, issues: Iterable[Issue] = (), *, hint: str | None = None):
        super().__init__(message)
        self.issues = list(issues)
        if hint is not None:
            self.hint = hint
        self.stage: str | None = None


class DatasetError(GuardtuneError, ValueError):
    """The training data is unusable (bad file, bad records, risk screen rejection)."""

    code = "bad-dataset"
    hint = "Run `guardtune validate FILE` for every problem by line; fix them and submit the file again."


class PolicyError(GuardtuneError, ValueError):
    """A policy file is missing, malformed, or fails its schema."""

    code = "bad-policy"
    hint = ("Run `guardtune policies check POLICY` for every problem; `guardtune policies show default` lists "
            "every key.")


class ConfigError(GuardtuneError, ValueError):
    """Option values contradict each other or the policy."""

    code = "bad-config"
    hint = "Change the option or policy key the message names (`guardtune policies show default` lists every key)."


class ModelError(GuardtuneError):
    """A model spec cannot be resolved or loaded."""

    code = "bad-model"
    hint = ("`guardtune models list` shows the embedded models; otherwise pass a local model directory or a hub "
            "id in the local cache.")


class TemplateError(GuardtuneError, ValueError):
    """A chat template cannot render an example the way training needs."""

    code = "bad-template"
    hint = ("Use a model whose chat template renders system/user/assistant turns, or shorten the example the "
            "message names.")


class JudgeError(GuardtuneError):
    """A judge is misconfigured or cannot run at all (single unscorable samples are verdict errors, not this)."""

    code = "bad-judge"
    hint = ("Fix the judge settings the message names (name, options, endpoint, API key variable); nothing was "
            "judged. A judge that fails on single samples is counted in judge_errors instead.")


class ReportError(GuardtuneError, ValueError):
    """An audit report or manifest is missing, malformed, or fails its schema."""

    code = "bad-report"
    hint = "Re-run `guardtune audit` to write a complete report."


class VerificationError(GuardtuneError):
    """A released directory does not match its manifest."""

    code = "verification-failed"
    hint = ("Do not deploy this directory: it does not match its manifest. Re-publish from the run, or restore "
            "the files.")


class GateRejected(GuardtuneError):
    """The gate rejected the fine-tuned adapter; `decision` holds the per-rule reasons."""

    exit_code = EXIT_REJECTED
    code = "gate-rejected"
    hint = "Read the failed rules in gate.json and report.html; the adapter stays in quarantine."

    def __init__(self, message: str, decision: Any = None):
        super().__init__(message)
        self.decision = decision


class MissingDependencyError(GuardtuneError, ImportError):
    """An optional dependency or model package is not installed."""

    exit_code = EXIT_INFRASTRUCTURE
    code = "missing-dependency"
    hint = "Install the package the message names."


def did_you_mean(name: str, available: Iterable[str]) -> str:
    """'Did you mean …? Available: …' suffix for an unknown name (lm-eval registry style)."""
    choices = sorted(set(available))
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Available: {', '.join(choices) if choices else '(none)'}."


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark an error raised inside as having stopped stage `name` (kept if an inner stage marked it first)."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "stage", None) is None:
            try:
                exc.stage = name  # type: ignore[attr-defined]
            except AttributeError:  # an exception type with __slots__
                pass
        raise


def error_payload(exc: BaseException, stage_name: str | None = None) -> dict[str, Any]:
    """The one JSON object a job runner gets for a failure: {"ok": false, "error": {code, message, hint, stage,
    exit_code, issues}}. An exception that is not a GuardtuneError is an internal failure (code "internal", exit 4,
    with its traceback)."""
    where = getattr(exc, "stage", None) or stage_name
    if isinstance(exc, GuardtuneError):
        error = {"code": exc.code, "message": str(exc), "hint": exc.hint or None, "stage": where,
                 "exit_code": exc.exit_code, "issues": [issue.to_dict() for issue in exc.issues[:50]]}
    else:
        error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}",
                 "hint": "An unexpected failure, not a problem with the input: retry, and report it with the "
                         "traceback if it repeats.", "stage": where, "exit_code": EXIT_INFRASTRUCTURE,
                 "issues": [], "traceback": "".join(traceback.format_exception(exc))[-8000:]}
    return {"ok": False, "error": error}
