"""Log-probabilities of a causal LM's own tokens, shared by training (the loss) and the audit (the KL profile):
the final hidden states through the model's own forward, and the output head applied only where it is needed."""

from __future__ import annotations

from typing import Sequence

import torch

from . import losses


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T] for teacher-forced passes: right padding keeps every real token at the
    position an unpadded pass would give it (the forward is causal, so pads after a sequence are unseen)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The output layer (lm_head) of a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def logit_softcap(model: torch.nn.Module) -> float | None:
    config = getattr(model, "config", None)
    return getattr(config, "final_logit_softcapping", None) if config is not None else None


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states [B, T, H] through the model's own forward.

    The decoder's output is caught with a forward hook, so no per-layer hidden states are collected
    (`output_hidden_states=True` cost ~10% of a forward on the embedded model), and `logits_to_keep=1` makes
    the forward project one position only: the full-vocabulary projection happens later, chunked, at response
    positions alone (losses.token_logps). Calling the top-level forward (not the inner decoder) keeps DDP's
    and PEFT's forward hooks in the loop.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP-wrapped
    captured: list[torch.Tensor] = []
    handle = base.get_decoder().register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else
                                                     output.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def response_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor, unwrapped: torch.nn.Module | None = None,
                   chunk_size: int = 1024, return_hidden: bool = False):
    """log p(token_j | tokens_<j) for every response token j (completion_mask[j] = 1), flattened [N]
    (and the final hidden states [B, T, H] with return_hidden, for the KL anchor).

    `unwrapped` is the PEFT/HF model inside any DDP wrapper (for its output layer and config); the forward
    itself goes through `model` so distributed hooks run.
    """
    unwrapped = unwrapped if unwrapped is not None else model
    hidden = final_hidden(model, input_ids, attention_mask)
    select = completion_mask[:, 1:].bool()
    logps = losses.token_logps(hidden[:, :-1][select], output_head(unwrapped), input_ids[:, 1:][select],
                               chunk_size=chunk_size, softcap=logit_softcap(unwrapped))
    return (logps, hidden) if return_hidden else logps
