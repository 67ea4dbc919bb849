"""Stream a JSONL training file, check every line and collect every issue (line + JSON path) into a report."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import modelspec
from .config import DatasetConfig, ModelConfig, RunConfig, resolve_stage
from .errors import DatasetError, GuardtuneError, Issue, ModelError
from .policy import Policy
from .provenance import write_json_file
from .records import IssueLog, RecordChecker, iter_records, plural, read_lines
from .sources import kind_of, materialize
from .screen import screen_judge, screen_records
from .tokencount import TokenCounter

MAX_ISSUES_PER_CODE = 1000  # stored per code; counts_by_code stays exact
PROGRESS_MIN_BYTES = 50 * 2**20  # progress bar on a TTY for files larger than this


@dataclass
class ValidationReport:
    """What `validate_dataset` found. Records themselves are not kept; `iter_records` streams them again."""

    path: str
    sha256: str | None  # of the raw file bytes; None when the file was too large to read
    format: str | None  # "chat" | "prompt_completion" | None (no valid record)
    n_records: int  # valid records
    n_lines: int
    issues: list[Issue]  # at most MAX_ISSUES_PER_CODE per code
    counts_by_code: dict[str, int]  # exact
    n_errors: int = 0
    n_warnings: int = 0
    n_bytes: int = 0
    policy: dict[str, Any] = field(default_factory=dict)
    token_check: dict[str, Any] = field(default_factory=dict)  # model (None: not checked), max_tokens
    dropped_lines: list[int] = field(default_factory=list)  # filled by the risk screen
    screen: dict[str, Any] = field(default_factory=dict)  # risk screen summary (guardtune.screen)
    source: dict[str, Any] | None = None  # a converted source (sources.Source.to_dict()); None for a .jsonl file

    @property
    def valid(self) -> bool:
        return self.n_errors == 0

    def summary(self) -> str:
        """One line: 'valid: 60 records, chat format, 0 errors, 1 warning' or 'INVALID: ...'."""
        label = {"chat": "chat", "prompt_completion": "prompt/completion"}.get(self.format or "", "unknown")
        tail = f"{label} format, {plural(self.n_errors, 'error')}, {plural(self.n_warnings, 'warning')}"
        if self.valid:
            return f"valid: {plural(self.n_records, 'record')}, {tail}"
        return f"INVALID: {self.n_records} valid of {plural(self.n_lines, 'line')}, {tail}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "guardtune-validation-report", "schema_version": 1, "valid": self.valid,
                "path": self.path, "sha256": self.sha256, "n_bytes": self.n_bytes, "format": self.format,
                "n_records": self.n_records, "n_lines": self.n_lines, "n_errors": self.n_errors,
                "n_warnings": self.n_warnings, "counts": dict(sorted(self.counts_by_code.items())),
                "issues": [issue.to_dict() for issue in self.issues], "dropped_lines": list(self.dropped_lines),
                "policy": self.policy, "token_check": self.token_check, "screen": self.screen,
                "source": self.source}

    def write(self, path: str | Path) -> Path:
        """Write validation.json atomically (a crash never leaves half a report for the next stage)."""
        return write_json_file(path, self.to_dict())

    @classmethod
    def read(cls, path: str | Path) -> "ValidationReport":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(path=data["path"], sha256=data["sha256"], format=data["format"],
                       n_records=data["n_records"], n_lines=data["n_lines"],
                       issues=[Issue(**issue) for issue in data["issues"]], counts_by_code=dict(data["counts"]),
                       n_errors=data["n_errors"], n_warnings=data["n_warnings"], n_bytes=data["n_bytes"],
                       policy=data.get("policy", {}), token_check=data.get("token_check", {}),
                       dropped_lines=list(data.get("dropped_lines", [])), screen=data.get("screen", {}),
                       source=data.get("source"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"Cannot read validation report {path}: {exc}. Re-run `guardtune validate`.")



def _progress_bar(total: int, progress: bool | None) -> Any:
    if progress is None:
        progress = total > PROGRESS_MIN_BYTES and sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="validate", file=sys.stderr,
                leave=False)


def _model_dir(spec: str, revision: str | None, explicit: bool) -> Path | None:
    """A local directory for a model spec. Explicit (--model): resolved or ModelError. Implicit (the policy's
    model): only if already on disk, else None. Never downloads or converts: that would import torch."""
    candidate = Path(spec).expanduser()
    if candidate.is_dir():
        return candidate
    if not explicit:
        found = modelspec.cached_model_dir(spec, revision=revision)
        return Path(found) if found is not None else None
    try:
        return Path(modelspec.resolve_model_dir(spec, revision, materialize=False))
    except GuardtuneError:
        raise
    except Exception as exc:
        raise ModelError(f"Cannot resolve model {spec!r}: {exc}. Pass a local model directory instead.")


def _token_counter(model: Any, spec: ModelConfig, config: DatasetConfig, log: IssueLog) -> TokenCounter | None:
    if isinstance(model, TokenCounter):
        return model
    if model is not None:  # explicit: failures are errors
        return TokenCounter.from_model_dir(_model_dir(str(model), None, explicit=True), name=str(model))
    reason = "is not available locally without loading it"
    try:
        directory = _model_dir(spec.name, spec.revision, explicit=False)
        if directory is not None:
            return TokenCounter.from_model_dir(directory, name=spec.name)
    except Exception as exc:  # the implicit check must never break validation; the warning says why
        reason = f"could not be loaded ({exc})"
    log.add("token-check-skipped", f"Token lengths were not checked against dataset.max_tokens "
            f"({config.max_tokens}): the policy's model {spec.name!r} {reason}. Pass --model with a local model "
            f"directory (or a prepared model name) to check them.", severity="warning")
    return None


def validate_dataset(path: str | Path, config: DatasetConfig | RunConfig | Policy | str | Path | None = None,
                     model: Any = None, *,
                     progress: bool | None = None, max_issues_per_code: int = MAX_ISSUES_PER_CODE,
                     screen: bool = True, model_judge: Any = None,
                     on_progress: Callable[[str, int, int], None] | None = None,
                     split: str = "train") -> ValidationReport:
    """Check a JSONL dataset line by line against the policy's dataset limits; never stops at the first issue.

    model: None (the policy's model.name, if available without loading it), a local model directory, a
    model spec resolved by guardtune.modelspec, or a TokenCounter. progress: None shows a bar on a TTY for
    files over 50 MB. screen: run the risk screen (guardtune.screen) when the policy enables it and the file
    is structurally valid. Raises DatasetError if the file cannot be read, ModelError/TemplateError if an
    explicit model cannot be used, JudgeError if the screen's judge cannot be built; everything wrong *inside*
    the file is an issue in the report. `config` is a RunConfig (its dataset and model sections), a Policy or
    policy name/path (None: the shipped default), or a DatasetConfig (the model section from the default policy).
    model_judge: the base-model screen judge (modelscreen.BaseModelJudge, built by the caller, who has the model
    loaded); with dataset.screen.model.enabled it judges every trained pair the policy's screen judge passes. A
    string instead says why there is none (recorded in validation.json's screen.model); a zero-argument callable
    builds the judge only once the file has passed its structural checks (a broken file never loads a model).
    on_progress(phase, records done, records): the screen's progress ("screen", or "model screen" with the base).
    A source that is not JSONL (guardtune.sources: .jsonl.gz/.zst, .json, .parquet, a datasets directory or hub
    id in the local cache, `split`) is converted to JSONL in a temporary directory and validated there: line
    numbers are row numbers, and report.source says what was converted.
    """
    if kind_of(path) != "jsonl":  # .jsonl.gz/.zst, .json, .parquet, a datasets directory or hub id
        with tempfile.TemporaryDirectory(prefix="guardtune-input-") as scratch:
            converted = materialize(path, scratch, split=split)
            if converted.converted:  # else: it only looked compressed; read below, line by line, as it is
                report = validate_dataset(converted.path, config, model, progress=progress,
                                          max_issues_per_code=max_issues_per_code, screen=screen,
                                          model_judge=model_judge, on_progress=on_progress)
                report.path, report.source = str(path), {**converted.to_dict(), "converted_to": None}
                return report
    policy, config, model_spec = resolve_stage("dataset", config, None, {})
    # Built before reading anything: a screen judge that cannot run fails the validation up front (fail closed).
    judge = screen_judge(config) if screen and config.screen_enabled else None
    use_model = judge is not None and config.screen_model and model_judge is not None and \
        not isinstance(model_judge, str)
    source = Path(path)
    if source.exists() and not source.is_file():
        raise DatasetError(f"Dataset {source} is not a regular file. Pass the .jsonl file itself.")
    try:
        size = source.stat().st_size
        handle = open(source, "rb")
    except OSError as exc:
        raise DatasetError(f"Cannot read dataset {source}: {exc.strerror or exc}. Check the path and permissions.")
    log = IssueLog(max_issues_per_code)
    with handle:
        counter = _token_counter(model, model_spec, config, log)
        report = ValidationReport(path=str(source), sha256=None, format=None, n_records=0, n_lines=0,
                                  issues=log.issues, counts_by_code=log.counts, n_bytes=size,
                                  policy={"name": policy.name, "version": policy.version, "sha256": policy.sha256},
                                  token_check={"model": counter.name if counter else None,
                                               "max_tokens": config.max_tokens})
        if size > config.max_file_bytes:
            log.add("file-too-large", f"The file is {size} bytes; the policy allows {config.max_file_bytes} "
                    f"(dataset.max_file_bytes). Split it or raise the limit in your policy. Nothing was read.")
            report.screen = {"ran": False, "reason": "the file was not read"}
            report.n_errors, report.n_warnings = log.n_errors, log.n_warnings
            return report
        checker = RecordChecker(config, log, counter)
        digest = hashlib.sha256()
        bar = _progress_bar(size, progress)
        try:
            for line, offset, raw in read_lines(handle, config.max_line_bytes, digest, bar):
                report.n_lines = line
                if raw is None:
                    checker.saw_content = True
                    log.add("line-too-large", f"The line is longer than {config.max_line_bytes} bytes "
                            f"(dataset.max_line_bytes) and was not parsed. Shorten or split the example, or "
                            f"raise the limit in your policy.", line=line)
                    continue
                checker.check_line(line, offset, raw)
        finally:
            if bar is not None:
                bar.close()
    checker.finish(report.n_lines)
    report.sha256 = digest.hexdigest()
    report.format = checker.format
    report.n_records = checker.n_records
    report.n_errors, report.n_warnings = log.n_errors, log.n_warnings
    if use_model and callable(model_judge) and not hasattr(model_judge, "evaluate_batch"):
        model_judge = model_judge() if judge is not None and report.valid and report.format is not None else None
        use_model = model_judge is not None
    phase = "model screen" if use_model else "screen"
    tick = (lambda done: on_progress(phase, done, report.n_records)) if on_progress else None
    _screen(report, source, config, judge, log, "disabled by the policy" if screen else "disabled by the caller",
            base=model_judge if use_model else None, on_progress=tick)
    if report.screen.get("ran") and config.screen_model:
        if use_model:
            report.screen["model"] = {"ran": True, **model_judge.describe(), "pairs": model_judge.n_pairs,
                                      "too_short": model_judge.n_short, "seconds": round(model_judge.seconds, 2)}
        else:
            report.screen["model"] = {"ran": False, "reason": model_judge if isinstance(model_judge, str) else
                                      "no base model was given (validate without --model); `guardtune finetune` "
                                      "always runs it"}
    return report


def _screen(report: ValidationReport, source: Path, config: DatasetConfig, judge: Any, log: IssueLog,
            off: str, base: Any = None, on_progress: Callable[[int], None] | None = None) -> None:
    """Run the risk screen over a structurally valid file and merge its flags into the report."""
    if judge is None:
        report.screen = {"ran": False, "reason": off}
        return
    if not report.valid or report.format is None:
        report.screen = {"ran": False, "reason": "the file has structural errors"}
        return
    # iter_records re-checks the sha256, so the screened bytes are the validated bytes. The report stays valid
    # (n_errors 0) until the screen is done: rejections are counted in `log` and copied over after.
    result = screen_records(lambda: iter_records(source, sha256=report.sha256, max_line_bytes=config.max_line_bytes,
                                                 message_names=config.message_names), config,
                            judge, base=base, format=report.format, max_flags_per_code=log.cap,
                            on_flag=lambda flag: log.add(*_issue_args(flag.issue())), on_progress=on_progress)
    report.dropped_lines = result.dropped_lines
    report.screen = result.summary()
    report.n_errors, report.n_warnings = log.n_errors, log.n_warnings


def _issue_args(issue: Issue) -> tuple[str, str, int | None, str, str]:
    return issue.code, issue.message, issue.line, issue.path, issue.severity
