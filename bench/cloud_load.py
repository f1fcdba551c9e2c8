"""The cloud under load: many device clients at once against `costeer serve`.

    python bench/cloud_load.py [--llm smollm2-135m-instruct] [--backend llamacpp|transformers] [--levels 1,4,16,32]
        [--tokens 64] [--rounds 3] [--max-sessions 16] [--step-cost 1,2,4,8,16,32] [--step-len 32]
        [--pool batched,sequential] [--json FILE]

`costeer serve` runs as a subprocess on 127.0.0.1 with one API key per client (so the per-key
limit never binds; --max-sessions does). Each client speaks the wire protocol directly (the
device's default packed frames; the greedy token of each frame is sent back), so the client
side costs next to nothing and the figures are the server's: OPEN, then --tokens TOKEN frames,
each timed from TOKEN sent to DIST received. A level runs its clients at once, --rounds times.
Per level: aggregate tokens/s (all answers over the round's wall time), p50/p95/max time per
token, time to the first distribution (p50), errors, clients refused busy (4429: the level
above --max-sessions shows the limit), the server's peak RSS during the round and its RSS
after it. Figures are medians over the rounds.

--pool (transformers only): the pool's strategies to compare side by side in one run, each on a
server of its own (COSTEER_DECODE_POOL=batched: a tick's steps in one padded forward; sequential:
each session alone, one after the other).

--step-cost: after the servers are stopped, the cost of one step of the pool as a function of the
number of sequences (each holding --step-len tokens; the pool in this process, each strategy of
--pool on transformers), with a least-squares fit fixed + per-sequence: what bounds the aggregate
on a machine with few cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
from websockets.asyncio.client import connect

from costeer import frames
from costeer.engine.models import POOL_ENV, POOL_STRATEGIES, load_tokenizer

PACKED_K = 4096  # what a device asks for by default (costeer.device.client.PACKED_K)
QUERIES = ["What should I cook tonight?", "Plan a short weekend trip for me.", "How do I start running?",
           "Suggest a book to read this month.", "What is a good way to learn a language?"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keys(n: int) -> list[str]:
    return [f"bench-load-key-{i:03d}-0123456789" for i in range(n)]


class Server:
    """`costeer serve` in a subprocess, its RSS read from /proc."""

    def __init__(self, args, n_keys: int, pool: str | None):
        self.port = _free_port()
        env = dict(os.environ, COSTEER_API_KEYS=",".join(_keys(n_keys)))
        if pool:
            env[POOL_ENV] = pool
        cmd = [sys.executable, "-m", "costeer.cli", "serve", "--llm", args.llm, "--backend", args.backend,
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
               "--max-sessions", str(args.max_sessions), "--max-new-tokens", str(max(args.tokens, 64))]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start in 300 s")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb / 1024

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class ClientResult:
    per_token_s: list[float] = field(default_factory=list)
    first_s: float | None = None
    busy: bool = False
    error: str | None = None


async def client(url: str, key: str, prompt: list[int], tokens: int) -> ClientResult:
    res = ClientResult()
    try:
        async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, compression=None,
                           max_size=None, proxy=None) as ws:  # fmt: skip
            t0 = time.perf_counter()
            await ws.send(frames.Open(prompt, PACKED_K, tokens, packed=True).encode())
            ready = frames.decode_downlink(await ws.recv())
            dist = frames.decode_downlink(await ws.recv())
            assert isinstance(ready, frames.Ready) and isinstance(dist, frames.Dist)
            res.first_s = time.perf_counter() - t0
            for _ in range(tokens):
                t0 = time.perf_counter()
                await ws.send(frames.Token(int(dist.ids[0])).encode())
                dist = frames.decode_downlink(await ws.recv())
                res.per_token_s.append(time.perf_counter() - t0)
            await ws.close(frames.CLOSE_NORMAL, "done")
    except Exception as e:  # noqa: BLE001 - every failure is counted and shown
        code = getattr(getattr(e, "rcvd", None), "code", None)
        res.busy = code == frames.CLOSE_BUSY
        if not res.busy:
            res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def sample_rss(server: Server, stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], server.rss_mb())
        await asyncio.sleep(0.05)


async def one_round(server: Server, n: int, prompts: list[list[int]], tokens: int) -> dict:
    url = f"ws://127.0.0.1:{server.port}/v1/stream"
    stop, peak = asyncio.Event(), [server.rss_mb()]
    sampler = asyncio.create_task(sample_rss(server, stop, peak))
    t0 = time.perf_counter()
    results = await asyncio.gather(*(client(url, key, prompts[i % len(prompts)], tokens) for i, key in enumerate(_keys(n))))
    wall = time.perf_counter() - t0
    stop.set()
    await sampler
    await asyncio.sleep(1.0)  # the server ends the closed sessions
    lat = sorted(x for r in results for x in r.per_token_s)
    served = sum(len(r.per_token_s) for r in results)
    return {
        "tok_s": served / wall,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        "max_ms": 1000 * lat[-1] if lat else None,
        "first_ms": 1000 * statistics.median(r.first_s for r in results if r.first_s is not None) if served else None,
        "errors": sum(r.error is not None for r in results),
        "busy": sum(r.busy for r in results),
        "peak_rss_mb": peak[0],
        "after_rss_mb": server.rss_mb(),
        "error_samples": sorted({r.error for r in results if r.error})[:3],
    }


def _median(rounds: list[dict], key: str):
    vals = [r[key] for r in rounds if r[key] is not None]
    return statistics.median(vals) if vals else None


def step_cost(llm: str, backend: str, pool_kind: str | None, sizes: list[int], length: int, reps: int = 15) -> dict:
    """Median time of one step of n sequences of `length` tokens each, and the fit fixed + n * per-sequence."""
    from costeer.engine.models import DecodePool, load_lm

    lm = load_lm(llm, "cpu", backend)
    pool = DecodePool(lm, pool_kind) if pool_kind else lm.open_pool(16384, max(sizes))
    out = {}
    try:
        for n in sizes:
            for s in range(n):
                pool.prefill(s, [100 + s] * length)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                pool.step([(s, 200) for s in range(n)])
                times.append(time.perf_counter() - t0)
            out[n] = 1000 * statistics.median(times)
            for s in range(n):
                pool.drop(s)
    finally:
        pool.close()
    xs, ys = list(out), list(out.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"step_ms": out, "fixed_ms": my - slope * mx, "per_seq_ms": slope}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="llamacpp", choices=("llamacpp", "transformers"))
    ap.add_argument("--levels", default="1,4,16,32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-sessions", type=int, default=16)
    ap.add_argument("--step-cost", default="1,2,4,8,16,32", help="sequence counts ('' to skip)")
    ap.add_argument("--step-len", type=int, default=32, help="tokens each sequence holds in --step-cost")
    ap.add_argument("--pool", default=",".join(POOL_STRATEGIES), help="transformers: the pool strategies to compare")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    tok, _ = load_tokenizer(args.llm)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for q in QUERIES]  # fmt: skip
    load0 = os.getloadavg()[0]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated bench still stops its server
    pools = args.pool.split(",") if args.backend == "transformers" else [None]
    if any(p not in POOL_STRATEGIES for p in pools if p is not None):
        raise SystemExit(f"--pool: each of {', '.join(POOL_STRATEGIES)}")
    report = {"args": vars(args), "cores": len(os.sched_getaffinity(0)), "load_before": load0, "runs": {}}
    for pool in pools:
        report["runs"][pool or args.backend] = run = {"levels": run_levels(args, pool, levels, prompts)}
        if pool:
            print(f"pool {pool} done", flush=True)
    report["load_after"] = os.getloadavg()[0]
    if args.step_cost:
        sizes = [int(x) for x in args.step_cost.split(",")]
        for pool, run in zip(pools, report["runs"].values()):
            run["step_cost"] = step_cost(args.llm, args.backend, pool, sizes, args.step_len)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def run_levels(args, pool: str | None, levels: list[int], prompts: list[list[int]]) -> dict:
    """Every level against one server (`pool`: the transformers pool's strategy) -> level -> summary."""
    server = Server(args, max(levels), pool)
    out = {}
    try:
        asyncio.run(one_round(server, 1, prompts, 8))  # warm-up
        for n in levels:
            rounds = [asyncio.run(one_round(server, n, prompts, args.tokens)) for _ in range(args.rounds)]
            summary = {k: _median(rounds, k) for k in ("tok_s", "p50_ms", "p95_ms", "max_ms", "first_ms", "peak_rss_mb")}
            summary["errors"] = sum(r["errors"] for r in rounds)
            summary["busy"] = sum(r["busy"] for r in rounds)
            summary["after_rss_mb"] = [round(r["after_rss_mb"]) for r in rounds]
            summary["error_samples"] = sorted({e for r in rounds for e in r["error_samples"]})[:3]
            out[n] = summary
            print(f"{pool or args.backend}, {n} clients: {json.dumps(summary)}", flush=True)
    finally:
        server.stop()
    return out


def print_table(report: dict) -> None:
    print(f"\n{report['cores']} cores, load average {report['load_before']:.1f} before, {report['load_after']:.1f} after")
    for name, run in report["runs"].items():
        print(f"\n{name}:")
        print_run(run)


def print_run(run: dict) -> None:
    lv = run["levels"]
    print("| clients | tok/s (all) | p50 ms/token | p95 | max | first DIST p50 ms | errors | busy | peak RSS MB | RSS after each round MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, s in lv.items():
        f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"| {n} | {f(s['tok_s'])} | {f(s['p50_ms'])} | {f(s['p95_ms'])} | {f(s['max_ms'])} | {f(s['first_ms'])} | "
              f"{s['errors']} | {s['busy']} | {f(s['peak_rss_mb'])} | {', '.join(map(str, s['after_rss_mb']))} |")  # fmt: skip
    if 1 in lv and 16 in lv and lv[1]["tok_s"] and lv[16]["tok_s"]:
        print(f"\nat 16: aggregate {lv[16]['tok_s'] / lv[1]['tok_s']:.2f}x single (target >= 3); "
              f"p95 {lv[16]['p95_ms'] / lv[1]['p50_ms']:.2f}x single p50 (target <= 4)")  # fmt: skip
    sc = run.get("step_cost")
    if sc:
        print("\none step: " + ", ".join(f"{n} seq {ms:.1f} ms" for n, ms in sc["step_ms"].items()))
        print(f"fit: {sc['fixed_ms']:.1f} ms + {sc['per_seq_ms']:.2f} ms per sequence")


if __name__ == "__main__":
    main()
