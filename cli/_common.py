"""Shared CLI plumbing: JSON output, the --policy option, issue rendering."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any, Iterable

import click

policy_option = click.option("--policy", "-p", default="default", show_default=True, metavar="NAME|PATH",
                             help="Shipped policy name (`guardtune policies list`) or a policy YAML file.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


def echo_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False, ensure_ascii=False, default=str))


def render_issues(issues: Iterable[Any], cap: int = 5) -> list[str]:
    """Group issues by (severity, code); show up to `cap` per group and count the rest."""
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for issue in issues:
        groups[(issue.severity, issue.code)].append(issue)
    lines = []
    for (severity, code), members in sorted(groups.items(), key=lambda kv: (kv[0][0] != "error", kv[0][1])):
        lines.append(f"{severity} {code} ({len(members)}):")
        for issue in members[:cap]:
            where = f"line {issue.line}" if issue.line is not None else "file"
            if issue.path:
                where += f" {issue.path}"
            lines.append(f"  {where}: {issue.message}")
        if len(members) > cap:
            lines.append(f"  ... and {len(members) - cap} more {code} issue(s) (use --json for all)")
    return lines
