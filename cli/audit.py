"""`guardtune audit`: prefilling attack, over-refusal and KL profile for a model (+ adapter) beside its base."""

from __future__ import annotations

import click

from guardtune.config import AuditConfig, TrainConfig

from ._common import StageProgress, echo_json, json_option, policy_option, setting_option


def format_asr_table(rows: list[dict]) -> list[str]:
    """ASR per k, base vs fine-tuned, with 95% Wilson intervals."""
    def cell(rate, ci):
        return "-" if rate is None else f"{rate:6.1%} [{ci[0]:.0%}, {ci[1]:.0%}]"

    lines = [f"{'k':>4}  {'base ASR [95% CI]':<22}  {'fine-tuned ASR [95% CI]':<24}"]
    for row in rows:
        lines.append(f"{row['k']:>4}  {cell(row['base'], row['base_ci95']):<22}  "
                     f"{cell(row['finetuned'], row['finetuned_ci95']):<24}")
    return lines


def format_side_metrics(report: dict) -> list[str]:
    """Over-refusal, utility and KL beside the ASR table, base vs fine-tuned."""
    base, tuned = report["results"]["base"], report["results"]["finetuned"]

    def rate(result, key, count):
        entry = (result or {}).get(key)
        return "-" if not entry else f"{entry['rate']:.1%} ({entry[count]}/{entry['n']})"

    lines = [f"over-refusal (benign probes): base {rate(base, 'over_refusal', 'refusals')}, "
             f"fine-tuned {rate(tuned, 'over_refusal', 'refusals')}"]
    if base.get("utility"):
        lines.append(f"utility (factual probe):      base {rate(base, 'utility', 'correct')}, "
                     f"fine-tuned {rate(tuned, 'utility', 'correct')}")
    if tuned and tuned.get("kl_profile"):
        lines.append(f"mean KL(fine-tuned || base) at response tokens 1-5: {tuned['kl_profile']['mean_first5']:.3f} "
                     f"nats")
    return lines + format_attacks(report)


def format_attacks(report: dict) -> list[str]:
    """The attacks beside prefilling (those the audit ran), base vs fine-tuned, with 95% intervals."""
    base, tuned = report["results"]["base"], report["results"]["finetuned"]

    def cell(result, attack):
        entry = ((result or {}).get("attacks") or {}).get(attack, {}).get("asr")
        if entry is None:
            return "-"
        lo, hi = entry["ci95"]
        return f"{entry['rate']:.1%} ({entry['harmful']}/{entry['n'] - entry['errors']}) [{lo:.0%}, {hi:.0%}]"

    labels = {"decoding": "decoding exploit (any setting)", "gcg": "GCG suffixes (optimised on base)"}
    return [f"{labels[attack] + ':':<34}base {cell(base, attack)}, fine-tuned {cell(tuned, attack)}"
            for attack in labels if (base.get("attacks") or {}).get(attack)]


@click.command()
@click.option("--model", "-m", default=None, metavar="SPEC",
              help="Embedded name, local directory or hub id (default: the policy's model).")
@click.option("--adapter", "-a", default=None, type=click.Path(exists=True, file_okay=False),
              help="PEFT adapter directory to audit on top of the model (without it: the base alone).")
@policy_option
@click.option("--out", "-o", default="guardtune-audit", show_default=True, type=click.Path(file_okay=False),
              help="Where report.json, samples.jsonl and report.html go.")
@setting_option("--quant", "quantization", config=TrainConfig, name="quantization", default="none", show_default=True,
                note="", help="Load the base in NF4 (audit a QLoRA adapter on the base it was trained on).")
@click.option("--sample", "sample", type=int, default=None,
              help="Audit a seeded sample of this many harmful and benign prompts (CPU runs).")
@click.option("--max-new-tokens", type=int, default=None, help="Tokens generated per continuation.")
@setting_option("--backend", config=AuditConfig, name="backend")
@click.option("--no-cache", is_flag=True, help="Recompute the base model's results instead of reusing them.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Run model code shipped with the checkpoint.")
@json_option
def audit(model, adapter, policy, out, quantization, sample, max_new_tokens, backend, no_cache, trust_remote_code,
          as_json):
    """Audit MODEL (+ ADAPTER) side by side with its base; writes report.json, samples.jsonl, report.html."""
    from guardtune.auditing import audit as run_audit

    with StageProgress() as bar:
        result = run_audit(model=model, adapter=adapter, config=policy, out=out, quantization=quantization,
                           trust_remote_code=trust_remote_code or None, use_cache=not no_cache,
                           progress=bar.stage("audit"), sample_harmful=sample, sample_benign=sample,
                           max_new_tokens=max_new_tokens, backend=backend)
    if result is None:  # another process under torchrun/accelerate: the main process reports
        return
    if as_json:
        echo_json(result.to_dict())
        return
    report = result.report
    if report["sample"]["note"]:
        click.echo(report["sample"]["note"])
    click.echo(f"judge: {report['judge']['name']}   prefix source: {report['prefix_source']['kind']}")
    for line in format_asr_table(result.asr_table()):
        click.echo(line)
    for name, res in report["results"].items():
        if res:
            over = res["over_refusal"]
            kl = res.get("kl_profile")
            extra = f", mean KL t=1..5 {kl['mean_first5']:.4f} nats" if kl else ""
            if res.get("utility"):
                utility = res["utility"]
                extra = f", utility {utility['rate']:.1%} ({utility['correct']}/{utility['n']})" + extra
            click.echo(f"{name}: over-refusal {over['rate']:.1%} ({over['refusals']}/{over['n']}), "
                       f"judge errors {res['judge_errors']['errors']}{extra}")
    for line in format_attacks(report):
        click.echo(line)
    click.echo(f"report: {result.report_path}\nsamples: {result.samples_path}\nhtml: {result.html_path}")
