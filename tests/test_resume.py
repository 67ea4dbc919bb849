"""`finetune --resume RUN_DIR`: a job that died after training continues with the audit; a finished job resumed
keeps every stage; a run directory made from other data or another policy is refused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import guardtune.pipeline as pipeline
from guardtune.errors import ConfigError
from guardtune.pipeline import finetune
from guardtune.provenance import sha256_file, sha256_tree
from guardtune_cli.main import main
from test_pipeline import EXAMPLE, PASSING_GATE, tiny_policy


@pytest.mark.slow  # two tiny fine-tunes' worth of stages: ~40 s on 2 cores
def test_a_job_killed_after_training_resumes_with_the_audit(tmp_path, tiny_model_dir, monkeypatch):
    policy = str(tiny_policy(tmp_path, tiny_model_dir, PASSING_GATE, "resume"))
    run = tmp_path / "run"
    real_audit = pipeline.run_audit

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the job dies here: validation and training are on disk, nothing after

    from transformers import TrainerCallback

    class Steps(TrainerCallback):  # a job runner's own callback, handed through finetune() to the Trainer
        seen: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            Steps.seen.append(state.global_step)

    monkeypatch.setattr(pipeline, "run_audit", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(EXAMPLE, policy=policy, out=run, callbacks=[Steps()])
    assert Steps.seen == [1, 2]  # the tiny policy trains 2 steps
    assert (run / "train_metrics.json").is_file() and not (run / "audit").exists()
    metrics, adapter = sha256_file(run / "train_metrics.json"), sha256_tree(run / "adapter")

    monkeypatch.setattr(pipeline, "run_audit", real_audit)
    calls = []
    monkeypatch.setattr(pipeline, "train_stage", lambda *a, **k: calls.append(a))  # must not be called
    resumed = finetune(EXAMPLE, policy=policy, out=run, resume=True)
    assert resumed.reused == ["validate", "train"] and calls == []
    assert sha256_file(run / "train_metrics.json") == metrics and sha256_tree(run / "adapter") == adapter
    assert resumed.released and (run / "audit" / "report.json").is_file()
    run_id = json.loads((run / "run.json").read_text())["run_id"]
    assert resumed.run_id == run_id and resumed.published_dir == run / "release" / run_id

    # Resumed again once finished: every stage is kept, the same release is returned (never overwritten).
    done = CliRunner().invoke(main, ["finetune", str(EXAMPLE), "--policy", policy, "--resume", str(run), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["reused"] == ["validate", "train", "audit", "release"]

    # Other data, or another policy, is not this run: refused rather than mixed.
    other = tmp_path / "other.jsonl"
    other.write_text(EXAMPLE.read_text().replace("order", "parcel", 1))
    with pytest.raises(ConfigError, match="not the data"):
        finetune(other, policy=policy, out=run, resume=True)
    with pytest.raises(ConfigError, match="another policy"):
        finetune(EXAMPLE, policy="cpu-demo", out=run, resume=True)


def test_resume_needs_the_run_directory():
    with pytest.raises(ConfigError, match="out=RUN_DIR"):
        finetune(EXAMPLE, resume=True)
    done = CliRunner().invoke(main, ["finetune", str(EXAMPLE), "--resume", "a", "--out", "b"])
    assert done.exit_code == 2 and "drop --out" in done.output
