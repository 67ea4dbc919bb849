"""examples/reproduce.py end to end on a tiny model: it writes reproduction.json in exactly the documented shape."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from test_redteam import tiny_policy

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # two alignments, two audits and 8 attack fine-tunes on a tiny model: ~1-2 min on 2 cores
def test_reproduce_writes_the_documented_shape(tiny_model_dir, tmp_path):
    import guardtune

    policy = tiny_policy(tmp_path, tiny_model_dir, prefix_tokens=24)
    with policy.open("a", encoding="utf-8") as handle:
        handle.write(f"align:\n  answer_model: {tiny_model_dir}\n  harmful_answer_tokens: 12\n"
                     "  anchor_answer_tokens: 12\n  holdout: {harmful: 0, benign: 0}\n"
                     "  training: {epochs: 1, batch_size: 8, max_steps: 2}\n")
    deep = guardtune.align(model=str(tiny_model_dir), mode="deep", out=tmp_path / "deep", config=str(policy),
                           merge=True)
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "examples" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    docs = tmp_path / "docs"
    assert reproduce.main(["--raw-model", str(tiny_model_dir), "--deep-model", str(deep.merged_dir),
                           "--deep-adapter", str(deep.adapter_dir), "--policy", str(policy), "--seeds", "1",
                           "--prompts", "4", "--max-new-tokens", "4", "--shallow-steps", "2",
                           "--out", str(tmp_path / "out"), "--docs", str(docs)]) == 0
    result = json.loads((docs / "reproduction.json").read_text())
    assert set(result) == {"prefill", "attacks", "seeds", "n_prompts", "wall_s"}
    assert set(result["prefill"]) == {"raw", "shallow", "deep"}
    assert all(set(row) == {"0", "5", "10", "20"} and all(0 <= v <= 1 for v in row.values())
               for row in result["prefill"].values())
    assert set(result["attacks"]) == {"harmful", "identity-shift", "backdoor", "benign"}
    for row in result["attacks"].values():
        assert set(row) == {"base", "sft", "constrained", "utility_sft", "utility_constrained"}
        assert all(0 <= v <= 1 for v in row.values())
    assert result["seeds"] == 1 and result["n_prompts"] == 4 and result["wall_s"] > 0
    text = (docs / "reproduction.md").read_text()
    assert "## Table A" in text and "## Table B" in text and "reproduction-kl.svg" in text
    assert (docs / "reproduction-kl.svg").read_text().startswith("<svg")
    gate_section = text.split("## Does the gate catch what the objective lets through?")[1].split("## Settings")[0]
    gate_rows = [line for line in gate_section.splitlines() if line.startswith("| harmful | sft | ")]
    assert {row.split(" | ")[2] for row in gate_rows} == {"default"}  # the tiny policy gates on default only
    # --render-only rebuilds the same docs from the run directory without training or auditing anything.
    again = tmp_path / "again"
    assert reproduce.main(["--raw-model", str(tiny_model_dir), "--deep-model", str(deep.merged_dir), "--policy",
                           str(policy), "--shallow-steps", "2", "--out", str(tmp_path / "out"), "--docs", str(again),
                           "--render-only"]) == 0
    assert json.loads((again / "reproduction.json").read_text()) == result
    assert (again / "reproduction.md").read_text() == text
