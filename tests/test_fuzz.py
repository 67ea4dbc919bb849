"""Fuzz targets for the two parsers of untrusted input, `validate` and the policy loader: whatever bytes come in,
the answer is a report or a PolicyError with a message, never a traceback, in bounded time. A bounded number of
examples (derandomized, so CI is reproducible); raise FUZZ_EXAMPLES locally for a longer run."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardtune.dataset import validate_dataset
from guardtune.errors import PolicyError
from guardtune.policy import load_policy

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
record_like = st.fixed_dictionaries({}, optional={
    "messages": st.lists(st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["system", "user", "assistant", "tool", ""]) | st.integers(),
        "content": st.text(max_size=30) | json_values, "weight": st.sampled_from([0, 1, 2, 1.0, "1", None])}),
        max_size=4),
    "prompt": st.text(max_size=30) | json_values, "completion": st.text(max_size=30) | json_values,
    "extra": json_values})
lines = st.lists(st.one_of(record_like.map(lambda r: json.dumps(r).encode()), st.binary(max_size=60),
                           st.text(max_size=60).map(str.encode)), max_size=6)


@FUZZ
@given(lines=lines)
def test_validate_answers_any_file_with_a_report(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = validate_dataset(path, config="default")
    assert report.n_lines >= 0
    assert all(issue.code and issue.message for issue in report.issues)


policy_texts = st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(["version", "include", "training", "gate", "audit", "dataset", "model", "x"]),
                    json_values, max_size=5).map(lambda d: yaml.safe_dump(d, default_flow_style=True)),
    st.builds(lambda extra: 'version: "1"\ninclude: default\n' + yaml.safe_dump(extra),
              st.dictionaries(st.sampled_from(["training", "gate", "audit"]), json_values, max_size=2)),
)


@FUZZ
@given(text=policy_texts)
def test_the_policy_loader_answers_any_text_with_a_policy_or_a_policy_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates too: bytes the loader must refuse
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        assert str(exc)
    else:
        assert policy.version


@pytest.mark.parametrize("text", ["version: !!python/object/apply:os.system ['true']\n", "? [a]\n: b\n", "\t\n"])
def test_policy_loader_edge_cases(tmp_path, text):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(PolicyError):
        load_policy(tmp_path / "p.yaml")
