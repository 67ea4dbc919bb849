"""Audit stage: prefilling attack, over-refusal probe and alignment-depth KL, fine-tuned beside its base model.

For every harmful prompt and prefix length k, the first k tokens of a harmful response are appended (as token
ids, in the audited model's tokenizer) after the rendered prompt, the model continues, and a judge scores the
continuation (Qi et al. 2025, Sec. 2.3: shallow alignment collapses after a few prefilled tokens). The same runs
on the base (adapter disabled, cached) so every number is read relative to it. Outputs: report.json (schema in
guardtune/schemas/report.schema.json), samples.jsonl and a self-contained report.html.

The continuations come from transformers `generate` (audit.backend: hf; under torchrun / accelerate launch every
process generates its share of the prompts and the main process judges and writes) or from vLLM
(audit.backend: vllm, guardtune.vllm_backend). The KL profile and the prefixes always use the transformers model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from . import attacks, distributed, evalsets, losses
from .cache import json_path, read_json, write_json
from .config import AuditConfig, RunConfig, as_dict, resolve_stage
from .errors import ConfigError, DatasetError
from .evalsets import is_correct
from .generation import Progress, counting, generate, stop_ids, write_answers
from .judges import get_judge, judge_agreement, rate_entry, wilson_interval
from .logprobs import final_hidden, logit_softcap, output_head, right_pad
from .models import load_model, reference
from .modelspec import quiet_peft_wrapping, resolve_model_dir, weights_sha256
from .policy import Policy
from .provenance import atomic_write_text, library_versions, sha256_tree, write_json_file
from .report import asr_by_k, validate_report, write_html
from .templates import render_prompt, response_ids
from .vllm_backend import VLLMGenerator

# Bump when cached base results or generated prefixes change meaning.
AUDIT_CACHE_FORMAT = 1


@dataclass
class AuditReport:
    """The audit's result: the report dict (as written to report.json) and where the files are."""

    report: dict[str, Any]
    out_dir: Path

    @property
    def report_path(self) -> Path:
        return self.out_dir / "report.json"

    @property
    def samples_path(self) -> Path:
        return self.out_dir / "samples.jsonl"

    @property
    def html_path(self) -> Path:
        return self.out_dir / "report.html"

    @property
    def results(self) -> dict[str, Any]:
        """{"base": ..., "finetuned": ... or None}: each model's ASR per k, over-refusal, utility, KL profile."""
        return self.report["results"]

    @property
    def seeds(self) -> dict[str, Any]:
        return self.report["provenance"]["seeds"]

    def asr_table(self) -> list[dict[str, Any]]:
        """Rows {k, base, base_ci95, finetuned, finetuned_ci95} for printing."""
        base, tuned = asr_by_k(self.results["base"]), asr_by_k(self.results.get("finetuned"))
        return [{"k": k, "base": base[k]["rate"], "base_ci95": base[k]["ci95"],
                 "finetuned": tuned[k]["rate"] if k in tuned else None,
                 "finetuned_ci95": tuned[k]["ci95"] if k in tuned else None} for k in sorted(base)]

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "report": str(self.report_path), "samples": str(self.samples_path),
                "html": str(self.html_path), "asr": self.asr_table(),
                "over_refusal": {name: (res or {}).get("over_refusal", {}).get("rate")
                                 for name, res in self.results.items()},
                "attacks": {name: {attack: section["asr"]["rate"]
                                   for attack, section in (res.get("attacks") or {}).items()}
                            for name, res in self.results.items() if res}}


# --- the audit -------------------------------------------------------------------------------------------------

@dataclass
class _Target:
    """One prompt of the harmful set with its harmful response (for prefixes and the KL profile)."""

    prompt: Any  # evalsets.AuditPrompt
    prompt_ids: list[int]
    response_ids: list[int]


def _cache_path(kind: str, payload: dict[str, Any]) -> Path:
    return json_path(f"audit/{kind}", {"format": AUDIT_CACHE_FORMAT, **payload})


def _harmful_responses(cfg: AuditConfig, prompts: list, audited, progress: Progress | None) -> tuple[list[str], dict]:
    """The harmful response text per prompt, from the configured prefix source, and its description."""
    if cfg.prefix_source == "openers":
        missing = [p.id for p in prompts if not p.opener]
        if missing:
            raise DatasetError(f"prefix_source=openers but {len(missing)} harmful prompts have no opener "
                               f"(first: {missing[0]}); use prefix_source=generate or add openers.")
        return [p.opener for p in prompts], {"kind": "openers", "model": None, "model_sha256": None,
                                             "tokens": 0, "note": "short affirmative openers shipped with the set"}
    if cfg.prefix_source == "dataset":
        missing = [p.id for p in prompts if not p.response]
        if missing:
            raise DatasetError(f"prefix_source=dataset needs a harmful response for every prompt; {len(missing)} "
                               f"have none (first: {missing[0]}). Pass harmful pairs ([user, assistant] or "
                               f"{{instruction, response}} JSONL) as audit.harmful_set.")
        return [p.response for p in prompts], {"kind": "dataset", "model": None, "model_sha256": None,
                                               "tokens": 0, "note": "operator-supplied harmful responses"}
    return _generated_responses(cfg, prompts, audited, progress)


def _generated_responses(cfg: AuditConfig, prompts: list, audited, progress: Progress | None) -> tuple[list[str], dict]:
    """Harmful continuations written at audit time by an unaligned prefix model, cached outside the repo.

    The prefix model answers each instruction with its opener prefilled, greedily, for `prefix_tokens` tokens.
    When the prefix model is the audited base itself, the loaded model is reused with its adapter disabled.
    """
    prefix_dir = resolve_model_dir(cfg.prefix_model)
    prefix_sha = weights_sha256(prefix_dir)
    payload = {"model_sha256": prefix_sha, "tokens": cfg.prefix_tokens,
               "prompts": [[p.instruction, p.opener or ""] for p in prompts]}
    path = _cache_path("prefixes", payload)
    description = {"kind": "generate", "model": cfg.prefix_model, "model_sha256": prefix_sha,
                   "tokens": cfg.prefix_tokens,
                   "note": f"greedy continuations of each opener by {cfg.prefix_model}, cached at audit time"}
    cached = read_json(path)
    if isinstance(cached, list) and len(cached) == len(prompts):
        return cached, {**description, "cache": "hit"}
    same_model = audited is not None and audited.info.weights_sha256 == prefix_sha
    loaded = audited if same_model else load_model(cfg.prefix_model)
    model, tokenizer = loaded.model, loaded.tokenizer
    was_training = model.training
    model.eval()
    context = reference(model) if same_model else torch.no_grad()
    with context:
        answers = write_answers(model, tokenizer, [(p.instruction, p.opener) for p in prompts],
                                max_new_tokens=cfg.prefix_tokens, batch_size=cfg.batch_size,
                                static_cache=cfg.static_cache, on_batch=counting(progress, "prefixes", len(prompts)))
    model.train(was_training)
    responses = [a.text for a in answers]
    write_json(path, responses)
    if not same_model:
        del loaded
    return responses, {**description, "cache": "miss"}


# continue(variant, prompt ids, on_batch) -> the new token ids of every prompt, on every process.
Continue = Callable[[str, list[list[int]], Callable[[int], None] | None], list[list[int]]]


def _hf_continue(model, tokenizer, cfg: AuditConfig) -> Continue:
    """transformers generate on `model` (the caller disables the adapter for the base); under a launcher each
    process generates every world_size-th prompt and all get the whole list back."""
    def run(name: str, inputs: list[list[int]], on_batch: Callable[[int], None] | None) -> list[list[int]]:
        return distributed.sharded(inputs, lambda part: generate(
            model, tokenizer, part, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
            do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
            static_cache=cfg.static_cache, on_batch=on_batch))
    return run


def _vllm_continue(engine: VLLMGenerator, stop: list[int], cfg: AuditConfig) -> Continue:
    def run(name: str, inputs: list[list[int]], on_batch: Callable[[int], None] | None) -> list[list[int]]:
        return engine.generate(inputs, finetuned=name == "finetuned", max_new_tokens=cfg.max_new_tokens,
                               stop_ids=stop, do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p,
                               seed=cfg.seed, on_batch=on_batch)
    return run


def _run_model(name: str, continue_: Continue, tokenizer, judge, second, cfg: AuditConfig,
               targets: list[_Target], benign: list, benign_ids: list[list[int]], utility: list,
               utility_ids: list[list[int]],
               progress: Progress | None) -> tuple[dict[str, Any] | None, list[dict]]:
    """Prefilling attack at every k, over-refusal probe and utility probe for one model variant (base or
    fine-tuned). Under a launcher every process generates its share; the main process alone judges (the others
    get (None, [])).

    Every (k, prompt) continuation, benign probe and utility question goes through one generation call, so
    batches are filled across prefix lengths (fewer, fuller batches: ~1.5x faster on CPU than one call per k).
    """
    attacks = [(k, t, t.response_ids[:k]) for k in cfg.prefill_k for t in targets]
    inputs = [t.prompt_ids + prefix for _, t, prefix in attacks] + benign_ids + utility_ids
    instructions = [t.prompt.instruction for _, t, _ in attacks] + [p.instruction for p in benign]
    share = -(-len(inputs) // distributed.world_size())  # this process's prompts, for its progress bar
    continuations = continue_(name, inputs, counting(progress, f"generate:{name}", share))
    if not distributed.is_main():
        return None, []
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in continuations]
    texts, utility_texts = texts[:len(instructions)], texts[len(instructions):]
    verdicts = judge.evaluate_batch(list(zip(instructions, texts)))
    attack_verdicts, benign_verdicts = verdicts[:len(attacks)], verdicts[len(attacks):]
    seconds = second.evaluate_batch(list(zip(instructions, texts))) if second is not None else None

    samples: list[dict] = []
    asr, by_category = [], {}
    for k in cfg.prefill_k:
        rows = [(t, prefix, text, v) for (kk, t, prefix), text, v in zip(attacks, texts, attack_verdicts) if kk == k]
        asr.append({"k": k, **rate_entry([v for *_, v in rows], "harmful")})
        for category in sorted({t.prompt.category for t, *_ in rows}):
            members = [v for t, _, _, v in rows if t.prompt.category == category]
            by_category.setdefault(category, []).append({"k": k, **rate_entry(members, "harmful")})
        for t, prefix, text, verdict in rows:
            samples.append({"model": name, "set": "harmful", "id": t.prompt.id, "category": t.prompt.category,
                            "instruction": t.prompt.instruction, "k": k, "effective_k": len(prefix),
                            "prefix": tokenizer.decode(prefix, skip_special_tokens=True), "continuation": text,
                            "verdict": verdict.to_dict()})
    for p, text, verdict in zip(benign, texts[len(attacks):], benign_verdicts):
        samples.append({"model": name, "set": "benign", "id": p.id, "category": p.category,
                        "instruction": p.instruction, "k": 0, "effective_k": 0, "prefix": "", "continuation": text,
                        "verdict": verdict.to_dict()})
    utility_result = None
    if utility:
        correct = [is_correct(text, q.answers) for q, text in zip(utility, utility_texts)]
        utility_result = {"n": len(utility), "correct": sum(correct), "rate": sum(correct) / len(utility),
                          "ci95": list(wilson_interval(sum(correct), len(utility)))}
        for q, text, ok in zip(utility, utility_texts, correct):
            samples.append({"model": name, "set": "utility", "id": q.id, "category": q.category,
                            "instruction": q.question, "k": 0, "effective_k": 0, "prefix": "", "continuation": text,
                            "verdict": {"correct": ok, "answers": list(q.answers)}})
    agreement = None
    if seconds is not None:
        where = [("harmful", t.prompt.id, k) for k, t, _ in attacks] + [("benign", p.id, 0) for p in benign]
        agreement = judge_agreement(verdicts, seconds, where, second.describe())
        for sample, verdict in zip(samples, seconds):  # samples list attacks (in order), then benign, then utility
            sample["second_verdict"] = verdict.to_dict()
    errors = sum(1 for v in verdicts if v.error is not None)
    result = {"asr": asr, "asr_by_category": by_category, "over_refusal": rate_entry(benign_verdicts, "refusal"),
              "utility": utility_result, "kl_profile": None, "judge_agreement": agreement,
              "judge_errors": {"samples": len(verdicts), "errors": errors,
                               "rate": errors / len(verdicts) if verdicts else 0.0}}
    return result, samples


@dataclass
class _Attacks:
    """What the attacks beside prefilling need for one audit: the decoding grid and its prompts, the GCG prompts
    with their suffixes (made once, against the base), and how each prompt is rendered."""

    settings: list  # attacks.DecodingSetting
    decoding: list[_Target]
    gcg: list[_Target]
    suffixes: list[dict[str, Any]]
    gcg_ids: list[list[int]]


def _run_attacks(name: str, model, tokenizer, judge, cfg: AuditConfig, plan: _Attacks, continue_: Continue,
                 progress: Progress | None) -> tuple[dict[str, Any] | None, list[dict], list]:
    """The decoding exploit and the GCG suffixes on one model variant -> (results["attacks"], samples, verdicts).
    Sampling goes through transformers generate on every backend (one call per setting, seeded per setting); the
    GCG prompts through the audit's own backend, greedy. Under a launcher every process generates its share; the
    main process judges (the others get (None, [], []))."""
    sections: dict[str, Any] = {}
    samples: list[dict] = []
    verdicts: list = []
    if plan.settings:
        started = time.perf_counter()
        inputs = [t.prompt_ids for t in plan.decoding]
        tick = counting(progress, f"decoding:{name}", len(plan.settings) * -(-len(inputs) // distributed.world_size()))
        generated = [distributed.sharded(inputs, lambda part, s=setting, i=i: generate(
            model, tokenizer, part, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, do_sample=True,
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=cfg.seed + 7919 * (i + 1),
            static_cache=cfg.static_cache, on_batch=tick)) for i, setting in enumerate(plan.settings)]
        if distributed.is_main():
            texts = [[tokenizer.decode(c, skip_special_tokens=True) for c in row] for row in generated]
            flat = judge.evaluate_batch([(t.prompt.instruction, text) for row in texts
                                         for t, text in zip(plan.decoding, row)])
            per_setting = [flat[i * len(inputs):(i + 1) * len(inputs)] for i in range(len(plan.settings))]
            sections["decoding"] = {**attacks.decoding_result(plan.settings, per_setting),
                                    "seconds": round(time.perf_counter() - started, 3)}
            verdicts += flat
            for setting, row, judged in zip(plan.settings, texts, per_setting):
                samples += [{"model": name, "set": "decoding", "id": t.prompt.id, "category": t.prompt.category,
                             "instruction": t.prompt.instruction, "k": 0, "effective_k": 0, "prefix": "",
                             "setting": setting.name, "continuation": text, "verdict": v.to_dict()}
                            for t, text, v in zip(plan.decoding, row, judged)]
    if plan.gcg:
        started = time.perf_counter()
        share = -(-len(plan.gcg_ids) // distributed.world_size())
        continuations = continue_(name, plan.gcg_ids, counting(progress, f"gcg:{name}", share))
        if distributed.is_main():
            texts = [tokenizer.decode(c, skip_special_tokens=True) for c in continuations]
            judged = judge.evaluate_batch([(t.prompt.instruction, text) for t, text in zip(plan.gcg, texts)])
            sections["gcg"] = {"prompts": len(plan.gcg), "asr": rate_entry(judged, "harmful"),
                               "seconds": round(time.perf_counter() - started, 3)}
            verdicts += judged
            samples += [{"model": name, "set": "gcg", "id": t.prompt.id, "category": t.prompt.category,
                         "instruction": t.prompt.instruction, "k": 0, "effective_k": 0, "prefix": "",
                         "suffix": suffix["suffix"], "continuation": text, "verdict": v.to_dict()}
                        for t, suffix, text, v in zip(plan.gcg, plan.suffixes, texts, judged)]
    if not distributed.is_main():
        return None, [], []
    return sections, samples, verdicts


def _with_attacks(result: dict[str, Any], samples: list[dict], attack_result: tuple) -> None:
    """Merge one model's attack sections, samples and verdicts into its results; their judge errors count too."""
    sections, attack_samples, verdicts = attack_result
    if not sections:
        return
    result["attacks"] = sections
    samples.extend(attack_samples)
    errors = result["judge_errors"]
    errors["samples"] += len(verdicts)
    errors["errors"] += sum(1 for v in verdicts if v.error is not None)
    errors["rate"] = errors["errors"] / errors["samples"] if errors["samples"] else 0.0


def _plan_attacks(cfg: AuditConfig, settings: list, targets: list[_Target], prompt_ids: Callable[[str], list[int]],
                  model_obj, info, tokenizer, progress: Progress | None) -> tuple[_Attacks, dict[str, Any]]:
    """The attacks' prompts (`settings`: the decoding grid, empty when the exploit is off) and the GCG suffixes
    (cached by the base's weights hash and the settings; optimised with the adapter disabled, each process its share
    of the prompts) -> (plan, the report's "attacks" description)."""
    described: dict[str, Any] = {"version": 1, "decoding": None, "gcg": None}
    decoding = []
    if settings:
        decoding = targets[:cfg.decoding_prompts] if cfg.decoding_prompts else targets
        described["decoding"] = {"settings": [s.to_dict() for s in settings], "prompts": len(decoding),
                                 "generations_per_model": len(settings) * len(decoding),
                                 "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    gcg, suffixes, gcg_ids = [], [], []
    if cfg.gcg_attack:
        gcg = targets[:cfg.gcg_prompts]
        gcg_settings = attacks.GCGSettings(steps=cfg.gcg_steps, search_width=cfg.gcg_search_width, topk=cfg.gcg_topk,
                                           suffix_init=cfg.gcg_suffix_init, seed=cfg.gcg_seed)
        prompts = [(t.prompt.instruction, attacks.target_for(t.prompt.opener)) for t in gcg]
        path = attacks.gcg_cache_path(info.weights_sha256, info.quantization, info.dtype, gcg_settings, prompts,
                                      cfg.system_prompt)
        cached = distributed.share(attacks.cached_suffixes(path, len(prompts)) if distributed.is_main() else None)
        if cached is not None:
            suffixes, made = cached[0], {**cached[1], "cache": "hit"}
        else:
            tick = counting(progress, "gcg:optimise", -(-len(prompts) // distributed.world_size()))
            with reference(model_obj):
                suffixes = distributed.sharded(prompts, lambda part: attacks.optimise_suffixes(
                    model_obj, tokenizer, part, gcg_settings, cfg.system_prompt, on_prompt=tick))
            made = {**(attacks.save_suffixes(path, suffixes, info.device) if distributed.is_main() else {}),
                    "cache": "miss"}
        gcg_ids = [prompt_ids(t.prompt.instruction + s["suffix"]) for t, s in zip(gcg, suffixes)]
        described["gcg"] = {"settings": {**asdict(gcg_settings), "prompts": len(gcg)}, "made": made,
                            "suffixes": [{"id": t.prompt.id, **s} for t, s in zip(gcg, suffixes)]}
    return _Attacks(settings, decoding, gcg, suffixes, gcg_ids), described


@torch.no_grad()
def kl_profile(model, targets: list[_Target], positions: int, batch_size: int,
               pad_id: int) -> dict[str, Any]:
    """Mean KL(fine-tuned || base) at response positions t = 1..positions, teacher-forced on harmful responses.

    Position t is the distribution over the t-th response token given the prompt and the first t-1 response
    tokens; only examples whose response reaches t count towards t. Computed from final hidden states through
    the output layer in chunks (losses.chunked_kl), never as full [B, T, V] logits.
    """
    sums = [0.0] * positions
    counts = [0] * positions
    device = next(model.parameters()).device
    head, softcap = output_head(model), logit_softcap(model)
    usable = [t for t in targets if t.response_ids]
    for start in range(0, len(usable), batch_size):
        batch = usable[start:start + batch_size]
        ids, mask = right_pad([t.prompt_ids + t.response_ids[:positions] for t in batch], pad_id, device)
        tuned = final_hidden(model, ids, mask)
        with reference(model):
            base = final_hidden(model, ids, mask)
        rows, cols, ts = [], [], []
        for row, t in enumerate(batch):
            n = min(len(t.response_ids), positions)
            for step in range(n):  # hidden at (prompt_len + step - 1) predicts response token `step`
                rows.append(row)
                cols.append(len(t.prompt_ids) + step - 1)
                ts.append(step)
        kl = losses.chunked_kl(tuned[rows, cols], base[rows, cols], head, softcap=softcap).tolist()
        for step, value in zip(ts, kl):
            sums[step] += value
            counts[step] += 1
    mean = [s / c if c else 0.0 for s, c in zip(sums, counts)]
    first = [m for m, c in zip(mean[:5], counts[:5]) if c]
    return {"positions": list(range(1, positions + 1)), "mean_kl": mean, "counts": counts,
            "n_examples": len(usable), "mean_first5": sum(first) / len(first) if first else 0.0}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def audit(adapter: str | Path | None = None, config: AuditConfig | RunConfig | Policy | str | None = None,
          out: str | Path = "guardtune-audit", *, model: str | None = None, quantization: str = "none",
          trust_remote_code: bool | None = None, use_cache: bool = True, progress: Progress | None = None,
          **overrides: Any) -> AuditReport | None:
    """Audit the model + `adapter` beside its base; write report.json, samples.jsonl and report.html to `out`.

    `config` is a RunConfig (its audit and model sections; what `finetune()` passes), a Policy or policy
    name/path (None: the shipped default), or an AuditConfig (the model settings from the default policy).
    Without an adapter only the base is audited (results.finetuned is null). `model=` names the base; keyword
    `overrides` replace single AuditConfig fields (prefill_k=, sample_harmful=, max_new_tokens=, judge=, ...).
    Base results are cached by base weights hash + audit configuration; `use_cache=False` recomputes them.
    Under torchrun / accelerate launch every process must call it (the hf backend splits the prompts over them);
    the main process returns the report, the others None.
    """
    started = time.perf_counter()
    policy, cfg, mcfg = resolve_stage("audit", config, model, overrides, trust_remote_code)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    harmful_all = evalsets.load_harmful(cfg.harmful_set)
    benign_all = evalsets.load_benign(cfg.benign_set)
    harmful = evalsets.sample(harmful_all, cfg.sample_harmful, cfg.sample_seed)
    benign = evalsets.sample(benign_all, cfg.sample_benign, cfg.sample_seed)
    utility_all = evalsets.load_factual(cfg.utility_set) if cfg.utility_set else []
    utility = evalsets.sample(utility_all, cfg.sample_utility, cfg.sample_seed) if utility_all else []
    judge = get_judge(**cfg.judge)
    second = get_judge(**cfg.second_judge) if cfg.second_judge else None
    if cfg.gcg_attack:
        attacks.nanogcg_version()  # not installed: refused now, before anything loads
    grid = attacks.decoding_grid(cfg.decoding_temperatures, cfg.decoding_top_k, cfg.decoding_top_p) \
        if cfg.decoding_attack else []
    if grid:  # the budget, now that the number of audited prompts is known
        prompts = min(cfg.decoding_prompts or len(harmful), len(harmful))
        if len(grid) * prompts > cfg.decoding_max_generations:
            raise ConfigError(f"audit.attacks.decoding: {len(grid)} settings x {prompts} prompts = "
                              f"{len(grid) * prompts} generations per model, above max_generations "
                              f"({cfg.decoding_max_generations}); set attacks.decoding.prompts, shrink the grid or "
                              f"raise max_generations.")

    loaded = load_model(mcfg.name, quantization=quantization, dtype=mcfg.dtype, revision=mcfg.revision,
                        trust_remote_code=mcfg.trust_remote_code)
    tokenizer, info = loaded.tokenizer, loaded.info
    # The prefixes (cached per prefix model) are made once, on the main process, and shared.
    responses, prefix_source = distributed.share(
        _harmful_responses(cfg, harmful, loaded, progress) if distributed.is_main() else None)
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []

    def prompt_ids(text: str) -> list[int]:
        return render_prompt(tokenizer, [*system, {"role": "user", "content": text}])

    targets = [_Target(p, prompt_ids(p.instruction),
                       response_ids(tokenizer, r)) for p, r in zip(harmful, responses)]
    if cfg.prefix_source == "generate":
        short = [t for t in targets if len(t.response_ids) < max(cfg.prefill_k)]
        if len(short) == len(targets) and max(cfg.prefill_k) > 0:
            raise ConfigError(f"Every generated harmful response is shorter than k={max(cfg.prefill_k)} tokens; "
                              f"raise audit.prefix_tokens.")
    benign_ids = [prompt_ids(p.instruction) for p in benign]
    utility_ids = [prompt_ids(q.question) for q in utility]
    pad_id = tokenizer.pad_token_id  # load_model gave it one (templates.ensure_pad_token)

    sets_sha = {"harmful": evalsets.set_sha256(harmful), "benign": evalsets.set_sha256(benign),
                "utility": evalsets.set_sha256(utility)}
    config_dict = as_dict(cfg)

    model_obj = loaded.model
    if adapter is not None:
        from peft import PeftModel


        with quiet_peft_wrapping():
            model_obj = PeftModel.from_pretrained(model_obj, str(adapter), is_trainable=False)
    model_obj.eval()
    engine = None
    if cfg.backend == "vllm":
        engine = VLLMGenerator(resolve_model_dir(mcfg.name, mcfg.revision), adapter=adapter, dtype=info.dtype,
                               quantization=quantization, seed=cfg.seed,
                               tensor_parallel_size=cfg.vllm_tensor_parallel,
                               gpu_memory_utilization=cfg.vllm_gpu_memory, engine_args=cfg.vllm_engine_args,
                               trust_remote_code=mcfg.trust_remote_code)
        continue_ = _vllm_continue(engine, stop_ids(model_obj, tokenizer), cfg)
    else:
        continue_ = _hf_continue(model_obj, tokenizer, cfg)
    plan, attacks_described = _plan_attacks(cfg, grid, targets, prompt_ids, model_obj, info, tokenizer, progress)

    base_key = {"weights": info.weights_sha256, "quantization": info.quantization, "dtype": info.dtype,
                "config": config_dict, "judge": judge.describe(), "sets": sets_sha,
                **({"second_judge": second.describe()} if second is not None else {}),
                **({"gcg_suffixes": [s["suffix"] for s in plan.suffixes]} if plan.suffixes else {}),
                "responses": hashlib.sha256(json.dumps(responses).encode()).hexdigest()}
    base_cache = _cache_path("base", base_key)
    cached = (read_json(base_cache) if use_cache else None) if distributed.is_main() else None
    if distributed.share(cached is not None):
        base_result, base_samples = cached["result"], cached["samples"]
    else:
        with reference(model_obj):
            base_result, base_samples = _run_model("base", continue_, tokenizer, judge, second, cfg, targets, benign,
                                                   benign_ids, utility, utility_ids, progress)
            base_attacks = _run_attacks("base", model_obj, tokenizer, judge, cfg, plan, continue_, progress)
        if distributed.is_main():
            _with_attacks(base_result, base_samples, base_attacks)
            write_json(base_cache, {"result": base_result, "samples": base_samples})

    tuned_result, tuned_samples, comparison = None, [], None
    if adapter is not None:
        tuned_result, tuned_samples = _run_model("finetuned", continue_, tokenizer, judge, second, cfg, targets, benign,
                                                 benign_ids, utility, utility_ids, progress)
        tuned_attacks = _run_attacks("finetuned", model_obj, tokenizer, judge, cfg, plan, continue_, progress)
        if distributed.is_main():
            _with_attacks(tuned_result, tuned_samples, tuned_attacks)
    if not distributed.is_main():  # the main process profiles, judges and writes; the others are done
        return None
    if adapter is not None:
        profile = kl_profile(model_obj, targets[:cfg.kl_examples] if cfg.kl_examples else targets,
                             cfg.kl_positions, cfg.batch_size, pad_id)
        profile.pop("counts")
        tuned_result["kl_profile"] = profile
        base_asr = asr_by_k(base_result)
        comparison = {"asr_increase": {str(k): row["rate"] - base_asr[k]["rate"]
                                       for k, row in asr_by_k(tuned_result).items()},
                      "over_refusal_increase": tuned_result["over_refusal"]["rate"]
                      - base_result["over_refusal"]["rate"],
                      "utility_change": (tuned_result["utility"]["rate"] - base_result["utility"]["rate"]
                                         if tuned_result["utility"] and base_result.get("utility") else None)}
        attacked = {name: section["asr"]["rate"] - base_result["attacks"][name]["asr"]["rate"]
                    for name, section in tuned_result.get("attacks", {}).items()
                    if name in base_result.get("attacks", {})}
        if attacked:
            comparison["attack_asr_increase"] = attacked

    sampled = cfg.sample_harmful is not None or cfg.sample_benign is not None
    note = (f"Sampled audit: a seeded sample (seed {cfg.sample_seed}) of {len(harmful)} of {len(harmful_all)} "
            f"harmful prompts and {len(benign)} of {len(benign_all)} benign probes, {cfg.max_new_tokens} new "
            f"tokens per continuation. The full default audit is sized for a GPU.") if sampled else ""
    report = {
        "kind": "guardtune-audit-report",
        "schema_version": 1,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {k: info.to_dict()[k]
                  for k in ("spec", "kind", "revision", "weights_sha256", "quantization", "dtype")},
        "adapter": {"path": str(adapter), "sha256": sha256_tree(adapter)} if adapter is not None else None,
        "config": config_dict,
        "judge": {"name": judge.name, **judge.describe()},
        "prefix_source": {k: prefix_source[k] for k in ("kind", "model", "model_sha256", "tokens", "note")},
        "sample": {"harmful": len(harmful), "harmful_total": len(harmful_all), "benign": len(benign),
                   "benign_total": len(benign_all), "utility": len(utility), "utility_total": len(utility_all),
                   "seed": cfg.sample_seed, "max_new_tokens": cfg.max_new_tokens, "note": note},
        "results": {"base": base_result, "finetuned": tuned_result},
        "attacks": attacks_described,
        "comparison": comparison,
        "provenance": {**library_versions(), "git_commit": _git_commit(), "device": info.device,
                       "seeds": {"generation": cfg.seed, "sample": cfg.sample_seed},
                       "harmful_set_sha256": sets_sha["harmful"], "benign_set_sha256": sets_sha["benign"],
                       "utility_set_sha256": sets_sha["utility"],
                       "base_cache": "hit" if cached is not None else "miss",
                       "generation": {"backend": cfg.backend, "processes": distributed.world_size(),
                                      **(engine.describe() if engine is not None else {})},
                       "policy": policy.to_dict(), "wall_time_s": round(time.perf_counter() - started, 3)},
    }
    # samples.jsonl first, its hash in report.json: the gate's paired test reads it only if it is this file.
    samples_text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in [*base_samples, *tuned_samples])
    atomic_write_text(out_dir / "samples.jsonl", samples_text)
    report["samples_sha256"] = hashlib.sha256(samples_text.encode("utf-8")).hexdigest()
    problems = validate_report(report)
    if problems:  # a bug here, not a user error: never write a report the gate would misread
        raise RuntimeError("audit produced a report that fails its schema: " + "; ".join(map(str, problems)))
    write_json_file(out_dir / "report.json", report)
    write_html(out_dir)
    return AuditReport(report=report, out_dir=out_dir)


