"""Tokens/s of `llm`, `light`, `costeer` on the real model pairs, with the per-token split.

    python bench/throughput.py [--pairs smollm2,gemma] [--runs 3] [--tokens 64]

Greedy, the demo persona, `--runs` repetitions of each method (median reported). The
per-token split averages over decode steps (the prefill token excluded):
  LLM forward | SLM pair forward (both branches, one batch) | fusion | rest
where `rest` is sampling plus loop bookkeeping (wall time minus the measured parts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from costeer.api import CoSteer
from costeer.engine.models import load_lm
from costeer.engine.prompts import render_context

PAIRS = {
    "smollm2": ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    "gemma": ("gemma3-270m", "smollm2-135m-instruct"),
}
METHODS = ("llm", "light", "costeer")


def one_run(cs: CoSteer, method: str, query: str, context: str, tokens: int) -> dict:
    stream = cs.stream(query, context, method, max_new_tokens=tokens)
    t0 = time.perf_counter()
    first = None
    for chunk in stream:
        if first is None:
            first = time.perf_counter()  # decode time starts after the first (prefill) token
    end = time.perf_counter()
    steps = stream.generation.steps[1:]
    n = max(1, len(steps))
    wall = (end - first) if first is not None else end - t0
    per = {
        "llm_ms": 1000 * sum(s.llm_s for s in steps) / n,
        "slm_ms": 1000 * sum(s.slm_s for s in steps) / n,
        "fusion_ms": 1000 * sum(s.fusion_s for s in steps) / n,
    }
    per["total_ms"] = 1000 * wall / n
    per["rest_ms"] = per["total_ms"] - per["llm_ms"] - per["slm_ms"] - per["fusion_ms"]
    per["tokens"] = len(stream.generation.token_ids)
    per["tok_per_s"] = 1000 / per["total_ms"]
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="smollm2,gemma")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/out/throughput.json"))
    args = ap.parse_args()
    persona = yaml.safe_load((Path(__file__).parents[1] / "src/costeer/examples/persona.yaml").read_text())
    query, context = persona["query"], render_context(persona["profile"])
    results = []
    for pair in args.pairs.split(","):
        llm_spec, slm_spec = PAIRS[pair]
        llm = load_lm(llm_spec, "cpu")
        slm = llm if slm_spec == llm_spec else load_lm(slm_spec, "cpu")
        cs = CoSteer(llm, slm)
        cs.vocab()
        for method in METHODS:
            one_run(cs, method, query, context, 8)  # warm-up
        runs = {m: [] for m in METHODS}
        for _ in range(args.runs):  # interleave methods so drift hits each alike
            for m in METHODS:
                runs[m].append(one_run(cs, m, query, context, args.tokens))
        for m in METHODS:
            med = {k: statistics.median(r[k] for r in runs[m]) for k in runs[m][0]}
            results.append({"pair": f"{llm_spec} / {slm_spec}", "method": m, **med})
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), median of {args.runs} runs, {args.tokens} new tokens, greedy")
    print("| pair | method | tok/s | LLM fwd ms | SLM pair fwd ms | fusion ms | rest ms | outside forwards |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        outside = (r["fusion_ms"] + r["rest_ms"]) / r["total_ms"]
        print(f"| {r['pair']} | {r['method']} | {r['tok_per_s']:.1f} | {r['llm_ms']:.1f} | {r['slm_ms']:.1f} | "
              f"{r['fusion_ms']:.2f} | {r['rest_ms']:.2f} | {outside:.1%} |")
    for pair in {r["pair"] for r in results}:
        base = next(r for r in results if r["pair"] == pair and r["method"] == "llm")["tok_per_s"]
        for r in results:
            if r["pair"] == pair:
                r["vs_llm"] = r["tok_per_s"] / base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
