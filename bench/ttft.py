"""Time to first token with the prefix cache, on shared CoGenesis rows (docs/prefix-cache.md).

    python bench/ttft.py [--pairs smollm2,gemma] [--backends llamacpp,transformers] [--rows 10]
                         [--first-rows 3] [--runs 3] [--tokens 64]

Per backend and pair, greedy, each figure the median of `--runs` runs per row, then the median over rows:

- `llm`: TTFT of the LLM alone on the public query (the floor);
- `today`: TTFT of `costeer` without a prefix cache (the whole context prefilled), on `--first-rows`;
- `first`: TTFT of `costeer` with an empty cache (the first query: prefix prefilled and kept), same rows;
- `repeat`: TTFT of `costeer` with the context cached (only the query prefilled), on `--rows`;
- `tok/s`: a whole `--tokens`-token answer with the context cached, against `decode-only`, the same
  answer's tokens after the first over their own time;
- bytes per prefix token in memory and on disk (an encrypted file under a throwaway key).

TTFT is the wall time from the call to the first streamed token (prompt tokenisation included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from costeer.api import CoSteer
from costeer.engine.models import load_lm
from costeer.engine.prefix_cache import PrefixCache, PrefixCacheConfig, new_key
from costeer.eval.tasks import load_task

from throughput import PAIRS  # noqa: E402  (bench/ is on sys.path when a bench script runs)

ROOT = Path(__file__).resolve().parents[1]


def timed(cs: CoSteer, ex, method: str, tokens: int) -> tuple[float, float, int]:
    """-> (seconds to the first token, seconds in all, tokens generated)."""
    t0 = time.perf_counter()
    stream = cs.stream(ex.query, ex.context, method, context_message=ex.with_context_prompt(), max_new_tokens=tokens)
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    first = end if first is None else first  # a stop token first: nothing streamed
    return first - t0, end - t0, len(stream.generation.token_ids)


def median(xs) -> float:
    return statistics.median(xs)


def row_figures(llm, slm, ex, args, first_row: bool) -> dict:
    """One row's medians over the runs."""
    plain = CoSteer(llm, slm, prefix_cache=None)
    out = {"llm": median(timed(plain, ex, "llm", 1)[0] for _ in range(args.runs))}
    if first_row:
        out["today"] = median(timed(plain, ex, "costeer", 1)[0] for _ in range(args.runs))
        out["first"] = median(timed(CoSteer(llm, slm, prefix_cache=PrefixCache()), ex, "costeer", 1)[0]
                              for _ in range(args.runs))  # fmt: skip
    cached = CoSteer(llm, slm, prefix_cache=PrefixCache())
    timed(cached, ex, "costeer", 1)  # the first query fills the cache
    out["repeat"] = median(timed(cached, ex, "costeer", 1)[0] for _ in range(args.runs))
    whole, decode = [], []
    for _ in range(args.runs):
        ttft, total, n = timed(cached, ex, "costeer", args.tokens)
        whole.append(n / total)
        decode.append((n - 1) / (total - ttft) if n > 1 else float("nan"))
    out["tok_s"], out["decode_tok_s"], out["tokens"] = median(whole), median(decode), n
    out["mem_bytes"], out["prefix_tokens"] = cached.prefix_cache.memory_bytes, _prefix_tokens(cached, ex)
    return out


def _prefix_tokens(cs: CoSteer, ex) -> int:
    from costeer.engine.prompts import stable_prefix_len

    return stable_prefix_len(cs.slm.tokenizer, ex.with_context_prompt(), ex.query, ex.context)


def disk_bytes(llm, slm, ex) -> int:
    """Size of the encrypted file one cached context takes."""
    with tempfile.TemporaryDirectory() as d:
        cache = PrefixCache(PrefixCacheConfig(directory=Path(d), key=new_key()))
        timed(CoSteer(llm, slm, prefix_cache=cache), ex, "costeer", 1)
        return sum(p.stat().st_size for p in Path(d).glob("*.kv"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="smollm2,gemma")
    ap.add_argument("--backends", default="llamacpp,transformers")
    ap.add_argument("--rows", type=int, default=10)
    ap.add_argument("--first-rows", type=int, default=3, help="rows for `today` and `first` (whole prefills)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/cogenesis.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/ttft.json")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"error: {args.data} not found (the shared evaluation inputs)")
    examples = load_task("cogenesis", args.data, limit=args.rows)
    results = []
    for backend in args.backends.split(","):
        for pair in args.pairs.split(","):
            llm_spec, slm_spec = PAIRS[pair]
            llm = load_lm(llm_spec, "cpu", backend)
            slm = llm if slm_spec == llm_spec else load_lm(slm_spec, "cpu", backend)
            CoSteer(llm, slm, prefix_cache=None).vocab()
            timed(CoSteer(llm, slm, prefix_cache=None), examples[0], "costeer", 2)  # warm-up
            rows = [row_figures(llm, slm, ex, args, i < args.first_rows) for i, ex in enumerate(examples)]
            r = {k: median(x[k] for x in rows if k in x) for k in rows[0]}
            r |= {"backend": backend, "pair": f"{llm_spec} / {slm_spec}", "rows": len(rows),
                  "mem_per_token": median(x["mem_bytes"] / x["prefix_tokens"] for x in rows),
                  "disk_per_token": disk_bytes(llm, slm, examples[0]) / rows[0]["prefix_tokens"]}  # fmt: skip
            results.append(r)
            print(json.dumps(r), flush=True)
            del llm, slm
    threads = os.environ.get("COSTEER_THREADS") or len(os.sched_getaffinity(0))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, llama.cpp threads {threads}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}; "
          f"greedy; median of {args.runs} runs per row, median over rows")  # fmt: skip
    print("| backend | pair | rows | TTFT llm s | TTFT today s | TTFT first s | TTFT repeat s | repeat / llm | "
          f"tok/s ({args.tokens}) | decode-only tok/s | ratio | bytes/prefix token memory | disk |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['backend']} | {r['pair']} | {r['rows']} ({args.first_rows}) | {r['llm']:.3f} | {r['today']:.2f} | "
              f"{r['first']:.2f} | {r['repeat']:.3f} | {r['repeat'] / r['llm']:.2f}× | {r['tok_s']:.1f} | "
              f"{r['decode_tok_s']:.1f} | {r['tok_s'] / r['decode_tok_s']:.2f} | {r['mem_per_token']:,.0f} | "
              f"{r['disk_per_token']:,.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
