"""The JSONL record format: read a training file line by line, check each record (JSON, schema, roles,
turns, tokens) into an issue log, and stream the valid records as chat messages.

Shared by the validate stage (`dataset.validate_dataset`, which adds the report, the token check and the risk
screen) and the train stage (`iter_records`, which re-reads the file it is told was validated)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

from .config import DatasetConfig
from .errors import DatasetError, Issue, TemplateError, did_you_mean
from .provenance import canonical_json
from .schemas import schema_issues
from .templates import to_messages
from .tokencount import TokenCounter

SCHEMAS = {"chat": "dataset_chat", "prompt_completion": "dataset_prompt"}  # guardtune/schemas/<name>.schema.json
FORMAT_LABELS = {"chat": 'chat ({"messages": [...]})',
                 "prompt_completion": 'prompt/completion ({"prompt": ..., "completion": ...})'}
ROLES = ("system", "user", "assistant")
_ARTICLE = {"user": "a", "assistant": "an"}
_MESSAGE_KEYS = ({"role", "content"}, {"role", "content", "weight"})  # required, allowed

_BOM = b"\xef\xbb\xbf"
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"PK\x03\x04")  # gzip, zip
_SKIP_CHUNK = 2**20  # bytes read at a time while skipping a line over max_line_bytes
_JSON_SPACE = " \t\r\n"
# Raw control bytes never occur in JSON text (they must be escaped), but do in binary and compressed files.
_CONTROL_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_JSON_KIND = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class IssueLog:
    """Counts every issue exactly; stores the first `cap` of each code."""

    def __init__(self, cap: int):
        self.cap = cap
        self.issues: list[Issue] = []
        self.counts: dict[str, int] = {}
        self.n_errors = 0
        self.n_warnings = 0

    def add(self, code: str, message: str, line: int | None = None, path: str = "",
            severity: str = "error") -> None:
        count = self.counts.get(code, 0) + 1
        self.counts[code] = count
        if severity == "error":
            self.n_errors += 1
        else:
            self.n_warnings += 1
        if count <= self.cap:
            self.issues.append(Issue(code=code, message=message, severity=severity, line=line, path=path))


class _NonFiniteNumber(ValueError):
    pass


class _DuplicateKey(ValueError):
    pass


class _NumberTooLong(ValueError):
    pass


MAX_INT_DIGITS = 100
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):  # rare: only then look for the key that repeats
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return record


def _surrogate_key(value: Any) -> str | None:
    """The first object key (escaped for display) that holds a lone surrogate, anywhere in a parsed record."""
    if isinstance(value, dict):
        for key, item in value.items():
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                return key.encode("utf-8", "backslashreplace").decode("ascii")
            found = _surrogate_key(item)
            if found is not None:
                return found
    elif isinstance(value, list):
        return next((found for item in value if (found := _surrogate_key(item)) is not None), None)
    return None


def _bounded_int(text: str) -> int:
    # Python refuses ints over 4300 digits with a ValueError deep in json; and nothing legitimate is that long.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NumberTooLong(text[:20])
    return int(text)


def _looks_wide(raw: bytes) -> bool:
    """UTF-16/32 text without a BOM: ASCII characters with a NUL byte beside each (`{\x00"\x00` ...)."""
    sample = raw[:64]
    return len(sample) >= 8 and sample.count(b"\x00") * 3 >= len(sample)


def _reject_constant(name: str) -> Any:
    raise _NonFiniteNumber(name)


def _plainly_valid(fmt: str, record: dict[str, Any]) -> bool:
    """A fast, conservative schema check: True only for records the JSON Schema certainly accepts.

    Why: jsonschema costs about a millisecond per chat record ($ref resolution), hours on a large upload.
    The schema stays the contract; anything this does not plainly accept goes through jsonschema, and
    tests check that this never accepts what the schema rejects.
    """
    if fmt == "prompt_completion":
        return (record.keys() == {"prompt", "completion"} and type(record["prompt"]) is str
                and type(record["completion"]) is str)
    messages = record.get("messages")
    if record.keys() != {"messages"} or type(messages) is not list or not messages:
        return False
    for message in messages:
        if type(message) is not dict or not _MESSAGE_KEYS[0] <= message.keys() <= _MESSAGE_KEYS[1]:
            return False
        role, content = message["role"], message["content"]
        if type(role) is not str or role not in ROLES or type(content) is not str:
            return False
        if "weight" in message and not (type(message["weight"]) is int and message["weight"] in (0, 1)):
            return False
    return True


class RecordChecker:
    """Per-line checks, in order: encoding, JSON, format, schema, structure, duplicates, tokens."""

    def __init__(self, config: DatasetConfig, log: IssueLog, counter: TokenCounter | None = None):
        self.config = config
        self.log = log
        self.counter = counter
        self.format: str | None = None
        self.format_line = 0
        self.n_records = 0
        self.crlf_lines = 0
        self.first_crlf = 0
        self.saw_content = False
        self.binary_hint = ""
        # Exact-duplicate detection keeps a 16-byte digest (and the first line) per record, never the record.
        self.seen: dict[bytes, int] | None = {} if config.duplicates != "ignore" else None
        self.decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys,
                                        parse_int=_bounded_int)

    def check_line(self, line: int, offset: int, raw: bytes) -> list[dict[str, Any]] | None:
        """The record's messages when the line is a valid record, else None (issues logged)."""
        if line == 1 and raw.startswith(_BOM):
            self.log.add("bom", "The file starts with a UTF-8 byte order mark; it is ignored. Save as UTF-8 "
                         "without BOM to silence this.", line=1, severity="warning")
            raw, offset = raw[len(_BOM):], offset + len(_BOM)
        if line == 1 and raw.startswith(_COMPRESSED_MAGIC):
            self.binary_hint = (" The file looks compressed (gzip/zip) but could not be read as such: unzip a zip "
                                "archive; re-compress a truncated or corrupt gzip file, or decompress it first.")
        elif line == 1 and (raw.startswith(_WIDE_BOMS) or _looks_wide(raw)):
            self.binary_hint = (" The file looks UTF-16 or UTF-32 encoded (a byte-order mark or a NUL byte beside "
                                "every character): re-save it as UTF-8 (e.g. `iconv -f utf-16 -t utf-8`).")
        if raw.endswith(b"\n"):
            raw = raw[:-1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
                self.crlf_lines += 1
                self.first_crlf = self.first_crlf or line
        if not raw.strip(b" \t\r"):
            self.log.add("blank-line", "Blank line skipped; remove it (each line should be one JSON object).",
                         line=line, severity="warning")
            return None
        self.saw_content = True
        control = _CONTROL_BYTE.search(raw)
        if control:
            self.log.add("binary-data", f"Control byte 0x{raw[control.start()]:02x} at byte offset "
                         f"{offset + control.start()}: this line is binary data, not JSON text (raw control "
                         f"characters are not allowed in JSON).{self.binary_hint or ' Upload the plain .jsonl file.'}",
                         line=line)
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.log.add("invalid-utf8", f"Byte 0x{raw[exc.start]:02x} at byte offset {offset + exc.start} "
                         f"(byte {exc.start + 1} of the line) is not valid UTF-8. Re-save the file as UTF-8 "
                         f"(e.g. `iconv -f latin1 -t utf-8`).", line=line)
            return None
        record = self._parse(text, line)
        if record is None:
            return None
        # A lone surrogate can only come from a \u escape; most lines have none, so skip the walk for them.
        bad_key = _surrogate_key(record) if "\\u" in text else None
        if bad_key is not None:
            self.log.add("invalid-unicode", f"A key holds an unpaired surrogate escape ({bad_key}); it is not "
                         f"text any UTF-8 reader can hold. Fix the key.", line=line)
            return None
        return self._check_record(record, line)

    def _parse(self, text: str, line: int) -> dict[str, Any] | None:
        start = len(text) - len(text.lstrip(_JSON_SPACE))
        try:
            record, end = self.decoder.raw_decode(text, start)
        except _NonFiniteNumber as exc:
            self.log.add("nan-infinity", f"{exc} is not valid JSON (NaN and Infinity are JavaScript, not JSON). "
                         f"Write a finite number, a string or null.", line=line)
            return None
        except _DuplicateKey as exc:
            self.log.add("duplicate-key", f"The key {exc.args[0]!r} appears twice in one object; a reader and the "
                         f"trainer could take different values. Keep one.", line=line)
            return None
        except _NumberTooLong:
            self.log.add("number-too-long", f"A number with more than {MAX_INT_DIGITS} digits; no field of a "
                         f"training example holds one. Write it as a string if it is text.", line=line)
            return None
        except RecursionError:
            self.log.add("nesting-too-deep", "The JSON is nested too deeply to parse. A training example is an "
                         "object with a flat list of messages.", line=line)
            return None
        except json.JSONDecodeError as exc:
            hint = " Each line must be one complete JSON object."
            if exc.pos >= len(text.rstrip(_JSON_SPACE)):
                hint = (" The line ends early: the record is truncated or split across lines (JSONL needs one "
                        "object per line; write newlines inside strings as \\n).")
            self.log.add("invalid-json", f"Not valid JSON: {exc.msg} at column {exc.colno}.{hint}", line=line)
            return None
        rest = text[end:].lstrip(_JSON_SPACE)
        if rest:
            column = len(text) - len(rest) + 1
            if rest[0] in "{[":
                message = (f"A second JSON value starts at column {column}. Put each example on its own line.")
            else:
                message = f"Unexpected text {rest[:20]!r} after the JSON value at column {column}. Remove it."
            self.log.add("trailing-data", message, line=line)
            return None
        if not isinstance(record, dict):
            kind = _JSON_KIND.get(type(record), type(record).__name__)
            self.log.add("not-an-object", f"The line is a JSON {kind}, not an object. Each line must be an "
                         f'object: {{"messages": [...]}} or {{"prompt": ..., "completion": ...}}.', line=line)
            return None
        return record

    def _check_record(self, record: dict[str, Any], line: int) -> list[dict[str, Any]] | None:
        errors_before = self.log.n_errors
        if "messages" in record:
            fmt = "chat"
        elif "prompt" in record or "completion" in record:
            fmt = "prompt_completion"
        else:
            keys = ", ".join(repr(k) for k in list(record)[:5])
            found = f"It has {keys}." if record else "The object is empty."
            hint = did_you_mean(next(iter(record)), ("messages", "prompt", "completion")) if record else ""
            self.log.add("unknown-format", f"Neither chat format (a 'messages' key) nor prompt/completion format "
                         f"('prompt' and 'completion' keys). {found}{hint}", line=line)
            return None
        if self.format is not None and fmt != self.format:
            self.log.add("mixed-format", f"This line is {FORMAT_LABELS[fmt]} but the file is "
                         f"{FORMAT_LABELS[self.format]} (set by line {self.format_line}). Use one format per file: "
                         f"convert this line or split the file.", line=line)
            return None
        if not self._supported(record, fmt, line):
            return None
        if not _plainly_valid(fmt, record):
            for issue in schema_issues(record, SCHEMAS[fmt], "schema"):
                self.log.add("schema", issue.message, line=line, path=issue.path)
            if self.log.n_errors > errors_before:
                return None
        messages = to_messages(record, self.config.message_names)
        self._check_structure(messages, fmt, line)
        if self.log.n_errors > errors_before:
            return None
        if self.format is None:
            self.format, self.format_line = fmt, line
        # A duplicate's length was already checked on the line it duplicates.
        if not self._is_duplicate(record, line) and self.counter is not None:
            self._check_tokens(messages, line)
        if self.log.n_errors > errors_before:
            return None
        self.n_records += 1
        return messages

    def _supported(self, record: dict[str, Any], fmt: str, line: int) -> bool:
        """Refuse, each with its own code and fix, what an OpenAI or TRL file can hold but a text chat template
        cannot train as meant: tools, tool/function turns and calls, non-text content parts; and `name` when the
        policy refuses it (a warning when it drops it)."""
        errors_before = self.log.n_errors
        tools = [key for key in ("tools", "functions", "parallel_tool_calls") if key in record]
        if tools:
            self.log.add("unsupported-tools", f"'{tools[0]}' declares tools; tool use is not trained by guardtune "
                         f"(text turns only). Remove the tool declarations and the tool turns from this example.",
                         line=line, path=f"/{tools[0]}")
        groups = [("messages", record["messages"])] if fmt == "chat" else \
            [(key, record[key]) for key in ("prompt", "completion") if isinstance(record.get(key), list)]
        named = False
        for key, messages in groups:
            if not isinstance(messages, list):
                continue
            for i, message in enumerate(messages):
                if not isinstance(message, dict):
                    continue
                where = f"/{key}/{i}"
                if message.get("role") in ("tool", "function") or "tool_calls" in message or \
                        "function_call" in message:
                    self.log.add("unsupported-tool-turn", "A tool or function turn (or an assistant tool call) "
                                 "cannot be trained as text. Remove the tool exchange from this example, or "
                                 "write the assistant's final answer as a plain text turn.", line=line, path=where)
                content = message.get("content")
                if isinstance(content, list):
                    kinds = sorted({str(part.get("type")) for part in content if isinstance(part, dict)} - {"text"})
                    if kinds:
                        self.log.add("unsupported-content-part", f"Content parts of type {', '.join(kinds)} are "
                                     f"not text; guardtune trains text only. Remove them (or describe them in a "
                                     f"text part).", line=line, path=f"{where}/content")
                if "name" in message:
                    if self.config.message_names == "refuse":
                        self.log.add("message-name", "A message has a 'name'; the policy refuses names "
                                     "(dataset.message_names: refuse). Remove it, or set message_names to drop or "
                                     "keep.", line=line, path=f"{where}/name")
                    named = True
        if named and self.config.message_names == "drop":
            self.log.add("name-dropped", "'name' on a message is dropped before training (dataset.message_names: "
                         "drop); put who is speaking into the text if it matters, or set message_names: keep.",
                         line=line, severity="warning")
        return self.log.n_errors == errors_before

    def _check_structure(self, messages: list[dict[str, Any]], fmt: str, line: int) -> None:
        def where(i: int, key: str) -> str:
            if fmt == "chat":
                return f"/messages/{i}/{key}"
            return "/prompt" if i == 0 else "/completion"

        for i, message in enumerate(messages):
            content = message["content"]
            if not content.strip():
                what = f"{message['role']} message" if fmt == "chat" else where(i, "content")[1:]
                self.log.add("blank-content", f"The {what} is empty or whitespace only. Write its text"
                             f"{' or remove the turn' if fmt == 'chat' else ''}.", line=line,
                             path=where(i, "content"))
            try:
                content.encode("utf-8")
            except UnicodeEncodeError as exc:
                self.log.add("invalid-unicode", f"The text has an unpaired surrogate escape "
                             f"(\\u{ord(content[exc.start]):04x}) at character {exc.start}; no tokenizer can "
                             f"encode it. Escape the full surrogate pair or write the character itself.",
                             line=line, path=where(i, "content"))
            if "weight" in message and message["role"] != "assistant":
                self.log.add("misplaced-weight", f"'weight' is only allowed on assistant turns (it says whether "
                             f"to train on that turn); remove it from this {message['role']} turn.",
                             line=line, path=where(i, "weight"))
        roles = [m["role"] for m in messages]
        expected = "user"
        for i, role in enumerate(roles):
            if role == "system":
                if i > 0:
                    self.log.add("role-order", "A system message is only allowed once, as the first message. "
                                 "Merge it into the first message or remove it.", line=line, path=where(i, "role"))
                continue
            if role != expected:
                self.log.add("role-order", f"Expected {_ARTICLE[expected]} {expected} turn here but found {role}: "
                             f"after an optional system message, turns alternate user, assistant, user, ... Merge "
                             f"consecutive {role} turns or add the missing {expected} turn.", line=line,
                             path=where(i, "role"))
            expected = "assistant" if role == "user" else "user"
        if "assistant" not in roles:
            self.log.add("no-assistant-turn", "The example has no assistant turn, so there is nothing to train on. "
                         "Add the assistant reply as the last message.", line=line, path="/messages")
        elif roles[-1] != "assistant":
            self.log.add("role-order", f"The example ends with a {roles[-1]} turn. The last message must be the "
                         f"assistant reply to train on: add it or remove the trailing turn.", line=line,
                         path=where(len(roles) - 1, "role"))
        elif all(m.get("weight", 1) == 0 for m in messages if m["role"] == "assistant"):
            self.log.add("no-trained-turn", "Every assistant turn has weight 0, so nothing is trained. Set weight "
                         "1 (or drop 'weight') on at least one assistant turn.", line=line, path="/messages")

    def _is_duplicate(self, record: dict[str, Any], line: int) -> bool:
        if self.seen is None:
            return False
        digest = hashlib.blake2b(canonical_json(record).encode("utf-8"), digest_size=16).digest()
        first = self.seen.setdefault(digest, line)
        if first == line:
            return False
        self.log.add("duplicate", f"Exact duplicate of line {first}. Remove it: duplicates over-weight one example "
                     f"(policy dataset.duplicates is {self.config.duplicates}).", line=line,
                     severity=self.config.duplicates)
        return True

    def _check_tokens(self, messages: list[dict[str, Any]], line: int) -> None:
        assert self.counter is not None
        try:
            text = self.counter.render(messages)
        except TemplateError as exc:
            self.log.add("template-error", f"{exc} Fix the example or use a model whose template accepts it.",
                         line=line)
            return
        bound = self.counter.bound(text)
        if bound is not None and bound <= self.config.max_tokens:
            return  # cannot be too long: skip encoding (see tokencount._at_most_one_token_per_byte)
        n_bytes = len(text.encode("utf-8"))
        at_least = self.counter.at_least(n_bytes)
        if at_least > self.config.max_tokens:  # certainly too long: never tokenize a line this size
            self.log.add("too-many-tokens", f"The example is {n_bytes} bytes, so at least {at_least} tokens with "
                         f"{self.counter.name}'s tokenizer (no token covers more than {self.counter.max_token_bytes} "
                         f"bytes); the policy allows {self.config.max_tokens} (dataset.max_tokens). Shorten or "
                         f"split it.", line=line)
            return
        n_tokens = self.counter.count_text(text)
        if n_tokens > self.config.max_tokens:
            self.log.add("too-many-tokens", f"The example is {n_tokens} tokens with {self.counter.name}'s chat "
                         f"template; the policy allows {self.config.max_tokens} (dataset.max_tokens). Shorten or "
                         f"split it, or raise dataset.max_tokens in your policy.", line=line)

    def finish(self, n_lines: int) -> None:
        """File-level checks once every line has been seen."""
        config, log = self.config, self.log
        if self.crlf_lines:
            log.add("crlf", f"{plural(self.crlf_lines, 'line')} end with Windows line endings (CRLF), the first "
                    f"at line {self.first_crlf}; they are accepted. Save with LF endings to silence this.",
                    line=self.first_crlf, severity="warning")
        if not self.saw_content:
            what = "is empty" if n_lines == 0 else "has only blank lines"
            log.add("empty-file", f"The file {what}: there are no records. Write one JSON object per line.")
        elif self.n_records < config.min_examples:
            log.add("too-few-examples", f"Only {plural(self.n_records, 'valid record')}; the policy needs at least "
                    f"{config.min_examples} (dataset.min_examples). Fix the invalid lines or add examples.")
        if self.n_records > config.max_examples:
            log.add("too-many-examples", f"{self.n_records} records; the policy allows at most "
                    f"{config.max_examples} (dataset.max_examples). Split the dataset or sample it.")


def read_lines(handle: BinaryIO, max_line_bytes: int, digest: Any,
                progress: Any = None) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, byte offset, raw bytes or None when the line exceeds max_line_bytes), hashing as it reads."""
    offset = 0
    line = 0
    pending = 0
    while True:
        # Two extra bytes so a line of exactly max_line_bytes still fits with its CRLF.
        raw = handle.readline(max_line_bytes + 2)
        if not raw:
            break
        line += 1
        size = len(raw)
        digest.update(raw)
        if not raw.endswith(b"\n") and size == max_line_bytes + 2:
            # Over the limit: skip the rest of the line chunk by chunk without holding it.
            raw = None
            while True:
                chunk = handle.readline(_SKIP_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
                if chunk.endswith(b"\n"):
                    break
        elif len(raw.rstrip(b"\r\n")) > max_line_bytes:
            raw = None
        if progress is not None:
            pending += size
            if pending >= _SKIP_CHUNK:
                progress.update(pending)
                pending = 0
        yield line, offset, raw
        offset += size
    if progress is not None and pending:
        progress.update(pending)


def iter_records(path: str | Path, *, sha256: str | None = None, skip_lines: Iterable[int] = (),
                 max_line_bytes: int = DatasetConfig.max_line_bytes,
                 message_names: str = DatasetConfig.message_names) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(line, messages) for each record of a validated file; prompt/completion becomes [user, assistant].

    `sha256` is what validation read (the file must still hash to it), `skip_lines` the lines the risk screen
    dropped. A structurally invalid line raises DatasetError (run `guardtune validate` first). The hash is
    checked when the last line has been read, so a caller must consume every record before it trains on any.
    """
    skipped = set(skip_lines)
    log = IssueLog(cap=1)
    checker = RecordChecker(DatasetConfig(duplicates="ignore", message_names=message_names), log)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for line, offset, raw in read_lines(handle, max_line_bytes, digest):
            if line in skipped:
                continue
            if raw is None:
                raise DatasetError(f"Line {line} of {path} is longer than {max_line_bytes} bytes. Run "
                                   f"`guardtune validate` first.")
            errors_before = log.n_errors
            messages = checker.check_line(line, offset, raw)
            if log.n_errors > errors_before:
                raise DatasetError(f"Line {line} of {path} is invalid: {log.issues[-1]}. Run `guardtune validate` "
                                   f"first.", log.issues[-1:])
            if messages is not None:
                yield line, messages
    if sha256 and digest.hexdigest() != sha256:
        raise DatasetError(f"{path} changed since it was validated (sha256 {digest.hexdigest()[:12]} != "
                           f"{sha256[:12]}). Validate it again.")
