"""Sessions, limits and API keys of the cloud service.

A session is one LLM sequence (its KV cache) on a public prompt, owned by the API key that
opened it; the scheduler (cloud/scheduler.py) owns every sequence and runs every forward. It lives while a WebSocket is attached to it; after an
abnormal drop it waits `idle_timeout_s` for the device to re-attach, then it is evicted and
its memory freed. Session ids are 128 random bits; a session is only ever found together
with its owner, so a foreign id and an unknown id look the same (404 / close 4404).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
import asyncio
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from costeer import frames
from costeer.cloud.lookahead import Controller, RoundPlanner
from costeer.cloud.scheduler import FLUSH_S, Job, Released, Scheduler
from costeer.engine.models import LM

log = logging.getLogger("costeer.cloud")

SLOW_SEND_S = 0.002  # a frame handed to a socket that takes it: well under a millisecond (loopback and TCP alike)


class Outbox:
    """A streamed session's round frames, from the scheduler thread to its connection, in order:
    (frame, nodes in it, whether it starts a round), or the exception that ended the round.
    `limit`: the frames of one whole round (depth + 1); a device that reads never leaves more
    waiting when it sends its next uplink, so more means it stopped reading (`room`).

    The scheduler waits for the frames it posted to be handed to the socket (`drain`) before its
    next forward: the event loop that sends them shares the cloud's core with the forwards, and under
    load a root made just before the first level's forward left behind it: 5.7-8.4 ms from the start
    of its encoding to its send (medians, SmolLM2 on llama.cpp at 50 ms RTT, load average 5), 1.5-3.2
    ms with the wait (load average 4), the encoding included; the same for each level's frame."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int):
        self.loop, self.queue, self.limit = loop, asyncio.Queue(), limit
        self._cv = threading.Condition()
        self._unsent = 0  # posted, not yet through the pump
        self._sending_since: float | None = None  # a send under way (monotonic), None between sends
        self._pumped = False  # a pump sends from it (none before READY: the first root waits for it)
        self._closed = False
        self._slow = False  # its last send took longer than SLOW_SEND_S: not waited for until one does not

    def post(self, item) -> None:
        with self._cv:
            self._unsent += 1
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def start(self) -> None:
        """A pump sends from it from now on."""
        with self._cv:
            self._pumped = True

    def sending(self) -> None:
        """The pump took a frame and starts its send."""
        with self._cv:
            self._sending_since = time.monotonic()

    def sent(self) -> None:
        """The pump is done with a frame."""
        with self._cv:
            self._unsent -= 1
            self._slow = self._sending_since is not None and time.monotonic() - self._sending_since > SLOW_SEND_S
            self._sending_since = None
            self._cv.notify_all()

    def close(self) -> None:
        """The pump stopped: nothing posted will leave any more."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def drain(self, deadline: float) -> bool:
        """Scheduler thread: wait until every posted frame has been handed to the socket, at most until
        `deadline` (monotonic) -> whether they were. Not waited for: a send under way for longer than
        SLOW_SEND_S, or an outbox whose last send took longer (a device that reads slowly or not at all,
        a full socket: handing a frame to a socket that takes it is far quicker, and a device must not
        pace the other sessions' forwards by how it reads), an outbox whose pump has not started (before
        READY) or has stopped."""
        with self._cv:
            while self._unsent > 0 and self._pumped and not self._closed:
                now = time.monotonic()
                if self._slow or now >= deadline or (self._sending_since is not None and now - self._sending_since > SLOW_SEND_S):
                    return False
                self._cv.wait(min(deadline - now, FLUSH_S))
            return True

    async def room(self, timeout: float) -> bool:
        """Wait until at most `limit` frames wait to be sent -> False if they still do after
        `timeout` (the next round must not queue behind them: memory would grow without bound)."""
        deadline = self.loop.time() + timeout
        while self.queue.qsize() > self.limit:
            if self.loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True


class ProtocolError(Exception):
    """A request the server refuses; `code` is the WebSocket close code (docs/wire-format.md)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class ServerSettings:
    api_keys: frozenset[str]
    max_sessions: int = 16  # open sessions in all, attached or waiting to be re-attached
    max_sessions_per_key: int = 4
    max_prompt_tokens: int = 4096  # prompt ids in an OPEN (the resumed tokens count separately)
    max_new_tokens: int = 2048  # tokens a session may be fed after its prompt
    # KV cache tokens of all sessions together: each reserves prompt + max_new_tokens at OPEN
    # (llama.cpp: the size of the one shared cache, allocated at start)
    max_kv_tokens: int = 16384
    max_backlog_tokens_per_key: int = 12288  # prompt + replay tokens a key may have waiting
    prefill_chunk_tokens: int = 512  # prompt tokens per forward, and per scheduler tick
    idle_timeout_s: float = 120.0  # no message for this long: the session is evicted
    values: str = "f16"  # top-k log-probabilities: f16 | f32
    packed_floor: float = frames.PACKED_FLOOR  # packed frames hold every token at least this likely (log)
    # connections (costeer.cloud.net): a hostile or broken peer holds a socket for a bounded time
    send_timeout_s: float = 30.0  # a peer that has not taken a frame or a close within this is dropped
    handshake_timeout_s: float = 10.0  # a whole HTTP request, then a WebSocket's OPEN or ATTACH
    max_connections: int = 256  # open sockets, HTTP and WebSocket; more are answered 503 at once
    # look-ahead (cloud/lookahead.py): the largest tree a session may ask for per round
    max_lookahead_depth: int = 16  # levels below the root
    max_lookahead_nodes: int = 64  # nodes, the root included

    def __post_init__(self):
        if not self.api_keys:
            raise ValueError("no API keys: set COSTEER_API_KEYS (comma-separated) or give --api-keys-file")
        if min(self.send_timeout_s, self.handshake_timeout_s, self.idle_timeout_s) <= 0 or self.max_connections < 1:
            raise ValueError("timeouts must be positive and max_connections at least 1")
        if not self.packed_floor <= 0:  # NaN too: a floor no token reaches would send the head alone
            raise ValueError(f"packed_floor must be a log-probability (at most 0), got {self.packed_floor}")
        if not (0 <= self.max_lookahead_depth <= 255 and 1 <= self.max_lookahead_nodes <= 0xFFFF):
            raise ValueError("max_lookahead_depth must be 0-255 and max_lookahead_nodes 1-65535")
        largest = self.max_prompt_tokens + self.max_new_tokens
        for name in ("max_kv_tokens", "max_backlog_tokens_per_key"):
            if getattr(self, name) < largest:
                raise ValueError(f"{name} ({getattr(self, name)}) must hold one largest session: "
                                 f"max_prompt_tokens + max_new_tokens = {largest}")  # fmt: skip

    @property
    def max_uplink_bytes(self) -> int:
        """The largest OPEN frame these limits allow (the server refuses bigger messages)."""
        return 64 + 4 * (self.max_prompt_tokens + self.max_new_tokens)

    def check_lookahead(self, la: frames.Lookahead) -> None:
        if la.on and (la.depth > self.max_lookahead_depth or la.nodes > self.max_lookahead_nodes):
            raise ProtocolError(frames.CLOSE_TOO_LARGE, f"look-ahead of {la.depth} levels and {la.nodes} nodes exceeds "
                                f"the limit of {self.max_lookahead_depth} and {self.max_lookahead_nodes}")  # fmt: skip


def read_api_keys(env_value: str | None, keys_file: str | Path | None) -> frozenset[str]:
    """Keys from a comma-separated string and/or a file (one per line, # comments)."""
    keys = {k.strip() for k in (env_value or "").split(",") if k.strip()}
    if keys_file is not None:
        p = Path(keys_file).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"API keys file not found: {keys_file}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"API keys file {keys_file} is not UTF-8 text (byte {e.start})") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    return frozenset(keys)


class KeyRing:
    """Checks bearer tokens in constant time; a key's owner id is a hash (keys are never stored in sessions)."""

    def __init__(self, keys: frozenset[str]):
        self._keys = [k.encode() for k in keys]

    @staticmethod
    def owner(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    def authenticate(self, authorization: str | None) -> str | None:
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        ok = False
        for k in self._keys:
            ok |= hmac.compare_digest(token.encode(), k)
        return self.owner(token) if ok else None


@dataclass(eq=False)
class Session:
    id: bytes
    owner: str
    k: int
    max_new_tokens: int
    prompt: list[int]
    packed: bool = False  # TOPK_PACKED frames (k: their largest size)
    generated: list[int] = field(default_factory=list)  # tokens fed after the prompt
    last_frame: bytes | None = None  # the DIST for the current position (re-sent on ATTACH)
    attached: bool = True
    started: bool = False  # prompt and replay fed
    ended: bool = False
    busy: bool = False  # a job is queued or running in the scheduler
    last_active: float = field(default_factory=time.monotonic)
    websocket: object | None = None
    lookahead: frames.Lookahead = frames.NO_LOOKAHEAD
    controller: Controller | None = None  # look-ahead sessions: what the rounds' shape follows
    round: RoundPlanner | None = None  # the last round sent (its tree: what the next uplink may follow)
    streamed: bool = False  # rounds as LEVEL frames through `outbox` (the device asked, the pool grows trees)
    outbox: Outbox | None = None  # the attached connection's (server.py sends what it holds)

    @property
    def position(self) -> int:
        return len(self.generated)

    @property
    def kv_tokens(self) -> int:
        """The KV cache this session may fill: its reservation against max_kv_tokens (a look-ahead
        round's nodes hold cells until the next uplink)."""
        return len(self.prompt) + self.max_new_tokens + (self.lookahead.nodes if self.lookahead.on else 0)

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def info(self) -> dict:
        return {
            "id": self.id.hex(),
            "position": self.position,
            "k": self.k,
            "frames": "packed" if self.packed else ("full" if self.k == frames.FULL else "topk"),
            "max_new_tokens": self.max_new_tokens,
            "prompt_tokens": len(self.prompt),
            "attached": self.attached,
            "idle_s": round(time.monotonic() - self.last_active, 3),
            "lookahead": {"mode": self.lookahead.mode, "depth": self.lookahead.depth, "nodes": self.lookahead.nodes,
                          **(self.controller.estimates() if self.controller is not None else {})},
        }


class Registry:
    """All sessions of one server; their forwards go through one Scheduler."""

    def __init__(self, lm: LM, settings: ServerSettings):
        self.lm, self.settings = lm, settings
        self.sessions: dict[bytes, Session] = {}
        pool = lm.open_pool(settings.max_kv_tokens, settings.max_sessions, settings.prefill_chunk_tokens)
        self.scheduler = Scheduler(pool, settings.max_sessions, settings.prefill_chunk_tokens)

    def close(self) -> None:
        for sess in list(self.sessions.values()):
            self.end(sess, "server shutting down")
        self.scheduler.close()

    # -- lifecycle -----------------------------------------------------------------------

    def open(self, owner: str, msg: frames.Open) -> Session:
        """Validate an OPEN against the limits and reserve a session (no forward yet)."""
        s, V = self.settings, self.lm.vocab_size
        if not msg.prompt_ids:
            raise ProtocolError(frames.CLOSE_INVALID, "the prompt is empty")
        if len(msg.prompt_ids) > s.max_prompt_tokens:
            raise ProtocolError(
                frames.CLOSE_TOO_LARGE, f"prompt of {len(msg.prompt_ids)} tokens exceeds the limit of {s.max_prompt_tokens}"
            )
        if msg.max_new_tokens < 1:
            raise ProtocolError(frames.CLOSE_INVALID, "max_new_tokens must be at least 1")
        if msg.max_new_tokens > s.max_new_tokens:
            raise ProtocolError(
                frames.CLOSE_TOO_LARGE, f"max_new_tokens {msg.max_new_tokens} exceeds the limit of {s.max_new_tokens}"
            )
        if len(msg.generated) >= msg.max_new_tokens:
            raise ProtocolError(frames.CLOSE_TOO_LARGE, "resumed tokens already reach max_new_tokens")
        window = self.lm.window  # the device leaves this check to the cloud (api.CoSteer._overflow)
        if window is not None and len(msg.prompt_ids) + msg.max_new_tokens > window:
            raise ProtocolError(frames.CLOSE_TOO_LARGE, f"prompt of {len(msg.prompt_ids)} tokens plus max_new_tokens "
                                f"{msg.max_new_tokens} exceeds the model's trained window of {window}")  # fmt: skip
        s.check_lookahead(msg.lookahead)
        bad = next((t for t in [*msg.prompt_ids, *msg.generated] if t >= V), None)
        if bad is not None:
            raise ProtocolError(frames.CLOSE_INVALID, f"token id {bad} is outside the vocabulary (size {V})")
        sid = secrets.token_bytes(frames.SESSION_ID_BYTES)
        sess = Session(sid, owner, msg.k, msg.max_new_tokens, list(msg.prompt_ids), msg.packed, lookahead=msg.lookahead)
        self._check_capacity(owner, sess.kv_tokens, len(msg.prompt_ids) + len(msg.generated))
        sess.generated = list(msg.generated)
        if msg.lookahead.on:
            sess.controller = Controller(msg.lookahead)
            sess.streamed = msg.lookahead.streamed and hasattr(self.scheduler.pool, "grow")
        self.sessions[sid] = sess
        log.info("session %s… opened: %d prompt tokens, %d resumed, k=%s%s",
                 sid.hex()[:8], len(msg.prompt_ids), len(msg.generated), msg.k or "full",
                 " packed" if msg.packed else "")  # fmt: skip
        return sess

    def _check_capacity(self, owner: str, kv_tokens: int, backlog: int) -> None:
        """Session count, KV memory and this key's queued prompt/replay work, each against its limit."""
        s = self.settings
        if len(self.sessions) >= s.max_sessions:
            raise ProtocolError(frames.CLOSE_BUSY, f"server busy: {len(self.sessions)} sessions open (limit {s.max_sessions})")
        mine = [x for x in self.sessions.values() if x.owner == owner]
        if len(mine) >= s.max_sessions_per_key:
            raise ProtocolError(frames.CLOSE_BUSY, f"this key has {len(mine)} sessions open (limit {s.max_sessions_per_key})")
        reserved = sum(x.kv_tokens for x in self.sessions.values())
        if reserved + kv_tokens > s.max_kv_tokens:
            raise ProtocolError(frames.CLOSE_BUSY, f"server memory busy: {reserved} of {s.max_kv_tokens} KV tokens "
                                f"reserved, this session needs {kv_tokens}")  # fmt: skip
        waiting = self.scheduler.backlog({x.id for x in mine})
        if waiting + backlog > s.max_backlog_tokens_per_key:
            raise ProtocolError(frames.CLOSE_BUSY, f"this key has {waiting} prompt and replay tokens waiting "
                                f"(limit {s.max_backlog_tokens_per_key})")  # fmt: skip

    def find(self, owner: str, sid: bytes) -> Session:
        """The owner's session, else 4404 (a foreign session is indistinguishable from none)."""
        sess = self.sessions.get(sid)
        if sess is None or sess.ended or not hmac.compare_digest(sess.owner, owner):
            raise ProtocolError(frames.CLOSE_UNKNOWN_SESSION, "unknown session")
        return sess

    def end(self, sess: Session, why: str) -> None:
        """Ends at once for everyone; the scheduler drops its queued work and frees its KV cache
        before its next forward (never under one that is running)."""
        if not sess.ended:
            sess.ended = True
            self.scheduler.release(sess.id)
            sess.last_frame = None
            self.sessions.pop(sess.id, None)
            log.info("session %s… ended (%s) after %d tokens", sess.id.hex()[:8], why, sess.position)

    def idle(self, now: float | None = None) -> list[Session]:
        """Sessions past the idle timeout (detached or attached)."""
        now = time.monotonic() if now is None else now
        limit = self.settings.idle_timeout_s
        return [x for x in self.sessions.values() if not x.busy and now - x.last_active > limit]

    # -- forwards (jobs for the scheduler; the frames are made in its thread) --------------

    def _encode(self, sess: Session, logp: Tensor, position: int) -> bytes:
        if sess.packed:
            return frames.encode_packed(logp, sess.k, position, self.settings.packed_floor)
        return frames.encode_dist(logp, sess.k, position, self.settings.values)

    def _frame(self, sess: Session, logp: Tensor, job: Job | None = None, started: float = 0.0) -> bytes:
        """The round's frame: a DIST for the root alone, else a TREE (the job's planner); b"" for a
        streamed round, whose frames go through the session's outbox (`_post_level`)."""
        tree = job.tree if job is not None else None
        if job is not None and job.level is not None:
            sess.last_frame = b""
        elif tree is None or tree.size == 1:
            sess.last_frame = self._encode(sess, logp, sess.position)
        else:
            cloud_us = int((time.perf_counter() - started) * 1e6)
            sess.last_frame = tree.encode(sess.position, lambda lp, pos: self._encode(sess, lp, pos), cloud_us)
        sess.round = tree
        if sess.controller is not None and job is not None:
            sess.controller.step_took(job.step_s)
        return sess.last_frame

    def _planner(self, sess: Session) -> RoundPlanner | None:
        if sess.controller is None or not hasattr(self.scheduler.pool, "grow"):  # a pool without trees: per token
            return None
        return RoundPlanner(sess.controller, extends_branches=getattr(self.scheduler.pool, "extends_branches", True))

    def _job(self, sess: Session, steps: list[int], prompt: list[int] = (), commit: int | None = None) -> Job:
        """A job for the session's next round; a streamed one posts its frames as they are made."""
        job = Job(sess.owner, list(prompt), deque(steps), None, commit=commit, tree=self._planner(sess))
        if sess.streamed and job.tree is not None:
            job.level = lambda rows: self._post_level(sess, job)
            job.flush = lambda deadline: sess.outbox is None or sess.outbox.drain(deadline)
            job.done.add_done_callback(lambda f: self._round_failed(sess, f))
        return job

    def _post_level(self, sess: Session, job: Job) -> None:
        """Scheduler thread: the streamed round's next frame (the root's, then each level's) to the outbox."""
        tree, box = job.tree, sess.outbox
        first = tree.sent == 0
        nodes = tree.size - tree.sent
        frame = tree.level_frame(sess.position, lambda lp, pos: self._encode(sess, lp, pos))
        if box is not None:
            box.post((frame, nodes, first))

    def _round_failed(self, sess: Session, done) -> None:
        error = done.exception()
        if error is not None and not isinstance(error, Released) and sess.outbox is not None:
            sess.outbox.post(error)

    async def stop_round(self, sess: Session) -> None:
        """A streamed session's round grows no further (its device left it, or re-attached); returns
        when the scheduler has let it go (after the forward under way, if any), so its tree can be read."""
        if not sess.streamed:
            return
        done = self.scheduler.stop(sess.id)
        try:
            if done.done():  # the round was done already (the usual case near loopback): no hop through the loop
                done.result()
            else:
                await asyncio.wrap_future(done)
        except Released:
            raise ProtocolError(frames.CLOSE_ENDED, "the session has ended") from None

    def replay(self, sess: Session) -> None:
        """A streamed session re-attached at its round's root: the round as computed, to the outbox."""
        blobs = sess.round.replay(sess.position, lambda lp, pos: self._encode(sess, lp, pos))
        for i, frame in enumerate(blobs):
            sess.outbox.post((frame, 1, i == 0))

    async def _run(self, sess: Session, job: Job) -> bytes:
        if sess.ended:
            raise ProtocolError(frames.CLOSE_ENDED, "the session has ended")
        sess.busy = True
        try:
            return await asyncio.wrap_future(self.scheduler.submit(sess.id, job))
        except Released:
            raise ProtocolError(frames.CLOSE_ENDED, "the session has ended") from None
        finally:
            sess.busy = False

    async def start(self, sess: Session) -> bytes:
        """Prefill the prompt, then replay resumed tokens one by one: the state is exactly the
        one an uninterrupted session would hold (a one-shot prefill would differ in rounding)."""
        started = time.perf_counter()
        job = self._job(sess, sess.generated, sess.prompt)

        def finish(logp: Tensor) -> bytes:
            sess.started = True
            return self._frame(sess, logp, job, started)

        job.finish = finish
        return await self._run(sess, job)

    def check_tokens(self, sess: Session, tokens: list[int]) -> int:
        """An uplink against the session's limits and its last round -> the node of the round's tree
        where the device chose its last token (0: the root). Bad input ends the session."""
        bad = next((t for t in tokens if t >= self.lm.vocab_size), None)
        if bad is not None:
            raise ProtocolError(frames.CLOSE_INVALID, f"token id {bad} is outside the vocabulary (size {self.lm.vocab_size})")
        if sess.position + len(tokens) > sess.max_new_tokens:
            raise ProtocolError(frames.CLOSE_TOO_LARGE, f"the session reached its {sess.max_new_tokens} new tokens")
        tree = sess.round
        allowed = 1 + (tree.max_depth() if tree is not None else 0)
        if len(tokens) > allowed:
            raise ProtocolError(frames.CLOSE_TOO_LARGE, f"{len(tokens)} tokens in one round; its tree allows {allowed}")
        if len(tokens) == 1:
            if tree is not None:
                tree.follow(tokens)
            return 0
        node = tree.follow(tokens)
        if node is None:
            raise ProtocolError(frames.CLOSE_INVALID, "a token off the round's tree is followed by more tokens")
        return node

    async def advance(self, sess: Session, tokens: list[int], node: int) -> bytes:
        """The device's tokens of one round (checked by check_tokens, which gave `node`): keep the path
        to `node` from the round's tree, feed the last token, grow the next round."""
        started = time.perf_counter()
        kept = tokens[:-1]
        job = self._job(sess, [tokens[-1]], commit=node if sess.round is not None else None)

        def finish(logp: Tensor) -> bytes:
            sess.generated.extend(kept)
            sess.generated.append(tokens[-1])
            return self._frame(sess, logp, job, started)

        job.finish = finish
        return await self._run(sess, job)
