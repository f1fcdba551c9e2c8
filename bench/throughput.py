"""Tokens/s of `llm`, `light`, `costeer` on the real model pairs and backends, with the
per-token split.

    python bench/throughput.py [--pairs smollm2,gemma] [--backends transformers,llamacpp]
                               [--runs 3] [--tokens 64] [--gates 0.9,0.99]

Greedy, the demo persona, `--runs` repetitions of each method (median reported). The
per-token split averages over decode steps (the prefill token excluded):
  LLM forward | SLM pair forward (both branches, one batch) | fusion | rest
where `rest` is sampling plus loop bookkeeping (wall time minus the measured parts).
With llama.cpp, `vanilla` is the bare loop (llama_decode of one token, argmax of the logits; no
log-softmax, no vocabulary view, no sampling stage): the engine's own decoding speed, the
denominator of the issue's ≥ 0.5× target. `costeer@gG` rows run the confidence gate at G.
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
from costeer.engine.config import SteeringConfig
from costeer.engine.models import load_lm
from costeer.engine.prompts import render_context

PAIRS = {
    "smollm2": ("smollm2-135m-instruct", "smollm2-135m-instruct"),
    "gemma": ("gemma3-270m", "smollm2-135m-instruct"),
}
METHODS = ("llm", "light", "costeer")


def parse_cogenesis_args(ap: argparse.ArgumentParser, out: Path) -> argparse.Namespace:
    """The options the CoGenesis bench scripts share (gate_eval, variant_sweep), parsed; exits
    with one line when the shared evaluation inputs are missing."""
    ap.add_argument("--pair", default="smollm2", choices=sorted(PAIRS))
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--backend", default="llamacpp")
    root = Path(__file__).resolve().parents[1]
    ap.add_argument("--data", type=Path, default=root.parent / "shared/datasets/cogenesis.jsonl")
    ap.add_argument("--out", type=Path, default=out)
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"error: {args.data} not found (the shared evaluation inputs)")
    return args


def vanilla_run(cs: CoSteer, query: str, tokens: int) -> dict:
    """llama.cpp decoding with nothing around it: one llama_decode per token, argmax in numpy."""
    import numpy as np

    batch = cs.llm.open([cs.prompts(query, None)["llm"]], tokens + 1)
    try:
        tok = int(batch.start()[0].argmax())
        ll, ctx, V = batch._ll, batch.ctx, cs.llm.vocab_size
        t0 = time.perf_counter()
        for i in range(tokens - 1):
            batch._decode_raw([(tok, 0, batch.pos[0], True)])
            batch.pos[0] += 1
            logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, 0), shape=(V,))
            tok = int(logits.argmax())
        wall = time.perf_counter() - t0
    finally:
        batch.close()
    total = 1000 * wall / (tokens - 1)
    return {"llm_ms": total, "slm_ms": 0.0, "fusion_ms": 0.0, "total_ms": total, "rest_ms": 0.0,
            "tokens": tokens, "tok_per_s": 1000 / total, "gated": 0.0}


def one_run(cs: CoSteer, method: str, query: str, context: str, tokens: int) -> dict:
    gate = None
    if "@g" in method:
        method, g = method.split("@g")
        gate = float(g)
    if method == "vanilla":
        return vanilla_run(cs, query, tokens)
    stream = cs.stream(query, context, method, max_new_tokens=tokens, steering=SteeringConfig(gate=gate))
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
    per["gated"] = sum(s.gated for s in steps) / n
    per["tok_per_s"] = 1000 / per["total_ms"]
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="smollm2,gemma")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--backends", default="transformers,llamacpp")
    ap.add_argument("--gates", default="", help="comma-separated confidence gates to run costeer at (llama.cpp)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/throughput.json"))
    args = ap.parse_args()
    persona = yaml.safe_load((Path(__file__).parents[1] / "src/costeer/examples/persona.yaml").read_text())
    query, context = persona["query"], render_context(persona["profile"])
    results = []
    for backend in args.backends.split(","):
        for pair in args.pairs.split(","):
            llm_spec, slm_spec = PAIRS[pair]
            llm = load_lm(llm_spec, "cpu", backend)
            slm = llm if slm_spec == llm_spec else load_lm(slm_spec, "cpu", backend)
            cs = CoSteer(llm, slm)
            cs.vocab()
            methods = list(METHODS)
            if backend == "llamacpp":
                methods = ["vanilla", *methods, *(f"costeer@g{g}" for g in args.gates.split(",") if g)]
            for method in methods:
                one_run(cs, method, query, context, 8)  # warm-up
            runs = {m: [] for m in methods}
            for _ in range(args.runs):  # interleave methods so drift hits each alike
                for m in methods:
                    runs[m].append(one_run(cs, m, query, context, args.tokens))
            for m in methods:
                med = {k: statistics.median(r[k] for r in runs[m]) for k in runs[m][0]}
                results.append({"backend": backend, "pair": f"{llm_spec} / {slm_spec}", "method": m, **med})
            del cs, llm, slm
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), median of {args.runs} runs, {args.tokens} new tokens, greedy")
    print("| backend | pair | method | tok/s | × vanilla | LLM fwd ms | SLM pair fwd ms | fusion ms | rest ms | "
          "outside forwards | gated |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        base = next((x for x in results if x["backend"] == r["backend"] and x["pair"] == r["pair"]
                     and x["method"] in ("vanilla", "llm")), r)  # fmt: skip
        r["vs_vanilla"] = r["tok_per_s"] / base["tok_per_s"]
        outside = (r["fusion_ms"] + r["rest_ms"]) / r["total_ms"]
        print(f"| {r['backend']} | {r['pair']} | {r['method']} | {r['tok_per_s']:.1f} | {r['vs_vanilla']:.2f} | "
              f"{r['llm_ms']:.1f} | {r['slm_ms']:.1f} | {r['fusion_ms']:.2f} | {r['rest_ms']:.2f} | {outside:.1%} | "
              f"{r['gated']:.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
