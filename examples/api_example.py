"""Run a guardtune job from Python, the way a provider's job runner would.

    python examples/api_example.py [DATA.jsonl] [--policy cpu-demo] [--out runs/api-example]

Validates first (cheap, torch-free) and stops with every problem by line if the upload is bad; otherwise
runs the whole job with a progress callback and prints the verdict, the ASR table and where things are.
Exit status follows the CLI: 0 released, 3 quarantined, 1 invalid data.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import guardtune

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(HERE / "support_replies.jsonl"))
    parser.add_argument("--policy", default="cpu-demo")
    parser.add_argument("--model", default=None, help="model spec (default: the policy's)")
    parser.add_argument("--out", default=None, help="run directory (default: guardtune-runs/<run id>)")
    args = parser.parse_args()

    report = guardtune.validate_dataset(args.data, config=args.policy)
    if not report.valid:
        for issue in report.issues:
            print(issue, file=sys.stderr)
        return 1
    print(report.summary())

    last = {}

    def progress(stage: str, phase: str, done: int, total: int) -> None:
        # A job runner would post this to its status page; print one line per stage and phase.
        if last.get(stage) != phase:
            print(f"[{stage}] {phase} ...", flush=True)
            last[stage] = phase

    run = guardtune.finetune(args.data, model=args.model, policy=args.policy, out=args.out, progress=progress)
    print(f"verdict: {run.verdict} -> {run.published_dir}")
    for row in run.audit.asr_table():
        tuned = "-" if row["finetuned"] is None else f"{row['finetuned']:.1%}"
        print(f"  k={row['k']:>2}  base {row['base']:.1%}  fine-tuned {tuned}")
    for rule in run.decision.failed_rules:
        print(f"  failed: {rule.reason}")
    check = guardtune.verify(run.published_dir)
    print(f"manifest verified: {check.ok} ({check.checked} files)")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
