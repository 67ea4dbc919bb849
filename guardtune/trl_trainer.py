"""guardtune's objective inside a TRL stack: `ConstrainedSFTTrainer(trl.SFTTrainer)` with `ConstrainedSFTConfig`.

For providers whose fine-tuning service is built on TRL's SFTTrainer (its dataset formats, packing options,
launchers and callbacks): the same token-wise constrained objective as guardtune's own trainer (Qi et al. 2025,
Eq. 3; `losses.constrained_loss`), against the frozen base as reference (the PEFT model with its adapter disabled).

- Response positions t come from TRL's own labels: TRL folds its `completion_mask` / `assistant_masks` into
  `labels` (-100 elsewhere), and each contiguous run of trained tokens is one response, t = 1, 2, ... within it
  (`response_positions`), which is what guardtune's templates compute for a chat.
- `reference="cached"`: the reference per-token log-probs are computed once over the prepared
  `datasets.Dataset`, sharded across processes under a launcher, stored as a `ref_logps` column and cached on disk
  by the dataset's fingerprint, the model's name/revision and dtype. `reference="online"` recomputes them every
  step (no cache, one more forward per step).
- Not included: guardtune's KL anchor (objective "constrained"); this trainer implements the paper's Eq. 3
  (guardtune's objective "paper"). Packing / padding-free batches are refused (positions would run across
  examples).

Needs `pip install guardtune[trl]` (trl, datasets). examples/trl_constrained_sft.py is a script to copy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import trl

from . import losses
from .errors import ConfigError
from .logprobs import response_logps
from .models import reference
from .training import load_or_compute_reference

CACHE_FORMAT = 1


@dataclass
class ConstrainedSFTConfig(trl.SFTConfig):
    """trl.SFTConfig plus the constrained objective's settings (Qi et al. 2025, Sec. 4.1 defaults)."""

    betas: list[float] = field(default_factory=lambda: [0.5, 2.0, 2.0, 2.0, 2.0],
                               metadata={"help": "beta_t for response positions t = 1..len(betas)."})
    beta_tail: float = field(default=0.1, metadata={"help": "beta_t for positions after len(betas)."})
    reference: str = field(default="cached", metadata={
        "help": "cached: reference log-probs computed once before training (a ref_logps column, cached on disk by "
                "dataset fingerprint, model and dtype); online: recomputed every step with the adapter disabled."})
    reference_batch_size: int = field(default=8, metadata={"help": "Examples per forward of the reference pass."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reference not in ("cached", "online"):
            raise ConfigError(f"ConstrainedSFTConfig.reference is {self.reference!r}; use cached or online.")
        if not self.betas or min(self.betas) <= 0 or self.beta_tail <= 0:
            raise ConfigError("ConstrainedSFTConfig.betas and beta_tail must be positive numbers.")
        if self.packing or self.padding_free:
            raise ConfigError("ConstrainedSFTTrainer needs one example per row: packing and padding_free would run "
                              "response positions across examples. Set packing=False, padding_free=False.")


def response_positions(mask: torch.Tensor) -> torch.Tensor:
    """t per token: 1, 2, ... within each contiguous run of 1s of `mask` [B, T] (a response), 0 outside."""
    mask = mask.long()
    index = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    # The index of the last 0 at or before each token; t = distance to it.
    last_zero = torch.where(mask == 0, index, torch.full_like(index, -1)).cummax(dim=-1).values
    return (index - last_zero) * mask


class ConstrainedSFTTrainer(trl.SFTTrainer):
    """trl.SFTTrainer whose loss is guardtune's constrained objective against the frozen base.

    Use it as SFTTrainer (model, args=ConstrainedSFTConfig(...), train_dataset, processing_class, peft_config);
    the model must be a PEFT model (or `peft_config` given): the reference is the same weights with the adapter
    disabled.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        args_config = kwargs.get("args")
        if args_config is not None and not isinstance(args_config, ConstrainedSFTConfig):
            raise ConfigError("ConstrainedSFTTrainer needs args=ConstrainedSFTConfig(...) (betas, beta_tail, "
                              "reference), not a plain SFTConfig.")
        super().__init__(*args, **kwargs)
        if not hasattr(self.model, "disable_adapter"):
            raise ConfigError("ConstrainedSFTTrainer needs a PEFT model (pass peft_config=LoraConfig(...)): the "
                              "reference is the base with the adapter disabled.")
        self.model_accepts_loss_kwargs = True  # the Trainer then passes num_items_in_batch over the whole step
        if self.args.reference == "cached" and self.train_dataset is not None:
            self.train_dataset = self._with_reference(self.train_dataset)

    # -- data ----------------------------------------------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.args.reference == "cached" and "ref_logps" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "ref_logps"]

    def _wrap_collator(self) -> None:
        inner = self.data_collator

        def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = inner([{k: v for k, v in e.items() if k != "ref_logps"} for e in examples])
            if "ref_logps" in examples[0]:
                width = batch["input_ids"].shape[1]
                ref = torch.zeros((len(examples), width), dtype=torch.float32)
                for row, example in enumerate(examples):
                    ref[row, :len(example["ref_logps"])] = torch.tensor(example["ref_logps"], dtype=torch.float32)
                batch["ref_logps"] = ref
            return batch

        self.data_collator = collate

    def get_train_dataloader(self):
        if not getattr(self, "_collator_wrapped", False):
            self._wrap_collator()
            self._collator_wrapped = True
        return super().get_train_dataloader()

    def _cache_key(self, dataset: Any) -> str:
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        identity = {"format": CACHE_FORMAT, "fingerprint": getattr(dataset, "_fingerprint", None),
                    "model": getattr(base.config, "_name_or_path", None),
                    "revision": getattr(base.config, "_commit_hash", None),
                    "dtype": str(next(base.parameters()).dtype), "rows": len(dataset)}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def _with_reference(self, dataset: Any) -> Any:
        """The dataset with a `ref_logps` column: per token, the reference's log-prob where labels train it, from
        guardtune's own cached, sharded reference pass (training.load_or_compute_reference) over TRL's rows."""
        examples = []
        for row in dataset:
            trained = [int(x != -100) for x in row.get("labels", row["input_ids"])]
            examples.append({"input_ids": row["input_ids"], "completion_mask": trained,
                             "response_positions": response_positions(torch.tensor([trained]))[0].tolist()})
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        values, _, _ = load_or_compute_reference(self.model, examples, self._cache_key(dataset),
                                                 pad_id if pad_id is not None else 0, self.args.reference_batch_size)
        return dataset.add_column("ref_logps", [v["ref_logps"] for v in values])

    # -- loss ----------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        trained = (inputs["labels"] != -100).long()
        select = trained[:, 1:].bool()
        unwrapped = self.accelerator.unwrap_model(model)
        policy_logps = response_logps(model, input_ids, attention_mask, trained, unwrapped)
        if self.args.reference == "online":
            with reference(unwrapped):
                ref_logps = response_logps(model, input_ids, attention_mask, trained, unwrapped)
        else:
            ref_logps = inputs["ref_logps"][:, 1:][select].to(policy_logps.dtype)
        positions = response_positions(trained)[:, 1:][select]
        betas = losses.position_betas(positions, self.args.betas, self.args.beta_tail)
        loss = losses.constrained_loss(policy_logps, ref_logps, torch.ones_like(policy_logps), betas,
                                       num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # DDP averages gradients over processes while num_items_in_batch already counts every process.
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss
