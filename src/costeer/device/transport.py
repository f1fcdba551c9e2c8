"""Reaching a cloud over HTTP: its two URLs, a few authenticated JSON requests (each logged byte
for byte in the wire log, the API key redacted), the one error type a user sees from the device,
the TLS and clear-text rules for the key, and the reconnection budget both kinds of cloud
(client.py, engines.py) share.

What a cloud answers is untrusted (docs/security.md): every answer is read up to a bound and
refused past it, and must be a JSON object."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from time import monotonic, sleep  # the names the retry budget reads: tests swap in a virtual clock
from urllib.parse import urlsplit, urlunsplit

from costeer.device.wire import WireLog, redact_headers
from costeer.errors import CoSteerError

log = logging.getLogger("costeer.device")

MAX_JSON_BYTES = 4 << 20  # any JSON answer: an engine's top-k list with thousands of entries fits
MAX_INFO_BYTES = 64 << 10  # /v1/info: a few hundred bytes from an honest cloud
MAX_TOKENIZER_BYTES = 128 << 20  # /v1/tokenizer: Gemma-3's 262k vocabulary is about 40 MB of JSON
# httpx's timeout bounds each read, not an answer: a cloud sending a byte just within it would hold the
# device for max_bytes reads. Past the timeout, an answer must come at least this fast on average.
MIN_BYTES_PER_S = 16 << 10


class CloudError(CoSteerError, ValueError):
    """The cloud refused a request or stayed unreachable (a user-facing, one-line error). Its message
    often quotes the cloud's own text (an error answer, a close reason): control characters in it
    (terminal escape sequences, newlines) are shown escaped, never written to the terminal raw."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(_printable(message))
        self.code = code


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@dataclass(frozen=True)
class Retry:
    """Reconnection within a time budget: after a failure, tries with back-off doubling up to a
    cap, until `budget_s` seconds have passed since the first failure of the outage."""

    budget_s: float = 120.0  # a restart of the cloud (a model reload) takes tens of seconds
    backoff_s: float = 0.25
    max_backoff_s: float = 4.0
    recv_timeout_s: float = 120.0  # no frame for this long counts as a dropped connection
    attempts: int | None = None  # also stop after this many tries (None: the time budget alone)

    def __post_init__(self) -> None:
        if not (self.budget_s >= 0 and self.backoff_s > 0 and self.max_backoff_s > 0 and self.recv_timeout_s > 0):
            raise ValueError("retry budget must be >= 0 s and its back-off and timeout > 0 s")
        if self.attempts is not None and self.attempts < 0:
            raise ValueError("retry attempts must be >= 0")

    def outage(self) -> Outage:
        return Outage(self)


class Outage:
    """One run of failures: `wait(reason)` logs it, sleeps the next back-off and says True, or says
    False once the budget is spent (the time the tries themselves take counts too)."""

    def __init__(self, retry: Retry):
        self.retry, self.started, self.tries = retry, monotonic(), 0

    def wait(self, reason: str) -> bool:
        left = self.retry.budget_s - (monotonic() - self.started)
        if left <= 0 or (self.retry.attempts is not None and self.tries >= self.retry.attempts):
            return False
        delay = min(self.retry.max_backoff_s, self.retry.backoff_s * 2**self.tries, left)
        self.tries += 1
        log.warning("cloud unreachable (%s); trying again in %.2fs (try %d, %.0f s left)", reason, delay, self.tries, left)
        sleep(delay)
        return True


def cloud_urls(url: str) -> tuple[str, str]:
    """ws://host:port[/v1/stream] | http://host:port -> (http base, websocket url)."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"ws": ("http", "ws"), "wss": ("https", "wss"), "http": ("http", "ws"), "https": ("https", "wss")}
    if parts.scheme not in scheme or not parts.netloc:
        raise ValueError(f"cloud URL must look like ws://HOST:PORT, got {url!r}")
    http, ws = scheme[parts.scheme]
    return urlunsplit((http, parts.netloc, "", "", "")), urlunsplit((ws, parts.netloc, "/v1/stream", "", ""))


def is_loopback(host: str | None) -> bool:
    """This machine: localhost, 127.0.0.0/8 or ::1 (a name that resolves there elsewhere does not count)."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Link:
    """How the device reaches a cloud: TLS trust (`ca_file`, else SSL_CERT_FILE, else the system's
    store) and whether a key may travel in clear to a host other than this machine (`insecure`)."""

    ca_file: str | Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.ca_file is not None and not Path(self.ca_file).expanduser().is_file():
            raise FileNotFoundError(f"CA file not found: {self.ca_file}")

    def check_key(self, url: str, api_key: str) -> None:
        """Refuse to send a key over plain HTTP / WebSocket beyond this machine, unless insecure."""
        parts = urlsplit(url)
        if api_key and parts.scheme in ("http", "ws") and not self.insecure and not is_loopback(parts.hostname):
            raise CloudError(f"refusing to send the API key in clear to {parts.hostname}: use wss:// (https://), "
                             "or say --insecure (insecure=True) to accept that anyone on the path can read it")  # fmt: skip

    def tls(self) -> ssl.SSLContext:
        """A verifying TLS context: the CA file given, else SSL_CERT_FILE, else the system's store."""
        cafile = self.ca_file or os.environ.get("SSL_CERT_FILE") or None
        if cafile is not None and not Path(cafile).expanduser().is_file():
            raise FileNotFoundError(f"CA file not found: {cafile} (SSL_CERT_FILE)")
        try:
            return ssl.create_default_context(cafile=str(Path(cafile).expanduser()) if cafile else None)
        except ssl.SSLError as e:
            raise ValueError(f"cannot read the CA file {cafile}: {e.reason or e}") from None


class HttpClient:
    """A few authenticated JSON requests, each logged byte for byte (headers, API key redacted)."""

    def __init__(self, base: str, api_key: str, wire: WireLog | None, timeout: float = 60.0, link: Link = Link()):
        import httpx

        link.check_key(base, api_key)
        self.base, self.wire, self.timeout = base, wire, timeout
        # trust_env=False: never route the device's traffic through a proxy from the environment
        # (TLS trust comes from `link`, which reads SSL_CERT_FILE itself)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        verify = link.tls() if base.startswith("https:") else True
        self.client = httpx.Client(base_url=base, headers=headers, timeout=timeout, trust_env=False, verify=verify)

    def get_json(self, path: str, max_bytes: int = MAX_JSON_BYTES) -> dict:
        return self.request_json("GET", path, max_bytes=max_bytes)

    def post_json(self, path: str, body: dict) -> dict:
        return self.request_json("POST", path, body)

    def request_json(self, method: str, path: str, body: dict | None = None, max_bytes: int = MAX_JSON_BYTES) -> dict:
        import httpx

        req = self.client.build_request(method, path, json=body)
        if self.wire:
            head = f"{method} {req.url.raw_path.decode()} HTTP/1.1\r\n{redact_headers(req.headers)}\r\n\r\n"
            self.wire.record("sent", "http-request", head.encode() + (req.content or b""))
        try:
            resp = self.client.send(req, stream=True)
            try:
                content = _read_bounded(resp, path, max_bytes, self.timeout)
            finally:
                resp.close()
        except httpx.HTTPError as e:
            raise CloudError(f"cannot reach the cloud at {self.base}: {_first_line(e)}") from None
        if self.wire:
            head = f"HTTP/1.1 {resp.status_code}\r\n{redact_headers(resp.headers)}\r\n\r\n"
            self.wire.record("received", "http-response", head.encode() + content)
        if resp.status_code != 200:
            msg = _error_message(content)
            raise CloudError(f"cloud refused {path}: HTTP {resp.status_code}: {msg}", resp.status_code)
        try:
            answer = json.loads(content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise CloudError(f"the cloud's answer to {path} is not a JSON object")
        return answer

    def close(self) -> None:
        self.client.close()


def _read_bounded(resp, path: str, max_bytes: int, timeout: float) -> bytes:
    """The body of a streamed response, refused as soon as it passes max_bytes, or once it comes slower
    than MIN_BYTES_PER_S on average after `timeout` seconds (checked as each chunk comes; httpx's own
    timeout ends a wait for any one chunk)."""
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise CloudError(f"the cloud's answer to {path} exceeds {max_bytes:,} bytes ({int(declared):,} announced)")
    chunks, n, started = [], 0, time.monotonic()  # real time (tests swap this module's `monotonic`)
    for chunk in resp.iter_bytes():
        n += len(chunk)
        if n > max_bytes:
            raise CloudError(f"the cloud's answer to {path} exceeds {max_bytes:,} bytes")
        took = time.monotonic() - started
        if took > timeout + n / MIN_BYTES_PER_S:
            raise CloudError(f"the cloud's answer to {path} comes too slowly ({n:,} bytes in {took:.0f} s)")
        chunks.append(chunk)
    return b"".join(chunks)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _error_message(content: bytes) -> str:
    """The message of an error answer: {"error": {"message": ...}}, {"error": "..."} or its text."""
    text = content[:500].decode("utf-8", "replace")
    try:
        err = json.loads(content).get("error", text)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except (ValueError, AttributeError):
        return text
