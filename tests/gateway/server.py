"""The gateway's app served for tests (tests/servers.py), with uvicorn's log records reaching pytest's caplog."""

from __future__ import annotations

from tests.servers import UvicornThread


class AppServer(UvicornThread):
    def __init__(self, app):
        self.app = app
        # log_config=None: uvicorn's records reach the root logger (and pytest's caplog)
        super().__init__(app, log_level="info", log_config=None)

    @property
    def gateway(self):
        return self.app.state.gateway
