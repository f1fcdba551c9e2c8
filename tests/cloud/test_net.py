"""Connections of the cloud service (costeer.cloud.net): silent and half-sent requests are closed,
connections are capped, error logs are rate-limited, TLS is served."""

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
import subprocess
import time

import httpx
import pytest
from typer.testing import CliRunner
from websockets.sync.client import connect

from costeer import frames
from costeer.cli import app
from costeer.cloud.net import Lingering, RateLimit, check_tls, listen
from costeer.frames import Open
from tests.cloud.server_util import KEY_A, FileLimitedServer, ThreadServer, wait_until
from tests.servers import UvicornThread, accepted_nodelay


@pytest.fixture(scope="module")
def strict_server(tiny_llm):
    srv = ThreadServer(tiny_llm, handshake_timeout_s=0.5, max_connections=6)
    yield srv
    srv.stop()


def raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def ended_after(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server sent until it closed the socket, and how long that took."""
    t0, got = time.monotonic(), b""
    while chunk := s.recv(4096):
        got += chunk
    return got, time.monotonic() - t0


def test_a_silent_connection_is_closed_after_the_handshake_timeout(strict_server):
    with raw(strict_server.port) as s:
        got, took = ended_after(s)
    assert got == b"" and took < 3


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/health HTTP/1.1\r\nHost: x\r\n",  # a head without its blank line
    b"POST /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc",  # a body cut short
    b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",  # half a handshake
])  # fmt: skip
def test_a_half_sent_request_is_closed_after_the_handshake_timeout(strict_server, request_bytes):
    with raw(strict_server.port) as s:
        s.sendall(request_bytes)
        got, took = ended_after(s)
    assert took < 3 and b"200 OK" not in got


def test_dripping_bytes_does_not_extend_the_timeout(strict_server):
    """The timer runs from the request's first byte, not from the last."""
    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
    with raw(strict_server.port) as s:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            for b in head:
                s.sendall(bytes([b]))
                time.sleep(0.05)  # 40 bytes: 2 s, four times the timeout
            assert s.recv(4096) == b""
            raise ConnectionResetError
        assert time.monotonic() - t0 < 1.9


def test_complete_requests_and_keep_alive_are_unaffected(strict_server):
    with httpx.Client(base_url=strict_server.http, trust_env=False, timeout=10) as c:
        for _ in range(3):
            assert c.get("/v1/health").json() == {"status": "ok"}
            time.sleep(0.3)  # within keep-alive, apart by more than half the handshake timeout


def test_a_client_that_pipelines_requests_and_never_reads_is_dropped_after_the_send_timeout(tiny_llm):
    srv = ThreadServer(tiny_llm, send_timeout_s=1.0)
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", srv.port))
            s.settimeout(2)
            with contextlib.suppress(socket.timeout, ConnectionError):  # the server stops reading, then drops us
                request = f"GET /v1/tokenizer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n\r\n"
                s.sendall(request.encode() * 400)  # answers: 16 KB each, 6 MB in all
            wait_until(lambda: srv.server.server_state.total_requests > 10)  # answering, into a filling buffer
            wait_until(lambda: not srv.server.server_state.connections, timeout=15)
    finally:
        srv.stop()


def test_no_websocket_compression_is_negotiated(strict_server):
    """uvicorn offers permessage-deflate by default, and a client that asked for it made the cloud deflate
    every frame in the event loop all sessions share: about 50 ms for one full frame at V = 262,144, on
    a client's own request (the device never asks: frames are already compact)."""
    with connect(strict_server.url + "/v1/stream", additional_headers={"Authorization": f"Bearer {KEY_A}"},
                 compression="deflate", proxy=None) as ws:  # fmt: skip
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        ws.send(Open([1, 2, 3], 8, 5).encode())
        assert isinstance(frames.decode_downlink(ws.recv(timeout=10)), frames.Ready)


def test_connections_over_the_cap_are_answered_503_at_once(strict_server):
    cap = strict_server.settings.max_connections
    held = [raw(strict_server.port) for _ in range(cap)]
    try:
        wait_until(lambda: len(strict_server.server.server_state.connections) == cap)
        t0 = time.monotonic()
        with raw(strict_server.port) as extra:
            got, _ = ended_after(extra)
        assert got.startswith(b"HTTP/1.1 503") and b"too many connections" in got
        assert time.monotonic() - t0 < 1
    finally:
        for s in held:
            s.close()
    wait_until(lambda: not strict_server.server.server_state.connections)
    assert httpx.get(strict_server.http + "/v1/health", trust_env=False, timeout=10).status_code == 200


def test_the_rate_limit_lets_a_burst_through_then_counts_what_it_drops():
    now = [0.0]
    rl = RateLimit(burst=5, period_s=10.0, clock=lambda: now[0])

    def rec(msg, level=logging.ERROR, name="asyncio"):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    passed = [rl.filter(rec("socket.accept() out of system resource")) for _ in range(1000)]
    assert sum(passed) == 5 and passed[:5] == [True] * 5
    assert rl.filter(rec("another error"))  # each message has its own budget
    assert all(rl.filter(rec("accepted", logging.INFO)) for _ in range(100))  # below WARNING: never limited
    now[0] = 10.5
    r = rec("socket.accept() out of system resource")
    assert rl.filter(r) and "[995 more like this dropped in 10 s]" in r.getMessage()
    # messages with their values inside do not grow the table without bound
    for i in range(5 * RateLimit.MAX_KEYS):
        rl.filter(rec(f"error number {i}"))
    assert len(rl._windows) <= RateLimit.MAX_KEYS + 1



def test_too_many_open_files_is_logged_at_a_bounded_rate(tmp_path):
    """At the process's file limit Python 3.11's accept loop logs each failure (thousands a
    second, 20 MB in 5 s before the limit); the rate limit keeps it to a few lines."""
    log_file = tmp_path / "server.log"
    with FileLimitedServer(log_file, files=80) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(120)]  # past 80
        time.sleep(2)
        text = log_file.read_text(errors="replace")
        assert "Too many open files" in text
        assert len(text) < 100_000, len(text)
        for s in held:
            s.close()
        wait_until(srv.healthy, timeout=15)  # it serves again once descriptors are free


# ---------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------


def self_signed(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


def test_tls_serves_https_and_wss(tiny_llm, tls_files):
    cert, key = tls_files
    srv = ThreadServer(tiny_llm, ssl=(cert, key))
    try:
        ctx = ssl.create_default_context(cafile=cert)
        assert srv.url.startswith("wss://")
        r = httpx.get(srv.http + "/v1/info", headers={"Authorization": f"Bearer {KEY_A}"}, verify=ctx, trust_env=False)
        assert r.json()["vocab_size"] == tiny_llm.vocab_size
        with connect(srv.url + "/v1/stream", additional_headers={"Authorization": f"Bearer {KEY_A}"}, ssl=ctx,
                     proxy=None) as ws:  # fmt: skip
            ws.send(Open([1, 2, 3], 8, 3).encode())
            assert isinstance(frames.decode_downlink(ws.recv(timeout=10)), frames.Ready)
            assert frames.decode_downlink(ws.recv(timeout=10)).position == 0
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets nothing from a TLS port
            httpx.get(srv.http.replace("https", "http") + "/v1/health", trust_env=False, timeout=5)
        with pytest.raises(httpx.ConnectError):  # nor does a client that does not trust the certificate
            httpx.get(srv.http + "/v1/health", trust_env=False, timeout=5)
    finally:
        srv.stop()


def test_a_lingering_tls_transport_closed_again_or_after_an_abort_raises_nothing(tls_files):
    """uvicorn may close a connection that is closing already (after the send timeout's abort, say);
    asyncio's TLS transport drops its protocol on a second close(), and Lingering then asked it for
    its buffer size: AttributeError inside the server."""
    cert, key = tls_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=cert)

    async def run(first: str) -> None:
        made = asyncio.get_running_loop().create_future()
        proto = type("P", (asyncio.Protocol,), {"connection_made": lambda self, t: made.set_result(t)})
        server = await asyncio.get_running_loop().create_server(proto, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
        transport = Lingering(await asyncio.wait_for(made, 10), 1.0)
        getattr(transport, first)()
        transport.close()
        transport.close()
        writer.close()
        server.close()

    for first in ("close", "abort"):
        asyncio.run(run(first))


def test_tls_files_are_checked_in_one_line(tls_files, tmp_path):
    cert, key = tls_files
    check_tls(None, None)
    check_tls(cert, key)
    with pytest.raises(ValueError, match="together"):
        check_tls(cert, None)
    with pytest.raises(FileNotFoundError, match="key file not found"):
        check_tls(cert, str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="cannot use"):
        check_tls(key, cert)
    r = CliRunner().invoke(app, ["serve", "--ssl-certfile", cert], env={"COSTEER_API_KEYS": KEY_A})
    assert r.exit_code != 0 and "together" in r.output and "Traceback" not in r.output


def test_serve_on_a_port_in_use_says_so_in_one_line_before_loading_a_model():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--port", str(port), "--llm", "no-such-model"],
                               env={"COSTEER_API_KEYS": KEY_A})  # fmt: skip
    assert r.exit_code != 0 and f"cannot listen on 127.0.0.1:{port}" in r.output
    assert "serving" not in r.output and "no-such-model" not in r.output and "Traceback" not in r.output


def test_connections_on_the_listening_socket_send_each_frame_at_once():
    """Without TCP_NODELAY on the server side, Nagle's algorithm held a streamed round's LEVEL frame
    until the root's ACK came back (26-40 ms on loopback: the peer delays its ACKs), so a look-ahead
    round at RTT 0 ran 6% slower than per-token decoding. asyncio sets the option only on a connection
    whose socket names IPPROTO_TCP; socket(family, SOCK_STREAM) names protocol 0."""
    assert accepted_nodelay(listen("127.0.0.1", 0)) == 1


def test_uvicorn_serving_the_listening_socket_sends_each_frame_at_once():
    import asyncio

    async def ok(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok", "more_body": True})
            await asyncio.sleep(30)  # keep the connection open while the test looks at it

    srv = UvicornThread(ok)  # the socket from listen(), as `costeer serve` gives uvicorn
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert b"200" in c.recv(1024)
            conns = list(srv.server.server_state.connections)
            assert conns, "uvicorn holds no connection"
            for proto in conns:
                sock = proto.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        srv.server.force_exit = True
        srv.stop()


def test_within_never_drops_a_cancel_that_comes_as_the_awaited_finishes():
    """asyncio.wait_for (before Python 3.12) returns the result when the cancel comes in the same loop
    iteration as the awaited future's result, and the cancelled task carries on: the streamed round's
    pump then waited on its queue for good after its connection closed."""
    import asyncio
    import sys

    from costeer.cloud.net import within

    if sys.version_info < (3, 11):
        pytest.skip("Python 3.10 has no asyncio.timeout: within is wait_for there")

    async def race() -> str:
        inner = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(within(inner, 10))
        await asyncio.sleep(0)  # the task now waits on `inner`
        inner.set_result("sent")  # the send finishes...
        task.cancel()  # ...and the connection's close cancels the task in the same iteration
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled"

    async def slow() -> None:
        await within(asyncio.sleep(5), 0.01)

    assert asyncio.run(race()) == "cancelled"
    with pytest.raises(TimeoutError):
        asyncio.run(slow())
