"""Training stage: LoRA/QLoRA fine-tuning with the token-wise constrained objective against the frozen base.

Flow: validate the data -> load the base (fp32/bf16 or NF4) -> render every example with the model's chat
template (completion mask + response positions) -> attach LoRA -> reference log-probs (cached on disk, or
online) -> `GuardedTrainer` (a transformers.Trainer whose compute_loss calls guardtune.losses) -> adapter/ and
train_metrics.json. The reference is the same PEFT model with its adapter disabled: one model in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import transformers
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from . import distributed, losses
from .config import RunConfig, TrainConfig, as_dict, dataset_config, resolve_stage
from .errors import ConfigError, DatasetError, did_you_mean
from .generation import refusal_probe
from .logprobs import logit_softcap, output_head, response_logps
from .models import attach_lora, load_model, reference
from .policy import Policy
from .provenance import atomic_path, cache_dir, library_versions, sha256_file, write_json_file
from .records import iter_records
from .templates import render_chat, template_fingerprint

logger = logging.getLogger("guardtune.training")

# Bump when the layout or meaning of cached reference log-probs changes.
REFERENCE_CACHE_FORMAT = 1
BUCKETS = (("t1", 1, 1), ("t2_5", 2, 5), ("t6_plus", 6, None))


@dataclass
class TrainResult:
    """What the training stage produced."""

    out_dir: Path
    adapter_dir: Path
    metrics_path: Path
    metrics: dict[str, Any]
    model: Any = field(default=None, repr=False)  # the trained PeftModel, in memory (for the caller's own checks)

    @property
    def reference_kind(self) -> str:
        return self.metrics["reference"]

    @property
    def base_model(self) -> dict[str, Any]:
        """The base the adapter was trained on: spec, revision (hub commit or None), weights_sha256."""
        return {k: self.metrics["model"][k] for k in ("spec", "revision", "weights_sha256")}

    @property
    def summary(self) -> dict[str, Any]:
        """objective, reference, steps, train_loss: what a release manifest records about training."""
        return {k: self.metrics[k] for k in ("objective", "reference", "steps", "train_loss")}

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "adapter_dir": str(self.adapter_dir),
                "metrics_path": str(self.metrics_path), **{k: self.metrics[k] for k in (
                    "objective", "reference", "steps", "train_loss", "tokens_per_second", "wall_time_s")}}


# --- the KL anchor's positions and logits ----------------------------------------------------------------

def anchor_index(completion_mask: Sequence[int], response_positions: Sequence[int], n: int) -> list[int]:
    """Token indices j of the response tokens at positions t = 1..n of each trained turn (the KL anchor's)."""
    return [j for j, (m, t) in enumerate(zip(completion_mask, response_positions)) if m and 1 <= t <= n and j >= 1]


def anchored_logits(hidden: torch.Tensor, index: torch.Tensor, unwrapped: torch.nn.Module) -> torch.Tensor:
    """Next-token logits [M, V] (float32, soft-capped like the loss) at every anchored token of a batch:
    `index` [B, A] holds token indices (-1 = padding); the hidden state at j - 1 predicts token j."""
    rows, slots = (index >= 0).nonzero(as_tuple=True)
    logits = output_head(unwrapped)(hidden[rows, index[rows, slots] - 1]).float()
    softcap = logit_softcap(unwrapped)
    return softcap * torch.tanh(logits / softcap) if softcap else logits


# --- data ----------------------------------------------------------------------------------------------------

def reference_refusals(model: torch.nn.Module, tokenizer: Any, examples: Sequence[dict], *, max_new_tokens: int,
                       batch_size: int = 16, progress: Callable[[int, int], None] | None = None,
                       replies: list[dict[str, Any]] | None = None) -> list[bool]:
    """Whether the reference model refuses each example's prompt (constraint_scope 'refused'): its greedy
    continuation of everything before the example's first trained response token, judged by the keyword judge's
    refusal phrases. Identical prompts are generated once; `replies`, when given, receives one
    {"refused", "reply"} per distinct prompt, so a reviewer can see what was called a refusal."""
    prompts = [e["input_ids"][:e["completion_mask"].index(1)] for e in examples]
    n_unique = len({tuple(p) for p in prompts})
    done = [0]

    def on_batch(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], n_unique)

    probed = refusal_probe(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           on_batch=on_batch)
    if replies is not None:
        seen = {}
        for p, (refused, text) in zip(prompts, probed):
            seen.setdefault(tuple(p), {"refused": refused, "reply": text})
        replies.extend(seen.values())
    return [refused for refused, _ in probed]


def _render_examples(tokenizer: Any, records: Iterable[tuple[int, list[dict]]], max_length: int) -> list[dict]:
    examples = []
    for line, messages in records:
        rendered = render_chat(tokenizer, messages, max_length=max_length, line=line)
        examples.append({"line": line, "input_ids": rendered.input_ids, "completion_mask": rendered.completion_mask,
                         "response_positions": rendered.response_positions, "truncated": rendered.truncated})
    if not examples:
        raise DatasetError("The dataset has no usable examples after validation; nothing to train on.")
    return examples


class _ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. `labels`/`shift_labels` exist only so the Trainer can count the response tokens of an
    optimizer step (num_items_in_batch) across gradient accumulation and devices; the loss never reads them."""
    length = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: float | int, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (length - len(e[key])) for e in examples], dtype=dtype)

    input_ids = pad("input_ids", pad_token_id, torch.long)
    completion_mask = pad("completion_mask", 0, torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"]))
                                        for e in examples], dtype=torch.long),
        "completion_mask": completion_mask,
        "response_positions": pad("response_positions", 0, torch.long),
    }
    labels = torch.where(completion_mask.bool(), input_ids, torch.full_like(input_ids, -100))
    batch["labels"] = labels
    batch["shift_labels"] = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = pad("ref_logps", 0.0, torch.float32)
    if "early_constraint" in examples[0]:
        batch["early_constraint"] = torch.tensor([int(e["early_constraint"]) for e in examples], dtype=torch.long)
    if "anchor_index" in examples[0]:
        width = max(1, max(len(e["anchor_index"]) for e in examples))
        batch["anchor_index"] = torch.tensor([e["anchor_index"] + [-1] * (width - len(e["anchor_index"]))
                                              for e in examples], dtype=torch.long)
        if "ref_topk_ids" in examples[0]:
            k = next((len(e["ref_topk_ids"][0]) for e in examples if e["ref_topk_ids"]), 1)
            for key, fill, dtype in (("ref_topk_ids", 0, torch.long), ("ref_topk_logps", 0.0, torch.float32)):
                batch[key] = torch.tensor([e[key] + [[fill] * k] * (width - len(e[key])) for e in examples],
                                          dtype=dtype)
    return batch


# --- reference log-probs ---------------------------------------------------------------------------------------

def reference_cache_key(dataset_sha256: str, template_fingerprint: str, weights_sha256: str, quantization: str,
                        dtype: str, max_length: int, kl_anchor: int = 0, kl_anchor_topk: int = 0,
                        anchored: str | None = None) -> str:
    """Everything that changes the reference log-probs is in the key: data, tokenizer+template, base weights,
    quantization, dtype, truncation length, and the KL anchor's positions and top-k (what else is stored), and
    under constraint_scope 'refused' which examples are anchored (`anchored`: one 0/1 per example)."""
    payload = json.dumps({"format": REFERENCE_CACHE_FORMAT, "dataset": dataset_sha256, "template": template_fingerprint,
                          "weights": weights_sha256, "quantization": quantization, "dtype": dtype,
                          "max_length": max_length, **({"kl_anchor": kl_anchor, "kl_anchor_topk": kl_anchor_topk}
                                                       if kl_anchor else {}),
                          **({"anchored": anchored} if anchored is not None else {})}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@torch.inference_mode()
def compute_reference_logps(model: torch.nn.Module, examples: list[dict], pad_token_id: int, batch_size: int,
                            progress: Callable[[int, int], None] | None = None,
                            topk: int = 0) -> list[dict[str, list]]:
    """Per example: "ref_logps", the reference's log-prob of every token (0.0 where not a response token); with
    `topk` and examples carrying "anchor_index", also "ref_topk_ids" / "ref_topk_logps" at each anchored token.

    Batches are formed in length order (less padding than the training order), and the pass runs with the
    adapter disabled, in train mode, dropout inactive (models.reference): the policy's computation at step 0.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    results: list[dict[str, list]] = [{} for _ in examples]
    device = next(model.parameters()).device
    done = 0
    if progress:
        progress(0, len(examples))
    with reference(model):
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            batch = collate([examples[i] for i in indices], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            flat, hidden = response_logps(model, batch["input_ids"], batch["attention_mask"],
                                          batch["completion_mask"], return_hidden=True)
            flat = flat.cpu()
            if topk:
                top_ids, top_logps = losses.reference_topk(anchored_logits(hidden, batch["anchor_index"], model), topk)
                top_ids, top_logps = top_ids.cpu().tolist(), top_logps.cpu().tolist()
            offset = anchor_offset = 0
            for row, index in enumerate(indices):
                mask = examples[index]["completion_mask"]
                aligned = [0.0] * len(mask)
                # completion_mask[j] = 1 -> a log-prob for token j (j >= 1), in order.
                for j in range(1, len(mask)):
                    if mask[j]:
                        aligned[j] = float(flat[offset])
                        offset += 1
                results[index]["ref_logps"] = aligned
                if topk:
                    n = len(examples[index]["anchor_index"])
                    results[index]["ref_topk_ids"] = top_ids[anchor_offset:anchor_offset + n]
                    results[index]["ref_topk_logps"] = top_logps[anchor_offset:anchor_offset + n]
                    anchor_offset += n
            done += len(indices)
            if progress:
                progress(done, len(examples))
    return results


def _split(flat: list, lengths: Sequence[int]) -> list[list]:
    out, offset = [], 0
    for n in lengths:
        out.append(flat[offset:offset + n])
        offset += n
    return out


def load_or_compute_reference(model, examples, key: str, pad_token_id: int, batch_size: int,
                              progress=None, topk: int = 0) -> tuple[list[dict[str, list]], bool, float]:
    """(per-example reference values as compute_reference_logps returns them, cache hit, seconds computing):
    read from the cache under `key`, or computed in shards over the processes and cached by the main process."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / "reference" / f"{key}.safetensors"
    lengths = [len(e["input_ids"]) for e in examples]
    anchors = [len(e.get("anchor_index", [])) for e in examples]
    values = None
    if path.is_file():
        stored = load_file(str(path))
        if stored["lengths"].tolist() == lengths and (not topk or stored["anchors"].tolist() == anchors):
            values = [{"ref_logps": row} for row in _split(stored["ref_logps"].tolist(), lengths)]
            if topk:
                for value, ids, logps in zip(values, _split(stored["topk_ids"].tolist(), anchors),
                                             _split(stored["topk_logps"].tolist(), anchors)):
                    value.update(ref_topk_ids=ids, ref_topk_logps=logps)
    # Under a launcher every process must take the same branch (the computation below is collective): the cache
    # counts as a hit only where every process found it (on one node they share the cache directory).
    if distributed.sum_over_processes(values is not None) == distributed.world_size():
        return values, True, 0.0
    started = time.perf_counter()
    # Each process computes its share of the examples; every process gets all of them back.
    values = distributed.sharded(examples, lambda part: compute_reference_logps(model, part, pad_token_id,
                                                                               batch_size, progress, topk=topk))
    elapsed = time.perf_counter() - started
    if not distributed.is_main():
        return values, False, elapsed
    tensors = {"ref_logps": torch.tensor([v for row in values for v in row["ref_logps"]], dtype=torch.float32),
               "lengths": torch.tensor(lengths, dtype=torch.long)}
    if topk:
        tensors.update(anchors=torch.tensor(anchors, dtype=torch.long),
                       topk_ids=torch.tensor([r for v in values for r in v["ref_topk_ids"]],
                                             dtype=torch.long).reshape(-1, topk),
                       topk_logps=torch.tensor([r for v in values for r in v["ref_topk_logps"]],
                                               dtype=torch.float32).reshape(-1, topk))
    with atomic_path(path) as scratch:
        save_file(tensors, str(scratch))
    return values, False, elapsed


# --- trainer ----------------------------------------------------------------------------------------------------

class GuardedTrainer(Trainer):
    """transformers.Trainer whose loss is guardtune.losses: constrained (Qi et al. 2025, Eq. 3) or SFT.

    Everything else (accelerate launch, DDP, checkpointing, resume, logging, progress bar) is the Trainer's.
    """

    # compute_loss divides by the response tokens of the whole optimizer step, so the Trainer must neither
    # divide by the accumulation steps again nor skip counting them.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, guard_config: TrainConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard_config = guard_config
        self.model_accepts_loss_kwargs = True  # makes the Trainer compute num_items_in_batch for us
        self.weight_sums = {name: 0.0 for name, _, _ in BUCKETS}
        self.weight_counts = {name: 0 for name, _, _ in BUCKETS}
        self.tokens_seen = 0
        self.position_history: list[dict[str, Any]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.guard_config
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        select = completion_mask[:, 1:].bool()
        unwrapped = self.accelerator.unwrap_model(model)
        policy_logps, hidden = response_logps(model, input_ids, attention_mask, completion_mask, unwrapped,
                                              return_hidden=True)
        ones = torch.ones_like(policy_logps)
        self.tokens_seen += int(attention_mask.sum())
        if cfg.objective == "sft":
            loss = losses.sft_loss(policy_logps, ones, num_items_in_batch)
        else:
            ref_hidden = None
            if cfg.reference == "online":
                with reference(unwrapped):
                    ref_logps, ref_hidden = response_logps(model, input_ids, attention_mask, completion_mask,
                                                           unwrapped, return_hidden=True)
            else:
                ref_logps = inputs["ref_logps"][:, 1:][select].to(policy_logps.dtype)
            positions = inputs["response_positions"][:, 1:][select]
            beta_positions = positions
            if "early_constraint" in inputs:
                early = inputs["early_constraint"][:, None].expand_as(select)[select]
                beta_positions = losses.scoped_positions(positions, early, len(cfg.betas))
            betas = losses.position_betas(beta_positions, cfg.betas, cfg.beta_tail)
            loss = losses.constrained_loss(policy_logps, ref_logps, ones, betas, num_items_in_batch)
            self._track_weights(losses.constraint_weights(policy_logps.detach(), ref_logps, betas), positions,
                                policy_logps.detach() - ref_logps)
            if cfg.kl_anchor:
                index = inputs["anchor_index"]
                if ref_hidden is not None:
                    ref_ids, ref_top = losses.reference_topk(anchored_logits(ref_hidden, index, unwrapped),
                                                             cfg.kl_anchor_topk)
                else:
                    rows, slots = (index >= 0).nonzero(as_tuple=True)
                    ref_ids, ref_top = inputs["ref_topk_ids"][rows, slots], inputs["ref_topk_logps"][rows, slots]
                kl = losses.topk_kl(anchored_logits(hidden, index, unwrapped), ref_ids, ref_top)
                loss = loss + losses.kl_anchor_loss(kl, cfg.kl_anchor_weight, completion_mask[:, 1:].sum()
                                                    if num_items_in_batch is None else num_items_in_batch)
                self._track_kl(kl.detach())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over processes while num_items_in_batch already counts every process.
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    def _track_weights(self, weights: torch.Tensor, positions: torch.Tensor, rises: torch.Tensor) -> None:
        """Per position bucket: the constraint weight and how far the target token's log-prob has risen above the
        reference's (policy - ref, nats), summed over training and per optimizer step (position_history)."""
        step = self.state.global_step
        if not self.position_history or self.position_history[-1]["step"] != step:
            self.position_history.append({"step": step, **{name: [0.0, 0.0, 0] for name, _, _ in BUCKETS}})
        row = self.position_history[-1]
        for name, low, high in BUCKETS:
            in_bucket = positions >= low if high is None else (positions >= low) & (positions <= high)
            count = int(in_bucket.sum())
            self.weight_sums[name] += float(weights[in_bucket].sum())
            self.weight_counts[name] += count
            row[name][0] += float(weights[in_bucket].sum())
            row[name][1] += float(rises[in_bucket].sum())
            row[name][2] += count

    def _track_kl(self, kl: torch.Tensor) -> None:
        row = self.position_history[-1]
        row["kl_anchor"] = [row.get("kl_anchor", [0.0, 0])[0] + float(kl.sum()),
                            row.get("kl_anchor", [0.0, 0])[1] + kl.numel()]

    def position_stats(self) -> list[dict[str, Any]]:
        """Per optimizer step and bucket: mean constraint weight and mean log-prob rise over the reference."""
        return [{"step": row["step"] + 1, **{name: {"weight": w / n, "rise": r / n} if n else None
                                             for name, (w, r, n) in ((b, row[b]) for b, _, _ in BUCKETS)},
                 **({"kl_anchor": row["kl_anchor"][0] / row["kl_anchor"][1]} if row.get("kl_anchor", [0, 0])[1]
                    else {})}
                for row in self.position_history]


def _training_arguments(cfg: TrainConfig, out_dir: Path, use_bf16: bool, on_cpu: bool,
                        own_progress: bool) -> TrainingArguments:
    """guardtune's settings as TrainingArguments, with training.trainer_args passed through (config.py refuses the
    fields guardtune owns; here the names are checked against this transformers version's fields)."""
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(cfg.trainer_args) - known)
    if unknown:
        raise ConfigError(f"training.trainer_args.{unknown[0]} is not a transformers.TrainingArguments field "
                          f"(transformers {transformers.__version__}).{did_you_mean(unknown[0], known)}")
    passed = {"logging_steps": 1, "dataloader_num_workers": 0, "optim": "adamw_torch", "bf16": use_bf16,
              **cfg.trainer_args}
    return TrainingArguments(
        **passed,
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        adam_beta1=cfg.adam_betas[0],
        adam_beta2=cfg.adam_betas[1],
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.scheduler,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,  # keep completion_mask, response_positions and ref_logps
        use_cpu=on_cpu,
        disable_tqdm=own_progress,  # the caller's progress callback replaces the Trainer's bar
        report_to=_trackers(cfg.report_to),
    )


def _trackers(names: tuple[str, ...]) -> list[str] | str:
    """training.report_to as TrainingArguments.report_to, refused here (before the model loads) when transformers
    has no such integration or its package is not installed — the Trainer would fail later, or silently log nowhere."""
    if not names:
        return "none"
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"training.report_to: {name!r} is not a tracker transformers knows."
                              f"{did_you_mean(name, INTEGRATION_TO_CALLBACK)}")
        if name not in get_available_reporting_integrations():
            raise ConfigError(f"training.report_to: {name} is not installed in this environment; install its package "
                              f"(e.g. pip install {name}) or remove it from training.report_to.")
    return list(names)


def train(dataset: str | Path, config: TrainConfig | RunConfig | Policy | str | None = None,
          out: str | Path = "guardtune-train", *, model: str | None = None, validated: str | bool | None = None,
          trust_remote_code: bool | None = None, resume: bool = False, callbacks: Sequence[Any] = (),
          progress: Callable[[str, int, int], None] | None = None, **overrides: Any) -> TrainResult:
    """Fine-tune the model on a validated `dataset` (JSONL) with LoRA/QLoRA; write OUT/adapter and
    OUT/train_metrics.json. The train stage alone: `guardtune.train` (pipeline.train) validates and then calls it.

    `validated` is the sha256 that validation read (the file is refused if it has changed since: a file swapped
    between validation and training would train unscreened data), or True for data the caller generated itself
    (the red team's); without it nothing is trained. `config` is a RunConfig (what `finetune()` passes), a
    Policy or policy name/path, or a TrainConfig (the other sections from the default policy); `model=` and keyword
    `overrides` (objective=, quantization=, epochs=, max_steps=, learning_rate=, ...) replace single fields.
    `resume=True` continues from the newest checkpoint in OUT/checkpoints. `progress` is called as
    progress(phase, done, total) for the reference precompute and each optimizer step.
    """
    if validated is None or validated is False:
        raise DatasetError(f"training.train trains validated data only and {dataset} was not declared validated. "
                           f"Call guardtune.train (it validates first), or validate_dataset() and pass "
                           f"validated=<its sha256>.")
    started = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy, cfg, mcfg = resolve_stage("training", config, model, overrides, trust_remote_code)
    _trackers(cfg.report_to)  # a tracker that is not installed fails now, not after the model has loaded
    for note in cfg.warnings():
        logger.warning(note)
    expected_sha256 = validated if isinstance(validated, str) else None
    dataset_sha256 = expected_sha256 or sha256_file(dataset)

    loaded = load_model(mcfg.name, quantization=cfg.quantization, dtype=mcfg.dtype, revision=mcfg.revision,
                        trust_remote_code=mcfg.trust_remote_code)
    tokenizer, info = loaded.tokenizer, loaded.info
    names = (config.dataset if isinstance(config, RunConfig) else dataset_config(policy)).message_names
    examples = _render_examples(tokenizer, iter_records(dataset, sha256=expected_sha256, message_names=names),
                                cfg.max_length)
    pad_token_id = tokenizer.pad_token_id  # load_model gave it one (templates.ensure_pad_token)
    reference_info: dict[str, Any] = {"mode": cfg.reference if cfg.uses_reference else "none",
                                      "kl_anchor_positions": cfg.kl_anchor,
                                      "constraint_scope": cfg.constraint_scope if cfg.uses_reference else None}
    if cfg.uses_reference and cfg.constraint_scope == "refused":
        probe_started = time.perf_counter()
        probe_replies: list[dict[str, Any]] = []
        refused = reference_refusals(loaded.model, tokenizer, examples, max_new_tokens=cfg.scope_probe_tokens,
                                     batch_size=max(cfg.batch_size, 8), replies=probe_replies,
                                     progress=(lambda d, t: progress("scope probe", d, t)) if progress else None)
        for example, refuses in zip(examples, refused):
            example["early_constraint"] = refuses
        reference_info["scope_probe"] = {"refused": sum(refused), "examples": len(refused),
                                         "seconds": round(time.perf_counter() - probe_started, 3),
                                         "replies": probe_replies}
        logger.info("constraint scope 'refused': the reference refuses %d of %d prompts; only those get the early "
                    "constraint", sum(refused), len(refused))
    peft_model = attach_lora(loaded.model, cfg)

    if cfg.kl_anchor:
        for example in examples:
            example["anchor_index"] = (anchor_index(example["completion_mask"], example["response_positions"],
                                                    cfg.kl_anchor) if example.get("early_constraint", True) else [])
    if cfg.uses_reference and cfg.reference == "cached":
        topk = cfg.kl_anchor_topk if cfg.kl_anchor else 0
        # Under scope 'refused' only the probed-refused examples store anchor rows: their pattern is part of the key.
        scoped = "".join("1" if e.get("early_constraint", True) else "0" for e in examples) \
            if cfg.constraint_scope == "refused" and cfg.kl_anchor else None
        key = reference_cache_key(dataset_sha256, template_fingerprint(tokenizer), info.weights_sha256,
                                  info.quantization, info.dtype, cfg.max_length, cfg.kl_anchor, topk, scoped)
        ref_values, hit, seconds = load_or_compute_reference(
            peft_model, examples, key, pad_token_id, max(cfg.batch_size, 8),
            (lambda d, t: progress("reference", d, t)) if progress else None, topk=topk)
        for example, values in zip(examples, ref_values):
            example.update(values)
        reference_info.update({"cache_key": key, "cache_hit": hit, "precompute_s": round(seconds, 3)})

    fitted = fit(peft_model, _ExampleDataset(examples), cfg, out_dir, device=info.device, dtype=info.dtype,
                 pad_token_id=pad_token_id, resume=resume, callbacks=callbacks, progress=progress)
    summary = fitted.summary()  # collective under a launcher: tokens are summed over the processes
    if not distributed.is_main():  # one train_metrics.json, written by the main process
        return TrainResult(out_dir=out_dir, adapter_dir=fitted.adapter_dir, metrics_path=out_dir / "train_metrics.json",
                           metrics=summary, model=peft_model)
    metrics = {
        "objective": cfg.objective,
        "reference": cfg.reference_kind,
        "reference_detail": reference_info,
        **summary,
        "processes": distributed.world_size(),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "n_examples": len(examples),
        "n_truncated": sum(e["truncated"] for e in examples),
        "dataset": {"path": str(dataset), "sha256": dataset_sha256, "n_records": len(examples)},
        "model": info.to_dict(),
        "policy": policy.to_dict(),
        "config": as_dict(cfg),
        "seeds": {"seed": cfg.seed, "data_seed": cfg.seed},
        "versions": library_versions(),
        "resumed": bool(resume),
        "warnings": cfg.warnings(),
    }
    metrics_path = out_dir / "train_metrics.json"
    write_json_file(metrics_path, metrics)
    return TrainResult(out_dir=out_dir, adapter_dir=fitted.adapter_dir, metrics_path=metrics_path,
                       metrics=metrics, model=peft_model)


class _ProgressCallback(TrainerCallback):
    """Forwards optimizer steps to a progress(phase, done, total) callable (job runners, the pipeline)."""

    def __init__(self, progress: Callable[[str, int, int], None]):
        self.progress = progress

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress("train", state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.progress("train", state.global_step, state.max_steps)


@dataclass
class FitResult:
    """A finished Trainer run: the trainer (state, log history), its output, where the adapter went."""

    trainer: GuardedTrainer
    output: Any  # transformers.TrainOutput
    adapter_dir: Path
    train_seconds: float

    def summary(self) -> dict[str, Any]:
        """The run's numbers for a metrics file: steps, loss curve, throughput, per-position constraint weights."""
        trainer, seconds = self.trainer, self.train_seconds
        tokens = distributed.sum_over_processes(trainer.tokens_seen)
        history = [row for row in trainer.state.log_history if "loss" in row]
        return {
            "steps": trainer.state.global_step,
            "epochs": trainer.state.epoch,
            "train_loss": self.output.training_loss,
            "loss_curve": [{"step": r["step"], "loss": r["loss"], "learning_rate": r.get("learning_rate"),
                            "grad_norm": r.get("grad_norm")} for r in history],
            "tokens_seen": tokens,  # over all processes
            "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else None,
            "train_seconds": round(seconds, 3),
            "constraint_weight": {name: (trainer.weight_sums[name] / trainer.weight_counts[name]
                                         if trainer.weight_counts[name] else None) for name, _, _ in BUCKETS},
            "position_stats": trainer.position_stats(),
        }


def fit(peft_model: Any, dataset: torch.utils.data.Dataset, cfg: TrainConfig, out_dir: Path, *, device: str,
        dtype: str, pad_token_id: int, resume: bool = False, callbacks: Sequence[Any] = (),
        progress: Callable[[str, int, int], None] | None = None) -> FitResult:
    """Train a LoRA-wrapped model on tokenized examples with GuardedTrainer; save OUT/adapter.

    The one training loop of the project: `train` (a customer's JSONL) and `alignment.align` (safety data built
    in memory) both end here. `dataset` yields dicts with input_ids, completion_mask, response_positions (and
    ref_logps for the cached constrained objective); one with a `set_epoch(epoch)` method is told each epoch.
    """
    on_cpu = device == "cpu"
    args = _training_arguments(cfg, out_dir, use_bf16=(dtype == "bfloat16" and not on_cpu), on_cpu=on_cpu,
                               own_progress=progress is not None)
    all_callbacks = list(callbacks)
    if progress:
        all_callbacks.append(_ProgressCallback(progress))
    if hasattr(dataset, "set_epoch"):
        all_callbacks.append(_EpochCallback(dataset))
    trainer = GuardedTrainer(model=peft_model, args=args, train_dataset=dataset,
                             data_collator=lambda batch: collate(batch, pad_token_id), callbacks=all_callbacks,
                             guard_config=cfg)
    if progress:
        trainer.remove_callback(PrinterCallback)  # per-step log dicts on stdout; the progress callback reports
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=True if resume else None)
    seconds = time.perf_counter() - started
    adapter_dir = out_dir / "adapter"
    if distributed.is_main():  # the processes hold the same weights after every step; one writes them
        peft_model.save_pretrained(str(adapter_dir))
        checkpoints = Path(args.output_dir)
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # no save_steps: the Trainer created it and wrote nothing
    distributed.barrier()
    return FitResult(trainer=trainer, output=output, adapter_dir=adapter_dir, train_seconds=seconds)


class _EpochCallback(TrainerCallback):
    """Tells a dataset which epoch starts (datasets that draw something anew every epoch, e.g. prefix lengths)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(round(state.epoch or 0))  # state.epoch is a float that reaches e at its end
