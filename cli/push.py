"""`guardtune push`: upload a released, verified release directory to a Hugging Face Hub model repository."""

from __future__ import annotations

import click

from ._common import echo_json, json_option


@click.command()
@click.argument("release_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--repo", required=True, metavar="ORG/NAME", help="Hub model repository (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@json_option
def push(release_dir, repo, private, as_json):
    """Push RELEASE_DIR (adapter, model card, manifest, report) to the hub; refuses a release that fails
    `guardtune verify` or that the gate quarantined. Credentials: HF_TOKEN or `huggingface-cli login`."""
    from guardtune.hub import push as run_push

    result = run_push(release_dir, repo, private=private)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(f"pushed release {result.release_id} ({result.files} files) to {result.repo_id}: {result.url}")
