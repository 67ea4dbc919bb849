"""The token-wise constrained objective of Qi et al. (ICLR 2025) and its helpers, as pure tensor functions.

Shapes: B = batch, T = sequence length, N = number of selected (response) tokens, H = hidden size, V = vocab.
A provider with its own trainer can call these directly: `token_logps` turns hidden states into per-token
log-probs at response positions, `position_betas` maps response positions to beta_t, and `constrained_loss`
/ `sft_loss` reduce them. Nothing here touches a model, an optimizer or a file.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def beta_schedule(n_positions: int, first: float = 0.5, early: float = 2.0, early_until: int = 5,
                  rest: float = 0.1) -> torch.Tensor:
    """Per-position betas [n_positions] for t = 1..n_positions (Qi et al. 2025, Sec. 4.1).

    The paper constrains the first response tokens hard (beta_1 = 0.5, beta_2..5 = 2.0) and later ones weakly
    (beta_t = 0.1), because alignment lives mostly in the first few tokens. beta_1 is smaller than beta_2..5
    since the first token's distribution is where a fine-tune legitimately changes style the most.
    """
    t = torch.arange(1, n_positions + 1)
    betas = torch.full((n_positions,), float(rest))
    betas[(t >= 2) & (t <= early_until)] = float(early)
    if n_positions >= 1:
        betas[0] = float(first)
    return betas


def position_betas(response_positions: torch.Tensor, betas: Sequence[float] | torch.Tensor,
                   tail: float) -> torch.Tensor:
    """beta_t for every token: betas[t-1] for 1 <= t <= len(betas), `tail` after, and `tail` at t = 0.

    response_positions: [...] integer t per token (1-based within each assistant turn, 0 = not a response token).
    Returns a float tensor of the same shape. Values at t = 0 are never used (masked), but stay finite.
    """
    table = torch.as_tensor(betas, dtype=torch.float32, device=response_positions.device)
    t = response_positions.long()
    explicit = table[(t - 1).clamp(0, table.numel() - 1)]
    return torch.where((t >= 1) & (t <= table.numel()), explicit, explicit.new_full((), float(tail)))


def scoped_positions(response_positions: torch.Tensor, early: torch.Tensor, n_early: int) -> torch.Tensor:
    """The positions whose beta_t is looked up (position_betas) when only some examples get the early constraint:
    t itself where `early` is true, t moved past the n_early explicit betas where it is false (so those tokens get
    the tail beta at every position); t = 0 (not a response token) stays 0.

    response_positions and early: broadcastable integer / bool tensors."""
    t = response_positions.long()
    late = torch.where(t >= 1, t + n_early, t)
    return torch.where(early.bool(), t, late)


def _chunk_logps(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                 softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logps(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                chunk_size: int = 1024, softcap: float | None = None) -> torch.Tensor:
    """log p(target | context) for N selected positions, chunked over tokens.

    hidden: [N, H] final hidden states at the positions that PREDICT each target (i.e. position j-1 for the
    token at j); head: the output layer (lm_head); targets: [N] token ids. Returns [N] float32.

    Never materialises [B, T, V]: only `chunk_size` x V logits exist at a time, and under autograd each chunk is
    checkpointed, so its float32 logits are recomputed in backward instead of being kept for every chunk.
    `softcap` applies Gemma-2-style final logit soft-capping when the model config has one.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    pieces = []
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(
        p.requires_grad for p in getattr(head, "parameters", lambda: [])()))
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if needs_grad:
            pieces.append(checkpoint(_chunk_logps, head, h, y, softcap, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, h, y, softcap))
    return torch.cat(pieces)


def _normalizer(completion_mask: torch.Tensor, num_tokens: torch.Tensor | int | float | None) -> torch.Tensor:
    if num_tokens is None:
        num_tokens = completion_mask.sum()
    return torch.as_tensor(num_tokens, dtype=torch.float32, device=completion_mask.device).clamp(min=1)


def constrained_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, completion_mask: torch.Tensor,
                     betas: torch.Tensor, num_tokens: torch.Tensor | int | float | None = None) -> torch.Tensor:
    """Token-wise constrained fine-tuning objective, Qi et al. 2025, Eq. 3.

        l_t = (2 / beta_t) * softplus(beta_t * (ref_logp_t - policy_logp_t))
            = -(2 / beta_t) * log sigmoid(beta_t * (policy_logp_t - ref_logp_t))

    summed over response tokens and divided by `num_tokens`: the number of response tokens in the whole
    optimizer step (all gradient-accumulation micro-batches and devices), so every token weighs the same however
    the step is split. Without `num_tokens` the mask's own count is used (one micro-batch = one step).

    policy_logps, ref_logps, completion_mask, betas: same shape ([N] or [B, T]); mask is 0/1 (or bool).

    Gradient: d l_t / d policy_logp_t = -2 * sigmoid(beta_t * (ref - policy)), i.e. cross-entropy's gradient
    scaled by a weight in (0, 2) that is 1 at initialisation (policy == reference, so the first step equals
    SFT's), fades to 0 once the policy's token log-prob rises beta_t-many nats above the reference's, and grows
    towards 2 when the policy falls below it. ref_logps are constants (computed under no_grad from the
    frozen base, and detached here in case a caller passes a graph-attached tensor): the reference must not
    move, or the constraint would chase itself. beta -> 0 recovers SFT; large beta pins the token to the
    reference.
    """
    mask = completion_mask.to(policy_logps.dtype)
    betas = betas.to(policy_logps.dtype)
    per_token = (2.0 / betas) * F.softplus(betas * (ref_logps.detach() - policy_logps))
    return (per_token * mask).sum() / _normalizer(completion_mask, num_tokens)


def sft_loss(policy_logps: torch.Tensor, completion_mask: torch.Tensor,
             num_tokens: torch.Tensor | int | float | None = None) -> torch.Tensor:
    """Plain cross-entropy on response tokens, with the same masking and normalisation as constrained_loss."""
    mask = completion_mask.to(policy_logps.dtype)
    return -(policy_logps * mask).sum() / _normalizer(completion_mask, num_tokens)


@torch.no_grad()
def constraint_weights(policy_logps: torch.Tensor, ref_logps: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Per-token gradient weight 2 * sigmoid(beta_t * (ref - policy)) relative to cross-entropy (diagnostic).

    1.0 means the token is trained like SFT; near 0 means the constraint has stopped pushing it further from the
    reference. Logged per position bucket in train_metrics.json.
    """
    return 2.0 * torch.sigmoid(betas.to(policy_logps.dtype) * (ref_logps - policy_logps))


def reference_topk(ref_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's k most likely next tokens at each position: (ids [M, k] long, log-probs [M, k] float32).

    What the KL anchor stores per anchored position instead of a full [V] distribution (k=64: 512 bytes, not
    200 KB, per position on a 49k vocabulary)."""
    logprobs = torch.log_softmax(ref_logits.float(), dim=-1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return ids, values


def topk_kl(policy_logits: torch.Tensor, ref_topk_ids: torch.Tensor, ref_topk_logps: torch.Tensor) -> torch.Tensor:
    """Forward KL(reference || policy) per position on the reference's top-k tokens plus one tail bucket.

        KL_t = sum_{v in S_t} p_ref(v) log(p_ref(v) / p(v)) + r_ref log(r_ref / r),   r = 1 - sum_{v in S_t} p(v)

    policy_logits: [M, V]; ref_topk_ids / ref_topk_logps: [M, k] (reference_topk). Returns [M] float32, nats.

    This is the KL between the two distributions coarse-grained onto k + 1 outcomes (each top-k token, and
    "anything else"), so it is >= 0, never exceeds the full-vocabulary KL (data-processing inequality), equals it
    when the top-k hold all of the reference's mass, and is 0 with zero gradient where policy == reference.

    Why forward KL on the reference's top tokens: Eq. 3 constrains one target token's log-prob and, once that token
    has risen beta-many nats, simply stops pushing; it never pushes back. What makes an aligned model refuse at
    the first response tokens is the probability mass it puts on refusal tokens, and KL(ref || policy) charges
    exactly for moving that mass away: d KL / d logit_v = p(v) - p_ref(v) restores it whatever token the data
    trains (the KL anchor of guardtune's default objective, docs/objective.md).
    """
    logprobs = torch.log_softmax(policy_logits.float(), dim=-1)
    policy_top = logprobs.gather(-1, ref_topk_ids)
    policy_tail = torch.logsumexp(logprobs.scatter(-1, ref_topk_ids, float("-inf")), dim=-1)
    ref_top = ref_topk_logps.float()
    top = (ref_top.exp() * (ref_top - policy_top)).sum(-1)
    # The tail bucket: the reference's mass outside its top-k. Where that is (numerically) zero, or the top-k
    # is the whole vocabulary, the term is 0 * log(0 / r) = 0; masking it (not multiplying by 0) keeps
    # inf and NaN out of the graph.
    ref_tail_mass = 1.0 - ref_top.exp().sum(-1)
    has_tail = (ref_tail_mass > 1e-6) & torch.isfinite(policy_tail)
    safe_mass = torch.where(has_tail, ref_tail_mass, torch.ones_like(ref_tail_mass))
    safe_policy_tail = torch.where(has_tail, policy_tail, torch.zeros_like(policy_tail))
    tail = torch.where(has_tail, safe_mass * (torch.log(safe_mass) - safe_policy_tail), torch.zeros_like(top))
    return top + tail


def kl_anchor_loss(kl: torch.Tensor, weight: float, num_tokens: torch.Tensor | int | float) -> torch.Tensor:
    """The KL anchor's share of the step loss: weight * sum of topk_kl over the anchored positions, divided by the
    same response-token count as constrained_loss, so an anchored position weighs `weight` tokens' losses
    however the step is split across micro-batches and devices. kl: [M]."""
    return weight * kl.sum() / torch.as_tensor(num_tokens, dtype=torch.float32, device=kl.device).clamp(min=1)


def per_token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) per position over the vocabulary: [..., V] x 2 -> [...] (float32, nats)."""
    policy_logprobs = torch.log_softmax(policy_logits.float(), dim=-1)
    ref_logprobs = torch.log_softmax(ref_logits.float(), dim=-1)
    return (policy_logprobs.exp() * (policy_logprobs - ref_logprobs)).sum(dim=-1)


@torch.no_grad()
def chunked_kl(policy_hidden: torch.Tensor, ref_hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
               chunk_size: int = 256, softcap: float | None = None) -> torch.Tensor:
    """per_token_kl from hidden states [N, H] of both models through one output layer, chunked over N."""
    pieces = []
    for start in range(0, policy_hidden.shape[0], chunk_size):
        p = head(policy_hidden[start:start + chunk_size]).float()
        q = head(ref_hidden[start:start + chunk_size]).float()
        if softcap:
            p, q = softcap * torch.tanh(p / softcap), softcap * torch.tanh(q / softcap)
        pieces.append(per_token_kl(p, q))
    return torch.cat(pieces) if pieces else policy_hidden.new_zeros(0, dtype=torch.float32)
