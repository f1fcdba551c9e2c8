"""Servers on 127.0.0.1 for tests, one way each: an ASGI app under uvicorn in a daemon thread, and a
subprocess's HTTP server waited for (used by tests/cloud, tests/gateway, tests/playground, tests/device)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from typing import Callable

import httpx
import uvicorn

from costeer.cloud.net import listen

START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A port free now (for a subprocess that must be told its port; in-process servers bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepted_nodelay(sock: socket.socket) -> int:
    """Serve `sock` as uvicorn does (asyncio's loop.create_server(sock=...)), connect once -> the
    accepted connection's TCP_NODELAY, as the server side holds it (1: each frame leaves at once)."""
    import asyncio

    async def main() -> int:
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                got.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await loop.create_server(Accept, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            writer.close()
            server.close()

    return asyncio.run(main())


class UvicornThread:
    """`app` (or a whole uvicorn.Config) served on 127.0.0.1:port (0: a free one) in a daemon thread,
    started when the constructor returns. `config` keywords go to uvicorn.Config with an app."""

    def __init__(self, app, port: int = 0, **config):
        cfg = app if isinstance(app, uvicorn.Config) else uvicorn.Config(app, **({"log_level": "warning"} | config))
        sock = listen("127.0.0.1", port)  # as `costeer serve` binds (SO_REUSEADDR: a restart on the port a test just stopped)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120.0, log: Callable[[], str] = lambda: "") -> None:
    """Wait until GET `url` answers 200; fail at once if `proc` exits (with the tail of `log()`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {log()[-2000:]}")
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer {url} within {timeout:g} s")
