"""What look-ahead costs the cloud: seconds per tree level and bytes per node, on both backends.

For each backend the script opens the cloud's sequence pool (the one `costeer serve` uses), prefills
a public prompt, and then, `--reps` times, measures side by side:
  - step: one session's next token (what per-token decoding costs a round);
  - level of n nodes, n in --nodes: one `pool.grow` of n children of the root (llama.cpp: the main
    chain's node and n - 1 branch leaves, each a step of the session's own sequence; transformers:
    n one-row forwards, each over the prompt's cache);
  - commit: keeping a path and freeing the tree;
and the frame bytes of a node (packed, top-256 f16, full) over the distributions it computed.
Medians; the load average is printed beside (the machine is shared).

    python bench/lookahead_cost.py --backend llamacpp transformers --reps 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from costeer import frames
from costeer.engine.models import load_lm

PROMPT = ("Plan a three-day trip to Lisbon for someone who likes food, old streets and the sea; "
          "say what to see each day, where to eat, and how to move around. ") * 3  # fmt: skip


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(lm, reps: int, sizes: list[int]) -> dict:
    tok = lm.tokenizer
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False), add_special_tokens=False)["input_ids"]  # fmt: skip
    pool = lm.open_pool(8192, 4)
    out = {"prompt_tokens": len(prompt), "step": [], "commit": [], **{f"level{n}": [] for n in sizes}}
    sizes_bytes = {"packed": [], "top256": [], "full": []}
    try:
        root = pool.prefill(0, prompt)
        for _ in range(reps):
            cands = torch.topk(root, max(sizes)).indices.tolist()
            for n in sizes:
                rows = [(0, 0, t) for t in cands[:n]]
                t = time.perf_counter()
                logps = pool.grow(rows)
                out[f"level{n}"].append(time.perf_counter() - t)
                out["commit"].append(_time(lambda: pool.commit(0, 0)))
            for lp in logps[:4]:
                sizes_bytes["packed"].append(len(frames.encode_packed(lp, 4096, 0)))
                sizes_bytes["top256"].append(len(frames.encode_dist(lp, 256, 0)))
                sizes_bytes["full"].append(len(frames.encode_dist(lp, frames.FULL, 0)))
            t = time.perf_counter()
            root = pool.step([(0, cands[0])])[0]
            out["step"].append(time.perf_counter() - t)
    finally:
        pool.close()
    res = {k: statistics.median(v) * 1000 if isinstance(v, list) else v for k, v in out.items()}
    res |= {f"bytes_{k}": statistics.mean(v) for k, v in sizes_bytes.items()}
    return res


def kernel_costs(lm, reps: int) -> dict:
    """llama.cpp: one session's step as one row and beside a second row (what making every decode
    several rows, for batch-independent rounding, would cost), flash attention off and on. Same
    prompt, same positions, medians in ms."""
    from costeer.engine import llamacpp as L

    tok = lm.tokenizer
    prompt = tok(PROMPT)["input_ids"]
    out = {}
    for fa in (False, True):
        ctx, batch = L._new_context(lm.model, 4096, 512, 8, unified=True, n_ubatch=512, flash_attn=fa)
        ll, buf = lm.model._ll, torch.empty(0)
        mem = ll.llama_get_memory(ctx)
        try:
            L._decode_rows(ll, ctx, batch, 512, [(t, 0, j, False) for j, t in enumerate(prompt)], "bench")
            for rows in (1, 2):
                times = []
                for i in range(reps):
                    extra = [(prompt[0], 7, 0, False)] if rows == 2 else []
                    t = time.perf_counter()
                    L._decode_rows(ll, ctx, batch, 512, [(prompt[i % len(prompt)], 0, len(prompt), True)] + extra, "bench")
                    times.append(time.perf_counter() - t)
                    ll.llama_memory_seq_rm(mem, 0, len(prompt), -1)
                    ll.llama_memory_seq_rm(mem, 7, -1, -1)
                out[f"fa={'on' if fa else 'off'} rows={rows}"] = statistics.median(times) * 1000
        finally:
            ll.llama_batch_free(batch)
            ll.llama_free(ctx)
    del buf
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="smollm2-135m-instruct")
    ap.add_argument("--backend", nargs="+", default=["llamacpp", "transformers"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--nodes", default="1,2,4,8")
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    for backend in args.backend:
        lm = load_lm(args.llm, "cpu", backend)
        r = measure(lm, args.reps, sizes)
        levels = "  ".join(f"level of {n}: {r[f'level{n}']:.1f} ms ({r[f'level{n}'] / n:.1f}/node)" for n in sizes)
        print(f"{args.llm} [{backend}] prompt {r['prompt_tokens']} tokens: step {r['step']:.1f} ms  {levels}  "
              f"commit {r['commit']:.2f} ms")  # fmt: skip
        if backend == "llamacpp":
            k = kernel_costs(lm, args.reps * 2)
            print("    step, one session:", "  ".join(f"{name}: {ms:.1f} ms" for name, ms in k.items()),
                  "(the pool: flash attention on, as llama.cpp chooses; a lone step is one row)")  # fmt: skip
        print(f"    bytes per node: packed {r['bytes_packed']:.0f} (+{frames.tree_overhead(2) - frames.tree_overhead(1)} "
              f"in the TREE frame), top-256 {r['bytes_top256']:.0f}, full {r['bytes_full']:.0f}")  # fmt: skip
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
