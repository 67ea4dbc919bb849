"""`guardtune policies list|show|check`."""

from __future__ import annotations

import click
import yaml

from ._common import echo_json, json_option


@click.group()
def policies() -> None:
    """List, show and check gate policies."""


@policies.command("list")
@json_option
def list_policies(as_json: bool) -> None:
    """List the shipped policies with their versions."""
    from guardtune.policy import load_policy, shipped_policies

    rows = []
    for name in shipped_policies():
        policy = load_policy(name)
        rows.append({"name": name, "version": policy.version, "description": policy.data.get("description", ""),
                     "includes": [p for p in policy.chain[1:]]})
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        click.echo(f"{row['name']:<12} v{row['version']:<8} {row['description']}")


@policies.command("show")
@click.argument("name", metavar="NAME|PATH")
@json_option
def show_policy(name: str, as_json: bool) -> None:
    """Print a policy with its includes merged (what the pipeline actually uses)."""
    from guardtune.policy import load_policy

    policy = load_policy(name)
    if as_json:
        echo_json({**policy.to_dict(), "policy": policy.data})
        return
    click.echo(f"# {policy.name} v{policy.version}  sha256={policy.sha256}")
    click.echo(f"# from {' <- '.join(policy.chain)}")
    click.echo(yaml.safe_dump(policy.data, sort_keys=False, allow_unicode=True).rstrip())


@policies.command("check")
@click.argument("path", metavar="FILE")
@json_option
def check_policy_cmd(path: str, as_json: bool) -> None:
    """Validate a policy file (schema, includes, cross-field checks). Exit 1 if invalid."""
    from guardtune.config import check_policy

    policy, issues = check_policy(path)
    if as_json:
        echo_json({"valid": policy is not None, "policy": policy.to_dict() if policy else None,
                   "issues": [i.to_dict() for i in issues]})
    elif policy is not None:
        click.echo(f"ok: {policy.name} v{policy.version} (sha256 {policy.sha256[:12]})")
        for issue in issues:
            click.secho(f"  warning: {issue.message}", fg="yellow", err=True)
    else:
        click.secho(f"invalid policy {path}:", fg="red", err=True)
        for issue in issues:
            click.echo(f"  - {issue.message}", err=True)
    if policy is None:
        raise SystemExit(1)
