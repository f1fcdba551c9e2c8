"""Streamed look-ahead rounds against hostile clients (tiny LLM): a device that floods uplinks and
never reads, uplinks mid-round in a tight loop, tokens naming nodes the cloud has not sent, ATTACH
with wrong counts mid-round, a bad streamed flag, a drop right after OPEN and a DELETE while the
levels go out. Each must leave no session, scheduler job, tree node or outbox frame behind."""

import struct
import time

import pytest
from websockets.exceptions import ConnectionClosed

from costeer import frames
from costeer.frames import Attach, Lookahead, Open, Token, Tokens
from tests.cloud.server_util import KEY_A, KEY_B, RawClient, ThreadServer, wait_until
from tests.cloud.test_server import closed_with, get
from tests.cloud.test_server_lookahead import ws_open

DEEP = Lookahead(frames.LOOKAHEAD_FIXED, 12, 13, streamed=True)  # a chain of 12 levels


def closes(ws, code, reason_part=""):
    """closed_with past a round's frames still on their way."""
    with pytest.raises(ConnectionClosed) as e:
        for _ in range(100):
            ws.recv(timeout=10)
    assert e.value.rcvd is not None and e.value.rcvd.code == code and reason_part in e.value.rcvd.reason, e.value.rcvd


def freed(server) -> None:
    """Nothing of any session is left: registry, scheduler jobs and sequences, pool trees."""
    sched = server.registry.scheduler
    wait_until(lambda: not server.registry.sessions)
    wait_until(lambda: not sched._jobs and not sched._seqs and not sched.pool.trees)


@pytest.fixture(autouse=True)
def pumps_must_stop(monkeypatch):
    """A closing connection waits up to 60 s for its cancelled pump instead of 1: a pump that drops its
    cancel (asyncio.wait_for's race, cloud/net.py `within`) would hold every close here past the
    clients' 10 s waits."""
    from costeer.cloud import server as server_module

    monkeypatch.setattr(server_module, "PUMP_STOP_S", 60.0)


@pytest.fixture
def slow_levels(server, monkeypatch):
    """Each level takes 0.1 s: a deep round is still growing when the uplinks come."""
    pool = server.registry.scheduler.pool
    grow = pool.grow
    monkeypatch.setattr(pool, "grow", lambda rows, stop=None: (time.sleep(0.1), grow(rows, stop))[1])


def open_streamed(ws, lookahead=DEEP, max_new=40) -> frames.Level:
    """OPEN a streamed session -> the first round's root frame."""
    ws.send(Open([1, 2, 3], frames.FULL, max_new, lookahead=lookahead).encode())
    assert isinstance(frames.decode_downlink(ws.recv(timeout=10)), frames.Ready)
    root = frames.decode_downlink(ws.recv(timeout=10))
    assert isinstance(root, frames.Level) and root.first == 0
    return root


def read_to(ws, position: int) -> frames.Level | frames.Dist:
    """Skip the frames of rounds left behind -> the first frame of the round at `position` (a plain DIST
    when the round is its root alone: one replayed after ATTACH stopped it before its first level)."""
    while (msg := frames.decode_downlink(ws.recv(timeout=10))).position < position:
        pass
    assert msg.position == position and getattr(msg, "first", 0) == 0
    return msg


def test_a_device_that_floods_uplinks_and_reads_nothing_is_dropped_with_a_bounded_outbox(tiny_llm):
    """It sends TOKEN after TOKEN and never reads: each would start a round whose frames wait in the
    outbox. The cloud starts no round while a whole round's frames still wait, and drops the
    connection after send_timeout_s (before the fix: hundreds of frames queued, all tokens fed)."""
    srv = ThreadServer(tiny_llm, send_timeout_s=1.0, idle_timeout_s=30)
    try:
        c = RawClient(srv.port, rcvbuf=4096)
        chain = Lookahead(frames.LOOKAHEAD_FIXED, 3, 4, streamed=True)
        c.send(Open([1, 2, 3], frames.FULL, 2048, lookahead=chain).encode())
        while not c.messages:  # READY
            c.read()
        sess = next(iter(srv.registry.sessions.values()))
        for _ in range(2000):
            c.send(Token(5).encode())
        most = 0
        deadline = time.monotonic() + 60
        while sess.websocket is not None and sess.position < 2000 and time.monotonic() < deadline:
            most = max(most, sess.outbox.queue.qsize())
            time.sleep(0.01)
        assert most <= 2 * (chain.depth + 1), most  # a round's frames waiting, and the next round's (before: hundreds)
        assert sess.websocket is None and sess.position < 2000  # dropped: it stopped reading
        c.close()
        srv.registry.end(sess, "test over")
        freed(srv)
    finally:
        srv.stop()


def test_thousands_of_uplinks_mid_round_while_a_deep_round_grows(server, tiny_llm, slow_levels):
    """A device that reads everything but answers each root at once, many times, while deep rounds
    grow: each uplink stops its round, the frames of left rounds come first, and all is freed."""
    with ws_open(server) as ws:
        open_streamed(ws, max_new=40)
        for i in range(39):
            ws.send(Token((7 * i) % tiny_llm.vocab_size).encode())
            read_to(ws, i + 1)
        ws.send(Token(1).encode())
        read_to(ws, 40)
    freed(server)


def test_tokens_naming_announced_nodes_not_yet_computed(server, tiny_llm, slow_levels):
    """The root announces the chain's next token; the device names it twice and one more at once,
    before those levels came: the cloud keeps the path only if they were computed (then it is
    exact), else it closes with 4413 (the tree is not that deep) or 4422 (not a node of it)."""
    with ws_open(server) as ws:
        root = open_streamed(ws)
        ws.send(Tokens((root.tokens[0], root.tokens[0], 9)).encode())
        try:
            while (msg := frames.decode_downlink(ws.recv(timeout=10))).position == 0:
                pass
            assert msg.position == 3
        except ConnectionClosed as e:
            assert e.rcvd is not None and e.rcvd.code in (frames.CLOSE_TOO_LARGE, frames.CLOSE_INVALID), e.rcvd
    freed(server)


def test_tokens_off_the_tree_followed_by_more_mid_round(server, tiny_llm, slow_levels):
    with ws_open(server) as ws:
        root = open_streamed(ws)
        frames.decode_downlink(ws.recv(timeout=10))  # level 1: the tree allows two tokens now
        off = (root.tokens[0] + 1) % tiny_llm.vocab_size
        ws.send(Tokens((off, 4)).encode())
        closes(ws, frames.CLOSE_INVALID, "off the round's tree")
    freed(server)


@pytest.mark.parametrize("n_generated, pending", [(5, ()), (2, (4,)), (1, (4, 5, 6))])
def test_attach_mid_round_with_wrong_counts_is_refused_and_frees(server, tiny_llm, slow_levels, n_generated, pending):
    with ws_open(server) as ws:
        ws.send(Open([1, 2, 3], frames.FULL, 40, lookahead=DEEP).encode())
        sid = frames.decode_downlink(ws.recv(timeout=10)).session_id
        frames.decode_downlink(ws.recv(timeout=10))  # the root; the round still grows
        with ws_open(server) as ws2:
            ws2.send(Attach(sid, n_generated, pending=pending).encode())
            closes(ws2, frames.CLOSE_ORDER, "out of step")
        closes(ws, frames.CLOSE_ORDER, "taken over")
    freed(server)


def test_attach_mid_round_with_the_lost_tokens_goes_on(server, tiny_llm, slow_levels):
    with ws_open(server) as ws:
        ws.send(Open([1, 2, 3], frames.FULL, 40, lookahead=DEEP).encode())
        sid = frames.decode_downlink(ws.recv(timeout=10)).session_id
        root = frames.decode_downlink(ws.recv(timeout=10))
        frames.decode_downlink(ws.recv(timeout=10))  # level 1: the device has node 1 (a level not sent is not kept)
        with ws_open(server) as ws2:
            ws2.send(Attach(sid, 2, pending=(root.tokens[0], 6)).encode())
            assert frames.decode_downlink(ws2.recv(timeout=10)).position == 2
            assert read_to(ws2, 2).position == 2
    freed(server)


def test_a_streamed_flag_without_look_ahead_or_above_the_limits_is_refused(server):
    v1 = bytearray(Open([1, 2, 3], frames.FULL, 5).encode())
    struct.pack_into("<H", v1, 2, frames.FLAG_STREAMED)
    cases = [(bytes(v1), frames.CLOSE_MALFORMED),
             (Open([1], 0, 5, lookahead=Lookahead(frames.LOOKAHEAD_AUTO, 17, 9, streamed=True)).encode(), frames.CLOSE_TOO_LARGE),
             (Open([1], 0, 5, lookahead=Lookahead(frames.LOOKAHEAD_FIXED, 4, 65, streamed=True)).encode(), frames.CLOSE_TOO_LARGE)]  # fmt: skip
    off = bytearray(cases[1][0])
    off[20] = frames.LOOKAHEAD_OFF  # mode 0 in a version-2 OPEN
    cases.append((bytes(off), frames.CLOSE_MALFORMED))
    for data, code in cases:
        with ws_open(server) as ws:
            ws.send(data)
            closes(ws, code)
    freed(server)


@pytest.mark.parametrize("clean", [True, False])
def test_a_socket_closed_right_after_a_streamed_open(server, slow_levels, clean):
    """Closed (1000) or dropped without a close frame while its first round grows: the round's job
    leaves the scheduler; a dropped session waits for ATTACH and is freed when DELETEd."""
    c = RawClient(server.port)
    c.send(Open([1, 2, 3], frames.FULL, 40, lookahead=DEEP).encode())
    while not c.messages:
        c.read()
    sid = frames.decode_downlink(c.messages[0]).session_id.hex()
    if clean:
        c.proto.send_close(frames.CLOSE_NORMAL)
        c._flush()
    c.close()
    if not clean:
        wait_until(lambda: not server.registry.sessions[bytes.fromhex(sid)].attached)
        wait_until(lambda: not server.registry.scheduler._jobs, timeout=10)  # the round grew to its end
        assert get(server, f"/v1/sessions/{sid}", KEY_A, "DELETE").status_code == 200
    freed(server)


def test_delete_while_the_levels_go_out(server, slow_levels):
    with ws_open(server) as ws:
        ws.send(Open([1, 2, 3], frames.FULL, 40, lookahead=DEEP).encode())
        sid = frames.decode_downlink(ws.recv(timeout=10)).session_id.hex()
        frames.decode_downlink(ws.recv(timeout=10))
        frames.decode_downlink(ws.recv(timeout=10))  # a level: the round is growing
        assert get(server, f"/v1/sessions/{sid}", KEY_A, "DELETE").status_code == 200
        closes(ws, frames.CLOSE_ENDED)
    freed(server)


def test_attach_while_the_old_connection_stops_its_round(server, tiny_llm, monkeypatch):
    """The old connection's TOKEN waits for the level under way (stop_round) when a new connection
    re-attaches with that token as pending: only one of them may advance the session; the new one
    gets READY and the round at the next position, and nothing fails (before the fix: both
    submitted a job, 1011 and the session ended as an internal error)."""
    pool = server.registry.scheduler.pool
    grow = pool.grow
    monkeypatch.setattr(pool, "grow", lambda rows, stop=None: (time.sleep(0.4), grow(rows, stop))[1])
    with ws_open(server) as ws:
        ws.send(Open([1, 2, 3], frames.FULL, 40, lookahead=DEEP).encode())
        sid = frames.decode_downlink(ws.recv(timeout=10)).session_id
        frames.decode_downlink(ws.recv(timeout=10))  # the root; its first level is under way
        ws.send(Token(6).encode())
        time.sleep(0.05)  # the cloud has it and waits for the level to finish
        with ws_open(server) as ws2:
            ws2.send(Attach(sid, 1, pending=(6,)).encode())
            ready = frames.decode_downlink(ws2.recv(timeout=10))
            assert isinstance(ready, frames.Ready) and ready.position == 1
            assert read_to(ws2, 1).position == 1
            assert server.registry.sessions[sid].position == 1
    freed(server)



def test_many_devices_at_once_half_of_them_never_reading(tiny_llm):
    """Eight streamed sessions flood uplinks and read nothing while eight honest devices, each on its own
    thread, walk 29 rounds: every honest one finishes, and once the silent ones go (and the idle timeout
    passes for those dropped without a close) nothing of any session is left."""
    import threading

    srv = ThreadServer(tiny_llm, send_timeout_s=1.0, idle_timeout_s=3, max_sessions=40, max_sessions_per_key=20)
    chain = Lookahead(frames.LOOKAHEAD_FIXED, 3, 4, streamed=True)
    try:
        silent = [RawClient(srv.port, key=KEY_B, rcvbuf=4096) for _ in range(8)]
        for c in silent:
            c.send(Open([1, 2, 3], frames.FULL, 400, lookahead=chain).encode())
        for c in silent:
            for _ in range(200):
                c.send(Token(5).encode())
        finished, errors = [], []

        def honest(i: int) -> None:
            try:
                with ws_open(srv) as ws:
                    ws.send(Open([1, 2, 3 + i], frames.FULL, 30, lookahead=chain).encode())
                    assert isinstance(frames.decode_downlink(ws.recv(timeout=10)), frames.Ready)
                    position = 0
                    while position < 29:
                        msg = frames.decode_downlink(ws.recv(timeout=10))
                        if msg.position == position and msg.first == 0:  # a round's root: answer its greedy token
                            ws.send(Token(int(msg.dists[0].logp.argmax())).encode())
                            position += 1
                    finished.append(i)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=honest, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(finished) == list(range(8)) and not errors, errors
        for c in silent:
            c.close()
        wait_until(lambda: not srv.registry.sessions, timeout=30)
        freed(srv)
    finally:
        srv.stop()
