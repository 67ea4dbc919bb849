"""Chat templates -> completion masks, response positions and prompt/prefix ids, across four template families."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from tiny_models import build_tokenizer

from guardtune.errors import ModelError, TemplateError
from guardtune.templates import (ensure_pad_token, render_chat, render_prompt, response_ids, template_fingerprint,
                                 to_messages)

TEMPLATES = Path(__file__).parent / "assets" / "templates"

# name -> (bos_token, eos_token, what a trained assistant turn must decode to exactly)
FAMILIES = {
    "chatml": (None, "<|im_end|>", lambda content: content + "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", lambda content: content + "<|eot_id|>"),
    # Llama-2 puts ' answer ' before EOS right after [/INST]: the model generates the spaces too.
    "llama2": ("<s>", "</s>", lambda content: " " + content + " </s>"),
    "gemma": ("<bos>", "<end_of_turn>", lambda content: content + "<end_of_turn>"),
}

SYSTEM = {"role": "system", "content": "You answer customer support questions briefly."}
CASES = {
    "single": [{"role": "user", "content": "How do I reset my password?"},
               {"role": "assistant", "content": "Open Settings, choose Security, and click Reset password."}],
    "multi": [{"role": "user", "content": "Hello!"},
              {"role": "assistant", "content": "Hello world! How are you today?"},
              {"role": "user", "content": "Where is my refund?"},
              {"role": "assistant", "content": "Your refund has been processed."}],
    "weight0": [{"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "I cannot help with that.", "weight": 0},
                {"role": "user", "content": "Where is my refund?"},
                {"role": "assistant", "content": "It should appear within five business days."}],
}


def family_tokenizer(name: str):
    bos, eos, _ = FAMILIES[name]
    tokenizer = build_tokenizer(chat_template=(TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"))
    if bos is not None:  # as the real checkpoints do: the template writes bos_token/eos_token as text
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    return tokenizer


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, family_tokenizer(request.param)


def trained_turns(example) -> list[tuple[int, int]]:
    """(start, end) token spans of the trained turns, split where response_positions restarts at 1."""
    turns = []
    for index, (mask, position) in enumerate(zip(example.completion_mask, example.response_positions)):
        assert (mask == 1) == (position > 0)
        if position == 1:
            turns.append([index, index + 1])
        elif position > 1:
            assert turns and turns[-1][1] == index and example.response_positions[index - 1] == position - 1
            turns[-1][1] = index + 1
    return [tuple(turn) for turn in turns]


@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_completion_mask_positions_and_prompt_ids(family, case, with_system):
    name, tokenizer = family
    messages = ([SYSTEM] if with_system else []) + CASES[case]
    example = render_chat(tokenizer, messages)
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    turns = trained_turns(example)

    assert len(turns) == len(trained) == (1 if case == "weight0" else len(trained))
    assert not example.truncated
    assert len(example.input_ids) == len(example.completion_mask) == len(example.response_positions)
    expected_text = FAMILIES[name][2]
    for (start, end), index in zip(turns, trained):
        content = messages[index]["content"]
        turn_ids = example.input_ids[start:end]
        # exactly the content plus the end-of-turn token, no trailing newline, no prompt text
        assert tokenizer.decode(turn_ids) == expected_text(content)
        assert turn_ids == response_ids(tokenizer, expected_text(content))
        assert example.response_positions[start:end] == list(range(1, end - start + 1))
        # what precedes the turn is token for token what inference feeds for that conversation prefix
        assert example.input_ids[:start] == render_prompt(tokenizer, messages[:index])
    # the whole example is the template's rendering, BOS exactly once at the start (never doubled)
    full = tokenizer.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in messages], tokenize=False)
    assert tokenizer.decode(example.input_ids) == full
    if tokenizer.bos_token is not None:
        assert example.input_ids[0] == tokenizer.bos_token_id != example.input_ids[1]


def test_weight0_turn_is_masked_but_present(family):
    name, tokenizer = family
    example = render_chat(tokenizer, CASES["weight0"])
    masked_out = [t for t, m in zip(example.input_ids, example.completion_mask) if m == 0]
    assert CASES["weight0"][1]["content"] in tokenizer.decode(masked_out)
    trained = [t for t, m in zip(example.input_ids, example.completion_mask) if m == 1]
    assert tokenizer.decode(trained) == FAMILIES[name][2](CASES["weight0"][3]["content"])


def test_truncation_keeps_the_left_part(family):
    _, tokenizer = family
    full = render_chat(tokenizer, CASES["single"])
    first = full.response_positions.index(1)
    example = render_chat(tokenizer, CASES["single"], max_length=first + 2)
    assert example.truncated
    assert example.input_ids == full.input_ids[:first + 2]
    assert example.response_positions[-2:] == [1, 2] and sum(example.completion_mask) == 2


def test_truncation_that_removes_every_target_names_the_line(family):
    _, tokenizer = family
    first = render_chat(tokenizer, CASES["single"]).response_positions.index(1)
    with pytest.raises(TemplateError, match=rf"^line 12: no trainable tokens remain after truncation to {first} "
                                            r"tokens; raise training.max_length or shorten the example") as info:
        render_chat(tokenizer, CASES["single"], max_length=first, line=12)
    assert info.value.issues[0].line == 12 and info.value.issues[0].code == "no_trainable_tokens"


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}],
     "every assistant turn has weight 0"),
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi again"},
      {"role": "assistant", "content": "Hello"}], "cannot render a conversation with roles user/user/assistant"),
], ids=["all-weight-0", "template-raises"])
def test_unrenderable_conversations(messages, error):
    tokenizer = family_tokenizer("gemma")  # its template raises on non-alternating roles, as Gemma's does
    with pytest.raises(TemplateError, match=error):
        render_chat(tokenizer, messages, line=3)


def test_template_without_prefix_property_is_refused():
    # Like reasoning templates that drop earlier assistant turns' content: rendering a prefix is no prefix.
    template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(TemplateError, match=r"line 4: .*not render the conversation up to it as a prefix"):
        render_chat(build_tokenizer(chat_template=template), CASES["multi"], line=4)


def test_missing_chat_template_says_how_to_fix():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat template.*tokenizer.chat_template = "):
        render_chat(tokenizer, CASES["single"])
    with pytest.raises(TemplateError, match="no chat template"):
        render_prompt(tokenizer, CASES["single"][:1])


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "Hi", "completion": "Hello"}, [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello"}]),
    ({"messages": CASES["weight0"]}, CASES["weight0"]),
])
def test_to_messages(record, expected):
    assert to_messages(record) == expected


def test_to_messages_rejects_other_records():
    with pytest.raises(TemplateError, match="'messages' or both 'prompt' and 'completion'"):
        to_messages({"prompt": "Hi"})


def test_render_prompt_ends_with_generation_prompt(tiny_tokenizer):
    messages = CASES["single"][:1]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert render_prompt(tiny_tokenizer, messages) == tiny_tokenizer.encode(text, add_special_tokens=False)
    with pytest.raises(TemplateError, match="ending with a user turn"):
        render_prompt(tiny_tokenizer, CASES["single"])


def test_a_prefilled_prompt_is_the_rendered_conversation_up_to_k_response_tokens(tiny_tokenizer):
    """The audit's prefilling attack feeds render_prompt(...) + response_ids(response)[:k]: those must be the
    very tokens the chat template gives the conversation with that response, cut after k response tokens."""
    response = "Sure, here is how to do it: first, second, third."
    user = [{"role": "user", "content": "How do I do it?"}]
    ids = response_ids(tiny_tokenizer, response)
    assert len(ids) > 5 and tiny_tokenizer.decode(ids) == response
    full = render_chat(tiny_tokenizer, [*user, {"role": "assistant", "content": response}]).input_ids
    prompt = render_prompt(tiny_tokenizer, user)
    for k in (0, 1, 5, len(ids)):
        assert full[:len(prompt) + k] == prompt + ids[:k]


def test_ensure_pad_token_falls_back_to_eos_or_explains(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    assert ensure_pad_token(tokenizer, "tiny").pad_token == tokenizer.eos_token
    tokenizer.pad_token, tokenizer.eos_token = None, None
    with pytest.raises(ModelError, match="neither a pad nor an eos token"):
        ensure_pad_token(tokenizer, "tiny")


def test_template_fingerprint_tracks_template_vocab_and_special_tokens():
    base = template_fingerprint(build_tokenizer())
    assert template_fingerprint(build_tokenizer()) == base and len(base) == 64
    assert template_fingerprint(family_tokenizer("llama3")) != base  # other template and special tokens
    assert template_fingerprint(build_tokenizer(vocab_size=300)) != base  # other merges
    bos_changed = build_tokenizer()
    bos_changed.bos_token = "<s>"
    assert template_fingerprint(bos_changed) != base
