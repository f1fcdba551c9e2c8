"""The device's side of the split: the cloud LLM as a next-token source.

    from costeer import CoSteer
    from costeer.device import connect_cloud
    from costeer.engine.models import load_lm

    llm = connect_cloud("ws://127.0.0.1:8765", k=256)          # key from COSTEER_API_KEY
    cs = CoSteer(llm, load_lm("smollm2-135m-instruct"))       # the SLM runs here, with the context
    print(cs.generate("Plan my weekend.", context="I live in Lisbon.").text)

`CloudLLM` stands where CoSteer expects the LLM: it has the LLM's tokenizer (downloaded from
the cloud once and cached by fingerprint), logit width and stop ids, and `connect()` makes
the next-token source for one generation. `engine.loop.decode` runs unchanged over it.

Per token, `CloudSource.advance` sends the chosen id, runs the SLM pair's forward while the
cloud computes and sends its answer (both depend only on the previous token; the socket is
served by websockets' own I/O thread and torch releases the GIL), then reads the frame and
rebuilds the LLM's [V] log-probabilities (`frames.densify`, with the SLM's own no-context
distribution as the model of the top-k tail). Because the SLM forward runs inside
`advance`, a Step's `llm_s` holds the overlapped time of both and `slm_s` is ~0.

A dropped connection is retried with back-off: first by re-attaching to the live session
(ATTACH), else — the cloud restarted, or the session was evicted — by opening a new one with
the query plus the tokens chosen so far, which the cloud replays. The caller sees one stream.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import torch
from torch import Tensor

from costeer import frames
from costeer.device.wire import WireLog, redact_headers
from costeer.engine.models import cache_root
from costeer.engine.vocab import VocabMap

log = logging.getLogger("costeer.device")

DEFAULT_K = 256  # top-k entries per frame: 1,044 bytes for SmolLM2 (docs/wire-format.md)
TAILS = ("slm", "uniform")


class CloudError(ValueError):
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


# Close codes after which trying again cannot help: the request itself is refused.
_FATAL = {frames.CLOSE_MALFORMED, frames.CLOSE_UNAUTHORIZED, frames.CLOSE_TOO_LARGE, frames.CLOSE_INVALID,
          frames.CLOSE_VERSION, frames.CLOSE_ENDED, frames.CLOSE_BUSY, 1008, 1009}  # fmt: skip


PACKED_K = 4096  # 'packed' without a number: the largest packed frame (about 5.5 KB at V = 262,144)
# What a device asks `costeer serve` for by default: packed frames, the representation that stays
# under 2 KB a token at >= 99.5% greedy agreement across tokenizers (docs/wire-format.md).
DEFAULT_FRAMES = "packed"


def parse_k(k: int | str | None) -> int:
    """'full' / 0 / None -> 0 (FULL); a positive int -> itself."""
    if k is None or (isinstance(k, str) and k.strip().lower() == "full"):
        return frames.FULL
    try:
        v = int(k)
    except ValueError:
        raise ValueError(f"k must be a positive integer or 'full', got {k!r}") from None
    if v < 0:
        raise ValueError(f"k must be a positive integer or 'full', got {k!r}")
    return v


def parse_frames(k: int | str | None) -> tuple[int, bool]:
    """What the device asks the cloud for -> (k, packed): 'full', a top-k size, or 'packed' /
    'packed:N' (every token down to the cloud's floor, at most N; docs/wire-format.md)."""
    if isinstance(k, str) and k.strip().lower().startswith("packed"):
        rest = k.strip()[len("packed") :]
        if not rest:
            return PACKED_K, True
        if not rest.startswith(":") or not rest[1:].isdigit() or int(rest[1:]) < 1:
            raise ValueError(f"k must be 'packed' or 'packed:N' with N >= 1, got {k!r}")
        return int(rest[1:]), True
    try:
        return parse_k(k), False
    except ValueError:
        raise ValueError(f"k must be a positive integer, 'full', 'packed' or 'packed:N', got {k!r}") from None


def _urls(url: str) -> tuple[str, str]:
    """ws://host:port[/v1/stream] | http://host:port -> (http base, websocket url)."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"ws": ("http", "ws"), "wss": ("https", "wss"), "http": ("http", "ws"), "https": ("https", "wss")}
    if parts.scheme not in scheme or not parts.netloc:
        raise ValueError(f"cloud URL must look like ws://HOST:PORT, got {url!r}")
    http, ws = scheme[parts.scheme]
    return urlunsplit((http, parts.netloc, "", "", "")), urlunsplit((ws, parts.netloc, "/v1/stream", "", ""))


def tokenizer_dir(fingerprint: str) -> Path:
    return cache_root() / "tokenizers" / fingerprint


def cached_tokenizer(fingerprint: str):
    """The tokenizer with this fingerprint from the device's cache, or None."""
    d = tokenizer_dir(fingerprint)
    if not d.is_dir():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


class _Http:
    """A few authenticated GETs, each logged byte for byte (headers, API key redacted)."""

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
            try:
                err = resp.json().get("error", resp.text)
                msg = err.get("message", err) if isinstance(err, dict) else err
            except (ValueError, AttributeError):
                msg = resp.text
            raise CloudError(f"cloud refused {path}: HTTP {resp.status_code}: {msg}", resp.status_code)
        return resp.json()

    def close(self) -> None:
        self.client.close()


class CloudLLM:
    """The LLM behind a costeer cloud service, as CoSteer's `llm` (see the module docs)."""

    remote = True  # CoSteer refuses `llm_context` with a remote LLM: it would send the context

    def __init__(self, ws_url: str, api_key: str, info: dict, tokenizer, k: int = DEFAULT_K,
                 tail: str = "slm", wire: WireLog | None = None, retry: Retry = Retry(),
                 packed: bool = False):  # fmt: skip
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
        self.ws_url, self.api_key, self.info = ws_url, api_key, info
        self.name = info.get("model", "cloud")
        self.tokenizer = tokenizer
        self.vocab_size = int(info["vocab_size"])
        self.stop_ids = frozenset(int(i) for i in info["stop_ids"])
        self.device = torch.device("cpu")
        self.k, self.tail, self.wire, self.retry, self.packed = k, tail, wire, retry, packed
        self.bytes_down = self.bytes_up = self.frames_down = 0  # DIST payload bytes / TOKEN payload bytes

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def connect(self, vocab: VocabMap, max_new_tokens: int, steering=None, slm_prompts=None):
        """-> (next-token source, steering source) for one generation; the steering source (the
        SLM pair) is wrapped so that its forwards run while the cloud answers."""
        ahead = SteeringAhead(steering, slm_prompts, vocab, self.vocab_size) if steering is not None else None
        return CloudSource(self, max_new_tokens, ahead), ahead


def connect_cloud(url: str, api_key: str | None = None, k: int | str = DEFAULT_FRAMES, tail: str = "slm",
                  wire_log: str | Path | WireLog | None = None, retry: Retry = Retry()) -> CloudLLM:  # fmt: skip
    """Ask the cloud what it serves and fetch its tokenizer (cached by fingerprint)."""
    api_key = api_key if api_key is not None else os.environ.get("COSTEER_API_KEY", "")
    if not api_key:
        raise CloudError("no API key: set COSTEER_API_KEY")
    base, ws_url = _urls(url)
    wire = WireLog(wire_log) if isinstance(wire_log, (str, Path)) else wire_log
    http = _Http(base, api_key, wire)
    try:
        info = http.get_json("/v1/info")
        if info.get("frame_version") != frames.VERSION:
            raise CloudError(f"the cloud speaks frame version {info.get('frame_version')}, this device {frames.VERSION}")
        fp = info["tokenizer_fingerprint"]
        tok = cached_tokenizer(fp)
        if tok is None:
            files = http.get_json("/v1/tokenizer")["files"]
            d = tokenizer_dir(fp)
            tmp = d.with_name(d.name + f".tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (tmp / Path(name).name).write_text(text, encoding="utf-8")
            if d.exists():  # another process cached it meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, d)
            tok = cached_tokenizer(fp)
        if frames.tokenizer_fingerprint(tok) != fp:
            raise CloudError("the tokenizer fetched from the cloud does not match its fingerprint")
    finally:
        http.close()
    if wire is not None:
        wire.meta(url=ws_url, model=info.get("model"), tokenizer_fingerprint=fp, tokenizer_dir=str(tokenizer_dir(fp)))
    k, packed = parse_frames(k)
    return CloudLLM(ws_url, api_key, info, tok, k, tail, wire, retry, packed)


class SteeringAhead:
    """The SLM pair as a SteeringSource whose forwards CloudSource runs ahead, while it
    waits for the cloud; decode() then gets the pair already computed."""

    def __init__(self, inner, prompts, vocab: VocabMap, llm_vocab_size: int):
        self.inner, self.prompts, self.vocab, self.V = inner, prompts, vocab, llm_vocab_size
        self.pair: Tensor | None = None
        self._ready_for = None  # ("start",) | ("advance", slm_id)
        self._to_slm: dict[int, int] | None = None
        self._ref: tuple[Tensor, Tensor] | None = None  # (pair it was built from, reference)

    def _slm_id(self, llm_id: int) -> int:
        if self.vocab.identity:
            return llm_id
        if self._to_slm is None:
            self._to_slm = dict(zip(self.vocab.llm_index.tolist(), self.vocab.slm_index.tolist()))
            self._to_slm.update((int(i), int(self.vocab.slm_stop[0])) for i in self.vocab.llm_stop)
        return self._to_slm[llm_id]

    # run ahead (called by CloudSource while the cloud computes)
    # The reference is built here too, so that it is ready when the cloud's answer arrives:
    # across tokenizers it is a scatter into [V_llm] (0.3 ms at V = 262,144) that would
    # otherwise sit on the critical path between the DIST frame and the next TOKEN.
    def run_start(self) -> None:
        self.pair, self._ready_for = self.inner.start(*self.prompts), ("start",)
        self.reference()

    def run_advance(self, llm_id: int) -> None:
        slm = self._slm_id(llm_id)
        self.pair, self._ready_for = self.inner.advance(slm), ("advance", slm)
        self.reference()

    # SteeringSource
    def start(self, base_ids: list[int], pers_ids: list[int]) -> Tensor:
        if self._ready_for == ("start",) and (list(base_ids), list(pers_ids)) == tuple(map(list, self.prompts)):
            self._ready_for = None
            return self.pair
        self.prompts = (base_ids, pers_ids)
        self.run_start()
        self._ready_for = None
        return self.pair

    def advance(self, token_id: int) -> Tensor:
        if self._ready_for != ("advance", token_id):
            raise RuntimeError("the SLM pair is out of step with the cloud source")
        self._ready_for = None
        return self.pair

    def reference(self) -> Tensor:
        """The SLM's no-context log-probabilities on the LLM's vocabulary ([V_llm]; LLM ids with
        no SLM counterpart get -inf): the stand-in for the LLM's tail. Built once per pair."""
        if self._ref is not None and self._ref[0] is self.pair:
            return self._ref[1]
        base = self.pair[0]
        if self.vocab.identity:
            ref = base[: self.V]
            if ref.shape[0] < self.V:
                ref = torch.cat([ref, torch.full((self.V - ref.shape[0],), float("-inf"))])
        else:
            ref = torch.full((self.V,), float("-inf"))
            ref[self.vocab.llm_index] = base[self.vocab.slm_index]
            stop = torch.logsumexp(base[self.vocab.slm_stop], dim=0) - math.log(len(self.vocab.llm_stop))
            ref[self.vocab.llm_stop] = stop
        self._ref = (self.pair, ref)
        return ref


class CloudSource:
    """A NextTokenSource over the cloud's WebSocket (one generation, one session)."""

    def __init__(self, llm: CloudLLM, max_new_tokens: int, ahead: SteeringAhead | None = None):
        self.llm, self.max_new_tokens, self.ahead = llm, max_new_tokens, ahead
        self.ws = None
        self.session_id: bytes | None = None
        self.prompt: list[int] = []
        self.chosen: list[int] = []
        self.reconnects = 0

    # -- NextTokenSource ---------------------------------------------------------------

    def start(self, prompt_ids: list[int]) -> Tensor:
        self.prompt, self.chosen, self.session_id = list(prompt_ids), [], None
        hook = self.ahead.run_start if self.ahead else None
        return self._densify(self._exchange(None, hook))

    def advance(self, token_id: int) -> Tensor:
        self.chosen.append(int(token_id))
        hook = (lambda: self.ahead.run_advance(token_id)) if self.ahead else None
        return self._densify(self._exchange(token_id, hook))

    def close(self) -> None:
        """End the session (close code 1000: the cloud frees it at once)."""
        if self.ws is not None:
            try:
                self.ws.close(frames.CLOSE_NORMAL, "done")
            except Exception:  # noqa: BLE001 - the connection may already be gone
                pass
            self._log_close("sent", frames.CLOSE_NORMAL, "done")
            self.ws = None

    # -- internals ---------------------------------------------------------------------

    def _densify(self, dist: frames.Dist) -> Tensor:
        use_slm = self.llm.tail == "slm" and self.ahead is not None and not dist.full
        return frames.densify(dist, self.ahead.reference() if use_slm else None)

    def _exchange(self, token_id: int | None, hook) -> frames.Dist:
        """Send (the token, or OPEN/ATTACH on a new connection), run `hook` once while the
        cloud works, then read the answer; reconnect and resume on a dropped connection."""
        import websockets.exceptions as wse

        failures = 0
        while True:
            try:
                if self.ws is None:
                    self._connect_and_open()
                elif token_id is not None:
                    self._send(frames.Token(token_id).encode(), token=True)
                token_id = None  # a reconnection re-sends it inside OPEN / ATTACH
                if hook is not None:
                    hook, h = None, hook
                    h()
                return self._receive_dist()
            except wse.InvalidStatus as e:
                status = e.response.status_code
                body = e.response.body.decode("utf-8", "replace") if e.response.body else ""
                if status in (401, 403):
                    raise CloudError(f"the cloud refused the connection: HTTP {status} {body}".strip(), status) from None
                err = f"HTTP {status}"
            except wse.ConnectionClosed as e:
                code, reason = (e.rcvd.code, e.rcvd.reason) if e.rcvd else (1006, "connection lost")
                self._log_close("received", code, reason)
                if code in (frames.CLOSE_UNKNOWN_SESSION, frames.CLOSE_ORDER) and self.session_id is not None:
                    self.session_id = None  # cannot re-attach: open anew with the tokens so far
                    self._drop()
                    continue
                if code in _FATAL or code in (frames.CLOSE_UNKNOWN_SESSION, frames.CLOSE_ORDER):
                    self._drop()
                    raise CloudError(f"the cloud closed the session: {code} {reason}", code) from None
                err = f"closed {code} {reason}"
            except (OSError, TimeoutError, wse.InvalidHandshake, wse.InvalidMessage) as e:
                err = f"{type(e).__name__}: {e}"
            self._drop()
            if failures >= self.llm.retry.attempts:
                raise CloudError(f"lost the cloud at {self.llm.ws_url} and could not resume after "
                                 f"{failures} retries ({err})") from None  # fmt: skip
            delay = self.llm.retry.delay(failures)
            failures += 1
            self.reconnects += 1
            log.warning("cloud connection lost (%s); resuming in %.2fs (try %d)", err, delay, failures)
            time.sleep(delay)

    def _drop(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close(frames.CLOSE_GOING_AWAY)
            except Exception:  # noqa: BLE001
                pass
            self.ws = None

    def _connect_and_open(self) -> None:
        from websockets.sync.client import connect

        kw = dict(
            additional_headers={"Authorization": f"Bearer {self.llm.api_key}"},
            compression=None,  # frames are already compact; deflate would cost CPU on full frames
            proxy=None,  # never route through a proxy from the environment
            max_size=None,
            open_timeout=10,
        )
        try:
            ws = connect(self.llm.ws_url, legacy=True, **kw)  # websockets >= 17: a plain connection
        except TypeError:
            ws = connect(self.llm.ws_url, **kw)
        wire = self.llm.wire
        if wire is not None:
            req = f"GET {ws.request.path} HTTP/1.1\r\n{redact_headers(ws.request.headers)}\r\n\r\n"
            wire.record("sent", "ws-handshake", req.encode())
            resp = f"HTTP/1.1 {ws.response.status_code}\r\n{redact_headers(ws.response.headers)}\r\n\r\n"
            wire.record("received", "ws-handshake", resp.encode())
        self.ws = ws
        if self.session_id is not None:
            last = self.chosen[-1] if self.chosen else frames.NO_TOKEN
            self._send(frames.Attach(self.session_id, len(self.chosen), last).encode())
        else:
            self._send(frames.Open(self.prompt, self.llm.k, self.max_new_tokens, list(self.chosen), self.llm.packed).encode())
        self._expect_ready = True

    def _send(self, data: bytes, token: bool = False) -> None:
        if self.llm.wire is not None:
            self.llm.wire.record("sent", "ws-message", data)
        self.ws.send(data)
        if token:
            self.llm.bytes_up += len(data)

    def _recv(self):
        data = self.ws.recv(timeout=self.llm.retry.recv_timeout_s)
        if isinstance(data, str):
            data = data.encode()
        if self.llm.wire is not None:
            self.llm.wire.record("received", "ws-message", data)
        try:
            return frames.decode_downlink(data), len(data)
        except frames.FrameError as e:
            raise CloudError(f"unreadable frame from the cloud: {e.reason}") from None

    def _receive_dist(self) -> frames.Dist:
        if getattr(self, "_expect_ready", False):
            msg, _ = self._recv()
            if not isinstance(msg, frames.Ready):
                raise CloudError("the cloud did not answer OPEN with READY")
            self.session_id, self._expect_ready = msg.session_id, False
        msg, n = self._recv()
        if not isinstance(msg, frames.Dist):
            raise CloudError("expected a DIST frame from the cloud")
        if msg.position != len(self.chosen) or msg.vocab_size != self.llm.vocab_size:
            raise CloudError(f"the cloud is out of step (position {msg.position}, expected {len(self.chosen)})")
        self.llm.bytes_down += n
        self.llm.frames_down += 1
        return msg

    def _log_close(self, direction: str, code: int, reason: str) -> None:
        if self.llm.wire is not None:
            self.llm.wire.record(direction, "ws-close", code.to_bytes(2, "big") + reason.encode())
