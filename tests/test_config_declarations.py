"""One declaration per setting: the config dataclasses, the policy JSON Schema, the shipped default policy and
the CLI's choices must agree. A setting is declared in guardtune/config.py; everything else is checked here."""

from __future__ import annotations

import dataclasses

import click
import pytest

from guardtune import config
from guardtune.config import (ATTACKS, AlignConfig, AuditConfig, DatasetConfig, GateConfig, ModelConfig, RedteamConfig,
                              ReleaseConfig, TrainConfig, choices, from_section, policy_key)
from guardtune.policy import load_policy
from guardtune.schemas import load_schema
from guardtune_cli.main import main

CLASSES = [ModelConfig, DatasetConfig, TrainConfig, AlignConfig, RedteamConfig, AuditConfig, GateConfig, ReleaseConfig]
# Fields whose value is a whole sub-document with its own schema (judge options) or a nested config.
OPAQUE = {(DatasetConfig, "screen_judge"), (AuditConfig, "judge"), (AlignConfig, "training")}


def schema_node(path: list[str]) -> dict:
    """The policy schema's subschema at a property path (following $ref)."""
    root = load_schema("policy")
    node = root
    for part in path:
        node = resolve(root, node)
        assert part in node.get("properties", {}), f"the policy schema has no {'.'.join(path)} (missing {part!r})"
        node = node["properties"][part]
    return resolve(root, node)


def resolve(root: dict, node: dict) -> dict:
    while "$ref" in node:
        node = {**root["$defs"][node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def declared(cls: type, prefix: list[str]) -> list[tuple[list[str], type, str]]:
    rows = []
    for field in dataclasses.fields(cls):
        path = [*prefix, *policy_key(cls, field.name).split(".")]
        rows.append((path, cls, field.name))
        if (cls, field.name) == (AlignConfig, "training"):
            rows += declared(TrainConfig, path)
    return rows


DECLARED = [row for cls in CLASSES for row in declared(cls, [cls.SECTION])]


@pytest.mark.parametrize("path, cls, name", DECLARED, ids=[".".join(p) for p, *_ in DECLARED])
def test_every_declared_setting_is_in_the_schema_with_the_same_choices(path, cls, name):
    node = schema_node(path)
    allowed = choices(cls, name)
    if not allowed:
        assert "enum" not in node, f"{'.'.join(path)} has an enum in the schema but no Literal in {cls.__name__}"
        return
    if isinstance(getattr(cls(), name), dict):  # a map of names to choices (screen actions)
        enums = [resolve(load_schema("policy"), sub).get("enum") for sub in node.get("properties", {}).values()]
        assert enums and all(e is not None and set(e) == set(allowed) for e in enums), path
    else:
        assert set(node["enum"]) - {None} == set(allowed), path


def schema_leaves(node: dict, path: list[str]) -> list[list[str]]:
    root = load_schema("policy")
    node = resolve(root, node)
    props = node.get("properties")
    if not props:
        return [path]
    return [leaf for key, sub in props.items() for leaf in schema_leaves(sub, [*path, key])]


def test_every_schema_setting_is_declared_once():
    """The reverse direction: no key in the schema's stage sections that no dataclass field reads."""
    declared_paths = [tuple(p) for p, *_ in DECLARED]
    assert len(declared_paths) == len(set(declared_paths)), "two fields read the same policy key"
    opaque = [(c.SECTION, *policy_key(c, n).split(".")) for c, n in OPAQUE]
    for cls in CLASSES:
        for leaf in schema_leaves(schema_node([cls.SECTION]), [cls.SECTION]):
            covered = any(tuple(leaf[:len(p)]) == p for p in declared_paths)
            assert covered or any(tuple(leaf[:len(o)]) == o for o in opaque), f"{'.'.join(leaf)} is read by no field"


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_the_default_policy_spells_the_dataclass_defaults(cls):
    """Defaults live in the dataclasses; default.yaml is their readable rendering and may not drift from them."""
    section = load_policy("default").section(cls.SECTION)
    built = cls(**{k: v for k, v in from_section(cls, section).items() if k != "training"})
    defaults = cls()
    for field in dataclasses.fields(cls):
        if field.name == "training":
            continue
        assert getattr(built, field.name) == getattr(defaults, field.name), f"{cls.SECTION}.{field.name}"
    if cls is AlignConfig:
        assert config.align_config(load_policy("default")).training == AlignConfig().training


def cli_choices(command: str, option: str) -> tuple[str, ...]:
    params = {p.name: p for p in main.get_command(click.Context(main), command).params}
    param = params[option]
    assert isinstance(param.type, click.Choice), (command, option)
    return tuple(param.type.choices)


@pytest.mark.parametrize("command, option, cls, name", [
    ("train", "objective", TrainConfig, "objective"), ("train", "reference", TrainConfig, "reference"),
    ("train", "quantization", TrainConfig, "quantization"), ("finetune", "objective", TrainConfig, "objective"),
    ("finetune", "quantization", TrainConfig, "quantization"), ("audit", "quantization", TrainConfig, "quantization"),
    ("align", "mode", AlignConfig, "mode"), ("redteam", "objectives", TrainConfig, "objective"),
])
def test_cli_choices_come_from_the_declarations(command, option, cls, name):
    assert cli_choices(command, option) == tuple(choices(cls, name))


def test_redteam_attacks_are_declared_once():
    assert cli_choices("redteam", "attacks") == ATTACKS
    assert set(schema_node(["redteam"])["properties"]) >= {"examples", "trigger"}


def test_a_wrong_choice_names_the_policy_key_and_the_allowed_values():
    with pytest.raises(config.ConfigError, match=r"training\.optimizer\.scheduler is 'cosin'; use linear, cosine or "
                                                 r"constant_with_warmup\."):
        TrainConfig(scheduler="cosin")
    with pytest.raises(config.ConfigError, match=r"dataset\.screen\.actions\.identity_shift is 'block'"):
        DatasetConfig(screen_actions={"identity_shift": "block"})
    assert config.model_config(load_policy("default"), dtype="float16").dtype == "float16"
