"""Audit generation throughput: batched (left padding, KV cache) vs one prompt at a time, in one run.

    python benchmarks/bench_audit.py [--model SPEC] [--prompts N] [--new-tokens N] [--batch N] [--json]

Same model, same prompts (shipped harmful instructions with a 10-token prefilled prefix, as in the
prefilling attack), greedy decoding. Prints tokens/s of each path, the speed-up, and the greedy output match
rate (identical continuations / prompts). On CUDA it also times the static KV cache (transformers then
torch.compiles the decoding step: the first call, which compiles, is timed on its own). Targets: batched >= 6x on
CPU, >= 25x on GPU; static cache >= 4x more on GPU. A ratio under target is a finding; the script exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

TARGETS = {"cpu": 6.0, "cuda": 25.0, "static_extra_cuda": 4.0}


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16 on CUDA, fp32 on CPU; float32 separates precision from batching effects")
    parser.add_argument("--no-static", action="store_true", help="skip the static-cache timing on CUDA")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from guardtune import evalsets
    from guardtune.generation import generate
    from guardtune.models import load_model
    from guardtune.templates import render_prompt, response_ids

    loaded = load_model(args.model, dtype=args.dtype)
    model, tok = loaded.model.eval(), loaded.tokenizer
    device = next(model.parameters()).device
    prompts = evalsets.sample(evalsets.load_harmful(), args.prompts, seed=0)
    inputs = [render_prompt(tok, [{"role": "user", "content": p.instruction}]) + response_ids(tok, p.opener)[:10]
              for p in prompts]
    common = dict(max_new_tokens=args.new_tokens, static_cache=False)

    generate(model, tok, inputs[:2], batch_size=2, **{**common, "max_new_tokens": 4})  # warm-up
    single, single_s = timed(lambda: [generate(model, tok, [x], batch_size=1, **common)[0] for x in inputs])
    print(f"per prompt: {single_s:.2f} s", file=sys.stderr)
    batched, batched_s = timed(lambda: generate(model, tok, inputs, batch_size=args.batch, **common))
    print(f"batched: {batched_s:.2f} s", file=sys.stderr)
    tokens = sum(len(s) for s in single)
    result = {
        "model": args.model, "device": str(device), "dtype": str(next(model.parameters()).dtype),
        "threads": torch.get_num_threads(), "prompts": len(inputs), "new_tokens": args.new_tokens,
        "batch": args.batch, "generated_tokens": tokens,
        "per_prompt": {"seconds": single_s, "tokens_per_s": tokens / single_s},
        "batched": {"seconds": batched_s, "tokens_per_s": sum(len(b) for b in batched) / batched_s},
        "speedup": single_s / batched_s,
        "greedy_match_rate": sum(a == b for a, b in zip(single, batched)) / len(inputs),
        "target": TARGETS["cuda" if device.type == "cuda" else "cpu"],
    }
    if device.type == "cuda" and not args.no_static:
        _, first_s = timed(lambda: generate(model, tok, inputs, batch_size=args.batch,
                                            **{**common, "static_cache": True}))
        print(f"static, first call (compiles): {first_s:.2f} s", file=sys.stderr)
        static, static_s = timed(lambda: generate(model, tok, inputs, batch_size=args.batch,
                                                  **{**common, "static_cache": True}))
        print(f"static, second call: {static_s:.2f} s", file=sys.stderr)
        result["static"] = {"first_call_seconds": first_s, "seconds": static_s,
                            "tokens_per_s": sum(len(s) for s in static) / static_s,
                            "speedup_over_dynamic_batched": batched_s / static_s,
                            "greedy_match_rate_vs_per_prompt": sum(a == b for a, b in zip(single, static))
                            / len(inputs)}
        result["static_target"] = TARGETS["static_extra_cuda"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model} on {device} ({result['dtype']}, {result['threads']} threads): {len(inputs)} prompts, "
          f"{args.new_tokens} new tokens, batch {args.batch}")
    print(f"  per prompt : {single_s:8.2f} s  {result['per_prompt']['tokens_per_s']:8.1f} tokens/s")
    print(f"  batched    : {batched_s:8.2f} s  {result['batched']['tokens_per_s']:8.1f} tokens/s")
    verdict = "ok" if result["speedup"] >= result["target"] else "UNDER TARGET"
    print(f"  speed-up   : {result['speedup']:.2f}x (target >= {result['target']:.0f}x) {verdict}")
    print(f"  greedy outputs identical: {result['greedy_match_rate']:.1%}")
    if "static" in result:
        s = result["static"]
        print(f"  static cache: first call {s['first_call_seconds']:.2f} s (compiles), then {s['seconds']:.2f} s, "
              f"{s['speedup_over_dynamic_batched']:.2f}x over dynamic batched "
              f"(target >= {TARGETS['static_extra_cuda']:.0f}x), match {s['greedy_match_rate_vs_per_prompt']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
