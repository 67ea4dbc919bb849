"""The CLI's control plane: torch-free start-up and `guardtune policies list|show|check`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardtune.policy import shipped_policies
from guardtune_cli.main import COMMANDS, main

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "support_replies.jsonl"

# Runs the CLI in-process inside a fresh interpreter, then reports whether torch got imported.
PROBE = """
import json, sys
from guardtune_cli.main import main
try:
    code = main(sys.argv[1:], standalone_mode=False)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "code": code}))
"""


def probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["validate", "--help"], ["validate", str(EXAMPLE)],
                                  ["validate", str(EXAMPLE), "--json"], ["policies", "list"]],
                         ids=["validate-help", "validate", "validate-json", "policies-list"])
def test_control_plane_commands_do_not_import_torch(args):
    result = probe(*args)
    assert result["code"] in (0, None)
    assert result["torch"] is False and result["transformers"] is False


def test_group_help_does_not_import_torch():
    missing = [target for target in COMMANDS.values() if importlib.util.find_spec(target.split(":")[0]) is None]
    if missing:  # `guardtune --help` loads every command for its one-line summary
        pytest.skip(f"command modules not written yet: {', '.join(missing)}")
    result = probe("--help")
    assert result["code"] in (0, None) and result["torch"] is False


def test_validate_on_a_clean_file_is_torch_free_with_a_model_dir(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    result = probe("validate", str(EXAMPLE), "--model", str(tmp_path / "tok"))
    assert result == {"torch": False, "transformers": False, "code": None}


# ---------------------------------------------------------------- policies


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_policies_list_shows_every_shipped_policy():
    result = invoke("policies", "list", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert {row["name"] for row in rows} == set(shipped_policies())
    assert all(row["version"] for row in rows)
    text = invoke("policies", "list")
    assert text.exit_code == 0 and all(name in text.output for name in shipped_policies())


def test_policies_show_resolves_includes():
    result = invoke("policies", "show", "strict", "--json")
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert shown["name"] == "strict" and len(shown["chain"]) == 2
    assert shown["chain"][1].endswith("default.yaml")
    assert shown["policy"]["dataset"]["duplicates"] == "error"  # strict's own value
    assert shown["policy"]["training"]["objective"] == "constrained"  # inherited from default
    assert "sha256=" in invoke("policies", "show", "default").output


@pytest.mark.parametrize("name", sorted(shipped_policies()))
def test_every_shipped_policy_checks_clean(name):
    result = invoke("policies", "check", str(shipped_policies()[name]), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["valid"] is True


@pytest.mark.parametrize("text, message", [
    ("version: '1'\ninclude: default\ntraining:\n  optimizer:\n    lerning_rate: 1.0e-4\n",
     "Did you mean 'learning_rate'"),
    ("include: default\ntraining: {epochs: 1}\n", "version"),
    ("version: '1'\ndataset: {min_examples: 50, max_examples: 10}\n", "min_examples"),
    ("version: '1'\ninclude: no-such-policy\n", "Unknown policy"),
    ("version: '1'\ntraining: [unclosed\n", "not valid YAML"),
])
def test_invalid_policies_exit_1_with_a_reason(text, message, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(text, encoding="utf-8")
    result = invoke("policies", "check", str(path))
    assert result.exit_code == 1
    assert message in result.output
    as_json = invoke("policies", "check", str(path), "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["valid"] is False


def test_unknown_policy_name_suggests_the_closest():
    result = invoke("policies", "show", "stirct")
    assert result.exit_code == 1 and "Did you mean 'strict'" in result.output


def test_stage_functions_are_not_shadowed_by_their_modules():
    """`guardtune.audit`, `.align`, `.redteam` are functions; importing the modules that hold them (auditing,
    alignment, redteaming) must not replace them on the package (a module named like its function would)."""
    import importlib

    import guardtune

    for name, module, home in (("audit", "auditing", "auditing"), ("align", "alignment", "alignment"),
                               ("redteam", "redteaming", "redteaming"), ("train", "training", "pipeline"),
                               ("finetune", "pipeline", "pipeline")):
        importlib.import_module(f"guardtune.{module}")  # guardtune.train validates first: pipeline.train
        assert callable(getattr(guardtune, name)) and getattr(guardtune, name).__module__ == f"guardtune.{home}"
