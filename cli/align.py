"""`guardtune align`: safety-align a base model (deep recovery augmentation or shallow refusals) as a LoRA job."""

from __future__ import annotations

import shlex
import sys

import click

from guardtune.config import AlignConfig

from ._common import StageProgress, echo_json, json_option, policy_option, setting_option


@click.command()
@click.option("--model", "-m", default=None, metavar="SPEC",
              help="Base model to align: embedded name, local directory or hub id (default: the policy's model).")
@setting_option("--mode", config=AlignConfig, name="mode")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
@policy_option
@click.option("--merge", is_flag=True, help="Also write OUT/merged: the base with the adapter merged in, a model "
                                            "directory every command accepts as --model.")
@click.option("--export", type=click.Path(file_okay=False), default=None,
              help="Also write a float16 copy of the adapter with its build manifest into this directory.")
@click.option("--epochs", type=float, default=None, help="Passes over the safety data.")
@click.option("--lr", "learning_rate", type=float, default=None, help="Peak learning rate.")
@click.option("--recovery-prob", type=float, default=None, help="p: share of recovery examples (deep).")
@click.option("--anchor-ratio", type=float, default=None, help="Utility anchors per harmful example.")
@click.option("--seed", type=int, default=None, help="Seed for draws, data order and LoRA init.")
@json_option
def align(model, mode, out, policy, merge, export, epochs, learning_rate, recovery_prob, anchor_ratio, seed, as_json):
    """Safety-align MODEL with LoRA; writes OUT/adapter, OUT/align_metrics.json and the held-out prompts.

    Check the result with the audit, e.g. `guardtune audit --model OUT/merged` (the full audit sets, which the
    alignment data never contains).
    """
    from guardtune.alignment import align as run_align

    command = "guardtune " + shlex.join(sys.argv[1:])
    with StageProgress() as bar:
        result = run_align(model=model, mode=mode, out=out, config=policy, merge=merge, export=export,
                           command=command, progress=bar.stage("align"), epochs=epochs,
                           learning_rate=learning_rate, recovery_prob=recovery_prob, anchor_ratio=anchor_ratio,
                           seed=seed)
    if as_json:
        echo_json(result.to_dict())
        return
    m, data = result.metrics, result.metrics["data"]
    click.echo(f"aligned ({m['mode']}, p={m['recovery_prob']}) in {m['steps']} steps, loss {m['train_loss']:.4f}, "
               f"{m['wall_time_s']:.0f} s")
    click.echo(f"data: {data['harmful_train']} harmful ({data['harmful_answers']['dropped_refusals']} dropped: the "
               f"answer model refused), {data['anchors_train']} anchors, {data['refusals']} refusals; held out "
               f"{data['harmful_holdout']} harmful + {data['anchors_holdout']} benign")
    click.echo(f"adapter: {result.adapter_dir}\nmetrics: {result.metrics_path}")
    if result.merged_dir:
        click.echo(f"merged:  {result.merged_dir}   (next: guardtune audit --model {result.merged_dir})")
    if result.export_dir:
        click.echo(f"export:  {result.export_dir}")
