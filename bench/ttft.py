"""Time to first token with the prefix cache, on shared CoGenesis rows (docs/prefix-cache.md).

    python bench/ttft.py [--pairs smollm2,gemma] [--backends llamacpp,transformers] [--rows 10]
                         [--first-rows 3] [--runs 3] [--tokens 64]

Per backend and pair, greedy, each figure the median of `--runs` runs per row, then the median over rows:

- `llm`: TTFT of the LLM alone on the public query (the floor);
- `today`: TTFT of `costeer` without a prefix cache (the whole context prefilled), on `--first-rows`;
- `first`: TTFT of `costeer` with an empty cache (the first query: prefix prefilled and kept), same rows;
- `repeat`: TTFT of `costeer` with the context cached (only the query prefilled), on `--rows`; `repeat / llm`
  the median over rows of each row's median ratio, the two taken in turns run by run;
- `tok/s`: a whole `--tokens`-token answer with the context cached, against `decode-only`, the same
  answer's tokens after the first over their own time;
- bytes per prefix token in memory and on disk (an encrypted file under a throwaway key).

TTFT is the wall time from the call to the first streamed token (prompt tokenisation included).

`--breakdown` also prints where a query's time to its first token goes, on the first row, for `llm` and a
repeat `costeer` query: the engine functions that do each part are timed by wrappers (medians over
`--runs`; a part nested in another is counted in both, and "the rest" is the TTFT less the top-level parts:
the loop's first step, fusion and sampling, Python between the parts).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
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


# (module, function or Class.method, what it does, its size from its arguments or None, top-level part)
def _rows_size(a) -> str:  # _decode_rows(ll, ctx, batch, cap, rows, room)
    return f" of {len(a[4])} tokens from position {a[4][0][2]:,}"


def _forward_size(a) -> str:  # DecodeBatch._row_forward(self, ids, start, cache)
    return f" of {len(a[1])} tokens from position {a[2]:,}"


PARTS = (
    ("costeer.api", "CoSteer.prompts", "tokenise the prompts", None, True),
    ("costeer.api", "stable_prefix_len", "find the stable prefix", None, True),
    ("costeer.engine.llamacpp", "IdleContexts.take", "take a kept context (or create one)", None, True),
    ("costeer.engine.llamacpp", "_new_context", "  of which: create a context", None, False),
    ("costeer.engine.llamacpp", "LlamaDecodeBatch._copy_sequence", "copy a row equal to an earlier one", None, True),
    ("costeer.engine.llamacpp", "LlamaDecodeBatch._restore_or_prefill", "restore the prefix (not kept)", None, True),
    ("costeer.engine.llamacpp", "_decode_rows", "llama_decode", _rows_size, True),
    ("costeer.engine.llamacpp", "_logprobs", "logits to log-probabilities", None, True),
    ("costeer.engine.models", "_cache_from", "restore the prefix (a DynamicCache)", None, True),
    ("costeer.engine.models", "DecodeBatch._row_forward", "forward", _forward_size, True),
    ("costeer.engine.models", "DecodeBatch._forward", "forward (whole batch)", None, True),
    ("costeer.engine.models", "_merge_rows", "merge the rows' caches", None, True),
)


class Breakdown:
    """Seconds per part of the current query, by wrapping the engine functions of PARTS."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)
        self.top: set[str] = set()
        for module, name, label, size, top in PARTS:
            owner = importlib.import_module(module)
            *path, attr = name.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, attr, self._timed(getattr(owner, attr), label, size, top))

    def _timed(self, real, label: str, size, top: bool):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                name = label + (size(a) if size else "")
                self.now[name] += time.perf_counter() - t
                if top:
                    self.top.add(name)

        return timed

    def query(self, cs: CoSteer, ex, method: str) -> dict[str, float]:
        """One query to its first token -> seconds per part, "TTFT" and "the rest"."""
        self.now.clear()
        t0 = time.perf_counter()
        stream = cs.stream(ex.query, ex.context, method, context_message=ex.with_context_prompt(), max_new_tokens=1)
        parts: dict[str, float] = {}
        for _ in stream:
            parts = dict(self.now) | {"TTFT": time.perf_counter() - t0}
        if not parts:  # a stop token first
            parts = dict(self.now) | {"TTFT": time.perf_counter() - t0}
        parts["the rest"] = parts["TTFT"] - sum(v for k, v in parts.items() if k in self.top)
        return parts

    def table(self, cs_by_method: dict[str, CoSteer], ex, runs: int) -> dict[str, dict[str, float]]:
        """method -> part -> median ms over `runs` queries (each CoSteer already warm), the methods taking
        turns (a load that drifts during the run weighs on each alike)."""
        got: dict[str, list[dict[str, float]]] = defaultdict(list)
        for _ in range(runs):
            for method, cs in cs_by_method.items():
                got[method].append(self.query(cs, ex, method))
        out = {}
        for method, queries in got.items():
            names = sorted({k for q in queries for k in q}, key=lambda k: (k in ("the rest", "TTFT"), k == "TTFT"))
            out[method] = {k: 1000 * median(q.get(k, 0.0) for q in queries) for k in names}
        return out


def print_breakdown(label: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{label}: ms to the first token, median per part (load average {os.getloadavg()[0]:.1f})")
    for method, parts in table.items():
        print(f"| {method} | ms |\n|---|---:|")
        for name, ms in parts.items():
            print(f"| {name} | {ms:.1f} |")


def _s(r: dict, key: str) -> str:
    return f"{r[key]:.2f}" if key in r else "–"  # --first-rows 0: not measured


def median(xs) -> float:
    return statistics.median(xs)


def row_figures(llm, slm, ex, args, first_row: bool) -> dict:
    """One row's medians over the runs. The figures compared take turns run by run (`llm` with `repeat`,
    `today` with `first`), so that a load that drifts during the run weighs on each alike."""
    plain = CoSteer(llm, slm, prefix_cache=None)
    cached = CoSteer(llm, slm, prefix_cache=PrefixCache())
    timed(cached, ex, "costeer", 1)  # the first query fills the cache
    runs: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.runs):
        runs["llm"].append(timed(plain, ex, "llm", 1)[0])
        runs["repeat"].append(timed(cached, ex, "costeer", 1)[0])
        if first_row:
            runs["today"].append(timed(plain, ex, "costeer", 1)[0])
            runs["first"].append(timed(CoSteer(llm, slm, prefix_cache=PrefixCache()), ex, "costeer", 1)[0])
    out = {k: median(v) for k, v in runs.items()}
    out["repeat_over_llm"] = median(r / t for r, t in zip(runs["repeat"], runs["llm"]))
    whole, decode = [], []
    for _ in range(args.runs):
        ttft, total, n = timed(cached, ex, "costeer", args.tokens)
        whole.append(n / total)
        decode.append((n - 1) / (total - ttft) if n > 1 else float("nan"))
    out["tok_s"], out["decode_tok_s"], out["tokens"] = median(whole), median(decode), n
    # every entry the query keeps: the context's prefix and, where kept, the public prompt's template head
    out["mem_bytes"], out["prefix_tokens"] = cached.prefix_cache.memory_bytes, cached.prefix_cache.memory_tokens
    return out


def disk_bytes_per_token(llm, slm, ex) -> float:
    """Size of the encrypted files one query's cached prefixes take, per prefix token."""
    with tempfile.TemporaryDirectory() as d:
        cache = PrefixCache(PrefixCacheConfig(directory=Path(d), key=new_key()))
        timed(CoSteer(llm, slm, prefix_cache=cache), ex, "costeer", 1)
        return sum(p.stat().st_size for p in Path(d).glob("*.kv")) / cache.memory_tokens


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
    ap.add_argument("--breakdown", action="store_true", help="where a query's TTFT goes, part by part (first row)")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"error: {args.data} not found (the shared evaluation inputs)")
    examples = load_task("cogenesis", args.data, limit=args.rows)
    parts = Breakdown() if args.breakdown else None
    results = []
    for backend in args.backends.split(","):
        for pair in args.pairs.split(","):
            llm_spec, slm_spec = PAIRS[pair]
            llm = load_lm(llm_spec, "cpu", backend)
            slm = llm if slm_spec == llm_spec else load_lm(slm_spec, "cpu", backend)
            CoSteer(llm, slm, prefix_cache=None).vocab()
            timed(CoSteer(llm, slm, prefix_cache=None), examples[0], "costeer", 2)  # warm-up
            rows = [row_figures(llm, slm, ex, args, i < args.first_rows) for i, ex in enumerate(examples)]
            r = {k: median(x[k] for x in rows if k in x) for k in {k for x in rows for k in x}}
            r |= {"backend": backend, "pair": f"{llm_spec} / {slm_spec}", "rows": len(rows),
                  "mem_per_token": median(x["mem_bytes"] / x["prefix_tokens"] for x in rows),
                  "disk_per_token": disk_bytes_per_token(llm, slm, examples[0])}  # fmt: skip
            if parts is not None:
                cached = CoSteer(llm, slm, prefix_cache=PrefixCache())
                timed(cached, examples[0], "costeer", 1)  # the first query fills the cache
                r["breakdown_ms"] = parts.table({"llm": CoSteer(llm, slm, prefix_cache=None), "costeer": cached},
                                                examples[0], args.runs)  # fmt: skip
                print_breakdown(f"{backend}, {r['pair']}", r["breakdown_ms"])
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
        print(f"| {r['backend']} | {r['pair']} | {r['rows']} ({args.first_rows}) | {r['llm']:.3f} | {_s(r, 'today')} | "
              f"{_s(r, 'first')} | {r['repeat']:.3f} | {r['repeat_over_llm']:.2f}× | {r['tok_s']:.1f} | "
              f"{r['decode_tok_s']:.1f} | {r['tok_s'] / r['decode_tok_s']:.2f} | {r['mem_per_token']:,.0f} | "
              f"{r['disk_per_token']:,.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
