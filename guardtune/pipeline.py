"""`finetune()`: validate -> train -> audit -> gate -> release, each stage leaving its artifact in the run dir.

    RUN/validation.json          dataset checks and risk screen (RUN/train_data.jsonl if lines were dropped)
    RUN/adapter/ + train_metrics.json
    RUN/audit/{report.json, samples.jsonl, report.html}
    RUN/gate.json
    RUN/release/<id>/ (pass)  or  RUN/quarantine/<id>/ (reject)

Any stage can be re-run alone from those files (`guardtune audit --adapter RUN/adapter`, `guardtune gate
RUN/audit/report.json`, `guardtune report RUN/audit`, `guardtune verify RUN/release/<id>`).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from .auditing import AuditReport
from .auditing import audit as run_audit
from . import distributed
from .config import RunConfig, TrainConfig, as_dict, resolve_stage
from .dataset import ValidationReport, validate_dataset
from .errors import ConfigError, DatasetError, GuardtuneError, VerificationError
from .errors import stage as error_stage
from .gate import GateDecision, decide
from .modelscreen import load_base_judge
from .modelspec import resolve_model_dir
from .policy import Policy
from .provenance import sha256_file, sha256_tree, write_json_file
from .release import Release, load_release, publish, verify
from .report import load_report, write_html
from .sources import CONVERTED_NAME, materialize
from .training import TrainResult
from .training import train as train_stage

STAGES = ("validate", "train", "audit", "gate", "release")
# progress(stage, phase, done, total): stage is one of STAGES; phase names the work inside it.
Progress = Callable[[str, str, int, int], None]


@dataclass
class RunResult:
    """Outcome of one finetune job."""

    run_id: str
    run_dir: Path
    verdict: str  # "pass" | "reject"
    release: Release  # RUN/release/<id> or RUN/quarantine/<id>, with its manifest
    validation: ValidationReport
    training: TrainResult
    audit: AuditReport
    decision: GateDecision
    stage_seconds: dict[str, float]
    reused: list[str] = field(default_factory=list)  # stages whose artifacts a resumed job took as they were

    @property
    def released(self) -> bool:
        return self.verdict == "pass"

    @property
    def published_dir(self) -> Path:
        return self.release.path

    @property
    def exit_code(self) -> int:
        return 0 if self.released else 3

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_dir": str(self.run_dir), "verdict": self.verdict,
                "released": self.released, "published_dir": str(self.published_dir),
                "dataset": {"n_records": self.validation.n_records, "dropped_lines": self.validation.dropped_lines},
                "training": self.training.to_dict(), "audit": self.audit.to_dict(),
                "gate": {"verdict": self.decision.verdict,
                         "failed_rules": [r.to_dict() for r in self.decision.failed_rules]},
                "stage_seconds": self.stage_seconds, "reused": self.reused}


def new_run_id(dataset_sha256: str) -> str:
    """<UTC time>-<data hash>-<random>: sorts by time, names the data, and two jobs on the same file in the same
    second still get different ids."""
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{dataset_sha256[:8]}-{secrets.token_hex(3)}"


def _kept_lines(source: Path, dropped: set[int], target: Path, validated_sha256: str) -> str:
    """Copy every line not dropped by the risk screen, byte for byte; return the new file's sha256. The source
    must still be the file that was validated (its whole-file hash is checked as it is copied)."""
    digest, whole = hashlib.sha256(), hashlib.sha256()
    with source.open("rb") as src, target.open("wb") as dst:
        for number, line in enumerate(src, start=1):
            whole.update(line)
            if number not in dropped:
                dst.write(line)
                digest.update(line)
    if whole.hexdigest() != validated_sha256:
        target.unlink()
        raise DatasetError(f"{source} changed after it was validated (sha256 {whole.hexdigest()[:12]} != "
                           f"{validated_sha256[:12]}); nothing was trained. Run the job again on a file that does "
                           f"not change while it runs.")
    return digest.hexdigest()


def finetune(dataset: str | Path, *, model: str | None = None, policy: Policy | str = "default",
             out: str | Path | None = None, objective: str | None = None, quantization: str | None = None,
             epochs: float | None = None, max_steps: int | None = None, trust_remote_code: bool | None = None,
             progress: Progress | None = None, split: str = "train", resume: bool = False,
             callbacks: Sequence[Any] = (), **train_overrides: Any) -> RunResult | None:
    """Run the whole job. Returns a RunResult whether the gate passed or rejected (check `.released`);
    raises GuardtuneError (DatasetError, ModelError, ...) when a stage cannot run at all.

    `dataset` is a .jsonl file, or any source guardtune.sources reads (.jsonl.gz/.zst, .json, .parquet, a
    datasets directory or hub id in the local cache, `split`), converted to RUN/input.jsonl.
    `resume=True` continues the job in `out` (a run directory a previous call left, e.g. killed): every stage
    whose artifact is there and was made from the same data, policy and settings is taken as it is (listed in
    RunResult.reused), training continues from its newest checkpoint when there is one, and the rest runs.
    A run directory made from other data or another policy is refused. `callbacks` are transformers
    TrainerCallbacks handed to the Trainer (experiment trackers, custom logging; `training.report_to`
    names the built-in integrations: tensorboard, wandb, mlflow, as installed).
    Under `torchrun` / `accelerate launch` every process trains (DDP), shares the reference precompute and
    generates its share of the audit's continuations; the main process alone validates, judges, gates and
    releases, and the others return None.
    """
    run = RunConfig.from_policy(policy, model=model, trust_remote_code=trust_remote_code, objective=objective,
                                quantization=quantization, epochs=epochs, max_steps=max_steps, **train_overrides)
    dataset = Path(dataset)
    if resume and out is None:
        raise ConfigError("resume needs the run directory to continue: pass out=RUN_DIR (--resume RUN_DIR).")
    reused: list[str] = []
    timings: dict[str, float] = {}
    timestamps: dict[str, str] = {"started_at": _now()}

    def stage(name: str) -> Callable[[str, int, int], None] | None:
        return (lambda phase, done, total: progress(name, phase, done, total)) if progress else None

    # 1. validate (and risk screen), on the main process; the others wait for its plan -----------------------------
    t0 = time.perf_counter()
    with error_stage("validate"):
        validation, run_id, run_dir, train_path, filtered_sha, was_done = _validate_on_main(
            dataset, run, out, stage, split, resume)
    if was_done:
        reused.append("validate")
    timings["validate"] = time.perf_counter() - t0

    # 2. train (every process) ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    with error_stage("train"):
        training = _finished_training(run_dir, run, filtered_sha) if resume else None
        if training is not None:
            reused.append("train")
        else:
            checkpoints = resume and any((run_dir / "checkpoints").glob("checkpoint-*"))
            training = train_stage(train_path, run, run_dir, progress=stage("train"), validated=filtered_sha,
                                   resume=checkpoints, callbacks=callbacks)
    timings["train"] = time.perf_counter() - t0
    timestamps["trained_at"] = _now()
    training.model = None  # the audit loads the base and the adapter from disk; do not hold two copies
    gc.collect()

    # 3. audit (every process generates its share of the continuations; the main one judges and writes) -------
    t0 = time.perf_counter()
    with error_stage("audit"):
        audited = _finished_audit(run_dir / "audit", training.adapter_dir, run) if resume else None
        if audited is not None:
            reused.append("audit")
        else:
            audited = run_audit(training.adapter_dir, run, run_dir / "audit",
                                quantization=run.training.quantization, progress=stage("audit"))
    if not distributed.is_main():
        return None
    timings["audit"] = time.perf_counter() - t0

    # 4. gate --------------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    with error_stage("gate"):
        decision = decide(audited.report, run)
        decision.write(run_dir / "gate.json")
        write_html(audited.out_dir)  # re-render so the reviewer's page shows the decision beside the numbers
    timings["gate"] = time.perf_counter() - t0

    # 5. release or quarantine ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    with error_stage("release"):
        published = _finished_release(run_dir, run_id, decision) if resume else None
        if published is not None:
            reused.append("release")
        else:
            published = publish(
                run_dir, decision, run_id=run_id, adapter_dir=training.adapter_dir, report_dir=audited.out_dir,
                extra_files={"train_metrics.json": training.metrics_path,
                             "validation.json": run_dir / "validation.json"},
                manifest_fields={
                    "dataset": {"path": str(dataset), "sha256": validation.sha256, "filtered_sha256": filtered_sha,
                                "n_records": validation.n_records, "n_dropped": len(validation.dropped_lines),
                                **({"source": validation.source} if validation.source else {})},
                    "base_model": training.base_model,
                    "seeds": {**training.metrics["seeds"], **audited.seeds},
                    "versions": training.metrics["versions"],
                    "timestamps": timestamps,
                    "training": training.summary,
                },
                release_config=run.release)
    timings["release"] = time.perf_counter() - t0
    return RunResult(run_id=run_id, run_dir=run_dir, verdict=decision.verdict, release=published,
                     validation=validation, training=training, audit=audited, decision=decision,
                     stage_seconds={k: round(v, 2) for k, v in timings.items()}, reused=reused)


def train(dataset: str | Path, config: TrainConfig | RunConfig | Policy | str | None = None,
          out: str | Path = "guardtune-train", *, model: str | None = None, trust_remote_code: bool | None = None,
          resume: bool = False, callbacks: Sequence[Any] = (), progress: Callable[[str, int, int], None] | None = None,
          split: str = "train", **overrides: Any) -> TrainResult | None:
    """Validate `dataset` (structure, tokens and the risk screen, as `finetune()` does) into OUT/validation.json,
    then train on the lines that passed (`training.train`): OUT/adapter and OUT/train_metrics.json. Invalid data
    raises DatasetError and nothing is trained. `config`, `model=` and keyword `overrides` as for
    `training.train`; under a launcher the main process validates and every process trains (others return None).
    """
    policy, training, model_cfg = resolve_stage("training", config, model, overrides, trust_remote_code)
    run = config if isinstance(config, RunConfig) else RunConfig.from_policy(policy)
    run = dataclasses.replace(run, training=training, model=model_cfg)
    _, _, run_dir, train_path, filtered_sha, _ = _validate_on_main(Path(dataset), run, out,
                                                                   lambda _stage: progress, split)
    result = train_stage(train_path, run, run_dir, validated=filtered_sha, resume=resume, callbacks=callbacks,
                         progress=progress)
    return result if distributed.is_main() else None


def _validate_on_main(dataset: Path, run: RunConfig, out: str | Path | None, stage: Callable[[str], Any],
                      split: str = "train", resume: bool = False
                      ) -> tuple[ValidationReport | None, str, Path, Path, str, bool]:
    """`_validate` (or, resuming, the run's finished validation) on the main process; every process gets (run id,
    run dir, file to train on, its sha256), the others with no report. A failure on the main process stops every
    process (they would otherwise wait)."""
    failure, mine, validation = None, None, None
    if distributed.is_main():
        try:
            finished = _finished_validation(Path(out), dataset, run) if resume and out is not None else None
            validation, run_id, run_dir, train_path, filtered_sha = finished or _validate(dataset, run, out, stage,
                                                                                          split)
            mine = ("ok", run_id, str(run_dir), str(train_path), filtered_sha, finished is not None)
        except BaseException as exc:  # the other processes must hear of it, or they would wait forever
            failure, mine = exc, ("failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    plan = distributed.share(mine)
    if failure is not None:
        raise failure
    if plan[0] == "failed":
        raise GuardtuneError(f"The main process stopped the job before training: {plan[1]}")
    return validation, plan[1], Path(plan[2]), Path(plan[3]), plan[4], plan[5]


def _validate(dataset: Path, run: RunConfig, out: str | Path | None, stage: Callable[[str], Any],
              split: str = "train") -> tuple[ValidationReport, str, Path, Path, str]:
    """The validate stage of a job: validation.json in a new run directory, the screen's dropped lines removed.
    Returns (report, run id, run dir, the file to train on, its sha256); raises DatasetError on invalid data."""
    progress = stage("validate")
    if progress:
        progress("validate", 0, 1)
    # Materialise the model first (the embedded one converts once, ~1 min): the validator's token-length check
    # then runs against the real tokenizer instead of being skipped.
    model_dir = resolve_model_dir(run.model.name)
    # The base model screens the data too (the second judge of harmful compliance; dataset.screen.model), loaded
    # only once the file has passed its structural checks, and freed with the validator before training loads
    # its own copy.
    base_judge = (lambda: load_base_judge(run)) if run.dataset.screen_enabled and run.dataset.screen_model else None
    # A source that is not JSONL (.gz/.zst, .json, .parquet, a datasets directory) becomes RUN/input.jsonl: the
    # file validated is the file trained. It is converted next to the run directory, then moved into it.
    parent = Path(out).parent if out is not None else Path("guardtune-runs")
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".incoming-", dir=parent))
    try:
        source = materialize(dataset, scratch, split=split)
        validation = validate_dataset(source.path, config=run, model=model_dir, model_judge=base_judge,
                                      on_progress=progress)
        run_id = new_run_id(validation.sha256)
        run_dir = Path(out) if out is not None else Path("guardtune-runs") / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        if source.converted:
            source.path = Path(shutil.move(str(source.path), str(run_dir / CONVERTED_NAME)))
            validation.path, validation.source = str(dataset), source.to_dict()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_json_file(run_dir / RUN_FILE, {"kind": "guardtune-run", "run_id": run_id, "dataset": str(dataset),
                                         "policy_sha256": run.policy.sha256, "started_at": _now()})
    validation.write(run_dir / "validation.json")
    if not validation.valid:
        errors = [i for i in validation.issues if i.severity == "error"]
        shown = "".join(f"\n  line {i.line}: {i.message}" if i.line else f"\n  {i.message}" for i in errors[:5])
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise DatasetError(f"{dataset} failed validation with {len(errors)} error(s); nothing was trained:{shown}{more}"
                           f"\nEvery issue is in {run_dir / 'validation.json'} (or run `guardtune validate "
                           f"{dataset}`).", errors)
    train_path, filtered_sha = source.path, validation.sha256
    if validation.dropped_lines:
        train_path = run_dir / "train_data.jsonl"
        filtered_sha = _kept_lines(source.path, set(validation.dropped_lines), train_path, validation.sha256)
    if progress:
        progress("validate", 1, 1)
    return validation, run_id, run_dir, train_path, filtered_sha


RUN_FILE = "run.json"  # the run id and what the run was started from (read back by resume)


def _finished_validation(run_dir: Path, dataset: Path, run: RunConfig
                         ) -> tuple[ValidationReport, str, Path, Path, str] | None:
    """The run's validation, when it finished on this very data and policy (None: validate again). Data or a
    policy that differs from the run's is refused: a resumed job never mixes two jobs' artifacts."""
    if not (run_dir / RUN_FILE).is_file() or not (run_dir / "validation.json").is_file():
        return None
    record = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    validation = ValidationReport.read(run_dir / "validation.json")
    if record.get("policy_sha256") != run.policy.sha256:
        raise ConfigError(f"{run_dir} was started under another policy (sha256 {str(record.get('policy_sha256'))[:12]}"
                          f" != {run.policy.sha256[:12]}); resume it with the same policy and options, or start a "
                          f"new run.")
    source = (validation.source or {}).get("sha256")
    given = sha256_file(dataset) if dataset.is_file() else None
    trained_from = run_dir / CONVERTED_NAME if validation.source else dataset
    if (validation.source and (source != given or not trained_from.is_file())) or \
            (not validation.source and given != validation.sha256):
        raise ConfigError(f"{dataset} is not the data {run_dir} was started from (its sha256 differs); resume with "
                          f"the same file, or start a new run.")
    if not validation.valid:
        return None  # it failed validation: run it again (and fail again, with the full message)
    train_path, filtered_sha = trained_from, validation.sha256
    if validation.dropped_lines:
        train_path = run_dir / "train_data.jsonl"
        if not train_path.is_file():
            return None
        filtered_sha = sha256_file(train_path)
    return validation, record["run_id"], run_dir, train_path, filtered_sha


def _finished_training(run_dir: Path, run: RunConfig, data_sha256: str) -> TrainResult | None:
    """The run's adapter and train_metrics.json, when training finished on this data with these settings."""
    metrics_path = run_dir / "train_metrics.json"
    if not metrics_path.is_file() or not (run_dir / "adapter" / "adapter_config.json").is_file():
        return None
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    if metrics.get("dataset", {}).get("sha256") != data_sha256 or metrics.get("config") != as_dict(run.training) \
            or metrics.get("policy", {}).get("sha256") != run.policy.sha256:
        return None
    return TrainResult(out_dir=run_dir, adapter_dir=run_dir / "adapter", metrics_path=metrics_path, metrics=metrics)


def _finished_audit(audit_dir: Path, adapter_dir: Path, run: RunConfig) -> AuditReport | None:
    """The run's audit, when it audited this adapter with these settings and its samples are the ones it wrote."""
    try:
        report = load_report(audit_dir / "report.json")
    except GuardtuneError:
        return None
    samples = audit_dir / "samples.jsonl"
    if (report.get("adapter") or {}).get("sha256") != sha256_tree(adapter_dir) or \
            report.get("config") != as_dict(run.audit) or not samples.is_file() or \
            sha256_file(samples) != report.get("samples_sha256"):
        return None
    return AuditReport(report=report, out_dir=audit_dir)


def _finished_release(run_dir: Path, run_id: str, decision: GateDecision) -> Release | None:
    """The run's release or quarantine, when one was published for this decision and still verifies."""
    for folder in ("release", "quarantine"):
        path = run_dir / folder / run_id
        if path.is_dir():
            published = load_release(path)
            if not verify(path).ok:
                raise VerificationError(f"{path} exists but no longer matches its manifest; move it away and resume "
                                        f"to publish again.")
            if published.manifest["gate"]["verdict"] != decision.verdict:
                raise GuardtuneError(f"{path} was published with verdict {published.manifest['gate']['verdict']} but "
                                     f"the gate now says {decision.verdict}; move it away and resume.")
            return published
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

