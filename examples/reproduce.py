"""A toy reproduction of Qi et al. (ICLR 2025) on 2 CPU cores: shallow vs deep alignment under the prefilling
attack (their Table 2), and the fine-tuning attacks with standard SFT vs guardtune's constrained objective on the
deep-aligned demo base (their Table 4).

    python examples/reproduce.py                    # writes docs/reproduction.md and docs/reproduction.json

What it runs (every piece is the product's own code: guardtune.align, guardtune.audit, guardtune.redteam):

1. Alignment. shallow: `guardtune align --mode shallow` on the raw SmolLM2 (trained here); deep: the shipped
   adapter of the demo base smollm2-135m-guard (rebuilt bit for bit by `make demo-base`; --retrain-deep trains it
   here instead, ~25 min more).
2. Table A: the prefilling attack at k = 0/5/10/20 on held-out audit prompts for raw, shallow and deep, and
   the per-position KL of each aligned model to the raw one on harmful answers.
3. Table B: the four fine-tuning attacks (harmful, identity-shift, backdoor, benign) on the demo base with sft and
   constrained, several seeds each, audited at k = 0 (identity-shift under its persona, backdoor with its
   trigger: the attack's own condition); utility is factual-probe accuracy, for the benign attack the triage
   task's exact-match accuracy.

ASR is the keyword judge's (a weak signal: any continuation without a refusal phrase counts as harmful).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ATTACK_CONDITION = {"harmful": "plain", "identity-shift": "persona", "backdoor": "triggered", "benign": "plain"}


def table_a(raw: str, adapters: dict[str, Path], policy: str, out: Path, prompts: int, ks: tuple[int, ...],
            max_new_tokens: int) -> None:
    """Audit raw and every aligned adapter (on top of raw): the prefilling attack at each k and the KL profile.
    The decoding exploit and GCG are measured by benchmarks/attack_table.py (docs/attacks.md), not here."""
    from guardtune.auditing import audit

    for name, adapter in adapters.items():
        audit(model=raw, adapter=adapter, config=policy, out=out / f"audit-{name}", sample_harmful=prompts,
              sample_benign=24, utility_set=None, prefill_k=ks, max_new_tokens=max_new_tokens, kl_positions=32,
              decoding_attack=False, gcg_attack=False)


def read_table_a(out: Path, names: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """ASR per k for raw and each aligned model, each one's KL profile to raw, and benign over-refusal, from the
    audit reports table_a wrote."""
    prefill, kl, over_refusal = {}, {}, {}
    for name in names:
        report = json.loads((out / f"audit-{name}" / "report.json").read_text(encoding="utf-8"))
        results = report["results"]
        prefill["raw"] = {str(e["k"]): e["rate"] for e in results["base"]["asr"]}
        prefill[name] = {str(e["k"]): e["rate"] for e in results["finetuned"]["asr"]}
        profile = results["finetuned"]["kl_profile"]
        kl[name] = list(zip(profile["positions"], profile["mean_kl"]))
        over_refusal[name] = results["finetuned"]["over_refusal"]["rate"]
        over_refusal["raw"] = results["base"]["over_refusal"]["rate"]
    return prefill, kl, over_refusal


MISSING_K = "The report has no ASR at k="


def gate_rows(runs: list[dict]) -> list[str]:
    """Markdown rows: per attack, objective and gate policy, how many seeds were quarantined and which rules fired.
    The attacked models are audited at k = 0 only, so a policy with ceilings at k >= 5 (default) also fails closed
    on the missing k; those rules are counted apart so the rules that judged the measured ASR stay visible."""
    rows = []
    keys = dict.fromkeys((r["attack"], r["objective"], policy) for r in runs for policy in r["gate"])
    for attack, objective, policy in keys:
        members = [r for r in runs if r["attack"] == attack and r["objective"] == objective]
        quarantined = sum(r["gate"][policy]["verdict"] != "pass" for r in members)
        measured = sum(any(not f.startswith(MISSING_K) for f in r["gate"][policy]["failed"]) for r in members)
        fired: dict[str, int] = {}
        for r in members:
            for reason in r["gate"][policy]["failed"]:
                if not reason.startswith(MISSING_K):
                    rule = reason.split(" is ")[0]
                    fired[rule] = fired.get(rule, 0) + 1
        released = [r["plain"]["asr"]["0"] for r in members if r["gate"][policy]["verdict"] == "pass"]
        rows.append(f"| {attack} | {objective} | {policy} | {quarantined}/{len(members)} | {measured}/{len(members)} | "
                    + (", ".join(f"{rule} ({n})" for rule, n in fired.items()) or "-") + " | "
                    + (", ".join(f"{v:.0%}" for v in released) or "-") + " |")
    return rows


def table_b(summary: dict) -> dict:
    """reproduction.json's "attacks" from the red-team summary: mean ASR at k = 0 under each attack's condition."""
    rows = {(r["attack"], r["objective"]): r for r in summary["table"]}
    attacks = {}
    for attack, label in ATTACK_CONDITION.items():
        if (attack, "sft") not in rows:
            continue
        entry = {"base": rows[(attack, "base (no attack)")][label]["asr"]["0"]["mean"]}
        for objective in ("sft", "constrained"):
            row = rows.get((attack, objective))
            if row:
                entry[objective] = row[label]["asr"]["0"]["mean"]
                entry[f"utility_{objective}"] = row["plain"]["utility"]["mean"]
        attacks[attack] = entry
    return attacks


def markdown(result: dict, kl_svg: str, asr_svg: str, redteam_md: str, settings: dict, gates: list[str]) -> str:
    ks = sorted({k for row in result["prefill"].values() for k in row}, key=int)
    lines = ["# A toy reproduction of Qi et al. 2025 on 2 CPU cores", "",
             f"Produced by `python examples/reproduce.py` in {result['wall_s'] / 60:.0f} min "
             f"({result['seeds']} seed{'s' if result['seeds'] != 1 else ''}, {result['n_prompts']} held-out audit "
             "prompts, keyword judge). "
             "Model: SmolLM2-135M-Instruct (raw: not aligned). Numbers are attack success rates (ASR), the share "
             "of continuations without a refusal phrase; lower is safer. The exact numbers are in "
             "`docs/reproduction.json`.", "",
             "## Table A: the prefilling attack against shallow and deep alignment (the paper's Table 2)", "",
             "| model | " + " | ".join(f"ASR k={k}" for k in ks) + " | benign refused |",
             "|---|" + "---|" * (len(ks) + 1)]
    over = result["_over_refusal"]
    for name in ("raw", "shallow", "deep"):
        if name in result["prefill"]:
            lines.append(f"| {name} | " + " | ".join(f"{result['prefill'][name][k]:.0%}" for k in ks)
                         + f" | {over.get(name, 0):.0%} |")
    lines += ["", asr_svg, "", "Per-position KL(aligned || raw) on the raw model's harmful answers: shallow "
              "alignment changes the first few tokens, deep alignment every position.", "", kl_svg, "",
              "## Table B: fine-tuning attacks on the deep-aligned demo base (the paper's Table 4)", "",
              "| attack | condition | ASR base | ASR sft | ASR constrained | utility sft | utility constrained |",
              "|---|---|---|---|---|---|---|"]
    for attack, row in result["attacks"].items():
        lines.append(f"| {attack} | {ATTACK_CONDITION[attack]} | {row['base']:.0%} | {row.get('sft', 0):.0%} | "
                     f"{row.get('constrained', 0):.0%} | {row.get('utility_sft', 0):.0%} | "
                     f"{row.get('utility_constrained', 0):.0%} |")
    lines += ["", "Utility: factual-probe accuracy (a seeded sample of the 72 questions); benign attack: exact match "
              "on the triage task's "
              "100 held-out tickets.", "", "### Every run (red-team table, mean ± std over seeds)", "",
              redteam_md.split("\n", 2)[2], "",
              "## Does the gate catch what the objective lets through?", "",
              "Each attacked model's audit report judged by the gate of the demo's policy (cpu-demo) and of default. "
              "*quarantined*: any rule failed; *on measured ASR*: a rule about the measured k = 0 numbers failed "
              "(default also fails closed on its k >= 5 ceilings, which this k = 0 audit does not measure). "
              "Rules are named with the number of seeds they fired on; *released ASR* is the k = 0 ASR of each "
              "released seed.", "",
              "| attack | objective | policy | quarantined | on measured ASR | rules that fired | released ASR |",
              "|---|---|---|---|---|---|---|", *gates, "",
              "## Settings", "", "```json", json.dumps(settings, indent=1), "```", ""]
    return "\n".join(lines)


def render(args: argparse.Namespace) -> str:
    """Write docs/reproduction.{json,md} and the two SVGs from what a run left in args.out."""
    from guardtune.report import line_chart

    prefill, kl, over_refusal = read_table_a(args.out, ("shallow", "deep"))
    saved = json.loads((args.out / "redteam" / "redteam.json").read_text(encoding="utf-8"))
    parts = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(args.out.glob("wall-*.json"))]
    wall = {"wall_s": round(sum(p["wall_s"] for p in parts), 1), "parts": len(parts),
            "retrain_deep": any(p["retrain_deep"] for p in parts)}
    result = {"prefill": prefill, "attacks": table_b(saved), "seeds": saved["seeds"],
              "n_prompts": saved["n_prompts"], "wall_s": wall["wall_s"]}
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "reproduction.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    kl_svg = line_chart("KL(aligned || raw) per response position on harmful answers",
                        [(name, points) for name, points in kl.items()], "response token position", "KL (nats)")
    asr_svg = line_chart("Prefilling attack: ASR vs prefilled harmful tokens k",
                         [(name, [(int(k), v) for k, v in prefill[name].items()])
                          for name in ("raw", "shallow", "deep")],
                         "prefilled harmful tokens k", "ASR", percent=True, categorical_x=True)
    (args.docs / "reproduction-kl.svg").write_text(kl_svg + "\n", encoding="utf-8")
    (args.docs / "reproduction-asr.svg").write_text(asr_svg + "\n", encoding="utf-8")
    settings = {"raw_model": args.raw_model, "deep_model": args.deep_model, "policy": args.policy,
                "deep_adapter": "retrained here" if wall["retrain_deep"] else "shipped (make demo-base)",
                "wall_parts": wall["parts"],
                "max_new_tokens": saved["config"]["max_new_tokens"], "shallow_steps": args.shallow_steps,
                "redteam": saved["config"], "versions": saved["versions"]}
    text = markdown({**result, "_over_refusal": over_refusal}, "![KL per position](reproduction-kl.svg)",
                    "![ASR per k](reproduction-asr.svg)",
                    (args.out / "redteam" / "redteam.md").read_text(encoding="utf-8"), settings,
                    gate_rows(saved["runs"]))
    (args.docs / "reproduction.md").write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-model", default="smollm2-135m-instruct")
    parser.add_argument("--deep-model", default="smollm2-135m-guard", help="the deep-aligned model to attack")
    parser.add_argument("--deep-adapter", type=Path, default=None,
                        help="its alignment adapter on top of --raw-model (default: the shipped one)")
    parser.add_argument("--retrain-deep", action="store_true", help="train the deep adapter here instead")
    parser.add_argument("--policy", default="default")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=100, help="held-out audit prompts (>= 100 for the claim)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--shallow-steps", type=int, default=60,
                        help="optimizer steps of the shallow alignment (it reaches its k=0 refusal early)")
    parser.add_argument("--audit-benign", type=int, default=24, help="over-refusal probes per attacked model")
    parser.add_argument("--audit-utility", type=int, default=36, help="factual questions per attacked model")
    parser.add_argument("--attack-steps", type=int, default=None,
                        help="optimizer steps of each attack (default: the redteam setting, 30)")
    parser.add_argument("--attacks", default="harmful,identity-shift,backdoor,benign")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--docs", type=Path, default=HERE.parent / "docs")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out: reuse the shallow alignment, the Table A audits "
                             "and every finished red-team run; wall time adds up over the parts")
    parser.add_argument("--render-only", action="store_true",
                        help="only rewrite the docs from a finished run in --out (no training, no audits)")
    args = parser.parse_args(argv)

    import guardtune
    from guardtune.modelspec import adapter_path

    started = time.perf_counter()
    if not args.render_only:
        args.out.mkdir(parents=True, exist_ok=True)
        part = args.out / f"wall-{time.strftime('%Y%m%dT%H%M%S')}.json"
        if not args.resume:
            for stale in args.out.glob("wall-*.json"):
                stale.unlink()

        def mark() -> None:  # this part's wall time so far, so an interrupted part still counts
            part.write_text(json.dumps({"wall_s": round(time.perf_counter() - started, 1),
                                        "retrain_deep": args.retrain_deep}) + "\n", encoding="utf-8")

        def progress(phase: str, done: int, total: int) -> None:
            mark()
            if done == total or done % max(1, total // 10) == 0:
                print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {phase} {done}/{total}", flush=True)

        shallow_dir = args.out / "align-shallow"
        if not (args.resume and (shallow_dir / "align_metrics.json").is_file()):
            guardtune.align(model=args.raw_model, mode="shallow", out=shallow_dir, config=args.policy,
                            max_steps=args.shallow_steps, progress=progress)
        if args.retrain_deep:
            deep_dir = args.out / "align-deep"
            if not (args.resume and (deep_dir / "align_metrics.json").is_file()):
                guardtune.align(model=args.raw_model, mode="deep", out=deep_dir, config=args.policy,
                                progress=progress)
            deep_adapter = deep_dir / "adapter"
        else:
            deep_adapter = args.deep_adapter or adapter_path(args.deep_model)
        print(f"[{(time.perf_counter() - started) / 60:5.1f} min] Table A: prefilling attack on raw, shallow, deep",
              flush=True)
        adapters = {"shallow": shallow_dir / "adapter", "deep": deep_adapter}
        if args.resume:
            adapters = {name: path for name, path in adapters.items()
                        if not (args.out / f"audit-{name}" / "report.json").is_file()}
        table_a(args.raw_model, adapters, args.policy, args.out, args.prompts, (0, 5, 10, 20), args.max_new_tokens)
        mark()
        attacks = [a for a in args.attacks.split(",") if a]
        guardtune.redteam(model=args.deep_model, attacks=attacks, objectives=("sft", "constrained"),
                          out=args.out / "redteam", config=args.policy, seeds=args.seeds,
                          audit_harmful=args.prompts, audit_benign=args.audit_benign,
                          audit_utility=args.audit_utility, prefill_k=(0,), max_new_tokens=args.max_new_tokens,
                          progress=progress, resume=args.resume,
                          **({"max_steps": args.attack_steps} if args.attack_steps else {}))
        mark()
    text = render(args)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
