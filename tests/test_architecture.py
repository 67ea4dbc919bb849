"""The module map of docs/architecture.md, enforced: no import cycle, stages do not import each other, the
control plane imports without torch, and guardtune's own modules are imported at the top of a module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "guardtune"
STAGES = {"dataset", "training", "auditing", "gate", "release"}  # validate, train, audit, gate, release
# Call stages (in order, or one stage's pieces for another engine: trl_trainer; release then upload: hub);
# nothing imports them.
ORCHESTRATORS = {"pipeline", "alignment", "redteaming", "trl_trainer", "hub"}
CONTROL_PLANE = ["guardtune.dataset", "guardtune.policy", "guardtune.config", "guardtune.gate", "guardtune.release",
                 "guardtune.report", "guardtune.judges", "guardtune.evalsets", "guardtune.provenance",
                 "guardtune.schemas", "guardtune.modelspec", "guardtune.cache", "guardtune.records",
                 "guardtune.modelcard", "guardtune.hub", "guardtune.sources"]


def module_name(path: Path) -> str:
    return "schemas" if path.parent.name == "schemas" else path.stem


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules imported at the top level, modules imported inside functions) among guardtune's own."""
    top, inner = set(), set()
    depth = 2 if path.parent.name == "schemas" else 1
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == depth:
            targets = {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            (top if node.col_offset == 0 else inner).update(targets)
    return top - {module_name(path)}, inner - {module_name(path)}


GRAPH = {module_name(p): imports(p) for p in [*PACKAGE.glob("*.py"), PACKAGE / "schemas" / "__init__.py"]}


def test_no_import_cycle():
    edges = {m: top | inner for m, (top, inner) in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*trail, nxt])
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(STAGES | ORCHESTRATORS))
def test_stages_do_not_import_stages_and_nothing_imports_an_orchestrator(module):
    top, inner = GRAPH[module]
    if module in STAGES:
        assert not (top | inner) & STAGES, f"the stage {module} imports the stages {(top | inner) & STAGES}"
    for other, (top, inner) in GRAPH.items():
        assert module not in ORCHESTRATORS or module not in (top | inner) or other in ORCHESTRATORS - {module}, \
            f"{other} imports the orchestrator {module}"


def test_own_modules_are_imported_at_the_top():
    inside = {m: inner for m, (_, inner) in GRAPH.items() if inner}
    assert inside == {}, f"in-function imports of guardtune modules: {inside}"


def test_the_control_plane_imports_without_torch():
    code = f"import sys; import {', '.join(CONTROL_PLANE)}; print(sorted(m for m in ('torch', 'transformers', " \
           f"'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
