"""Release: publish (or quarantine) an adapter with a sha256 manifest, atomically; verify a release later."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from .config import ReleaseConfig
from .errors import ConfigError, GuardtuneError, VerificationError, did_you_mean
from .modelcard import CARD_NAME, render_card
from .provenance import (atomic_write_text, canonical_json, fsync_file, sha256_file, sha256_json, sha256_tree,
                         tree_files, write_json_file)
from .report import load_report, read_samples, render_html
from .schemas import schema_issues

MANIFEST_KIND = "guardtune-release-manifest"
MANIFEST_NAME = "manifest.json"
RESERVED = {MANIFEST_NAME, CARD_NAME, "report.json", "report.html", "gate.json", "samples.jsonl"}
MANIFEST_FIELDS = ("dataset", "base_model", "policy", "judge", "versions", "seeds", "timestamps", "training", "audit")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VERSION_KEYS = ("guardtune", "python", "torch", "transformers", "peft", "git_commit", "device")


def _fsync_dir(path: Path) -> None:
    try:  # directory fsync makes a rename durable on POSIX; Windows cannot open directories
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)  # follows symlinks: a release holds real files only
    fsync_file(dst)


def _safe_relative(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not name.startswith("/") and "\\" not in name and not any(p in ("..", ".") for p in parts)


def _decision_dict(decision: Any) -> dict[str, Any]:
    data = decision.to_dict() if hasattr(decision, "to_dict") else dict(decision)
    if data.get("verdict") not in ("pass", "reject"):
        raise GuardtuneError(f"Gate decision verdict is {data.get('verdict')!r}; expected 'pass' or 'reject'. "
                             f"Pass the GateDecision returned by guardtune.gate.decide().")
    return data


def _check_inputs(run_id: str, adapter_dir: Path, extra_files: dict[str, Path]) -> None:
    if not RUN_ID.match(run_id):
        raise ConfigError(f"Run id {run_id!r} is not usable as a directory name; use letters, digits, '.', '_' and "
                          f"'-', starting with a letter or digit.")
    if not adapter_dir.is_dir() or not any(p.is_file() for p in adapter_dir.rglob("*")):
        raise GuardtuneError(f"Adapter directory {adapter_dir} is missing or empty; train first (it should hold "
                             f"adapter_config.json and adapter_model.safetensors).")
    for name, source in extra_files.items():
        if not _safe_relative(name) or name in RESERVED or PurePosixPath(name).parts[0] == "adapter":
            raise ConfigError(f"Extra release file name {name!r} is not allowed: use a relative path without '..' "
                              f"that is not one of {', '.join(sorted(RESERVED))} or under adapter/.")
        if not Path(source).is_file():
            raise GuardtuneError(f"Extra release file {name!r} comes from {source}, which does not exist.")


def _manifest(run_id: str, status: str, decision: dict[str, Any], report: dict[str, Any],
              manifest_fields: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(manifest_fields) - set(MANIFEST_FIELDS))
    if unknown:
        raise ConfigError(f"Unknown manifest field {unknown[0]!r}.{did_you_mean(unknown[0], MANIFEST_FIELDS)}")
    provenance = report.get("provenance", {})
    model = report["model"]
    manifest: dict[str, Any] = {
        "kind": MANIFEST_KIND, "schema_version": 1, "id": run_id, "status": status, "files": {},
        "dataset": None,
        "base_model": {"spec": model["spec"], "revision": model["revision"], "weights_sha256": model["weights_sha256"]},
        "policy": dict(decision["policy"]),
        "judge": dict(report["judge"]),
        "gate": {"verdict": decision["verdict"], "report_sha256": decision.get("report_sha256"),
                 "decided_at": decision.get("decided_at"),
                 "failed_rules": [r for r in decision.get("rules", []) if not r.get("passed")]},
        "versions": {k: provenance[k] for k in VERSION_KEYS if k in provenance},
        "seeds": dict(provenance.get("seeds", {})),
        "timestamps": {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "audited_at": report["created_at"], "gated_at": decision.get("decided_at")},
    }
    for key, value in manifest_fields.items():
        if key == "timestamps":
            manifest["timestamps"].update(value)
        else:
            manifest[key] = value
    return manifest


SIGNING_KEY_ENV = "GUARDTUNE_RELEASE_KEY"


def signing_key() -> bytes | None:
    """The operator's release signing key ($GUARDTUNE_RELEASE_KEY), or None when none is set."""
    value = os.environ.get(SIGNING_KEY_ENV)
    return value.encode("utf-8") if value else None


def _sign(manifest: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 of the manifest's canonical JSON without its signature: whoever lacks the key cannot re-sign a
    manifest whose hashes they recomputed after swapping a file."""
    unsigned = {k: v for k, v in manifest.items() if k != "signature"}
    return hmac.new(key, canonical_json(unsigned).encode("utf-8"), hashlib.sha256).hexdigest()


def _audited_adapter(report: dict[str, Any], adapter_dir: Path) -> str:
    """The adapter's tree hash, refused unless it is the adapter the report audited (and holds no links)."""
    audited = report.get("adapter")
    if not audited:
        raise GuardtuneError("The report audited the base model alone (no adapter), so there is no audited adapter to "
                             "publish. Audit the adapter (`guardtune audit --adapter DIR`) and gate that report.")
    links = sorted(str(p.relative_to(adapter_dir)) for p in adapter_dir.rglob("*") if p.is_symlink())
    if links:
        raise GuardtuneError(f"{adapter_dir} holds symbolic links ({', '.join(links[:3])}); a release holds real files "
                             f"only, and a link could pull files from outside the adapter into it. Replace them with "
                             f"the files they point at, audit again and publish.")
    actual = sha256_tree(adapter_dir)
    if actual != audited.get("sha256"):
        raise GuardtuneError(f"The adapter in {adapter_dir} is not the one the report audited (tree sha256 "
                             f"{actual[:12]}, the report says {str(audited.get('sha256'))[:12]}). Audit this adapter "
                             f"and gate that report, or publish the adapter that was audited.")
    return actual


@dataclass(frozen=True)
class Release:
    """A published run: the directory and a typed view of its manifest.json (the release stage's result)."""

    path: Path  # RUN/release/<id> or RUN/quarantine/<id>
    manifest: dict[str, Any]

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def status(self) -> str:  # "released" | "quarantined"
        return self.manifest["status"]

    @property
    def released(self) -> bool:
        return self.status == "released"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def files(self) -> dict[str, str]:  # path inside the release -> sha256
        return dict(self.manifest["files"])

    @property
    def failed_rules(self) -> list[dict[str, Any]]:
        return list(self.manifest["gate"]["failed_rules"])


def _read_manifest(root: Path, purpose: str) -> Any:
    """The parsed manifest.json of the release at `root` (any JSON value; callers check its shape)."""
    try:
        return json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerificationError(f"{root / MANIFEST_NAME} is not readable JSON ({exc}); the release cannot be "
                                f"{purpose}.")


def _training_config(metrics_path: Path | None) -> dict[str, Any] | None:
    """The training configuration recorded in train_metrics.json (betas, LoRA rank, ...) for the model card."""
    if metrics_path is None:
        return None
    try:
        return json.loads(metrics_path.read_text(encoding="utf-8")).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def load_release(path: str | Path) -> Release:
    """The release at `path` (as `find_release` reads it), without verifying it: `verify` does that."""
    root = find_release(path)
    manifest = _read_manifest(root, "read")
    if not isinstance(manifest, dict) or manifest.get("kind") != MANIFEST_KIND:
        raise VerificationError(f"{root / MANIFEST_NAME} is not a guardtune release manifest (kind is not "
                                f"{MANIFEST_KIND!r}).")
    return Release(path=root, manifest=manifest)


def publish(run_dir: str | Path, decision: Any, *, run_id: str, adapter_dir: str | Path, report_dir: str | Path,
            extra_files: dict[str, Path] | None = None, manifest_fields: dict[str, Any] | None = None,
            release_config: ReleaseConfig | None = None) -> Release:
    """Write run_dir/release/<run_id>/ (pass) or run_dir/quarantine/<run_id>/ (reject) atomically; return it."""
    run_dir, adapter_dir, report_dir = Path(run_dir), Path(adapter_dir), Path(report_dir)
    extra_files = {name: Path(source) for name, source in (extra_files or {}).items()}
    release_config = release_config or ReleaseConfig()
    manifest_fields = dict(manifest_fields or {})
    data = _decision_dict(decision)
    _check_inputs(run_id, adapter_dir, extra_files)

    report = load_report(report_dir / "report.json")
    if data.get("report_sha256") != sha256_json(report):
        raise GuardtuneError(f"The gate decision was made on a different report than {report_dir / 'report.json'} "
                             f"(report_sha256 differs). Re-run the gate on this report before publishing.")
    adapter_sha256 = _audited_adapter(report, adapter_dir)
    samples_path = report_dir / "samples.jsonl"
    if release_config.include_samples and not samples_path.is_file():
        raise GuardtuneError(f"release.include_samples is true but {samples_path} does not exist. Re-run the audit, "
                             f"or set release.include_samples: false.")
    dataset_path = (manifest_fields.get("dataset") or {}).get("path")
    if release_config.include_training_data and not (dataset_path and Path(dataset_path).is_file()):
        raise GuardtuneError("release.include_training_data is true but manifest_fields['dataset']['path'] does not "
                             "name an existing file. Pass the training data path, or set it to false.")

    passed = data["verdict"] == "pass"
    status = "released" if passed else "quarantined"
    parent = run_dir / ("release" if passed else "quarantine")
    final = parent / run_id
    for existing in (run_dir / "release" / run_id, run_dir / "quarantine" / run_id):
        if existing.exists():
            raise GuardtuneError(f"{existing} already exists; a published run is never overwritten. Use a new run id "
                                 f"or move the old directory away first.")

    run_dir.mkdir(parents=True, exist_ok=True)
    # Build everything next to its final place (same filesystem), then one rename: readers see either
    # no release or a complete one, never a half-copied adapter.
    tmp = Path(tempfile.mkdtemp(prefix=f".publish-{run_id}-", dir=run_dir))
    parent_existed = parent.exists()
    try:
        os.chmod(tmp, 0o755)
        for source in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):
            _copy_file(source, tmp / "adapter" / source.relative_to(adapter_dir))
        _copy_file(report_dir / "report.json", tmp / "report.json")
        write_json_file(tmp / "gate.json", data, durable=True)
        samples = None
        if release_config.include_samples:
            _copy_file(samples_path, tmp / "samples.jsonl")
            samples = read_samples(samples_path)
        # The release's HTML shows harmful samples only when the release carries samples.jsonl anyway.
        atomic_write_text(tmp / "report.html", render_html(report, samples, data), durable=True)
        for name, source in sorted(extra_files.items()):
            _copy_file(source, tmp / name)
        if release_config.include_training_data:
            _copy_file(Path(dataset_path), tmp / "training_data" / Path(dataset_path).name)

        manifest = _manifest(run_id, status, data, report, manifest_fields)
        manifest["chain"] = {"adapter_sha256": adapter_sha256, "report_sha256": sha256_json(report),
                             "policy_sha256": data["policy"].get("sha256"),
                             "dataset_sha256": (manifest.get("dataset") or {}).get("sha256")}
        # The model card (README.md) is one of the hashed files, so it is written before the file list.
        atomic_write_text(tmp / CARD_NAME, render_card(
            manifest, report, data, _training_config(extra_files.get("train_metrics.json")),
            license_id=release_config.license, data_included=release_config.include_training_data), durable=True)
        manifest["files"] = {name: sha256_file(tmp / name) for name in tree_files(tmp)}
        key = signing_key()
        if key is not None:
            manifest["signature"] = {"alg": "HMAC-SHA256", "env": SIGNING_KEY_ENV, "value": _sign(manifest, key)}
        issues = schema_issues(manifest, "manifest", "manifest-schema")
        if issues:
            raise GuardtuneError("The release manifest would be invalid:\n" +
                                 "\n".join(f"  - {i.path}: {i.message}" for i in issues), issues)
        write_json_file(tmp / MANIFEST_NAME, manifest, durable=True)
        for folder, _, _ in os.walk(tmp):
            _fsync_dir(Path(folder))

        parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # someone published the same id while we were copying
            raise GuardtuneError(f"{final} appeared while publishing; a published run is never overwritten.")
        try:
            os.rename(tmp, final)  # POSIX: fails on a non-empty directory, so a release that won the race stays
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            raise GuardtuneError(f"{final} appeared while publishing (another publish of run id {run_id!r} won the "
                                 f"race); a published run is never overwritten. Nothing of this one was kept.")
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not parent_existed and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
        raise
    return Release(path=final, manifest=manifest)


@dataclass
class VerificationResult:
    """What `verify` found: every listed file hashed, plus anything missing or not listed."""

    path: Path
    ok: bool
    checked: int
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # manifest schema or consistency problems
    id: str | None = None
    status: str | None = None
    signature: str | None = None  # verified | invalid | unchecked (signed, no key here) | unsigned

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ok": self.ok, "id": self.id, "status": self.status,
                "signature": self.signature, "checked": self.checked,
                "mismatched": self.mismatched, "missing": self.missing, "unexpected": self.unexpected,
                "problems": self.problems}


def find_release(path: str | Path) -> Path:
    """The release directory meant by `path`: itself, its manifest's folder, or the single release under it."""
    path = Path(path)
    if not path.exists():
        raise VerificationError(f"{path} does not exist. Pass a release directory (RUN/release/<id>).")
    if path.is_file():
        if path.name == MANIFEST_NAME:
            return path.parent
        raise VerificationError(f"{path} is a file; pass the release directory that holds manifest.json.")
    if (path / MANIFEST_NAME).is_file():
        return path
    found = sorted({m.parent for pattern in (f"*/{MANIFEST_NAME}", f"release/*/{MANIFEST_NAME}",
                                             f"quarantine/*/{MANIFEST_NAME}") for m in path.glob(pattern)})
    if len(found) == 1:
        return found[0]
    if not found:
        raise VerificationError(f"No {MANIFEST_NAME} in {path}, its subfolders, release/*/ or quarantine/*/. Pass "
                                f"the directory `guardtune finetune` published (RUN/release/<id>).")
    raise VerificationError(f"{path} holds {len(found)} releases ({', '.join(str(f) for f in found)}); pass one.")


def verify(path: str | Path) -> VerificationResult:
    """Recompute every file's sha256 against manifest.json; report changed, missing and unlisted files."""
    root = find_release(path)
    manifest = _read_manifest(root, "verified")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise VerificationError(f"{root / MANIFEST_NAME} has no 'files' map of path -> sha256; it cannot be verified.")
    problems = [f"manifest.json{i.path}: {i.message}" for i in schema_issues(manifest, "manifest", "manifest-schema")]
    result = VerificationResult(path=root, ok=False, checked=0, problems=problems, id=manifest.get("id"),
                                status=manifest.get("status"))
    for name, expected in sorted(files.items()):
        target = root / name
        if not _safe_relative(name):
            result.problems.append(f"manifest.json lists an unsafe path {name!r}.")
        elif target.is_symlink():
            result.mismatched.append(name)  # a link can point at a matching file elsewhere; it is not the file
        elif not target.is_file():
            result.missing.append(name)
        else:
            result.checked += 1
            if sha256_file(target) != expected:
                result.mismatched.append(name)
    result.unexpected = [name for name in tree_files(root) if name != MANIFEST_NAME and name not in files]
    where = root.parent.name
    expected_status = {"release": "released", "quarantine": "quarantined"}.get(where)
    if expected_status and result.status != expected_status:
        result.problems.append(f"manifest status is {result.status!r} but the directory is under {where}/.")
    gate = manifest.get("gate") if isinstance(manifest.get("gate"), dict) else {}
    gate_doc = _unchanged_json(root, "gate.json", result)  # None: absent or changed (already reported)
    if "gate.json" in files and gate_doc is not None and gate_doc.get("verdict") != gate.get("verdict"):
        result.problems.append(f"gate.json says {gate_doc.get('verdict')!r} but manifest.json says "
                               f"{gate.get('verdict')!r}.")
    result.problems += _chain_problems(root, manifest, files, result, gate_doc)
    result.ok = not (result.mismatched or result.missing or result.unexpected or result.problems)
    return result


def _unchanged_json(root: Path, name: str, result: VerificationResult) -> dict[str, Any] | None:
    """A release file read as a JSON object ({} when it is not readable as one), or None when it is absent or
    its hash already failed (then it is reported as changed, not read)."""
    path = root / name
    if not path.is_file() or name in result.mismatched:
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _chain_problems(root: Path, manifest: dict[str, Any], files: dict[str, str],
                    result: VerificationResult, gate_doc: dict[str, Any] | None) -> list[str]:
    """The chain of custody inside a release: the adapter is the one report.json audited, gate.json and the
    manifest were decided on this report.json, and (with the operator's key) the manifest is the one guardtune
    signed. Matching file hashes alone prove nothing once someone recomputes them."""
    problems: list[str] = []
    key = signing_key()
    signature = manifest.get("signature") if isinstance(manifest.get("signature"), dict) else None
    if key is not None:
        if signature is None:
            problems.append(f"manifest.json is not signed, but ${SIGNING_KEY_ENV} is set: a release published under "
                            f"a key is always signed.")
        elif not hmac.compare_digest(str(signature.get("value")), _sign(manifest, key)):
            problems.append(f"manifest.json's signature does not match under ${SIGNING_KEY_ENV}: the manifest was "
                            f"changed after it was signed (or signed with another key).")
        result.signature = "verified" if not problems else "invalid"
    else:
        result.signature = "unchecked" if signature else "unsigned"
    if "report.json" not in files or "report.json" in result.mismatched or not (root / "report.json").is_file():
        return problems
    try:
        report = json.loads((root / "report.json").read_text(encoding="utf-8"))
        report_sha = sha256_json(report)
    except (OSError, ValueError) as exc:
        return [*problems, f"report.json is not readable JSON ({exc})."]
    audited = (report.get("adapter") or {}).get("sha256") if isinstance(report, dict) else None
    if (root / "adapter").is_dir():
        actual = sha256_tree(root / "adapter")
        if audited != actual:
            problems.append(f"adapter/ is not the adapter report.json audited (tree sha256 {actual[:12]}, the report "
                            f"says {str(audited)[:12]}).")
        chained = (manifest.get("chain") or {}).get("adapter_sha256")
        if chained is not None and chained != actual:
            problems.append(f"manifest.json's chain names adapter {str(chained)[:12]}, not this adapter/ "
                            f"({actual[:12]}).")
    if (manifest.get("gate") or {}).get("report_sha256") != report_sha:
        problems.append("manifest.json's gate decision was made on a different report.json.")
    if gate_doc is not None and gate_doc.get("report_sha256") != report_sha:
        problems.append("gate.json was decided on a different report.json than the one in this release.")
    return problems
