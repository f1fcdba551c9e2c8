"""An ASGI app served by uvicorn on 127.0.0.1 (a free port) in a daemon thread, for tests."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class AppServer:
    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        # log_config=None: uvicorn's records reach the root logger (and pytest's caplog)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="info", log_config=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway(self):
        return self.app.state.gateway

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
