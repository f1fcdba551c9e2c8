"""Fuzz and fault figures of the cloud service (docs/reliability.md, "Fuzz and faults").

    python bench/cloud_fuzz.py [--frames 650] [--requests 380] [--seed 20261206] [--workers 8]

On 127.0.0.1, with the test suite's tiny models (tests/tiny.py), it measures:
  - fuzz: seeded malformed frames and HTTP requests (tests/cloud/fuzz.py), each on its own
    connection, while honest generations of another key run alongside: every answer by kind,
    cases per second, honest generations identical to the in-process reference, ERROR records;
  - faults: how long a silent connection, a half-sent request and a WebSocket with no OPEN are
    held (handshake timeout 1 s); a client that pipelines TOKENs and never reads (send and idle
    timeouts 1 s): when an honest idle session of another key is evicted, when the hostile
    session and its socket are gone; a full file table (80 descriptors, 120 connections held for
    3 s): log bytes without and with the rate limit.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from costeer import frames  # noqa: E402
from costeer.api import CoSteer  # noqa: E402
from costeer.frames import Open, Token  # noqa: E402
from tests.cloud import fuzz  # noqa: E402
from tests.cloud.server_util import KEY_A, KEY_B, FileLimitedServer, RawClient, ThreadServer, wait_until  # noqa: E402
from tests.tiny import bpe_tokenizer, gemma3, llama, make_lm  # noqa: E402


def fuzz_figures(llm, slm, args) -> None:
    srv = ThreadServer(llm, max_sessions=64, max_sessions_per_key=6, max_prompt_tokens=64, max_new_tokens=40,
                       handshake_timeout_s=1.0, idle_timeout_s=3.0)  # fmt: skip
    try:
        reference = CoSteer(llm, slm).generate(fuzz.QUERY, fuzz.CONTEXT, "costeer", max_new_tokens=fuzz.N).token_ids
        r = fuzz.run(srv, slm, reference, args.frames, args.requests, seed=args.seed, budget_s=args.budget,
                     workers=args.workers)  # fmt: skip
        t0 = time.monotonic()
        wait_until(lambda: not srv.registry.sessions and not srv.server.server_state.connections, timeout=30)
        drained = time.monotonic() - t0
    finally:
        srv.stop()
    print(f"fuzz: {len(r.outcomes)} cases in {r.seconds:.1f} s ({len(r.outcomes) / r.seconds:.0f}/s), seed {args.seed}")
    print("| kind | answer | code | cases |\n|---|---|---:|---:|")
    for (kind, what, code), n in sorted(r.table().items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"| {kind} | {what} | {'' if code is None else code} | {n} |")
    print(f"outside the documented answers: {len(r.bad)}; ERROR records: {len(r.errors)}")
    print(f"honest generations alongside: {len(r.honest)}, identical to the reference: {sum(r.honest)}")
    print(f"sessions and sockets all released {drained:.1f} s after the run (idle timeout 3 s)")


def held_for(port: int, payload: bytes | None) -> float:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if payload:
            s.sendall(payload)
        t0 = time.monotonic()
        while s.recv(4096):
            pass
        return time.monotonic() - t0


def fault_figures(llm) -> None:
    srv = ThreadServer(llm, handshake_timeout_s=1.0)
    try:
        silent = held_for(srv.port, None)
        half = held_for(srv.port, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        client = RawClient(srv.port)
        t0 = time.monotonic()
        code = client.close_code()
        no_open = time.monotonic() - t0
        client.close()
    finally:
        srv.stop()
    print("\n| fault (handshake timeout 1 s) | held for |\n|---|---:|")
    print(f"| silent connection | {silent:.2f} s |\n| half-sent request head | {half:.2f} s |")
    print(f"| WebSocket with no OPEN (closed {code}) | {no_open:.2f} s |")

    tok = bpe_tokenizer()
    wide = ThreadServer(make_lm("wide", llama(65_536, seed=3), tok), idle_timeout_s=1.0, send_timeout_s=1.0)
    try:
        hostile = RawClient(wide.port, KEY_A, rcvbuf=4096)
        hostile.send(Open([1, 2, 3], frames.FULL, 40).encode())
        for _ in range(39):
            hostile.send(Token(5).encode())
        t0 = time.monotonic()
        honest = RawClient(wide.port, KEY_B)
        honest.send(Open([1, 2, 3], 8, 5).encode())
        evicted = (honest.close_code(), time.monotonic() - t0)
        wait_until(lambda: not wide.registry.sessions, timeout=30)
        gone = time.monotonic() - t0
        wait_until(lambda: not wide.server.server_state.connections, timeout=30)
        released = time.monotonic() - t0
        hostile.close()
        honest.close()
    finally:
        wide.stop()
    print("\n| a client that pipelines 39 TOKENs and never reads (send and idle timeouts 1 s) | after |\n|---|---:|")
    print(f"| an honest idle session of another key is evicted (close {evicted[0]}) | {evicted[1]:.2f} s |")
    print(f"| the hostile session is gone | {gone:.2f} s |\n| its socket is released | {released:.2f} s |")

    print("\n| full file table: 80 descriptors, 120 connections held 3 s | log bytes |\n|---|---:|")
    for guard in (False, True):
        with tempfile.TemporaryDirectory() as d:
            log_file = Path(d) / "server.log"
            with FileLimitedServer(log_file, files=80, guard=guard) as fl:
                held = [socket.create_connection(("127.0.0.1", fl.port), timeout=5) for _ in range(120)]
                time.sleep(3)
                size = log_file.stat().st_size
                for s in held:
                    s.close()
            print(f"| {'with' if guard else 'without'} the rate limit | {size:,} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=650)
    ap.add_argument("--requests", type=int, default=380)
    ap.add_argument("--seed", type=int, default=fuzz.SEED)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--budget", type=float, default=600, help="seconds: the fuzz run stops here")
    args = ap.parse_args()
    tok = bpe_tokenizer()
    llm, slm = make_lm("tiny-llm", llama(len(tok), seed=1), tok), make_lm("tiny-slm", gemma3(len(tok), seed=2), tok)
    fuzz_figures(llm, slm, args)
    fault_figures(llm)


if __name__ == "__main__":
    main()
