"""The server's forwards through its scheduler, with a tiny LLM: a DELETE while a forward holds
the session, a socket closed during a long replay, and the limits on KV memory and on a key's
queued prompt and replay work."""

import socket
import threading
import time

import pytest
import torch

from costeer import frames
from costeer.api import CoSteer
from costeer.cloud.scheduler import Gather
from costeer.cloud.sessions import KeyRing
from costeer.device import connect_cloud
from costeer.frames import Open, Token
from tests.cloud.server_util import KEY_A, KEY_B, ThreadServer
from tests.cloud.test_server import CONTEXT, N, QUERY, closed_with, get, open_session, wait_until, ws_open


class GatedPool:
    """Wraps a server's pool: while `open` is clear, a forward waits inside the pool (holding
    its sequences), as a slow forward would; `delay` slows every forward; drops are checked
    against running forwards."""

    def __init__(self, pool, delay=0.0):
        self.pool, self.chunk, self.delay = pool, pool.chunk, delay
        self.open, self.holding = threading.Event(), threading.Event()
        self.open.set()
        self.running = False
        self.freed_during_forward = False
        self.steps: dict[int, int] = {}  # tokens fed per sequence

    def _held(self, fn, *args):
        self.running = True
        self.holding.set()
        try:
            self.open.wait(timeout=30)
            time.sleep(self.delay)
            return fn(*args)
        finally:
            self.running = False

    def prefill(self, seq, tokens):
        return self._held(self.pool.prefill, seq, tokens)

    def step(self, items):
        for seq, _ in items:
            self.steps[seq] = self.steps.get(seq, 0) + 1
        return self._held(self.pool.step, items)

    def drop(self, seq):
        self.freed_during_forward |= self.running
        self.pool.drop(seq)

    def close(self):
        self.pool.close()


def gated(server, delay=0.0) -> GatedPool:
    gate = GatedPool(server.registry.scheduler.pool, delay)
    server.registry.scheduler.pool = gate
    return gate


def session_of(server, key):
    owner = KeyRing.owner(key)
    return next(s for s in list(server.registry.sessions.values()) if s.owner == owner)


@pytest.fixture(scope="module")
def reference(tiny_llm, tiny_slm):
    return CoSteer(tiny_llm, tiny_slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids


@pytest.fixture
def server(tiny_llm):
    srv = ThreadServer(tiny_llm, max_prompt_tokens=64, max_new_tokens=2000, max_sessions=8, max_sessions_per_key=4)
    yield srv
    srv.stop()


def test_delete_while_a_forward_holds_the_session_waits_for_that_forward(server, tiny_slm, reference):
    gate = gated(server)
    healthy = CoSteer(connect_cloud(server.url, api_key=KEY_B, k="full"), tiny_slm)
    it = iter(healthy.stream(QUERY, CONTEXT, "costeer", max_new_tokens=N))
    head = [next(it) for _ in range(3)]
    with ws_open(server, KEY_A) as ws:
        ready, _ = open_session(ws)
        sid = ready.session_id
        gate.open.clear()
        gate.holding.clear()
        ws.send(Token(5).encode())
        assert gate.holding.wait(10)  # the forward that holds the session is running
        r = get(server, f"/v1/sessions/{sid.hex()}", KEY_A, "DELETE")
        assert r.status_code == 200  # ended at once for the client ...
        assert get(server, f"/v1/sessions/{sid.hex()}", KEY_A).status_code == 404
        time.sleep(0.2)
        assert server.registry.scheduler.holds(sid)  # ... but its sequence is kept under the forward
        gate.open.set()
        closed_with(ws, frames.CLOSE_ENDED)
    wait_until(lambda: not server.registry.scheduler.holds(sid))
    assert not gate.freed_during_forward
    rest = list(it)  # the other key's session goes on, unchanged
    assert len(head) + len(rest) == len(reference)


@pytest.mark.parametrize("how", ["close frame", "dropped"])
def test_closing_the_socket_during_a_long_replay_drops_the_replay(server, how):
    gate = gated(server, delay=0.002)  # a replay of 1,999 tokens then takes several seconds
    ws = ws_open(server, KEY_A)
    ws.send(Open([1, 2, 3], 8, 2000, generated=[7] * 1999).encode())
    wait_until(lambda: gate.steps)
    sess = session_of(server, KEY_A)
    if how == "dropped":
        ws.socket.shutdown(socket.SHUT_RDWR)
    ws.close()
    wait_until(lambda: not server.registry.scheduler.holds(sess.id), timeout=3)
    assert sess.ended and not server.registry.sessions
    fed = sum(gate.steps.values())
    assert fed < 1000 and server.registry.scheduler.backlog({sess.id}) == 0
    t0 = time.monotonic()
    with ws_open(server, KEY_B) as other:  # another key is served at once
        open_session(other)
        other.send(Token(4).encode())
        assert frames.decode_downlink(other.recv(timeout=10)).position == 1
    assert time.monotonic() - t0 < 3
    assert sum(gate.steps.values()) - fed < 10  # nothing more ran for the dropped replay


def test_replays_of_one_key_do_not_hold_up_another_key(server):
    gate = gated(server, delay=0.002)
    replays = [ws_open(server, KEY_A) for _ in range(4)]
    for ws in replays:
        ws.send(Open([1, 2, 3], 8, 2000, generated=[7] * 1999).encode())
    wait_until(lambda: len(gate.steps) == 4)
    ticks = server.registry.scheduler.ticks
    with ws_open(server, KEY_B) as other:
        open_session(other, max_new=12)
        for _ in range(10):
            other.send(Token(4).encode())
            other.recv(timeout=10)
    # an OPEN and ten tokens in a few ticks each (a tick answers every waiting session, and the
    # client's round trip spans a tick or two), beside 4 replays of 1,999 tokens each
    assert server.registry.scheduler.ticks - ticks <= 40
    assert all(n < 1000 for n in gate.steps.values())
    for ws in replays:
        ws.close()
    wait_until(lambda: not server.registry.sessions)


def test_kv_memory_is_bounded_in_total(tiny_llm):
    srv = ThreadServer(tiny_llm, max_prompt_tokens=20, max_new_tokens=40, max_kv_tokens=100,
                       max_backlog_tokens_per_key=60, max_sessions=12, max_sessions_per_key=6)  # fmt: skip
    try:
        first, second = ws_open(srv, KEY_A), ws_open(srv, KEY_B)
        open_session(first, prompt=[1] * 5, max_new=40)  # 45 KV tokens reserved
        open_session(second, prompt=[1] * 5, max_new=40)  # 90
        for key in (KEY_A, KEY_B):  # far below the session limits, but the memory is taken
            with ws_open(srv, key) as ws:
                ws.send(Open([1] * 5, 8, 40).encode())
                closed_with(ws, frames.CLOSE_BUSY, "90 of 100 KV tokens reserved, this session needs 45")
        with ws_open(srv, KEY_A) as small:  # a smaller session still fits
            open_session(small, prompt=[1] * 2, max_new=8)
        first.close()
        wait_until(lambda: len(srv.registry.sessions) == 1)
        with ws_open(srv, KEY_B) as ws:  # freed memory is reserved again
            open_session(ws, prompt=[1] * 5, max_new=40)
        second.close()
    finally:
        srv.stop()


def test_a_keys_queued_prompt_and_replay_work_is_bounded(tiny_llm):
    srv = ThreadServer(tiny_llm, max_prompt_tokens=20, max_new_tokens=40, max_backlog_tokens_per_key=60)
    gate = gated(srv)
    try:
        gate.open.clear()  # nothing runs: the work stays queued
        a1, a2, b = ws_open(srv, KEY_A), ws_open(srv, KEY_A), ws_open(srv, KEY_B)
        a1.send(Open([1] * 10, 8, 40, generated=[2] * 30).encode())  # 40 tokens queued for key A
        wait_until(lambda: len(srv.registry.sessions) == 1)
        a2.send(Open([1] * 10, 8, 40, generated=[2] * 20).encode())  # 30 more: over 60
        closed_with(a2, frames.CLOSE_BUSY, "this key has 40 prompt and replay tokens waiting (limit 60)")
        b.send(Open([1] * 10, 8, 40, generated=[2] * 20).encode())  # another key's budget is its own
        gate.open.set()
        for ws in (a1, b):
            assert isinstance(frames.decode_downlink(ws.recv(timeout=10)), frames.Ready)
            ws.close()
    finally:
        gate.open.set()
        srv.stop()


def test_limits_that_cannot_hold_one_session_are_refused():
    from costeer.cloud import ServerSettings

    with pytest.raises(ValueError, match="max_kv_tokens .* must hold one largest session"):
        ServerSettings(api_keys=frozenset({"k"}), max_prompt_tokens=100, max_new_tokens=100, max_kv_tokens=150)
    with pytest.raises(ValueError, match="max_backlog_tokens_per_key"):
        ServerSettings(api_keys=frozenset({"k"}), max_backlog_tokens_per_key=10)


def test_a_message_before_ready_is_out_of_order(server):
    gate = gated(server)
    gate.open.clear()
    with ws_open(server, KEY_A) as ws:
        ws.send(Open([1, 2, 3], 8, 5).encode())
        wait_until(lambda: gate.running)
        ws.send(Token(1).encode())
        gate.open.set()
        closed_with(ws, frames.CLOSE_ORDER, "before READY")
    wait_until(lambda: not server.registry.sessions)


@pytest.mark.real
def test_delete_during_a_llamacpp_replay_does_not_crash(smollm2_cpp):
    """The crash this guards against: DELETE freed the llama.cpp context under a running replay."""
    srv = ThreadServer(smollm2_cpp, max_prompt_tokens=64, max_new_tokens=512, max_kv_tokens=2048)
    try:
        ws = ws_open(srv, KEY_A)
        ws.send(Open([1, 2, 3], 8, 400, generated=[28] * 300).encode())
        wait_until(lambda: srv.registry.sessions)
        sess = session_of(srv, KEY_A)
        wait_until(lambda: srv.registry.scheduler.holds(sess.id), timeout=60)  # its forwards have begun
        assert get(srv, f"/v1/sessions/{sess.id.hex()}", KEY_A, "DELETE").status_code == 200
        closed_with(ws, frames.CLOSE_ENDED)
        wait_until(lambda: not srv.registry.scheduler.holds(sess.id), timeout=60)
        with ws_open(srv, KEY_B) as other:  # the server is alive and serves the next session
            open_session(other)
            other.send(Token(28).encode())
            assert frames.decode_downlink(other.recv(timeout=60)).position == 1
    finally:
        srv.stop()


def test_sessions_stepped_in_one_tick_share_one_forward_and_get_what_they_get_alone(server, tiny_llm):
    """Sessions of different prompt lengths whose tokens wait for the same tick: one forward of the
    model for the three waiting steps (transformers: the sessions' caches in one padded batch), and
    each session's distribution the one it gets alone, within rounding."""
    prompts = [[1, 2, 3], list(range(4, 20)), list(range(30, 39)), list(range(40, 45))]

    def first_step(ws, prompt):
        open_session(ws, prompt, k=8)
        ws.send(Token(5).encode())
        return frames.decode_downlink(ws.recv(timeout=10))

    want = []
    for prompt in prompts:
        with ws_open(server, KEY_A) as ws:
            want.append(first_step(ws, prompt))
    gate = gated(server)
    socks = [ws_open(server, key) for key in (KEY_A, KEY_A, KEY_B, KEY_B)]
    ids = [open_session(ws, p, k=8)[0].session_id for ws, p in zip(socks, prompts)]
    gate.open.clear()
    gate.holding.clear()
    socks[0].send(Token(5).encode())
    assert gate.holding.wait(10)  # session 0's step holds the scheduler ...
    for ws in socks[1:]:
        ws.send(Token(5).encode())
    wait_until(lambda: server.registry.scheduler.backlog(set(ids[1:])) == 3)  # ... while the others wait
    rows = []
    hook = tiny_llm.model.register_forward_hook(lambda _m, _a, kw, _o: rows.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)  # fmt: skip
    try:
        gate.open.set()
        got = [frames.decode_downlink(ws.recv(timeout=10)) for ws in socks]
    finally:
        hook.remove()
        for ws in socks:
            ws.close()
    assert rows == [1, 3]
    for g, w in zip(got, want):
        assert g.position == w.position and torch.equal(g.ids, w.ids)
        assert (g.logp - w.logp).abs().max().item() <= 1e-4


def test_steps_sent_a_little_apart_are_gathered_into_one_forward(server, tiny_llm, monkeypatch):
    """Three sessions mid-generation whose devices answer 50 ms apart: the first step's tick waits
    for the other two (the transformers pool says batching pays from 3 rows), one forward for all."""
    # the tiny model's step is ~ms; set on the module's server for this test only
    monkeypatch.setattr(server.registry.scheduler, "gather", Gather(share=1000.0, cap_s=0.5, quiet_s=5.0))
    socks = [ws_open(server, key) for key in (KEY_A, KEY_A, KEY_B)]
    for ws, prompt in zip(socks, ([1, 2, 3], [4, 5, 6, 7], [8, 9, 10])):
        open_session(ws, prompt, k=8)
        ws.send(Token(5).encode())  # one step each: the window follows the last step's time
        frames.decode_downlink(ws.recv(timeout=10))
    rows = []
    hook = tiny_llm.model.register_forward_hook(lambda _m, _a, kw, _o: rows.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)  # fmt: skip
    try:
        for ws in socks:
            ws.send(Token(6).encode())
            time.sleep(0.05)
        got = [frames.decode_downlink(ws.recv(timeout=10)) for ws in socks]
    finally:
        hook.remove()
        for ws in socks:
            ws.close()
    assert rows == [3] and all(isinstance(g, frames.Dist) for g in got)
