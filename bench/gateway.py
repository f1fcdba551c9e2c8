"""What the gateway adds to a generation: the same greedy answer in-process (CoSteer.generate),
through POST /v1/chat/completions, and streamed over server-sent events.

    python bench/gateway.py [--pair smollm2] [--backend llamacpp] [--method costeer] [--tokens 64] [--runs 3]

The demo persona's profile is the gateway's --context-file and its query the one user turn.
After one warm-up generation, reported (median over --runs): wall seconds per answer for each
path, the time to the first streamed text, and whether the three texts agree. The gateway runs in
this process on loopback (uvicorn in a thread), so the difference is HTTP, JSON and the worker
thread, not the network.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn
import yaml
from throughput import PAIRS  # noqa: E402  (bench/ is on sys.path when a bench script runs)

from costeer.api import CoSteer
from costeer.cloud.net import listen
from costeer.engine.config import GenerationConfig, SamplingConfig
from costeer.engine.prompts import render_context
from costeer.gateway import GatewaySettings, create_app


def serve(app) -> tuple[uvicorn.Server, str]:
    sock = listen("127.0.0.1", 0)  # as `costeer gateway` binds it
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


def timed_stream(http: httpx.Client, url: str, body: dict) -> tuple[float, float, str]:
    """-> (seconds to the first text, seconds in all, the text)."""
    t0, first, text = time.perf_counter(), None, ""
    with http.stream("POST", url, json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if piece and first is None:
                first = time.perf_counter() - t0
            text += piece
    return first or 0.0, time.perf_counter() - t0, text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", default="smollm2", choices=sorted(PAIRS))
    ap.add_argument("--backend", default="llamacpp")
    ap.add_argument("--method", default="costeer")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    persona = yaml.safe_load((Path(__file__).parents[1] / "src/costeer/examples/persona.yaml").read_text())
    query, context = persona["query"], render_context(persona["profile"])
    llm, slm = PAIRS[args.pair]
    cfg = GenerationConfig(sampling=SamplingConfig(max_new_tokens=args.tokens))
    cs = CoSteer.load(llm, slm, cfg, device="cpu", backend=args.backend)
    with tempfile.TemporaryDirectory() as d:
        ctx = Path(d) / "me.txt"
        ctx.write_text(context)
        server, base = serve(create_app(cs, GatewaySettings(context_file=ctx)))
        url = f"{base}/v1/chat/completions"
        body = {"model": args.method, "messages": [{"role": "user", "content": query}], "max_tokens": args.tokens}
        rows = {"in_process_s": [], "http_s": [], "sse_s": [], "sse_first_text_s": []}
        texts = set()
        with httpx.Client(timeout=600, trust_env=False) as http:
            cs.generate(query, context, args.method)  # warm-up: vocabulary alignment, first contexts
            for _ in range(args.runs):
                t0 = time.perf_counter()
                texts.add(cs.generate(query, context, args.method).text)
                rows["in_process_s"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                texts.add(http.post(url, json=body).json()["choices"][0]["message"]["content"])
                rows["http_s"].append(time.perf_counter() - t0)
                first, total, text = timed_stream(http, url, body)
                texts.add(text)
                rows["sse_first_text_s"].append(first)
                rows["sse_s"].append(total)
        server.should_exit = True
    out = {k: round(statistics.median(v), 3) for k, v in rows.items()}
    out.update(pair=args.pair, backend=args.backend, method=args.method, tokens=args.tokens, runs=args.runs,
               same_text=len(texts) == 1)  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
