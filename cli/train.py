"""`guardtune train`: the training stage alone (validate the data, then LoRA/QLoRA with the chosen objective)."""

from __future__ import annotations

import click

from guardtune.config import TrainConfig

from ._common import StageProgress, echo_json, json_option, policy_option, setting_option, split_option


@click.command()
@click.argument("dataset", metavar="DATA")
@click.option("--model", "-m", default=None, metavar="SPEC",
              help="Embedded name, local directory or hub id (default: the policy's model).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
@policy_option
@setting_option("--objective", config=TrainConfig, name="objective")
@setting_option("--reference", config=TrainConfig, name="reference")
@setting_option("--quant", "quantization", config=TrainConfig, name="quantization")
@click.option("--epochs", type=float, default=None, help="Passes over the data.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides epochs).")
@click.option("--lr", "learning_rate", type=float, default=None, help="Peak learning rate.")
@click.option("--batch-size", type=int, default=None, help="Examples per forward pass.")
@click.option("--save-steps", type=int, default=None, help="Checkpoint every N steps (enables --resume).")
@click.option("--seed", type=int, default=None, help="Seed for data order, LoRA init and dropout.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in OUT/checkpoints.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Run model code shipped with the checkpoint.")
@split_option
@json_option
def train(dataset, model, out, policy, objective, reference, quantization, epochs, max_steps, learning_rate,
          batch_size, save_steps, seed, resume, trust_remote_code, split, as_json):
    """Validate DATASET, then fine-tune MODEL on it with LoRA/QLoRA; writes OUT/validation.json, OUT/adapter and
    OUT/train_metrics.json."""
    if epochs is not None and max_steps is not None:
        raise click.UsageError("Give --epochs or --max-steps, not both.")
    from guardtune.pipeline import train as run_training

    with StageProgress() as bar:
        result = run_training(dataset, policy, out, model=model, resume=resume, split=split,
                              progress=bar.stage("train"),
                              trust_remote_code=trust_remote_code or None, objective=objective, reference=reference,
                              quantization=quantization, epochs=epochs, max_steps=max_steps,
                              learning_rate=learning_rate, batch_size=batch_size, save_steps=save_steps, seed=seed)
    if as_json:
        echo_json(result.to_dict())
        return
    m = result.metrics
    click.echo(f"trained {m['steps']} steps ({m['objective']}, reference: {m['reference']}) "
               f"loss {m['train_loss']:.4f}, {m['tokens_per_second']} tokens/s")
    weights = ", ".join(f"{k}={v:.3f}" for k, v in m["constraint_weight"].items() if v is not None)
    if weights:
        click.echo(f"mean constraint weight 2*sigmoid(beta*(ref-policy)): {weights}")
    click.echo(f"adapter: {result.adapter_dir}\nmetrics: {result.metrics_path}")
