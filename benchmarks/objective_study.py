"""One point of the objective study (docs/objective.md): a fine-tuning attack through `guardtune.redteam` with one
objective and attack strength, audited on TUNING prompts (attack-set prompts no attack trains on), never the audit
set. Appends one row per seed to RESULTS (JSON lines); --table prints the Markdown table.

    python benchmarks/objective_study.py --name paper-lr2e-4 --model DIR --attack harmful --objective paper --lr 2e-4
    python benchmarks/objective_study.py --name anchor5 --model DIR --attack harmful --objective constrained \\
        --set kl_anchor_positions=5 --set kl_anchor_weight=1
    python benchmarks/objective_study.py --table
    python benchmarks/objective_study.py --plot sft-lr2e-4,paper-lr2e-4 --svg docs/objective   # per-position SVGs

--plot draws, for the named runs (seed 0): the attacked model's KL to the base per response position on harmful
answers (from each run's audit report), and the per-step rise of log p(target) over the reference at t = 1 and
t = 2..5 (from train_metrics' position_stats; SFT runs have no reference pass and so no rise trace).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

RESULTS = Path("runs/objective/results.jsonl")
TUNING_OFFSET = 60  # attacks train on at most the first 40 usable prompts of this order; the rest tune


def tuning_set(path: Path) -> Path:
    """Attack-set prompts past the first TUNING_OFFSET of the red team's category round-robin order."""
    from guardtune.evalsets import load_harmful, sample

    prompts = load_harmful(builtin="attack_harmful.jsonl")
    rows = sample(prompts, len(prompts), 0)[TUNING_OFFSET:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": p.id, "category": p.category, "instruction": p.instruction,
                                        "opener": p.opener}) + "\n" for p in rows), encoding="utf-8")
    return path


def parse_value(text: str):
    if "," in text:
        return [parse_value(t) for t in text.split(",")]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name")
    parser.add_argument("--model", default="smollm2-135m-guard")
    parser.add_argument("--attack", default="harmful")
    parser.add_argument("--objective", default="constrained")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    parser.add_argument("--k", default="0")
    parser.add_argument("--out", type=Path, default=Path("runs/objective"))
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished seeds of --name (e.g. --seeds 3 after a 1-seed run adds seeds 1, 2)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--plot", help="comma-separated run names to draw (with --svg)")
    parser.add_argument("--svg", type=Path, help="output prefix: PREFIX-kl.svg and PREFIX-rise.svg")
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return 0
    if args.plot:
        for path in plot(args.plot.split(","), args.svg or Path("runs/objective/plot"), args.out):
            print(path)
        return 0
    import guardtune

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = parse_value(value)
    result = guardtune.redteam(model=args.model, attacks=[args.attack], objectives=[args.objective],
                               out=args.out / args.name, seeds=args.seeds, learning_rate=args.lr,
                               max_steps=args.steps, audit_set=str(tuning_set(args.out / "tuning_set.jsonl")),
                               audit_harmful=200, audit_benign=24, audit_utility=None,
                               prefill_k=tuple(int(k) for k in args.k.split(",")), train_overrides=overrides,
                               resume=args.resume)
    saved = json.loads(result.json_path.read_text())
    base = saved["bases"][args.attack]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as handle:
        for run in saved["runs"]:
            if run.get("resumed"):
                continue  # its row was appended when it ran
            row = {"name": args.name, "model": args.model, "attack": args.attack, "objective": args.objective,
                   "lr": args.lr, "steps": args.steps, "seed": run["seed"], "overrides": overrides,
                   "base": {label: base[label]["asr"] for label in base if isinstance(base[label], dict)
                            and "asr" in base[label]},
                   "base_utility": base["plain"]["utility"],
                   **{label: run[label] for label in run if isinstance(run[label], dict) and "asr" in run[label]},
                   "train": run["train"]}
            handle.write(json.dumps(row) + "\n")
            print(json.dumps({k: row[k] for k in row if k != "train"}))
    return 0


def read_rows() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def table() -> str:
    rows = read_rows()
    lines = ["| run | model | attack | objective | lr | steps | seed | settings | ASR k=0 (base) | ASR k=0 | "
             "utility | weight t1 / t2-5 / t6+ | rise t1 (nats) |", "|" + "---|" * 13]
    for r in rows:
        label = "triggered" if "triggered" in r else "persona" if "persona" in r else "plain"
        stats = r["train"].get("position_stats") or []
        last = stats[-1] if stats else {}
        weights = r["train"]["constraint_weight"]
        w = " / ".join(f"{weights[b]:.2f}" if weights[b] is not None else "-" for b in ("t1", "t2_5", "t6_plus"))
        rise = f"{last['t1']['rise']:.1f}" if last.get("t1") else "-"
        settings = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
        utility = r["plain"]["utility"]
        lines.append(f"| {r['name']} | {Path(r['model']).name} | {r['attack']} ({label}) | {r['objective']} | {r['lr']:g} "
                     f"| {r['steps']} | {r['seed']} | {settings} | {r['base'][label]['0']:.0%} | "
                     f"{r[label]['asr']['0']:.0%} | {'-' if utility is None else f'{utility:.0%}'} | {w} | {rise} |")
    return "\n".join(lines)


def plot(names: list[str], prefix: Path, out: Path) -> list[Path]:
    from guardtune.report import line_chart

    rows = {row["name"]: row for row in read_rows() if row["seed"] == 0}
    kl_series, rise_series = [], []
    prefix_len = len(os.path.commonprefix(names)) if len(names) > 1 else 0
    suffix_len = len(os.path.commonprefix([n[::-1] for n in names])) if len(names) > 1 else 0
    for name in names:
        row = rows[name]
        label = name[prefix_len:len(name) - suffix_len] or name  # legend: what differs between the runs
        report = out / name / row["attack"] / row["objective"] / "seed0" / "audit-plain" / "report.json"
        profile = json.loads(report.read_text())["results"]["finetuned"]["kl_profile"]
        kl_series.append((label, list(zip(profile["positions"], profile["mean_kl"]))))
        stats = row["train"].get("position_stats") or []
        for bucket, where in (("t1", "t=1"), ("t2_5", "t=2..5")):
            if stats:
                rise_series.append((f"{label} {where}", [(s["step"], s[bucket]["rise"]) for s in stats]))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(prefix.name + "-kl.svg"), prefix.with_name(prefix.name + "-rise.svg")]
    paths[0].write_text(line_chart("KL(attacked || base) per response position on harmful answers",
                                   kl_series, "response token position", "KL (nats)") + "\n", encoding="utf-8")
    paths[1].write_text(line_chart("Rise of log p(harmful target) over the reference during the attack",
                                   rise_series, "training step", "nats") + "\n", encoding="utf-8")
    return paths


if __name__ == "__main__":
    sys.exit(main())
