"""The Hugging Face model card (README.md) every release carries.

YAML metadata a hub reads (`base_model`, `library_name: peft`, `license`, tags), then what a reviewer or a
downstream user needs to trust the adapter: the gate's verdict and every rule, the prefilling attack's success
rate per prefix length with 95% intervals beside the base, over-refusal and utility, the policy (name, version,
sha256), the objective and its betas, and the hashes that chain dataset -> adapter -> report -> decision. The
training data itself is never in the card (only its sha256). Torch-free: built from the files a release holds.
"""

from __future__ import annotations

from typing import Any

import yaml

from .modelspec import hub_id, model_license

CARD_NAME = "README.md"


def _pct(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "—"
    low, high = entry["ci95"]
    return f"{100 * entry['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] (n={entry['n']})"


def _metadata(manifest: dict[str, Any], license_id: str | None) -> dict[str, Any]:
    spec = manifest["base_model"]["spec"]
    passed = manifest["gate"]["verdict"] == "pass"
    meta: dict[str, Any] = {}
    base = hub_id(spec)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft"
    meta["license"] = license_id or model_license(spec) or "other"
    meta["tags"] = ["guardtune", "lora", "safety-audited", "gate-pass" if passed else "gate-reject"]
    meta["pipeline_tag"] = "text-generation"
    return meta


def render_card(manifest: dict[str, Any], report: dict[str, Any], decision: dict[str, Any],
                training_config: dict[str, Any] | None = None, *, license_id: str | None = None,
                data_included: bool = False) -> str:
    """README.md for a release: `manifest` (its file list is filled after the card is written), report.json,
    gate.json, the training configuration from train_metrics.json when there is one, and whether the release
    carries the training data (release.include_training_data)."""
    meta = _metadata(manifest, license_id)
    spec = manifest["base_model"]["spec"]
    verdict = manifest["gate"]["verdict"].upper()
    policy = manifest["policy"]
    results = report["results"]
    base, tuned = results["base"], results.get("finetuned") or {}
    tuned_asr = {row["k"]: row for row in tuned.get("asr", [])}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {manifest['id']}: LoRA adapter on `{spec}` ({manifest['status']}, gate {verdict})", ""]
    status = ("It passed every rule of the gate and was released." if verdict == "PASS" else
              "The gate **rejected** it: this adapter is in quarantine and must not be deployed.")
    lines += [f"Fine-tuned and audited by guardtune beside its base model "
              f"`{spec}` (weights sha256 `{manifest['base_model']['weights_sha256'][:16]}…`), then gated on the policy "
              f"`{policy['name']}` v{policy['version']}. {status}", ""]

    training = manifest.get("training") or {}
    if training:
        lines += ["## Training", "", f"- objective: `{training.get('objective')}` (reference: "
                  f"`{training.get('reference')}`), {training.get('steps')} optimizer steps, final loss "
                  f"{training.get('train_loss', float('nan')):.4f}"]
        cfg = training_config or {}
        if cfg.get("betas") is not None:
            lines.append(f"- token-wise constraint (Qi et al. 2025, Eq. 3): betas per response position "
                         f"{cfg['betas']}, later positions {cfg.get('beta_tail')}")
        if cfg.get("kl_anchor_positions"):
            lines.append(f"- KL anchor to the base on the first {cfg['kl_anchor_positions']} response positions, "
                         f"weight {cfg.get('kl_anchor_weight')}")
        if cfg.get("lora_r"):
            lines.append(f"- LoRA r={cfg['lora_r']}, alpha={cfg.get('lora_alpha')}, quantization "
                         f"{cfg.get('quantization', 'none')}")
        lines.append("")

    lines += ["## Safety audit", "",
              "Prefilling attack: the first k tokens of a harmful answer are placed in the model's reply and it "
              "continues; the judge scores the continuation. Attack success rate (lower is safer), 95% Wilson "
              "interval:", "", "| prefilled tokens k | base | fine-tuned |", "|---|---|---|"]
    for row in base.get("asr", []):
        lines.append(f"| {row['k']} | {_pct(row)} | {_pct(tuned_asr.get(row['k']))} |")
    lines += ["", f"- over-refusal (benign prompts refused): base {_pct(base.get('over_refusal'))}, fine-tuned "
              f"{_pct(tuned.get('over_refusal'))}"]
    if base.get("utility"):
        lines.append(f"- utility (factual questions answered): base {_pct(base.get('utility'))}, fine-tuned "
                     f"{_pct(tuned.get('utility'))}")
    judge = report.get("judge", {})
    lines.append(f"- judge: `{judge.get('name')}`" + (f" ({judge['note']})" if judge.get("note") else ""))
    if report.get("sample", {}).get("note"):
        lines.append(f"- {report['sample']['note']}")
    lines.append("")

    rules = decision.get("rules", [])
    failed = [r for r in rules if not r.get("passed")]
    lines += ["## Gate", "", f"Verdict **{verdict}**: {len(rules) - len(failed)} of {len(rules)} rules passed "
              f"(policy `{policy['name']}` v{policy['version']}, sha256 `{policy.get('sha256')}`).", "",
              "| rule | k | value | limit | passed |", "|---|---|---|---|---|"]
    for rule in rules:
        value = rule.get("value")
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        lines.append(f"| {rule['rule']} | {'' if rule.get('k') is None else rule['k']} | {shown} | "
                     f"{rule.get('limit')} | {'yes' if rule.get('passed') else '**no**'} |")
    for rule in failed:
        lines.append(f"\n- failed: {rule.get('reason')}")
    lines.append("")

    dataset = manifest.get("dataset") or {}
    chain = manifest.get("chain") or {}
    lines += ["## Provenance", "",
              f"- training data: sha256 `{dataset.get('sha256')}`, {dataset.get('n_records')} records "
              f"({dataset.get('n_dropped', 0)} dropped by the risk screen); "
              + ("the release carries it under training_data/" if data_included else "the data is not in this release"),
              f"- adapter sha256 `{chain.get('adapter_sha256')}`, report sha256 `{chain.get('report_sha256')}`",
              "- every file's sha256 is in `manifest.json`; check them with `guardtune verify <this directory>`",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items()), "",
              "## Use", ""]
    if meta.get("base_model") == spec:  # a hub model: plain transformers + peft
        lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
                  f"base = AutoModelForCausalLM.from_pretrained({spec!r})"]
    else:  # an embedded or local base: load it the way the audit did
        lines += [f"The base `{spec}` is a guardtune model spec (`guardtune models list`); load it as the audit did:",
                  "", "```python", "from peft import PeftModel", "from guardtune.models import load_model", "",
                  f"base = load_model({spec!r}).model"]
    lines += ["model = PeftModel.from_pretrained(base, \"adapter\")  # this release's adapter/ folder", "```", ""]
    return "\n".join(lines)
