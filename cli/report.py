"""`guardtune report DIR`: re-render report.html from an audit directory (no torch)."""

from __future__ import annotations

import click


@click.command()
@click.argument("path", metavar="DIR", type=click.Path(exists=True, path_type=str))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Where to write the HTML (default: DIR/report.html).")
def report(path: str, out: str | None) -> None:
    """Render DIR/report.json (+ samples.jsonl and gate.json if present) as one self-contained HTML file."""
    from guardtune.report import write_html

    click.echo(str(write_html(path, out)))
