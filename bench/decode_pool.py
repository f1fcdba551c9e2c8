"""The transformers pool's step strategies side by side: where one padded forward pays and where not.

    OMP_NUM_THREADS=1 python bench/decode_pool.py [--llm smollm2-135m-instruct] [--reps 5]
        [--cases 2x32,3x32,4x32,16x32,2x1024,3x1024,4x1024,16x1024,1024+3x32,1024+15x32]

A case is n sequences of a given cache length (`4x1024`), or one long sequence beside short ones
(`1024+15x32`). Each case is prefilled into a DecodePool (engine/models.py) per strategy, then one
step of all its sequences is timed (median of --reps):

- sequential: each sequence alone, one after the other;
- one batch: every sequence in one padded forward, whatever the lengths (min_rows 2, no length rule);
- rule: the pool's default (`batched`): groups of at least `min_rows` sequences of similar lengths
  in one forward each, any other sequence alone.

The copies of gathering the caches into one padded batch grow with the longest cache times the
number of rows, the matrix work a batch saves does not: this table is what the rule is set from.
"copies ms" is what the one batch spends on them outside the model: gathering the rows' caches into
one padded batch cache, and giving each row its own cache back after the forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from costeer.engine.models import DecodePool, _lm_forward, _merge_rows, _row_of, load_lm, pad_mask

STRATEGIES = ("sequential", "one batch", "rule")


def lengths_of(case: str) -> list[int]:
    """'4x1024' -> [1024] * 4; '1024+15x32' -> [1024] + [32] * 15."""
    head, _, rest = case.rpartition("+")
    n, _, length = rest.partition("x")
    return ([int(head)] if head else []) + [int(length)] * int(n)


def pool_for(lm, strategy: str) -> DecodePool:
    pool = DecodePool(lm, "sequential" if strategy == "sequential" else "batched")
    if strategy == "one batch":
        pool.min_rows, pool.pad_slack = 2, float("inf")
    return pool


def step_ms(lm, strategy: str, lengths: list[int], reps: int) -> float:
    pool = pool_for(lm, strategy)
    try:
        for s, n in enumerate(lengths):
            pool.prefill(s, [100 + s % 50] * n)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pool.step([(s, 200) for s in range(len(lengths))])
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    finally:
        pool.close()


def copies_ms(lm, lengths: list[int], reps: int) -> float:
    """Gathering the caches of `lengths` into one padded batch, plus each row's own cache back."""
    pool = pool_for(lm, "sequential")
    try:
        for s, n in enumerate(lengths):
            pool.prefill(s, [100 + s % 50] * n)
        caches = [pool._seqs[s].cache for s in range(len(lengths))]
        _, batch = _lm_forward(lm, torch.full((len(lengths), 1), 200), torch.tensor(lengths).unsqueeze(1),
                               _merge_rows(lm, caches, lengths), pad_mask([n + 1 for n in lengths]))  # fmt: skip
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _merge_rows(lm, caches, lengths)
            [_row_of(lm, batch, b, n + 1) for b, n in enumerate(lengths)]
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    finally:
        pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="smollm2-135m-instruct")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", default="2x32,3x32,4x32,16x32,2x1024,3x1024,4x1024,16x1024,1024+3x32,1024+15x32")
    args = ap.parse_args()
    lm = load_lm(args.llm, "cpu", "transformers")
    load0 = os.getloadavg()[0]
    print("| sequences | " + " | ".join(f"{s} ms" for s in STRATEGIES) + " | sequential / rule | one batch: copies ms |")
    print("|---" + "|---:" * (len(STRATEGIES) + 2) + "|")
    for case in args.cases.split(","):
        ms = {s: step_ms(lm, s, lengths_of(case), args.reps) for s in STRATEGIES}
        copies = copies_ms(lm, lengths_of(case), args.reps)
        print(f"| {case} | " + " | ".join(f"{ms[s]:.0f}" for s in STRATEGIES) +
              f" | {ms['sequential'] / ms['rule']:.2f}x | {copies:.1f} |", flush=True)  # fmt: skip
    print(f"\n{len(os.sched_getaffinity(0))} cores, load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
