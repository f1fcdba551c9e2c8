"""Fuzz cases against a running cloud server, shared by tests/cloud/test_fuzz.py and
bench/cloud_fuzz.py: mutated OPEN (streamed look-ahead too), ATTACH and TOKEN(S) frames, some after a
streamed session's OPEN while its round grows, random bytes, text, broken WebSocket
framing, and malformed HTTP requests (request lines, headers, keys, upgrades, half-sent requests).
Each case runs on its own connection and records how the server answered."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from costeer import frames
from costeer.api import CoSteer
from costeer.device import connect_cloud
from costeer.frames import Attach, Lookahead, Open, Token, Tokens
from tests.cloud.server_util import KEY_A, KEY_B, RawClient

SEED = 20261206
QUERY, CONTEXT, N = "what should I cook tonight", "my name is Sam and I like spicy tofu", 16

CLOSE_CODES = {frames.CLOSE_NORMAL, frames.CLOSE_MALFORMED, frames.CLOSE_UNKNOWN_SESSION, frames.CLOSE_IDLE,
               frames.CLOSE_ORDER, frames.CLOSE_TOO_LARGE, frames.CLOSE_INVALID, frames.CLOSE_VERSION,
               frames.CLOSE_BUSY,
               1002, 1007, 1009}  # websockets' own: protocol error, bad UTF-8, message too big  # fmt: skip
HTTP_STATUSES = {200, 400, 401, 403, 404, 405, 413, 414, 422, 431, 503}  # 403: a WebSocket to no route (Starlette)


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        how = rng.choice(["set", "set", "insert", "delete", "truncate", "extend"])
        at = rng.randrange(max(len(b), 1))
        if how == "set" and b:
            b[at] = rng.randrange(256)
        elif how == "insert":
            b[at:at] = rng.randbytes(rng.randint(1, 8))
        elif how == "delete" and b:
            del b[at : at + rng.randint(1, 8)]
        elif how == "truncate":
            del b[at:]
        elif how == "extend":
            b += rng.randbytes(rng.randint(1, 64))
    return bytes(b)


def valid_frame(rng: random.Random) -> bytes:
    return rng.choice([
        lambda: Open([rng.randrange(300) for _ in range(rng.randint(1, 8))], rng.choice([0, 8, 64]),
                     rng.randint(1, 40), [rng.randrange(300) for _ in range(rng.randint(0, 3))],
                     rng.random() < 0.3).encode(),
        lambda: Open([rng.randrange(300) for _ in range(rng.randint(1, 8))], rng.choice([0, 8]), rng.randint(1, 40),
                     lookahead=streamed(rng)).encode(),
        lambda: Attach(rng.randbytes(16), rng.randrange(5), rng.choice([frames.NO_TOKEN, 3])).encode(),
        lambda: Attach(rng.randbytes(16), rng.randrange(5), pending=tuple(rng.randrange(300) for _ in range(rng.randint(1, 4)))).encode(),
        lambda: Token(rng.randrange(1 << 25)).encode(),
        lambda: Tokens(tuple(rng.randrange(300) for _ in range(rng.randint(1, 20)))).encode(),
    ])()  # fmt: skip


def streamed(rng: random.Random) -> Lookahead:
    """A streamed look-ahead request, within the server's limits or past them."""
    return Lookahead(rng.choice([frames.LOOKAHEAD_AUTO, frames.LOOKAHEAD_FIXED]), rng.randint(0, 20), rng.randint(1, 80),
                     streamed=True)  # fmt: skip


def frame_case(rng: random.Random) -> dict:
    """What one connection sends after its handshake: maybe a good OPEN first, then something bad."""
    kind = rng.choice(["mutated", "mutated", "mutated", "random", "text", "framing"])
    if kind == "mutated":
        payload = mutate(rng, valid_frame(rng))
    elif kind == "random":
        payload = rng.randbytes(rng.randint(0, 40))
    elif kind == "text":
        payload = rng.choice(["hello", "", "{\"op\": \"open\"}", "\u00e9" * 10])
    else:  # raw WebSocket framing no client may send: unmasked, reserved bits or opcodes, lengths that lie
        head = rng.choice([b"\x82\x05", b"\xc2\x85", b"\x83\x80", b"\x8b\x80", b"\x82\xff", b"\x00\x80", b"\x88\x81",
                           b"\x89\xfe\x01\x00", b"\x82\x7f\xff\xff\xff\xff\xff\xff\xff\xff"])  # fmt: skip
        payload = head + rng.randbytes(rng.randint(0, 12))
    first = rng.random() < 0.3
    return {"kind": kind, "open_first": first, "payload": payload, "streamed": first and rng.random() < 0.5}


def run_frame_case(port: int, case: dict) -> tuple[str, int | None]:
    client = RawClient(port, KEY_A, timeout=15)
    try:
        if case["open_first"]:
            la = Lookahead(frames.LOOKAHEAD_FIXED, 8, 17, streamed=True) if case["streamed"] else frames.NO_LOOKAHEAD
            client.send(Open([1, 2, 3], 8, 20, lookahead=la).encode())
            opened = client.outcome()
            if opened[0] != "message":  # refused (this key's sessions are all taken): that answer counts
                return opened
            client.messages.clear()
        if case["kind"] == "text":
            client.send_text(case["payload"])
        elif case["kind"] == "framing":
            client.send_raw(case["payload"])
        else:
            client.send(case["payload"])
        return client.outcome()
    finally:
        client.close()


def request_case(rng: random.Random) -> bytes:
    method = rng.choice([b"GET", b"POST", b"DELETE", b"PUT", b"G\x00T", b"", b"GET GET"])
    path = rng.choice([b"/v1/info", b"/v1/sessions/" + rng.randbytes(4).hex().encode(), b"/v1/stream", b"/../etc",
                       b"/v1/info?key=" + KEY_A.encode(), b"/%00", b"*", b"/" + b"a" * rng.choice([10, 9000])])  # fmt: skip
    version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1.1 extra", b""])
    headers = [b"Host: x"] if rng.random() < 0.9 else []
    auth = rng.choice([b"Bearer " + KEY_A.encode(), b"Bearer wrong", b"Basic Zm9vOmJhcg==", b"Bearer",
                       b"Bearer " + b"k" * 5000, b"Bearer \xff\xfe", None])  # fmt: skip
    if auth is not None:
        headers.append(b"Authorization: " + auth)
    if rng.random() < 0.3:  # a WebSocket upgrade, well-formed or not
        headers += [b"Upgrade: websocket", b"Connection: Upgrade",
                    b"Sec-WebSocket-Key: " + rng.choice([b"dGhlIHNhbXBsZSBub25jZQ==", b"short", b""]),
                    b"Sec-WebSocket-Version: " + rng.choice([b"13", b"8", b"x"])]  # fmt: skip
    if rng.random() < 0.2:
        headers.append(rng.choice([b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 5\r\nContent-Length: 6",
                                   b"Transfer-Encoding: chunked", b"X-Big: " + b"x" * 20000, b"bad header line",
                                   b": empty name"]))  # fmt: skip
    req = method + b" " + path + b" " + version + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    if rng.random() < 0.15:
        req += rng.randbytes(rng.randint(1, 20))
    if rng.random() < 0.05:  # half-sent: the handshake timeout must close it
        req = req[: rng.randrange(1, len(req))]
    return req


def run_request_case(port: int, req: bytes) -> tuple[str, int | None]:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        try:
            s.sendall(req)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
                if b"\r\n\r\n" in got and (b" 101 " in got.split(b"\r\n", 1)[0]):
                    break  # an accepted upgrade: the WebSocket's own timeout would end it later
        except socket.timeout:
            return "timeout", None
        except ConnectionError:
            return "reset", None
    if not got:
        return "closed", None
    first = got.split(b"\r\n", 1)[0].split()
    return "status", int(first[1]) if len(first) > 1 and first[1].isdigit() else -1


# ---------------------------------------------------------------------------------------
# A run
# ---------------------------------------------------------------------------------------


def acceptable(kind: str, outcome: tuple[str, int | None]) -> bool:
    what, code = outcome
    if kind == "frame":  # a documented close, or the frame was a valid one and got its answer
        return what == "message" or (what == "close" and code in CLOSE_CODES)
    return what in ("closed", "reset") or (what == "status" and code in HTTP_STATUSES | {101})


class ErrorLog(logging.Handler):
    """ERROR records of the server's loggers during a run (an internal error would log one)."""

    NAMES = ("uvicorn.error", "costeer.cloud", "asyncio")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)


@dataclass
class Report:
    outcomes: list[tuple[str, object, tuple[str, int | None]]] = field(default_factory=list)  # kind, case, answer
    honest: list[bool] = field(default_factory=list)  # each honest generation: identical to the reference
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bad(self) -> list:
        return [(k, o, c) for k, c, o in self.outcomes if not acceptable(k, o)]

    def table(self) -> Counter:
        return Counter((k, o[0], o[1]) for k, _, o in self.outcomes)


def honest_runs(server, slm, reference, stop: threading.Event, results: list) -> None:
    """Generate again and again with another key until the fuzz run ends."""
    while not stop.is_set():
        cs = CoSteer(connect_cloud(server.url, api_key=KEY_B, k="full"), slm)
        results.append(cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids == reference)


def run(server, slm, reference, n_frames: int, n_requests: int, seed: int = SEED, budget_s: float = 240,
        workers: int = 8) -> Report:  # fmt: skip
    """n_frames + n_requests seeded cases, `workers` at a time, until done or budget_s has passed,
    with honest generations of another key running alongside."""
    rng = random.Random(seed)
    cases = [("frame", frame_case(rng)) for _ in range(n_frames)] + [("request", request_case(rng)) for _ in range(n_requests)]
    rng.shuffle(cases)
    report, stop = Report(), threading.Event()
    side = threading.Thread(target=honest_runs, args=(server, slm, reference, stop, report.honest))
    t0 = time.monotonic()
    deadline = t0 + budget_s
    with ErrorLog() as errors:
        side.start()
        try:
            with ThreadPoolExecutor(workers) as pool:
                run_case = {"frame": run_frame_case, "request": run_request_case}
                futures = [pool.submit(run_case[kind], server.port, case) for kind, case in cases]
                for (kind, case), fut in zip(cases, futures):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        fut.cancel()
                        continue
                    report.outcomes.append((kind, case, fut.result(timeout=left)))
        finally:
            report.seconds = time.monotonic() - t0
            stop.set()
            side.join(timeout=60)
    report.errors = [r.getMessage() for r in errors.records]
    return report
