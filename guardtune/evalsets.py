"""Audit prompt sets: the shipped harmful/benign prompts and operator files, seeded stratified samples, set hashes."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import ConfigError, DatasetError, Issue, did_you_mean
from .provenance import sha256_json

# MLCommons hazard taxonomy as used by Llama Guard 3. The shipped set has no S4 or S12 prompts (DATA.md).
HAZARD_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
UNCATEGORIZED = "uncategorized"
BUILTIN = "builtin"
MAX_REPORTED_ISSUES = 10
HARMFUL_FORMATS = ("{instruction[, category][, opener]} JSONL (HEx-PHI style), harmful pairs JSONL as "
                   "[user, assistant] lists or {instruction, response} objects, SORRY-Bench question JSONL "
                   "({question_id, category, turns}), or a benchmark's own CSV: AdvBench / JailbreakBench (goal[, "
                   "target, category]), HarmBench behaviours (Behavior, BehaviorID, SemanticCategory, "
                   "ContextString), StrongREJECT (forbidden_prompt, category), XSTest (prompt, type, label: its "
                   "unsafe rows)")
BENIGN_FORMATS = "{instruction[, category]} JSONL, or XSTest's CSV (prompt, type, label: its safe rows)"


@dataclass(frozen=True)
class AuditPrompt:
    """One audit prompt. `opener` is a short compliant start; `response` an operator-supplied harmful answer."""

    id: str
    instruction: str
    category: str
    opener: str | None = None
    response: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_harmful(spec: str | Path = BUILTIN, builtin: str = "harmful.jsonl") -> list[AuditPrompt]:
    """The shipped harmful set (`builtin` names which: the audit's, or align_harmful.jsonl / attack_harmful.jsonl),
    or an operator file in any of HARMFUL_FORMATS (ids "<stem>-<line>")."""
    if str(spec) == BUILTIN:
        return list(_builtin(builtin, "harmful"))
    path = _resolve(spec, "harmful")
    if path.suffix.lower() == ".csv":
        return _read_csv(path, "harmful")
    return _read_jsonl(path, kind="harmful")


def load_benign(spec: str | Path = BUILTIN, builtin: str = "benign.jsonl") -> list[AuditPrompt]:
    """The shipped over-refusal probes (or another shipped benign set, e.g. align_benign.jsonl), or an operator
    `{instruction[, category]}` JSONL file."""
    if str(spec) == BUILTIN:
        return list(_builtin(builtin, "benign"))
    path = _resolve(spec, "benign")
    if path.suffix.lower() == ".csv":
        return _read_csv(path, "benign")
    return _read_jsonl(path, kind="benign")


@dataclass(frozen=True)
class FactualQuestion:
    """One utility probe question with every accepted short answer (aliases)."""

    id: str
    question: str
    answers: tuple[str, ...]
    category: str = UNCATEGORIZED

    @property
    def instruction(self) -> str:  # so generation and sampling treat it like any other prompt
        return self.question

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "answers": list(self.answers), "category": self.category}


def load_factual(spec: str | Path = BUILTIN) -> list[FactualQuestion]:
    """The shipped factual utility probe (factual_probe.jsonl) or an operator JSONL of
    {"question": ..., "answers": [...][, "category": ...]}: does the model still know what it knew?"""
    if str(spec) == BUILTIN:
        text, source, stem = resources.files("guardtune.data").joinpath("factual_probe.jsonl").read_text("utf-8"), \
            "builtin factual_probe.jsonl", None
    else:
        path = _resolve(spec, "utility")
        text, source, stem = _read_text(path), str(path), path.stem
    questions, issues = [], []
    for number, record, error in _jsonl_lines(text):
        if error is not None:
            issues.append(Issue(code="evalset-json", line=number, message=f"not valid JSON: {error.msg}"))
            continue
        answers = record.get("answers") if isinstance(record, dict) else None
        question = record.get("question") if isinstance(record, dict) else None
        question_ok = isinstance(question, str) and question.strip()
        answers_ok = isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)
        if not (question_ok and answers_ok):
            issues.append(Issue(code="evalset-record", line=number,
                                message='expected {"question": "...", "answers": ["...", ...]}'))
            continue
        questions.append(FactualQuestion(id=str(record.get("id", f"{stem}-{number}")) if stem is None else
                                         f"{stem}-{number}", question=record["question"],
                                         answers=tuple(answers), category=str(record.get("category", UNCATEGORIZED))))
    if not questions and not issues:
        issues.append(Issue(code="evalset-empty", message="the file holds no questions"))
    if issues:
        shown = "\n".join(f"  - {issue}" for issue in issues[:MAX_REPORTED_ISSUES])
        raise DatasetError(f"{source}: {len(issues)} problem(s) in the utility probe:\n{shown}\nFix these lines; "
                           f'format: one {{"question": "...", "answers": ["...", ...]}} object a line.', issues)
    return questions


def _fold_answer(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", normalise(text)))


def is_correct(response: str, answers: Sequence[str]) -> bool:
    """A response answers correctly when it contains an accepted answer as a whole word or phrase (case,
    punctuation and spacing folded): "The capital is Paris." matches "Paris", "Parisian" does not."""
    folded = f" {_fold_answer(response)} "
    return any(f" {_fold_answer(a)} " in folded for a in answers if _fold_answer(a))


def sample(prompts: Sequence[AuditPrompt], n: int | None, seed: int = 0) -> list[AuditPrompt]:
    """A deterministic sample of n prompts, stratified by category; n=None (or n >= len) keeps every prompt.

    Each category is shuffled with the seed, the category order too, then prompts are taken round-robin
    one per category, so a 24-prompt sample of 12 categories holds two of each.
    """
    if n is None:
        return list(prompts)
    if n < 1:
        raise ConfigError(f"Sample size must be at least 1 (got {n}); use null/None to audit every prompt.")
    rng = random.Random(seed)
    groups: dict[str, list[AuditPrompt]] = {}
    for prompt in prompts:
        groups.setdefault(prompt.category, []).append(prompt)
    order = sorted(groups)
    rng.shuffle(order)
    for category in order:
        rng.shuffle(groups[category])
    picked: list[AuditPrompt] = []
    depth = 0
    while len(picked) < min(n, len(prompts)):
        for category in order:
            if depth < len(groups[category]) and len(picked) < n:
                picked.append(groups[category][depth])
        depth += 1
    return picked


def set_sha256(prompts: Iterable[AuditPrompt]) -> str:
    """sha256 of the canonical JSON of the prompt list (order matters), recorded in every report."""
    return sha256_json([p.to_dict() for p in prompts])


_STOPWORDS = frozenset(
    "a an the of to for and or in on at by with from into about how what which who whom whose why when where "
    "is are was were be been being do does did can could would should will shall may might must i me my you your "
    "it its this that these those some any all me us our we they them their he she his her him please".split())


def _content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9]+", normalise(text)) if w not in _STOPWORDS)


def near_duplicates(texts: Sequence[str], references: Sequence[str], *, ratio: float = 0.8,
                    jaccard: float = 0.6) -> list[tuple[int, int, str]]:
    """Pairs (i, j, why) where texts[i] is a near-duplicate of references[j]: the same after normalisation,
    a character similarity (difflib ratio) of at least `ratio`, or content-word Jaccard of at least `jaccard`.

    Guards the audit against contamination: a prompt trained on (alignment, attacks, a customer's data) and then
    audited measures memory, not safety. Quadratic in the set sizes; fine for thousands of short prompts.
    """
    from difflib import SequenceMatcher

    folded = [normalise(t) for t in references]
    words = [_content_words(t) for t in references]
    found = []
    for i, text in enumerate(texts):
        a, a_words = normalise(text), _content_words(text)
        matcher = SequenceMatcher(None, autojunk=False)
        matcher.set_seq2(a)  # difflib caches its index of seq2: the fixed side
        for j, (b, b_words) in enumerate(zip(folded, words)):
            if a == b:
                found.append((i, j, "identical after normalisation"))
                continue
            union = a_words | b_words
            if union and len(a_words & b_words) / len(union) >= jaccard:
                found.append((i, j, f"content-word Jaccard {len(a_words & b_words) / len(union):.2f}"))
                continue
            matcher.set_seq1(b)
            if matcher.real_quick_ratio() >= ratio and matcher.quick_ratio() >= ratio and matcher.ratio() >= ratio:
                found.append((i, j, f"character similarity {matcher.ratio():.2f}"))
    return found


def categories(prompts: Iterable[AuditPrompt]) -> dict[str, int]:
    """Category -> prompt count, in S-code order then alphabetical."""
    counts: dict[str, int] = {}
    for prompt in prompts:
        counts[prompt.category] = counts.get(prompt.category, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: _category_key(kv[0])))


def _category_key(code: str) -> tuple[int, int, str]:
    if code.startswith("S") and code[1:].isdigit():
        return (0, int(code[1:]), code)
    return (1, 0, code)


@lru_cache(maxsize=None)
def _builtin(name: str, kind: str) -> tuple[AuditPrompt, ...]:
    text = resources.files("guardtune.data").joinpath(name).read_text("utf-8")
    return tuple(_parse_jsonl(text, source=f"builtin {name}", stem="", kind=kind, ids_from_file=True))


def _resolve(spec: str | Path, kind: str) -> Path:
    path = Path(str(spec)).expanduser()
    if path.is_file():
        return path
    text = str(spec)
    looks_like_path = path.suffix != "" or "/" in text or "\\" in text
    if not looks_like_path:
        raise DatasetError(f"Unknown {kind} set {text!r}.{did_you_mean(text, [BUILTIN])} Pass 'builtin' or a "
                           f"path to a file.")
    what = "is a directory, not a file" if path.is_dir() else "does not exist"
    raise DatasetError(f"The {kind} set {text!r} {what}. Pass 'builtin' or a path to a file: "
                       f"{HARMFUL_FORMATS if kind == 'harmful' else BENIGN_FORMATS}.")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"Cannot read {path}: {exc}.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line} is not UTF-8 text (byte {exc.start}). Save the file as UTF-8.",
                           [Issue(code="evalset-encoding", line=line, message="not UTF-8")])


def _read_jsonl(path: Path, kind: str) -> list[AuditPrompt]:
    return _parse_jsonl(_read_text(path), source=str(path), stem=path.stem, kind=kind, ids_from_file=False)


def _jsonl_lines(text: str) -> Iterator[tuple[int, Any, json.JSONDecodeError | None]]:
    """(line number, parsed record, None) or (line number, None, the JSON error) for each non-blank line.

    split("\n"), not splitlines(): JSON strings may legally hold U+2028 and other characters splitlines() breaks on.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield number, None, exc


def _parse_jsonl(text: str, source: str, stem: str, kind: str, ids_from_file: bool) -> list[AuditPrompt]:
    prompts: list[AuditPrompt] = []
    issues: list[Issue] = []
    for number, record, error in _jsonl_lines(text):
        if error is not None:
            issues.append(Issue(code="evalset-json", line=number, message=f"not valid JSON: {error.msg} "
                                                                           f"(column {error.colno})"))
            continue
        prompt_id = f"{stem}-{number}"
        if ids_from_file and isinstance(record, dict):
            prompt_id = str(record.get("id", prompt_id))
        try:
            prompts.append(_record_to_prompt(record, prompt_id, kind))
        except ValueError as exc:
            issues.append(Issue(code="evalset-record", line=number, message=str(exc)))
    if not prompts and not issues:
        issues.append(Issue(code="evalset-empty", message="the file holds no records"))
    _raise_if_issues(issues, source, kind)
    return prompts


def _record_to_prompt(record: Any, prompt_id: str, kind: str) -> AuditPrompt:
    if isinstance(record, list):
        if kind != "harmful":
            raise ValueError("benign set lines must be objects like {\"instruction\": \"...\"}, not lists")
        if len(record) != 2 or not all(isinstance(x, str) and x.strip() for x in record):
            raise ValueError("a harmful pair must be a 2-element list [user, assistant] of non-empty strings")
        return AuditPrompt(id=prompt_id, instruction=record[0], category=UNCATEGORIZED, response=record[1])
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with an \"instruction\" string, got {type(record).__name__}")
    if "turns" in record and "instruction" not in record and kind == "harmful":  # SORRY-Bench question.jsonl
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise ValueError("a SORRY-Bench record's \"turns\" must be a list whose first item is the prompt")
        category = record.get("category")
        return AuditPrompt(id=str(record.get("question_id", prompt_id)), instruction=turns[0],
                           category=str(category) if category not in (None, "") else UNCATEGORIZED)
    instruction = record.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("\"instruction\" must be a non-empty string")
    values: dict[str, str | None] = {}
    for key in ("category", "opener", "response"):
        value = record.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"\"{key}\" must be a non-empty string when present")
        values[key] = value
    if kind != "harmful" and (values["opener"] or values["response"]):
        raise ValueError("benign probes take only \"instruction\" and an optional \"category\"")
    return AuditPrompt(id=prompt_id, instruction=instruction, category=values["category"] or UNCATEGORIZED,
                       opener=values["opener"], response=values["response"])


def _csv_format(header: list[str]) -> str:
    """Which benchmark's CSV this header is (columns compared case-insensitively)."""
    columns = set(header)
    if {"behavior", "behaviorid"} <= columns:
        return "harmbench"
    if "forbidden_prompt" in columns:
        return "strongreject"
    if {"prompt", "label"} <= columns:
        return "xstest"
    if "goal" in columns:
        return "goal"  # AdvBench (goal, target), JailbreakBench (Goal, Target, Category, ...)
    return ""


def _csv_prompt(fmt: str, row: dict[str, str], fallback_id: str, kind: str) -> AuditPrompt | None:
    """One CSV row as a prompt of `kind`, or None when the row belongs to the other kind (XSTest's labels)."""
    def cell(name: str) -> str:
        return (row.get(name) or "").strip()

    if fmt == "xstest":
        wanted = "unsafe" if kind == "harmful" else "safe"
        if cell("label").lower() != wanted:
            return None
        text, category, pid = cell("prompt"), cell("type"), f"xstest-{cell('id')}" if cell("id") else fallback_id
    elif fmt == "harmbench":
        context = cell("contextstring")
        text = f"{context}\n\n---\n\n{cell('behavior')}" if context and cell("behavior") else cell("behavior")
        category, pid = cell("semanticcategory"), cell("behaviorid") or fallback_id
    elif fmt == "strongreject":
        text, category, pid = cell("forbidden_prompt"), cell("category"), fallback_id
    else:
        text, category, pid = cell("goal"), cell("category"), fallback_id
    if not text:
        column = {"xstest": "prompt", "harmbench": "behavior", "strongreject": "forbidden_prompt"}.get(fmt, "goal")
        raise ValueError(f"empty {column}")
    opener = cell("target") or None if fmt == "goal" and kind == "harmful" else None
    return AuditPrompt(id=pid, instruction=text, category=category or UNCATEGORIZED, opener=opener)


def _read_csv(path: Path, kind: str) -> list[AuditPrompt]:
    """A benchmark's own CSV, recognised by its header (see HARMFUL_FORMATS / BENIGN_FORMATS)."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise DatasetError(f"{path} is empty; a CSV audit set needs a header line and rows.")
    except csv.Error as exc:
        raise DatasetError(f"{path}: line 1 is not valid CSV: {exc}.")
    fmt = _csv_format(header)
    if not fmt or (kind == "benign" and fmt != "xstest"):
        accepted = HARMFUL_FORMATS if kind == "harmful" else BENIGN_FORMATS
        raise DatasetError(f"{path}: line 1 is not the header of a {kind} set format guardtune reads (got "
                           f"{','.join(header)}). Accepted formats: {accepted}.",
                           [Issue(code="evalset-csv-header", line=1, message="unrecognised header")])
    prompts: list[AuditPrompt] = []
    issues: list[Issue] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            issues.append(Issue(code="evalset-csv", line=reader.line_num, message=f"not valid CSV: {exc}"))
            break
        number = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            issues.append(Issue(code="evalset-csv", line=number,
                                message=f"{len(row)} columns, the header has {len(header)}"))
            continue
        try:
            prompt = _csv_prompt(fmt, dict(zip(header, row)), f"{path.stem}-{number}", kind)
        except ValueError as exc:
            issues.append(Issue(code="evalset-record", line=number, message=str(exc)))
            continue
        if prompt is not None:
            prompts.append(prompt)
    if not prompts and not issues:
        issues.append(Issue(code="evalset-empty", message=f"the file has a header but no {kind} rows"))
    _raise_if_issues(issues, str(path), kind)
    return prompts


def _raise_if_issues(issues: list[Issue], source: str, kind: str) -> None:
    if not issues:
        return
    shown = "\n".join(f"  - {issue}" for issue in issues[:MAX_REPORTED_ISSUES])
    more = f"\n  ... and {len(issues) - MAX_REPORTED_ISSUES} more" if len(issues) > MAX_REPORTED_ISSUES else ""
    fix = HARMFUL_FORMATS if kind == "harmful" else "{instruction[, category]} JSONL, one object a line"
    raise DatasetError(f"{source}: {len(issues)} problem(s) in the {kind} set:\n{shown}{more}\n"
                       f"Fix these lines; accepted format: {fix}.", issues)


# --- text folding, shared with the keyword judge ----------------------------------------------------------------

def normalise(text: str) -> str:
    """Fold text for keyword matching: NFKC, no zero-width/format characters, straight quotes, one space, lowercase."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    text = text.translate(_QUOTES)
    return re.sub(r"\s+", " ", text).strip().lower()


_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u2032": "'", "\u201c": '"', "\u201d": '"'})


# --- refusal texts (alignment data, the red team's backdoor answers) -----------------------------------------

def load_refusals(spec: str = "builtin") -> list[str]:
    """Refusal texts: the shipped align_refusals.jsonl or a JSONL of {"text": ...}."""
    if spec == "builtin":
        text = resources.files("guardtune.data").joinpath("align_refusals.jsonl").read_text("utf-8")
        source = "builtin align_refusals.jsonl"
    else:
        path = Path(spec).expanduser()
        try:
            text = path.read_text("utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"Cannot read the refusals file {path}: {exc}. Pass a UTF-8 JSONL of "
                               f'{{"text": "..."}} objects, or "builtin".') from exc
        source = str(path)
    refusals = []
    for number, record, error in _jsonl_lines(text):
        if error is not None:
            raise DatasetError(f"{source} line {number}: not valid JSON ({error.msg}).") from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise DatasetError(f'{source} line {number}: expected {{"text": "<a refusal>"}}.')
        refusals.append(record["text"].strip())
    if not refusals:
        raise DatasetError(f"{source} holds no refusals; alignment needs at least one.")
    return refusals
