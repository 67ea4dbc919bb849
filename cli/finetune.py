"""`guardtune finetune`: the whole job — validate, train, audit, gate, release (or quarantine)."""

from __future__ import annotations

import click

from guardtune.config import TrainConfig

from ._common import StageProgress, echo_json, json_option, policy_option, setting_option, split_option


@click.command()
@click.argument("dataset", metavar="DATA")
@click.option("--model", "-m", default=None, metavar="SPEC",
              help="Embedded name, local directory or hub id (default: the policy's model).")
@policy_option
@setting_option("--objective", config=TrainConfig, name="objective")
@setting_option("--quant", "quantization", config=TrainConfig, name="quantization")
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="Run directory (default: guardtune-runs/<run id>).")
@click.option("--epochs", type=float, default=None, help="Passes over the data.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides epochs).")
@click.option("--lr", "learning_rate", type=float, default=None, help="Peak learning rate.")
@click.option("--batch-size", type=int, default=None, help="Examples per forward pass (per process).")
@click.option("--seed", type=int, default=None, help="Seed for data order, LoRA init and dropout.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Run model code shipped with the checkpoint.")
@click.option("--resume", "resume_dir", default=None, type=click.Path(file_okay=False), metavar="RUN_DIR",
              help="Continue the job in RUN_DIR: stages whose artifacts were made from the same data, policy and "
                   "options are kept, training continues from its newest checkpoint, the rest runs.")
@split_option
@json_option
def finetune(dataset, model, policy, objective, quantization, out, epochs, max_steps, learning_rate, batch_size, seed,
             trust_remote_code, resume_dir, split, as_json):
    """Validate DATA, fine-tune, audit beside the base, gate on the policy, release or quarantine. DATA: .jsonl,
    .jsonl.gz/.zst, .json (an array), .parquet, a datasets directory or a cached hub dataset id.

    Exit 0 released, 1 bad input, 3 rejected (quarantined), 4 infrastructure/internal failure.
    """
    if epochs is not None and max_steps is not None:
        raise click.UsageError("Give --epochs or --max-steps, not both.")
    if resume_dir is not None:
        if out is not None and out != resume_dir:
            raise click.UsageError("--resume RUN_DIR continues in RUN_DIR; drop --out (or give the same directory).")
        out = resume_dir
    from guardtune.pipeline import finetune as run_pipeline

    from .audit import format_asr_table, format_side_metrics

    from guardtune.distributed import is_main

    with StageProgress(enabled=is_main()) as bar:  # under a launcher, the main process reports
        result = run_pipeline(dataset, model=model, policy=policy, out=out, objective=objective,
                              quantization=quantization, epochs=epochs, max_steps=max_steps,
                              learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                              trust_remote_code=trust_remote_code or None, progress=bar, split=split,
                              resume=resume_dir is not None)
    if result is None:  # another process of a multi-process job: the main process audits, gates and releases
        return
    if as_json:
        echo_json(result.to_dict())
    else:
        report, decision = result.audit.report, result.decision
        click.echo("")
        click.secho(f"verdict: {result.verdict.upper()}  ({'released' if result.released else 'quarantined'})",
                    fg="green" if result.released else "red", bold=True)
        if report["sample"]["note"]:
            click.echo(report["sample"]["note"])
        click.echo(f"model: {report['model']['spec']}   objective: {result.training.metrics['objective']}   "
                   f"judge: {report['judge']['name']}")
        for line in format_asr_table(result.audit.asr_table()):
            click.echo(line)
        for line in format_side_metrics(report):
            click.echo(line)
        policy = f"policy {decision.policy['name']} v{decision.policy['version']}"
        if decision.failed_rules:
            rules = sorted({r.rule for r in decision.failed_rules})
            click.secho(f"caught by: the audit, at the gate stage ({policy}): {len(decision.failed_rules)} of "
                        f"{len(decision.rules)} rules failed ({', '.join(rules)})", fg="red")
            for rule in decision.failed_rules:
                click.echo(f"  failed: {rule.reason}")
        else:
            click.echo(f"gate: all {len(decision.rules)} rules of {policy} passed")
        flagged = [i for i in result.validation.issues if i.code.startswith("risk-")]
        if flagged:
            lines = ", ".join(str(i.line) for i in flagged[:20]) + (", ..." if len(flagged) > 20 else "")
            click.secho(f"screen: {len(flagged)} training example(s) flagged and kept or dropped as the policy says "
                        f"(lines {lines}; every reason in validation.json), e.g.:", fg="yellow")
            for issue in flagged[:2]:
                click.echo(f"  line {issue.line}: {issue.message}")
        timings = ", ".join(f"{k} {v:.0f}s" for k, v in result.stage_seconds.items())
        click.echo(f"stages: {timings}" + (f" (resumed: {', '.join(result.reused)} kept)" if result.reused else ""))
        click.echo(f"run dir:   {result.run_dir}\nreport:    {result.audit.html_path}\n"
                   f"gate:      {result.run_dir / 'gate.json'}\n"
                   f"{'release' if result.released else 'quarantine'}: {result.published_dir}")
    if not result.released:
        raise SystemExit(3)
