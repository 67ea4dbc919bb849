"""Shared CLI plumbing: JSON output, the --policy/--set options, issue rendering."""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from typing import Any, Callable, Iterable

import click

from guardtune.config import choices, help_for
from guardtune.policy import load_policy, parse_overrides


def policy_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--policy NAME|PATH and --set KEY=VALUE (repeatable): the command receives `policy` as the name/path, or, with
    --set, as the loaded Policy with the overrides applied and schema-checked (recorded in every artifact)."""
    @functools.wraps(command)
    def run(*args: Any, policy: str, **kwargs: Any) -> Any:
        overrides = kwargs.pop("set")  # named `set` so its environment variable is GUARDTUNE_<COMMAND>_SET
        if overrides:
            policy = load_policy(policy, parse_overrides(overrides))
        return command(*args, policy=policy, **kwargs)

    run = click.option("--set", "set", multiple=True, metavar="KEY=VALUE",
                       help="Override one policy key (dotted, e.g. training.optimizer.learning_rate=1e-4 or "
                            "audit.sample.harmful=50); repeatable; checked against the policy schema.")(run)
    return click.option("--policy", "-p", default="default", show_default=True, metavar="NAME|PATH",
                        help="Shipped policy name (`guardtune policies list`) or a policy YAML file.")(run)

split_option = click.option("--split", default="train", show_default=True,
                            help="The split to read from a datasets directory or hub dataset id.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


def setting_option(*decls: str, config: type, name: str, note: str = "the policy's", **kwargs: Any) -> Any:
    """A CLI option for one declared setting (guardtune.config): its choices and help come from the declaration;
    `note` says where the value comes from when the option is not given."""
    allowed = choices(config, name)
    if allowed:
        kwargs.setdefault("type", click.Choice([str(c) for c in allowed]))
    kwargs.setdefault("default", None)
    kwargs.setdefault("help", f"{help_for(config, name)} (default: {note}.)" if note else help_for(config, name))
    return click.option(*decls, **kwargs)


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


class StageProgress:
    """A tqdm bar per (stage, phase) on stderr, for progress(stage, phase, done, total) callbacks. A bar is closed
    when its phase completes, so its last line is printed once, before other libraries' output."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.key: tuple[str, str] | None = None
        self.bar = None

    def __call__(self, stage: str, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if (stage, phase) != self.key:
            self.close()
            label = stage if stage == phase else f"{stage}: {phase}"
            unit = "example" if phase.endswith("screen") else "step"  # the risk screen counts examples
            self.bar = tqdm(total=total or None, desc=label, unit=unit, leave=True, dynamic_ncols=True)
            self.key = (stage, phase)
        if self.bar is not None and done != self.bar.n:  # each state is printed once: creation shows 0
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.n = done
            if total and done >= total:
                self.close()  # close() prints the final state; refreshing first would print it twice
                return
            self.bar.refresh()

    def stage(self, stage: str):
        """A progress(phase, done, total) callable for a single stage (train or audit run on their own)."""
        return lambda phase, done, total: self(stage, phase, done, total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
