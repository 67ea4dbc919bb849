"""`guardtune gate REPORT.json --policy P`: re-gate an existing audit report (no torch, no GPU)."""

from __future__ import annotations

import click

from ._common import echo_json, json_option, policy_option


@click.command()
@click.argument("report_path", metavar="REPORT.json", type=click.Path(exists=True, path_type=str))
@policy_option
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Also write the decision as gate.json here.")
@json_option
def gate(report_path: str, policy: str, out: str | None, as_json: bool) -> None:
    """Decide pass or reject for REPORT.json (or a run/audit directory) under a policy.

    Exit 0 pass, 3 reject, 1 if the report or policy is invalid.
    """
    from guardtune.errors import GateRejected
    from guardtune.gate import decide

    decision = decide(report_path, policy)
    if out:
        decision.write(out)
    if as_json:
        echo_json(decision.to_dict())
    else:
        rows = []
        for rule in decision.rules:
            where = " ".join(x for x in (f"k={rule.k}" if rule.k is not None else "", rule.category or "") if x)
            value = "missing" if rule.value is None else f"{rule.value:.4g}"
            rows.append((rule.rule, where, rule.model, value, f"{rule.limit:g}", "pass" if rule.passed else "FAIL"))
        header = ("rule", "where", "model", "value", "limit", "result")
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            line = "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
            click.secho(line, fg="red" if row[-1] == "FAIL" else None, bold=row is header)
        click.echo("")
        click.secho(decision.summary(), fg="green" if decision.passed else "red")
        if out:
            click.echo(f"wrote {out}")
    if not decision.passed:
        if as_json:  # the decision object above is the one JSON answer; the exit code says rejected
            raise SystemExit(GateRejected.exit_code)
        failed = len(decision.failed_rules)
        raise GateRejected(f"gate rejected the adapter: {failed} rule(s) failed under policy "
                           f"{decision.policy['name']} v{decision.policy['version']}.", decision)
