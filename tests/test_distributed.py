"""Multi-process training on this CPU machine: `torchrun --nproc_per_node 2` (gloo) on the tiny model ends with the
adapter one process trains with the same global batch, one train_metrics.json, one reference cache computed in
shards, and `guardtune finetune` under torchrun leaves exactly one release. Plus the trainer_args pass-through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guardtune.config import TrainConfig
from guardtune.errors import ConfigError

HERE = Path(__file__).resolve().parent
JOB = HERE / "distributed_job.py"


def launch(args: list[str], processes: int, cache: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "GUARDTUNE_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]  # --standalone: a free port on this host
    done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}, since {i} and {i} make {2 * i}."}]}
            for i in range(8)]
    path = tmp_path_factory.mktemp("dist-data") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("dist-model"), initializer_range=0.2)


def test_two_processes_train_the_adapter_one_process_trains(tmp_path, data, learnable_model_dir):
    from safetensors.torch import load_file

    # The same global batch: 8 examples per step in one process, 4 per process in two; 3 steps see every example.
    launch([str(JOB), "train", str(learnable_model_dir), str(data), str(tmp_path / "one"), "8"], 1, tmp_path / "c1")
    launch([str(JOB), "train", str(learnable_model_dir), str(data), str(tmp_path / "two"), "4"], 2, tmp_path / "c2")
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    moved = max(float(t.abs().max()) for name, t in one.items() if "lora_B" in name)
    assert moved > 1e-3  # training changed the adapter (lora_B starts at zero)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    m1 = json.loads((tmp_path / "one" / "train_metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "train_metrics.json").read_text())
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m2["tokens_seen"] == m1["tokens_seen"]  # summed over both processes
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], abs=1e-5)
    assert m2["reference_detail"]["cache_hit"] is False
    # The reference precompute was split over the two processes and gathered: the same cache, byte for byte.
    (c1,), (c2,) = (list((tmp_path / c / "reference").glob("*.safetensors")) for c in ("c1", "c2"))
    assert c1.name == c2.name and load_file(str(c1)).keys() == load_file(str(c2)).keys()
    assert all(bool((load_file(str(c1))[k] == load_file(str(c2))[k]).all()) for k in load_file(str(c1)))


def audit_by_one_and_two_processes(job: str, model_dir: Path, tmp_path: Path) -> tuple[dict, dict]:
    """distributed_job.py `job` (an audit of a moved adapter) run alone, then under 2 processes: the two
    report.json, after checking that only the main process of the two reported."""
    from tiny_models import save_moved_adapter

    adapter = save_moved_adapter(model_dir, tmp_path / "adapter")
    args = [str(JOB), job, str(model_dir), str(adapter)]
    launch([*args, str(tmp_path / "one")], 1, tmp_path / "c1")
    done = launch([*args, str(tmp_path / "two")], 2, tmp_path / "c2")
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("process")) == \
        ["process 0: report", "process 1: none"]
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    return one, two


def test_two_processes_audit_with_the_continuations_of_one(tmp_path, learnable_model_dir):
    """The hf backend splits the prompts over the processes and gathers them; the main process judges and writes
    the same report one process writes (samples byte for byte)."""
    one, two = audit_by_one_and_two_processes("audit", learnable_model_dir, tmp_path)
    assert (tmp_path / "two" / "samples.jsonl").read_bytes() == (tmp_path / "one" / "samples.jsonl").read_bytes()
    assert two["results"] == one["results"]
    assert two["provenance"]["generation"] == {"backend": "hf", "processes": 2}


def test_two_processes_run_the_attacks_beside_prefilling(tmp_path, learnable_model_dir):
    """GCG prompts are split over the processes (the same suffixes as one process: each is seeded on its own) and
    so are the decoding grid's samples (seeded per batch: the same shape, not the same samples)."""
    one, two = audit_by_one_and_two_processes("attacks", learnable_model_dir, tmp_path)
    assert [s["suffix"] for s in two["attacks"]["gcg"]["suffixes"]] == \
        [s["suffix"] for s in one["attacks"]["gcg"]["suffixes"]]
    for model in ("base", "finetuned"):
        assert two["results"][model]["attacks"]["gcg"]["asr"] == one["results"][model]["attacks"]["gcg"]["asr"]
        decoding = two["results"][model]["attacks"]["decoding"]
        assert decoding["prompts"] == 3 and [s["n"] for s in decoding["settings"]] == [3, 3, 3]


def test_finetune_under_two_processes_leaves_one_release(tmp_path, tiny_model_dir):
    from test_pipeline import EXAMPLE, PASSING_GATE, tiny_policy

    policy = tiny_policy(tmp_path, tiny_model_dir, PASSING_GATE, "dist")
    run = tmp_path / "run"
    done = launch(["-m", "guardtune_cli.main", "finetune", str(EXAMPLE), "--policy", str(policy), "--out", str(run)],
                  2, tmp_path / "cache", timeout=400)
    assert done.stdout.count("verdict: PASS") == 1  # only the main process audits, gates and reports
    releases = [p for p in (run / "release").iterdir()]
    assert len(releases) == 1 and not (run / "quarantine").exists()
    metrics = json.loads((releases[0] / "train_metrics.json").read_text())
    assert metrics["processes"] == 2
    assert subprocess.run([sys.executable, "-m", "guardtune_cli.main", "verify", str(releases[0])],
                          capture_output=True, text=True).returncode == 0


def test_trainer_args_pass_through_and_guardtune_keeps_its_own_settings(tmp_path):
    from guardtune.training import _training_arguments

    with pytest.raises(ConfigError, match=r"trainer_args.learning_rate is set by guardtune itself; use "
                                          r"training.optimizer.learning_rate"):
        TrainConfig(trainer_args={"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="remove_unused_columns"):
        TrainConfig(trainer_args={"remove_unused_columns": True})
    cfg = TrainConfig(trainer_args={"gradient_checkpointing": True, "logging_steps": 5, "save_total_limit": 2,
                                    "optim": "adamw_torch_fused"})
    args = _training_arguments(cfg, tmp_path, use_bf16=False, on_cpu=True, own_progress=True)
    assert (args.gradient_checkpointing, args.logging_steps, args.save_total_limit) == (True, 5, 2)
    assert args.learning_rate == cfg.learning_rate and args.remove_unused_columns is False
    with pytest.raises(ConfigError, match="not a transformers.TrainingArguments field.*Did you mean "
                                          "'gradient_checkpointing'"):
        _training_arguments(TrainConfig(trainer_args={"gradient_checkpoint": True}), tmp_path, use_bf16=False,
                            on_cpu=True, own_progress=True)
