"""Batched generation shared by the stages that make a model write: the audit's continuations and prefixes,
alignment's harmful answers and utility anchors. Left padding, KV cache, length-sorted batches, stop tokens."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .judges import is_refusal
from .templates import render_prompt, response_ids

Progress = Callable[[str, int, int], None]


def _left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(ids)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
             seed: int = 0, static_cache: bool = False,
             on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new token ids, cut at the first stop token.

    Batched with left padding and the KV cache. `static_cache` (CUDA only) switches to transformers' static
    cache, which also torch.compiles the decoding step; every new batch shape compiles again, so it is opt-in
    (benchmarks/bench_audit.py measures it). Greedy by default; sampling is seeded per call. `top_k`: None keeps
    the model's generation config, 0 turns top-k filtering off.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id  # load_model gave every tokenizer one (templates.ensure_pad_token)
    stop = stop_ids(model, tokenizer)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad_id,
                               "eos_token_id": stop, "use_cache": True}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, **({"top_k": top_k} if top_k is not None else {}))
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if static_cache and device.type == "cuda":
        options["cache_implementation"] = "static"
    outputs: list[list[int]] = []
    # Sort by length so each batch pads little; restore the caller's order at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    by_index: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        ids, mask = _left_pad([prompts[i] for i in indices], pad_id, device)
        if do_sample:
            torch.manual_seed(seed + start)
        generated = model.generate(input_ids=ids, attention_mask=mask, **options)[:, ids.shape[1]:].tolist()
        for index, tokens in zip(indices, generated):
            cut = next((j for j, t in enumerate(tokens) if t in stop), len(tokens))
            by_index[index] = tokens[:cut]
        if on_batch:
            on_batch(len(indices))
    outputs = [by_index[i] for i in range(len(prompts))]
    return outputs


def refusal_probe(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
                  on_batch: Callable[[int], None] | None = None) -> list[tuple[bool, str]]:
    """(refused, text) per prompt: the model's greedy continuation (eval mode, no grad; the caller's mode is
    restored), judged by the shipped refusal phrases. Identical prompts are generated once. How training finds the
    prompts the reference refuses (constraint_scope 'refused') and how the model screen asks the base."""
    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    was_training = model.training
    model.eval()
    try:
        generated = generate(model, tokenizer, [list(p) for p in unique], max_new_tokens=max_new_tokens,
                             batch_size=batch_size, on_batch=on_batch)
    finally:
        model.train(was_training)
    texts = {p: tokenizer.decode(r, skip_special_tokens=True) for p, r in zip(unique, generated)}
    return [(is_refusal(texts[tuple(p)]), texts[tuple(p)]) for p in prompts]


def _cache_kwarg(model) -> str:
    """The forward's KV-cache argument: `cache` in transformers 5 (where `past_key_values` is deprecated),
    `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(output) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def prefilled_probe(model, tokenizer, prompts: Sequence[Sequence[int]], prefixes: Sequence[Sequence[int]], *,
                    max_new_tokens: int, batch_size: int) -> list[tuple[list[float], list[int]]]:
    """(log-probs of the prefix tokens, greedy continuation ids) per prompt + prefix, in one pass per batch.

    The prefill that a greedy continuation needs anyway also scores the prefix: log p(prefix_j | prompt,
    prefix_<j) comes from the same forward (logits_to_keep: only the prefix positions are projected), and the
    continuation decodes from its KV cache, so scoring the prefix costs no second forward. Left padding with
    explicit position ids, as generate() does; eval mode, the caller's mode restored; continuations cut at the
    first stop token.
    """
    device = next(model.parameters()).device
    pad_id, stop = tokenizer.pad_token_id, set(stop_ids(model, tokenizer))
    results: list[tuple[list[float], list[int]]] = [([], [])] * len(prompts)
    cache_kwarg = _cache_kwarg(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(prefixes[i]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = _left_pad([list(prompts[i]) + list(prefixes[i]) for i in rows], pad_id, device)
            keep = max(len(prefixes[i]) for i in rows) + 1  # prefix positions + the one predicting the next token
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=keep)
            logps = torch.log_softmax(out.logits.float(), dim=-1)
            scored = []
            for r, i in enumerate(rows):
                k = len(prefixes[i])
                columns = torch.arange(keep - 1 - k, keep - 1, device=logps.device)
                targets = torch.tensor(list(prefixes[i]), dtype=torch.long, device=logps.device)
                scored.append(logps[r, columns, targets].tolist() if k else [])
            cache, token = _cache_of(out), out.logits[:, -1].argmax(-1)
            generated = [token]
            for _ in range(max_new_tokens - 1):
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
                out = model(input_ids=token[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                            use_cache=True, **{cache_kwarg: cache})
                cache, token = _cache_of(out), out.logits[:, -1].argmax(-1)
                generated.append(token)
            tokens = torch.stack(generated, dim=1).tolist()
            for r, i in enumerate(rows):
                cut = next((j for j, t in enumerate(tokens[r]) if t in stop), len(tokens[r]))
                results[i] = (scored[r], tokens[r][:cut])
    finally:
        model.train(was_training)
    return results


def counting(progress: Progress | None, phase: str, total: int) -> Callable[[int], None] | None:
    """An on_batch callback that advances progress(phase, done, total); None when there is no progress."""
    if progress is None:
        return None
    done = [0]
    progress(phase, 0, total)

    def tick(n: int) -> None:
        done[0] += n
        progress(phase, done[0], total)

    return tick


@dataclass
class Answer:
    """A model's answer to one instruction: the text (opener included) and whether it ended on a stop token."""

    text: str
    finished: bool


def write_answers(model, tokenizer, prompts: Sequence[tuple[str, str | None]], *, max_new_tokens: int,
                  batch_size: int, static_cache: bool = False,
                  on_batch: Callable[[int], None] | None = None) -> list[Answer]:
    """Greedy answers to (instruction, opener) pairs: the opener (if any) is prefilled after the rendered prompt,
    then the model continues for up to `max_new_tokens`. How the audit's harmful prefixes and alignment's
    harmful answers and utility anchors are written. The caller picks the context (no_grad, adapter disabled)."""
    inputs, openers = [], []
    for instruction, opener in prompts:
        opener_ids = response_ids(tokenizer, opener) if opener else []
        inputs.append(render_prompt(tokenizer, [{"role": "user", "content": instruction}]) + opener_ids)
        openers.append(opener_ids)
    continuations = generate(model, tokenizer, inputs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             static_cache=static_cache, on_batch=on_batch)
    return [Answer(text=tokenizer.decode(o + c, skip_special_tokens=True), finished=len(c) < max_new_tokens)
            for o, c in zip(openers, continuations)]
