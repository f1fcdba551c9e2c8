"""Connections of the cloud service: what uvicorn is told, and the limits it lacks.

uvicorn holds a connection that never sends its request for ever (its keep-alive timer only
starts after a first response), accepts connections up to the process's file limit (where
Python 3.11's accept loop then logs "Too many open files" thousands of times a second), and
asyncio's `transport.close()` waits for the write buffer to drain, which never happens when
the peer stops reading. `GuardedHTTP` adds the three missing bounds to uvicorn's h11
protocol; the WebSocket protocol that takes over after the upgrade inherits its transport.
Log records at WARNING and above pass at a bounded rate, and query strings (where a
careless client might put a key) never reach the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from costeer.cloud.sessions import ServerSettings

log = logging.getLogger("costeer.cloud")

FILE_RESERVE = 64  # descriptors the process needs besides its connections (model files, pipes, logs)
_BUSY_BODY = json.dumps({"error": "server busy: too many connections"}).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n" % len(_BUSY_BODY) + _BUSY_BODY
)


if sys.version_info >= (3, 11):

    async def within(aw, timeout: float):
        """`await aw`, TimeoutError after `timeout` seconds. Not `asyncio.wait_for`: before Python 3.12 it
        drops a cancellation that comes as `aw` finishes (CPython gh-86296) and returns its result, so a
        cancelled task carried on (the streamed round's pump, cancelled as its connection closed, went
        back to waiting for frames that never came)."""
        async with asyncio.timeout(timeout):
            return await aw

else:  # Python 3.10 has no asyncio.timeout: wait_for, with its race (callers bound their wait for a cancelled task)
    within = asyncio.wait_for


class Lingering:
    """A transport whose close() ends in abort() when the peer has not taken the bytes still
    buffered within `linger_s`: asyncio's close() waits for them, for ever if the peer never
    reads, and the socket's file descriptor with it. Everything else is the transport's."""

    def __init__(self, transport: asyncio.Transport, linger_s: float):
        self._transport, self._linger_s = transport, linger_s
        self._abort: asyncio.TimerHandle | None = None

    def close(self) -> None:
        # once only: asyncio's TLS transport, closed (or aborted) before, drops its protocol on a second
        # close(), after which asking for its buffer size raised AttributeError inside uvicorn
        if self._transport.is_closing():
            return
        self._transport.close()
        if self._abort is None and self._transport.get_write_buffer_size():
            self._abort = asyncio.get_running_loop().call_later(self._linger_s, self._transport.abort)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class GuardedHTTP(H11Protocol):
    """uvicorn's h11 protocol with a connection cap, a request timeout, a send timeout (a response
    the peer does not read, e.g. behind pipelined requests) and lingering closes. `settings` is set
    on the subclass that `guarded_http` makes."""

    settings: ServerSettings

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(Lingering(transport, self.settings.send_timeout_s))  # type: ignore[arg-type]
        self._timer: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None  # runs while the peer leaves our writes unread
        self._done = False  # refused, timed out or upgraded: no more requests on this protocol
        if len(self.connections) > self.settings.max_connections:
            self._done = True
            log.warning("connection refused: %d open (limit %d)", len(self.connections) - 1, self.settings.max_connections)
            self.transport.write(_BUSY)
            self.transport.close()
            return
        self._watch_request()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        super().data_received(data)
        self._watch_request()

    def _watch_request(self) -> None:
        """While a request is incomplete (its head or body still coming) a timer runs: the whole
        request must arrive within handshake_timeout_s of its first byte or of the connection."""
        incomplete = self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()
        if incomplete and self._timer is None and not self._done:
            self._timer = self.loop.call_later(self.settings.handshake_timeout_s, self._timed_out)
        elif not incomplete and self._timer is not None:
            self._cancel_timer()

    def _timed_out(self) -> None:
        self._timer = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self._done = True
            log.debug("connection closed: no complete request within %g s", self.settings.handshake_timeout_s)
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self.loop.call_later(self.settings.send_timeout_s, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        """The peer took none of a response for send_timeout_s: without this the response's task
        would wait for ever, holding the connection (and a place under the cap)."""
        self._stall = None
        log.debug("connection aborted: a response unread for %g s", self.settings.send_timeout_s)
        self.transport.abort()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._done = True  # the WebSocket protocol owns the connection from here on
        self._cancel_timer()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        super().connection_lost(exc)


def guarded_http(settings: ServerSettings) -> type[GuardedHTTP]:
    return type("GuardedHTTP", (GuardedHTTP,), {"settings": settings})


# ---------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------


class RateLimit(logging.Filter):
    """At most `burst` records per `period_s` for each (logger, message template) at WARNING and
    above; the first record let through after a gap says how many were dropped. A flood of one
    error (a full file table, a thousand malformed requests) costs a few lines, not the disk."""

    MAX_KEYS = 256

    def __init__(self, burst: int = 5, period_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.period_s, self.clock = burst, period_s, clock
        self._windows: dict[tuple[str, str], list] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self.clock()
        key = self._key(record, now)
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.period_s:
            dropped = w[2] if w is not None else 0
            w = self._windows[key] = [now, 0, 0]
            if dropped:
                record.msg = f"{record.msg} [{dropped} more like this dropped in {self.period_s:g} s]"
        if w[1] >= self.burst:
            w[2] += 1
            return False
        w[1] += 1
        return True

    def _key(self, record: logging.LogRecord, now: float) -> tuple[str, str]:
        """Messages with their values inside (not as args) would each get a window: past
        MAX_KEYS live windows, a logger's records share one."""
        if len(self._windows) > self.MAX_KEYS:
            self._windows = {k: w for k, w in self._windows.items() if now - w[0] < self.period_s}
        key = (record.name, str(record.msg))
        return key if key in self._windows or len(self._windows) < self.MAX_KEYS else (record.name, "")


_QUERY = re.compile(r"\?[^\s\"']*")


class RedactQuery(logging.Filter):
    """Query strings in log lines become `?<redacted>` (uvicorn logs each request's path with
    its query; a client that put its key there would leave it in the log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_QUERY.sub("?<redacted>", a) if isinstance(a, str) else a for a in record.args)
        return True


GUARDED_LOGGERS = ("asyncio", "uvicorn.error", "uvicorn.access", "costeer.cloud")
_RATE_LIMIT = RateLimit()
_REDACT = RedactQuery()


def guard_logs() -> None:
    """Attach the redaction and the rate limit to the loggers the server writes through
    (idempotent: logging keeps one copy of a filter)."""
    for name in GUARDED_LOGGERS:
        logger = logging.getLogger(name)
        logger.addFilter(_REDACT)
        logger.addFilter(_RATE_LIMIT)


# ---------------------------------------------------------------------------------------
# The server's configuration
# ---------------------------------------------------------------------------------------


def fit_file_limit(max_connections: int) -> int:
    """Raise the soft open-file limit to what max_connections needs (up to the hard limit);
    a hard limit too low for it is the operator's to fix, in one line."""
    need = max_connections + FILE_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ValueError(f"the open-file limit ({hard}) is below --max-connections {max_connections} + "
                             f"{FILE_RESERVE}: raise `ulimit -n` or lower --max-connections")  # fmt: skip
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        soft = need
    return soft


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use or a bad address is one
    line at once, not a log that claims to serve followed by uvicorn's exit.

    Its connections send each frame at once (TCP_NODELAY). asyncio sets that option only on a
    connection whose socket names IPPROTO_TCP, and a socket made as socket(family, SOCK_STREAM)
    names protocol 0: Nagle's algorithm then held each frame written while the one before was not
    yet acknowledged, until its ACK came (the peer delays it up to 40 ms). A streamed round's LEVEL
    frames, an SSE stream's chunks: measured 26-40 ms late on loopback (docs/benchmarks.md), and up to
    a round trip on a real link."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
        sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Linux: accepted connections inherit it
        sock.bind(address)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """Both files or neither, readable, and a key that matches the certificate: said in one line
    before the model loads, not as a traceback from uvicorn after it."""
    if (certfile is None) != (keyfile is None):
        raise ValueError("give --ssl-certfile and --ssl-keyfile together")
    if certfile is None:
        return
    for what, f in (("certificate", certfile), ("key", keyfile)):
        if not Path(f).is_file():
            raise FileNotFoundError(f"TLS {what} file not found: {f}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"cannot use {certfile} with {keyfile} for TLS: {e}") from None


def uvicorn_config(app, settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 0,
                   ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                   log_level: str = "info") -> uvicorn.Config:  # fmt: skip
    """The one uvicorn configuration of the service (`costeer serve` and the tests use it)."""
    cfg = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_http(settings),
        ws="websockets-sansio",
        ws_max_size=settings.max_uplink_bytes,
        # no permessage-deflate (uvicorn offers it): a client asking for it made the event loop that every
        # session's sends share deflate each of its frames, ~50 ms for a full frame at V = 262,144
        ws_per_message_deflate=False,
        log_level=log_level,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    guard_logs()  # after Config: it (re)configures uvicorn's loggers
    return cfg
