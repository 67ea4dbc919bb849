"""`guardtune validate DATA.jsonl`: check a training file before any GPU time is spent."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import echo_json, json_option, policy_option, render_issues


@click.command()
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="DATA.jsonl")
@policy_option
@click.option("--model", "-m", default=None, metavar="SPEC",
              help="Count tokens with this model's tokenizer and chat template: a local model directory or a "
                   "model name. Default: the policy's model.name when it is available without loading it.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Also write the report (validation.json) to FILE.")
@json_option
def validate(data: Path, policy: str, model: str | None, out: Path | None, as_json: bool) -> None:
    """Validate a JSONL dataset (chat or prompt/completion): every issue with its line and JSON path.

    Exit 0 when valid (warnings allowed), 1 when invalid.
    """
    from guardtune.dataset import validate_dataset

    report = validate_dataset(data, policy=policy, model=model)
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
        click.secho(report.summary(), fg="green" if report.valid else "red", bold=True)
    if not report.valid:
        raise SystemExit(1)
