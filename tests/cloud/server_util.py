"""A cloud server on 127.0.0.1 for tests: uvicorn in a thread (in-process models) or
`costeer serve` in a subprocess (for the kill-and-restart test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import uvicorn

from costeer.cloud import ServerSettings, create_app

KEY_A, KEY_B = "key-alpha-0123456789", "key-bravo-9876543210"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """create_app(lm, settings) served by uvicorn in a daemon thread."""

    def __init__(self, lm, settings: ServerSettings | None = None, **limits):
        self.settings = settings or ServerSettings(api_keys=frozenset({KEY_A, KEY_B}), **limits)
        self.app = create_app(lm, self.settings)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        cfg = uvicorn.Config(self.app, ws="websockets-sansio", log_level="warning",
                             ws_max_size=self.settings.max_uplink_bytes)  # fmt: skip
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"
