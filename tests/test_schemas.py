"""Every shipped JSON Schema is itself a valid draft 2020-12 schema, and every shipped policy validates."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest

from guardtune.config import RunConfig
from guardtune.policy import load_policy, shipped_policies

SCHEMAS = sorted(p.name for p in resources.files("guardtune").joinpath("schemas").iterdir()
                 if p.name.endswith(".schema.json"))


def test_every_expected_schema_ships():
    assert {"policy.schema.json", "report.schema.json", "gate.schema.json", "manifest.schema.json",
            "dataset_chat.schema.json", "dataset_prompt.schema.json"} <= set(SCHEMAS)


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_is_valid_draft_2020_12(name):
    schema = json.loads(resources.files("guardtune").joinpath("schemas", name).read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema.get("$schema", "").endswith("2020-12/schema")


@pytest.mark.parametrize("name", sorted(shipped_policies()))
def test_shipped_policy_builds_every_stage_config(name):
    policy = load_policy(name)
    run = RunConfig.from_policy(policy)
    assert run.policy is policy
    assert run.training.objective == "constrained"
    assert run.training.betas == (0.5, 2.0, 2.0, 2.0, 2.0) and run.training.beta_tail == 0.1
    assert run.training.adam_betas == (0.5, 0.999) and run.training.warmup_steps == 10
    assert run.audit.prefill_k == (0, 5, 10, 20, 40)
    assert run.gate.max_judge_error_rate == 0.0
