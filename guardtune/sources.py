"""Training data in the forms people hold it, turned into the one form the validator reads: JSONL, one record
per line.

A `.jsonl` file is used as it is. Everything else is written once as JSONL (row i of the source is line i, so
every issue's line number is its row number) and validated and trained from that file, so the bytes trained are
the bytes validated:

- `.jsonl.gz` (gzip) and `.jsonl.zst` (zstandard, `pip install zstandard`) are decompressed;
- `.json` holding an array of records;
- `.parquet` (pyarrow);
- a Hugging Face `datasets` directory (`save_to_disk`), or a hub dataset id already in the local cache (never
  downloaded), with `split` naming the split.

Columnar sources (parquet, datasets) store a missing field as null (a message without `name` gets `name: null`
when another message has one); null fields are removed from each record so a row reads as it was written.
"""

from __future__ import annotations

import gzip
import json
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from .errors import DatasetError, MissingDependencyError
from .provenance import sha256_file

CONVERTED_NAME = "input.jsonl"


@dataclass
class Source:
    """Where a dataset came from and the JSONL file that stands for it."""

    spec: str  # what the user named: a path or a hub id
    kind: str  # jsonl | jsonl.gz | jsonl.zst | json | parquet | datasets
    path: Path  # the JSONL to validate and train on
    sha256: str | None  # of the source file as given (None for a datasets directory or hub id)
    split: str | None = None

    @property
    def converted(self) -> bool:
        return self.kind != "jsonl"

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "sha256": self.sha256, "split": self.split,
                "converted_to": str(self.path) if self.converted else None}


SUFFIXES = ((".jsonl.gz", "jsonl.gz"), (".jsonl.zst", "jsonl.zst"), (".json", "json"), (".parquet", "parquet"))


def kind_of(spec: str | Path) -> str:
    """The source kind a path or hub id names (by its suffix, else by gzip/zstd magic bytes). Anything else is
    "jsonl": the JSONL reader then says what is wrong with it (missing, a directory, zipped, ...)."""
    path = Path(spec)
    name = path.name.lower()
    if path.is_dir():
        is_saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        return "datasets" if is_saved else "jsonl"
    if path.is_file():
        named = next((kind for suffix, kind in SUFFIXES if name.endswith(suffix)), None)
        return named or _compression(path) or "jsonl"
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.suffix:
        return "datasets"  # org/name (no file suffix): a hub dataset id, read from the local cache only
    return "jsonl"


# Compressed files whatever their name (an upload called data.jsonl that is really gzip): read as what they are.
MAGIC = ((b"\x1f\x8b", "jsonl.gz"), (b"\x28\xb5\x2f\xfd", "jsonl.zst"))


def _compression(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return None  # the JSONL reader says why it cannot read the file
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), None)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _write_rows(rows: Iterable[Any], target: Path) -> None:
    with target.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(_without_nulls(row), ensure_ascii=False, default=str) + "\n")


def _copy_stream(stream: BinaryIO, target: Path) -> None:
    with target.open("wb") as out:
        while chunk := stream.read(2**20):
            out.write(chunk)


def _zstd_reader(path: Path) -> BinaryIO:
    try:
        import zstandard
    except ImportError as exc:
        raise MissingDependencyError(f"{path} is zstandard-compressed; install `zstandard` (pip install "
                                     f"'guardtune[formats]') or decompress it (zstd -d).") from exc
    return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True)


def _decompress(path: Path, kind: str, target: Path) -> None:
    if kind == "jsonl.gz":
        try:
            with gzip.open(path, "rb") as stream:
                _copy_stream(stream, target)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path} is not a readable gzip file ({exc}).") from exc
        return
    try:
        with _zstd_reader(path) as stream:
            _copy_stream(stream, target)
    except MissingDependencyError:
        raise
    except Exception as exc:  # noqa: BLE001 - zstandard.ZstdError and friends
        raise DatasetError(f"{path} is not a readable zstandard file ({exc}).") from exc


def _json_rows(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{path} is not readable JSON ({exc}). A .json dataset is one array of records; for "
                           f"one record per line name the file .jsonl.") from exc
    if not isinstance(data, list):
        raise DatasetError(f"{path} holds a JSON {type(data).__name__}, not an array of records. Write the records "
                           f"as one array, or one per line in a .jsonl file.")
    return data


def _parquet_rows(path: Path) -> list[Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError(f"{path} is a parquet file; install `pyarrow` (pip install "
                                     f"'guardtune[formats]').") from exc
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own error types for unreadable files
        raise DatasetError(f"{path} is not a readable parquet file ({exc}).") from exc


@contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """Hub access off while loading: datasets and huggingface_hub read their offline flags at import time (the
    environment variables), so the flags themselves are switched, and restored afterwards."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _datasets_rows(spec: str, split: str) -> Iterable[Any]:
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependencyError("Reading a Hugging Face dataset needs `datasets` (pip install "
                                     "'guardtune[formats]').") from exc
    if Path(spec).is_dir():
        loaded = datasets.load_from_disk(spec)
    else:
        try:
            with _offline(datasets):  # the local cache only: a hub id is never downloaded here
                loaded = datasets.load_dataset(spec, split=split)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not there"
            raise DatasetError(f"The dataset {spec!r} is not in the local Hugging Face cache ({exc}). Download it "
                               f"where the hub is reachable, or pass a local file.") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"{spec} has no split {split!r}; it has {', '.join(loaded)}. Pass --split.")
        loaded = loaded[split]
    return iter(loaded)


def materialize(spec: str | Path, out_dir: str | Path, *, split: str = "train") -> Source:
    """The Source for `spec`, converting it into OUT_DIR/input.jsonl unless it is JSONL already."""
    kind = kind_of(spec)
    path = Path(spec)
    if kind == "jsonl":
        return Source(spec=str(spec), kind=kind, path=path, sha256=None)
    target = Path(out_dir) / CONVERTED_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("jsonl.gz", "jsonl.zst"):
        try:
            _decompress(path, kind, target)
        except DatasetError:
            if path.name.lower().endswith("." + kind):
                raise
            # Only its first bytes looked compressed: the JSONL reader reports the file line by line instead.
            target.unlink(missing_ok=True)
            return Source(spec=str(spec), kind="jsonl", path=path, sha256=None)
    elif kind == "json":
        _write_rows(_json_rows(path), target)
    elif kind == "parquet":
        _write_rows(_parquet_rows(path), target)
    else:
        _write_rows(_datasets_rows(str(spec), split), target)
    return Source(spec=str(spec), kind=kind, path=target, sha256=sha256_file(path) if path.is_file() else None,
                  split=split if kind == "datasets" else None)
