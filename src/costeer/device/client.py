"""The WebSocket source: the LLM behind `costeer serve` as a next-token source.

    from costeer import CoSteer
    from costeer.device import connect_cloud
    from costeer.engine.models import load_lm

    llm = connect_cloud("ws://127.0.0.1:8765", k=256)          # key from COSTEER_API_KEY
    cs = CoSteer(llm, load_lm("smollm2-135m-instruct"))       # the SLM runs here, with the context
    print(cs.generate("Plan my weekend.", context="I live in Lisbon.").text)

`CloudLLM` stands where CoSteer expects the LLM: it has the LLM's tokenizer (downloaded from
the cloud once and cached by fingerprint), logit width and stop ids, and `connect()` makes
the next-token source for one generation. `engine.loop.decode` runs unchanged over it.

Per token, `CloudSource.advance` sends the chosen id, runs the SLM pair's forward (ahead.py) while
the cloud computes and sends its answer (both depend only on the previous token; the socket is
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
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from costeer import frames
from costeer.device.ahead import SteeringAhead
from costeer.device.options import DEFAULT_FRAMES, DEFAULT_K, CloudFrames, check_tail
from costeer.device.tokenizers import cached_tokenizer, store_tokenizer, tokenizer_dir
from costeer.device.transport import CloudError, HttpClient, Retry, cloud_urls
from costeer.device.wire import WireLog, redact_headers
from costeer.engine.loop import LLMSide, SteeringSource
from costeer.engine.vocab import VocabMap

# With the names this module offered before the split (they now live in the modules above).
__all__ = ["DEFAULT_FRAMES", "DEFAULT_K", "CloudError", "CloudFrames", "CloudLLM", "CloudSource", "Retry",
           "SteeringAhead", "cached_tokenizer", "connect_cloud", "tokenizer_dir"]  # fmt: skip

log = logging.getLogger("costeer.device")

# Close codes after which trying again cannot help: the request itself is refused.
_FATAL = {frames.CLOSE_MALFORMED, frames.CLOSE_UNAUTHORIZED, frames.CLOSE_TOO_LARGE, frames.CLOSE_INVALID,
          frames.CLOSE_VERSION, frames.CLOSE_ENDED, frames.CLOSE_BUSY, 1008, 1009}  # fmt: skip


class CloudLLM(LLMSide):
    """The LLM behind a costeer cloud service, as CoSteer's `llm` (see the module docs)."""

    remote = True  # CoSteer refuses `llm_context` with a remote LLM: it would send the context

    def __init__(self, ws_url: str, api_key: str, info: dict, tokenizer, frames_: CloudFrames = CloudFrames(DEFAULT_K),
                 tail: str = "slm", wire: WireLog | None = None, retry: Retry = Retry()):  # fmt: skip
        self.ws_url, self.api_key, self.info = ws_url, api_key, info
        self.name = info.get("model", "cloud")
        self.tokenizer = tokenizer
        self.vocab_size = int(info["vocab_size"])
        self.stop_ids = frozenset(int(i) for i in info["stop_ids"])
        self.device = torch.device("cpu")
        self.frames, self.tail, self.wire, self.retry = frames_, check_tail(tail), wire, retry
        self.bytes_down = self.bytes_up = self.frames_down = 0  # DIST payload bytes / TOKEN payload bytes

    @property
    def k(self) -> int:
        return self.frames.k

    @property
    def packed(self) -> bool:
        return self.frames.packed

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def connect(self, prompt_ids: list[int], vocab: VocabMap, max_new_tokens: int,
                steering: SteeringSource | None = None) -> tuple[CloudSource, SteeringAhead | None]:  # fmt: skip
        """LLMSide: one cloud session over `prompt_ids`; the steering source (the SLM pair) comes
        back wrapped so that its forwards run while the cloud answers."""
        ahead = SteeringAhead(steering, vocab, self.vocab_size) if steering is not None else None
        return CloudSource(self, prompt_ids, max_new_tokens, ahead), ahead


def connect_cloud(url: str, api_key: str | None = None, k: CloudFrames | int | str = DEFAULT_FRAMES,
                  tail: str = "slm", wire_log: str | Path | WireLog | None = None,
                  retry: Retry = Retry()) -> CloudLLM:  # fmt: skip
    """Ask the cloud what it serves and fetch its tokenizer (cached by fingerprint).
    k: the frames to ask for (options.CloudFrames, or its text: 'full', a top-k size, 'packed[:N]')."""
    frames_ = CloudFrames.parse(k)
    api_key = api_key if api_key is not None else os.environ.get("COSTEER_API_KEY", "")
    if not api_key:
        raise CloudError("no API key: set COSTEER_API_KEY")
    base, ws_url = cloud_urls(url)
    wire = WireLog(wire_log) if isinstance(wire_log, (str, Path)) else wire_log
    http = HttpClient(base, api_key, wire)
    try:
        info = http.get_json("/v1/info")
        if info.get("frame_version") != frames.VERSION:
            raise CloudError(f"the cloud speaks frame version {info.get('frame_version')}, this device {frames.VERSION}")
        fp = info["tokenizer_fingerprint"]
        tok = cached_tokenizer(fp)
        if tok is None:
            store_tokenizer(fp, http.get_json("/v1/tokenizer")["files"])
            tok = cached_tokenizer(fp)
        if frames.tokenizer_fingerprint(tok) != fp:
            raise CloudError("the tokenizer fetched from the cloud does not match its fingerprint")
    finally:
        http.close()
    if wire is not None:
        wire.meta(url=ws_url, model=info.get("model"), tokenizer_fingerprint=fp, tokenizer_dir=str(tokenizer_dir(fp)))
    return CloudLLM(ws_url, api_key, info, tok, frames_, tail, wire, retry)


class CloudSource:
    """A NextTokenSource over the cloud's WebSocket (one generation, one session)."""

    def __init__(self, llm: CloudLLM, prompt_ids: list[int], max_new_tokens: int, ahead: SteeringAhead | None = None):
        self.llm, self.max_new_tokens, self.ahead = llm, max_new_tokens, ahead
        self.ws = None
        self.session_id: bytes | None = None
        self.prompt: list[int] = list(prompt_ids)  # the public query's prompt (OPEN sends it)
        self.chosen: list[int] = []
        self.reconnects = 0

    # -- NextTokenSource ---------------------------------------------------------------

    def start(self) -> Tensor:
        self.chosen, self.session_id = [], None
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
