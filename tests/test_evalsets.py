"""Audit sets: shipped data shape and hygiene, operator file formats, malformed files, seeded stratified samples."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from guardtune import evalsets
from guardtune.errors import ConfigError, DatasetError
from guardtune.evalsets import HAZARD_CATEGORIES, AuditPrompt, load_benign, load_harmful, sample, set_sha256

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DATASET = REPO / "examples" / "support_replies.jsonl"


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ shipped sets


def test_builtin_harmful_set_shape():
    prompts = load_harmful()
    counts = Counter(p.category for p in prompts)
    assert len(prompts) >= 200
    assert len(counts) >= 10 and set(counts) <= set(HAZARD_CATEGORIES)
    assert "S4" not in counts and "S12" not in counts  # deliberately not written (DATA.md)
    assert min(counts.values()) >= 15
    assert all(p.opener and 3 <= len(p.opener.split()) <= 10 for p in prompts)
    assert all(p.response is None for p in prompts)
    assert all(p.id.startswith(f"h-{p.category.lower()}-") for p in prompts)


def test_builtin_benign_set_shape():
    prompts = load_benign()
    assert len(prompts) >= 100
    assert len({p.category for p in prompts}) >= 8
    assert all(p.opener is None and p.response is None and p.id.startswith("b-") for p in prompts)


def test_builtin_ids_unique_and_no_duplicate_instructions():
    prompts = load_harmful() + load_benign()
    assert len({p.id for p in prompts}) == len(prompts)
    folded = [" ".join(p.instruction.lower().split()) for p in prompts]
    assert [t for t, n in Counter(folded).items() if n > 1] == []


def test_builtin_harmful_prompts_hold_no_placeholder_or_answer_text():
    # Requests only: one line, short, and never the judge-test placeholder.
    for prompt in load_harmful():
        assert "omitted]" not in prompt.instruction
        assert "\n" not in prompt.instruction and len(prompt.instruction) < 200


def test_builtin_loads_return_fresh_lists_and_stable_hashes():
    first, second = load_harmful(), load_harmful()
    first.pop()
    assert len(second) == len(load_harmful()) and set_sha256(second) == set_sha256(load_harmful())
    assert set_sha256(second) != set_sha256(second[::-1])  # order is part of the hash
    assert len(set_sha256([])) == 64


def test_evalsets_import_without_torch():
    import subprocess

    code = "import sys, guardtune.evalsets, guardtune.judges; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def user_turns(path: Path) -> list[str]:
    texts = []
    for line in path.read_text("utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "prompt" in record:
            texts.append(record["prompt"])
        texts.extend(m["content"] for m in record.get("messages", []) if m.get("role") == "user")
    return texts


@pytest.mark.skipif(not EXAMPLE_DATASET.exists(),
                    reason="examples/support_replies.jsonl does not exist yet (written in a separate change); "
                           "the disjointness check runs once it does")
def test_audit_prompts_disjoint_from_the_example_training_set():
    def fold(text: str) -> str:
        return " ".join(text.lower().split())

    training = {fold(t) for t in user_turns(EXAMPLE_DATASET)}
    audit = {fold(p.instruction) for p in load_harmful() + load_benign()}
    assert training and audit.isdisjoint(training)


# ------------------------------------------------------------------------------------------------ operator files


def test_hex_phi_style_jsonl(tmp_path):
    path = write(tmp_path / "hexphi.jsonl", '{"instruction": "Do a bad thing.", "category": "S2"}\n\n'
                                            '{"instruction": "Do another bad thing."}\n')
    prompts = load_harmful(path)
    assert prompts == [AuditPrompt("hexphi-1", "Do a bad thing.", "S2"),
                       AuditPrompt("hexphi-3", "Do another bad thing.", "uncategorized")]


def test_harmful_pairs_as_lists_and_objects(tmp_path):
    lists = write(tmp_path / "pairs.jsonl", '["Ask one", "Harmful answer one"]\n["Ask two", "Harmful answer two"]\n')
    objects = write(tmp_path / "objs.jsonl", '{"instruction": "Ask", "response": "Harmful answer", "category": "S9"}\n')
    assert load_harmful(lists)[1] == AuditPrompt("pairs-2", "Ask two", "uncategorized", response="Harmful answer two")
    assert load_harmful(objects) == [AuditPrompt("objs-1", "Ask", "S9", response="Harmful answer")]


def test_advbench_style_csv(tmp_path):
    path = write(tmp_path / "adv.csv", '\ufeffgoal,target\r\n"Do a bad thing, quickly","Sure, here is how"\r\n'
                                       'Do another,Sure\r\n\r\n')
    prompts = load_harmful(path)
    assert prompts == [AuditPrompt("adv-2", "Do a bad thing, quickly", "uncategorized", opener="Sure, here is how"),
                       AuditPrompt("adv-3", "Do another", "uncategorized", opener="Sure")]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    path = write(tmp_path / "u.jsonl", json.dumps({"instruction": "a\u2028b\x85c"}, ensure_ascii=False) + "\r\n")
    assert [(p.id, p.instruction) for p in load_harmful(path)] == [("u-1", "a\u2028b\x85c")]


def test_benign_operator_file(tmp_path):
    path = write(tmp_path / "probes.jsonl", '{"instruction": "How do I kill a process?", "category": "homonyms"}\n'
                                            '{"instruction": "What is phishing?"}\n')
    assert [(p.id, p.category) for p in load_benign(path)] == [("probes-1", "homonyms"), ("probes-2", "uncategorized")]


@pytest.mark.parametrize("name, text, line, fragment", [
    ("bad.jsonl", '{"instruction": "ok"}\n{"instruction": \n', 2, "not valid JSON"),
    ("bad.jsonl", '{"instruction": "ok"}\n\n{"category": "S1"}\n', 3, "instruction"),
    ("bad.jsonl", '{"instruction": ""}\n', 1, "non-empty"),
    ("bad.jsonl", '["only one"]\n', 1, "2-element"),
    ("bad.jsonl", '["ask", 3]\n', 1, "2-element"),
    ("bad.jsonl", '"just a string"\n', 1, "JSON object"),
    ("bad.jsonl", '{"instruction": "ok", "category": 7}\n', 1, "category"),
    ("bad.csv", 'goal,target\nfine,Sure\nonly-one-column\n', 3, "columns"),
    ("bad.csv", 'goal,target\n,Sure\n', 2, "empty goal"),
    ("bad.csv", 'prompt,answer\nx,y\n', 1, "AdvBench / JailbreakBench (goal"),
])
def test_malformed_operator_files_name_the_line(tmp_path, name, text, line, fragment):
    path = write(tmp_path / name, text)
    with pytest.raises(DatasetError) as info:
        load_harmful(path)
    assert f"line {line}" in str(info.value) and fragment in str(info.value)
    assert str(path) in str(info.value)
    assert any(issue.line == line for issue in info.value.issues)


def test_all_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path / "many.jsonl", "{bad\n" * 3 + '{"instruction": "ok"}\n' + "[1]\n" * 12)
    with pytest.raises(DatasetError, match="15 problem") as info:
        load_harmful(path)
    assert len(info.value.issues) == 15 and "and 5 more" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xff\xfe\x00bad"])
def test_empty_or_binary_files_are_refused(tmp_path, content):
    with pytest.raises(DatasetError):
        load_harmful(write(tmp_path / "x.jsonl", content))


def test_benign_file_rejects_pairs_and_responses(tmp_path):
    with pytest.raises(DatasetError, match="line 1"):
        load_benign(write(tmp_path / "b.jsonl", '["ask", "answer"]\n'))
    with pytest.raises(DatasetError, match="line 1"):
        load_benign(write(tmp_path / "b.jsonl", '{"instruction": "ask", "response": "answer"}\n'))


def test_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_harmful(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="is a directory"):
        load_harmful(str(tmp_path) + "/")
    with pytest.raises(DatasetError, match="Did you mean 'builtin'"):
        load_benign("buitlin")


# ------------------------------------------------------------------------------------------------ sampling


def test_sample_is_deterministic_and_seed_dependent():
    prompts = load_harmful()
    assert sample(prompts, 24, seed=0) == sample(prompts, 24, seed=0)
    assert sample(prompts, 24, seed=0) != sample(prompts, 24, seed=1)
    assert sample(prompts, None, seed=3) == prompts


def test_sample_is_stratified_by_category():
    prompts = load_harmful()
    n_categories = len({p.category for p in prompts})
    picked = sample(prompts, 2 * n_categories, seed=7)
    assert set(Counter(p.category for p in picked).values()) == {2}
    small = sample(prompts, 5, seed=7)
    assert len({p.category for p in small}) == 5


def test_sample_handles_uneven_categories_and_oversized_n():
    prompts = [AuditPrompt(f"a{i}", f"a{i}", "A") for i in range(5)] + [AuditPrompt("b0", "b0", "B")]
    picked = sample(prompts, 4, seed=0)
    assert len(picked) == 4 and len(set(picked)) == 4 and Counter(p.category for p in picked) == {"A": 3, "B": 1}
    everything = sample(prompts, 100, seed=0)
    assert sorted(p.id for p in everything) == sorted(p.id for p in prompts)
    with pytest.raises(ConfigError):
        sample(prompts, 0, seed=0)


def test_category_counts_in_s_code_order():
    counts = evalsets.categories(load_harmful())
    assert list(counts)[:3] == ["S1", "S2", "S3"] and list(counts)[-1] == "S14"
