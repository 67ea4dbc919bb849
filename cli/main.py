"""The `guardtune` command line: a thin click group; each command parses, calls one library function, renders."""

from __future__ import annotations

import importlib
import sys

import click

from guardtune import __version__

# name -> "module:function". Commands import lazily so `guardtune --help` never loads torch.
COMMANDS = {
    "validate": "guardtune_cli.validate:validate",
    "align": "guardtune_cli.align:align",
    "redteam": "guardtune_cli.redteam:redteam",
    "train": "guardtune_cli.train:train",
    "audit": "guardtune_cli.audit:audit",
    "gate": "guardtune_cli.gate:gate",
    "verify": "guardtune_cli.verify:verify",
    "report": "guardtune_cli.report:report",
    "finetune": "guardtune_cli.finetune:finetune",
    "policies": "guardtune_cli.policies:policies",
    "models": "guardtune_cli.models:models",
    "push": "guardtune_cli.push:push",
}
# The stage an error in a one-stage command stopped (finetune's errors carry their own).
STAGE_OF = {"validate": "validate", "train": "train", "audit": "audit", "gate": "gate", "verify": "release",
            "push": "release", "report": "audit", "align": "align", "redteam": "redteam"}


class LazyGroup(click.Group):
    """Loads each command module on first use; turns every failure into its exit code (guardtune.errors) and,
    under --json, into one JSON object on stdout."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(self, ctx, args):  # type: ignore[override]
        name = args[0] if args else None
        if name is not None and name not in COMMANDS and not name.startswith("-"):
            from guardtune.errors import did_you_mean

            ctx.fail(f"No such command {name!r}.{did_you_mean(name, COMMANDS)}")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        from guardtune.errors import EXIT_USAGE, GuardtuneError, error_payload

        from ._common import echo_json

        for stream in (sys.stdout, sys.stderr):  # text from hostile files must never crash the output
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]
        command = args[0] if args else None
        as_json = "--json" in args[1:]
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.UsageError as exc:
            if not as_json:
                raise
            echo_json({"ok": False, "error": {
                "code": "usage", "message": exc.format_message(), "hint": f"Run `guardtune {command} --help`.",
                "stage": None, "exit_code": EXIT_USAGE, "issues": []}})
            ctx.exit(EXIT_USAGE)
        except click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure gets an exit code and, under --json, an object
            payload = error_payload(exc, STAGE_OF.get(command or ""))
            if as_json:
                echo_json(payload)
            elif isinstance(exc, GuardtuneError):
                click.secho(f"error: {exc}", fg="red", err=True)
            else:
                click.echo(payload["error"]["traceback"], err=True)
                click.secho(f"internal error: {payload['error']['message']}\n{payload['error']['hint']}", fg="red",
                            err=True)
            ctx.exit(payload["error"]["exit_code"])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                                              "auto_envvar_prefix": "GUARDTUNE"})
@click.version_option(__version__, prog_name="guardtune")
def main() -> None:
    """Safety-hardened fine-tuning: validate -> train (constrained) -> audit -> gate -> release.

    Exit codes: 0 ok/released, 1 bad input (data, policy, options, model, judge, report), 2 usage, 3 rejected by
    the gate, 4 infrastructure or internal failure (retry; report it if it repeats). Under --json every outcome is
    one JSON object on stdout; a failure is {"ok": false, "error": {code, message, hint, stage, ...}}.

    Every option can also come from the environment as GUARDTUNE_<COMMAND>_<OPTION> (GUARDTUNE_FINETUNE_POLICY,
    GUARDTUNE_FINETUNE_SET="a.b=1 c.d=x"), used when the option is not on the command line. Precedence: a named
    option (--lr, --objective, ...) > --set KEY=VALUE > the policy file > built-in defaults.
    """


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
