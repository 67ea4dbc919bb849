"""The model card (README.md) every release carries, and `guardtune push` to a (mocked) Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fixtures.make_report import make_report, make_samples
from guardtune.config import ReleaseConfig
from guardtune.errors import ConfigError, VerificationError
from guardtune.gate import decide
from guardtune.hub import push
from guardtune.modelspec import hub_id, model_license
from guardtune.provenance import sha256_tree
from guardtune.release import publish, verify
from guardtune_cli.main import main

TRAIN_METRICS = {"steps": 16, "config": {"betas": [0.5, 2.0, 2.0, 2.0, 2.0], "beta_tail": 0.1,
                                          "kl_anchor_positions": 5, "kl_anchor_weight": 4.0, "lora_r": 16,
                                          "lora_alpha": 32, "quantization": "none"}}


def make_release(tmp_path: Path, policy: str = "default", run_id: str = "job-1", **config) -> Path:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True, exist_ok=True)
    (run / "adapter" / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (run / "audit").mkdir(exist_ok=True)
    report = make_report()
    report["adapter"]["sha256"] = sha256_tree(run / "adapter")
    (run / "audit" / "report.json").write_text(json.dumps(report))
    (run / "audit" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in make_samples()))
    (run / "train_metrics.json").write_text(json.dumps(TRAIN_METRICS))
    decision = decide(run / "audit" / "report.json", policy)
    return publish(run, decision, run_id=run_id, adapter_dir=run / "adapter", report_dir=run / "audit",
                   extra_files={"train_metrics.json": run / "train_metrics.json"},
                   manifest_fields={"dataset": {"sha256": "d4" * 32, "n_records": 40, "n_dropped": 2,
                                                "path": "secret-customer-data.jsonl"},
                                    "base_model": {"spec": "smollm2-135m-guard", "revision": None,
                                                   "weights_sha256": "ab" * 32},
                                    "training": {"objective": "constrained", "reference": "base", "steps": 16,
                                                 "train_loss": 1.25}},
                   release_config=ReleaseConfig(**config)).path


def card_parts(path: Path) -> tuple[dict, str]:
    text = (path / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_a_release_carries_a_model_card_with_metadata_asr_table_gate_and_provenance(tmp_path):
    release = make_release(tmp_path)
    meta, body = card_parts(release)
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "peft",
                    "license": "apache-2.0", "tags": ["guardtune", "lora", "safety-audited", "gate-pass"],
                    "pipeline_tag": "text-generation"}
    report = json.loads((release / "report.json").read_text())
    for base, tuned in zip(report["results"]["base"]["asr"], report["results"]["finetuned"]["asr"]):
        low, high = tuned["ci95"]
        row = f"| {base['k']} | {100 * base['rate']:.1f}% [{100 * base['ci95'][0]:.1f}, {100 * base['ci95'][1]:.1f}]"
        assert row in body and f"{100 * tuned['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] (n={tuned['n']}) |" \
            in body
    gate = json.loads((release / "gate.json").read_text())
    assert f"Verdict **PASS**: {len(gate['rules'])} of {len(gate['rules'])} rules passed" in body
    assert gate["policy"]["sha256"] in body and f"`{gate['policy']['name']}` v{gate['policy']['version']}" in body
    assert "betas per response position [0.5, 2.0, 2.0, 2.0, 2.0], later positions 0.1" in body
    assert "d4" * 32 in body and "secret-customer-data" not in body  # the data's hash, never the data
    assert "load_model('smollm2-135m-guard')" in body  # an embedded base is loaded the way the audit did
    assert verify(release).ok  # the card is one of the hashed files
    assert "README.md" in json.loads((release / "manifest.json").read_text())["files"]


def test_a_quarantined_release_card_says_so_and_lists_the_failed_rules(tmp_path):
    release = make_release(tmp_path, policy="strict", license="llama3.1")
    meta, body = card_parts(release)
    assert meta["license"] == "llama3.1" and "gate-reject" in meta["tags"]
    assert "The gate **rejected** it" in body and "- failed: " in body and "| **no** |" in body


def test_hub_ids_and_licenses_of_model_specs(tmp_path):
    assert hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert hub_id(str(tmp_path)) is None and hub_id("no-such-model") is None
    assert model_license("smollm2-135m-guard") == "apache-2.0" and model_license("org/x") is None


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls, uploads nothing."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_uploads_a_verified_release_and_refuses_tampered_or_quarantined_ones(tmp_path):
    release = make_release(tmp_path)
    hub = FakeHub()
    result = push(release, "acme/support-lora", private=True, api=hub)
    assert result.url == "https://huggingface.co/acme/support-lora/commit/abc" and result.release_id == "job-1"
    assert hub.calls[0] == ("create_repo", {"repo_id": "acme/support-lora", "repo_type": "model", "private": True,
                                           "exist_ok": True})
    assert hub.calls[1][1]["folder_path"] == str(release) and hub.calls[1][1]["repo_id"] == "acme/support-lora"

    with pytest.raises(ConfigError, match="ORG/NAME"):
        push(release, "no-org", api=FakeHub())
    (release / "README.md").write_text("edited after the release\n")
    untouched = FakeHub()
    with pytest.raises(VerificationError, match="1 changed: README.md"):
        push(release, "acme/support-lora", api=untouched)
    assert untouched.calls == []

    quarantined = make_release(tmp_path / "q", policy="strict", run_id="job-2")
    with pytest.raises(VerificationError, match="quarantined"):
        push(quarantined, "acme/support-lora", api=untouched)
    assert untouched.calls == []


def test_cli_push_uses_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    release = make_release(tmp_path)
    done = CliRunner().invoke(main, ["push", str(release), "--repo", "acme/support-lora", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["repo_id"] == "acme/support-lora" and [c for c, _ in hub.calls] == [
        "create_repo", "upload_folder"]
