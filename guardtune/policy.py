"""Load versioned YAML policies: `include:` one parent, require `version:`, JSON-Schema check, fail closed."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import Issue, PolicyError, did_you_mean
from .provenance import sha256_json
from .schemas import schema_issues

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
    overrides: tuple[tuple[str, Any], ...] = field(default=())  # (dotted key, value) applied on top (--set)

    @property
    def sha256(self) -> str:
        """Hash of the resolved policy (canonical JSON), so an include change changes it too."""
        return sha256_json(self.data)

    def section(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.data.get(name, {}))

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version, "sha256": self.sha256, "source": self.source,
               "chain": list(self.chain)}
        if self.overrides:
            out["overrides"] = dict(self.overrides)
        return out


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


def resolve_policy_path(spec: str | Path, relative_to: Path | None = None) -> Path:
    """A shipped name ('default') or a path ('./my.yaml'); unknown names get 'did you mean'."""
    text = str(spec)
    candidate = Path(text).expanduser()
    if relative_to is not None and not candidate.is_absolute():
        nearby = relative_to / candidate
        if nearby.is_file():
            return nearby
    looks_like_path = candidate.suffix in POLICY_SUFFIXES or "/" in text or "\\" in text
    shipped = shipped_policies()
    if not looks_like_path and text in shipped:  # a file named `default` in the working directory never wins:
        return shipped[text]                   # a path says so (`./default`)
    if candidate.is_file():
        return candidate
    if looks_like_path:
        raise PolicyError(f"Policy file {text!r} does not exist. Pass a shipped policy name or an existing "
                          f"YAML file; `guardtune policies list` shows the shipped ones.")
    raise PolicyError(f"Unknown policy {text!r}.{did_you_mean(text, shipped)}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"Cannot read policy {path}: {exc}. Check the path and that the file is UTF-8 text.")
    try:
        data = yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _RefusedYAML as exc:
        raise PolicyError(f"Policy {path}: {exc}")
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
    bad = _non_finite(data)
    if bad:
        raise PolicyError(f"Policy {path}: {bad} is not a finite number (.nan or .inf). Every number in a policy "
                          f"must be finite; use null to turn a rule off.")
    return _stringify_keys(data)


class _RefusedYAML(yaml.YAMLError):
    pass


MAX_YAML_DEPTH = 32


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML without the parts a policy never needs and an attacker would: aliases (a 500-byte alias bomb
    expands to gigabytes), duplicate keys (a reviewer and the loader would read different values), and nesting
    deeper than MAX_YAML_DEPTH."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _RefusedYAML(f"line {mark.line + 1}: YAML aliases (*name) are not allowed in a policy; write the "
                               f"value out.")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _RefusedYAML(f"line {mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels; a policy is "
                                   f"a few levels deep.")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _RefusedYAML(f"line {key_node.start_mark.line + 1}: the key {key!r} appears twice in one "
                                   f"mapping; keep one (YAML would silently use the last).")
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _non_finite(value: Any, path: str = "") -> str | None:
    """The dotted path of the first NaN or infinite number in a policy, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "the document"
    if isinstance(value, dict):
        return next((bad for k, v in value.items() if (bad := _non_finite(v, f"{path}.{k}" if path else str(k)))),
                    None)
    if isinstance(value, list):
        return next((bad for i, v in enumerate(value) if (bad := _non_finite(v, f"{path}[{i}]"))), None)
    return None


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


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (the CLI's --set) -> {dotted key: value}; a value is read as JSON when it parses
    (numbers like 1e-4, lists, null), else as YAML (true, hf, [0, 5]), else kept as the string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise PolicyError(f"--set {item!r} is not KEY=VALUE with a dotted policy key, e.g. "
                              f"--set training.optimizer.learning_rate=1e-4.")
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = yaml.safe_load(text) if text.strip() else text
            except yaml.YAMLError:
                value = text
        out[key.strip()] = value
    return out


def _apply(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PolicyError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a section, in this policy.")
        node = child
    node[parts[-1]] = value


def load_policy(spec: str | Path = "default", overrides: Mapping[str, Any] | None = None) -> Policy:
    """Load, merge includes, apply `overrides` ({dotted key: value}, the CLI's --set), and validate the result;
    raise PolicyError listing every problem. Overrides change the policy's sha256 and are recorded in to_dict()."""
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
        if len(chain) > 1 and "version" not in data:  # an include must be a policy; never echo a foreign file
            raise PolicyError(f"{chain[-2]} includes {current}, which is not a guardtune policy (it has no version: "
                              f"line). include: names a shipped policy or a policy file.")
        if "version" not in data:
            issues.append(Issue(code="policy-version", path="/version",
                                message=f"{current}: every policy needs a version: line (e.g. version: \"1.0.0\"), "
                                        f"recorded in each manifest so a decision can be traced to the policy text."))
        issues.extend(schema_issues(data, "policy", "policy-schema", source=str(current)))
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
    for key, value in (overrides or {}).items():
        if key.split(".")[0] in ("name", "version", "include"):
            raise PolicyError(f"--set {key}: the policy's identity is not overridable; write a policy file that "
                              f"includes {resolved['name']} instead.")
        if _non_finite(value):
            raise PolicyError(f"--set {key}: {value!r} is not a finite number; use null to turn a rule off.")
        _apply(resolved, key, _stringify_keys(value))
    issues = schema_issues(resolved, "policy", "policy-schema",
                           source=f"{path} (resolved{', with --set' if overrides else ''})")
    if issues:
        raise PolicyError(f"Policy {spec} is invalid after merging includes:\n" +
                          "\n".join(f"  - {i.message}" for i in issues), issues)
    return Policy(name=resolved["name"], version=resolved["version"], data=resolved, source=str(chain[0]),
                  chain=tuple(str(p) for p in chain), overrides=tuple((overrides or {}).items()))
