"""Factual utility probe: shipped data shape and hygiene (offline, no torch)."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.resources import files

import pytest

ALLOWED_CATEGORIES = {"geography", "science", "math", "language", "everyday", "history"}
MIN_RECORDS = 60
MIN_PER_CATEGORY = 8
# Aliases this common would match almost any response.
TOO_COMMON = {"a", "an", "the", "yes", "no", "it", "is", "of", "and", "or", "in", "to"}


def _records() -> list[dict]:
    text = files("guardtune.data").joinpath("factual_probe.jsonl").read_text(encoding="utf-8")
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        assert isinstance(obj, dict), f"line {lineno}: not a JSON object"
        records.append(obj)
    return records


RECORDS = _records()


def _contains_word(text: str, phrase: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(phrase.lower()) + r"(?!\w)", text.lower()) is not None


def test_record_count() -> None:
    assert len(RECORDS) >= MIN_RECORDS


def test_fields() -> None:
    for r in RECORDS:
        assert set(r) == {"id", "category", "question", "answers"}, r
        assert re.fullmatch(r"f-\d{3}", r["id"]), r["id"]
        assert isinstance(r["question"], str) and r["question"].strip() == r["question"] and r["question"], r
        assert r["question"].endswith("?"), r["id"]


def test_unique_ids_and_questions() -> None:
    ids = Counter(r["id"] for r in RECORDS)
    assert [i for i, n in ids.items() if n > 1] == []
    questions = Counter(" ".join(r["question"].lower().split()) for r in RECORDS)
    assert [q for q, n in questions.items() if n > 1] == []


def test_categories() -> None:
    counts = Counter(r["category"] for r in RECORDS)
    assert set(counts) <= ALLOWED_CATEGORIES, set(counts) - ALLOWED_CATEGORIES
    for cat in ALLOWED_CATEGORIES:
        assert counts[cat] >= MIN_PER_CATEGORY, (cat, counts[cat])


def test_answers_are_nonempty_string_lists() -> None:
    for r in RECORDS:
        answers = r["answers"]
        assert isinstance(answers, list) and answers, r["id"]
        for alias in answers:
            assert isinstance(alias, str) and alias.strip(), (r["id"], alias)
            assert alias == alias.strip(), (r["id"], alias)
            assert alias.lower() not in TOO_COMMON, (r["id"], alias)
        assert len({a.lower() for a in answers}) == len(answers), f"{r['id']}: duplicate alias"


@pytest.mark.parametrize("record", RECORDS, ids=[r["id"] for r in RECORDS])
def test_no_alias_in_own_question(record: dict) -> None:
    leaked = [a for a in record["answers"] if _contains_word(record["question"], a)]
    assert leaked == [], f"{record['id']}: answer alias {leaked} appears in the question"


def test_whole_word_helper() -> None:
    assert _contains_word("What is 2 plus 2?", "2")
    assert not _contains_word("What is 12 plus 15?", "2")
    assert not _contains_word("Which continent is the coldest?", "cold")
    assert _contains_word("The answer is New York City.", "new york")
