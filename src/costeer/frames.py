"""The wire format between the device and the cloud (docs/wire-format.md): binary WebSocket
frames, little-endian, each starting with a version byte and a message-type byte.

Both sides import this module and nothing else of each other (DESIGN.md: `cloud` never
imports `device`). The cloud turns its next-token log-probabilities into a DIST frame with
`encode_dist`; the device reads it back with `decode_downlink` and rebuilds a full [V]
log-probability vector with `densify`, the one place that decides how the mass outside the
top-k (the tail) is spread. Improving the representation means changing these functions.

Uplink (device -> cloud) carries only token ids: the public query's prompt ids (OPEN), the
tokens chosen so far when resuming (OPEN, ATTACH) and one chosen id per step (TOKEN). There is
no message that could carry context text, SLM outputs or deltas, and the cloud alone decides
what a DIST frame holds (the device never names tokens it wants probabilities for).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from torch import Tensor

VERSION = 1

# message types
OPEN, ATTACH, TOKEN = 0x01, 0x02, 0x03  # uplink
READY, DIST = 0x81, 0x82  # downlink

# DIST encodings
FULL_F32, TOPK_F16, TOPK_F32 = 0, 1, 2

NO_TOKEN = 0xFFFFFFFF
SESSION_ID_BYTES = 16
FULL = 0  # the `k` that asks for the whole vocabulary

# WebSocket close codes (4000-4999 are the application's); docs/wire-format.md lists them.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011
CLOSE_MALFORMED = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_IDLE = 4408
CLOSE_ORDER = 4409
CLOSE_ENDED = 4410
CLOSE_TOO_LARGE = 4413
CLOSE_INVALID = 4422
CLOSE_VERSION = 4426
CLOSE_BUSY = 4429

_OPEN = struct.Struct("<BBHIIII")  # version, type, flags, k, max_new_tokens, n_prompt, n_generated
_ATTACH = struct.Struct(f"<BBH{SESSION_ID_BYTES}sII")  # version, type, 0, session id, n_generated, last token
_TOKEN = struct.Struct("<BBI")  # version, type, token id
_READY = struct.Struct(f"<BBH{SESSION_ID_BYTES}sII")  # version, type, 0, session id, vocab size, position
_DIST = struct.Struct("<BBBBIIIf")  # version, type, encoding, id width, position, V, k, log tail mass


class FrameError(ValueError):
    """A frame that cannot be read; `code` is the WebSocket close code to answer with."""

    def __init__(self, reason: str, code: int = CLOSE_MALFORMED):
        super().__init__(reason)
        self.code, self.reason = code, reason


# ---------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    """Start a session on the public prompt; `generated` (resume) are tokens already chosen."""

    prompt_ids: list[int]
    k: int = FULL  # 0 = the full vocabulary
    max_new_tokens: int = 128
    generated: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        ids = list(self.prompt_ids) + list(self.generated)
        head = _OPEN.pack(VERSION, OPEN, 0, self.k, self.max_new_tokens, len(self.prompt_ids), len(self.generated))
        return head + np.asarray(ids, dtype="<u4").tobytes()


@dataclass(frozen=True)
class Attach:
    """Re-attach to a live session after a dropped connection (no replay needed)."""

    session_id: bytes
    n_generated: int
    last_token: int = NO_TOKEN

    def encode(self) -> bytes:
        return _ATTACH.pack(VERSION, ATTACH, 0, self.session_id, self.n_generated, self.last_token)


@dataclass(frozen=True)
class Token:
    """The token the device chose: the only thing that goes up per step."""

    token_id: int

    def encode(self) -> bytes:
        return _TOKEN.pack(VERSION, TOKEN, self.token_id)


@dataclass(frozen=True)
class Ready:
    session_id: bytes
    vocab_size: int
    position: int  # tokens the session has been fed after its prompt

    def encode(self) -> bytes:
        return _READY.pack(VERSION, READY, 0, self.session_id, self.vocab_size, self.position)


@dataclass(frozen=True)
class Dist:
    """A next-token distribution as it travels: the full vector (ids None) or the top-k."""

    position: int
    vocab_size: int
    logp: Tensor  # [k] float32 (full: [V])
    ids: Tensor | None  # [k] long, by descending log-probability; None = full vocabulary
    log_tail: float  # log of the probability mass outside `ids` (-inf for full)

    @property
    def full(self) -> bool:
        return self.ids is None


Uplink = Union[Open, Attach, Token]
Downlink = Union[Ready, Dist]


def _header(data: bytes) -> int:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError("frames are binary")
    if len(data) < 2:
        raise FrameError(f"frame of {len(data)} bytes is too short")
    if data[0] != VERSION:
        raise FrameError(f"unsupported frame version {data[0]} (this side speaks {VERSION})", CLOSE_VERSION)
    return data[1]


def decode_uplink(data: bytes) -> Uplink:
    """Device -> cloud bytes -> message; raises FrameError (malformed, wrong version)."""
    kind = _header(data)
    if kind == OPEN:
        if len(data) < _OPEN.size:
            raise FrameError("OPEN frame too short")
        _, _, _, k, max_new, n_prompt, n_gen = _OPEN.unpack_from(data)
        if len(data) != _OPEN.size + 4 * (n_prompt + n_gen):
            raise FrameError(f"OPEN frame length {len(data)} does not match {n_prompt}+{n_gen} token ids")
        ids = np.frombuffer(data, dtype="<u4", offset=_OPEN.size).astype(np.int64).tolist()
        return Open(ids[:n_prompt], k, max_new, ids[n_prompt:])
    if kind == ATTACH:
        _expect_size(data, _ATTACH, "ATTACH")
        _, _, _, sid, n_gen, last = _ATTACH.unpack(data)
        return Attach(sid, n_gen, last)
    if kind == TOKEN:
        _expect_size(data, _TOKEN, "TOKEN")
        return Token(_TOKEN.unpack(data)[2])
    raise FrameError(f"unknown uplink message type 0x{kind:02x}")


def _expect_size(data: bytes, layout: struct.Struct, name: str) -> None:
    """Fixed-size frames must match their layout exactly."""
    if len(data) != layout.size:
        raise FrameError(f"{name} frame must be {layout.size} bytes, got {len(data)}")


def decode_downlink(data: bytes) -> Downlink:
    """Cloud -> device bytes -> message; raises FrameError."""
    kind = _header(data)
    if kind == READY:
        _expect_size(data, _READY, "READY")
        _, _, _, sid, vocab, pos = _READY.unpack(data)
        return Ready(sid, vocab, pos)
    if kind == DIST:
        if len(data) < _DIST.size:
            raise FrameError("DIST frame too short")
        _, _, enc, width, pos, vocab, k, log_tail = _DIST.unpack_from(data)
        body = memoryview(data)[_DIST.size :]
        if enc == FULL_F32:
            if k != vocab or len(body) != 4 * vocab:
                raise FrameError("full DIST frame length does not match its vocabulary size")
            logp = torch.from_numpy(np.frombuffer(body, dtype="<f4").astype(np.float32))
            return Dist(pos, vocab, logp, None, float("-inf"))
        if enc not in (TOPK_F16, TOPK_F32) or width not in (2, 4):
            raise FrameError(f"unknown DIST encoding {enc} / id width {width}")
        vbytes = 2 if enc == TOPK_F16 else 4
        if len(body) != k * (width + vbytes) or k > vocab:
            raise FrameError("top-k DIST frame length does not match k")
        ids = np.frombuffer(body[: k * width], dtype="<u2" if width == 2 else "<u4").astype(np.int64)
        vals = np.frombuffer(body[k * width :], dtype="<f2" if vbytes == 2 else "<f4").astype(np.float32)
        if k and int(ids.max()) >= vocab:
            raise FrameError("DIST frame holds a token id outside the vocabulary")
        return Dist(pos, vocab, torch.from_numpy(vals), torch.from_numpy(ids), float(log_tail))
    raise FrameError(f"unknown downlink message type 0x{kind:02x}")


# ---------------------------------------------------------------------------------------
# The distribution: cloud side
# ---------------------------------------------------------------------------------------


def encode_dist(logp: Tensor, k: int, position: int, values: str = "f16") -> bytes:
    """The cloud's [V] log-probabilities -> a DIST frame.

    k = 0 (FULL) or k >= V: the whole vector as float32, bit for bit (exact: the device's
    fusion sees what an in-process run sees). Otherwise the k most likely ids (uint16 when
    V <= 65536, else uint32), their log-probabilities (`values`: f16, or f32), and the log of
    the mass outside them, computed as a logsumexp over the tail (not log(1 - Σ top-k), which
    loses all precision when the top-k holds nearly all the mass).
    """
    logp = logp.detach().float().cpu().reshape(-1)
    V = logp.shape[0]
    if k == FULL or k >= V:
        return _DIST.pack(VERSION, DIST, FULL_F32, 0, position, V, V, float("-inf")) + logp.numpy().astype("<f4").tobytes()
    top = torch.topk(logp, k)
    rest = logp.double().clone()
    rest[top.indices] = float("-inf")
    log_tail = float(torch.logsumexp(rest, dim=0))
    width = 2 if V <= 1 << 16 else 4
    enc = TOPK_F16 if values == "f16" else TOPK_F32
    ids = top.indices.numpy().astype("<u2" if width == 2 else "<u4")
    vals = top.values.numpy().astype("<f2" if enc == TOPK_F16 else "<f4")
    return _DIST.pack(VERSION, DIST, enc, width, position, V, k, log_tail) + ids.tobytes() + vals.tobytes()


def frame_bytes(vocab_size: int, k: int, values: str = "f16") -> int:
    """Size of a DIST frame's payload in bytes (without the WebSocket header)."""
    if k == FULL or k >= vocab_size:
        return _DIST.size + 4 * vocab_size
    width = 2 if vocab_size <= 1 << 16 else 4
    return _DIST.size + k * (width + (2 if values == "f16" else 4))


# ---------------------------------------------------------------------------------------
# The distribution: device side (the tail model)
# ---------------------------------------------------------------------------------------


def densify(dist: Dist, reference: Tensor | None = None) -> Tensor:
    """A DIST frame -> [V] log-probabilities for the decode loop.

    Full frames come back as sent. For a top-k frame the k entries are kept and the tail mass
    exp(log_tail) is spread over the other tokens:
      - reference None: uniformly;
      - reference [V] (log-probabilities of a stand-in model over the same vocabulary — the
        device's SLM without context): in proportion to the reference's own tail, i.e. the
        reference rescaled to the tail mass. Where the reference *is* the LLM (same model on
        both sides) this rebuilds the LLM's vector up to the float16 rounding of the top-k.
        Tokens the reference rules out (-inf, e.g. LLM ids with no SLM counterpart) get none.
    """
    if dist.full:
        return dist.logp
    V = dist.vocab_size
    n_tail = V - int(dist.ids.numel())
    if n_tail <= 0 or not math.isfinite(dist.log_tail):
        out = torch.full((V,), float("-inf"), dtype=torch.float32)
        out[dist.ids] = dist.logp
        return out
    if reference is not None:
        out = _reference_tail(dist, reference, V)
        if out is not None:
            return out
    out = torch.full((V,), dist.log_tail - math.log(n_tail), dtype=torch.float32)
    out[dist.ids] = dist.logp
    return out


def _reference_tail(dist: Dist, reference: Tensor, V: int) -> Tensor | None:
    """The reference rescaled so that the tokens outside the top-k hold exp(log_tail); None when
    the reference puts (almost) no mass there. Two passes over V (a logsumexp, one add): this
    runs on the device's critical path every token, for V up to 262,144."""
    ref = reference.detach().reshape(-1)[:V].float()
    if ref.shape[0] < V:
        ref = torch.cat([ref, torch.full((V - ref.shape[0],), float("-inf"))])
    lse = torch.logsumexp(ref, dim=0).double()
    if not torch.isfinite(lse):
        return None
    top_mass = float(torch.exp(ref[dist.ids].double() - lse).sum())  # the reference's mass inside the top-k
    if top_mass > 1.0 - 1e-6:
        return None
    norm = float(lse) + math.log1p(-top_mass)  # log of the reference's tail mass
    out = ref + (dist.log_tail - norm)
    out[dist.ids] = dist.logp
    return out


# ---------------------------------------------------------------------------------------
# Tokenizer identity (both sides must tokenise the public prompt the same way)
# ---------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the token->id map and the chat template."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(b"\0" + (getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()
