"""Reaching a cloud over HTTP: its two URLs, a few authenticated JSON requests (each logged byte
for byte in the wire log, the API key redacted), the one error type a user sees from the device,
and the reconnection budget both kinds of cloud (client.py, engines.py) share."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from costeer.device.wire import WireLog, redact_headers
from costeer.errors import CoSteerError


class CloudError(CoSteerError, ValueError):
    """The cloud refused a request or stayed unreachable (a user-facing, one-line error)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Retry:
    """Bounded reconnection: `attempts` tries after a failure, back-off doubling up to a cap."""

    attempts: int = 6
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    recv_timeout_s: float = 120.0  # no frame for this long counts as a dropped connection

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**attempt)


def cloud_urls(url: str) -> tuple[str, str]:
    """ws://host:port[/v1/stream] | http://host:port -> (http base, websocket url)."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"ws": ("http", "ws"), "wss": ("https", "wss"), "http": ("http", "ws"), "https": ("https", "wss")}
    if parts.scheme not in scheme or not parts.netloc:
        raise ValueError(f"cloud URL must look like ws://HOST:PORT, got {url!r}")
    http, ws = scheme[parts.scheme]
    return urlunsplit((http, parts.netloc, "", "", "")), urlunsplit((ws, parts.netloc, "/v1/stream", "", ""))


class HttpClient:
    """A few authenticated JSON requests, each logged byte for byte (headers, API key redacted)."""

    def __init__(self, base: str, api_key: str, wire: WireLog | None, timeout: float = 60.0):
        import httpx

        self.base, self.wire = base, wire
        # trust_env=False: never route the device's traffic through a proxy from the environment
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base, headers=headers, timeout=timeout, trust_env=False)

    def get_json(self, path: str) -> dict:
        return self.request_json("GET", path)

    def post_json(self, path: str, body: dict) -> dict:
        return self.request_json("POST", path, body)

    def request_json(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        req = self.client.build_request(method, path, json=body)
        if self.wire:
            head = f"{method} {req.url.raw_path.decode()} HTTP/1.1\r\n{redact_headers(req.headers)}\r\n\r\n"
            self.wire.record("sent", "http-request", head.encode() + (req.content or b""))
        try:
            resp = self.client.send(req)
        except httpx.HTTPError as e:
            raise CloudError(f"cannot reach the cloud at {self.base}: {e}") from None
        if self.wire:
            head = f"HTTP/1.1 {resp.status_code}\r\n{redact_headers(resp.headers)}\r\n\r\n"
            self.wire.record("received", "http-response", head.encode() + resp.content)
        if resp.status_code != 200:
            raise CloudError(f"cloud refused {path}: HTTP {resp.status_code}: {_error_message(resp)}", resp.status_code)
        return resp.json()

    def close(self) -> None:
        self.client.close()


def _error_message(resp) -> str:
    """The message of an error answer: {"error": {"message": ...}}, {"error": "..."} or its text."""
    try:
        err = resp.json().get("error", resp.text)
        return err.get("message", err) if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        return resp.text
