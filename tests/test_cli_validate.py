"""`guardtune validate` through click's CliRunner: the bad-input corpus, the done-when check, exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from click.testing import CliRunner

from guardtune_cli.main import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "support_replies.jsonl"
TOKENIZER = "<tokenizer-dir>"  # replaced by the tokenizer_dir fixture in a case's args


def chat(*turns: tuple[str, str], **extra) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **extra}


def encode(record) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


GOOD = [encode(chat(("system", "You are a support agent."), ("user", f"Where is order {i}?"),
                    ("assistant", f"Order {i} ships tomorrow."))) for i in range(12)]
GOOD_PROMPT = [encode({"prompt": f"Where is order {i}?", "completion": f"Order {i} ships tomorrow."})
               for i in range(12)]


def at_line_3(bad: bytes, base: list[bytes] = GOOD) -> Callable[[], bytes]:
    """Twelve good records with `bad` as line 3 (so too-few-examples never masks the case)."""
    return lambda: b"\n".join([*base[:2], bad, *base[2:]]) + b"\n"


def whole(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def weight(turns: list[tuple[str, str, int | None]]) -> bytes:
    return encode({"messages": [{"role": r, "content": c, **({} if w is None else {"weight": w})}
                                for r, c, w in turns]})


class Case(NamedTuple):
    id: str
    data: Callable[[], bytes]
    code: str
    line: int | None = 3
    path: str | None = None
    policy: dict | str | None = None  # dataset overrides (written as a policy that includes default) or a name
    args: tuple[str, ...] = ()
    exit_code: int = 1
    contains: str = ""


U, A = ("user", "Hi there"), ("assistant", "Hello! How can I help?")

BAD = [
    # --- not JSON, or not one JSON object per line
    Case("malformed-json", at_line_3(b'{"messages": [}'), "invalid-json"),
    Case("truncated-json", at_line_3(b'{"messages": [{"role": "user", "content": "hi"}'), "invalid-json",
         contains="truncated"),
    Case("single-quotes", at_line_3(b"{'messages': []}"), "invalid-json"),
    Case("trailing-comma", at_line_3(encode(chat(U, A))[:-1] + b",}"), "invalid-json"),
    Case("bom-mid-file", at_line_3(b"\xef\xbb\xbf" + encode(chat(U, A))), "invalid-json"),
    Case("nan", at_line_3(b'{"messages": [], "x": NaN}'), "nan-infinity"),
    Case("infinity", at_line_3(b'{"messages": [{"role": "user", "content": Infinity}]}'), "nan-infinity"),
    Case("minus-infinity", at_line_3(b'[-Infinity]'), "nan-infinity"),
    Case("trailing-garbage", at_line_3(encode(chat(U, A)) + b" oops"), "trailing-data", contains="oops"),
    Case("two-objects", at_line_3(encode(chat(U, A)) + b" " + encode(chat(U, A))), "trailing-data",
         contains="own line"),
    Case("json-array", at_line_3(b'[{"role": "user", "content": "hi"}]'), "not-an-object", contains="array"),
    Case("json-string", at_line_3(b'"hello"'), "not-an-object", contains="string"),
    Case("json-number", at_line_3(b"42"), "not-an-object", contains="number"),
    Case("json-null", at_line_3(b"null"), "not-an-object"),
    Case("deep-nesting", at_line_3(b"[" * 100_000 + b"]" * 100_000), "nesting-too-deep"),
    Case("deep-nesting-in-object", at_line_3(b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
         "nesting-too-deep"),
    # --- bytes that are not UTF-8 text
    Case("invalid-utf8", at_line_3(b'{"messages": [{"role": "user", "content": "caf\xff"}]}'), "invalid-utf8",
         contains="<offset>"),
    Case("latin1", at_line_3('{"prompt": "caf\u00e9"}'.encode("latin-1")), "invalid-utf8", contains="0xe9"),
    Case("binary-garbage", at_line_3(bytes(range(1, 9)) * 40), "binary-data"),
    Case("nul-bytes", at_line_3(b'{"messages": \x00\x00\x00}'), "binary-data", contains="0x00"),
    Case("gzip-file", whole(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + bytes(range(256))), "binary-data",
         line=1, contains="decompress"),
    Case("lone-surrogate", at_line_3(b'{"messages": [{"role": "user", "content": "x\\ud800"}, '
                                     b'{"role": "assistant", "content": "ok"}]}'), "invalid-unicode",
         path="/messages/0/content"),
    # --- wrong shape (JSON Schema)
    Case("content-int", at_line_3(b'{"messages": [{"role": "user", "content": "hi"}, '
                                  b'{"role": "assistant", "content": 5}]}'), "schema", path="/messages/1/content",
         contains="string"),
    Case("messages-not-list", at_line_3(b'{"messages": "hi"}'), "schema", path="/messages"),
    Case("role-not-string", at_line_3(b'{"messages": [{"role": 5, "content": "hi"}]}'), "schema",
         path="/messages/0/role"),
    Case("unknown-role", at_line_3(encode(chat(("human", "hi"), A))), "schema", path="/messages/0/role",
         contains="Available"),
    Case("role-typo", at_line_3(encode(chat(("usr", "hi"), A))), "schema", path="/messages/0/role",
         contains="Did you mean 'user'"),
    Case("message-not-object", at_line_3(b'{"messages": ["hi", "hello"]}'), "schema", path="/messages/0"),
    Case("missing-content", at_line_3(b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}'),
         "schema", path="/messages/0/content", contains="Missing"),
    Case("empty-messages", at_line_3(b'{"messages": []}'), "schema", path="/messages"),
    Case("extra-top-level-key", at_line_3(encode(chat(U, A, foo=1))), "schema", path="/foo"),
    Case("tools", at_line_3(encode(chat(U, A, tools=[]))), "unsupported-tools", path="/tools"),
    Case("extra-message-key", at_line_3(b'{"messages": [{"role": "user", "content": "hi", "mood": "bob"}, '
                                        b'{"role": "assistant", "content": "x"}]}'), "schema",
         path="/messages/0/mood"),
    Case("tool-turn", at_line_3(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}, '
                                b'{"role": "assistant", "content": "x"}]}'), "unsupported-tool-turn",
         path="/messages/1"),
    Case("weight-2", at_line_3(weight([("user", "hi", None), ("assistant", "x", 2)])), "schema",
         path="/messages/1/weight"),
    Case("weight-string", at_line_3(weight([("user", "hi", None), ("assistant", "x", "1")])), "schema",
         path="/messages/1/weight"),
    Case("completion-int", at_line_3(b'{"prompt": "p", "completion": 3}', GOOD_PROMPT), "schema",
         path="/completion"),
    Case("empty-object", at_line_3(b"{}"), "unknown-format", contains="empty"),
    Case("messages-typo", at_line_3(b'{"mesages": []}'), "unknown-format", contains="Did you mean 'messages'"),
    # --- conversation structure
    Case("no-assistant-turn", at_line_3(encode(chat(("system", "s"), U))), "no-assistant-turn"),
    Case("blank-assistant", at_line_3(encode(chat(U, ("assistant", " \n\t ")))), "blank-content",
         path="/messages/1/content"),
    Case("blank-user", at_line_3(encode(chat(("user", ""), A))), "blank-content", path="/messages/0/content"),
    Case("blank-prompt", at_line_3(b'{"prompt": "  ", "completion": "c"}', GOOD_PROMPT), "blank-content",
         path="/prompt"),
    Case("assistant-not-last", at_line_3(encode(chat(U, A, U))), "role-order", path="/messages/2/role"),
    Case("two-system", at_line_3(encode(chat(("system", "a"), ("system", "b"), U, A))), "role-order",
         path="/messages/1/role"),
    Case("system-not-first", at_line_3(encode(chat(U, ("system", "s"), A))), "role-order",
         path="/messages/1/role"),
    Case("two-user-turns", at_line_3(encode(chat(U, U, A))), "role-order", path="/messages/1/role"),
    Case("assistant-first", at_line_3(encode(chat(A, U, A))), "role-order", path="/messages/0/role"),
    Case("weight-on-user", at_line_3(weight([("user", "hi", 1), ("assistant", "x", None)])), "misplaced-weight",
         path="/messages/0/weight"),
    Case("all-weight-0", at_line_3(weight([("user", "a", None), ("assistant", "b", 0), ("user", "c", None),
                                           ("assistant", "d", 0)])), "no-trained-turn"),
    Case("mixed-format", at_line_3(b'{"prompt": "p", "completion": "c"}'), "mixed-format",
         contains="chat"),
    Case("mixed-format-chat-in-prompt-file", at_line_3(encode(chat(U, A)), GOOD_PROMPT), "mixed-format"),
    # --- policy limits and duplicates
    Case("duplicate-strict", at_line_3(GOOD[0]), "duplicate", policy="strict", contains="line 1"),
    Case("line-too-large", at_line_3(encode(chat(U, ("assistant", "x" * 5000)))), "line-too-large",
         policy={"max_line_bytes": 1000}),
    Case("too-many-tokens", at_line_3(encode(chat(U, ("assistant", "word " * 200)))), "too-many-tokens",
         policy={"max_tokens": 200}, args=("--model", TOKENIZER), contains="dataset.max_tokens"),
    # --- whole-file problems
    Case("empty-file", whole(b""), "empty-file", line=None),
    Case("only-blank-lines", whole(b"\n  \n\n"), "empty-file", line=None),
    Case("too-few-examples", whole(b"\n".join(GOOD[:3]) + b"\n"), "too-few-examples", line=None),
    Case("too-many-examples", whole(b"\n".join(GOOD) + b"\n"), "too-many-examples", line=None,
         policy={"min_examples": 1, "max_examples": 5}),
    Case("file-too-large", whole(b"\n".join(GOOD) + b"\n"), "file-too-large", line=None,
         policy={"max_file_bytes": 1000, "max_line_bytes": 500}),
]

FIVE_MB = encode(chat(U, ("assistant", "All good. " * 500_000)))
VALID_WITH_WARNING = [
    Case("bom", whole(b"\xef\xbb\xbf" + b"\n".join(GOOD) + b"\n"), "bom", line=1, exit_code=0),
    Case("crlf", whole(b"\r\n".join(GOOD) + b"\r\n"), "crlf", line=1, exit_code=0),
    Case("blank-line", at_line_3(b""), "blank-line", exit_code=0),
    Case("whitespace-line", at_line_3(b"   \t"), "blank-line", exit_code=0),
    Case("duplicate-default", at_line_3(GOOD[0]), "duplicate", contains="line 1", exit_code=0),
    Case("five-mb-line", at_line_3(FIVE_MB), "", exit_code=0),
    Case("prompt-completion", whole(b"\n".join(GOOD_PROMPT) + b"\n"), "", exit_code=0),
    Case("no-trailing-newline", whole(b"\n".join(GOOD)), "", exit_code=0),
    Case("weight-0-context-turn", at_line_3(weight([("user", "a", None), ("assistant", "b", 0), ("user", "c", None),
                                                    ("assistant", "d", 1)])), "", exit_code=0),
    Case("weight-float-1", at_line_3(b'{"messages": [{"role": "user", "content": "a"}, '
                                     b'{"role": "assistant", "content": "b", "weight": 1.0}]}'), "", exit_code=0),
]


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """The tiny BPE tokenizer + ChatML template saved alone: a model folder for token counting, no torch."""
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    tiny_tokenizer.save_pretrained(folder)
    return folder


def write_policy(tmp_path: Path, dataset: dict) -> Path:
    path = tmp_path / "test-policy.yaml"
    path.write_text("version: test\ninclude: default\ndataset: " + json.dumps(dataset) + "\n", encoding="utf-8")
    return path


def run_case(case: Case, tmp_path: Path, request) -> tuple[object, dict, bytes]:
    data = case.data()
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    args = ["validate", str(path), "--json"]
    if isinstance(case.policy, dict):
        args += ["--policy", str(write_policy(tmp_path, case.policy))]
    elif case.policy:
        args += ["--policy", case.policy]
    if case.args:
        folder = str(request.getfixturevalue("tokenizer_dir"))
        args += [folder if a == TOKENIZER else a for a in case.args]
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result, json.loads(result.stdout), data


def check_issue(case: Case, report: dict, data: bytes) -> None:
    matching = [i for i in report["issues"] if i["code"] == case.code and i["line"] == case.line]
    assert matching, f"no {case.code} on line {case.line}: {report['issues']}"
    if case.path is not None:
        assert case.path in [i["path"] for i in matching]
    contains = case.contains
    if contains == "<offset>":  # the byte offset of the bad byte within the file
        contains = "byte offset %d" % data.index(b"\xff")
    assert any(contains in i["message"] for i in matching), matching
    assert report["counts"][case.code] >= 1


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_is_reported_on_its_line(case: Case, tmp_path, request):
    result, report, data = run_case(case, tmp_path, request)
    assert result.exit_code == 1, result.output
    assert report["valid"] is False and report["n_errors"] >= 1
    check_issue(case, report, data)
    assert all(i["message"].strip() and i["severity"] in ("error", "warning") for i in report["issues"])
    if case.line == 3:  # the twelve good lines around it stay valid: only the bad line has errors
        assert {i["line"] for i in report["issues"] if i["severity"] == "error"} == {case.line}
        assert report["n_records"] == 12


@pytest.mark.parametrize("case", VALID_WITH_WARNING, ids=[c.id for c in VALID_WITH_WARNING])
def test_tolerated_input_is_valid(case: Case, tmp_path, request):
    result, report, data = run_case(case, tmp_path, request)
    assert result.exit_code == 0, result.output
    assert report["valid"] is True and report["n_errors"] == 0
    if case.code:
        check_issue(case, report, data)
        assert report["counts"][case.code] == 1  # one warning, not one per line
    else:
        assert set(report["counts"]) <= {"token-check-skipped"}


def test_corpus_is_large_enough():
    assert len(BAD) + len(VALID_WITH_WARNING) >= 40


def test_done_when_lines_2_5_9_are_exactly_the_errors(tmp_path):
    lines = [encode(chat(U, ("assistant", f"Reply {i}."))) for i in range(15)]
    lines[1] = b'{"messages": [{"role": "user", "content": "hi"'  # bad JSON
    lines[4] = encode(chat(("robot", "hi"), A))  # unknown role
    lines[8] = encode(chat(("system", "s"), U))  # no assistant turn
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = CliRunner().invoke(main, ["validate", str(path), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    errors = [i for i in report["issues"] if i["severity"] == "error"]
    assert sorted(i["line"] for i in errors) == [2, 5, 9]
    assert report["n_records"] == 12 and report["n_lines"] == 15

    path.write_bytes(b"\n".join(GOOD) + b"\n")
    clean = CliRunner().invoke(main, ["validate", str(path), "--json"])
    assert clean.exit_code == 0
    assert json.loads(clean.stdout)["valid"] is True


def test_human_output_groups_and_summarizes(tmp_path):
    bad = [encode(chat(("bot", f"hi {i}"), A)) for i in range(8)]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([*GOOD, *bad, GOOD[0]]) + b"\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    assert "error schema (8):" in result.output
    assert "... and 3 more schema issue(s)" in result.output
    assert "warning duplicate (1):" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("INVALID: 13 valid of 21 lines, chat format, 8 errors,")


def test_example_dataset_is_clean(tokenizer_dir, tmp_path):
    result = CliRunner().invoke(main, ["validate", str(EXAMPLE), "--model", str(tokenizer_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["issues"] == [] and report["format"] == "chat"
    assert 40 <= report["n_records"] <= 100
    assert report["token_check"]["model"] == str(tokenizer_dir)

    plain = CliRunner().invoke(main, ["validate", str(EXAMPLE), "--out", str(tmp_path / "validation.json")])
    assert plain.exit_code == 0
    assert plain.output.strip().splitlines()[-1].startswith(f"valid: {report['n_records']} records, chat format, "
                                                            f"0 errors")
    written = json.loads((tmp_path / "validation.json").read_text())
    assert written["valid"] is True and written["sha256"] == report["sha256"]


def test_json_mode_prints_exactly_one_object(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(GOOD) + b"\n")
    result = CliRunner().invoke(main, ["validate", str(path), "--json"])
    decoded, end = json.JSONDecoder().raw_decode(result.stdout)
    assert result.stdout[end:].strip() == "" and isinstance(decoded, dict)
    assert {"valid", "format", "n_records", "issues", "sha256", "counts"} <= set(decoded)


@pytest.mark.parametrize("args, code, text", [
    (["validate", "missing.jsonl"], 1, "Cannot read"),  # DATA may also be a hub id: a missing file is bad input
    (["validate"], 2, "Missing argument"),
    (["validate", str(EXAMPLE), "--policy", "defualt"], 1, "Did you mean 'default'"),
    (["validate", str(EXAMPLE), "--policy", "nope/p.yaml"], 1, "does not exist"),
    (["validate", str(EXAMPLE), "--model", "no-such-model-xyz"], 1, "no-such-model-xyz"),
    (["validate", str(EXAMPLE), "--model", "smollm2-135m-instruct"], 1, "smollm2-135m-instruct"),  # not prepared
])
def test_usage_and_setup_errors_exit_codes(args, code, text, tmp_path):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert text in result.output
    assert "Traceback" not in result.output


def test_model_without_tokenizer_is_an_error(tmp_path):
    (tmp_path / "model").mkdir()
    result = CliRunner().invoke(main, ["validate", str(EXAMPLE), "--model", str(tmp_path / "model")])
    assert result.exit_code == 1
    assert "tokenizer.json" in result.output
