"""`guardtune validate DATA.jsonl`: check a training file before any GPU time is spent."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import StageProgress, echo_json, json_option, policy_option, render_issues, split_option


@click.command()
@click.argument("data", type=click.Path(path_type=Path), metavar="DATA")
@policy_option
@click.option("--model", "-m", default=None, metavar="SPEC",
              help="Count tokens with this model's tokenizer and chat template, and (with dataset.screen.model on) "
                   "let this base model judge every trained answer: a local model directory or a model name. "
                   "Default: the policy's model.name for token counts when it is available without loading it; "
                   "no model screen.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Also write the report (validation.json) to FILE.")
@split_option
@json_option
def validate(data: Path, policy: str, model: str | None, out: Path | None, split: str, as_json: bool) -> None:
    """Validate a dataset (chat or prompt/completion): every issue with its line (row) and JSON path. DATA: a
    .jsonl file, .jsonl.gz/.zst, .json (an array), .parquet, a datasets directory, or a cached hub dataset id.

    Exit 0 when valid (warnings allowed), 1 when invalid.
    """
    from guardtune.config import RunConfig
    from guardtune.dataset import validate_dataset
    from guardtune.modelspec import has_weights, resolve_model_dir

    run = RunConfig.from_policy(policy, model=model)
    base_judge = None
    if model is not None and run.dataset.screen_enabled and run.dataset.screen_model:
        local = resolve_model_dir(model, materialize=False)  # an unprepared model is an error: validate never converts
        if not has_weights(local):
            base_judge = f"{model} has no weights (a tokenizer-only directory): it counts tokens but cannot judge"
        else:
            from guardtune.modelscreen import load_base_judge  # torch loads only here

            base_judge = lambda: load_base_judge(run)  # noqa: E731 - loaded only if the file is structurally valid
    with StageProgress(enabled=callable(base_judge)) as bar:
        report = validate_dataset(data, config=run, model=model, model_judge=base_judge,
                                  on_progress=bar.stage("validate"), split=split)
    if out is not None:
        report.write(out)
    if as_json:
        echo_json(report.to_dict())
    else:
        for line in render_issues(report.issues):
            click.echo(line)
        for code, count in sorted(report.counts_by_code.items()):
            stored = sum(1 for issue in report.issues if issue.code == code)
            if count > stored:
                click.echo(f"note: {count - stored} further {code} issue(s) were counted but not listed.")
        if report.dropped_lines:
            shown = ", ".join(map(str, report.dropped_lines[:50])) + (", ..." if len(report.dropped_lines) > 50 else "")
            click.echo(f"dropped lines ({len(report.dropped_lines)}, not trained on): {shown}")
        model_screen = report.screen.get("model")
        if model_screen:
            click.echo(f"model screen: the base ({model_screen['model']}) read {model_screen['pairs']} pair(s) "
                       f"({model_screen['too_short']} too short to judge) in {model_screen['seconds']:.1f}s and "
                       f"flagged {report.screen['base_flags']}"
                       if model_screen["ran"] else
                       f"model screen: skipped: {model_screen['reason']}")
        click.secho(report.summary(), fg="green" if report.valid else "red", bold=True)
    if not report.valid:
        raise SystemExit(1)
