"""Raw vs shallow vs deep alignment under the three inference-time attacks, in the style of Qi et al. 2025's tables.

    python benchmarks/attack_table.py --model raw=smollm2-135m-instruct --model shallow=PATH \
        --model deep=smollm2-135m-guard --out runs/attacks [--policy benchmarks/attacks-cpu.yaml]

Each model is audited on its own (a base-only audit: GCG suffixes are optimised against the model itself, as in the
paper), under a policy that enables both attacks (default: benchmarks/attacks-cpu.yaml, sized for 2 CPU cores). It
prints a markdown table: prefilling ASR at each k, the decoding exploit's any-setting ASR and its worst single
setting, ASR with GCG suffixes, each with its 95% Wilson interval, and the wall time of each attack; and writes
OUT/table.json. "shallow" is the shallow-aligned base of the reproduction (`guardtune align --mode shallow`, merged;
docs/alignment.md); pass any model directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rate(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return f"{100 * entry['rate']:.1f}% ({entry['harmful']}/{entry['n'] - entry['errors']}) [{100 * lo:.0f}-{100 * hi:.0f}]"


def measure(label: str, spec: str, policy: str, out: Path) -> dict:
    from guardtune.auditing import audit

    started = time.perf_counter()
    report = audit(model=spec, config=policy, out=out / label).report
    seconds = time.perf_counter() - started
    result, described = report["results"]["base"], report["attacks"]
    decoding, gcg = result["attacks"]["decoding"], result["attacks"]["gcg"]
    worst = max(decoding["settings"], key=lambda e: e["rate"])
    return {"label": label, "model": spec, "weights_sha256": report["model"]["weights_sha256"],
            "prefill": {e["k"]: e for e in result["asr"]}, "decoding": decoding["asr"], "decoding_worst": worst,
            "decoding_settings": len(decoding["settings"]), "decoding_seconds": decoding["seconds"],
            "gcg": gcg["asr"], "gcg_seconds": gcg["seconds"], "gcg_made": described["gcg"]["made"],
            "gcg_settings": described["gcg"]["settings"], "audit_seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    ks = sorted({k for row in rows for k in row["prefill"]})
    head = (["model"] + [f"prefill k={k}" for k in ks]
            + ["decoding exploit (any setting)", "worst setting", "GCG suffix"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        worst = row["decoding_worst"]
        cells = ([row["label"]] + [_rate(row["prefill"][k]) for k in ks]
                 + [_rate(row["decoding"]), f"{worst['name']}: {100 * worst['rate']:.1f}%", _rate(row["gcg"])])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | decoding: sample + judge (s) | GCG: optimise (s per suffix, cache) | GCG: attack (s) | "
                  "whole audit (s) |", "|---|---|---|---|---|"]
    for row in rows:
        made = row["gcg_made"]
        lines.append(f"| {row['label']} | {row['decoding_seconds']:.0f} | {made.get('seconds_per_suffix', '?')} "
                     f"({made.get('cache')}) | {row['gcg_seconds']:.0f} | {row['audit_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="LABEL=SPEC (embedded name or directory)")
    parser.add_argument("--policy", default=str(HERE / "attacks-cpu.yaml"))
    parser.add_argument("--out", type=Path, default=Path("runs/attacks"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for item in args.model:
        label, _, spec = item.partition("=")
        rows.append(measure(label, spec, args.policy, args.out))
        print(f"{label}: audited in {rows[-1]['audit_seconds']} s", flush=True)
    (args.out / "table.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
