"""Count a chat example's tokens as transformers' `apply_chat_template` would, without importing torch."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import ModelError, TemplateError

# The named special tokens transformers hands to every chat template as variables (bos_token, eos_token, ...).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenCounter:
    """A `tokenizers` tokenizer plus a chat template rendered in a jinja2 sandbox like transformers renders it.

    Why not `AutoTokenizer`: it imports torch, and `guardtune validate` must stay fast and torch-free.
    """

    def __init__(self, tokenizer: Any, chat_template: str, template_vars: dict[str, str] | None = None,
                 name: str = ""):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template_vars = dict(template_vars or {})
        self.name = name
        self._template = _compile(chat_template)
        self.byte_bounded = _at_most_one_token_per_byte(tokenizer)
        self.max_token_bytes = _longest_token_bytes(tokenizer) if self.byte_bounded else FALLBACK_TOKEN_BYTES

    @classmethod
    def from_model_dir(cls, directory: str | Path, name: str | None = None) -> "TokenCounter":
        """Load `tokenizer.json`, the chat template and the special-token variables from a saved model folder."""
        folder = Path(directory)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelError(f"No tokenizer.json in {folder}: guardtune counts tokens with the fast `tokenizers` "
                             f"tokenizer. Re-save the tokenizer with transformers "
                             f"(AutoTokenizer.from_pretrained(...).save_pretrained(...)) to create it.")
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ModelError(f"Cannot load {tokenizer_file}: {exc}. Re-save the tokenizer with transformers.")
        config = _read_json(folder / "tokenizer_config.json")
        template = _find_chat_template(folder, config)
        return cls(tokenizer, template, _special_token_vars(folder, config), name=name or str(folder))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template's text for `messages` (TemplateError when the template refuses them)."""
        import jinja2

        # Like transformers: keys whose value is None are dropped, special tokens come first and the
        # conversation variables override them.
        chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
        try:
            return self._template.render(**{**self.template_vars, "messages": chat, "tools": None,
                                            "documents": None, "add_generation_prompt": add_generation_prompt})
        except jinja2.TemplateError as exc:
            raise TemplateError(f"The chat template of {self.name} cannot render this example: {exc}.")

    def count(self, messages: list[dict[str, Any]]) -> int:
        """Tokens in the rendered example, encoded without adding special tokens (the template adds its own)."""
        return self.count_text(self.render(messages))

    def count_text(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def bound(self, text: str) -> int | None:
        """An upper bound on count_text(text) that needs no encoding, when the tokenizer guarantees one."""
        return len(text.encode("utf-8")) if self.byte_bounded else None

    def at_least(self, n_bytes: int) -> int:
        """A lower bound on the tokens of any text of n_bytes UTF-8 bytes: no token covers more than
        `max_token_bytes` of them. Lets validation refuse a huge line without tokenizing it (a 64 MB line cost
        10 GB of memory to encode)."""
        return -(-n_bytes // self.max_token_bytes)


def _at_most_one_token_per_byte(tokenizer: Any) -> bool:
    """True for byte-level BPE without a normalizer or prefix space (GPT-2, Llama 3, SmolLM2, ...).

    Why: such a tokenizer starts from one symbol per UTF-8 byte and merges only shrink that; splitting
    pre-tokenizers never add bytes. So an example of at most N bytes has at most N tokens, and validation
    can skip encoding it (encoding is ~90% of validation time). Normalizers (NFC can expand text) and
    prefix spaces (Metaspace, add_prefix_space) break the bound: those tokenizers always encode.
    """
    from tokenizers import models

    if tokenizer.normalizer is not None or tokenizer.pre_tokenizer is None or not isinstance(tokenizer.model,
                                                                                            models.BPE):
        return False
    state = json.loads(tokenizer.pre_tokenizer.__getstate__())
    steps = state.get("pretokenizers", []) if state.get("type") == "Sequence" else [state]
    kinds = [step.get("type") for step in steps]
    return ("ByteLevel" in kinds and set(kinds) <= {"ByteLevel", "Split", "Digits", "Punctuation"}
            and not any(step.get("add_prefix_space") for step in steps))


# For tokenizers whose longest token cannot be read off the vocabulary as bytes (SentencePiece, WordPiece, ...):
# generous, so a real example is never refused by the bound alone (real tokens average 3-5 bytes).
FALLBACK_TOKEN_BYTES = 256


def _longest_token_bytes(tokenizer: Any) -> int:
    """The longest token of a byte-level BPE vocabulary, in bytes: one vocabulary character stands for one byte;
    added tokens are plain text and count their UTF-8 bytes."""
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
    return max([*(len(t) for t in vocab), *(len(t.encode("utf-8")) for t in added)] or [FALLBACK_TOKEN_BYTES])


def _compile(chat_template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # jinja's own tojson HTML-escapes; chat templates expect plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    # `{% generation %}` marks assistant spans for masks; for counting it is a plain block.
    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(chat_template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"The chat template is not valid jinja (line {exc.lineno}): {exc.message}. "
                            f"Fix chat_template.jinja or the chat_template in tokenizer_config.json.")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"Cannot read {path}: {exc}. Re-save the tokenizer with transformers.")
    return data if isinstance(data, dict) else {}


def _find_chat_template(folder: Path, config: dict[str, Any]) -> str:
    # Same precedence as transformers: chat_template.jinja beats tokenizer_config.json's "chat_template".
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]: several named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    raise TemplateError(f"The tokenizer in {folder} has no chat template (no chat_template.jinja and no "
                        f"chat_template in tokenizer_config.json), so chat examples cannot be rendered. "
                        f"Use an instruct/chat model, or add a chat template to the tokenizer.")


def _special_token_vars(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    values: dict[str, str] = {}
    legacy = _read_json(folder / "special_tokens_map.json")
    for source in (legacy, config):  # tokenizer_config.json wins where both name a token
        for name in SPECIAL_TOKEN_NAMES:
            token = _token_text(source.get(name))
            if token is not None:
                values[name] = token
    return values


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None

