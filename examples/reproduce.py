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
            max_new_tokens: int) -> tuple[dict, dict]:
    """ASR per k for raw and every aligned adapter (audited on top of raw), and each one's KL profile to raw."""
    from guardtune.auditing import audit

    prefill, kl = {}, {}
    for name, adapter in adapters.items():
        report = audit(model=raw, adapter=adapter, policy=policy, out=out / f"audit-{name}", sample_harmful=prompts,
                       sample_benign=24, utility_set=None, prefill_k=ks, max_new_tokens=max_new_tokens,
                       kl_positions=32).report
        prefill["raw"] = {str(e["k"]): e["rate"] for e in report["results"]["base"]["asr"]}
        prefill[name] = {str(e["k"]): e["rate"] for e in report["results"]["finetuned"]["asr"]}
        profile = report["results"]["finetuned"]["kl_profile"]
        kl[name] = list(zip(profile["positions"], profile["mean_kl"]))
        prefill.setdefault("_over_refusal", {})[name] = report["results"]["finetuned"]["over_refusal"]["rate"]
        prefill["_over_refusal"]["raw"] = report["results"]["base"]["over_refusal"]["rate"]
    return prefill, kl


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


def markdown(result: dict, kl_svg: str, asr_svg: str, redteam_md: str, settings: dict) -> str:
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
              redteam_md.split("\n", 2)[2], "", "## Settings", "", "```json", json.dumps(settings, indent=1), "```", ""]
    return "\n".join(lines)


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
    args = parser.parse_args(argv)

    import guardtune
    from guardtune.models import adapter_path
    from guardtune.report import line_chart

    started = time.perf_counter()

    def progress(phase: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {phase} {done}/{total}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    shallow = guardtune.align(model=args.raw_model, mode="shallow", out=args.out / "align-shallow",
                              policy=args.policy, max_steps=args.shallow_steps, progress=progress)
    if args.retrain_deep:
        deep_adapter = guardtune.align(model=args.raw_model, mode="deep", out=args.out / "align-deep",
                                       policy=args.policy, progress=progress).adapter_dir
    else:
        deep_adapter = args.deep_adapter or adapter_path(args.deep_model)
    ks = (0, 5, 10, 20)
    print(f"[{(time.perf_counter() - started) / 60:5.1f} min] Table A: prefilling attack on raw, shallow, deep",
          flush=True)
    prefill, kl = table_a(args.raw_model, {"shallow": shallow.adapter_dir, "deep": deep_adapter}, args.policy,
                          args.out, args.prompts, ks, args.max_new_tokens)
    attacks = [a for a in args.attacks.split(",") if a]
    redteam = guardtune.redteam(model=args.deep_model, attacks=attacks, objectives=("sft", "constrained"),
                                out=args.out / "redteam", policy=args.policy, seeds=args.seeds,
                                audit_harmful=args.prompts, audit_benign=args.audit_benign,
                                audit_utility=args.audit_utility, prefill_k=(0,), max_new_tokens=args.max_new_tokens,
                                progress=progress,
                                **({"max_steps": args.attack_steps} if args.attack_steps else {}))
    over_refusal = prefill.pop("_over_refusal")
    result = {"prefill": prefill, "attacks": table_b(redteam.summary), "seeds": args.seeds,
              "n_prompts": args.prompts, "wall_s": round(time.perf_counter() - started, 1)}
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
                "deep_adapter": "retrained here" if args.retrain_deep else "shipped (make demo-base)",
                "max_new_tokens": args.max_new_tokens, "redteam": redteam.summary["config"],
                "versions": redteam.summary["versions"]}
    text = markdown({**result, "_over_refusal": over_refusal}, "![KL per position](reproduction-kl.svg)",
                    "![ASR per k](reproduction-asr.svg)", redteam.markdown_path.read_text(encoding="utf-8"), settings)
    (args.docs / "reproduction.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
