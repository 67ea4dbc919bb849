"""Alignment job: make a base model refuse harmful requests, deep or shallow, as a LoRA job (`guardtune align`).

Qi et al. 2025 (Sec. 3) show that aligned models refuse mostly through their first few response tokens, so a
prefilled "Sure, here is" or a few fine-tuning steps undo the refusal. Their safety-recovery augmentation makes
the alignment deeper: for a harmful instruction x, a harmful answer h and a refusal r, train on
x + h[:k] + r with the loss on r alone, k drawn anew each time, so the model learns to recover into a refusal
from anywhere inside a harmful answer. Utility anchors (benign prompts with the base model's own answers) keep it
helpful. Flow:

    harmful set -> holdout split -> harmful answers h (the unaligned answer model, greedy, cached)
    anchors     -> holdout split -> the base's own answers (greedy, cached)
    -> RecoveryDataset (draws per epoch) -> training.fit (SFT, LoRA) -> OUT/adapter, OUT/align_metrics.json
       [+ OUT/merged: base + adapter merged, usable as --model]  [+ --export: fp16 adapter + build manifest]
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import evalsets
from .cache import json_path, read_json, write_json
from .config import AlignConfig, as_dict, resolve_stage
from .errors import DatasetError
from .evalsets import load_refusals, sample, set_sha256
from .generation import Answer, counting, write_answers
from .judges import is_refusal
from .models import attach_lora, load_model
from .modelspec import resolve_model_dir, weights_sha256
from .policy import Policy
from .provenance import library_versions, sha256_file, sha256_json, write_json_file
from .templates import render_chat, response_ids
from .training import fit

ALIGN_CACHE_FORMAT = 1  # bump when cached answers change meaning
MIN_HARMFUL_ANSWER_TOKENS = 8
RECOVERY_BREAK = "\n\n"  # what a recovery example puts between the cut-off harmful prefix and the refusal
Progress = Callable[[str, int, int], None]


@dataclass
class AlignResult:
    """What the alignment job produced."""

    out_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    export_dir: Path | None
    metrics_path: Path
    metrics: dict[str, Any]
    model: Any = field(default=None, repr=False)  # the trained PeftModel (merged in place when merge=True)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "adapter_dir": str(self.adapter_dir),
                "merged_dir": str(self.merged_dir) if self.merged_dir else None,
                "export_dir": str(self.export_dir) if self.export_dir else None,
                "metrics_path": str(self.metrics_path),
                **{k: self.metrics[k] for k in ("mode", "steps", "train_loss", "wall_time_s")},
                "data": self.metrics["data"]}


# --- the safety data ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HarmfulExample:
    instruction: str
    category: str
    answer: str  # the unaligned model's harmful answer h (opener included)


@dataclass(frozen=True)
class AnchorExample:
    instruction: str
    category: str
    answer: str  # the base model's own answer before alignment


def split_holdout(prompts: Sequence[Any], n: int) -> tuple[list[Any], list[Any]]:
    """(train, holdout): a category-stratified seeded sample of n prompts is held out. The split seed is fixed (0)
    so sweeps over training seeds all tune on the same held-out prompts."""
    if n <= 0:
        return list(prompts), []
    held = sample(prompts, n, seed=0)
    held_ids = {p.id for p in held}
    return [p for p in prompts if p.id not in held_ids], held


def _cut_unfinished(text: str) -> str:
    """An answer cut by the token limit ends mid-sentence; keep it up to its last sentence end (or drop it)."""
    end = max(text.rfind(mark) for mark in (". ", ".\n", "! ", "? ", ":\n"))
    if text.rstrip().endswith((".", "!", "?")):
        return text.rstrip()
    return text[:end + 1].rstrip() if end > 0 else ""


def _answers(loaded: Any, prompts: Sequence[tuple[str, str | None]], tokens: int, batch_size: int, kind: str,
             progress: Progress | None) -> tuple[list[Any], bool]:
    """Greedy answers of `loaded` to (instruction, opener) pairs, cached by weights + prompts + length."""
    path = json_path(f"align/{kind}", {"format": ALIGN_CACHE_FORMAT, "model_sha256": loaded.info.weights_sha256,
                                       "tokens": tokens, "prompts": [[i, o or ""] for i, o in prompts]})
    cached = read_json(path)
    if isinstance(cached, list) and len(cached) == len(prompts):
        return [Answer(**a) for a in cached], True
    model = loaded.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        answers = write_answers(model, loaded.tokenizer, prompts, max_new_tokens=tokens, batch_size=batch_size,
                                on_batch=counting(progress, kind, len(prompts)))
    model.train(was_training)
    write_json(path, [{"text": a.text, "finished": a.finished} for a in answers])
    return answers, False


def build_harmful(loaded_answerer: Any, prompts: Sequence[Any], cfg: AlignConfig,
                  progress: Progress | None) -> tuple[list[HarmfulExample], dict[str, Any]]:
    """Harmful answers h for each instruction (opener prefilled), written by the unaligned answer model.
    Answers that are refusals (the answer model declined) or too short to prefix are dropped and counted."""
    answers, hit = _answers(loaded_answerer, [(p.instruction, p.opener) for p in prompts], cfg.harmful_answer_tokens,
                            batch_size=64, kind="harmful-answers", progress=progress)
    tokenizer = loaded_answerer.tokenizer
    kept, refused, short = [], 0, 0
    for prompt, answer in zip(prompts, answers):
        if is_refusal(answer.text):
            refused += 1
        elif len(response_ids(tokenizer, answer.text)) < MIN_HARMFUL_ANSWER_TOKENS:
            short += 1
        else:
            kept.append(HarmfulExample(prompt.instruction, prompt.category, answer.text))
    return kept, {"prompts": len(prompts), "kept": len(kept), "dropped_refusals": refused, "dropped_short": short,
                  "cache": "hit" if hit else "miss"}


def build_anchors(loaded_base: Any, prompts: Sequence[Any], cfg: AlignConfig,
                  progress: Progress | None) -> tuple[list[AnchorExample], dict[str, Any]]:
    """Utility anchors: the base model's own answers to benign prompts. A refusal is dropped (training it would
    teach over-refusal); an answer cut by the token limit keeps its complete sentences."""
    answers, hit = _answers(loaded_base, [(p.instruction, None) for p in prompts], cfg.anchor_answer_tokens,
                            batch_size=64, kind="anchor-answers", progress=progress)
    kept, refused, empty = [], 0, 0
    for prompt, answer in zip(prompts, answers):
        text = answer.text.strip() if answer.finished else _cut_unfinished(answer.text)
        if is_refusal(text):
            refused += 1
        elif not text:
            empty += 1
        else:
            kept.append(AnchorExample(prompt.instruction, prompt.category, text))
    return kept, {"prompts": len(prompts), "kept": len(kept), "dropped_refusals": refused, "dropped_empty": empty,
                  "cache": "hit" if hit else "miss"}


class RecoveryDataset(torch.utils.data.Dataset):
    """The alignment training set, drawn anew every epoch (Qi et al. 2025, Sec. 3.1).

    Items are `harmful_repeats` copies of every harmful example, then round(anchor_ratio * that) anchors (cycled).
    A harmful item is, with probability p = cfg.effective_recovery_prob, a recovery example
    prompt(x) + h[:k] + r with k ~ U{1..min(K, |h|)}; otherwise prompt(x) + r. r is a refusal drawn at random.
    Only r (and its end-of-turn token) is trained: the prefix tokens carry completion_mask 0, so the model is
    never taught to write h, only to leave it. Draws depend on (seed, epoch, index) alone, so a run is
    reproducible and a resumed run draws what the uninterrupted one would have.
    """

    def __init__(self, tokenizer: Any, harmful: Sequence[HarmfulExample], anchors: Sequence[AnchorExample],
                 refusals: Sequence[str], cfg: AlignConfig):

        if not harmful:
            raise DatasetError("No harmful examples are left to align on (all were held out or dropped); lower "
                               "align.holdout.harmful or check align.answer_model (it should comply).")
        self.tokenizer, self.cfg = tokenizer, cfg
        self.harmful, self.anchors, self.refusals = list(harmful), list(anchors), list(refusals)
        self.answer_ids = [response_ids(tokenizer, h.answer) for h in self.harmful]
        n_harmful = len(self.harmful) * cfg.harmful_repeats
        n_anchor = round(cfg.anchor_ratio * n_harmful) if self.anchors else 0
        self.items = [("harmful", i % len(self.harmful)) for i in range(n_harmful)]
        self.items += [("anchor", j % len(self.anchors)) for j in range(n_anchor)]
        self.epoch = 0
        self.draws: dict[int, dict[str, float]] = {}
        self._rendered: dict[tuple[str, int, int], Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self, index: int, epoch: int) -> tuple[bool, int, int]:
        """(recovery?, k, refusal index) of harmful item `index` in `epoch`."""
        _, i = self.items[index]
        rng = random.Random(f"{self.cfg.training.seed}:{epoch}:{index}")
        refusal = rng.randrange(len(self.refusals))
        recovery = rng.random() < self.cfg.effective_recovery_prob
        k = rng.randint(1, min(self.cfg.max_prefix_tokens, len(self.answer_ids[i]))) if recovery else 0
        return recovery, k, refusal

    def _render(self, kind: str, i: int, refusal: int, recovery: bool = False) -> Any:
        key = (kind, i, refusal, recovery)
        if key not in self._rendered:
            if kind == "harmful":
                # A recovery breaks off the harmful answer with a paragraph break before refusing: tokenized alone,
                # "I'm" would be glued to the cut-off word ("ofI'm not ..."), which reads badly and which no
                # word-boundary refusal matcher (the keyword judge) recognises.
                text = RECOVERY_BREAK + self.refusals[refusal] if recovery else self.refusals[refusal]
                messages = [{"role": "user", "content": self.harmful[i].instruction},
                            {"role": "assistant", "content": text}]
            else:
                messages = [{"role": "user", "content": self.anchors[i].instruction},
                            {"role": "assistant", "content": self.anchors[i].answer}]
            self._rendered[key] = render_chat(self.tokenizer, messages, max_length=None)
        return self._rendered[key]

    def __getitem__(self, index: int) -> dict[str, Any]:
        kind, i = self.items[index]
        if kind == "anchor":
            rendered = self._render("anchor", i, -1)
            ids, mask, positions = rendered.input_ids, rendered.completion_mask, rendered.response_positions
        else:
            recovery, k, refusal = self.draw(index, self.epoch)
            rendered = self._render("harmful", i, refusal, recovery)
            start = rendered.completion_mask.index(1)  # where the assistant turn (the refusal) begins
            prefix = self.answer_ids[i][:k]
            ids = rendered.input_ids[:start] + prefix + rendered.input_ids[start:]
            mask = rendered.completion_mask[:start] + [0] * len(prefix) + rendered.completion_mask[start:]
            positions = rendered.response_positions[:start] + [0] * len(prefix) + rendered.response_positions[start:]
            stats = self.draws.setdefault(self.epoch, {"harmful": 0, "recovery": 0, "k_sum": 0})
            stats["harmful"] += 1
            stats["recovery"] += int(recovery)
            stats["k_sum"] += k
        limit = self.cfg.training.max_length
        truncated = len(ids) > limit
        if truncated:
            ids, mask, positions = ids[:limit], mask[:limit], positions[:limit]
            if not any(mask):
                raise DatasetError(f"An alignment example has no refusal tokens left after truncation to "
                                   f"{limit} tokens; raise align.training.max_length (K={self.cfg.max_prefix_tokens}).")
        return {"input_ids": ids, "completion_mask": mask, "response_positions": positions, "truncated": truncated}

    def draw_summary(self) -> list[dict[str, Any]]:
        return [{"epoch": epoch, "harmful_items": s["harmful"], "recovery_share": s["recovery"] / s["harmful"],
                 "mean_k": s["k_sum"] / s["recovery"] if s["recovery"] else 0.0}
                for epoch, s in sorted(self.draws.items()) if s["harmful"]]


# --- the job ---------------------------------------------------------------------------------------------------

def _sets_sha256(harmful: Sequence[Any], anchors: Sequence[Any], refusals: Sequence[str]) -> dict[str, str]:
    return {"harmful": set_sha256(harmful), "anchors": set_sha256(anchors), "refusals": sha256_json(list(refusals))}


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def align(config: AlignConfig | Policy | str | None = None, out: str | Path = "guardtune-align", *,
          model: str | None = None, mode: str | None = None, merge: bool = False, export: str | Path | None = None,
          command: str | None = None, progress: Progress | None = None, **overrides: Any) -> AlignResult:
    """Safety-align `model` (deep or shallow) with LoRA; write OUT/adapter, OUT/align_metrics.json, the held-out
    prompts (OUT/holdout_harmful.jsonl with harmful answers, OUT/holdout_benign.jsonl) for checking, and with
    `merge=True` OUT/merged (base + adapter, a model directory every command accepts as --model).

    `overrides` replace AlignConfig fields (recovery_prob=, anchor_ratio=, ...) or its training's fields
    (learning_rate=, epochs=, seed=, ...). `export=DIR` also writes the adapter in float16 with a build manifest
    (how the shipped demo base is made); `command` is recorded there. `progress(phase, done, total)`.
    """
    started = time.perf_counter()
    if mode is not None:
        overrides["mode"] = mode
    policy, cfg, mcfg = resolve_stage("align", config, model, overrides)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    harmful_all = evalsets.load_harmful(cfg.harmful_set, builtin="align_harmful.jsonl")
    anchors_all = evalsets.load_benign(cfg.anchors, builtin="align_benign.jsonl")
    refusals = load_refusals(cfg.refusals)
    harmful_train, harmful_held = split_holdout(harmful_all, cfg.holdout_harmful)
    anchors_train, anchors_held = split_holdout(anchors_all, cfg.holdout_benign)

    loaded = load_model(mcfg.name, dtype=mcfg.dtype, revision=mcfg.revision,
                        trust_remote_code=mcfg.trust_remote_code)
    answer_sha = weights_sha256(resolve_model_dir(cfg.answer_model))
    answerer = loaded if answer_sha == loaded.info.weights_sha256 else load_model(cfg.answer_model)
    harmful, harmful_stats = build_harmful(answerer, harmful_train + harmful_held, cfg, progress)
    held_instructions = {p.instruction for p in harmful_held}
    harmful_held_examples = [h for h in harmful if h.instruction in held_instructions]
    harmful = [h for h in harmful if h.instruction not in held_instructions]
    if answerer is not loaded:
        del answerer
    anchors, anchor_stats = build_anchors(loaded, anchors_train, cfg, progress)

    dataset = RecoveryDataset(loaded.tokenizer, harmful, anchors, refusals, cfg)
    peft_model = attach_lora(loaded.model, cfg.training)
    pad_token_id = loaded.tokenizer.pad_token_id
    fitted = fit(peft_model, dataset, cfg.training, out_dir, device=loaded.info.device, dtype=loaded.info.dtype,
                 pad_token_id=pad_token_id, progress=progress)

    _write_jsonl(out_dir / "holdout_harmful.jsonl", [{"instruction": h.instruction, "category": h.category,
                                                      "response": h.answer} for h in harmful_held_examples])
    _write_jsonl(out_dir / "holdout_benign.jsonl", [{"instruction": p.instruction, "category": p.category}
                                                    for p in anchors_held])
    metrics = {
        "mode": cfg.mode,
        "recovery_prob": cfg.effective_recovery_prob,
        **fitted.summary(),
        "draws": dataset.draw_summary(),
        "data": {"harmful_train": len(harmful), "harmful_holdout": len(harmful_held_examples),
                 "anchors_train": len(anchors), "anchors_holdout": len(anchors_held), "refusals": len(refusals),
                 "items_per_epoch": len(dataset), "harmful_answers": harmful_stats, "anchor_answers": anchor_stats,
                 "sets_sha256": _sets_sha256(harmful_all, anchors_all, refusals)},
        "model": loaded.info.to_dict(),
        "answer_model": {"spec": cfg.answer_model, "weights_sha256": answer_sha},
        "policy": policy.to_dict(),
        "config": as_dict(cfg),
        "seeds": {"seed": cfg.training.seed, "holdout_split": 0},
        "versions": library_versions(),
        "command": command,
    }
    merged_dir = None
    if merge:
        merged_dir = out_dir / "merged"
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(merged_dir), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(merged_dir))
    export_dir = None
    if export is not None:
        export_dir = export_adapter(fitted.adapter_dir, Path(export), metrics)
    metrics["wall_time_s"] = round(time.perf_counter() - started, 3)
    metrics_path = out_dir / "align_metrics.json"
    write_json_file(metrics_path, metrics)
    return AlignResult(out_dir=out_dir, adapter_dir=fitted.adapter_dir, merged_dir=merged_dir, export_dir=export_dir,
                       metrics_path=metrics_path, metrics=metrics, model=peft_model)


def export_adapter(adapter_dir: Path, dest: Path, metrics: dict[str, Any]) -> Path:
    """A float16 copy of a LoRA adapter plus build.json (command, data hashes, seeds, versions, file hashes):
    the form in which guardtune ships an adapter as package data. fp16 halves the size; LoRA weights are small
    in magnitude and lose nothing that shows in the audit (docs/alignment.md)."""
    from safetensors.torch import load_file, save_file


    dest.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    save_file({name: t.to(torch.float16).contiguous() for name, t in sorted(weights.items())},
              str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = metrics["model"]["spec"]  # not the local cache path
    if isinstance(config.get("target_modules"), list):  # peft writes a set: its order changes run to run
        config["target_modules"] = sorted(config["target_modules"])
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    build = {
        "kind": "guardtune-aligned-adapter",
        "command": metrics.get("command"),
        "mode": metrics["mode"],
        "base_model": {k: metrics["model"][k] for k in ("spec", "weights_sha256")},
        "answer_model": metrics["answer_model"],
        "data_sha256": metrics["data"]["sets_sha256"],
        "data": {k: metrics["data"][k] for k in ("harmful_train", "anchors_train", "refusals", "items_per_epoch")},
        "config": metrics["config"],
        "seeds": metrics["seeds"],
        "versions": metrics["versions"],
        "steps": metrics["steps"],
        "train_loss": metrics["train_loss"],
        "files": {name: sha256_file(dest / name) for name in ("adapter_model.safetensors", "adapter_config.json")},
    }
    (dest / "build.json").write_text(json.dumps(build, indent=2) + "\n", encoding="utf-8")
    return dest
