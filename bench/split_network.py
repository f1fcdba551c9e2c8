"""The cloud/device split over a network with a round trip: per-token decoding, look-ahead, and the
LLM alone streaming its answer, through the same delay relay (tests/device/relay.py: each chunk
held RTT/2 each way; no root needed).

    python bench/split_network.py [--pairs smollm2,gemma] [--methods costeer,costeer_matched]
        [--rtts 0,10,25,50,100] [--modes pertoken,vanilla,la:auto,la:chain:4,la:tree:4:8] [--rows 20]
        [--runs 3] [--tokens 64] [--budget-s 1200] [--out bench/out/split_network.jsonl]
    python bench/split_network.py --report bench/out/split_network.jsonl [--plot docs/img/split_network.png]

Three processes per pair, as on a real deployment: the cloud (core 0, one compute thread), the
device (core 1, one thread), and this driver with the relays (unpinned; it only forwards bytes).
  cloud   `costeer serve`'s app (cloud.create_app + cloud.net.uvicorn_config) on the LLM, with one
          bench route that reads how many forwards its sequence pool ran; beside it, on another
          port, the gateway's OpenAI chat API (gateway.create_app) on the same LLM alone, whose
          `llm` model streams the LLM's own greedy answer (server-sent events).
  device  the SLM pair, fusion and sampling (connect_cloud through a relay); `vanilla` is an
          HTTP client streaming the gateway's `llm` answer through a relay of the same RTT.
Modes: `pertoken` (one round trip per token), `vanilla` (the LLM alone, streamed: it pays the round
trip once), `la:X` (look-ahead, the device's `--lookahead X`: auto, N, chain:D, tree:D:N; needs a
build that has it; streamed rounds, the root at once and each level as the cloud computes it, where
the build has them), `la:X:whole` (the same with each round sent whole, as one TREE frame);
`:ra` / `:nora` after either: the device's run-ahead on / off (guessed SLM-pair forwards while a
round is on its way, device/ahead.py; without either suffix, the build's default: on). Greedy, 64 new tokens, the example persona and the first --rows CoGenesis rows (skipped when
../shared/datasets is absent), --runs repetitions interleaved across modes. Per generation:
  tok/s   new tokens after the first / seconds from the first to the last (the decode rate);
  end-to-end tok/s: new tokens / seconds from the call to the last token (TTFT included);
  TTFT    seconds from the call to the first token (connection, prefill, the first round trips);
  tokens per round trip, bytes per token down (DIST payloads) and up (TOKEN payloads), cloud
  decode forwards per token (the pool's forwards other than prompt prefill, per new token);
  with run-ahead, the device's guessed forwards per token, the guess hit rate (used / judged) and the
  forwards saved per token (guesses used while walking a tree: forwards taken off the critical path).
Reported: per row the median of the runs, then the mean over rows; every record is kept in --out
(JSON lines) so that --report can rebuild the tables and the plot from several invocations.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT), str(ROOT / "bench")]

from throughput import PAIRS  # noqa: E402

KEY = "bench-network-key-0123456789"
DEFAULT_MODES = "pertoken,vanilla,la:auto,la:chain:2,la:chain:4,la:chain:8,la:tree:4:8"
METRICS = ("tok_s", "e2e_tok_s", "ttft_s", "tokens_per_rt", "down_per_token", "up_per_token", "forwards_per_token",
           "guessed_per_token", "guess_hit", "saved_per_token")


def _env() -> dict:
    env = dict(os.environ, COSTEER_THREADS="1", OMP_NUM_THREADS="1", COSTEER_API_KEYS=KEY, COSTEER_API_KEY=KEY)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _pinned(core: int, args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", str(core), sys.executable, __file__, *args], env=_env(), **kw)


# ------------------------------------------------------------------------------- cloud (one process)


class CountingPool:
    """The LM's sequence pool with a count of each kind of forward it ran: prompt pieces (prefill),
    one token per session (step), and look-ahead tree levels (grow)."""

    FORWARDS = frozenset({"prefill", "step", "grow"})

    def __init__(self, pool):
        self._pool, self.calls = pool, {}

    def __getattr__(self, name: str):
        attr = getattr(self._pool, name)
        if name not in self.FORWARDS:
            return attr

        def counted(*a, **kw):
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*a, **kw)

        return counted


def cloud_role(llm: str, backend: str) -> None:
    """Serve the split (and the gateway's `llm` stream) on free ports; print them; run until killed."""
    import uvicorn

    from costeer.api import CoSteer
    from costeer.cloud import ServerSettings, create_app
    from costeer.cloud.net import listen, uvicorn_config
    from costeer.engine.models import load_lm
    from costeer.gateway import GatewaySettings
    from costeer.gateway import create_app as gateway_app

    lm = load_lm(llm, "cpu", backend)
    pools = []
    open_pool = lm.open_pool
    lm.open_pool = lambda *a, **kw: pools.append(CountingPool(open_pool(*a, **kw))) or pools[-1]
    settings = ServerSettings(api_keys=frozenset({KEY}))
    app = create_app(lm, settings)

    @app.get("/bench/forwards")
    async def forwards():
        return pools[0].calls if pools else {}

    servers = [(uvicorn_config(app, settings, log_level="warning"), listen("127.0.0.1", 0)),
               (uvicorn.Config(gateway_app(CoSteer(lm, None), GatewaySettings(api_keys=frozenset({KEY}))),
                               log_level="warning"), listen("127.0.0.1", 0))]  # fmt: skip
    ports = []
    for cfg, sock in servers:
        server = uvicorn.Server(cfg)
        threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        ports.append(sock.getsockname()[1])
    print(json.dumps({"cloud": ports[0], "gateway": ports[1]}), flush=True)
    sys.stdin.read()  # until the driver closes our stdin (or kills us)


# ------------------------------------------------------------------------------- device (one process)


def connect_split(url: str, mode: str):
    """The cloud through `url`, with the look-ahead the mode names (pertoken: off)."""
    from costeer.device import connect_cloud

    params = inspect.signature(connect_cloud).parameters
    shape, run_ahead = mode_run_ahead(mode)
    shape, whole = shape.removeprefix("la:").removesuffix(":whole"), shape.endswith(":whole")
    if whole and "streamed" not in params:
        raise SystemExit(f"error: mode {mode}: this build has no streamed rounds to compare against")
    if run_ahead is not None and "run_ahead" not in params:
        raise SystemExit(f"error: mode {mode}: this build has no run-ahead (connect_cloud takes no `run_ahead`)")
    if run_ahead is not None:
        return connect_cloud(url, api_key=KEY, lookahead="off" if mode == "pertoken" else shape, streamed=not whole,
                             run_ahead=run_ahead)  # fmt: skip
    if "streamed" in params:  # la:X streams its rounds level by level; la:X:whole sends each as one TREE
        return connect_cloud(url, api_key=KEY, lookahead="off" if mode == "pertoken" else shape, streamed=not whole)
    if "lookahead" in params:
        return connect_cloud(url, api_key=KEY, lookahead="off" if mode == "pertoken" else shape)
    if mode != "pertoken":
        raise SystemExit(f"error: mode {mode}: this build has no look-ahead (connect_cloud takes no `lookahead`)")
    return connect_cloud(url, api_key=KEY)


def mode_run_ahead(mode: str) -> tuple[str, bool | None]:
    """`la:X...:ra` / `:nora` -> (the mode without it, run-ahead on / off); None: the build's default."""
    for suffix, on in ((":ra", True), (":nora", False)):
        if mode.endswith(suffix):
            return mode.removesuffix(suffix), on
    return mode, None


def guesses_of(llm) -> tuple[int, int, int]:
    """The device's guessed SLM-pair forwards so far: (made, used, walked, undone); zeros without run-ahead."""
    g = getattr(llm, "guesses", None)
    return (g.made, g.used, getattr(g, "walked", g.used), g.undone) if g is not None else (0, 0, 0, 0)


def rounds_of(llm) -> int:
    """Round trips the device waited for so far (one DIST frame each without look-ahead)."""
    return getattr(llm, "rounds", llm.frames_down)


def split_run(cs, http, ex: dict, method: str, tokens: int) -> dict:
    llm = cs.llm
    before = (rounds_of(llm), llm.bytes_down, llm.bytes_up, http.get("/bench/forwards").json(), guesses_of(llm))
    t0 = time.perf_counter()
    stream = cs.stream(ex["query"], ex["context"], method, context_message=ex.get("context_message"),
                       reference_message=ex.get("reference_message"), max_new_tokens=tokens)  # fmt: skip
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    end = time.perf_counter()
    after = http.get("/bench/forwards").json()
    ids = stream.generation.token_ids
    n = len(ids)
    kinds = {k: after.get(k, 0) - before[3].get(k, 0) for k in after}  # forwards of each kind in this generation
    made, used, walked, undone = (a - b for a, b in zip(guesses_of(llm), before[4]))
    return {"tokens": n, "ttft_s": first - t0, "tok_s": (n - 1) / (end - first) if n > 1 else 0.0,
            "e2e_tok_s": n / (end - t0), "rounds": rounds_of(llm) - before[0],
            "bytes_down": llm.bytes_down - before[1], "bytes_up": llm.bytes_up - before[2],
            "forwards": sum(v for k, v in kinds.items() if k != "prefill"), "forward_kinds": kinds,
            "guesses": {"made": made, "used": used, "walked": walked, "undone": undone}, "token_ids": ids}  # fmt: skip


def vanilla_run(client, url: str, ex: dict, tokens: int) -> dict:
    """The gateway's `llm` answer streamed through the relay: the LLM alone, one round trip."""
    body = {"model": "llm", "messages": [{"role": "user", "content": ex["query"]}], "max_tokens": tokens,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first = last = None
    n, down = 0, 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            down += len(line) + 1
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                n = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    end = last or time.perf_counter()
    first = first or end
    return {"tokens": n, "ttft_s": first - t0, "tok_s": (n - 1) / (end - first) if n > 1 and end > first else 0.0,
            "e2e_tok_s": n / (end - t0), "rounds": 1, "bytes_down": down,
            "bytes_up": len(json.dumps(body)), "forwards": None, "token_ids": None}  # fmt: skip


CONTEXT_MB = 64  # a CoGenesis row's private prefix on the SmolLM2 SLM: about 1,500 tokens x 23 KB, with room


def device_cache_config(rows: int):
    """The device's prefix cache, from the environment as a user's device reads it, but with a memory
    bound that holds every row's prefix unless COSTEER_PREFIX_CACHE_MEMORY_MB says otherwise (the
    512 MiB default holds about 14 rows: more would evict the warm-up's prefixes and time prefills)."""
    from costeer.engine.prefix_cache import MiB, PrefixCacheConfig

    config = PrefixCacheConfig.from_env()
    if os.environ.get("COSTEER_PREFIX_CACHE_MEMORY_MB"):
        return config
    return config.model_copy(update={"max_memory_bytes": max(config.max_memory_bytes, rows * CONTEXT_MB * MiB)})


def device_role(spec_file: str) -> None:
    import httpx
    import torch

    torch.set_num_threads(1)
    from costeer.api import CoSteer
    from costeer.engine.models import load_lm
    from costeer.engine.prefix_cache import PrefixCache

    spec = json.loads(Path(spec_file).read_text())
    examples = json.loads(Path(spec["examples"]).read_text())
    slm = load_lm(spec["slm"], "cpu", spec["backend"])
    cloud_http = httpx.Client(base_url=spec["cloud_http"], trust_env=False, timeout=30)
    client = httpx.Client(trust_env=False, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + spec["budget_s"]
    out = open(spec["out"], "a")
    split_modes = [m for m in spec["modes"] if m != "vanilla"]
    cache = PrefixCache(device_cache_config(len(examples)))  # one for all: each row's prefix is prefilled once, in the warm-up
    pairs = {(link["rtt_ms"], mode): CoSteer(connect_split(link["ws"], mode), slm, prefix_cache=cache)
             for link in spec["links"] for mode in split_modes}  # fmt: skip
    for (rtt, mode), cs in pairs.items():  # warm-up: tokenizer, vocabulary map, the rows' SLM prefixes
        for method in spec["methods"]:
            for ex in examples if (rtt, mode) == next(iter(pairs)) else examples[:1]:
                split_run(cs, cloud_http, ex, method, 2)
    if "vanilla" in spec["modes"]:
        for link in spec["links"]:
            vanilla_run(client, link["gateway"], examples[0], 2)
    if len(cache) < len(examples):  # the bound evicted warm rows: their TTFT would count a prefill again
        print(f"note: the device's prefix cache holds {len(cache)} prefixes for {len(examples)} rows: TTFT includes "
              "prefills; raise COSTEER_PREFIX_CACHE_MEMORY_MB", file=sys.stderr)
    # every round trip, method and mode once per row and run, in turn: drift (and a budget that
    # runs out) hits each alike
    for rep in range(spec["runs"]):
        for ex in examples:
            for link in spec["links"]:
                for method in spec["methods"]:
                    for mode in spec["modes"]:
                        if time.monotonic() > deadline:
                            print("budget spent: stopping early", file=sys.stderr)
                            return
                        if mode == "vanilla":
                            if method != spec["methods"][0]:
                                continue  # the LLM alone does not depend on the steering method
                            rec = vanilla_run(client, link["gateway"], ex, spec["tokens"])
                        else:
                            rec = split_run(pairs[(link["rtt_ms"], mode)], cloud_http, ex, method, spec["tokens"])
                        rec.update(pair=spec["pair"], rtt_ms=link["rtt_ms"], mode=mode, row=ex["id"], rep=rep,
                                   method="llm" if mode == "vanilla" else method, load=os.getloadavg()[0])
                        out.write(json.dumps(rec) + "\n")
                        out.flush()


# ------------------------------------------------------------------------------- driver


def examples(args) -> list[dict]:
    """The example persona, then the first --rows CoGenesis rows (none when the file is absent)."""
    import yaml

    from costeer.engine.prompts import render_context, user_message

    def persona(name: str) -> dict:
        return yaml.safe_load((ROOT / f"src/costeer/examples/{name}.yaml").read_text())

    p = persona("persona")
    ref = user_message(p["query"], render_context(persona("reference_persona")["profile"]))
    out = [{"id": "persona", "query": p["query"], "context": render_context(p["profile"]), "reference_message": ref}]
    if args.rows and args.data.is_file():
        from costeer.eval.tasks import load_task

        for ex in load_task("cogenesis", args.data, limit=args.rows):
            out.append({"id": ex.id, "query": ex.query, "context": ex.context,
                        "context_message": ex.with_context_prompt(), "reference_message": ex.reference_prompt()})  # fmt: skip
    elif args.rows:
        print(f"note: {args.data} not found: the example persona only", file=sys.stderr)
    return out


def start_cloud(llm: str, backend: str) -> tuple[subprocess.Popen, dict]:
    proc = _pinned(0, ["--role", "cloud", "--llm", llm, "--backend", backend], stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit("error: the cloud process did not start")
    return proc, json.loads(line)


def run_pair(pair: str, args, rows: list[dict], tmp: Path) -> None:
    from tests.device.relay import DelayRelay

    llm, slm = PAIRS[pair]
    cloud, ports = start_cloud(llm, args.backend)
    relays = []
    try:
        links = []
        for rtt in args.rtts:
            ws, gw = DelayRelay(ports["cloud"], rtt / 1000).start(), DelayRelay(ports["gateway"], rtt / 1000).start()
            relays += [ws, gw]
            links.append({"rtt_ms": rtt, "ws": ws.url("ws"), "gateway": gw.url("http")})
        spec = {"pair": pair, "slm": slm, "backend": args.backend, "tokens": args.tokens, "runs": args.runs,
                "methods": args.methods, "modes": args.modes, "links": links, "out": str(args.out),
                "cloud_http": f"http://127.0.0.1:{ports['cloud']}", "examples": str(tmp / "examples.json"),
                "budget_s": args.budget_s}  # fmt: skip
        (tmp / "examples.json").write_text(json.dumps(rows))
        (tmp / "spec.json").write_text(json.dumps(spec))
        print(f"{pair}: load average before {os.getloadavg()}", file=sys.stderr)
        device = _pinned(1, ["--role", "device", "--spec", str(tmp / "spec.json")])
        try:
            if device.wait() != 0:
                raise SystemExit(f"error: the device process exited with {device.returncode}")
        finally:
            device.kill()
            device.wait()
        print(f"{pair}: load average after {os.getloadavg()}", file=sys.stderr)
    finally:
        for r in relays:
            r.stop()
        cloud.stdin.close()
        cloud.kill()
        cloud.wait()


# ------------------------------------------------------------------------------- report


def per_row(records: list[dict]) -> dict:
    """One row's runs of one mode -> the median of each metric."""
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    out = {k: med([r[k] for r in records]) for k in ("tok_s", "e2e_tok_s", "ttft_s")}
    n = [r["tokens"] for r in records]
    out["tokens_per_rt"] = med([r["tokens"] / r["rounds"] for r in records if r["rounds"]])
    out["down_per_token"] = med([r["bytes_down"] / t for r, t in zip(records, n) if t])
    out["up_per_token"] = med([r["bytes_up"] / t for r, t in zip(records, n) if t])
    fw = [r["forwards"] / t for r, t in zip(records, n) if t and r["forwards"] is not None]
    out["forwards_per_token"] = med(fw)
    guessed = [r.get("guesses") for r in records]
    out["guessed_per_token"] = med([g["made"] / t for g, t in zip(guessed, n) if g and t and g["made"]])
    out["guess_hit"] = med([g["used"] / (g["used"] + g["undone"]) for g in guessed if g and g["used"] + g["undone"]])
    out["saved_per_token"] = med([g.get("walked", g["used"]) / t for g, t in zip(guessed, n) if g and t and g["made"]])
    return out


def summarise(records: list[dict]) -> list[dict]:
    """Records -> one line per (pair, method, rtt, mode): the mean over rows of the per-row medians,
    and whether every run gave the same tokens as the per-token run of the same row."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in records:
        groups.setdefault((r["pair"], r["method"], r["rtt_ms"], r["mode"]), {}).setdefault(r["row"], []).append(r)
    reference = {(r["pair"], r["method"], r["row"]): r["token_ids"] for r in records if r["mode"] == "pertoken"}
    lines = []
    for (pair, method, rtt, mode), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        meds = [per_row(rs) for rs in rows.values()]
        line = {"pair": pair, "method": method, "rtt_ms": rtt, "mode": mode, "rows": len(rows),
                "runs": sum(len(rs) for rs in rows.values()),
                "load": statistics.mean(r["load"] for rs in rows.values() for r in rs)}  # fmt: skip
        for k in METRICS:
            vals = [m[k] for m in meds if m[k] is not None]
            line[k] = statistics.mean(vals) if vals else None
        same = [r["token_ids"] == reference.get((pair, method, r["row"])) for rs in rows.values() for r in rs
                if r["token_ids"] is not None and (pair, method, r["row"]) in reference]  # fmt: skip
        line["same_tokens"] = (sum(same), len(same))
        lines.append(line)
    return lines


def table(lines: list[dict]) -> str:
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    out = ["| pair | method | RTT ms | mode | tok/s | × per-token | end-to-end tok/s | TTFT ms | tokens / round trip | "
           "bytes/token down | bytes/token up | cloud forwards/token | guessed forwards/token | guess hit rate | "
           "forwards saved/token | "
           "same tokens as per-token | rows × runs | load |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    base = {(x["pair"], x["rtt_ms"], x["method"]): x["tok_s"] for x in lines if x["mode"] == "pertoken"}
    for x in lines:
        ref = base.get((x["pair"], x["rtt_ms"], x["method"] if x["mode"] != "vanilla" else "costeer"))
        ref = ref or next((v for (p, t, _), v in base.items() if p == x["pair"] and t == x["rtt_ms"]), None)
        ratio = x["tok_s"] / ref if ref and x["tok_s"] else None
        same = "–" if not x["same_tokens"][1] else f"{x['same_tokens'][0]}/{x['same_tokens'][1]}"
        out.append(f"| {x['pair']} | {x['method']} | {x['rtt_ms']:g} | {x['mode']} | {fmt(x['tok_s'], '.1f')} | "
                   f"{fmt(ratio, '.2f')} | {fmt(x['e2e_tok_s'], '.1f')} | {fmt(x['ttft_s'] and 1000 * x['ttft_s'], '.0f')} | "
                   f"{fmt(x['tokens_per_rt'], '.2f')} | {fmt(x['down_per_token'], ',.0f')} | "
                   f"{fmt(x['up_per_token'], '.1f')} | {fmt(x['forwards_per_token'], '.2f')} | "
                   f"{fmt(x.get('guessed_per_token'), '.2f')} | {fmt(x.get('guess_hit'), '.0%')} | "
                   f"{fmt(x.get('saved_per_token'), '.2f')} | {same} | "
                   f"{x['rows']} × {x['runs'] // max(1, x['rows'])} | {x['load']:.1f} |")  # fmt: skip
    return "\n".join(out)


def plot(lines: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(x["pair"], x["method"]) for x in lines if x["mode"] != "vanilla"})
    rates = (("tok_s", "tokens/s (decode: first to last token)"), ("e2e_tok_s", "tokens/s (end to end: TTFT included)"))
    fig, axes = plt.subplots(len(rates), len(panels), figsize=(5.5 * len(panels), 4 * len(rates)), squeeze=False)
    for row, (key, label) in enumerate(rates):
        for ax, (pair, method) in zip(axes[row], panels):
            mine = [x for x in lines if x["pair"] == pair and (x["method"] == method or x["mode"] == "vanilla")]
            for mode in dict.fromkeys(x["mode"] for x in mine):
                pts = sorted((x["rtt_ms"], x[key]) for x in mine if x["mode"] == mode and x[key])
                ax.plot(*zip(*pts), marker="o", label="LLM alone, streamed" if mode == "vanilla" else mode)
            ax.set(title=f"{PAIRS[pair][0]} / {PAIRS[pair][1]}, {method}", xlabel="round trip (ms)", ylabel=label)
            ax.set_yscale("log")  # the LLM alone is ~10x the split: a log axis keeps the split's lines apart
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(paths: list[Path], plot_path: Path | None) -> None:
    records = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    lines = summarise(records)
    print(table(lines))
    if plot_path is not None:
        plot(lines, plot_path)
        print(f"\nplot: {plot_path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="smollm2,gemma")
    ap.add_argument("--methods", default="costeer,costeer_matched")
    ap.add_argument("--rtts", default="0,10,25,50,100", help="round trips in ms")
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--rows", type=int, default=20, help="CoGenesis rows besides the example persona")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--budget-s", type=float, default=7200, help="the device stops starting runs after this")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/cogenesis.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/split_network.jsonl")
    ap.add_argument("--report", type=Path, nargs="*", help="only rebuild the tables (and --plot) from these records")
    ap.add_argument("--plot", type=Path, default=None, help="write the tok/s-against-RTT plot here")
    ap.add_argument("--role", choices=["cloud", "device"], help=argparse.SUPPRESS)
    ap.add_argument("--llm", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "cloud":
        return cloud_role(args.llm, args.backend)
    if args.role == "device":
        return device_role(args.spec)
    if args.report is not None:
        return report(args.report or [args.out], args.plot)
    if (os.cpu_count() or 1) < 2:
        sys.exit("error: needs 2 cores (cloud and device pinned apart)")
    args.rtts = [float(x) for x in args.rtts.split(",")]
    args.methods, args.modes = args.methods.split(","), args.modes.split(",")
    bad = [p for p in args.pairs.split(",") if p not in PAIRS]
    if bad:
        sys.exit(f"error: unknown pair {bad[0]!r} (choose from {', '.join(PAIRS)})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped (SIGTERM)"))  # so that the processes are ended
    rows = examples(args)
    print(f"{len(rows)} rows, {args.runs} runs, RTT {args.rtts} ms, modes {args.modes}, methods {args.methods}; "
          f"records appended to {args.out}", file=sys.stderr)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs.split(","):
            run_pair(pair, args, rows, Path(tmp))
    report([args.out], args.plot)


if __name__ == "__main__":
    main()
