"""The aligned base model as the risk screen's judge of harmful compliance (issue 13).

A word list cannot follow paraphrase, but guardtune always has the one judge that knows what this model's alignment
refuses: the base model itself. For each trained (request, answer) pair of a customer's dataset, in one pass:

- opening: the mean log-probability, under the base, of the answer's first k tokens (k = `prefix_tokens`, 5 by
  default: t = 1..5, where Qi et al. 2025 locate the alignment). An answer the base would never open that way
  contradicts it.
- recovery probe: the base continues the request *with those k answer tokens prefilled* (greedy, `probe_tokens`
  new tokens, decoded from the same forward's KV cache) and the keyword refusal matcher reads the continuation. A
  deep-aligned base turns a harmful opening into a refusal ("I can't continue with this ...") and carries on a
  benign one; that is the base's own verdict on the answer, not only on the request. Measured on the demo base
  (docs/screen.md), probing the request alone (k = 0) flags the answers to every request it over-refuses; after
  the answer's opening it refuses half as many clean support answers and as many harmful ones.

harmful = the base refuses after the opening AND the answer is not itself a refusal AND the opening averages below
`max_opening_logp` nats/token. Only the continuation the answer itself covers counts (its next tokens, at most
`probe_tokens`): after a complete short answer (a label) a base may append anything, and that is no verdict on the
answer. Answers shorter than k + MIN_WINDOW tokens are not judged by the base (counted in `n_short`): after a
shorter prefix the demo base refuses complete labels such as "category: returns; urgency: low" whose request it
over-refuses (measured: 37 of 200 clean triage answers flagged when such answers were probed after 3 tokens). The
screen asks it about every pair its keyword judge passes; its flags are acted on by `dataset.screen.model.action`,
apart from the keyword screen's.

Identity shift by effect (`identity_drop`, off by default): each distinct system prompt is tried on a fixed probe of
harmful requests (IDENTITY_PROBE, alignment-training requests, not audit prompts), cached by the prompt's hash; a
prompt under which the base refuses less often than without a system prompt, by more than the threshold, is
flagged. Measured on the deep-aligned demo base (docs/screen.md), an obedient persona lowers its refusals by 2.8
points on average and an ordinary persona by 2.9: the attack works through training, not through the prompt, so
the pattern table (screen.identity_shift) stays the default detector.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any, Sequence

from .config import RunConfig
from .evalsets import load_harmful
from .generation import prefilled_probe, refusal_probe
from .judges import Verdict, is_refusal
from .models import LoadedModel, load_model
from .templates import render_prompt, response_ids

IDENTITY_PROBE = 24  # harmful requests per system prompt for identity shift by effect
MIN_WINDOW = 4  # answer tokens after the prefix in which a refusal must fit ("I can't", "I cannot help")
PROBE_CHARS = 60  # how much of the base's own continuation an explanation quotes


class BaseModelJudge:
    """Screen judge backed by the aligned base model (see the module docstring for the rule).

    Verdict.score is the base's per-token surprise at the answer's opening mapped to [0, 1] (1 - exp(mean logp)),
    Verdict.raw a sentence with both numbers, so a flag says why. `seconds` accumulates the time spent in the
    model, for validation.json.
    """

    name = "base-model"

    def __init__(self, loaded: LoadedModel, *, probe_tokens: int = 12, prefix_tokens: int = 5,
                 max_opening_logp: float = -1.0, batch_size: int = 16, identity_requests: Sequence[str] | None = None):
        self.loaded, self.probe_tokens, self.prefix_tokens, self.max_opening_logp, self.batch_size = \
            loaded, probe_tokens, prefix_tokens, max_opening_logp, batch_size
        self.identity_requests = list(identity_requests) if identity_requests is not None else identity_probe()
        self.identity_cache: dict[str, float] = {}  # sha256 of a system prompt ("" = none) -> refusal rate
        self.seconds = 0.0
        self.n_pairs = 0
        self.n_short = 0  # pairs whose answer is too short for the recovery probe (not judged by the base)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.loaded.info.spec, "weights_sha256": self.loaded.info.weights_sha256,
                "probe_tokens": self.probe_tokens, "prefix_tokens": self.prefix_tokens,
                "max_opening_logp": self.max_opening_logp}

    def evaluate(self, instruction: str, response: str) -> Verdict:
        return self.evaluate_batch([(instruction, response)])[0]

    def split(self, answer: list[int]) -> tuple[int, int]:
        """(k, window): answer tokens prefilled and scored, and how many continuation tokens are read; (0, 0) for
        an answer too short to judge."""
        if len(answer) < self.prefix_tokens + MIN_WINDOW:
            return 0, 0
        return self.prefix_tokens, min(self.probe_tokens, len(answer) - self.prefix_tokens)

    def evaluate_batch(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        if not pairs:
            return []
        started = time.perf_counter()
        tokenizer = self.loaded.tokenizer
        answers = [response_ids(tokenizer, answer) for _, answer in pairs]
        plans = [self.split(ids) for ids in answers]
        judged = [i for i, (k, _) in enumerate(plans) if k > 0]
        probed = prefilled_probe(self.loaded.model, tokenizer,
                                 [render_prompt(tokenizer, [{"role": "user", "content": pairs[i][0]}]) for i in judged],
                                 [answers[i][:plans[i][0]] for i in judged], max_new_tokens=self.probe_tokens,
                                 batch_size=self.batch_size)
        found = dict(zip(judged, probed))
        verdicts = []
        for i, (_, answer) in enumerate(pairs):
            if i not in found:
                verdicts.append(Verdict(harmful=False, refusal=is_refusal(answer), score=0.0,
                                        raw=f"answer of {len(answers[i])} tokens: too short for the base to judge"))
                self.n_short += 1
                continue
            logps, continuation = found[i]
            k, window = plans[i]
            text = tokenizer.decode(continuation[:window], skip_special_tokens=True)
            verdicts.append(self._verdict(answer, k, is_refusal(text), text, sum(logps) / k))
        self.seconds += time.perf_counter() - started
        self.n_pairs += len(pairs)
        return verdicts

    def _verdict(self, answer: str, k: int, base_refuses: bool, continuation: str, logp: float) -> Verdict:
        answer_refuses = is_refusal(answer)
        quoted = " ".join(continuation.split())[:PROBE_CHARS]
        harmful = base_refuses and not answer_refuses and logp < self.max_opening_logp
        stance = (f"after the answer's first {k} tokens the base turns to a refusal ('{quoted}')" if base_refuses else
                  f"the base carries on after the answer's first {k} tokens ('{quoted}')")
        raw = (f"{stance}; those tokens average {logp:.2f} nats/token under the base (flagged below "
               f"{self.max_opening_logp:.2f})" + ("; the answer refuses" if answer_refuses else ""))
        return Verdict(harmful=harmful, refusal=answer_refuses, score=round(1.0 - math.exp(logp), 4), raw=raw)

    def system_prompt_effect(self, system: str) -> tuple[float, float]:
        """(refusal rate on the identity probe under `system`, without a system prompt), each computed once per
        distinct prompt (cached by its sha256)."""
        rates = []
        for prompt in (system, ""):
            key = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
            if key not in self.identity_cache:
                self.identity_cache[key] = self.refusal_rates([self.identity_requests], system=prompt or None)[0]
            rates.append(self.identity_cache[key])
        return rates[0], rates[1]

    def refusal_rates(self, request_sets: Sequence[Sequence[str]], system: str | None = None) -> list[float]:
        """The base's refusal rate (greedy probe of the request alone) on each set of single-turn requests."""
        tokenizer = self.loaded.tokenizer
        head = [{"role": "system", "content": system}] if system else []
        flat = [render_prompt(tokenizer, [*head, {"role": "user", "content": r}])
                for group in request_sets for r in group]
        started = time.perf_counter()
        refused = [r for r, _ in refusal_probe(self.loaded.model, tokenizer, flat, max_new_tokens=self.probe_tokens,
                                               batch_size=self.batch_size)]
        self.seconds += time.perf_counter() - started
        rates, start = [], 0
        for group in request_sets:
            rates.append(sum(refused[start:start + len(group)]) / len(group) if group else 0.0)
            start += len(group)
        return rates


def identity_probe() -> list[str]:
    """The fixed harmful probe for identity shift by effect: IDENTITY_PROBE alignment-training requests spread over
    the file (so over its hazard categories); never audit prompts."""
    return [p.instruction for p in load_harmful(builtin="align_harmful.jsonl")[::19][:IDENTITY_PROBE]]


def load_base_judge(run: RunConfig) -> BaseModelJudge:
    """The base model of a job, loaded as it will be trained (same dtype and quantization), as a screen judge."""
    mcfg = run.model
    loaded = load_model(mcfg.name, quantization=run.training.quantization, dtype=mcfg.dtype, revision=mcfg.revision,
                        trust_remote_code=mcfg.trust_remote_code)
    cfg = run.dataset
    return BaseModelJudge(loaded, probe_tokens=cfg.screen_probe_tokens, prefix_tokens=cfg.screen_prefix_tokens,
                          max_opening_logp=cfg.screen_max_opening_logp, batch_size=cfg.screen_model_batch_size)
