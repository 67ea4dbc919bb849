"""Shipped alignment data (guardtune/data/align_*.jsonl): shape, hygiene, and disjointness from the audit sets.

`guardtune align` trains on these files; the audit measures on harmful.jsonl and benign.jsonl. A training prompt
that is a near-duplicate of an audit prompt would make the audit measure memory instead of safety, so every pair
of sets is checked with evalsets.near_duplicates at its default thresholds. Offline, no torch.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from importlib import resources

import pytest

from guardtune.evalsets import HAZARD_CATEGORIES, near_duplicates
from guardtune.judges import is_refusal

HARMFUL_CATEGORIES = frozenset(HAZARD_CATEGORIES) - {"S4", "S12"}  # S4 and S12 deliberately not written (DATA.md)
ORDINARY = frozenset({"coding", "writing", "math", "science", "cooking", "travel", "health_general", "business",
                      "language", "everyday", "trivia", "formatted_tasks", "customer_requests"})
LOOK_ALIKE = frozenset({"homonyms", "safe_targets", "safe_contexts", "figurative", "privacy_ok", "medical_ok"})
FIELDS = {
    "align_harmful.jsonl": {"id", "category", "instruction", "opener"},
    "align_refusals.jsonl": {"id", "text"},
    "align_benign.jsonl": {"id", "category", "instruction"},
}


@lru_cache(maxsize=None)
def records(name: str) -> tuple[dict, ...]:
    text = resources.files("guardtune.data").joinpath(name).read_text("utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


@lru_cache(maxsize=None)
def texts(name: str) -> tuple[str, ...]:
    field = "text" if name == "align_refusals.jsonl" else "instruction"
    return tuple(r[field] for r in records(name))


def words(text: str) -> int:
    return len(text.split())


# ------------------------------------------------------------------------------------------------ shape


@pytest.mark.parametrize("name, minimum, id_prefix", [
    ("align_harmful.jsonl", 456, "a-"),
    ("align_refusals.jsonl", 48, "r-"),
    ("align_benign.jsonl", 573, "ab-"),
])
def test_counts_fields_and_unique_ids(name, minimum, id_prefix):
    rows = records(name)
    assert len(rows) >= minimum
    assert all(set(r) == FIELDS[name] for r in rows)
    assert all(isinstance(v, str) and v.strip() == v and v for r in rows for v in r.values())
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(id_prefix) for i in ids)
    folded = [" ".join(t.lower().split()) for t in texts(name)]
    assert [t for t, n in Counter(folded).items() if n > 1] == []


def test_harmful_categories_and_ids():
    rows = records("align_harmful.jsonl")
    counts = Counter(r["category"] for r in rows)
    assert set(counts) == HARMFUL_CATEGORIES
    assert min(counts.values()) >= 38
    assert all(r["id"].startswith(f"a-{r['category'].lower()}-") for r in rows)


def test_harmful_instructions_and_openers_are_short_requests():
    for r in records("align_harmful.jsonl"):
        assert 5 <= words(r["instruction"]) <= 45, r["id"]
        assert 3 <= words(r["opener"]) <= 12, r["id"]
        assert "\n" not in r["instruction"] and "omitted]" not in r["instruction"], r["id"]
        assert not is_refusal(r["opener"]), r["id"]  # an opener starts compliance, it must not read as a refusal


def test_refusals_pass_the_keyword_judge_and_vary():
    rows = records("align_refusals.jsonl")
    for r in rows:
        assert is_refusal(r["text"]), r["id"]
        assert 12 <= words(r["text"]) <= 45, r["id"]
    openings = Counter(" ".join(r["text"].lower().split()[:2]) for r in rows)
    assert max(openings.values()) <= 0.15 * len(rows), openings.most_common(3)


def test_benign_categories_and_look_alike_share():
    rows = records("align_benign.jsonl")
    counts = Counter(r["category"] for r in rows)
    assert set(counts) <= ORDINARY | LOOK_ALIKE
    assert sum(n for c, n in counts.items() if c in LOOK_ALIKE) >= 208
    assert sum(n for c, n in counts.items() if c in ORDINARY) >= 180
    assert all(words(r["instruction"]) >= 3 for r in rows)


# ------------------------------------------------------------------------------------------------ disjointness


@pytest.mark.parametrize("name, references", [
    ("align_harmful.jsonl", ("harmful.jsonl",)),                               # trained harmful vs audited harmful
    ("align_benign.jsonl", ("benign.jsonl",)),                                 # utility anchors vs over-refusal probes
    ("align_benign.jsonl", ("harmful.jsonl", "align_harmful.jsonl")),          # no anchor looks like a harmful prompt
    ("align_harmful.jsonl", ("benign.jsonl",)),
])
def test_disjoint_from(name, references):
    refs = [t for ref in references for t in texts(ref)]
    found = near_duplicates(texts(name), refs)
    assert [(texts(name)[i], refs[j], why) for i, j, why in found] == []


@pytest.mark.parametrize("name", ["align_harmful.jsonl", "align_benign.jsonl", "align_refusals.jsonl"])
def test_no_near_duplicates_within(name):
    items = texts(name)
    found = [(items[i], items[j], why) for i, j, why in near_duplicates(items, items) if i != j]
    assert found == []
