"""How `--lookahead auto` adapts, seen from one device: the split through a delay relay
(tests/device/relay.py) at a few round trips, per-token against auto and fixed shapes, on the
example persona and the first CoGenesis rows. Prints per mode and RTT: tokens per round trip,
tok/s after the first token, bytes down per token, whether the tokens equal per-token decoding,
and what the cloud's controller measured at the end of the last generation (its estimates of
the round trip R, the device's in-tree token L, the saving S, the level cost, alpha).

Cloud and device share this process (the cloud in a thread), so absolute tok/s on a 2-core machine
are low; bench/split_network.py runs them as separate pinned processes.

    python bench/lookahead_rounds.py --backend llamacpp --rtt 0,50 --modes off,auto,chain:4,tree:4:12 --rows 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import yaml

from costeer.api import CoSteer
from costeer.device import connect_cloud
from costeer.engine.models import load_lm
from costeer.engine.prompts import render_context
from tests.cloud.server_util import KEY_A, ThreadServer
from tests.device.relay import DelayRelay

ROOT = Path(__file__).resolve().parents[1]
COGENESIS = ROOT.parent / "shared" / "datasets" / "cogenesis.jsonl"


def examples(rows: int) -> list[dict]:
    persona = yaml.safe_load((ROOT / "src/costeer/examples/persona.yaml").read_text())
    out = [{"query": persona["query"], "context": render_context(persona["profile"])}]
    if COGENESIS.is_file() and rows:
        from costeer.eval.tasks import load_task

        for ex in load_task("cogenesis", COGENESIS, limit=rows):
            out.append({"query": ex.query, "context": ex.context, "context_message": ex.with_context_prompt()})
    return out


def run_mode(server, url: str, slm, mode: str, exs: list[dict], method: str, tokens: int) -> dict:
    llm = connect_cloud(url, api_key=KEY_A, lookahead=mode)
    cs = CoSteer(llm, slm)
    rates, ids, estimates = [], [], {}
    for ex in exs:
        before = (llm.rounds, llm.bytes_down)
        stream = cs.stream(ex["query"], ex["context"], method, context_message=ex.get("context_message"),
                           max_new_tokens=tokens)  # fmt: skip
        first = None
        for _ in stream:
            first = first or time.perf_counter()
            live = [s.info() for s in list(server.registry.sessions.values())]
            if live and "saving_ms" in live[0]["lookahead"]:
                estimates = live[0]["lookahead"]
        n = len(stream.generation.token_ids)
        rates.append((n - 1) / (time.perf_counter() - first) if n > 1 else 0.0)
        ids.append(stream.generation.token_ids)
    tokens_total = sum(len(i) for i in ids)
    return {"tok_s": statistics.median(rates), "tokens_per_rt": tokens_total / max(llm.rounds, 1),
            "down_per_token": llm.bytes_down / tokens_total, "ids": ids, "estimates": estimates}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default="smollm2-135m-instruct")
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--rtt", default="0,50", help="milliseconds, comma-separated")
    ap.add_argument("--modes", default="off,auto,chain:4,tree:4:12")
    ap.add_argument("--method", default="costeer")
    ap.add_argument("--rows", type=int, default=3, help="CoGenesis rows besides the persona")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    lm = load_lm(args.llm, "cpu", args.backend)
    exs = examples(args.rows)
    server = ThreadServer(lm)
    try:
        for rtt in [float(x) for x in args.rtt.split(",")]:
            with DelayRelay(server.port, rtt / 1000) as relay:
                base = None
                for mode in args.modes.split(","):
                    r = run_mode(server, relay.url("ws"), lm, mode, exs, args.method, args.tokens)
                    base = base or r
                    same = r["ids"] == base["ids"]
                    est = {k: r["estimates"].get(k) for k in ("round_trip_ms", "device_token_ms", "saving_ms",
                                                              "level_ms", "node_ms", "stay_greedy", "bytes_per_node")}  # fmt: skip
                    print(f"rtt {rtt:5.0f} ms  {mode:10s} tok/s {r['tok_s']:6.2f}  tokens/rt {r['tokens_per_rt']:5.2f}  "
                          f"down/token {r['down_per_token']:8.0f} B  same tokens as {args.modes.split(',')[0]}: {same}  "
                          f"controller {json.dumps(est) if r['estimates'] else '-'}", flush=True)  # fmt: skip
    finally:
        server.stop()
    print(f"{len(exs)} examples x {args.tokens} tokens, method {args.method}, {args.llm} [{args.backend}] both sides; "
          f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
