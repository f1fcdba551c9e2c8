"""A cloud server on 127.0.0.1 for tests: uvicorn in a thread (in-process models) or
`costeer serve` in a subprocess (for the kill-and-restart test)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from costeer.cloud import ServerSettings, create_app
from costeer.cloud.net import uvicorn_config
from tests.servers import UvicornThread, free_port, wait_http  # noqa: F401 (free_port: for the tests that import it here)

KEY_A, KEY_B = "key-alpha-0123456789", "key-bravo-9876543210"


def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def run_in_thread(config: uvicorn.Config, port: int = 0) -> tuple[uvicorn.Server, threading.Thread, int]:
    """uvicorn serving `config` on 127.0.0.1:port (0: a free one) in a daemon thread, once it has
    started -> (server, thread, port) (tests/servers.py)."""
    srv = UvicornThread(config, port)
    return srv.server, srv.thread, srv.port


class ThreadServer:
    """create_app(lm, settings) served by uvicorn in a daemon thread."""

    def __init__(self, lm, settings: ServerSettings | None = None, ssl: tuple[str, str] | None = None, **limits):
        self.settings = settings or ServerSettings(api_keys=frozenset({KEY_A, KEY_B}), **limits)
        self.scheme = "s" if ssl else ""
        self.app = create_app(lm, self.settings)
        cert, key = ssl or (None, None)
        cfg = uvicorn_config(self.app, self.settings, log_level="warning", ssl_certfile=cert, ssl_keyfile=key)
        self.server, self.thread, self.port = run_in_thread(cfg)

    @property
    def url(self) -> str:
        return f"ws{self.scheme}://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http{self.scheme}://127.0.0.1:{self.port}"

    @property
    def registry(self):
        return self.app.state.registry

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class ProcessServer:
    """`python -m costeer.cli serve` as a subprocess (can be SIGKILLed and started again)."""

    def __init__(self, llm: str, port: int, keys: str = f"{KEY_A},{KEY_B}", cache_dir: str | None = None):
        self.llm, self.port, self.keys, self.cache_dir = llm, port, keys, cache_dir
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "ProcessServer":
        env = dict(os.environ, COSTEER_API_KEYS=self.keys)
        if self.cache_dir:
            env["COSTEER_CACHE_DIR"] = self.cache_dir
        self.log = tempfile.TemporaryFile()  # not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "costeer.cli", "serve", "--llm", self.llm, "--host", "127.0.0.1",
             "--port", str(self.port), "--device", "cpu", "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log,
        )  # fmt: skip
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        def log() -> str:
            self.log.seek(0)
            return self.log.read().decode(errors="replace")

        wait_http(f"http://127.0.0.1:{self.port}/v1/health", self.proc, timeout, log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


class RawClient:
    """A WebSocket client on a bare socket (websockets' sans-I/O protocol): it sends what it is
    told, reads only when asked, and can send bytes no well-behaved client would."""

    def __init__(self, port: int, key: str | None = KEY_A, rcvbuf: int | None = None, timeout: float = 10.0):
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connect: the window the server sees
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/v1/stream"), max_size=None)
        request = self.proto.connect()
        if key is not None:
            request.headers["Authorization"] = f"Bearer {key}"
        self.proto.send_request(request)
        self._flush()
        self.response: Response | None = None
        self.messages: list[bytes | str] = []
        self.closed = self.timed_out = False
        while self.response is None and not self.closed:
            self.read()

    def _flush(self) -> None:
        self.sock.sendall(b"".join(self.proto.data_to_send()))

    def read(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            self.timed_out, data = True, b""
        except ConnectionError:
            data = b""
        if data:
            self.proto.receive_data(data)
        else:
            self.proto.receive_eof()
            self.closed = True
        for event in self.proto.events_received():
            if isinstance(event, Response):
                self.response = event
            elif isinstance(event, Frame) and event.opcode in (Opcode.BINARY, Opcode.TEXT):
                self.messages.append(bytes(event.data))
        if self.proto.close_rcvd is not None:  # answer the server's close, as any client does
            with contextlib.suppress(OSError):
                self._flush()

    def send(self, data: bytes) -> None:
        self.proto.send_binary(data)
        self._flush()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_text(self, text: str) -> None:
        self.proto.send_text(text.encode())
        self._flush()

    def outcome(self) -> tuple[str, int | None]:
        """Read until the server answers: ("message", None), ("close", code), ("eof", None) when
        the socket ended without a close frame, or ("timeout", None)."""
        while not self.closed and self.proto.close_rcvd is None and not self.messages:
            self.read()
        if self.proto.close_rcvd is not None:
            return "close", self.proto.close_rcvd.code
        if self.messages:
            return "message", None
        return ("timeout" if self.timed_out else "eof"), None

    def close_code(self) -> int | None:
        """Read until the server closes; its close code (None: the socket ended without one)."""
        while not self.closed and self.proto.close_rcvd is None:
            self.read()
        return self.proto.close_rcvd.code if self.proto.close_rcvd is not None else None

    def close(self) -> None:
        self.sock.close()


class FileLimitedServer:
    """The connection layer alone (a stand-in LM: no session is opened) in a subprocess whose
    open-file limit is `files`, with no connection cap, so that connections can exhaust it.
    guard=False leaves the log filters off (what a flood looked like before them)."""

    SCRIPT = textwrap.dedent("""
        import logging, resource, sys, time, types
        files, guard = int(sys.argv[1]), sys.argv[2] == "1"
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
        logging.basicConfig(level="INFO")
        import costeer.cloud.net as net
        if not guard:
            net.guard_logs = lambda: None
        from tests.cloud.server_util import ThreadServer
        tokenizer = types.SimpleNamespace(get_vocab=lambda: {"a": 0}, chat_template=None)
        pool = types.SimpleNamespace(chunk=None, close=lambda: None)  # never fed: no session opens
        lm = types.SimpleNamespace(name="stand-in", vocab_size=1, stop_ids=frozenset(), tokenizer=tokenizer,
                                   open_pool=lambda *args: pool)
        srv = ThreadServer(lm, max_connections=100_000)
        print("PORT", srv.port, flush=True)
        time.sleep(600)
    """)

    def __init__(self, log_file: Path, files: int, guard: bool = True):
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]))
        with open(log_file, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(files), "1" if guard else "0"],
                                         stdout=subprocess.PIPE, stderr=out, env=env)  # fmt: skip
        self.port = next(int(line.split()[1]) for line in self.proc.stdout if line.startswith(b"PORT"))

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/v1/health", trust_env=False, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def __enter__(self) -> "FileLimitedServer":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
