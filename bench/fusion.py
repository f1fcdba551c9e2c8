"""Fusion time per token: the paper's literal T-step FTRL loop vs the O(V) closed form.

    python bench/fusion.py [--repeats 20] [--out bench/out/fusion.json]

Both run in float32 on the CPU threads torch is given, over random log-probabilities of
the real vocabulary sizes (SmolLM2 49,152; Gemma-3 262,144); the printed max |difference|
shows the outputs are equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from costeer.steering import FTRLParams, effective_coefficient, ftrl_literal, fuse


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/out/fusion.json"))
    args = ap.parse_args()
    p = FTRLParams()
    b = effective_coefficient(p)
    rows = []
    for V in (49_152, 262_144):
        g = torch.Generator().manual_seed(V)
        base, pers, base_slm = torch.log_softmax(torch.randn(3, V, generator=g) * 3, dim=-1)
        literal = median_ms(lambda: ftrl_literal(base, pers, base_slm, p), args.repeats)
        fused = median_ms(lambda: fuse(base, pers, base_slm, b), args.repeats)
        diff = (ftrl_literal(base, pers, base_slm, p) - fuse(base, pers, base_slm, b)).abs().max().item()
        rows.append({"V": V, "T": p.T, "literal_ms": literal, "fused_ms": fused, "speedup": literal / fused,
                     "max_abs_diff_fp32": diff})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, median of {args.repeats}")
    print("| V | literal T=20 loop (ms) | O(V) fused (ms) | speed-up | max abs diff (fp32) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['V']:,} | {r['literal_ms']:.2f} | {r['fused_ms']:.3f} | {r['speedup']:.1f}x | {r['max_abs_diff_fp32']:.1e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
