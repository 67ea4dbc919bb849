"""What a job runner gets from the CLI: one JSON object for every outcome under --json (errors included), distinct
exit codes (1 bad input, 2 usage, 3 rejected, 4 infrastructure/internal), --set and GUARDTUNE_* environment
overrides of the policy, and run ids that do not collide."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

import guardtune.pipeline
from guardtune.errors import (EXIT_BAD_INPUT, EXIT_INFRASTRUCTURE, EXIT_USAGE, JudgeError, MissingDependencyError,
                              PolicyError)
from guardtune.pipeline import new_run_id
from guardtune.policy import load_policy, parse_overrides
from guardtune_cli.main import main
from test_pipeline import EXAMPLE, PASSING_GATE, tiny_policy


def one_json_object(output: str) -> dict:
    return json.loads(output)  # raises on anything but exactly one JSON document


def test_finetune_json_on_a_bad_file_is_one_object_with_the_bad_input_code(tmp_path, tiny_model_dir):
    policy = tiny_policy(tmp_path, tiny_model_dir, PASSING_GATE, "bad")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(EXAMPLE.read_text().replace('"role": "assistant"', '"role": "asistant"', 1))
    done = CliRunner().invoke(main, ["finetune", str(bad), "--policy", str(policy), "--out", str(tmp_path / "r"),
                                     "--json"])
    assert done.exit_code == EXIT_BAD_INPUT
    error = one_json_object(done.stdout)["error"]
    assert one_json_object(done.stdout)["ok"] is False
    assert (error["code"], error["stage"], error["exit_code"]) == ("bad-dataset", "validate", 1)
    assert "line 1" in error["message"] and "guardtune validate" in error["hint"]
    assert not (tmp_path / "r" / "adapter").exists()


def finetune_failing_with(monkeypatch, error: Exception, *options: str):
    """`guardtune finetune EXAMPLE *options` with the pipeline raising `error`."""
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(guardtune.pipeline, "finetune", fail)
    return CliRunner().invoke(main, ["finetune", str(EXAMPLE), *options])


def test_an_unexpected_failure_is_an_internal_error_with_exit_4(tmp_path, monkeypatch):
    done = finetune_failing_with(monkeypatch, RuntimeError("CUDA error: out of memory"), "--json")
    assert done.exit_code == EXIT_INFRASTRUCTURE
    error = one_json_object(done.stdout)["error"]
    assert error["code"] == "internal" and error["message"] == "RuntimeError: CUDA error: out of memory"
    assert "Traceback" in error["traceback"]
    text = finetune_failing_with(monkeypatch, RuntimeError("CUDA error: out of memory"))
    assert text.exit_code == EXIT_INFRASTRUCTURE and "internal error: RuntimeError" in text.output


def test_a_missing_package_is_an_infrastructure_failure_and_a_bad_judge_bad_input(tmp_path, monkeypatch):
    missing = MissingDependencyError("audit.backend is 'vllm' but vLLM is not installed.")
    done = finetune_failing_with(monkeypatch, missing, "--json")
    assert done.exit_code == EXIT_INFRASTRUCTURE
    assert one_json_object(done.stdout)["error"]["code"] == "missing-dependency"

    bad_judge = JudgeError("dataset.screen.judge: the API key variable SCREEN_KEY is not set.")
    done = finetune_failing_with(monkeypatch, bad_judge, "--json")
    assert done.exit_code == EXIT_BAD_INPUT and one_json_object(done.stdout)["error"]["code"] == "bad-judge"


def test_usage_errors_under_json_are_one_object_too(tmp_path):
    done = CliRunner().invoke(main, ["finetune", str(EXAMPLE), "--epochs", "1", "--max-steps", "2", "--json"])
    assert done.exit_code == EXIT_USAGE
    error = one_json_object(done.stdout)["error"]
    assert error["code"] == "usage" and "not both" in error["message"]
    missing = CliRunner().invoke(main, ["validate", str(tmp_path / "missing.jsonl"), "--json"])
    assert missing.exit_code == EXIT_BAD_INPUT and one_json_object(missing.stdout)["error"]["code"] == "bad-dataset"


def test_set_overrides_any_policy_key_checked_by_the_schema():
    parsed = parse_overrides(["training.optimizer.learning_rate=1e-4", "audit.prefill_k=[0, 5]", "gate.max_asr=null",
                              "audit.backend=hf", "dataset.screen.enabled=false"])
    assert parsed == {"training.optimizer.learning_rate": 1e-4, "audit.prefill_k": [0, 5], "gate.max_asr": None,
                      "audit.backend": "hf", "dataset.screen.enabled": False}
    policy = load_policy("default", parsed)
    assert policy.data["training"]["optimizer"]["learning_rate"] == 1e-4 and policy.data["gate"]["max_asr"] is None
    assert policy.sha256 != load_policy("default").sha256
    assert policy.to_dict()["overrides"]["audit.prefill_k"] == [0, 5]
    with pytest.raises(PolicyError, match="min_exampels.*Did you mean 'min_examples'"):
        load_policy("default", {"dataset.min_exampels": 3})
    with pytest.raises(PolicyError, match="identity"):
        load_policy("default", {"version": "9"})
    with pytest.raises(PolicyError, match="not a finite number"):
        load_policy("default", parse_overrides(["audit.decoding.top_p=NaN"]))
    with pytest.raises(PolicyError, match="is a value, not a section"):
        load_policy("default", {"audit.backend.x": 1})
    with pytest.raises(PolicyError, match="KEY=VALUE"):
        parse_overrides(["training.epochs"])
    assert math.isclose(parse_overrides(["a.b=0.5"])["a.b"], 0.5)


def test_set_and_environment_reach_the_command(tmp_path):
    done = CliRunner().invoke(main, ["validate", str(EXAMPLE), "--set", "dataset.min_examples=100", "--json"])
    report = one_json_object(done.stdout)
    assert done.exit_code == EXIT_BAD_INPUT and report["counts"]["too-few-examples"] == 1
    assert report["policy"]["sha256"] == load_policy("default", {"dataset.min_examples": 100}).sha256
    from_env = CliRunner().invoke(main, ["validate", str(EXAMPLE), "--json"],
                                  env={"GUARDTUNE_VALIDATE_SET": "dataset.min_examples=100"})
    assert from_env.exit_code == EXIT_BAD_INPUT and one_json_object(from_env.stdout)["counts"]["too-few-examples"] == 1
    named = CliRunner().invoke(main, ["validate", str(EXAMPLE), "--json"], env={"GUARDTUNE_VALIDATE_POLICY": "strict"})
    assert one_json_object(named.stdout)["policy"]["name"] == "strict"
    # The command line wins over the environment.
    both = CliRunner().invoke(main, ["validate", str(EXAMPLE), "--policy", "default", "--json"],
                              env={"GUARDTUNE_VALIDATE_POLICY": "strict"})
    assert one_json_object(both.stdout)["policy"]["name"] == "default"


def test_run_ids_for_the_same_data_in_the_same_second_differ():
    ids = {new_run_id("ab" * 32) for _ in range(50)}
    assert len(ids) == 50 and all(i.split("-")[1] == "abababab" for i in ids)
