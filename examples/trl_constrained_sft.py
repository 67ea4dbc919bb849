"""guardtune's constrained objective inside a TRL SFTTrainer stack: copy this into your job runner.

    pip install "guardtune[trl]"
    python examples/trl_constrained_sft.py [--model smollm2-135m-instruct] [--data examples/support_replies.jsonl]

ConstrainedSFTTrainer is trl.SFTTrainer with the loss replaced by Qi et al. 2025's token-wise constrained objective
(Eq. 3) against the frozen base (the PEFT model with its adapter disabled); everything else — dataset formats,
chat templates, launchers (`accelerate launch`, `torchrun`), callbacks, trackers — is TRL's and transformers'.
The audit and gate stay guardtune's: `guardtune audit --adapter OUT` then `guardtune gate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from guardtune.modelspec import resolve_model_dir
from guardtune.trl_trainer import ConstrainedSFTConfig, ConstrainedSFTTrainer

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="A guardtune model spec (embedded name, local directory) or any local HF model dir.")
    parser.add_argument("--data", default=str(HERE / "support_replies.jsonl"), help="Chat JSONL ('messages').")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--out", default="trl-constrained-adapter")
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)  # the embedded model converts once from its GGUF
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # TRL's conversational prompt-completion form: the loss (and the positions t) cover the completion only. A
    # "messages" dataset would train every token unless the chat template marks assistant turns for
    # assistant_only_loss ({% generation %}), which ChatML templates such as SmolLM2's do not.
    dataset = load_dataset("json", data_files=args.data, split="train").map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
        remove_columns=["messages"])

    config = ConstrainedSFTConfig(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-4,              # LoRA; the paper's 2e-5 is for full fine-tuning
        adam_beta1=0.5,                  # the paper's setting for the constrained objective
        warmup_steps=2,
        completion_only_loss=True,       # TRL's completion mask decides the trained tokens (t = 1 at its start)
        betas=[0.5, 2.0, 2.0, 2.0, 2.0],  # beta_1..5: strong constraint on the first response tokens
        beta_tail=0.1,                   # weak afterwards
        reference="cached",              # one reference pass over the dataset, cached by its fingerprint
        report_to="none",
        save_strategy="no",
        use_cpu=not on_gpu,
        bf16=on_gpu,  # TRL's default is bf16 autocast, also on CPU, where a step took 102 s here (fp32: 5.1 s)
    )
    trainer = ConstrainedSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    result = trainer.train()
    trainer.model.save_pretrained(args.out)
    print(f"trained {result.global_step} steps, loss {result.training_loss:.4f}; adapter in {args.out}")


if __name__ == "__main__":
    main()
