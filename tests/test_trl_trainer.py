"""The TRL-native trainer (guardtune.trl_trainer): positions from TRL's labels, the reference column computed over
a datasets.Dataset and cached, and on the same batch the same loss and gradients as guardtune's own trainer."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="the [trl] extra; `make setup` installs it")  # noqa: F841
from datasets import Dataset  # noqa: E402

from guardtune.config import TrainConfig  # noqa: E402
from guardtune.errors import ConfigError  # noqa: E402
from guardtune.models import attach_lora, load_model  # noqa: E402
from guardtune.training import (GuardedTrainer, _render_examples, _training_arguments, collate,  # noqa: E402
                                compute_reference_logps)
from guardtune.trl_trainer import ConstrainedSFTConfig, ConstrainedSFTTrainer, response_positions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHATS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"},
     {"role": "assistant", "content": "Green, like grass in spring."}],
]


def test_response_positions_count_within_each_run_of_trained_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 1, 1]])
    assert response_positions(mask).tolist() == [[0, 0, 1, 2, 3, 0, 1, 2, 0], [1, 2, 0, 0, 0, 0, 0, 1, 2]]


def test_config_refuses_packing_and_unknown_reference(tmp_path):
    with pytest.raises(ConfigError, match="packing"):
        ConstrainedSFTConfig(output_dir=str(tmp_path), use_cpu=True, packing=True)
    with pytest.raises(ConfigError, match="cached or online"):
        ConstrainedSFTConfig(output_dir=str(tmp_path), use_cpu=True, reference="offline")


@pytest.fixture()
def setup(tmp_path, tmp_path_factory, monkeypatch):
    from tiny_models import save_tiny_model

    monkeypatch.setenv("GUARDTUNE_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_model(tmp_path_factory.mktemp("trl-model"), initializer_range=0.2)
    loaded = load_model(str(model_dir), device="cpu")
    cfg = TrainConfig(objective="paper", kl_anchor_positions=0, lora_r=4, lora_alpha=8, batch_size=2, max_steps=1,
                      warmup_steps=0)
    peft_model = attach_lora(loaded.model, cfg)
    with torch.no_grad():  # non-zero LoRA B, so the policy differs from the reference and the gradients are rich
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    examples = _render_examples(loaded.tokenizer, enumerate(CHATS, start=1), 256)  # what guardtune trains on
    return loaded.tokenizer, peft_model, cfg, examples


def test_same_loss_and_gradients_as_guardtunes_trainer_on_the_same_batch(tmp_path, setup):
    tokenizer, peft_model, cfg, examples = setup
    twin = copy.deepcopy(peft_model)
    # guardtune's own trainer (objective "paper" = Eq. 3, cached reference).
    for example, ref in zip(examples, compute_reference_logps(peft_model, examples, tokenizer.pad_token_id, 8)):
        example.update(ref)
    ours = GuardedTrainer(model=peft_model, args=_training_arguments(cfg, tmp_path / "g", False, True, True),
                          train_dataset=examples, data_collator=lambda b: collate(b, tokenizer.pad_token_id),
                          guard_config=cfg)
    batch = collate(examples, tokenizer.pad_token_id)
    n = int(batch["completion_mask"][:, 1:].sum())
    loss = ours.compute_loss(peft_model, batch, num_items_in_batch=n)
    loss.backward()
    # TRL's: the same tokens as a pre-tokenized dataset, the trained tokens as labels.
    rows = [{"input_ids": e["input_ids"], "labels": [t if m else -100 for t, m in zip(e["input_ids"],
                                                                                      e["completion_mask"])]}
            for e in examples]
    args = ConstrainedSFTConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2, max_steps=1,
                                report_to="none", use_cpu=True, betas=list(cfg.betas), beta_tail=cfg.beta_tail,
                                max_length=None)
    theirs = ConstrainedSFTTrainer(model=twin, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer)
    assert "ref_logps" in theirs.train_dataset.column_names
    trl_batch = next(iter(theirs.get_train_dataloader()))
    assert int((trl_batch["labels"][:, 1:] != -100).sum()) == n
    their_loss = theirs.compute_loss(twin, trl_batch, num_items_in_batch=n)
    their_loss.backward()
    assert their_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    grads = {k: p.grad for k, p in peft_model.named_parameters() if p.requires_grad}
    their_grads = {k: p.grad for k, p in twin.named_parameters() if p.requires_grad}
    assert grads.keys() == their_grads.keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        assert torch.allclose(grad, their_grads[name], atol=1e-6, rtol=1e-4), name


def test_the_reference_column_is_cached_by_dataset_fingerprint(tmp_path, setup):
    tokenizer, peft_model, cfg, examples = setup
    rows = [{"input_ids": e["input_ids"], "labels": [t if m else -100 for t, m in zip(e["input_ids"],
                                                                                      e["completion_mask"])]}
            for e in examples]
    args = ConstrainedSFTConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2, max_steps=1,
                                report_to="none", use_cpu=True, max_length=None)
    first = ConstrainedSFTTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer)
    cached = list((tmp_path / "cache" / "reference").glob("*.safetensors"))
    assert len(cached) == 1
    expected = compute_reference_logps(peft_model, examples, tokenizer.pad_token_id, 8)
    column = first.train_dataset["ref_logps"]
    assert [len(row) for row in column] == [len(e["ref_logps"]) for e in expected]
    assert sum(column, []) == pytest.approx(sum((e["ref_logps"] for e in expected), []), abs=1e-5)
    mtime = cached[0].stat().st_mtime_ns
    second = ConstrainedSFTTrainer(model=peft_model, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tokenizer)
    assert cached[0].stat().st_mtime_ns == mtime  # read, not rewritten
    assert second.train_dataset["ref_logps"] == first.train_dataset["ref_logps"]


def test_the_example_script_trains_an_adapter_on_cpu(tmp_path, tiny_model_dir):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_constrained_sft.py"), "--model",
                           str(tiny_model_dir), "--max-steps", "2", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env={"GUARDTUNE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "trained 2 steps" in done.stdout
