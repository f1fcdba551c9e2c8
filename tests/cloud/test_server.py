"""The cloud service on 127.0.0.1 with a tiny LLM: keys, session isolation, limits, and a
documented error for every bad input while a concurrent healthy session completes."""

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import socket
import threading
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from costeer import frames
from costeer.api import CoSteer
from costeer.cloud import ServerSettings, read_api_keys
from costeer.device import CloudError, connect_cloud
from costeer.frames import Attach, Open, Token
from tests.cloud.server_util import KEY_A, KEY_B, RawClient, ThreadServer, wait_until
from tests.tiny import bpe_tokenizer, llama, make_lm

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam, I live in Seattle and I like spicy tofu and long runs on Sunday morning"
N = 30


def ws_open(server, key=KEY_A):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return connect(server.url + "/v1/stream", additional_headers=headers, compression=None, proxy=None, legacy=True)


def open_session(ws, prompt=(1, 2, 3), k=8, max_new=5):
    ws.send(Open(list(prompt), k, max_new).encode())
    ready = frames.decode_downlink(ws.recv(timeout=10))
    dist = frames.decode_downlink(ws.recv(timeout=10))
    assert isinstance(ready, frames.Ready) and isinstance(dist, frames.Dist)
    return ready, dist


def closed_with(ws, code, reason_part=""):
    with pytest.raises(ConnectionClosed) as e:
        for _ in range(10):
            ws.recv(timeout=10)
    assert e.value.rcvd is not None, "closed without a close frame"
    assert e.value.rcvd.code == code, e.value.rcvd
    assert reason_part in e.value.rcvd.reason
    return e.value.rcvd.reason


def get(server, path, key=KEY_A, method="GET"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.http + path, headers=headers, timeout=10, trust_env=False)


@pytest.fixture(scope="module")
def reference(tiny_llm, tiny_slm):
    return CoSteer(tiny_llm, tiny_slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids


# ---------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------


def test_health_needs_no_key_but_everything_else_does(server):
    assert get(server, "/v1/health", key=None).json() == {"status": "ok"}
    for key in (None, "wrong-key"):
        for path in ("/v1/info", "/v1/tokenizer", "/v1/sessions", "/v1/sessions/00"):
            r = get(server, path, key=key)
            assert r.status_code == 401 and r.json() == {"error": "missing or invalid API key"}
            assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", [None, "wrong-key", ""])
def test_websocket_without_a_valid_key_is_refused_with_401(server, key):
    with pytest.raises(InvalidStatus) as e:
        ws_open(server, key)
    assert e.value.response.status_code == 401
    assert b"missing or invalid API key" in e.value.response.body


def test_info_and_tokenizer(server, tiny_llm):
    info = get(server, "/v1/info").json()
    assert info["vocab_size"] == tiny_llm.vocab_size
    assert info["stop_ids"] == sorted(tiny_llm.stop_ids)
    assert info["tokenizer_fingerprint"] == frames.tokenizer_fingerprint(tiny_llm.tokenizer)
    assert info["frame_version"] == frames.VERSION
    files = get(server, "/v1/tokenizer").json()["files"]
    assert "tokenizer.json" in files


def test_the_tokenizer_answer_is_made_once_off_the_event_loop(tiny_llm, monkeypatch):
    """Gemma-3's tokenizer answer is about 40 MB of JSON, ~0.2 s to encode: encoded per request in the
    event loop every session's frames go through, a key holder asking for it in a loop stalled them all."""
    from starlette.responses import JSONResponse

    from costeer.cloud import server as server_module

    made, rendered, loops = [], [], []
    files = server_module.tokenizer_files

    def counted_files(tok):
        made.append(1)
        with contextlib.suppress(RuntimeError):
            loops.append(asyncio.get_running_loop())  # none: it ran in a worker thread
        return files(tok)

    render = JSONResponse.render
    monkeypatch.setattr(server_module, "tokenizer_files", counted_files)
    monkeypatch.setattr(JSONResponse, "render", lambda self, content: rendered.append(1) or render(self, content))
    srv = ThreadServer(tiny_llm)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: get(srv, "/v1/tokenizer"), range(4)))
    finally:
        srv.stop()
    assert all(a.status_code == 200 and a.content == answers[0].content for a in answers)
    assert answers[0].json() == {"fingerprint": frames.tokenizer_fingerprint(tiny_llm.tokenizer),
                                 "files": files(tiny_llm.tokenizer)}  # fmt: skip
    assert len(made) == 1 and not loops and not rendered


def test_keys_come_from_env_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nfile-key-1\n\nfile-key-2  # trailing\n")
    assert read_api_keys("a, b,,", f) == {"a", "b", "file-key-1", "file-key-2"}
    with pytest.raises(ValueError, match="no API keys"):
        ServerSettings(api_keys=read_api_keys("", None))
    with pytest.raises(FileNotFoundError):
        read_api_keys(None, tmp_path / "missing")


def test_a_key_cannot_read_attach_or_end_another_keys_session(server):
    with ws_open(server, KEY_A) as ws:
        ready, _ = open_session(ws)
        sid = ready.session_id.hex()
        assert get(server, f"/v1/sessions/{sid}", KEY_A).json()["position"] == 0
        assert get(server, f"/v1/sessions/{sid}", KEY_A).json()["frames"] == "topk"
        # key B: the session does not exist for it
        assert get(server, f"/v1/sessions/{sid}", KEY_B).status_code == 404
        assert get(server, f"/v1/sessions/{sid}", KEY_B).json() == {"error": "unknown session"}
        assert get(server, f"/v1/sessions/{sid}", KEY_B, "DELETE").status_code == 404
        assert sid not in [s["id"] for s in get(server, "/v1/sessions", KEY_B).json()["sessions"]]
        assert sid in [s["id"] for s in get(server, "/v1/sessions", KEY_A).json()["sessions"]]
        with ws_open(server, KEY_B) as other:
            other.send(Attach(ready.session_id, 0).encode())
            closed_with(other, frames.CLOSE_UNKNOWN_SESSION, "unknown session")
        # the session was untouched by all that and still advances
        ws.send(Token(5).encode())
        assert frames.decode_downlink(ws.recv(timeout=10)).position == 1
        # a second connection of the owner takes it over (a device whose connection died
        # before the server noticed); the first is closed with 4409
        with ws_open(server, KEY_A) as second:
            second.send(Attach(ready.session_id, 1, 5).encode())
            assert frames.decode_downlink(second.recv(timeout=10)).position == 1
            assert frames.decode_downlink(second.recv(timeout=10)).position == 1
            closed_with(ws, frames.CLOSE_ORDER, "taken over")
            second.send(Token(6).encode())
            assert frames.decode_downlink(second.recv(timeout=10)).position == 2
            # its owner can end it: the socket is closed with 4410
            assert get(server, f"/v1/sessions/{sid}", KEY_A, "DELETE").status_code == 200
            closed_with(second, frames.CLOSE_ENDED, "ended by its owner")
    assert get(server, f"/v1/sessions/{sid}", KEY_A).status_code == 404


def test_session_ids_are_random_and_malformed_ids_are_404(server):
    assert get(server, "/v1/sessions/not-hex").status_code == 404
    assert get(server, f"/v1/sessions/{secrets.token_hex(16)}").status_code == 404


# ---------------------------------------------------------------------------------------
# Bad inputs, each while a healthy session of another key is mid-generation
# ---------------------------------------------------------------------------------------

def _oversize(server):
    return b"\x01" * (server.settings.max_uplink_bytes + 16)


BAD = {
    "text frame": ([lambda s: "hello"], frames.CLOSE_MALFORMED, "binary frames"),
    "one byte": ([lambda s: b"\x01"], frames.CLOSE_MALFORMED, "too short"),
    "wrong version": ([lambda s: b"\x09\x03\x00\x00\x00\x00"], frames.CLOSE_VERSION, "unsupported frame version 9"),
    "unknown type": ([lambda s: b"\x01\x55\x00\x00\x00"], frames.CLOSE_MALFORMED, "unknown uplink message type"),
    "truncated OPEN": ([lambda s: Open([1, 2, 3]).encode()[:-1]], frames.CLOSE_MALFORMED, "does not match"),
    "TOKEN before OPEN": ([lambda s: Token(1).encode()], frames.CLOSE_ORDER, "TOKEN before OPEN"),
    "OPEN twice": (["open", lambda s: Open([1], max_new_tokens=5).encode()], frames.CLOSE_ORDER, "already has a session"),
    "token id out of range": (["open", lambda s: Token(s.registry.lm.vocab_size + 5).encode()], frames.CLOSE_INVALID, "outside the vocabulary"),
    "prompt id out of range": ([lambda s: Open([1, s.registry.lm.vocab_size], max_new_tokens=5).encode()], frames.CLOSE_INVALID, "outside the vocabulary"),
    "empty prompt": ([lambda s: Open([], max_new_tokens=5).encode()], frames.CLOSE_INVALID, "prompt is empty"),
    "oversize prompt": ([lambda s: Open([1] * 65, max_new_tokens=5).encode()], frames.CLOSE_TOO_LARGE, "exceeds the limit of 64"),
    "max_new_tokens over limit": ([lambda s: Open([1], max_new_tokens=41).encode()], frames.CLOSE_TOO_LARGE, "limit of 40"),
    "past max_new_tokens": (["open2", lambda s: Token(1).encode()], frames.CLOSE_TOO_LARGE, "reached its 2 new tokens"),
    "unknown session": ([lambda s: Attach(secrets.token_bytes(16), 0).encode()], frames.CLOSE_UNKNOWN_SESSION, "unknown"),
    "message too big": ([_oversize], 1009, ""),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_its_error_and_a_healthy_session_completes(case, server, tiny_slm, reference):
    steps, code, reason = BAD[case]
    healthy = CoSteer(connect_cloud(server.url, api_key=KEY_B, k="full"), tiny_slm)
    stream = healthy.stream(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    it = iter(stream)
    head = [next(it) for _ in range(3)]
    with ws_open(server, KEY_A) as ws:
        for step in steps:
            if step == "open":
                open_session(ws)
            elif step == "open2":
                open_session(ws, max_new=2)
                for _ in range(2):
                    ws.send(Token(1).encode())
                    ws.recv(timeout=10)
            else:
                ws.send(step(server))
        closed_with(ws, code, reason)
    rest = list(it)
    assert len(head) + len(rest) == len(reference)
    assert stream.generation.token_ids == reference
    wait_until(lambda: not server.registry.sessions)


def test_too_many_sessions_per_key(server):
    limit = server.settings.max_sessions_per_key
    conns = [ws_open(server, KEY_A) for _ in range(limit + 1)]
    try:
        for ws in conns[:limit]:
            open_session(ws)
        conns[limit].send(Open([1], max_new_tokens=5).encode())
        closed_with(conns[limit], frames.CLOSE_BUSY, f"limit {limit}")
        with ws_open(server, KEY_B) as other:  # another key still gets in
            open_session(other)
    finally:
        for ws in conns:
            ws.close()
    wait_until(lambda: not server.registry.sessions)


# ---------------------------------------------------------------------------------------
# Idle sessions
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_server(tiny_llm):
    srv = ThreadServer(tiny_llm, idle_timeout_s=1.0)
    yield srv
    srv.stop()


def test_an_idle_attached_session_is_closed_and_evicted(quick_server):
    with ws_open(quick_server) as ws:
        open_session(ws)
        assert len(quick_server.registry.sessions) == 1
        closed_with(ws, frames.CLOSE_IDLE, "idle for more than 1 s")
    assert not quick_server.registry.sessions


def test_a_dropped_session_waits_for_attach_then_is_evicted(quick_server):
    ws = ws_open(quick_server)
    ready, dist = open_session(ws)
    sess = quick_server.registry.sessions[ready.session_id]
    ws.socket.shutdown(socket.SHUT_RDWR)  # an abrupt drop: no close frame
    ws.close()
    wait_until(lambda: not sess.attached)
    assert not sess.ended and quick_server.registry.scheduler.holds(sess.id)
    # re-attaching within the timeout gets the same frame back
    with ws_open(quick_server) as again:
        again.send(Attach(ready.session_id, 0).encode())
        assert frames.decode_downlink(again.recv(timeout=10)).session_id == ready.session_id
        assert frames.decode_downlink(again.recv(timeout=10)).ids.tolist() == dist.ids.tolist()
        again.socket.shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + 5
    while quick_server.registry.sessions and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not quick_server.registry.sessions
    assert sess.ended
    wait_until(lambda: not quick_server.registry.scheduler.holds(sess.id))  # the KV cache is released


def test_server_logs_hold_no_token_text(server, caplog):
    caplog.set_level("DEBUG", logger="costeer.cloud")
    with ws_open(server, KEY_A) as ws:
        open_session(ws, prompt=(11, 12, 13))
    wait_until(lambda: "ended" in caplog.text)
    assert "opened" in caplog.text and "11, 12, 13" not in caplog.text and KEY_A not in caplog.text


def test_no_route_takes_anything_but_token_ids(server):
    """The whole surface: no route or message type could carry context, SLM outputs or deltas."""
    routes = {(getattr(r, "path", None), tuple(sorted(getattr(r, "methods", None) or ["WS"]))) for r in server.app.routes}
    assert routes == {
        ("/v1/stream", ("WS",)),
        ("/v1/health", ("GET",)),
        ("/v1/info", ("GET",)),
        ("/v1/tokenizer", ("GET",)),
        ("/v1/sessions", ("GET",)),
        ("/v1/sessions/{sid}", ("GET",)),
        ("/v1/sessions/{sid}", ("DELETE",)),
    }
    uplink = {frames.VERSION: {frames.OPEN, frames.ATTACH, frames.TOKEN},
              frames.LOOKAHEAD_VERSION: {frames.OPEN, frames.ATTACH, frames.TOKENS}}  # TOKENS: token ids only
    for version, types in uplink.items():
        for t in range(256):
            data = bytes([version, t]) + b"\x00" * 64
            if t not in types:
                with pytest.raises(frames.FrameError, match="unknown uplink message type|unsupported frame version"):
                    frames.decode_uplink(data)


def test_the_cloud_never_imports_the_device():
    from pathlib import Path

    import costeer

    import ast

    root = Path(costeer.__file__).parent
    for f in [*(root / "cloud").glob("*.py"), root / "frames.py"]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith(("costeer.device", "costeer.api", "costeer.cli")) for n in names), f


def test_a_packed_session_answers_with_packed_frames(server):
    with ws_open(server, KEY_A) as ws:
        ws.send(Open([1, 2, 3], 300, 3, packed=True).encode())
        ready = frames.decode_downlink(ws.recv(timeout=10))
        raw = ws.recv(timeout=10)
        assert raw[2] == frames.TOPK_PACKED
        dist = frames.decode_downlink(raw)
        assert 0 < dist.ids.numel() <= 300 and dist.width is not None
        assert get(server, f"/v1/sessions/{ready.session_id.hex()}", KEY_A).json()["frames"] == "packed"
        ws.send(frames.Token(int(dist.ids[0])).encode())
        assert frames.decode_downlink(ws.recv(timeout=10)).position == 1


# ---------------------------------------------------------------------------------------
# Peers that stop reading, close early, or put keys in the URL
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_server():
    """Full frames of a 65,536-wide vocabulary (256 KB each): a few fill every buffer on the way."""
    tok = bpe_tokenizer()
    srv = ThreadServer(make_lm("wide", llama(65_536, seed=3), tok), idle_timeout_s=1.0, send_timeout_s=1.0)
    yield srv
    srv.stop()


def test_a_client_that_never_reads_blocks_neither_eviction_nor_other_sessions(wide_server):
    srv = wide_server
    hostile = RawClient(srv.port, KEY_A, rcvbuf=4096)
    try:
        hostile.send(Open([1, 2, 3], frames.FULL, 40).encode())
        for _ in range(39):  # pipelined, and not one answer read
            hostile.send(Token(5).encode())
        wait_until(lambda: len(srv.registry.sessions) == 1)
        # another key's session still gets its frames, and is evicted when it idles
        with ws_open(srv, KEY_B) as ws:
            open_session(ws, k=8, max_new=5)
            ws.send(Token(7).encode())
            assert frames.decode_downlink(ws.recv(timeout=10)).position == 1
            closed_with(ws, frames.CLOSE_IDLE, "idle for more than 1 s")
        # the hostile session is evicted and its socket released, though it never read a byte
        wait_until(lambda: not srv.registry.sessions, timeout=10)
        wait_until(lambda: not srv.server.server_state.connections, timeout=10)
    finally:
        hostile.close()


@pytest.fixture
def held_prefill(server, monkeypatch):
    """OPEN's prefill waits for `release` (set by the test), `started` once it is under way."""
    started, release = threading.Event(), threading.Event()
    start = server.registry.start

    async def held(sess):
        started.set()
        await asyncio.to_thread(release.wait, 10)
        return await start(sess)

    monkeypatch.setattr(server.registry, "start", held)
    yield started, release
    release.set()


def test_close_1000_before_ready_ends_the_session(server, held_prefill):
    """docs/wire-format.md: a device close with 1000 ends the session at once, also while its
    OPEN is still being served (here the prefill is held until the device has closed)."""
    started, release = held_prefill
    ws = ws_open(server, KEY_A)
    ws.send(Open([1, 2, 3], 8, 5).encode())
    assert started.wait(10)
    ws.close(1000)
    release.set()
    wait_until(lambda: not server.registry.sessions)  # not kept for ATTACH until the idle timeout (30 s)


def test_an_abrupt_drop_before_ready_ends_the_session_too(server, held_prefill):
    """Before READY the device has no session id to ATTACH with: any drop ends the session and
    drops its queued prefill and replay (tests/cloud/test_server_scheduling.py)."""
    started, release = held_prefill
    ws = ws_open(server, KEY_A)
    ws.send(Open([1, 2, 3], 8, 5).encode())
    assert started.wait(10)
    ws.socket.shutdown(socket.SHUT_RDWR)
    ws.close()
    wait_until(lambda: not server.registry.sessions)
    release.set()


def test_a_websocket_that_never_opens_is_closed_after_the_handshake_timeout(tiny_llm):
    srv = ThreadServer(tiny_llm, handshake_timeout_s=0.5)
    try:
        client = RawClient(srv.port)
        t0 = time.monotonic()
        assert client.close_code() == frames.CLOSE_IDLE
        assert time.monotonic() - t0 < 5
        client.close()
    finally:
        srv.stop()


@pytest.fixture
def uvicorn_lines():
    """What uvicorn logs about requests (access and WebSocket lines), after its filters."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield records
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_a_key_in_the_query_string_is_refused_and_never_logged(server, uvicorn_lines):
    for key in (KEY_A, None):  # with or without a good Authorization header
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{server.http}/v1/info?api_key={KEY_B}", headers=headers, timeout=10, trust_env=False)
        assert r.status_code == 400 and "Authorization header" in r.json()["error"]
    with pytest.raises(InvalidStatus) as e:
        connect(f"{server.url}/v1/stream?token={KEY_B}", additional_headers={"Authorization": f"Bearer {KEY_A}"},
                proxy=None)  # fmt: skip
    assert e.value.response.status_code == 400
    lines = [r.getMessage() for r in uvicorn_lines]
    assert any("?<redacted>" in line for line in lines), lines
    assert not any(KEY_B in line for line in lines)


# ---------------------------------------------------------------------------------------
# The model's window
# ---------------------------------------------------------------------------------------


def test_a_session_past_the_models_trained_window_is_refused_like_in_process(tiny_slm):
    """The device leaves the window to the cloud (api.CoSteer: 'its server enforces its own limits'),
    and the cloud took any prompt and max_new_tokens within its own limits: a run that raises
    PromptTooLong in process went on over the socket past the positions the model was trained on."""
    tok = bpe_tokenizer()
    short = make_lm("tiny-short", llama(len(tok), seed=1), tok)
    short.model.config.max_position_embeddings = 24
    assert short.window == 24
    srv = ThreadServer(short, max_prompt_tokens=64, max_new_tokens=40)
    try:
        with ws_open(srv) as ws:
            ws.send(Open([1] * 20, 8, max_new_tokens=5).encode())
            closed_with(ws, frames.CLOSE_TOO_LARGE, "window of 24")
        with ws_open(srv) as ws:  # a session that fits still opens
            open_session(ws, prompt=[1] * 20, max_new=4)
        llm = connect_cloud(srv.url, api_key=KEY_A, k="full", lookahead="off")
        with pytest.raises(CloudError, match="4413.*window"):
            CoSteer(llm, None).generate(QUERY * 3, None, "llm", max_new_tokens=30)
        wait_until(lambda: not srv.registry.sessions)
    finally:
        srv.stop()
