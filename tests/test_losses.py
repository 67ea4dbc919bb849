"""Math of the constrained objective: analytic gradients, limits in beta, golden values, chunked log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from guardtune.losses import (beta_schedule, chunked_kl, constrained_loss, constraint_weights, per_token_kl,
                              position_betas, reference_topk, scoped_positions, sft_loss, token_logps, topk_kl)


def test_beta_schedule_matches_paper():
    assert beta_schedule(8).tolist() == pytest.approx([0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1])
    assert beta_schedule(1).tolist() == pytest.approx([0.5])
    assert beta_schedule(3, first=1.0, early=3.0, early_until=2, rest=0.2).tolist() == pytest.approx([1.0, 3.0, 0.2])


def test_position_betas_explicit_list_and_tail():
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0], [0, 0, 1, 2, 1, 2, 3, 0, 0]])
    betas = position_betas(positions, [0.5, 2.0, 2.0, 2.0, 2.0], tail=0.1)
    assert betas[0].tolist() == pytest.approx([0.1, 0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1, 0.1])
    # t restarts at 1 for the second assistant turn of a multi-turn example.
    assert betas[1].tolist() == pytest.approx([0.1, 0.1, 0.5, 2.0, 0.5, 2.0, 2.0, 0.1, 0.1])


def _hand_loss(policy, ref, mask, betas):
    total, count = 0.0, 0
    for p, r, m, b in zip(policy, ref, mask, betas):
        if m:
            total += (2.0 / b) * math.log1p(math.exp(b * (r - p)))
            count += 1
    return total / count


GOLDEN = [
    # policy, ref, mask, betas, expected loss (pinned golden values, Eq. 3 evaluated in float64)
    ([-1.0, -2.0, -0.5, -3.0], [-1.0, -2.0, -0.5, -3.0], [1, 1, 1, 1], [0.5, 2.0, 2.0, 0.1], 4.5054567),
    ([-0.2, -4.0, -1.5, -0.7], [-1.0, -1.0, -1.0, -1.0], [1, 1, 0, 1], [0.5, 2.0, 2.0, 0.1], 7.2065767),
]


@pytest.mark.parametrize("policy, ref, mask, betas, expected", GOLDEN)
def test_golden_constrained_loss(policy, ref, mask, betas, expected):
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    loss = constrained_loss(t(policy), t(ref), t(mask), t(betas))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(_hand_loss(policy, ref, mask, betas), rel=1e-6)


def test_golden_equal_policy_and_reference_is_2_log2_over_beta():
    # At initialisation every token costs (2 / beta) * log 2.
    betas = torch.tensor([0.5, 2.0, 0.1])
    logps = torch.tensor([-1.0, -2.0, -3.0])
    loss = constrained_loss(logps, logps, torch.ones(3), betas)
    assert loss.item() == pytest.approx(sum(2 * math.log(2) / b for b in [0.5, 2.0, 0.1]) / 3, rel=1e-6)


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, hidden=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g))
        self.mix = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g) * 0.5)
        self.head = torch.nn.Linear(hidden, vocab)

    def hidden(self, ids):
        return torch.tanh(self.embed[ids] @ self.mix)


def _batch():
    ids = torch.tensor([[1, 4, 2, 7, 3, 9], [5, 5, 1, 0, 8, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])  # mask on target tokens
    positions = torch.tensor([[0, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5]])
    return ids, mask, positions


def _policy_logps(model, ids, mask):
    h = model.hidden(ids)[:, :-1]
    sel = mask[:, 1:].bool()
    return token_logps(h[sel], model.head, ids[:, 1:][sel], chunk_size=3), sel


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_at_initialisation_equals_cross_entropy():
    """policy == reference: the constrained gradient is exactly SFT's (weight 2 * sigmoid(0) = 1)."""
    model = TinyLM()
    ids, mask, positions = _batch()
    policy, sel = _policy_logps(model, ids, mask)
    betas = position_betas(positions[:, 1:][sel], [0.5, 2.0, 2.0, 2.0, 2.0], 0.1)
    ref = policy.detach().clone()
    ones = torch.ones_like(policy)
    g_constrained = _grads(model, constrained_loss(policy, ref, ones, betas))
    policy, _ = _policy_logps(model, ids, mask)
    g_sft = _grads(model, sft_loss(policy, ones))
    for a, b in zip(g_constrained, g_sft):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sft_loss_equals_torch_cross_entropy():
    model = TinyLM()
    ids, mask, _ = _batch()
    policy, sel = _policy_logps(model, ids, mask)
    logits = model.head(model.hidden(ids)[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits[sel], ids[:, 1:][sel])
    torch.testing.assert_close(sft_loss(policy, torch.ones_like(policy)), expected)


def test_beta_to_zero_recovers_sft_gradient_even_away_from_reference():
    policy = torch.tensor([-0.3, -2.5, -1.0, -4.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -3.0, -0.5])
    mask = torch.ones(4)
    (g_small_beta,) = torch.autograd.grad(constrained_loss(policy, ref, mask, torch.full((4,), 1e-6)), policy)
    (g_sft,) = torch.autograd.grad(sft_loss(policy, mask), policy)
    torch.testing.assert_close(g_small_beta, g_sft, rtol=1e-4, atol=1e-6)


def _train_free_logits(objective, beta, steps=400, lr=0.05):
    """Gradient descent on one free categorical pushing token 0 up from a fixed reference distribution."""
    ref_logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    logits = ref_logits.clone().requires_grad_(True)
    ref_logp = torch.log_softmax(ref_logits, -1)[0]
    for _ in range(steps):
        logp = torch.log_softmax(logits, -1)[0:1]
        if objective == "sft":
            loss = sft_loss(logp, torch.ones(1))
        else:
            loss = constrained_loss(logp, ref_logp.reshape(1), torch.ones(1), torch.full((1,), beta))
        (grad,) = torch.autograd.grad(loss, logits)
        logits = (logits - lr * grad).detach().requires_grad_(True)
    return (torch.log_softmax(logits, -1)[0] - ref_logp).item()


def test_large_beta_pins_policy_to_reference():
    drift_sft = _train_free_logits("sft", beta=None)
    drift_pinned = _train_free_logits("constrained", beta=50.0)
    drift_loose = _train_free_logits("constrained", beta=0.1)
    assert drift_sft > 2.0
    assert drift_pinned < 0.2  # the weight 2*sigmoid(beta*(ref - policy)) vanishes within ~few/beta nats
    assert drift_pinned < drift_loose <= drift_sft + 1e-6


def test_constraint_weights():
    policy = torch.tensor([-1.0, -1.0, -3.0])
    ref = torch.tensor([-1.0, -3.0, -1.0])
    w = constraint_weights(policy, ref, torch.tensor([2.0, 2.0, 2.0]))
    assert w[0].item() == pytest.approx(1.0)
    assert w[1].item() == pytest.approx(2 * torch.sigmoid(torch.tensor(-4.0)).item())  # above ref: fades to 0
    assert w[2].item() == pytest.approx(2 * torch.sigmoid(torch.tensor(4.0)).item())  # below ref: towards 2


def test_normalisation_over_accumulated_step():
    """Two micro-batches divided by the step's token count sum to the single-batch loss."""
    policy = torch.tensor([-0.5, -1.5, -2.5, -0.1, -0.9])
    ref = torch.tensor([-1.0, -1.0, -2.0, -0.2, -1.1])
    betas = torch.tensor([0.5, 2.0, 2.0, 0.1, 0.1])
    mask = torch.tensor([1, 1, 0, 1, 1])
    whole = constrained_loss(policy, ref, mask, betas)
    n = mask.sum()
    split = (constrained_loss(policy[:2], ref[:2], mask[:2], betas[:2], num_tokens=n)
             + constrained_loss(policy[2:], ref[2:], mask[2:], betas[2:], num_tokens=n))
    torch.testing.assert_close(whole, split)
    assert sft_loss(policy, mask).item() == pytest.approx(-(policy * mask).sum().item() / 4)


def test_token_logps_chunking_matches_full_log_softmax_and_backprops():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(37, 8, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    full = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    chunked = token_logps(hidden, head, targets, chunk_size=5)
    torch.testing.assert_close(chunked, full)
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    (g_chunk,) = torch.autograd.grad(token_logps(hidden, head, targets, chunk_size=5).sum(), hidden)
    torch.testing.assert_close(g_chunk, g_full)
    assert token_logps(hidden[:0], head, targets[:0]).shape == (0,)


def test_token_logps_softcap():
    head = torch.nn.Linear(4, 7)
    hidden = torch.randn(3, 4)
    targets = torch.tensor([0, 3, 6])
    capped = 2.0 * torch.tanh(head(hidden) / 2.0)
    expected = torch.log_softmax(capped, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(token_logps(hidden, head, targets, softcap=2.0), expected)


def test_per_token_kl_properties():
    p = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    assert per_token_kl(p, p).abs().max().item() < 1e-6
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    kl = per_token_kl(p, q)
    pp, qq = torch.softmax(p, -1), torch.softmax(q, -1)
    torch.testing.assert_close(kl, (pp * (pp.log() - qq.log())).sum(-1))
    assert (kl > 0).all()
    head = torch.nn.Linear(3, 5)
    h1, h2 = torch.randn(9, 3), torch.randn(9, 3)
    torch.testing.assert_close(chunked_kl(h1, h2, head, chunk_size=4), per_token_kl(head(h1), head(h2)))


# --- KL anchor: forward KL(reference || policy) on the reference's top-k tokens + a tail bucket ----------------------

def _logits(seed: int, m: int = 6, v: int = 40, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(m, v, generator=torch.Generator().manual_seed(seed)) * scale


def test_topk_kl_is_zero_with_zero_gradient_at_the_reference():
    ref = _logits(0)
    ids, logps = reference_topk(ref, 8)
    policy = ref.clone().requires_grad_(True)
    kl = topk_kl(policy, ids, logps)
    torch.testing.assert_close(kl, torch.zeros(6), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(kl.sum(), policy)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


def test_topk_kl_with_the_whole_vocabulary_equals_the_full_kl():
    ref, policy = _logits(1), _logits(2)
    ids, logps = reference_topk(ref, ref.shape[-1])
    full = per_token_kl(ref, policy)  # KL(ref || policy)
    torch.testing.assert_close(topk_kl(policy, ids, logps), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 16, 39])
def test_topk_kl_is_a_nonnegative_lower_bound_of_the_full_kl(k):
    ref, policy = _logits(3), _logits(4)
    ids, logps = reference_topk(ref, k)
    kl = topk_kl(policy, ids, logps)
    assert (kl >= -1e-6).all() and (kl <= per_token_kl(ref, policy) + 1e-5).all()


def test_topk_kl_gradient_restores_the_reference_mass():
    """d KL / d logit_v = p(v) - p_ref(v) on the top-k tokens: a policy that moved mass from the reference's
    favourite token onto another is pushed back, whichever token the data was training."""
    ref = torch.tensor([[4.0, 0.0, 0.0, 0.0]])  # the reference refuses: token 0
    policy = torch.tensor([[0.0, 4.0, 0.0, 0.0]], requires_grad=True)  # fine-tuned to comply: token 1
    ids, logps = reference_topk(ref, 4)
    (grad,) = torch.autograd.grad(topk_kl(policy, ids, logps).sum(), policy)
    expected = torch.softmax(policy.detach(), -1) - torch.softmax(ref, -1)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)
    assert grad[0, 0] < 0 < grad[0, 1]  # descent raises the refusal token, lowers the compliant one


def test_reference_topk_returns_sorted_log_probs():
    ids, logps = reference_topk(_logits(5), 5)
    assert ids.shape == logps.shape == (6, 5) and ids.dtype == torch.long
    assert (logps[:, :-1] >= logps[:, 1:]).all() and (logps <= 0).all()


def test_scoped_positions_give_the_tail_beta_to_examples_outside_the_scope():
    """constraint_scope 'refused': tokens of in-scope examples keep their position, the others are moved past the
    explicit betas so every one of their tokens gets beta_tail; t = 0 (not a response token) stays 0."""
    positions = torch.tensor([[0, 1, 2, 3, 6], [0, 1, 2, 3, 6]])
    early = torch.tensor([[True], [False]])
    scoped = scoped_positions(positions, early, 5)
    assert scoped.tolist() == [[0, 1, 2, 3, 6], [0, 6, 7, 8, 11]]
    betas = position_betas(scoped, (0.5, 2.0, 2.0, 2.0, 2.0), 0.1)
    assert betas[0, 1:].tolist() == pytest.approx([0.5, 2.0, 2.0, 0.1])
    assert betas[1, 1:].tolist() == pytest.approx([0.1] * 4)
