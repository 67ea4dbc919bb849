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
}


class LazyGroup(click.Group):
    """Loads each command module on first use; maps GuardtuneError to exit codes (1 error, 3 rejected)."""

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
        from guardtune.errors import GuardtuneError

        for stream in (sys.stdout, sys.stderr):  # text from hostile files must never crash the output
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        try:
            return super().invoke(ctx)
        except GuardtuneError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="guardtune")
def main() -> None:
    """Safety-hardened fine-tuning: validate -> train (constrained) -> audit -> gate -> release.

    Exit codes: 0 ok/released, 1 error, 2 usage, 3 gate rejected.
    """


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
