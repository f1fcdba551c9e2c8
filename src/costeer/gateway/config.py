"""The gateway's settings, the private files it reads, and the bind rule."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from costeer.device.transport import is_loopback
from costeer.engine.prompts import load_context

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the server is configured with. The private context comes only from here; the
    sampling and steering defaults (for fields a request leaves out) are the CoSteer's config."""

    context_file: Path | None = None  # the private profile (text, JSON or YAML), reloaded on change
    reference_file: Path | None = None  # costeer_matched's public reference profile, same formats
    api_keys: frozenset[str] = frozenset()  # `Authorization: Bearer <key>`; none: open (loopback only)
    max_tokens_limit: int = 2048  # the most a request may ask for
    max_prompt_tokens: int = 8192  # the public conversation, in the answering model's tokens
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0  # a client that trickles its body in does not hold a connection for ever
    max_waiting: int = 8  # requests queued behind the running generation; more get 429
    # connections (costeer.cloud.net.GuardedHTTP): a silent, trickling or non-reading client holds a
    # socket for a bounded time, and a flood of them is answered 503 instead of filling the file table
    max_connections: int = 64
    request_timeout_s: float = 40.0  # a request's head and body from its connection; above body_timeout_s
    send_timeout_s: float = 30.0  # a client that takes none of an answer for this long is dropped

    def __post_init__(self):
        for name in ("max_tokens_limit", "max_prompt_tokens", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.body_timeout_s > 0 or not self.send_timeout_s > 0:
            raise ValueError("body_timeout_s and send_timeout_s must be positive")
        if not self.request_timeout_s > self.body_timeout_s:  # else the connection closes before the 408
            raise ValueError("request_timeout_s must be above body_timeout_s")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be at least 0")
        if any(len(k) < 16 for k in self.api_keys):
            raise ValueError("API keys must be at least 16 characters")
        for f in (self.context_file, self.reference_file):
            if f is not None and not Path(f).is_file():
                raise FileNotFoundError(f"file not found: {f}")

    @property
    def handshake_timeout_s(self) -> float:
        """The name costeer.cloud.net.GuardedHTTP reads the request timeout by."""
        return self.request_timeout_s


class WatchedFile:
    """A profile file read through `load_context`, read again whenever its size or mtime changes.
    A file that became unreadable raises (the caller answers 503) until it is fixed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._text = ""

    def text(self) -> str:
        st = os.stat(self.path)  # FileNotFoundError once the file is gone
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._text, self._stamp = load_context(self.path), stamp
        return self._text


def check_bind(host: str, settings: GatewaySettings) -> None:
    """Anything but loopback serves the private-context model to a network: it needs a key."""
    if not is_loopback(host) and not settings.api_keys:
        raise ValueError(f"binding to {host} (not loopback) needs an API key: set COSTEER_GATEWAY_KEYS or "
                         "--api-keys-file")  # fmt: skip
