"""Sessions, limits and API keys of the cloud service.

A session is one LLM decode state (a DecodeBatch with its KV cache) on a public prompt, owned
by the API key that opened it. It lives while a WebSocket is attached to it; after an
abnormal drop it waits `idle_timeout_s` for the device to re-attach, then it is evicted and
its memory freed. Session ids are 128 random bits; a session is only ever found together
with its owner, so a foreign id and an unknown id look the same (404 / close 4404).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from costeer import frames
from costeer.engine.models import LM

log = logging.getLogger("costeer.cloud")


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
    idle_timeout_s: float = 120.0  # no message for this long: the session is evicted
    values: str = "f16"  # top-k log-probabilities: f16 | f32
    packed_floor: float = frames.PACKED_FLOOR  # packed frames hold every token at least this likely (log)
    # connections (costeer.cloud.net): a hostile or broken peer holds a socket for a bounded time
    send_timeout_s: float = 30.0  # a peer that has not taken a frame or a close within this is dropped
    handshake_timeout_s: float = 10.0  # a whole HTTP request, then a WebSocket's OPEN or ATTACH
    max_connections: int = 256  # open sockets, HTTP and WebSocket; more are answered 503 at once

    def __post_init__(self):
        if not self.api_keys:
            raise ValueError("no API keys: set COSTEER_API_KEYS (comma-separated) or give --api-keys-file")
        if min(self.send_timeout_s, self.handshake_timeout_s, self.idle_timeout_s) <= 0 or self.max_connections < 1:
            raise ValueError("timeouts must be positive and max_connections at least 1")

    @property
    def max_uplink_bytes(self) -> int:
        """The largest OPEN frame these limits allow (the server refuses bigger messages)."""
        return 64 + 4 * (self.max_prompt_tokens + self.max_new_tokens)


def read_api_keys(env_value: str | None, keys_file: str | Path | None) -> frozenset[str]:
    """Keys from a comma-separated string and/or a file (one per line, # comments)."""
    keys = {k.strip() for k in (env_value or "").split(",") if k.strip()}
    if keys_file is not None:
        p = Path(keys_file).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"API keys file not found: {keys_file}")
        for line in p.read_text().splitlines():
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
    batch: object | None = None  # LM.open(...): the decode state with its KV cache
    last_frame: bytes | None = None  # the DIST for the current position (re-sent on ATTACH)
    attached: bool = True
    ended: bool = False
    busy: bool = False  # a forward is running
    last_active: float = field(default_factory=time.monotonic)
    websocket: object | None = None

    @property
    def position(self) -> int:
        return len(self.generated)

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
        }


class Registry:
    """All sessions of one server; the forwards run outside it (callers use a thread)."""

    def __init__(self, lm: LM, settings: ServerSettings):
        self.lm, self.settings = lm, settings
        self.sessions: dict[bytes, Session] = {}

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
        bad = next((t for t in [*msg.prompt_ids, *msg.generated] if t >= V), None)
        if bad is not None:
            raise ProtocolError(frames.CLOSE_INVALID, f"token id {bad} is outside the vocabulary (size {V})")
        self._check_capacity(owner)
        sid = secrets.token_bytes(frames.SESSION_ID_BYTES)
        sess = Session(sid, owner, msg.k, msg.max_new_tokens, list(msg.prompt_ids), msg.packed)
        sess.generated = list(msg.generated)
        self.sessions[sid] = sess
        log.info("session %s… opened: %d prompt tokens, %d resumed, k=%s%s",
                 sid.hex()[:8], len(msg.prompt_ids), len(msg.generated), msg.k or "full",
                 " packed" if msg.packed else "")  # fmt: skip
        return sess

    def _check_capacity(self, owner: str) -> None:
        s = self.settings
        if len(self.sessions) >= s.max_sessions:
            raise ProtocolError(frames.CLOSE_BUSY, f"server busy: {len(self.sessions)} sessions open (limit {s.max_sessions})")
        mine = sum(1 for x in self.sessions.values() if x.owner == owner)
        if mine >= s.max_sessions_per_key:
            raise ProtocolError(frames.CLOSE_BUSY, f"this key has {mine} sessions open (limit {s.max_sessions_per_key})")

    def find(self, owner: str, sid: bytes) -> Session:
        """The owner's session, else 4404 (a foreign session is indistinguishable from none)."""
        sess = self.sessions.get(sid)
        if sess is None or sess.ended or not hmac.compare_digest(sess.owner, owner):
            raise ProtocolError(frames.CLOSE_UNKNOWN_SESSION, "unknown session")
        return sess

    def end(self, sess: Session, why: str) -> None:
        if not sess.ended:
            sess.ended = True
            if sess.batch is not None:
                sess.batch.close()  # frees the KV cache (llama.cpp: the whole context)
            sess.batch = None
            sess.last_frame = None
            self.sessions.pop(sess.id, None)
            log.info("session %s… ended (%s) after %d tokens", sess.id.hex()[:8], why, sess.position)

    def idle(self, now: float | None = None) -> list[Session]:
        """Sessions past the idle timeout (detached or attached)."""
        now = time.monotonic() if now is None else now
        limit = self.settings.idle_timeout_s
        return [x for x in self.sessions.values() if not x.busy and now - x.last_active > limit]

    # -- forwards (blocking; run them in a worker thread) --------------------------------

    def _frame(self, sess: Session, logp: Tensor) -> bytes:
        if sess.packed:
            sess.last_frame = frames.encode_packed(logp, sess.k, sess.position, self.settings.packed_floor)
        else:
            sess.last_frame = frames.encode_dist(logp, sess.k, sess.position, self.settings.values)
        return sess.last_frame

    def start(self, sess: Session) -> bytes:
        """Prefill the prompt, then replay resumed tokens one by one: the state is exactly the
        one an uninterrupted session would hold (a one-shot prefill would differ in rounding)."""
        if sess.batch is not None:
            sess.batch.close()
        sess.batch = self.lm.open([sess.prompt], sess.max_new_tokens + 1)
        logp = sess.batch.start()[0]
        for t in sess.generated:
            logp = sess.batch.advance([t])[0]
        return self._frame(sess, logp)

    def check_token(self, sess: Session, token_id: int) -> None:
        if token_id >= self.lm.vocab_size:
            raise ProtocolError(frames.CLOSE_INVALID, f"token id {token_id} is outside the vocabulary (size {self.lm.vocab_size})")
        if sess.position + 1 > sess.max_new_tokens:
            raise ProtocolError(frames.CLOSE_TOO_LARGE, f"the session reached its {sess.max_new_tokens} new tokens")

    def advance(self, sess: Session, token_id: int) -> bytes:
        batch = sess.batch
        if batch is None:
            raise ProtocolError(frames.CLOSE_ENDED, "the session has ended")
        logp = batch.advance([token_id])[0]
        sess.generated.append(token_id)
        return self._frame(sess, logp)
