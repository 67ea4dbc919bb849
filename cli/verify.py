"""`guardtune verify DIR`: recompute every sha256 in a release manifest."""

from __future__ import annotations

import click

from ._common import echo_json, json_option


@click.command()
@click.argument("path", metavar="DIR", type=click.Path(exists=True, path_type=str))
@json_option
def verify(path: str, as_json: bool) -> None:
    """Check a release (RUN/release/<id>, or a run directory holding one) against its manifest.

    Exit 0 if every file matches, 1 if any file changed, is missing, or is not in the manifest.
    """
    from guardtune.errors import VerificationError
    from guardtune.release import verify as verify_release

    result = verify_release(path)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"verified {result.path} (id {result.id}, {result.status}): {result.checked} file(s) hashed")
        for label, names in (("changed", result.mismatched), ("missing", result.missing),
                             ("unexpected", result.unexpected), ("problem", result.problems)):
            for name in names:
                click.secho(f"  {label}: {name}", fg="red")
        if result.ok:
            click.secho("ok: every file matches manifest.json", fg="green")
    if not result.ok:
        if as_json:  # the verification object above is the one JSON answer; the exit code says it failed
            raise SystemExit(VerificationError.exit_code)
        bad = len(result.mismatched) + len(result.missing) + len(result.unexpected)
        names = ", ".join([*result.mismatched, *result.missing, *result.unexpected][:5])
        raise VerificationError(f"{result.path} does not match its manifest: {bad} file(s) differ"
                                + (f" ({names})" if names else "") + (f", {len(result.problems)} manifest problem(s)"
                                                                      if result.problems else "") + ".")
