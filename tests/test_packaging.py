"""A regular (non-editable) install carries its policies, schemas and data, and no top-level `cli` package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_package_data_under_distinct_names(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info/ into the source tree it builds.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info",
                                                                 "guardtune-runs", "__pycache__", ".pytest_cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("guardtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for policy in (REPO / "policies").glob("*.yaml"):
        assert f"guardtune_policies/{policy.name}" in names
    for schema in (REPO / "guardtune" / "schemas").glob("*.json"):
        assert f"guardtune/schemas/{schema.name}" in names
    for data in ("harmful.jsonl", "benign.jsonl", "refusal_phrases.txt", "hazard_terms.json", "judge_cues.json",
                 "judge_injections.jsonl", "report.html.j2"):
        assert f"guardtune/data/{data}" in names
    assert "guardtune_cli/main.py" in names
    top_level = {name.split("/")[0] for name in names}
    assert not top_level & {"cli", "policies", "tests", "examples", "benchmarks"}, top_level
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "guardtune = guardtune_cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_stage_functions_stay_callable_after_their_modules_are_imported():
    """`guardtune.audit(...)` must not turn into a module once something imports the audit stage's module."""
    code = ("import guardtune.pipeline, guardtune.auditing, guardtune.training, guardtune.release\n"
            "import guardtune\n"
            "for name in ('validate_dataset', 'train', 'audit', 'decide', 'publish', 'verify', 'finetune'):\n"
            "    assert callable(getattr(guardtune, name)), name\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
