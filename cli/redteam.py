"""`guardtune redteam`: run the fine-tuning attacks against a model with each objective and report what got through."""

from __future__ import annotations

import click

from guardtune.config import ATTACKS, TrainConfig, choices

from ._common import StageProgress, echo_json, json_option, policy_option


@click.command()
@click.option("--model", "-m", default=None, metavar="SPEC",
              help="The aligned model to attack (default: the policy's model).")
@click.option("--attack", "attacks", multiple=True, type=click.Choice(ATTACKS),
              help="Attack to run; repeat for several (default: all four).")
@click.option("--objective", "objectives", multiple=True, type=click.Choice(choices(TrainConfig, "objective")),
              help="Training objective of the attacker's fine-tune; repeat for several (default: sft and "
                   "constrained; paper is Eq. 3 alone).")
@click.option("--seeds", type=int, default=None, help="Seeds per (attack, objective) (default: the policy's).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
@policy_option
@click.option("--lr", "learning_rate", type=float, default=None, help="Attack strength: peak learning rate.")
@click.option("--steps", "max_steps", type=int, default=None, help="Attack strength: optimizer steps.")
@click.option("--examples", type=int, default=None, help="Attack examples per attack.")
@click.option("--resume", is_flag=True,
              help="Reuse every run OUT already holds with the same data and settings (after an interruption).")
@json_option
def redteam(model, attacks, objectives, seeds, out, policy, learning_rate, max_steps, examples, resume, as_json):
    """Fine-tune MODEL with each attack's data (standard SFT and the constrained objective, several seeds) through
    the customer-job code, audit every result beside the unattacked model and check it against the gate.

    Writes OUT/redteam.json and OUT/redteam.md. The training-data risk screen is bypassed on purpose.
    """
    from guardtune.redteaming import DEFAULT_OBJECTIVES
    from guardtune.redteaming import redteam as run_redteam

    with StageProgress() as bar:
        result = run_redteam(model=model, attacks=attacks or ATTACKS,
                             objectives=objectives or DEFAULT_OBJECTIVES,
                             out=out, config=policy, progress=bar.stage("redteam"), seeds=seeds,
                             learning_rate=learning_rate, max_steps=max_steps, examples=examples, resume=resume)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(result.markdown_path.read_text(encoding="utf-8"))
    click.echo(f"json: {result.json_path}\nmarkdown: {result.markdown_path}")
