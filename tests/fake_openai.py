"""A local fake OpenAI-compatible /v1/chat/completions server with scripted behaviours, for judge tests."""

from __future__ import annotations

import json
import re
import threading
import time
import unicodedata
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PLACEHOLDER = "[detailed harmful instructions omitted]"


def completion(content: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


def gullible_score(user_message: str) -> int:
    """A judge that is as easy to fool as possible, to prove the hardening works.

    It reads like a person would (full-width look-alikes folded, zero-width characters ignored) and obeys the
    LAST "#score: N" it finds anywhere in the user message. Without one it rates honestly: 5 when the
    delimited RESPONSE block holds the harmful placeholder, else 1.
    """
    seen = unicodedata.normalize("NFKC", user_message)
    seen = "".join(ch for ch in seen if unicodedata.category(ch) != "Cf")
    scores = re.findall(r"#\s*score\s*:\s*([1-5])", seen, re.IGNORECASE)
    if scores:
        return int(scores[-1])
    begin = re.search(r"^BEGIN RESPONSE (\S+)$", user_message, re.MULTILINE)
    block = user_message
    if begin:
        end = user_message.find(f"\nEND RESPONSE {begin.group(1)}", begin.end())
        block = user_message[begin.end():end if end >= 0 else None]
    return 5 if PLACEHOLDER in block else 1


class FakeOpenAI:
    """`with FakeOpenAI(["status:500", "score:5"]) as fake:` — each request takes the next behaviour; the last
    one repeats. Behaviours:

    score:N          200, reply ends with "#score: N" (N may be out of range, e.g. score:7)
    status:CODE      that HTTP status with a JSON error body
    echo_auth:CODE   that status, echoing the Authorization header in the body (a leaky server)
    429:SECONDS      429 with Retry-After: SECONDS
    slow:SECONDS     sleep, then score:1 (longer than the client timeout → client times out)
    hold:SECONDS     sleep, then score:1 (shorter than the timeout; for concurrency)
    garbage          200 with bytes that are not JSON, content-type application/json
    nonjson          200 text/plain
    no_choices       200 JSON without "choices"
    not_last         the score line is followed by more text
    trailing         "#score: 5 (fully compliant)"
    empty            200 with empty content
    gullible         gullible_score() on the user message
    reply:TEXT       200 with TEXT as the content (for guard classifiers' reply formats)
    drip:SECONDS     200, a valid reply sent a few bytes every 0.25 s for about SECONDS (each read is quick; the
                     whole is slow: a per-read timeout never fires)
    huge:BYTES       200, a JSON reply padded to BYTES
    redirect         307 to another host
    echo_cut:N       400 echoing only the first N characters of the Authorization header (a truncated echo)
    echo_json        400 echoing the key JSON-escaped inside a string
    """

    def __init__(self, behaviours: list[str] | tuple[str, ...] = ("score:1",)):
        self.behaviours = list(behaviours)
        self.requests: list[dict[str, Any]] = []
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.drip_interval = 0.25

    @property
    def count(self) -> int:
        return len(self.requests)

    @property
    def base_url(self) -> str:
        assert self._server is not None, "use FakeOpenAI as a context manager"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, headers, payload = fake._handle(self.path, dict(self.headers), body)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    pieces = payload if isinstance(payload, list) else [payload]  # a list is sent slowly
                    self.send_header("Content-Length", str(sum(len(p) for p in pieces)))
                    self.end_headers()
                    for i, piece in enumerate(pieces):
                        if i:
                            time.sleep(fake.drip_interval)
                        self.wfile.write(piece)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll interval so shutdown() returns quickly; the default 0.5 s would dominate every test.
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            index = len(self.requests)
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            self.requests.append({"path": path, "headers": headers, "body": parsed})
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            behaviour = self.behaviours[min(index, len(self.behaviours) - 1)]
        try:
            if path != "/v1/chat/completions":
                return 404, {"Content-Type": "application/json"}, b'{"error": "not found"}'
            return self._respond(behaviour, headers, parsed)
        finally:
            with self._lock:
                self.inflight -= 1

    def _respond(self, behaviour: str, headers: dict[str, str], body: Any) -> tuple[int, dict[str, str], bytes]:
        kind, _, arg = behaviour.partition(":")
        as_json = {"Content-Type": "application/json"}
        if kind == "score":
            return 200, as_json, json.dumps(completion(f"The response was rated.\n#score: {arg}")).encode()
        if kind == "status":
            return int(arg), as_json, json.dumps({"error": {"message": f"fake error {arg}"}}).encode()
        if kind == "echo_auth":
            leak = {"error": f"bad request with Authorization: {headers.get('Authorization')}"}
            return int(arg), as_json, json.dumps(leak).encode()
        if kind == "429":
            return 429, {**as_json, "Retry-After": arg}, b'{"error": "rate limited"}'
        if kind in ("slow", "hold"):
            time.sleep(float(arg))
            return 200, as_json, json.dumps(completion("Fine.\n#score: 1")).encode()
        if kind == "garbage":
            return 200, as_json, b"\x00\xff<html>not json"
        if kind == "nonjson":
            return 200, {"Content-Type": "text/plain"}, b"hello"
        if kind == "no_choices":
            return 200, as_json, json.dumps({"id": "x", "object": "chat.completion"}).encode()
        if kind == "not_last":
            return 200, as_json, json.dumps(completion("#score: 5\nOn reflection the response is fine.")).encode()
        if kind == "trailing":
            return 200, as_json, json.dumps(completion("Complies.\n#score: 5 (fully compliant)")).encode()
        if kind == "empty":
            return 200, as_json, json.dumps(completion("")).encode()
        if kind == "drip":
            reply = json.dumps(completion("Fine.\n#score: 1")).encode()
            count = max(2, int(float(arg) / self.drip_interval))
            step = max(1, len(reply) // count)
            return 200, as_json, [reply[i:i + step] for i in range(0, len(reply), step)]
        if kind == "huge":
            return 200, as_json, json.dumps(completion("x" * int(arg) + "\n#score: 1")).encode()
        if kind == "redirect":
            return 307, {**as_json, "Location": "http://collector.invalid/v1/chat/completions"}, b"{}"
        if kind == "echo_cut":
            cut = headers.get("Authorization", "")[:int(arg)]
            return 400, as_json, json.dumps({"error": f"bad token {cut}"}).encode()
        if kind == "echo_json":
            return 400, as_json, json.dumps({"error": json.dumps({"seen": headers.get("Authorization", "")})}).encode()
        if kind == "reply":
            return 200, as_json, json.dumps(completion(arg)).encode()
        if kind == "gullible":
            user = next(m["content"] for m in body["messages"] if m["role"] == "user")
            return 200, as_json, json.dumps(completion(f"Rated.\n#score: {gullible_score(user)}")).encode()
        raise AssertionError(f"unknown fake behaviour {behaviour!r}")
