"""The shared floor for files and provenance (torch-free): where guardtune caches things, how it writes a file
so that a reader never sees half of it, how it hashes files, directory trees and JSON documents, and which
library versions a run records. Every stage uses these; none of them knows about stages."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterator

# ----------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """$GUARDTUNE_CACHE, else $XDG_CACHE_HOME/guardtune, else ~/.cache/guardtune."""
    if os.environ.get("GUARDTUNE_CACHE"):
        return Path(os.environ["GUARDTUNE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "guardtune"
    return Path.home() / ".cache" / "guardtune"


# ----------------------------------------------------------------------------------------------- writing


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """A scratch path beside `path` to write to; renamed onto `path` when the block ends without an error.

    The rename is atomic on POSIX and Windows (same directory), so a reader sees the old file or the new one,
    never half of either; a failed block leaves no scratch file behind. `durable` also fsyncs the file before
    the rename (for the release, whose files must survive a power cut once it says "released")."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # An unpredictable name created with O_EXCL (mkstemp): a planted symlink cannot redirect the write.
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    scratch = Path(name)
    os.chmod(scratch, _FILE_MODE)  # mkstemp makes 0600; the file gets the mode any new file would
    try:
        yield scratch
        if durable:
            fsync_file(scratch)
        os.replace(scratch, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()


def fsync_file(path: str | Path) -> None:
    """Flush a file's content to disk (before a rename that must survive a power cut)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """Write `text` (UTF-8, "\\n" line ends) to `path` atomically; see `atomic_path`."""
    with atomic_path(path, durable=durable) as scratch:
        with open(scratch, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
    return Path(path)


def write_json_file(path: str | Path, document: Any, *, durable: bool = False) -> Path:
    """The JSON files guardtune leaves for people and later stages: indented, UTF-8, a final newline, atomic."""
    return atomic_write_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n", durable=durable)


# ----------------------------------------------------------------------------------------------- hashing


def canonical_json(document: Any) -> str:
    """The one serialisation guardtune hashes: sorted keys, no whitespace, UTF-8 text as is."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_json(document: Any) -> str:
    """sha256 of the canonical JSON of a document (key order and whitespace do not matter)."""
    return hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_files(root: str | Path) -> list[str]:
    """Every file under root as sorted relative POSIX paths (symlinks included, not followed)."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files + [d for d in dirs if (Path(folder) / d).is_symlink()]:
            found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def sha256_tree(root: str | Path) -> str:
    """One digest for a directory: every file's relative path and content hash, in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    for name in tree_files(root):
        digest.update(name.encode() + b"\0" + bytes.fromhex(sha256_file(root / name)))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- versions


def distribution_version(name: str) -> str | None:
    """Version of an installed distribution, or None when it has no metadata (not installed, or on sys.path only)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that determine a run's numbers (provenance)."""
    versions = {"python": platform.python_version()}
    for name in ("guardtune", "torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        versions[name] = distribution_version(name) or "not installed"
    with contextlib.suppress(ImportError):  # torch's own string keeps the build tag (+cpu, +cu130)
        versions["torch"] = importlib.import_module("torch").__version__
    return versions
