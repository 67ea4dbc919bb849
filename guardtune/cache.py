"""Content-addressed JSON caches under the guardtune cache directory (generated prefixes, base audit results,
alignment answers): the key is the sha256 of everything that determines the value, writes are atomic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .provenance import atomic_write_text, cache_dir


def json_path(kind: str, payload: dict[str, Any]) -> Path:
    """<cache>/<kind>/<sha256 of payload>.json; `kind` may hold slashes ("audit/base")."""
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / kind / f"{key}.json"


def read_json(path: Path) -> Any:
    """The cached value, or None when it is missing or unreadable (a torn or foreign file is a miss)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any) -> None:
    """Write through a temporary file and rename, so a reader never sees half a value."""
    atomic_write_text(path, json.dumps(value))
