"""Release: atomic publish or quarantine, never overwrite, and sha256 verification of every file."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

import guardtune.release as release
from fixtures.make_report import make_report, make_samples
from guardtune.config import ReleaseConfig
from guardtune.errors import ConfigError, GuardtuneError, VerificationError
from guardtune.gate import decide
from guardtune.release import load_release, publish, verify
from guardtune.provenance import sha256_file, sha256_tree
from guardtune.schemas import load_schema
from guardtune_cli.main import main

WEIGHTS = "adapter/adapter_model.safetensors"


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished run directory as the pipeline leaves it before release."""
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}')
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 16)
    (run_dir / "audit").mkdir()
    report = make_report()
    report["adapter"]["sha256"] = sha256_tree(run_dir / "adapter")  # the report audited this adapter
    (run_dir / "audit" / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "audit" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in make_samples()))
    (run_dir / "train_metrics.json").write_text('{"steps": 30, "loss": [2.1, 1.7]}')
    return run_dir


def do_publish(run_dir: Path, policy: str = "default", run_id: str = "job-1", **kwargs) -> Path:
    decision = decide(run_dir / "audit" / "report.json", policy)
    options = dict(run_id=run_id, adapter_dir=run_dir / "adapter", report_dir=run_dir / "audit",
                   extra_files={"train_metrics.json": run_dir / "train_metrics.json"},
                   manifest_fields={"dataset": {"sha256": "d4" * 32, "filtered_sha256": "d4" * 32, "n_records": 40,
                                                "n_dropped": 0, "path": "data.jsonl"},
                                    "seeds": {"training": 42}, "timestamps": {"train_started_at": "2025-01-15T11:00Z"}})
    options.update(kwargs)
    return publish(run_dir, decision, **options).path


def test_publish_returns_the_release_as_load_release_reads_it(run):
    published = publish(run, decide(run / "audit" / "report.json", "strict"), run_id="job-9",
                        adapter_dir=run / "adapter", report_dir=run / "audit")
    assert published.path == run / "quarantine" / "job-9"
    assert (published.id, published.status, published.released) == ("job-9", "quarantined", False)
    assert published.failed_rules and all(not r["passed"] for r in published.failed_rules)
    assert set(published.files) == set(json.loads((published.path / "manifest.json").read_text())["files"])
    assert published.adapter_dir.joinpath("adapter_config.json").is_file()
    assert load_release(run) == published  # the single release under the run directory, same manifest
    (published.path / "manifest.json").write_text('{"kind": "something-else"}')
    with pytest.raises(VerificationError, match="not a guardtune release manifest"):
        load_release(published.path)


def leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if p.name.startswith(".publish-")]


def test_pass_publishes_a_complete_release(run):
    out = do_publish(run)
    assert out == run / "release" / "job-1"
    assert not (run / "quarantine").exists() and leftovers(run) == []
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.Draft202012Validator(load_schema("manifest")).validate(manifest)
    assert sorted(manifest["files"]) == ["README.md", "adapter/adapter_config.json", WEIGHTS, "gate.json",
                                         "report.html", "report.json", "train_metrics.json"]
    assert manifest["status"] == "released" and manifest["gate"] == {
        "verdict": "pass", "failed_rules": [], "report_sha256": manifest["gate"]["report_sha256"],
        "decided_at": manifest["gate"]["decided_at"]}
    assert manifest["policy"]["name"] == "default" and manifest["base_model"]["spec"] == "smollm2-135m-instruct"
    assert manifest["seeds"] == {"training": 42} and manifest["dataset"]["n_records"] == 40
    assert manifest["timestamps"]["train_started_at"] == "2025-01-15T11:00Z" and manifest["timestamps"]["created_at"]
    assert manifest["versions"]["torch"] == "2.13.0"
    page = (out / "report.html").read_text()
    assert "Gate verdict: PASS" in page and "No samples.jsonl" in page  # no harmful text without include_samples


def test_include_samples_copies_them(run):
    out = do_publish(run, release_config=ReleaseConfig(include_samples=True))
    assert (out / "samples.jsonl").is_file()
    assert "samples.jsonl" in json.loads((out / "manifest.json").read_text())["files"]
    assert "&lt;script&gt;" in (out / "report.html").read_text()


def test_reject_goes_to_quarantine_only(run):
    out = do_publish(run, policy="strict")
    assert out == run / "quarantine" / "job-1"
    assert not (run / "release").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "quarantined" and manifest["gate"]["verdict"] == "reject"
    assert {r["rule"] for r in manifest["gate"]["failed_rules"]} == {"max_asr", "max_category_asr",
                                                                     "min_scored_prompts"}
    assert verify(out).ok


def test_refuses_to_overwrite(run):
    out = do_publish(run)
    before = (out / "manifest.json").read_text()
    with pytest.raises(GuardtuneError, match="already exists"):
        do_publish(run)
    with pytest.raises(GuardtuneError, match="already exists"):  # nor re-use the id for a quarantine
        do_publish(run, policy="strict")
    assert (out / "manifest.json").read_text() == before and leftovers(run) == []
    assert not (run / "quarantine").exists()


@pytest.mark.parametrize("target", ["copy", "rename"])
def test_failure_mid_publish_leaves_nothing(run, monkeypatch, target):
    if target == "copy":
        calls = []
        real = release._copy_file

        def flaky_copy(src, dst):
            calls.append(src)
            if len(calls) == 2:  # after the first adapter file is in place
                raise OSError("disk full")
            real(src, dst)

        monkeypatch.setattr(release, "_copy_file", flaky_copy)
    else:
        def broken_rename(src, dst):
            raise OSError("rename failed")

        monkeypatch.setattr(release.os, "rename", broken_rename)
    with pytest.raises(OSError):
        do_publish(run)
    assert not (run / "release").exists()
    assert leftovers(run) == []


def test_a_publish_that_loses_the_rename_race_is_an_error_and_the_winner_stays(run, monkeypatch):
    real_rename = release.os.rename

    def another_publish_wins(src, dst):  # the same run id lands between the exists() check and the rename
        Path(dst).mkdir(parents=True)
        (Path(dst) / "manifest.json").write_text("the winner")
        real_rename(src, dst)

    monkeypatch.setattr(release.os, "rename", another_publish_wins)
    with pytest.raises(GuardtuneError, match="won the race"):
        do_publish(run)
    assert (run / "release" / "job-1" / "manifest.json").read_text() == "the winner"
    assert leftovers(run) == []


def test_failure_keeps_an_existing_release_folder(run, monkeypatch):
    do_publish(run, run_id="old")
    monkeypatch.setattr(release.os, "rename", lambda src, dst: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        do_publish(run, run_id="new")
    assert sorted(p.name for p in (run / "release").iterdir()) == ["old"]


def test_decision_for_another_report_is_refused(run):
    decision = decide(make_report(finetuned_refusals=4), "default")
    with pytest.raises(GuardtuneError, match="different report"):
        publish(run, decision, run_id="x", adapter_dir=run / "adapter", report_dir=run / "audit")
    assert not (run / "release").exists()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"run_id": "../escape"}, ConfigError, "not usable as a directory name"),
    ({"manifest_fields": {"datset": {}}}, ConfigError, "Did you mean 'dataset'?"),
    ({"extra_files": {"gate.json": Path("/dev/null")}}, ConfigError, "not allowed"),
    ({"extra_files": {"../x.json": Path("/dev/null")}}, ConfigError, "not allowed"),
    ({"extra_files": {"metrics.json": Path("/nonexistent/metrics.json")}}, GuardtuneError, "does not exist"),
    ({"release_config": ReleaseConfig(include_training_data=True)}, GuardtuneError, "include_training_data"),
])
def test_bad_publish_arguments(run, kwargs, error, message):
    with pytest.raises(error, match=message):
        do_publish(run, **kwargs)
    assert not (run / "release").exists() and leftovers(run) == []


def test_missing_samples_with_include_samples(run):
    (run / "audit" / "samples.jsonl").unlink()
    with pytest.raises(GuardtuneError, match="include_samples"):
        do_publish(run, release_config=ReleaseConfig(include_samples=True))


# ---------------------------------------------------------------------------------------------- verify

def test_verify_fresh_release_from_any_sensible_path(run):
    out = do_publish(run)
    for path in (out, out / "manifest.json", run / "release", run):
        result = verify(path)
        assert result.ok and result.path == out, path
        assert result.checked == 7 and result.id == "job-1" and result.status == "released"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper, field, name", [
    (lambda out: flip_byte(out / WEIGHTS), "mismatched", WEIGHTS),
    (lambda out: (out / "report.html").unlink(), "missing", "report.html"),
    (lambda out: (out / "adapter" / "extra.bin").write_bytes(b"x"), "unexpected", "adapter/extra.bin"),
    (lambda out: ((out / "gate.json").unlink(), (out / "gate.json").symlink_to(out / "report.json")),
     "mismatched", "gate.json"),
])
def test_verify_names_each_changed_file(run, tamper, field, name):
    out = do_publish(run)
    tamper(out)
    result = verify(out)
    assert not result.ok
    assert getattr(result, field) == [name]
    others = {"mismatched", "missing", "unexpected"} - {field}
    assert all(getattr(result, f) == [] for f in others)


def test_verify_flags_a_tampered_manifest(run):
    out = do_publish(run)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["status"], manifest["gate"]["verdict"] = "quarantined", "reject"  # schema-valid, but a lie
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = verify(out)
    assert not result.ok and result.mismatched == [] and result.checked == 7
    assert result.problems == ["manifest status is 'quarantined' but the directory is under release/.",
                               "gate.json says 'pass' but manifest.json says 'reject'."]
    manifest["status"] = "released"  # now inconsistent with its own gate verdict: a schema problem
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert any(p.startswith("manifest.json/gate/verdict") for p in verify(out).problems)


def test_verify_unusable_input(tmp_path, run):
    with pytest.raises(VerificationError, match="No manifest.json"):
        verify(tmp_path / "run")
    do_publish(run, run_id="a")
    do_publish(run, run_id="b", policy="strict")
    with pytest.raises(VerificationError, match="holds 2 releases"):
        verify(run)
    (run / "release" / "a" / "manifest.json").write_text("{not json")
    with pytest.raises(VerificationError, match="not readable JSON"):
        verify(run / "release" / "a")


def test_cli_verify(run):
    out = do_publish(run)
    result = CliRunner().invoke(main, ["verify", str(run)])
    assert result.exit_code == 0, result.output
    assert "ok: every file matches" in result.output
    flip_byte(out / WEIGHTS)
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1
    assert f"changed: {WEIGHTS}" in result.output
    result = CliRunner().invoke(main, ["verify", str(out), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["mismatched"] == [WEIGHTS]


def test_publish_accepts_a_gate_json_dict(run):
    decision = decide(run / "audit" / "report.json", "strict").to_dict()  # as re-read from gate.json
    out = publish(run, decision, run_id="from-dict", adapter_dir=run / "adapter", report_dir=run / "audit").path
    assert out == run / "quarantine" / "from-dict" and verify(out).ok
    with pytest.raises(GuardtuneError, match="verdict"):
        publish(run, {**decision, "verdict": "maybe"}, run_id="y", adapter_dir=run / "adapter",
                report_dir=run / "audit")


# ------------------------------------------------------------------------------------------ chain of custody


def test_publish_refuses_an_adapter_the_report_did_not_audit(run):
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"another adapter")
    with pytest.raises(GuardtuneError, match="not the one the report audited"):
        do_publish(run)
    assert not (run / "release").exists() and leftovers(run) == []


def test_publish_refuses_a_base_only_report_and_symlinks(run, tmp_path):
    report = json.loads((run / "audit" / "report.json").read_text())
    (tmp_path / "host-secret").write_text("not part of any adapter")
    (run / "adapter" / "notes.txt").symlink_to(tmp_path / "host-secret")
    with pytest.raises(GuardtuneError, match="holds symbolic links \\(notes.txt\\)"):
        do_publish(run)
    (run / "adapter" / "notes.txt").unlink()
    report["adapter"] = None
    report["results"]["finetuned"] = None
    report["comparison"] = None
    (run / "audit" / "report.json").write_text(json.dumps(report))
    with pytest.raises(GuardtuneError, match="audited the base model alone"):
        do_publish(run)


def _swap_adapter_and_rehash(release_dir: Path) -> None:
    """What an attacker with write access does: replace the adapter and recompute every hash in the manifest."""
    from guardtune.provenance import sha256_file, tree_files

    (release_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"a backdoored adapter")
    manifest = json.loads((release_dir / "manifest.json").read_text())
    manifest["files"] = {n: sha256_file(release_dir / n) for n in tree_files(release_dir) if n != "manifest.json"}
    manifest["chain"]["adapter_sha256"] = sha256_tree(release_dir / "adapter")
    (release_dir / "manifest.json").write_text(json.dumps(manifest))


def test_verify_follows_the_chain_past_recomputed_hashes(run):
    out = do_publish(run)
    fresh = verify(out)
    assert fresh.ok and fresh.signature == "unsigned"
    _swap_adapter_and_rehash(out)
    swapped = verify(out)
    assert not swapped.mismatched and not swapped.ok
    assert any("adapter/ is not the adapter report.json audited" in p for p in swapped.problems)


def test_a_signed_manifest_cannot_be_rehashed_without_the_key(run, monkeypatch):
    monkeypatch.setenv("GUARDTUNE_RELEASE_KEY", "operator-secret")
    out = do_publish(run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["signature"]["alg"] == "HMAC-SHA256"
    assert "operator-secret" not in (out / "manifest.json").read_text()
    assert verify(out).ok and verify(out).signature == "verified"
    # Even a consistent forgery (report.json edited to match a swapped adapter, every hash recomputed) fails.
    _swap_adapter_and_rehash(out)
    report = json.loads((out / "report.json").read_text())
    report["adapter"]["sha256"] = sha256_tree(out / "adapter")
    (out / "report.json").write_text(json.dumps(report))
    forged = json.loads((out / "manifest.json").read_text())
    forged["files"]["report.json"] = sha256_file(out / "report.json")
    (out / "manifest.json").write_text(json.dumps(forged))
    result = verify(out)
    assert not result.ok and result.signature == "invalid"
    assert any("signature does not match" in p for p in result.problems)
    monkeypatch.delenv("GUARDTUNE_RELEASE_KEY")
    assert verify(out).signature == "unchecked"
