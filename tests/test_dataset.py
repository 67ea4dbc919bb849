"""guardtune.dataset and guardtune.tokencount: report, streaming, token counting parity, model resolution."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest

from guardtune import modelspec
from guardtune.dataset import MAX_ISSUES_PER_CODE, ValidationReport, validate_dataset
from guardtune.records import SCHEMAS, _plainly_valid, iter_records
from guardtune.errors import DatasetError, ModelError, TemplateError
from guardtune.policy import load_policy
from guardtune.schemas import validator
from guardtune.tokencount import TokenCounter


def chat(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


def write_jsonl(path: Path, records, end: bytes = b"\n") -> Path:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    path.write_bytes(end.join(lines) + end)
    return path


def good(n: int, start: int = 0) -> list[dict]:
    return [chat(("user", f"Question {i}?"), ("assistant", f"Answer {i}.")) for i in range(start, start + n)]


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    tiny_tokenizer.save_pretrained(folder)
    return folder


def codes(report: ValidationReport) -> dict[str, int]:
    return {code: n for code, n in report.counts_by_code.items() if code != "token-check-skipped"}


# ---------------------------------------------------------------- token counting

CONVERSATIONS = [
    [{"role": "user", "content": "Hello world! How are you today?"},
     {"role": "assistant", "content": "Sure, here is a summary of the article."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Reset my password"},
     {"role": "assistant", "content": "Open Settings, choose Security, and click Reset password.", "weight": 1}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
     {"role": "user", "content": "  spaced  \n\n lines "}, {"role": "assistant", "content": "Thank you!\n"}],
    [{"role": "user", "content": "Ünïcödé — emoji 🎉 and 中文"},
     {"role": "assistant", "content": "<|im_end|> inside"}],
]

# Templates that exercise what the renderer must mirror: block whitespace control (trim_blocks,
# lstrip_blocks), tojson without HTML escaping, special-token variables, raise_exception, {% generation %}.
MULTILINE = """{% for message in messages %}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ '<|im_start|>assistant\n' + message['content'] + eos_token }}{% endgeneration %}
    {% else %}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}
    {% endif %}
{% endfor %}"""
TOJSON = "{% for m in messages %}{{ m | tojson }}{{ pad_token }}{% endfor %}"
STRICT = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
          "{% endfor %}")


@pytest.mark.parametrize("template", [None, MULTILINE, TOJSON], ids=["chatml", "multiline", "tojson"])
def test_token_count_matches_transformers_apply_chat_template(template, tmp_path):
    from tiny_models import CHATML, build_tokenizer

    tokenizer = build_tokenizer(chat_template=template or CHATML)
    tokenizer.save_pretrained(tmp_path)
    counter = TokenCounter.from_model_dir(tmp_path)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert counter.count(messages) == len(expected)
        assert counter.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_template_from_tokenizer_config_and_special_tokens_map(tmp_path, tokenizer_dir):
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                           {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}]}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "lstrip": False}}))
    counter = TokenCounter.from_model_dir(tmp_path)
    assert counter.render([{"role": "user", "content": "hi"}]) == "<s>hi"
    assert counter.count([{"role": "user", "content": "hi"}]) == counter.count_text("<s>hi")


@pytest.mark.parametrize("files, error, text", [
    ({}, ModelError, "No tokenizer.json"),
    ({"tokenizer.json": None}, TemplateError, "no chat template"),
    ({"tokenizer.json": None, "chat_template.jinja": "{% for %}"}, TemplateError, "not valid jinja"),
    ({"tokenizer.json": "{not json"}, ModelError, "Cannot load"),
    ({"tokenizer.json": None, "tokenizer_config.json": "[1, "}, ModelError, "Cannot read"),
])
def test_unusable_model_folders_raise_clear_errors(files, error, text, tmp_path, tokenizer_dir):
    for name, content in files.items():
        source = (tokenizer_dir / name).read_text() if content is None else content
        (tmp_path / name).write_text(source)
    with pytest.raises(error, match=text):
        TokenCounter.from_model_dir(tmp_path)


def test_template_refusal_is_an_issue_not_a_crash(tmp_path, tokenizer_dir):
    from tiny_models import build_tokenizer

    build_tokenizer(chat_template=STRICT).save_pretrained(tmp_path / "model")
    records = [chat(("system", "s"), ("user", "u"), ("assistant", "a")), *good(10)]
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", records), model=tmp_path / "model")
    assert not report.valid
    assert [(i.code, i.line) for i in report.issues] == [("template-error", 1)]
    assert "System role not supported" in report.issues[0].message


def test_too_many_tokens_uses_the_policy_limit(tmp_path, tokenizer_dir):
    counter = TokenCounter.from_model_dir(tokenizer_dir)
    long = chat(("user", "hi"), ("assistant", "word " * 100))
    n_tokens = counter.count(long["messages"])
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: '1'\ninclude: default\ndataset: {{max_tokens: {n_tokens - 1}}}\n")
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", [*good(10), long]), config=policy, model=counter)
    assert [(i.code, i.line) for i in report.issues] == [("too-many-tokens", 11)]
    assert f"{n_tokens} tokens" in report.issues[0].message
    policy.write_text(f"version: '1'\ninclude: default\ndataset: {{max_tokens: {n_tokens}}}\n")
    report = validate_dataset(tmp_path / "d.jsonl", config=policy, model=tokenizer_dir)
    assert report.valid and report.issues == [] and report.token_check["model"] == str(tokenizer_dir)


TEXTS = ["", "plain ascii words", "<|im_start|>user\nhi<|im_end|>\n", "Ünïcödé — 🎉 中文 ﷺ", "x" * 3000,
         "  leading and   repeated   spaces\t\n"]


def test_byte_level_bpe_has_at_most_one_token_per_byte(tokenizer_dir):
    counter = TokenCounter.from_model_dir(tokenizer_dir)
    assert counter.byte_bounded
    for text in TEXTS:
        assert counter.count_text(text) <= counter.bound(text)


def tokenizer_variant(normalizer=None, pre_tokenizer=None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = {"nfc": normalizers.NFC(), None: None}[normalizer]
    tokenizer.pre_tokenizer = {
        "byte-level": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "byte-level-prefix": pre_tokenizers.ByteLevel(add_prefix_space=True),
        "metaspace": pre_tokenizers.Metaspace(),
        "split-then-byte-level": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                          pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        None: None}[pre_tokenizer]
    return tokenizer


@pytest.mark.parametrize("normalizer, pre_tokenizer, bounded", [
    (None, "byte-level", True),
    (None, "split-then-byte-level", True),
    ("nfc", "byte-level", False),  # NFC can lengthen text
    (None, "byte-level-prefix", False),  # a prefix space per piece
    (None, "metaspace", False),
    (None, None, False),
])
def test_byte_bound_is_only_trusted_where_it_holds(normalizer, pre_tokenizer, bounded):
    counter = TokenCounter(tokenizer_variant(normalizer, pre_tokenizer), "{{ messages[0]['content'] }}")
    assert counter.byte_bounded is bounded
    assert (counter.bound("abc") is None) is not bounded


# ---------------------------------------------------------------- model resolution


def fake_models(monkeypatch, **functions) -> None:
    for name, function in functions.items():
        monkeypatch.setattr(modelspec, name, function)


def test_policy_model_is_skipped_with_one_warning_when_not_cached(tmp_path, monkeypatch):
    fake_models(monkeypatch, cached_model_dir=lambda spec, revision=None: None)
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", good(12)))
    assert report.valid
    assert [i.code for i in report.issues] == ["token-check-skipped"]
    assert "--model" in report.issues[0].message and report.token_check["model"] is None

    def broken(spec, revision=None):
        raise RuntimeError("cache index corrupt")

    fake_models(monkeypatch, cached_model_dir=broken)
    issues = validate_dataset(tmp_path / "d.jsonl").issues
    assert [i.code for i in issues] == ["token-check-skipped"] and "cache index corrupt" in issues[0].message


def test_policy_model_is_used_when_cached(tmp_path, monkeypatch, tokenizer_dir):
    seen = []

    def cached(spec, revision=None):
        seen.append((spec, revision))
        return tokenizer_dir

    fake_models(monkeypatch, cached_model_dir=cached)
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", good(12)))
    assert report.issues == [] and seen == [("smollm2-135m-instruct", None)]
    assert report.token_check["model"] == "smollm2-135m-instruct"


def test_policy_model_may_be_a_local_directory(tmp_path, tokenizer_dir):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: '1'\ninclude: default\nmodel: {{name: {json.dumps(str(tokenizer_dir))}}}\n")
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", good(12)), config=policy)
    assert report.issues == [] and report.token_check["model"] == str(tokenizer_dir)


def test_explicit_model_spec_goes_through_modelspec(tmp_path, monkeypatch, tokenizer_dir):
    data = write_jsonl(tmp_path / "d.jsonl", good(12))
    calls = []

    def resolve(spec, revision=None, *, materialize=True):
        calls.append((spec, materialize))
        return tokenizer_dir

    fake_models(monkeypatch, resolve_model_dir=resolve)
    assert validate_dataset(data, model="some-org/some-model").issues == []
    assert calls == [("some-org/some-model", False)]  # never converts (imports torch) inside validate

    def unknown(spec, revision=None, *, materialize=True):
        raise ModelError(f"Unknown model {spec!r}. Did you mean 'smollm2-135m-instruct'?")

    fake_models(monkeypatch, resolve_model_dir=unknown)
    with pytest.raises(ModelError, match="Did you mean"):
        validate_dataset(data, model="smolm2")


# ---------------------------------------------------------------- report and records


def test_report_fields_round_trip_and_hash(tmp_path):
    records = [*good(11), good(1)[0], b"", {"prompt": "p", "completion": "c"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    report = validate_dataset(path, config=load_policy("default"), model=None)
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (report.format, report.n_records, report.n_lines, report.valid) == ("chat", 12, 14, False)
    assert codes(report) == {"duplicate": 1, "blank-line": 1, "mixed-format": 1}
    assert report.n_errors == 1 and report.dropped_lines == []
    assert report.policy["name"] == "default"
    out = report.write(tmp_path / "run" / "validation.json")
    again = ValidationReport.read(out)
    assert again.to_dict() == report.to_dict()
    assert json.loads(out.read_text())["counts"]["duplicate"] == 1
    with pytest.raises(DatasetError, match="Re-run"):
        ValidationReport.read(tmp_path / "d.jsonl")


@pytest.mark.parametrize("severity, valid, n_records", [("error", False, 12), ("warning", True, 13),
                                                        ("ignore", True, 13)])
def test_duplicate_severity_follows_policy(severity, valid, n_records, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: '1'\ninclude: default\ndataset: {{duplicates: {severity}}}\n")
    records = good(12)
    # Same example with other key order and spacing: still an exact duplicate.
    records.append(b'{"messages":[{"content":"Question 4?","role":"user"},  '
                   b'{"role":"assistant","content":"Answer 4."}]}')
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", records), config=policy)
    assert (report.valid, report.n_records) == (valid, n_records)
    duplicates = [i for i in report.issues if i.code == "duplicate"]
    assert [(i.line, i.severity) for i in duplicates] == ([] if severity == "ignore" else [(13, severity)])
    assert all("line 5" in i.message for i in duplicates)


def test_issues_are_capped_per_code_but_counted_exactly(tmp_path):
    n_bad = MAX_ISSUES_PER_CODE + 200
    records = [*good(10), *[b"{broken"] * n_bad, *[b"[]"] * 3]
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", records))
    assert report.counts_by_code["invalid-json"] == n_bad and report.n_errors == n_bad + 3
    assert sum(i.code == "invalid-json" for i in report.issues) == MAX_ISSUES_PER_CODE
    assert sum(i.code == "not-an-object" for i in report.issues) == 3
    small = validate_dataset(tmp_path / "d.jsonl", max_issues_per_code=2)
    assert sum(i.code == "invalid-json" for i in small.issues) == 2
    assert small.to_dict()["counts"]["invalid-json"] == n_bad


def test_iter_records_yields_messages_for_training(tmp_path):
    prompt = [{"prompt": f"P{i}", "completion": f"C{i}"} for i in range(10)]
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in prompt) + b"\r\n\r\n")
    report = validate_dataset(path)
    assert report.valid and report.format == "prompt_completion"
    rows = list(iter_records(path, sha256=report.sha256))
    assert [line for line, _ in rows] == list(range(1, 11))
    assert rows[0][1] == [{"role": "user", "content": "P0"}, {"role": "assistant", "content": "C0"}]

    assert [line for line, _ in iter_records(path, skip_lines=[2, 3])] == [1, *range(4, 11)]
    chat_path = write_jsonl(tmp_path / "c.jsonl", good(10))
    assert list(iter_records(chat_path))[3] == (4, good(10)[3]["messages"])


def test_iter_records_refuses_invalid_or_changed_files(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [*good(10), {"messages": []}])
    with pytest.raises(DatasetError, match="line 11"):
        list(iter_records(path))
    write_jsonl(path, good(10))
    report = validate_dataset(path)
    write_jsonl(path, good(10, start=1))
    with pytest.raises(DatasetError, match="changed since it was validated"):
        list(iter_records(path, sha256=report.sha256))


def test_unreadable_paths_raise_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="Cannot read"):
        validate_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="not a regular file"):
        validate_dataset(tmp_path)


# ---------------------------------------------------------------- streaming


def test_fifty_megabytes_stream_in_flat_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    filler = "The customer asked about an invoice and the agent explained the charge. " * 70
    with path.open("w", encoding="utf-8") as handle:
        for i in range(10_000):
            handle.write(json.dumps(chat(("user", f"{i}: {filler}"), ("assistant", f"Reply {i}."))) + "\n")
    assert path.stat().st_size > 50 * 10**6
    tracemalloc.start()
    try:
        report = validate_dataset(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.valid and report.n_records == 10_000
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_oversized_line_is_skipped_without_holding_it(tmp_path):
    path = tmp_path / "d.jsonl"
    with path.open("wb") as handle:
        for record in good(5):
            handle.write(json.dumps(record).encode() + b"\n")
        handle.write(b'{"messages": [{"role": "user", "content": "' + b"x" * 20 * 2**20 + b'"}]}\n')
        for record in good(5, start=5):
            handle.write(json.dumps(record).encode() + b"\n")
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: '1'\ninclude: default\ndataset: {{max_line_bytes: {2**20}}}\n")
    tracemalloc.start()
    try:
        report = validate_dataset(path, config=policy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(i.code, i.line) for i in report.issues if i.severity == "error"] == [("line-too-large", 6)]
    assert report.n_records == 10 and report.n_lines == 11
    assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_five_megabyte_line_is_fine(tmp_path):
    big = chat(("user", "Summarize this."), ("assistant", "Lorem ipsum. " * 400_000))
    path = write_jsonl(tmp_path / "d.jsonl", [big, *good(10)])
    assert path.stat().st_size > 5 * 10**6
    report = validate_dataset(path)
    assert report.valid and report.n_records == 11 and codes(report) == {}


def test_line_of_exactly_max_line_bytes_is_accepted(tmp_path):
    record = json.dumps(chat(("user", "u"), ("assistant", "a" * 100))).encode()
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: '1'\ninclude: default\ndataset: {{max_line_bytes: {len(record)}}}\n")
    path = write_jsonl(tmp_path / "d.jsonl", [record, *good(10)], end=b"\r\n")
    assert validate_dataset(path, config=policy).valid
    policy.write_text(f"version: '1'\ninclude: default\ndataset: {{max_line_bytes: {len(record) - 1}}}\n")
    report = validate_dataset(path, config=policy)
    assert [(i.code, i.line) for i in report.issues if i.severity == "error"] == [("line-too-large", 1)]


def test_progress_bar_goes_to_stderr_only_when_asked(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", good(12))
    validate_dataset(path)  # auto: small file, not a TTY -> no bar
    assert capsys.readouterr().err == ""
    validate_dataset(path, progress=True)
    captured = capsys.readouterr()
    assert "validate" in captured.err and captured.out == ""


# ---------------------------------------------------------------- schemas


@pytest.mark.parametrize("fmt", sorted(SCHEMAS))
def test_shipped_dataset_schemas_are_valid_json_schemas(fmt):
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(validator(SCHEMAS[fmt]).schema)


# (record, JSON Schema accepts it, fast path accepts it). The fast path may only be stricter (weight 1.0).
SHAPES = [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, True, True),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}, True, True),
    ({"messages": [{"role": "assistant", "content": "b", "weight": 1.0}]}, True, False),
    ({"messages": [{"role": "assistant", "content": "b", "weight": True}]}, False, False),
    ({"messages": [{"role": "assistant", "content": "b", "weight": None}]}, False, False),
    ({"messages": [{"role": "robot", "content": "b"}]}, False, False),
    ({"messages": [{"role": ["user"], "content": "b"}]}, False, False),
    ({"messages": [{"role": "user", "content": None}]}, False, False),
    ({"messages": [{"role": "user"}]}, False, False),
    ({"messages": [{"content": "x"}]}, False, False),
    ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, True, False),  # OpenAI's name: via the schema
    ({"messages": [{"role": "user", "content": "x", "name": 3}]}, False, False),
    ({"messages": [{"role": "developer", "content": "x"}]}, True, False),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, True, False),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, False, False),
    ({"messages": [{"role": "tool", "content": "x"}]}, False, False),
    ({"messages": ["x"]}, False, False),
    ({"messages": []}, False, False),
    ({"messages": {}}, False, False),
    ({"messages": [], "extra": 1}, False, False),
    ({"prompt": "p", "completion": "c"}, True, True),
    ({"prompt": "p"}, False, False),
    ({"prompt": "p", "completion": 1}, False, False),
    ({"prompt": "p", "completion": "c", "x": None}, False, False),
    ({"prompt": ["p"], "completion": "c"}, False, False),
    ({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]}, True, False),
]


@pytest.mark.parametrize("record, schema_ok, fast_ok", SHAPES, ids=range(len(SHAPES)))
def test_fast_schema_check_never_accepts_what_the_schema_rejects(record, schema_ok, fast_ok):
    fmt = "chat" if "messages" in record else "prompt_completion"
    assert validator(SCHEMAS[fmt]).is_valid(record) is schema_ok
    assert _plainly_valid(fmt, record) is fast_ok
