"""Run by tests/test_distributed.py under `torchrun` (and alone, for the one-process baseline):

    python distributed_job.py train MODEL_DIR DATA OUT BATCH_SIZE
    python distributed_job.py audit MODEL_DIR ADAPTER OUT
    python distributed_job.py attacks MODEL_DIR ADAPTER OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def train_job(model_dir: str, data: str, out: str, batch_size: int) -> None:
    from guardtune.training import train

    policy = Path(out).with_suffix(".yaml")
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text(f"version: 'dist-test'\ninclude: default\nmodel: {{name: {json.dumps(model_dir)}}}\n"
                      "dataset: {min_examples: 1, duplicates: ignore, screen: {enabled: false}}\n"
                      f"training: {{max_steps: 3, batch_size: {batch_size}, max_length: 256, "
                      "optimizer: {learning_rate: 0.01, warmup_steps: 0}}\n")
    train(data, config=str(policy), out=out, validated=True)


AUDITS = {  # the audit options of each job: prefilling alone, and both attacks beside it at a tiny budget
    "audit": dict(sample_harmful=9, sample_benign=5, sample_utility=4, max_new_tokens=6, prefill_k=(0, 3),
                  prefix_tokens=8, kl_positions=4, batch_size=4, decoding_attack=False, gcg_attack=False),
    "attacks": dict(sample_harmful=4, sample_benign=2, utility_set=None, max_new_tokens=4, prefill_k=(0,),
                    prefix_tokens=6, kl_positions=4, batch_size=4, decoding_temperatures=(0.5,), decoding_top_k=(5,),
                    decoding_top_p=(0.9,), decoding_prompts=3, gcg_prompts=2, gcg_steps=2, gcg_search_width=8,
                    gcg_topk=8, gcg_suffix_init="x x x x"),
}


def audit_job(kind: str, model_dir: str, adapter: str, out: str) -> None:
    from guardtune.auditing import audit

    result = audit(adapter, out=out, model=model_dir, prefix_model=model_dir, **AUDITS[kind])
    print(f"process {os.environ.get('RANK', '0')}: {'report' if result is not None else 'none'}")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "train":
        train_job(args[0], args[1], args[2], int(args[3]))
    elif command in AUDITS:
        audit_job(command, *args)
    else:
        raise SystemExit(f"unknown command {command!r}")
