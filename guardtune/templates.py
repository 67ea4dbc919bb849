"""Chat template -> input_ids + completion_mask for training; prompt and prefix token ids for prefilling audits."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import Issue, ModelError, TemplateError


@dataclass
class RenderedExample:
    """One tokenized training example.

    completion_mask is 1 on the tokens the model is trained to produce (every assistant turn whose weight is not
    0, including its end-of-turn token) and 0 elsewhere. response_positions numbers those tokens t = 1, 2, ...
    restarting at 1 in each trained turn (the t of the per-position beta_t); 0 on every other token.
    """

    input_ids: list[int]
    completion_mask: list[int]
    response_positions: list[int]
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


def _message(message: dict[str, Any], names: str, weight: int | None = None) -> dict[str, Any]:
    content = message["content"]
    if isinstance(content, list):  # OpenAI text parts
        content = "\n".join(part["text"] for part in content)
    out = {"role": "system" if message["role"] == "developer" else message["role"], "content": content}
    if "weight" in message or weight is not None:
        out["weight"] = message.get("weight", weight) if weight is None else weight
    if names == "keep" and "name" in message:
        out["name"] = message["name"]
    return out


def to_messages(record: dict[str, Any], names: str = "drop") -> list[dict[str, Any]]:
    """A dataset record as chat messages with roles system/user/assistant and string contents.

    {"messages": [...]} (OpenAI chat: text parts joined by newlines, developer as system, `name` kept only when
    `names` is "keep"); prompt/completion strings as [user, assistant]; TRL's conversational prompt/completion
    (lists of messages) as the prompt's turns (its assistant turns weight 0: context, not trained) followed by the
    completion's."""
    if "messages" in record:
        return [_message(message, names) for message in record["messages"]]
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            return [*(_message(m, names, 0 if m["role"] == "assistant" else None) for m in prompt),
                    *(_message(m, names) for m in completion)]
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    raise TemplateError("A record needs either 'messages' or both 'prompt' and 'completion'.")


def ensure_pad_token(tokenizer: Any, what: str) -> Any:
    """Give a tokenizer without a pad token its eos token as pad (batched generation and training pad with it;
    the attention mask keeps the padding out). `what` names the model in the error when it has neither."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"The tokenizer of {what} has neither a pad nor an eos token; add one to its "
                             f"tokenizer_config.json.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("The tokenizer has no chat template, so conversations cannot be rendered the way the "
                            "model expects. Use an instruct/chat checkpoint (base models usually ship none), or set "
                            "one: tokenizer.chat_template = '...jinja...' and save it with tokenizer.save_pretrained.")


def _render(tokenizer: Any, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]  # templates never see our "weight"
    try:
        text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja errors and the template's own raise_exception()
        roles = "/".join(m["role"] for m in clean)
        raise TemplateError(f"The chat template cannot render a conversation with roles {roles}: {exc}") from exc
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not text.")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    # add_special_tokens=False: the template already writes BOS and friends as text (parsed back to the
    # special token ids here); letting the tokenizer add its own would double them.
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _trained_spans(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character span of every trained assistant turn in it.

    Works for any template with the prefix property (rendering fewer messages yields a prefix of the full
    text): messages[:i] with the generation prompt ends where assistant turn i starts, messages[:i+1] ends where
    it ends. Whitespace after the end-of-turn marker belongs to the template, not to what the model generates.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            what = ("the prompt before it (with the generation prompt)" if not through.startswith(before)
                    else "the conversation up to it")
            raise TemplateError(
                f"The chat template does not render {what} as a prefix of the longer conversation (assistant "
                f"message {i}), so its tokens cannot be located. Templates that rewrite earlier turns (e.g. drop "
                f"reasoning from past assistant turns) or whose generation prompt differs from the start of a "
                f"rendered assistant turn are not supported; train on single-turn examples or fix the template.")
        start, end = len(before), len(through.rstrip())
        if end <= start:
            raise TemplateError(f"Assistant message {i} renders to no text; give it content.")
        if spans and start < spans[-1][1]:
            raise TemplateError(f"Assistant message {i} renders before the end of the previous one; the chat "
                                f"template is not supported.")
        spans.append((start, end))
    return full, spans


def render_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], max_length: int | None = None,
                line: int | None = None) -> RenderedExample:
    """Tokenize a conversation with the model's own chat template and mark the tokens to train on.

    `line` (1-based dataset line) only labels errors. Truncation keeps the first `max_length` tokens.
    """
    _check_template(tokenizer)
    where = f"line {line}: " if line is not None else ""
    try:
        full, spans = _trained_spans(tokenizer, messages)
    except TemplateError as exc:
        if line is None:
            raise
        raise TemplateError(f"{where}{exc}", [Issue(code="template", message=str(exc), line=line)]) from exc
    if not spans:
        raise TemplateError(f"{where}no assistant turn to train on (every assistant turn has weight 0).")
    # Tokenize segment by segment (text between turns, then each trained turn alone) rather than the whole
    # string: BPE merges never cross a turn boundary, so the prompt tokens equal render_prompt()'s (what the
    # model sees at inference and in the audit) and each turn's tokens equal response_ids() of its text (the
    # audit's prefilled prefixes), instead of depending on how the pieces happened to merge.
    input_ids: list[int] = []
    completion_mask: list[int] = []
    positions: list[int] = []
    cursor = 0
    for start, end in spans:
        prompt = _encode(tokenizer, full[cursor:start])
        turn = _encode(tokenizer, full[start:end])
        input_ids += prompt + turn
        completion_mask += [0] * len(prompt) + [1] * len(turn)
        positions += [0] * len(prompt) + list(range(1, len(turn) + 1))
        cursor = end
    tail = _encode(tokenizer, full[cursor:])
    input_ids += tail
    completion_mask += [0] * len(tail)
    positions += [0] * len(tail)

    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, completion_mask, positions = (input_ids[:max_length], completion_mask[:max_length],
                                                 positions[:max_length])
    if not any(completion_mask):
        message = (f"{where}no trainable tokens remain after truncation to {max_length} tokens; raise "
                   f"training.max_length or shorten the example")
        raise TemplateError(message, [Issue(code="no_trainable_tokens", message=message, line=line)])
    return RenderedExample(input_ids, completion_mask, positions, truncated)


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of a conversation ending with a user turn, plus the generation prompt (what inference feeds)."""
    _check_template(tokenizer)
    if not messages or messages[-1]["role"] == "assistant":
        raise TemplateError("render_prompt needs messages ending with a user turn; the assistant's reply is what "
                            "gets generated (or prefilled: the audit appends response_ids(...)[:k]).")
    return _encode(tokenizer, _render(tokenizer, messages, add_generation_prompt=True))


def response_ids(tokenizer: Any, text: str) -> list[int]:
    """A response tokenized alone, no special tokens: exactly the ids of that text inside a rendered turn."""
    return _encode(tokenizer, text)


def template_fingerprint(tokenizer: Any) -> str:
    """sha256 of the chat template, the special tokens and the vocabulary/merges: a cache key for anything
    derived from tokenized data (reference log-probs)."""
    template = getattr(tokenizer, "chat_template", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    digest = hashlib.sha256()
    for part in (json.dumps(template, sort_keys=True), json.dumps(special, sort_keys=True), vocab):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
