"""Load versioned YAML policies: `include:` one parent, require `version:`, JSON-Schema check, fail closed."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import Issue, PolicyError, did_you_mean

SHIPPED_PACKAGE = "guardtune_policies"
POLICY_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Policy:
    """A resolved policy: includes merged, keys as strings, schema-valid."""

    name: str
    version: str
    data: dict[str, Any]
    source: str  # file path of the leaf policy
    chain: tuple[str, ...] = field(default=())  # leaf first, then its include, and so on

    @property
    def sha256(self) -> str:
        """Hash of the resolved policy (canonical JSON), so an include change changes it too."""
        canonical = json.dumps(self.data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def section(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.data.get(name, {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "source": self.source,
                "chain": list(self.chain)}


def _shipped_dir() -> Path:
    # Installed (regular or editable): the `guardtune_policies` data package. A bare source checkout on
    # sys.path without an install falls back to the repository's policies/ folder.
    try:
        return Path(str(resources.files(SHIPPED_PACKAGE)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "policies"


def shipped_policies() -> dict[str, Path]:
    """Shipped policy name -> file."""
    folder = _shipped_dir()
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in POLICY_SUFFIXES}


@lru_cache(maxsize=1)
def policy_schema() -> dict[str, Any]:
    return json.loads(resources.files("guardtune").joinpath("schemas/policy.schema.json").read_text("utf-8"))


def resolve_policy_path(spec: str | Path, relative_to: Path | None = None) -> Path:
    """A shipped name ('default') or a path ('./my.yaml'); unknown names get 'did you mean'."""
    text = str(spec)
    candidate = Path(text).expanduser()
    if relative_to is not None and not candidate.is_absolute():
        nearby = relative_to / candidate
        if nearby.is_file():
            return nearby
    looks_like_path = candidate.suffix in POLICY_SUFFIXES or "/" in text or "\\" in text
    if candidate.is_file():
        return candidate
    if looks_like_path:
        raise PolicyError(f"Policy file {text!r} does not exist. Pass a shipped policy name or an existing "
                          f"YAML file; `guardtune policies list` shows the shipped ones.")
    shipped = shipped_policies()
    if text in shipped:
        return shipped[text]
    raise PolicyError(f"Unknown policy {text!r}.{did_you_mean(text, shipped)}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"Cannot read policy {path}: {exc}. Check the path and that the file is UTF-8 text.")
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"Policy {path} is not valid YAML{where}: {problem}. Fix the YAML syntax there.")
    if not isinstance(data, dict):
        raise PolicyError(f"Policy {path} must be a YAML mapping of sections (version:, training:, ...), "
                          f"not {type(data).__name__}.")
    return _stringify_keys(data)


def _stringify_keys(value: Any) -> Any:
    # YAML turns `{0: 0.1}` into int keys; JSON Schema and JSON reports need string keys.
    if isinstance(value, dict):
        return {str(k): _stringify_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify_keys(v) for v in value]
    return value


# Blocks a child replaces whole instead of merging key by key: a judge's options belong to its name, so a child
# switching `{name: hf, path: ...}` to `{name: keyword}` must not inherit `path`.
REPLACED_WHOLE = ("judge",)


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in REPLACED_WHOLE:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _schema_issues(data: dict[str, Any], source: str) -> list[Issue]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(policy_schema())
    issues = []
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        pointer = "/" + "/".join(str(p) for p in error.absolute_path)
        issues.append(Issue(code="policy-schema", path=pointer, message=_explain(error, source)))
    return issues


def _explain(error: Any, source: str) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "top level"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        unknown = [k for k in error.instance if k not in known]
        parts = [f"unknown key {k!r} in {where}.{did_you_mean(k, known)}" for k in unknown]
        return f"{source}: " + " ".join(parts)
    if error.validator == "enum":
        options = [str(o) for o in error.validator_value]
        return (f"{source}: {where} is {error.instance!r}, which is not allowed."
                f"{did_you_mean(str(error.instance), options)}")
    if error.validator == "oneOf" and error.context:
        # Report the most specific sub-error instead of "is not valid under any of the given schemas".
        best = min(error.context, key=lambda e: len(list(e.absolute_path)) * -1)
        return f"{source}: {where}: {best.message}."
    return f"{source}: {where}: {error.message}."


def load_policy(spec: str | Path = "default") -> Policy:
    """Load, merge includes, and validate a policy; raise PolicyError listing every problem."""
    path = resolve_policy_path(spec)
    chain: list[Path] = []
    layers: list[dict[str, Any]] = []
    issues: list[Issue] = []
    current: Path | None = path
    while current is not None:
        current = current.resolve()
        if current in chain:
            cycle = " -> ".join(str(p) for p in [*chain, current])
            raise PolicyError(f"Policy include cycle: {cycle}. Remove one of the include: lines.")
        chain.append(current)
        data = _read_yaml(current)
        if "version" not in data:
            issues.append(Issue(code="policy-version", path="/version",
                                message=f"{current}: every policy needs a version: line (e.g. version: \"1.0.0\"), "
                                        f"recorded in each manifest so a decision can be traced to the policy text."))
        issues.extend(_schema_issues(data, str(current)))
        layers.append(data)
        parent = data.get("include")
        current = resolve_policy_path(parent, relative_to=current.parent) if isinstance(parent, str) else None
    if issues:
        raise PolicyError(f"Policy {spec} is invalid ({len(issues)} problem(s)):\n" +
                          "\n".join(f"  - {i.message}" for i in issues), issues)
    resolved: dict[str, Any] = {}
    for layer in reversed(layers):
        resolved = _merge(resolved, layer)
    resolved.pop("include", None)
    leaf = layers[0]
    resolved["name"] = leaf.get("name", path.stem)
    resolved["version"] = str(leaf["version"])
    if "description" in leaf:
        resolved["description"] = leaf["description"]
    issues = _schema_issues(resolved, f"{path} (resolved)")
    if issues:
        raise PolicyError(f"Policy {spec} is invalid after merging includes:\n" +
                          "\n".join(f"  - {i.message}" for i in issues), issues)
    return Policy(name=resolved["name"], version=resolved["version"], data=resolved, source=str(chain[0]),
                  chain=tuple(str(p) for p in chain))


def check_policy(spec: str | Path) -> tuple[Policy | None, list[Issue]]:
    """Validate a policy and its semantic cross-checks; return it (or None) and every issue found."""
    try:
        policy = load_policy(spec)
    except PolicyError as exc:
        return None, exc.issues or [Issue(code="policy-invalid", message=str(exc))]
    from .config import configs_from_policy
    from .errors import GuardtuneError

    try:
        configs_from_policy(policy)
    except GuardtuneError as exc:  # ConfigError: cross-field problems the schema cannot express
        return None, [Issue(code="policy-config", message=str(exc))]
    return policy, []
