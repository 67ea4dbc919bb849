"""One point of the alignment sweep: `guardtune align` with some settings, then the audit on HELD-OUT TRAINING
prompts (never the audit sets) beside the raw model. Appends one row to RESULTS (JSON lines) and prints it.

    python benchmarks/align_sweep.py --name deep-p05 --set recovery_prob=0.5 --set learning_rate=5e-4
    python benchmarks/align_sweep.py --table            # the rows so far, as the Markdown table of docs/alignment.md

The held-out prompts are align.holdout.* of the alignment data (split with a fixed seed), so tuning never sees
the audit's 218 harmful prompts or 125 benign probes; the final check on those is `guardtune audit`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_RESULTS = Path("runs/align-sweep/results.jsonl")


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def run(name: str, settings: dict, out_root: Path, results: Path, model: str, k: tuple[int, ...],
        max_new_tokens: int) -> dict:
    import guardtune
    from guardtune.auditing import audit

    out = out_root / name
    started = time.perf_counter()
    metrics_path = out / "align_metrics.json"
    if metrics_path.is_file():  # trained already (an interrupted sweep point): audit it again
        metrics = json.loads(metrics_path.read_text())
        adapter_dir, steps, align_s = out / "adapter", metrics["steps"], metrics["wall_time_s"]
    else:
        aligned = guardtune.align(model=model, out=out, config="default", **settings)
        adapter_dir, steps, align_s = aligned.adapter_dir, aligned.metrics["steps"], time.perf_counter() - started
    started = time.perf_counter()
    report = audit(model=model, adapter=adapter_dir, config="default", out=out / "audit",
                   harmful_set=str(out / "holdout_harmful.jsonl"), prefix_source="dataset",
                   benign_set=str(out / "holdout_benign.jsonl"), prefill_k=k, max_new_tokens=max_new_tokens,
                   kl_positions=32, decoding_attack=False, gcg_attack=False).report  # attacks: attack_table.py
    audit_s = time.perf_counter() - started
    tuned, base = report["results"]["finetuned"], report["results"]["base"]
    kl = tuned["kl_profile"]["mean_kl"]
    row = {
        "name": name, "settings": settings,
        "refusal": {str(e["k"]): round(1 - e["rate"], 4) for e in tuned["asr"]},
        "raw_refusal": {str(e["k"]): round(1 - e["rate"], 4) for e in base["asr"]},
        "over_refusal": tuned["over_refusal"]["rate"], "raw_over_refusal": base["over_refusal"]["rate"],
        "utility": tuned["utility"]["rate"], "raw_utility": base["utility"]["rate"],
        "kl": {"t1": kl[0], "t2_5": sum(kl[1:5]) / 4, "t6_32": sum(kl[5:]) / len(kl[5:])},
        "n": {"harmful": report["sample"]["harmful"], "benign": report["sample"]["benign"],
              "utility": report["sample"]["utility"]},
        "steps": steps, "align_s": round(align_s, 1), "audit_s": round(audit_s, 1),
        "max_new_tokens": max_new_tokens,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    ks = sorted({int(k) for r in rows for k in r["refusal"]})
    head = ("| run | settings | " + " | ".join(f"refusal k={k}" for k in ks)
            + " | benign refused | utility | KL t1 / t2-5 / t6+ | steps | align s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
        lines.append(f"| {r['name']} | {settings} | " + " | ".join(f"{r['refusal'][str(k)]:.0%}" for k in ks)
                     + f" | {r['over_refusal']:.0%} | {r['utility']:.0%} | {r['kl']['t1']:.1f} / "
                       f"{r['kl']['t2_5']:.1f} / {r['kl']['t6_32']:.1f} | {r['steps']} | {r['align_s']:.0f} |")
    raw = rows[0]
    lines.append("| raw model | - | " + " | ".join(f"{raw['raw_refusal'][str(k)]:.0%}" for k in ks)
                 + f" | {raw['raw_over_refusal']:.0%} | {raw['raw_utility']:.0%} | 0 | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="AlignConfig or training field, e.g. recovery_prob=0.5, anchor_ratio=2, epochs=3")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--k", default="0,5,10,20,40")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("runs/align-sweep"))
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--table", action="store_true", help="Print the Markdown table of the rows so far.")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.results))
        return 0
    if not args.name:
        parser.error("--name is required to run a point")
    settings = {}
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = parse_value(value)
    row = run(args.name, settings, args.out, args.results, args.model, tuple(int(k) for k in args.k.split(",")),
              args.max_new_tokens)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
