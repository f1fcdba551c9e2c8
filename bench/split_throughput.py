"""Tokens/s of the cloud/device split against vanilla decoding and in-process CoSteer, with the
cloud and the device as separate processes pinned to separate cores (taskset).

    python bench/split_throughput.py [--pairs smollm2,gemma] [--runs 3] [--tokens 64] [--backend llamacpp]
        [--cloud-k packed,256]

Every process gets ONE core and one compute thread (COSTEER_THREADS=1, OMP_NUM_THREADS=1):
  vanilla   the LLM decoding alone on the cloud's core (core 0): the bare llama.cpp loop for the
            llama.cpp backend (bench/throughput.py's `vanilla`), the `llm` method otherwise;
  in-process `costeer` with both models in one process on one core (core 0);
  split     `costeer serve` on core 0, the device (SLM pair, fusion, sampling) on core 1, over
            a WebSocket on 127.0.0.1 with each --cloud-k (default: packed frames, the device's
            default); the SLM pair runs while the cloud answers.
Greedy, the demo persona; medians of --runs (each after a warm-up), ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from throughput import PAIRS  # noqa: E402
KEY = "bench-split-key-0123456789"


def _env() -> dict:
    env = dict(os.environ, COSTEER_THREADS="1", OMP_NUM_THREADS="1", COSTEER_API_KEYS=KEY, COSTEER_API_KEY=KEY)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _pinned(core: int, args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", str(core), sys.executable, *args], env=_env(), **kw)


# ------------------------------------------------------------------------------- worker (one process)


def worker(mode: str, llm: str, slm: str, backend: str, tokens: int, runs: int, cloud: str | None, k: str) -> None:
    import torch
    import yaml

    torch.set_num_threads(1)
    from throughput import one_run, vanilla_run

    from costeer.api import CoSteer
    from costeer.device import connect_cloud
    from costeer.engine.models import load_lm
    from costeer.engine.prompts import render_context

    persona = yaml.safe_load((ROOT / "src/costeer/examples/persona.yaml").read_text())
    query, context = persona["query"], render_context(persona["profile"])
    slm_lm = load_lm(slm, "cpu", backend)
    if mode == "split":
        cs = CoSteer(connect_cloud(cloud, k=k), slm_lm)
        method = "costeer"
    else:
        llm_lm = slm_lm if llm == slm else load_lm(llm, "cpu", backend)
        cs = CoSteer(llm_lm, slm_lm)
        method = {"vanilla": "vanilla" if llm_lm.backend == "llamacpp" else "llm", "inprocess": "costeer"}[mode]
        if method == "vanilla":
            cs = CoSteer(llm_lm, None)
    if method != "vanilla":
        cs.vocab() if cs.slm is not None else None

    def once(n):
        if method == "vanilla":
            return vanilla_run(cs, query, n)["tok_per_s"]
        return one_run(cs, method, query, context, n)["tok_per_s"]

    once(8)  # warm-up (and the split's first session: tokenizer fetched and cached)
    print(json.dumps([once(tokens) for _ in range(runs)]))


# ------------------------------------------------------------------------------- driver


def measure(mode: str, core: int, llm: str, slm: str, args, cloud: str | None = None, k: str = "packed") -> list[float]:
    cmd = [__file__, "--worker", mode, "--llm", llm, "--slm", slm, "--backend", args.backend,
           "--tokens", str(args.tokens), "--runs", str(args.runs), "--cloud-k", k] + (["--cloud", cloud] if cloud else [])
    out = _pinned(core, cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).communicate()[0]
    return json.loads(out.decode().strip().splitlines()[-1])


def serve(llm: str, backend: str, port: int) -> subprocess.Popen:
    costeer = [str(Path(sys.executable).with_name("costeer"))]
    proc = subprocess.Popen(["taskset", "-c", "0", *costeer, "serve", "--llm", llm, "--backend", backend,
                             "--port", str(port), "--log-level", "warning"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1, trust_env=False).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("costeer serve did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="smollm2,gemma")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--cloud-k", default="packed", help="comma-separated frame kinds for the split: packed, 256, …")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/split_throughput.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--llm", help=argparse.SUPPRESS)
    ap.add_argument("--slm", help=argparse.SUPPRESS)
    ap.add_argument("--cloud", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.llm, args.slm, args.backend, args.tokens, args.runs, args.cloud, args.cloud_k)
    if (os.cpu_count() or 1) < 2:
        sys.exit("error: needs 2 cores (cloud and device pinned apart)")
    rows = []
    for pair in args.pairs.split(","):
        llm, slm = PAIRS[pair]
        res = {"pair": f"{llm} / {slm}", "backend": args.backend}
        res["vanilla"] = statistics.median(measure("vanilla", 0, llm, slm, args))
        res["inprocess"] = statistics.median(measure("inprocess", 0, llm, slm, args))
        server = serve(llm, args.backend, args.port)
        try:
            for k in args.cloud_k.split(","):
                res[f"split k={k}"] = statistics.median(
                    measure("split", 1, llm, slm, args, f"ws://127.0.0.1:{args.port}", k)
                )
        finally:
            server.kill()
            server.wait()
        rows.append(res)
    print(f"one core and one thread per process, median of {args.runs} runs, {args.tokens} new tokens, greedy, "
          f"backend {args.backend}")
    splits = [f"split k={k}" for k in args.cloud_k.split(",")]
    print("| pair | vanilla LLM tok/s | in-process costeer tok/s | " + " | ".join(f"{c} tok/s" for c in splits)
          + " | in-process × vanilla | " + " | ".join(f"{c} × vanilla" for c in splits) + " |")  # fmt: skip
    print("|---|" + "---:|" * (3 + 2 * len(splits)))
    for r in rows:
        print(f"| {r['pair']} | {r['vanilla']:.1f} | {r['inprocess']:.1f} | "
              + " | ".join(f"{r[c]:.1f}" for c in splits) + f" | {r['inprocess'] / r['vanilla']:.2f} | "
              + " | ".join(f"{r[c] / r['vanilla']:.2f}" for c in splits) + " |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
