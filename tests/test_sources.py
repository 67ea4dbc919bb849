"""Data in the forms people hold it (guardtune.sources): .jsonl.gz/.zst, .json arrays, .parquet and Hugging Face
datasets directories are validated (row numbers as line numbers) and trained from one JSONL conversion."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from guardtune.dataset import validate_dataset
from guardtune.errors import DatasetError
from guardtune.sources import kind_of, materialize
from guardtune_cli.main import main


def rows(n: int = 12) -> list[dict]:
    out = [{"messages": [{"role": "user", "content": f"Where is parcel {i}?"},
                        {"role": "assistant", "content": f"Parcel {i} left the depot this morning."}]}
           for i in range(n)]
    out[2] = {"messages": [{"role": "user", "content": "No reply here."}]}  # row 3: no assistant turn
    return out


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_all_kinds(tmp_path: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    records = rows()
    paths = {"jsonl.gz": tmp_path / "d.jsonl.gz", "jsonl.zst": tmp_path / "d.jsonl.zst", "json": tmp_path / "d.json",
             "parquet": tmp_path / "d.parquet", "datasets": tmp_path / "ds"}
    paths["jsonl.gz"].write_bytes(gzip.compress(jsonl_bytes(records)))
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(records)))
    paths["json"].write_text(json.dumps(records))
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(paths["datasets"]))
    return paths


def test_every_source_kind_is_validated_with_row_numbers(tmp_path):
    for kind, path in write_all_kinds(tmp_path).items():
        assert kind_of(path) == kind
        report = validate_dataset(path, screen=False)
        assert report.n_records == 11 and not report.valid, kind
        assert [(i.code, i.line) for i in report.issues if i.severity == "error"] == [("no-assistant-turn", 3)], kind
        assert report.path == str(path) and report.source["kind"] == kind and report.source["converted_to"] is None


def test_columnar_nulls_are_dropped_so_rows_read_as_written(tmp_path):
    import datasets

    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
               for i in range(11)]
    records.append({"messages": [{"role": "user", "content": "q", "name": "ann"},
                                 {"role": "assistant", "content": "a"}]})
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))  # arrow gives every message a name: null
    source = materialize(tmp_path / "ds", tmp_path / "out")
    first = json.loads(source.path.read_text().splitlines()[0])
    assert first == records[0]
    report = validate_dataset(tmp_path / "ds", screen=False)
    assert report.valid and report.counts_by_code.get("name-dropped") == 1


def test_unreadable_sources_say_what_is_wrong(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="not a readable gzip file"):
        materialize(tmp_path / "bad.jsonl.gz", tmp_path / "o")
    (tmp_path / "obj.json").write_text('{"messages": []}')
    with pytest.raises(DatasetError, match="not an array of records"):
        materialize(tmp_path / "obj.json", tmp_path / "o")
    import datasets
    from huggingface_hub import constants

    before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    with pytest.raises(DatasetError, match="not in the local Hugging Face cache"):
        materialize("no-such-org/no-such-dataset", tmp_path / "o")
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == before  # offline only while loading
    with pytest.raises(DatasetError, match="Cannot read"):  # a missing .jsonl keeps the reader's own message
        validate_dataset(tmp_path / "missing.jsonl")


def test_cli_validate_reads_a_gzip_upload(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    good = rows()
    good[2] = {"messages": [{"role": "user", "content": "Row three?"}, {"role": "assistant", "content": "Yes."}]}
    path.write_bytes(gzip.compress(jsonl_bytes(good)))
    done = CliRunner().invoke(main, ["validate", str(path), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["valid"] and report["source"]["kind"] == "jsonl.gz" and report["n_records"] == 12


def test_finetune_trains_from_the_converted_file_and_the_manifest_names_the_source(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from guardtune.pipeline import finetune
    from test_pipeline import EXAMPLE, PASSING_GATE, tiny_policy

    records = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "upload.parquet")
    policy = tiny_policy(tmp_path, tiny_model_dir, PASSING_GATE, "parquet")
    run = finetune(tmp_path / "upload.parquet", policy=str(policy), out=tmp_path / "run")
    converted = tmp_path / "run" / "input.jsonl"
    assert converted.is_file() and len(converted.read_text().splitlines()) == len(records)
    assert run.training.metrics["dataset"]["path"].endswith("input.jsonl") or \
        run.training.metrics["dataset"]["path"].endswith("train_data.jsonl")
    source = run.release.manifest["dataset"]["source"]
    assert source["kind"] == "parquet" and source["converted_to"] == str(converted)
    assert not list(tmp_path.glob(".incoming-*"))  # the scratch directory is gone


def test_a_compressed_file_named_like_plain_jsonl_is_read_as_what_it_is(tmp_path):
    import zstandard

    gz, zst = tmp_path / "upload.jsonl", tmp_path / "other.jsonl"
    gz.write_bytes(gzip.compress(jsonl_bytes(rows())))
    zst.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(rows())))
    assert (kind_of(gz), kind_of(zst)) == ("jsonl.gz", "jsonl.zst")
    result = CliRunner().invoke(main, ["validate", str(gz), "--json"])
    lines = [i["line"] for i in json.loads(result.output)["issues"] if i["severity"] == "error"]
    assert lines == [3]  # the real problem, on its row; not "decompress it first"
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(jsonl_bytes(rows()))
    assert kind_of(plain) == "jsonl"


def test_a_corrupt_gzip_is_a_dataset_error_and_a_sniffed_one_is_reported_by_line(tmp_path):
    named = tmp_path / "cut.jsonl.gz"
    named.write_bytes(gzip.compress(jsonl_bytes(rows()))[:40])  # truncated: zlib/EOF errors, not a crash
    with pytest.raises(DatasetError, match="not a readable gzip file"):
        materialize(named, tmp_path / "o")
    sniffed = tmp_path / "cut.jsonl"
    sniffed.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(256)))
    source = materialize(sniffed, tmp_path / "p")
    assert source.kind == "jsonl" and source.path == sniffed and not (tmp_path / "p" / "input.jsonl").exists()
