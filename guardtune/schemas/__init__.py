"""The JSON Schemas guardtune ships (policy, dataset lines, audit report, gate decision, release manifest) and the
one place that turns a schema violation into a message saying where, what, and how to fix it.

A schema may carry advice for its own fields (`x-hint`; `x-unknown-keys` on an object; JSON Schema ignores unknown
keywords): it ends the message about that field, so the advice is written once, beside the rule it explains."""

from __future__ import annotations

import json
from collections import defaultdict
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

from ..errors import Issue, did_you_mean

KNOWN_KINDS = {"guardtune-gate-decision": "gate.json (a gate decision)",
               "guardtune-release-manifest": "manifest.json (a release manifest)",
               "guardtune-audit-report": "report.json (an audit report)"}


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """A shipped JSON Schema by short name: report, gate, manifest, policy, dataset_chat, dataset_prompt."""
    return json.loads(resources.files(__name__).joinpath(f"{name}.schema.json").read_text("utf-8"))


def pointer(parts: Iterable[Any]) -> str:
    """RFC 6901 JSON pointer ("" for the document itself)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


@lru_cache(maxsize=None)
def validator(name: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(load_schema(name))


def schema_issues(document: Any, schema_name: str, code: str, *, source: str | None = None) -> list[Issue]:
    """Every schema problem in `document` as Issues (JSON pointer + how-to-fix message), sorted by location.
    `source` (the file the document came from) and the pointer prefix each message: policy problems are listed
    by message alone."""
    issues = []
    for error in sorted(violations(document, schema_name), key=lambda e: [str(p) for p in e.absolute_path]):
        for where, message in explain(error, schema_name):
            shown = f"{source}: {where or '/'}: {message}" if source else message  # printed without its path
            issues.append(Issue(code=code, path=where or "/", message=shown))
    return issues


def violations(document: Any, schema_name: str) -> list[Any]:
    """The jsonschema errors of `document`, oneOf/anyOf failures narrowed to the branch that was meant."""
    return [leaf for error in validator(schema_name).iter_errors(document) for leaf in _branch_errors(error)]


def _branch_errors(error: Any) -> list[Any]:
    """For a oneOf/anyOf failure, the errors of the branch the value was meant for (not "matches no branch")."""
    if error.validator not in ("oneOf", "anyOf") or not error.context:
        return [error]
    branches: dict[Any, list[Any]] = defaultdict(list)
    for sub in error.context:
        branches[sub.relative_schema_path[0]].append(sub)
    # A branch that failed only on the value's own type (e.g. the `null` of "null or object") was not meant.
    meant = [subs for subs in branches.values()
             if not all(s.validator == "type" and not s.relative_path for s in subs)]
    if len(meant) == 1:
        return [leaf for sub in meant[0] for leaf in _branch_errors(sub)]
    return [error]


def explain(error: Any, schema_name: str) -> list[tuple[str, str]]:
    """(JSON pointer, message) pairs for one schema violation. The pointer says where; the message names the
    field, says what is wrong and how to fix it. Unknown and missing keys get one pair each, pointing at the key.

    Advice a schema carries for a field (`x-hint`) ends every message about that field's value; `x-unknown-keys`
    on an object says why keys it does not know are refused."""
    path = list(error.absolute_path)
    where = pointer(path)
    name = _name(path)
    inside = f"in {name}" if path else "at the top level"
    schema = error.schema if isinstance(error.schema, dict) else {}
    hint = f" {schema['x-hint']}" if schema.get("x-hint") else ""
    see = f" See guardtune/schemas/{schema_name}.schema.json."
    value = error.instance
    kind = error.validator
    if kind in ("oneOf", "anyOf"):
        types = [t for sub in error.context if sub.validator == "type" and not sub.relative_path
                 for t in ([sub.validator_value] if isinstance(sub.validator_value, str) else sub.validator_value)]
        if types:
            return [(where, f"{name} is {_json_type(value)} {_short(value)}; expected {' or '.join(types)}."
                            f"{hint or see}")]
        return [(where, f"{name} matches none of the allowed forms: {error.message}.{see}")]
    if kind == "required" and isinstance(value, dict):
        return [(pointer([*path, key]), f"Missing required field {key!r} {inside}. Add it.")
                for key in error.validator_value if key not in value]
    if kind == "additionalProperties" and isinstance(value, dict):
        known = list(schema.get("properties", {}))
        why = f" {schema['x-unknown-keys']}" if schema.get("x-unknown-keys") else ""
        return [(pointer([*path, key]), f"Unknown key {key!r} {inside}.{did_you_mean(key, known)} "
                                        f"Remove it or fix the spelling.{why}")
                for key in value if key not in known]
    if kind == "type":
        expected = error.validator_value if isinstance(error.validator_value, str) else \
            " or ".join(error.validator_value)
        return [(where, f"{name} is {_json_type(value)} {_short(value)}; expected {expected}.{hint or see}")]
    if kind == "const":
        if path and path[-1] == "kind" and value in KNOWN_KINDS and value != error.validator_value:
            wanted = KNOWN_KINDS.get(error.validator_value, repr(error.validator_value))
            return [(where, f"kind is {value!r}: this file is {KNOWN_KINDS[value]}, not {wanted}. "
                            f"Pass the right file.")]
        return [(where, f"{name} is {_short(value)}; it must be {error.validator_value!r}.")]
    if kind == "enum":
        options = [str(o) for o in error.validator_value]
        return [(where, f"{name} is {_short(value)}, which is not allowed.{did_you_mean(str(value), options)}{hint}")]
    return [(where, f"{name}: {error.message}.{hint or see}")]


def _name(path: list[Any]) -> str:
    """How a message names the field at `path`: its key, or key[i] for an array item ("messages[0]")."""
    if not path:
        return "the document"
    if isinstance(path[-1], int) and len(path) > 1:
        return f"{path[-2]}[{path[-1]}]"
    return str(path[-1])


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
