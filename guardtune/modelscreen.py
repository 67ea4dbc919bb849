"""The aligned base model as the risk screen's judge of harmful compliance (issue 13).

A word list cannot follow paraphrase, but guardtune always has the one judge that knows what this model's alignment
refuses: the base model itself. For each trained (request, answer) pair of a customer's dataset:

- probe: the base answers the request alone (greedy, `probe_tokens` new tokens); the keyword refusal matcher reads
  the probe. A base that refuses the request is the base's own verdict that the request is one to refuse.
- opening: the mean log-probability, under the base, of the answer's first OPENING_TOKENS tokens (t = 1..5: where
  Qi et al. 2025 locate the alignment). An answer the base would never open that way contradicts it.

harmful = the base refuses AND the answer is not itself a refusal AND its opening averages below
`max_opening_logp` nats/token. The screen asks it about every pair its keyword judge passes; its flags are acted
on by `dataset.screen.model.action`, apart from the keyword screen's (see screen.screen_records).

Measured premise (docs/screen.md): the deep-aligned demo base refuses 94% of held-out harmful requests, so an
answer that complies with one stands out; but an identity-shifting system prompt does not lower its refusals at
all (AOA persona: 100% refusal vs 94% without), so a system prompt's effect on the *base* cannot find identity
shift; those prompts stay with the pattern table (screen.identity_shift).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch

from .config import RunConfig
from .generation import refusal_probe
from .judges import Verdict, is_refusal
from .logprobs import response_logps, right_pad
from .models import LoadedModel, load_model
from .templates import render_prompt, response_ids

OPENING_TOKENS = 5  # the answer positions scored under the base: t = 1..5, where shallow alignment lives
PROBE_CHARS = 60  # how much of the base's own probe answer an explanation quotes


class BaseModelJudge:
    """Screen judge backed by the aligned base model (see the module docstring for the rule).

    Verdict.score is the base's per-token surprise at the answer's opening mapped to [0, 1] (1 - exp(mean logp)),
    Verdict.raw a sentence with both numbers, so a flag says why. `seconds` accumulates the time spent in the
    model, for validation.json.
    """

    name = "base-model"

    def __init__(self, loaded: LoadedModel, *, probe_tokens: int = 12, max_opening_logp: float = -1.0,
                 batch_size: int = 16):
        self.loaded, self.probe_tokens, self.max_opening_logp, self.batch_size = \
            loaded, probe_tokens, max_opening_logp, batch_size
        self.seconds = 0.0
        self.n_pairs = 0

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.loaded.info.spec, "weights_sha256": self.loaded.info.weights_sha256,
                "probe_tokens": self.probe_tokens, "max_opening_logp": self.max_opening_logp,
                "opening_tokens": OPENING_TOKENS}

    def evaluate(self, instruction: str, response: str) -> Verdict:
        return self.evaluate_batch([(instruction, response)])[0]

    def evaluate_batch(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        if not pairs:
            return []
        started = time.perf_counter()
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        prompts = [render_prompt(tokenizer, [{"role": "user", "content": request}]) for request, _ in pairs]
        openings = [response_ids(tokenizer, answer)[:OPENING_TOKENS] for _, answer in pairs]
        probes = refusal_probe(model, tokenizer, prompts, max_new_tokens=self.probe_tokens,
                               batch_size=self.batch_size)
        was_training = model.training
        model.eval()
        try:
            opening_logps = self.opening_logps(prompts, openings)
        finally:
            model.train(was_training)
        verdicts = [self._verdict(answer, refused, probe, logp)
                    for (_, answer), (refused, probe), logp in zip(pairs, probes, opening_logps)]
        self.seconds += time.perf_counter() - started
        self.n_pairs += len(pairs)
        return verdicts

    def _verdict(self, answer: str, base_refuses: bool, probe: str, logp: float | None) -> Verdict:
        answer_refuses = is_refusal(answer)
        quoted = " ".join(probe.split())[:PROBE_CHARS]
        if logp is None:  # an empty answer: nothing to contradict the base with
            return Verdict(harmful=False, refusal=answer_refuses, score=0.0, raw="empty answer")
        contradicts = logp < self.max_opening_logp
        harmful = base_refuses and not answer_refuses and contradicts
        stance = f"the base refuses this request ('{quoted}')" if base_refuses else \
            f"the base answers this request ('{quoted}')"
        raw = (f"{stance}; the answer's first {OPENING_TOKENS} tokens average {logp:.2f} nats/token under the base "
               f"(flagged below {self.max_opening_logp:.2f})" + ("; the answer refuses" if answer_refuses else ""))
        return Verdict(harmful=harmful, refusal=answer_refuses, score=round(1.0 - math.exp(logp), 4),
                       raw=raw)

    def refusal_rates(self, request_sets: Sequence[Sequence[str]]) -> list[float]:
        """The base's refusal rate (greedy probe) on each set of single-turn requests, in one generation pass."""
        tokenizer = self.loaded.tokenizer
        flat = [render_prompt(tokenizer, [{"role": "user", "content": r}]) for group in request_sets for r in group]
        started = time.perf_counter()
        refused = [r for r, _ in refusal_probe(self.loaded.model, tokenizer, flat, max_new_tokens=self.probe_tokens,
                                               batch_size=self.batch_size)]
        self.seconds += time.perf_counter() - started
        rates, start = [], 0
        for group in request_sets:
            rates.append(sum(refused[start:start + len(group)]) / len(group) if group else 0.0)
            start += len(group)
        return rates

    @torch.no_grad()
    def opening_logps(self, prompts: Sequence[Sequence[int]], openings: Sequence[Sequence[int]]) -> list[float | None]:
        """Mean log p_base(opening token | prompt, earlier opening tokens) per pair (None for an empty opening)."""
        model, pad_id = self.loaded.model, self.loaded.tokenizer.pad_token_id
        device = next(model.parameters()).device
        out: list[float | None] = [None] * len(prompts)
        order = [i for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if openings[i]]
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            seqs = [list(prompts[i]) + list(openings[i]) for i in rows]
            ids, mask = right_pad(seqs, pad_id, device)
            completion = torch.zeros_like(mask)
            for r, i in enumerate(rows):
                completion[r, len(prompts[i]):len(seqs[r])] = 1
            logps = response_logps(model, ids, mask, completion).float().cpu()
            position = 0
            for i in rows:
                n = len(openings[i])
                out[i] = float(logps[position:position + n].mean())
                position += n
        return out


def load_base_judge(run: RunConfig) -> BaseModelJudge:
    """The base model of a job, loaded as it will be trained (same dtype and quantization), as a screen judge."""
    mcfg = run.model
    loaded = load_model(mcfg.name, quantization=run.training.quantization, dtype=mcfg.dtype, revision=mcfg.revision,
                        trust_remote_code=mcfg.trust_remote_code)
    return BaseModelJudge(loaded, probe_tokens=run.dataset.screen_probe_tokens,
                          max_opening_logp=run.dataset.screen_max_opening_logp,
                          batch_size=run.dataset.screen_model_batch_size)
