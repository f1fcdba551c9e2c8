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

Look-ahead (`lookahead`, docs/wire-format.md): the cloud may answer with a tree of likely
continuations, streamed (the root at once, then a LEVEL frame per level, each announcing the next
level's nodes) or whole (one TREE). While the token the device chose is a child of where it stands,
`advance` takes that node's distribution without asking (the SLM pair still runs once per token),
reading the round's next frames first when the child was announced but has not arrived; when the
choice leaves the tree it sends the round's tokens in one TOKENS frame and waits, as for one token.
Every distribution it uses is the one the cloud would have sent token by token.

Run-ahead (`run_ahead`, on by default where look-ahead is): a token taken from a tree has an SLM
pair forward that no wait hides. So once the pair's forward for the sent token is done, while the
answer has not come (a message is looked for without waiting, and kept for the next read) and the
expected rest of the wait is worth another forward (ahead.Pace), the device feeds its pair the
token it guesses it will choose next, then the one after, up to the round's depth (ahead.py).
Walking the tree, a choice equal to the guess finds its pair computed; the first one that differs
rewinds the guessed tokens and is fed as usual, so every pair distribution is per-token decoding's,
bit for bit. `CloudLLM.guesses` counts the guessed forwards made, used and undone.

A dropped connection is retried with back-off: first by re-attaching to the live session
(ATTACH, with the round's tokens whose answer was lost), else — the cloud restarted, or the session
was evicted — by opening a new one with the query plus the tokens chosen so far, which the cloud
replays. The caller sees one stream.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from costeer import frames
from costeer.device.ahead import Guesses, Pace, SteeringAhead
from costeer.device.options import DEFAULT_FRAMES, DEFAULT_K, CloudFrames, Lookahead, check_tail
from costeer.device.tokenizers import TokenizerRefused, cached_tokenizer, store_tokenizer, tokenizer_dir
from costeer.device.transport import MAX_INFO_BYTES, MAX_TOKENIZER_BYTES, CloudError, HttpClient, Link, Retry, cloud_urls
from costeer.device.wire import WireLog, redact_headers
from costeer.engine.loop import Guess, LLMSide, SteeringSource
from costeer.engine.prefix_cache import PrefixPlan
from costeer.engine.vocab import VocabMap

# With the names this module offered before the split (they now live in the modules above).
__all__ = ["DEFAULT_FRAMES", "DEFAULT_K", "CloudError", "CloudFrames", "CloudLLM", "CloudSource", "Retry",
           "SteeringAhead", "cached_tokenizer", "connect_cloud", "tokenizer_dir"]  # fmt: skip

# Close codes after which trying again cannot help: the request itself is refused.
_FATAL = {frames.CLOSE_MALFORMED, frames.CLOSE_UNAUTHORIZED, frames.CLOSE_TOO_LARGE, frames.CLOSE_INVALID,
          frames.CLOSE_VERSION, frames.CLOSE_ENDED, frames.CLOSE_BUSY, 1008, 1009}  # fmt: skip


MAX_VOCAB = 1 << 24  # 64 times the largest vocabulary in use (Gemma-3: 262,144)


class LookaheadInfo(BaseModel):
    """/v1/info's look-ahead limits (a cloud that speaks the version-2 frames)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    frame_version: int
    max_depth: int = Field(ge=0, le=255)
    max_nodes: int = Field(ge=1, le=0xFFFF)
    streamed: bool = False  # LEVEL frames offered (absent: a cloud with whole rounds only)


class CloudInfo(BaseModel):
    """/v1/info as the device accepts it: every field it reads, typed and bounded (docs/security.md)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field("cloud", max_length=256)
    vocab_size: int = Field(ge=2, le=MAX_VOCAB)
    stop_ids: list[int] = Field(max_length=64)
    tokenizer_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    frame_version: int
    lookahead: LookaheadInfo | None = None  # absent: a cloud without look-ahead

    @model_validator(mode="after")
    def _stop_ids_in_the_vocabulary(self) -> CloudInfo:
        outside = [i for i in self.stop_ids if not 0 <= i < self.vocab_size]
        if outside:
            raise ValueError(f"stop id {outside[0]} is outside the vocabulary ({self.vocab_size})")
        return self

    @classmethod
    def read(cls, answer: dict) -> CloudInfo:
        """The cloud's answer -> CloudInfo; CloudError naming the first field that is wrong."""
        if answer.get("frame_version") != frames.VERSION:
            raise CloudError(f"the cloud speaks frame version {str(answer.get('frame_version'))[:20]}, "
                             f"this device {frames.VERSION}")  # fmt: skip
        try:
            return cls.model_validate(answer)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "info"
            raise CloudError(f"the cloud's /v1/info is malformed: {where}: {err['msg']}") from None


class CloudLLM(LLMSide):
    """The LLM behind a costeer cloud service, as CoSteer's `llm` (see the module docs)."""

    remote = True  # CoSteer refuses `llm_context` with a remote LLM: it would send the context

    def __init__(self, ws_url: str, api_key: str, info: CloudInfo, tokenizer, frames_: CloudFrames = CloudFrames(DEFAULT_K),
                 tail: str = "slm", wire: WireLog | None = None, retry: Retry = Retry(), link: Link = Link(),
                 lookahead: Lookahead | str | int = "off", streamed: bool = True, run_ahead: bool = True):  # fmt: skip
        self.ws_url, self.api_key, self.info = ws_url, api_key, info
        self.name = info.model
        self.tokenizer = tokenizer
        self.vocab_size = info.vocab_size
        self.stop_ids = frozenset(info.stop_ids)
        self.device = torch.device("cpu")
        self.frames, self.tail, self.wire, self.retry = frames_, check_tail(tail), wire, retry
        self.bytes_down = self.bytes_up = self.frames_down = 0  # DIST payload bytes / TOKEN payload bytes
        self.rounds = self.tree_tokens = 0  # round trips (DIST or TREE answers) / tokens taken from trees
        self.lookahead = self._lookahead(Lookahead.parse(lookahead), streamed)  # what OPEN asks for
        # guessed SLM-pair forwards while a round is on its way (ahead.py): with look-ahead only, where
        # tokens taken from trees have forwards no wait hides (per token, every forward is hidden)
        self.run_ahead = run_ahead and self.lookahead.on
        self.guesses, self.pace = Guesses(), Pace()
        # the longest message the device reads: a frame of the kind asked for, one per node (docs/security.md)
        per_node = frames.max_downlink_bytes(self.vocab_size, frames_.k, frames_.packed)
        n = self.lookahead.nodes if self.lookahead.on else 1
        self.max_message_bytes = per_node * n + (frames.tree_overhead(n) if n > 1 else 0)
        self.tls = link.tls() if ws_url.startswith("wss:") else None

    def _lookahead(self, choice: Lookahead, streamed: bool) -> frames.Lookahead:
        limits = self.info.lookahead
        if limits is None or limits.frame_version != frames.LOOKAHEAD_VERSION:
            if choice.on and not choice.auto:
                raise CloudError(f"the cloud does not offer look-ahead (asked for {choice})")
            return frames.NO_LOOKAHEAD  # auto with a cloud that has none: per token, as before
        asked = choice.request(limits.max_depth, limits.max_nodes)
        # streamed rounds wherever the cloud offers them (a cloud without: whole TREE rounds, as before)
        return replace(asked, streamed=asked.on and streamed and limits.streamed)

    @property
    def k(self) -> int:
        return self.frames.k

    @property
    def packed(self) -> bool:
        return self.frames.packed

    def connect(self, prompt_ids: list[int], vocab: VocabMap, max_new_tokens: int,
                steering: SteeringSource | None = None,
                prefix: PrefixPlan | None = None,
                guess: Guess | None = None) -> tuple[CloudSource, SteeringAhead | None]:  # fmt: skip
        """LLMSide: one cloud session over `prompt_ids`; the steering source (the SLM pair) comes
        back wrapped so that its forwards run while the cloud answers (and, with `guess` and
        run_ahead, guessed ones beyond). No `prefix` comes here (LLMSide)."""
        guess = guess if self.run_ahead else None
        ahead = SteeringAhead(steering, vocab, self.vocab_size, guess, self.guesses) if steering is not None else None
        return CloudSource(self, prompt_ids, max_new_tokens, ahead), ahead


def connect_cloud(url: str, api_key: str | None = None, k: CloudFrames | int | str = DEFAULT_FRAMES,
                  tail: str = "slm", wire_log: str | Path | WireLog | None = None, retry: Retry = Retry(),
                  ca_file: str | Path | None = None, insecure: bool = False,
                  lookahead: Lookahead | int | str = "auto", streamed: bool = True, run_ahead: bool = True) -> CloudLLM:  # fmt: skip
    """Ask the cloud what it serves and fetch its tokenizer (cached by fingerprint).
    k: the frames to ask for (options.CloudFrames, or its text: 'full', a top-k size, 'packed[:N]').
    lookahead: 'auto' (default), 'off', N, 'chain:D' or 'tree:D:N' (options.Lookahead); streamed:
    its rounds level by level where the cloud offers it (False: whole TREE rounds, for comparison);
    run_ahead: with look-ahead, guessed SLM-pair forwards while a round is on its way (ahead.py;
    False: none, for comparison; counted in `.guesses`).
    ca_file: the CA bundle wss:// trusts (else SSL_CERT_FILE, else the system's); insecure: allow
    the key over plain ws:// to a host other than this machine."""
    frames_ = CloudFrames.parse(k)
    lookahead = Lookahead.parse(lookahead)
    api_key = api_key if api_key is not None else os.environ.get("COSTEER_API_KEY", "")
    if not api_key:
        raise CloudError("no API key: set COSTEER_API_KEY")
    base, ws_url = cloud_urls(url)
    link = Link(ca_file, insecure)
    wire = WireLog(wire_log) if isinstance(wire_log, (str, Path)) else wire_log
    http = HttpClient(base, api_key, wire, link=link)
    try:
        info = CloudInfo.read(http.get_json("/v1/info", MAX_INFO_BYTES))
        fp = info.tokenizer_fingerprint
        tok = cached_tokenizer(fp)
        if tok is None:
            files = http.get_json("/v1/tokenizer", MAX_TOKENIZER_BYTES).get("files")
            try:
                tok = store_tokenizer(fp, files)
            except TokenizerRefused as e:
                raise CloudError(f"refused the cloud's tokenizer: {e}") from None
        elif frames.tokenizer_fingerprint(tok) != fp:  # the cache was changed on the device itself
            raise CloudError(f"the cached tokenizer {tokenizer_dir(fp)} does not match its fingerprint: remove it")
    finally:
        http.close()
    if wire is not None:
        wire.meta(url=ws_url, model=info.model, tokenizer_fingerprint=fp, tokenizer_dir=str(tokenizer_dir(fp)))
    return CloudLLM(ws_url, api_key, info, tok, frames_, tail, wire, retry, link, lookahead, streamed, run_ahead)


class CloudSource:
    """A NextTokenSource over the cloud's WebSocket (one generation, one session)."""

    def __init__(self, llm: CloudLLM, prompt_ids: list[int], max_new_tokens: int, ahead: SteeringAhead | None = None):
        self.llm, self.max_new_tokens, self.ahead = llm, max_new_tokens, ahead
        self.ws = None
        self.session_id: bytes | None = None
        self.prompt: list[int] = list(prompt_ids)  # the public query's prompt (OPEN sends it)
        self.chosen: list[int] = []
        self.reconnects = 0
        self.tree: frames.Round | None = None  # the round the device is in
        self.node = 0  # where it stands in that round's tree
        self.pending: list[int] = []  # the round's tokens sent up, whose answer has not come yet
        self._held: tuple | None = None  # a message _arrived() read (decoded, its size), for the next _recv
        self._held_at: float | None = None  # when it was read
        self._stale = 0  # frames of a left round dropped while waiting for this exchange's answer

    # -- NextTokenSource ---------------------------------------------------------------

    def start(self) -> Tensor:
        self.chosen, self.session_id = [], None
        hook = self.ahead.run_start if self.ahead else None
        return self._enter(self._exchange(None, hook), 0)

    def advance(self, token_id: int) -> Tensor:
        token_id = int(token_id)
        self.chosen.append(token_id)
        child = self.tree.child(self.node, token_id) if self.tree is not None else None
        if child is not None:  # the cloud computed this one ahead (or is sending it): no round trip
            if self.ahead is not None:
                self.ahead.run_advance(token_id)  # first: the node may arrive meanwhile
            if not self.tree.ready(child) and not self._await(child):  # the connection dropped meanwhile
                self.reconnects += 1  # resume there: the cloud starts a fresh round after these tokens
                return self._enter(self._exchange(self.tree.path(child), None), 0)
            self.llm.tree_tokens += 1
            return self._enter(self.tree, child)
        tokens = (self.tree.path(self.node) if self.tree is not None else []) + [token_id]
        hook = (lambda: self.ahead.run_advance(token_id)) if self.ahead else None
        return self._enter(self._exchange(tokens, hook), 0)

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

    def _await(self, node: int) -> bool:
        """Read the streamed round's frames until `node` (announced) has arrived; False when the
        connection dropped or no frame came within recv_timeout_s (the caller resumes there)."""
        import websockets.exceptions as wse

        try:
            while not self.tree.ready(node):
                msg, n = self._recv()
                if not isinstance(msg, frames.Level) or msg.position != self.tree.position:
                    self._refuse(frames.CLOSE_MALFORMED, f"expected the next LEVEL frame of the round at "
                                 f"{self.tree.position}, got a {type(msg).__name__.upper()}")  # fmt: skip
                try:
                    self.tree.add(msg)
                except frames.FrameError as e:
                    self._refuse(e.code, e.reason)
                self.llm.bytes_down += n
                self.llm.frames_down += len(msg.dists)
            return True
        except wse.ConnectionClosed as e:
            code, reason = (e.rcvd.code, e.rcvd.reason) if e.rcvd else (1006, "connection lost")
            self._log_close("received", code, reason)
            if code in _FATAL:
                self._drop()
                raise CloudError(f"the cloud closed the session: {code} {reason}", code) from None
        except (OSError, TimeoutError):
            pass
        self._drop()
        return False

    def _enter(self, tree: frames.Round, node: int) -> Tensor:
        """Stand at `node` of `tree` -> its [V] log-probabilities."""
        self.tree, self.node = tree, node
        dist = tree.dists[node]
        use_slm = self.llm.tail == "slm" and self.ahead is not None and not dist.full
        return frames.densify(dist, self.ahead.reference() if use_slm else None)

    def _exchange(self, tokens: list[int] | None, hook) -> frames.Round:
        """Send the round's tokens (or OPEN/ATTACH on a new connection), run `hook` once while the
        cloud works, then read the answer; reconnect and resume on a dropped connection."""
        import websockets.exceptions as wse

        self.pending = list(tokens or [])
        outage = None  # the run of failures this exchange is in, if any
        while True:
            sent_at, self._held_at, self._stale = time.perf_counter(), None, 0
            try:
                if self.ws is None:
                    self._connect_and_open()
                elif tokens is not None:
                    up = frames.Token(tokens[0]) if len(tokens) == 1 else frames.Tokens(tuple(tokens))
                    self._send(up.encode(), token=True)
                tokens = None  # a reconnection re-sends them inside OPEN / ATTACH
                if hook is not None:
                    hook, h = None, hook
                    h()
                    self._run_ahead(sent_at)
                tree = self._receive_round()
                if self.chosen and outage is None:  # a round trip (not an OPEN's, which waits for a prefill)
                    self.llm.pace.waited((self._held_at or time.perf_counter()) - sent_at)
                self.pending = []
                return tree
            except wse.InvalidStatus as e:
                status = e.response.status_code
                body = e.response.body.decode("utf-8", "replace") if e.response.body else ""
                if status in (401, 403):
                    raise CloudError(f"the cloud refused the connection: HTTP {status} {body}".strip(), status) from None
                err = f"HTTP {status}"
            except wse.ConnectionClosed as e:
                if e.rcvd is None and e.sent is not None and e.sent.code == 1009:  # websockets' max_size
                    self._drop()
                    raise CloudError(f"the cloud sent a message larger than {self.llm.max_message_bytes:,} bytes, "
                                     "the largest frame of the kind asked for") from None  # fmt: skip
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
            outage = outage or self.llm.retry.outage()
            if not outage.wait(err):
                raise CloudError(f"lost the cloud at {self.llm.ws_url} and could not resume within "
                                 f"{self.llm.retry.budget_s:g} s ({outage.tries} retries; {err})") from None  # fmt: skip
            self.reconnects += 1

    def _run_ahead(self, sent_at: float) -> None:
        """While the answer has not come, and the rest of the wait is worth it (ahead.Pace), feed the
        SLM pair guessed tokens, one forward at a time: at most a round's depth beyond the chosen
        tokens, never past the generation's last token. Only where the rounds look ahead."""
        ahead, llm, clock = self.ahead, self.llm, time.perf_counter
        if ahead is None or ahead.guess is None or (self.tree is not None and self.tree.size == 1):
            return
        room = min(llm.lookahead.depth, self.max_new_tokens - 1 - len(self.chosen))
        while len(ahead.guessed) < room and llm.pace.worth(clock() - sent_at, llm.guesses.hit_rate):
            if self._arrived():
                return
            t = clock()
            if not ahead.run_guess():
                return
            llm.pace.forwarded(clock() - t)

    def _arrived(self) -> bool:
        """Whether the answer has come (a message other than a left round's frames); it is read,
        and kept for the next _recv."""
        while self._held is None:
            try:
                got = self._recv(timeout=0)
            except TimeoutError:
                return False
            if not self._left_behind(*got):
                self._held, self._held_at = got, time.perf_counter()
        return True

    def _left_behind(self, msg, n: int) -> bool:
        """Whether `msg` is a LEVEL frame of a round the device has left (earlier positions: the
        rest of a streamed round still on its way); dropped, at most a round's levels of them."""
        if not (isinstance(msg, frames.Level) and msg.position < len(self.chosen)):
            return False
        self.llm.bytes_down += n
        self._stale += 1
        if self._stale > self.llm.lookahead.depth:  # a round has at most depth + 1 frames, its root's not among these
            self._refuse(frames.CLOSE_MALFORMED, "more LEVEL frames of a left round than it can have")
        return True

    def _drop(self) -> None:
        self._held = None
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
            max_size=self.llm.max_message_bytes,
            open_timeout=10,
        )
        if self.llm.tls is not None:
            kw["ssl"] = self.llm.tls
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
            if len(self.pending) > 1:  # a round's tokens whose answer was lost: the long form
                attach = frames.Attach(self.session_id, len(self.chosen), pending=tuple(self.pending))
            else:
                attach = frames.Attach(self.session_id, len(self.chosen), self.chosen[-1] if self.chosen else frames.NO_TOKEN)
            self._send(attach.encode())
        else:
            self._send(frames.Open(self.prompt, self.llm.k, self.max_new_tokens, list(self.chosen), self.llm.packed,
                                   self.llm.lookahead).encode())  # fmt: skip
        self._expect_ready = True

    def _send(self, data: bytes, token: bool = False) -> None:
        if self.llm.wire is not None:
            self.llm.wire.record("sent", "ws-message", data)
        self.ws.send(data)
        if token:
            self.llm.bytes_up += len(data)

    def _recv(self, timeout: float | None = None):
        """The next message -> (decoded, its size): one _arrived() kept, else from the socket
        (waiting up to `timeout`, by default recv_timeout_s)."""
        if self._held is not None:
            held, self._held = self._held, None
            return held
        data = self.ws.recv(timeout=self.llm.retry.recv_timeout_s if timeout is None else timeout)
        if isinstance(data, str):
            data = data.encode()
        if self.llm.wire is not None:
            self.llm.wire.record("received", "ws-message", data)
        try:
            return frames.decode_downlink(data), len(data)
        except frames.FrameError as e:
            self._refuse(e.code, e.reason)

    def _refuse(self, code: int, reason: str):
        """A frame the device cannot use: close with `code` (the cloud ends the session and frees
        it: docs/wire-format.md) and stop with one clear error."""
        if self.ws is not None:
            try:
                self.ws.close(code, reason[:120])
            except Exception:  # noqa: BLE001 - the connection may already be gone
                pass
            self._log_close("sent", code, reason[:120])
            self.ws = None
        raise CloudError(f"unreadable frame from the cloud: {reason}", code)

    def _receive_round(self) -> frames.Round:
        """The next round's first frame (a DIST, a TREE, or a streamed round's root); the rest of a
        streamed round the device left (earlier positions) is dropped, at most a round's levels of it."""
        if getattr(self, "_expect_ready", False):
            msg, _ = self._recv()
            if not isinstance(msg, frames.Ready):
                raise CloudError("the cloud did not answer OPEN with READY")
            self.session_id, self._expect_ready = msg.session_id, False
        asked = self.llm.lookahead
        msg, n = self._recv()
        while self._left_behind(msg, n):
            msg, n = self._recv()
        self.llm.bytes_down += n
        if not isinstance(msg, (frames.Dist, frames.Tree, frames.Level)):
            raise CloudError("expected a DIST, TREE or LEVEL frame from the cloud")
        if isinstance(msg, frames.Level) and not asked.streamed:
            self._refuse(frames.CLOSE_MALFORMED, "a LEVEL frame; this device asked for whole rounds")
        if msg.position != len(self.chosen):
            raise CloudError(f"the cloud is out of step (position {msg.position}, expected {len(self.chosen)})")
        try:
            round_ = frames.Round.of(msg, asked)
        except frames.FrameError as e:
            self._refuse(e.code, e.reason)
        if round_.dists[0].vocab_size != self.llm.vocab_size:
            raise CloudError(f"the cloud sent a distribution over {round_.dists[0].vocab_size} tokens, expected {self.llm.vocab_size}")
        self.llm.frames_down += len(round_.dists)
        self.llm.rounds += 1
        return round_

    def _log_close(self, direction: str, code: int, reason: str) -> None:
        if self.llm.wire is not None:
            self.llm.wire.record(direction, "ws-close", code.to_bytes(2, "big") + reason.encode())
