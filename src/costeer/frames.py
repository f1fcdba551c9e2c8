"""The wire format between the device and the cloud (docs/wire-format.md): binary WebSocket
frames, little-endian, each starting with a version byte and a message-type byte.

Both sides import this module and nothing else of each other (docs/architecture.md: `cloud`
never imports `device`). The cloud turns its next-token log-probabilities into a DIST frame with
`encode_dist`; the device reads it back with `decode_downlink` and rebuilds a full [V]
log-probability vector with `densify`, the one place that decides how the mass outside the
top-k (the tail) is spread. Improving the representation means changing these functions.

Uplink (device -> cloud) carries only token ids: the public query's prompt ids (OPEN), the
tokens chosen so far when resuming (OPEN, ATTACH) and one chosen id per step (TOKEN, 4 bytes). There is
no message that could carry context text, SLM outputs or deltas, and the cloud alone decides
what a DIST frame holds (the device never names tokens it wants probabilities for).

Look-ahead (frame version 2, docs/wire-format.md "Look-ahead"): a TREE frame carries the
distributions of a tree of continuations the cloud chose, one DIST frame per node; the device
answers a round with one TOKENS frame, the tokens it chose in it (a path of the tree and the one
token that left it). OPEN and ATTACH have a version-2 form with the look-ahead bound and the
round's pending tokens. Streamed rounds (OPEN's FLAG_STREAMED): the round travels as LEVEL frames
instead, the root's distribution at once and then one level at a time, each frame announcing the
(parent, token) pairs of the next (`Level`; the device assembles them in a `Round`). Version-1
frames are unchanged and still accepted.
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
LOOKAHEAD_VERSION = 2  # the look-ahead frames: OPEN and ATTACH's long forms, TOKENS, TREE

# message types
OPEN, ATTACH, TOKEN, TOKENS = 0x01, 0x02, 0x03, 0x04  # uplink (TOKENS: version 2 only)
READY, DIST, TREE, LEVEL = 0x81, 0x82, 0x83, 0x84  # downlink (TREE, LEVEL: version 2 only)
_TYPES = {VERSION: {OPEN, ATTACH, TOKEN, READY, DIST}, LOOKAHEAD_VERSION: {OPEN, ATTACH, TOKENS, TREE, LEVEL}}

# look-ahead modes (OPEN, version 2): none, the cloud's adaptive shape within the bounds, or the
# bounds themselves every round (a chain of `depth` and, with more `nodes`, branches)
LOOKAHEAD_OFF, LOOKAHEAD_AUTO, LOOKAHEAD_FIXED = 0, 1, 2
NO_PARENT = 0xFFFF  # the root's parent in a TREE frame

# DIST encodings
FULL_F32, TOPK_F16, TOPK_F32, TOPK_PACKED = 0, 1, 2, 3

# OPEN flags
FLAG_PACKED = 0x0001  # the device asks for TOPK_PACKED frames; `k` is then their largest size
FLAG_STREAMED = 0x0002  # version 2 only: look-ahead rounds as LEVEL frames, one level at a time

LOGP_SLACK = 1e-3  # a log-probability a frame may hold above 0 (rounding): past it, no probability

# TOPK_PACKED (docs/wire-format.md, "Packed frames")
PACKED_HEAD = 128  # the most likely entries, with values to 1/2048 nat
PACKED_HEAD_SCALE = 2048
PACKED_STEP = 0.25  # width (nats) of the value bands that hold the other entries
PACKED_FLOOR = -11.5  # default: every token at least this likely is sent (up to k): about 2 KB at V = 262,144
_MAX_EG_WIDTH = 40  # no id gap needs more bits; a frame that claims more is malformed

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
_OPEN2 = struct.Struct("<BBHIIIIBBH")  # _OPEN's fields, then look-ahead mode, depth, nodes
_ATTACH2 = struct.Struct(f"<BBH{SESSION_ID_BYTES}sI")  # version 2, type, n_pending, session id, n_generated
_TOKENS = struct.Struct("<BBH")  # version 2, type, n; then u32 ids[n]
_TREE = struct.Struct("<BBHII")  # version 2, type, nodes, position, cloud microseconds; then the nodes
_LEVEL = struct.Struct("<BBHIHH")  # version 2, type, n, round position, first node, m announced; then the nodes
_TOKEN = struct.Struct("<BBI")  # version, type, token id (the long form, for ids >= 2**24)
TOKEN_BYTES = 4  # the short form: version, token id as u24; a 4-byte uplink frame is always a TOKEN
_READY = struct.Struct(f"<BBH{SESSION_ID_BYTES}sII")  # version, type, 0, session id, vocab size, position
_DIST = struct.Struct("<BBBBIIIf")  # version, type, encoding, id width, position, V, k, log tail mass
_PACKED = struct.Struct("<fffHHf")  # top value, head floor, k-th value, head size, bands, band width


class FrameError(ValueError):
    """A frame that cannot be read; `code` is the WebSocket close code to answer with."""

    def __init__(self, reason: str, code: int = CLOSE_MALFORMED):
        super().__init__(reason)
        self.code, self.reason = code, reason


# ---------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookahead:
    """What a device asks for in OPEN: no look-ahead, the cloud's adaptive shape within `depth`
    levels and `nodes` nodes per round, or that shape fixed (a chain of `depth`; more `nodes` than
    depth + 1 branch where the LLM is least sure)."""

    mode: int = LOOKAHEAD_OFF
    depth: int = 0  # tree levels below the root
    nodes: int = 1  # nodes per round, the root included
    streamed: bool = False  # LEVEL frames as each level is computed (OPEN's FLAG_STREAMED), else one TREE

    @property
    def on(self) -> bool:
        return self.mode != LOOKAHEAD_OFF


NO_LOOKAHEAD = Lookahead()


@dataclass(frozen=True)
class Open:
    """Start a session on the public prompt; `generated` (resume) are tokens already chosen."""

    prompt_ids: list[int]
    k: int = FULL  # 0 = the full vocabulary
    max_new_tokens: int = 128
    generated: list[int] = field(default_factory=list)
    packed: bool = False  # TOPK_PACKED frames, at most k entries
    lookahead: Lookahead = NO_LOOKAHEAD  # anything but off: the version-2 form

    def encode(self) -> bytes:
        ids = list(self.prompt_ids) + list(self.generated)
        flags = (FLAG_PACKED if self.packed else 0) | (FLAG_STREAMED if self.lookahead.on and self.lookahead.streamed else 0)
        fields = (flags, self.k, self.max_new_tokens, len(self.prompt_ids), len(self.generated))
        if self.lookahead.on:
            la = self.lookahead
            head = _OPEN2.pack(LOOKAHEAD_VERSION, OPEN, *fields, la.mode, la.depth, la.nodes)
        else:
            head = _OPEN.pack(VERSION, OPEN, *fields)
        return head + np.asarray(ids, dtype="<u4").tobytes()


@dataclass(frozen=True)
class Attach:
    """Re-attach to a live session after a dropped connection (no replay needed). `pending`: the
    tokens of the device's last uplink, whose answer it never got (the long form; the short one
    carries at most one, as `last_token`)."""

    session_id: bytes
    n_generated: int
    last_token: int = NO_TOKEN
    pending: tuple[int, ...] = ()

    def encode(self) -> bytes:
        if self.pending:
            head = _ATTACH2.pack(LOOKAHEAD_VERSION, ATTACH, len(self.pending), self.session_id, self.n_generated)
            return head + np.asarray(self.pending, dtype="<u4").tobytes()
        return _ATTACH.pack(VERSION, ATTACH, 0, self.session_id, self.n_generated, self.last_token)

    def tail(self) -> tuple[int, ...]:
        """The tokens whose answer was lost, whichever form carried them."""
        return self.pending or (() if self.last_token == NO_TOKEN else (self.last_token,))


@dataclass(frozen=True)
class Tokens:
    """The tokens the device chose in one look-ahead round: a path down the round's tree, then the
    token that left it (or the last one before a stop). Nothing else goes up."""

    token_ids: tuple[int, ...]

    def encode(self) -> bytes:
        return _TOKENS.pack(LOOKAHEAD_VERSION, TOKENS, len(self.token_ids)) + np.asarray(self.token_ids, "<u4").tobytes()


@dataclass(frozen=True)
class Token:
    """The token the device chose: the only thing that goes up per step."""

    token_id: int

    def encode(self) -> bytes:
        if self.token_id < 1 << 24:  # every real vocabulary (Gemma-3: 262,144)
            return bytes([VERSION]) + self.token_id.to_bytes(3, "little")
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
    logp: Tensor  # [k] float32 (full: [V]); packed frames: the middle of each entry's band
    ids: Tensor | None  # [k] long (top-k: by descending log-probability); None = full vocabulary
    log_tail: float  # log of the probability mass outside `ids` (-inf for full)
    width: Tensor | None = None  # [k] packed frames: each entry lies in logp ± width/2
    cap: float | None = None  # the smallest log-probability sent (None: logp.min())

    @property
    def floor(self) -> float:
        """No token outside `ids` is more likely than this."""
        return float(self.logp.min()) if self.cap is None else self.cap

    @property
    def full(self) -> bool:
        return self.ids is None


@dataclass(frozen=True, eq=False)
class Tree:
    """One look-ahead round as the device reads it: node 0 is the root (the distribution at
    `position`), node i > 0 the token `tokens[i]` after its parent `parents[i]` < i, and
    `dists[i]` the LLM's distribution after that path (position + depth)."""

    position: int
    parents: tuple[int, ...]  # parents[0] = -1
    tokens: tuple[int, ...]  # tokens[0] = NO_TOKEN
    dists: tuple[Dist, ...]
    cloud_us: int = 0  # the cloud's compute time for the round (informative)

    @property
    def size(self) -> int:
        return len(self.parents)

    def depths(self) -> list[int]:
        d = [0] * self.size
        for i in range(1, self.size):
            d[i] = d[self.parents[i]] + 1
        return d

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` reached by `token`, if the round holds one."""
        return next((i for i in range(node + 1, self.size) if self.parents[i] == node and self.tokens[i] == token), None)

    def path(self, node: int) -> list[int]:
        """The tokens from the root down to `node`."""
        return _path(self.parents, self.tokens, node)

    @classmethod
    def single(cls, dist: Dist) -> "Tree":
        """A DIST frame as a round with no look-ahead."""
        return cls(dist.position, (-1,), (NO_TOKEN,), (dist,))


def _path(parents, tokens, node: int) -> list[int]:
    out = []
    while node > 0:
        out.append(tokens[node])
        node = parents[node]
    return out[::-1]


def encode_tree(position: int, parents: list[int], tokens: list[int], dist_frames: list[bytes], cloud_us: int = 0) -> bytes:
    """A look-ahead round -> TREE frame: `parents`/`tokens` of nodes 1..n-1 (the root has neither),
    `dist_frames` the n nodes' DIST frames (root first) as encode_dist / encode_packed made them."""
    n = len(dist_frames)
    if len(parents) != n - 1 or len(tokens) != n - 1:
        raise ValueError("a tree needs a parent and a token for every node but the root")
    return b"".join([
        _TREE.pack(LOOKAHEAD_VERSION, TREE, n, position, min(cloud_us, 0xFFFFFFFF)),
        np.asarray(parents, "<u2").tobytes(), np.asarray(tokens, "<u4").tobytes(),
        np.asarray([len(f) for f in dist_frames], "<u4").tobytes(), *dist_frames,
    ])  # fmt: skip


def tree_overhead(n: int) -> int:
    """Bytes a TREE frame of n nodes adds to its n DIST frames."""
    return _TREE.size + 6 * (n - 1) + 4 * n


@dataclass(frozen=True, eq=False)
class Level:
    """One frame of a streamed round (LEVEL): the distributions of nodes first .. first + n - 1 of
    the round rooted at `position`, and the nodes the next frame will carry, announced as
    (parent, token): node first + n + j is `tokens[j]` after `parents[j]`, a node of this frame.
    No announced node (`final`): the round's last frame."""

    position: int
    first: int
    dists: tuple[Dist, ...]
    parents: tuple[int, ...]
    tokens: tuple[int, ...]

    @property
    def final(self) -> bool:
        return not self.parents


def encode_level(position: int, first: int, dist_frames: list[bytes], parents: list[int], tokens: list[int]) -> bytes:
    """A streamed round's frame -> LEVEL bytes: `dist_frames` of nodes first.., the next level's
    (parent, token) pairs (parents numbered in the round, as the device counts its nodes)."""
    if len(parents) != len(tokens) or not dist_frames:
        raise ValueError("a LEVEL frame needs at least one node and a token for every announced parent")
    return b"".join([
        _LEVEL.pack(LOOKAHEAD_VERSION, LEVEL, len(dist_frames), position, first, len(parents)),
        np.asarray(parents, "<u2").tobytes(), np.asarray(tokens, "<u4").tobytes(),
        np.asarray([len(f) for f in dist_frames], "<u4").tobytes(), *dist_frames,
    ])  # fmt: skip


class Round:
    """A look-ahead round as the device walks it: node 0 the root, node i > 0 `tokens[i]` after
    `parents[i]`. Whole rounds (a DIST, a TREE) arrive complete; a streamed one grows with each
    LEVEL frame (`add`), which must bring exactly the nodes the frame before announced. The device
    treats the cloud as untrusted: every frame is checked against the round so far and the bounds
    it asked for (FrameError, close code 4400)."""

    def __init__(self, position: int, first: Dist, bounds: Lookahead | None = None):
        self.position, self.bounds = position, bounds
        self.parents, self.tokens, self.depth = [-1], [NO_TOKEN], [0]
        self.dists: list[Dist] = [first]
        self.final = True
        self._children: dict[tuple[int, int], int] = {}

    @classmethod
    def of(cls, msg: "Dist | Tree | Level", bounds: Lookahead) -> "Round":
        """The first frame of a round (a DIST, a TREE, or a streamed round's first LEVEL) -> Round."""
        if isinstance(msg, Dist):
            return cls(msg.position, msg)
        if isinstance(msg, Tree):
            out = cls(msg.position, msg.dists[0], bounds)
            out._announce(list(msg.parents[1:]), list(msg.tokens[1:]))
            out.dists, out.final = list(msg.dists), True
            return out
        if msg.first != 0 or len(msg.dists) != 1:
            raise FrameError(f"LEVEL frame: a round starts with its root alone, got nodes {msg.first}+{len(msg.dists)}")
        out = cls(msg.position, msg.dists[0], bounds)
        out._announce(list(msg.parents), list(msg.tokens), 0, 1)
        out.final = msg.final
        return out

    @property
    def size(self) -> int:
        """Nodes known: arrived, or announced and on their way."""
        return len(self.parents)

    def ready(self, node: int) -> bool:
        return node < len(self.dists)

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` reached by `token`, if the round holds (or announced) one."""
        return self._children.get((node, token))

    def path(self, node: int) -> list[int]:
        """The tokens from the root down to `node`."""
        return _path(self.parents, self.tokens, node)

    def add(self, level: Level) -> None:
        """The round's next LEVEL frame (its position already matched): exactly the announced nodes."""
        start, n = len(self.dists), len(level.dists)
        if self.final:
            raise FrameError("LEVEL frame after the round's last one")
        if level.first != start or start + n != self.size:
            raise FrameError(f"LEVEL frame: nodes {level.first}+{n}, the round announced {start}+{self.size - start}")
        for i, dist in enumerate(level.dists):
            self._check_position(start + i, dist)
        self.dists.extend(level.dists)
        self._announce(list(level.parents), list(level.tokens), start, start + n)
        self.final = level.final

    def _check_position(self, node: int, dist: Dist) -> None:
        if dist.position != self.position + self.depth[node] or dist.vocab_size != self.dists[0].vocab_size:
            raise FrameError(f"round frame: node {node} is at position {dist.position}, not {self.position + self.depth[node]}")

    def _announce(self, parents: list[int], tokens: list[int], lo: int = 0, hi: int | None = None) -> None:
        """Nodes that are here or on their way, each a child of a node in [lo, hi) (None: of any node
        before it, as in a TREE). A streamed frame's are children of the nodes it brought, so at
        every node the device reaches it knows all the children the round will have."""
        V = self.dists[0].vocab_size
        for parent, token in zip(parents, tokens):
            if not lo <= parent < (self.size if hi is None else hi):
                raise FrameError("round frame: a node's parent does not come before it"
                                 if hi is None else "LEVEL frame: an announced node's parent is not a node of the frame")
            if token >= V:
                raise FrameError("round frame holds a token id outside the vocabulary")
            if (parent, token) in self._children:
                raise FrameError("round frame: two children of one node hold the same token")
            self._children[(parent, token)] = self.size
            self.parents.append(parent)
            self.tokens.append(token)
            self.depth.append(self.depth[parent] + 1)
        b = self.bounds
        if b is not None and self.size > 1 and (self.size > b.nodes or max(self.depth) > b.depth):
            raise FrameError(f"a round of {self.size} nodes and {max(self.depth)} levels; asked for at most "
                             f"{b.nodes} and {b.depth}")  # fmt: skip


Uplink = Union[Open, Attach, Token, Tokens]
Downlink = Union[Ready, Dist, Tree, Level]


def _header(data: bytes) -> tuple[int, int]:
    """-> (version, message type), a type this version has; FrameError otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError("frames are binary")
    if len(data) < 2:
        raise FrameError(f"frame of {len(data)} bytes is too short")
    version, kind = data[0], data[1]
    if version not in _TYPES:
        raise FrameError(f"unsupported frame version {version} (this side speaks {VERSION} and {LOOKAHEAD_VERSION})",
                         CLOSE_VERSION)  # fmt: skip
    if kind not in _TYPES[version] and any(kind in types for types in _TYPES.values()):
        raise FrameError(f"unsupported frame version {version} for message type 0x{kind:02x}", CLOSE_VERSION)
    return version, kind


def _ids(data: bytes, offset: int, n: int) -> list[int]:
    return np.frombuffer(data, dtype="<u4", count=n, offset=offset).astype(np.int64).tolist()


def _counted_ids(data: bytes, layout: struct.Struct, name: str, what: str) -> tuple[tuple, tuple[int, ...]]:
    """A header whose third field counts the uint32 ids after it -> (header fields, ids); at least one id."""
    if len(data) < layout.size:
        raise FrameError(f"{name} frame too short")
    fields = layout.unpack_from(data)
    n = fields[2]
    if n < 1 or len(data) != layout.size + 4 * n:
        raise FrameError(f"{name} frame length {len(data)} does not match {n} {what}")
    return fields, tuple(_ids(data, layout.size, n))


def decode_uplink(data: bytes) -> Uplink:
    """Device -> cloud bytes -> message; raises FrameError (malformed, wrong version)."""
    if isinstance(data, (bytes, bytearray, memoryview)) and len(data) == TOKEN_BYTES and data[0] == VERSION:
        return Token(int.from_bytes(bytes(data[1:]), "little"))
    version, kind = _header(data)
    if kind == OPEN:
        return _decode_open(data, version)
    if kind == ATTACH and version == LOOKAHEAD_VERSION:
        (_, _, n, sid, n_gen), ids = _counted_ids(data, _ATTACH2, "ATTACH", "pending token ids")
        return Attach(sid, n_gen, NO_TOKEN, ids)
    if kind == ATTACH:
        _expect_size(data, _ATTACH, "ATTACH")
        _, _, _, sid, n_gen, last = _ATTACH.unpack(data)
        return Attach(sid, n_gen, last)
    if kind == TOKENS:
        return Tokens(_counted_ids(data, _TOKENS, "TOKENS", "token ids")[1])
    if kind == TOKEN:
        _expect_size(data, _TOKEN, "TOKEN")
        return Token(_TOKEN.unpack(data)[2])
    raise FrameError(f"unknown uplink message type 0x{kind:02x}")


def _decode_open(data: bytes, version: int) -> Open:
    layout = _OPEN2 if version == LOOKAHEAD_VERSION else _OPEN
    if len(data) < layout.size:
        raise FrameError("OPEN frame too short")
    _, _, flags, k, max_new, n_prompt, n_gen, *la = layout.unpack_from(data)
    if len(data) != layout.size + 4 * (n_prompt + n_gen):
        raise FrameError(f"OPEN frame length {len(data)} does not match {n_prompt}+{n_gen} token ids")
    if flags & ~(FLAG_PACKED | (FLAG_STREAMED if la else 0)):
        raise FrameError(f"unknown OPEN flags 0x{flags:04x}")
    lookahead = Lookahead(*la, streamed=bool(flags & FLAG_STREAMED)) if la else NO_LOOKAHEAD
    if la and lookahead.mode not in (LOOKAHEAD_AUTO, LOOKAHEAD_FIXED):
        raise FrameError(f"unknown look-ahead mode {lookahead.mode}")
    ids = _ids(data, layout.size, n_prompt + n_gen)
    return Open(ids[:n_prompt], k, max_new, ids[n_prompt:], bool(flags & FLAG_PACKED), lookahead)


def _expect_size(data: bytes, layout: struct.Struct, name: str) -> None:
    """Fixed-size frames must match their layout exactly."""
    if len(data) != layout.size:
        raise FrameError(f"{name} frame must be {layout.size} bytes, got {len(data)}")


def _check_values(values: np.ndarray, log_tail: float) -> None:
    """Log-probabilities as they may arrive: -inf (ruled out) or finite, never NaN or +inf, never above
    0 (a probability above 1; rounding leaves a log_softmax at 0 at most), and some token with mass.
    Values above 0 whose exp overflows, or every token ruled out, made the device's scores NaN: greedy
    decoding then took token 0 as if it were the answer."""
    if not (values < np.inf).all() or not log_tail < math.inf:  # NaN compares False
        raise FrameError("DIST frame holds a value that is not a log-probability (NaN or +inf)")
    if (values > LOGP_SLACK).any() or log_tail > LOGP_SLACK:
        raise FrameError("DIST frame holds a log-probability above 0 (a probability above 1)")
    # the tail is capped at the smallest value sent (densify): a -inf sent rules the whole tail out too
    tail = math.isfinite(log_tail) and not np.isneginf(values).any()
    if not (np.isfinite(values).any() or tail):
        raise FrameError("DIST frame gives no token any probability")


def check_log_probabilities(values: np.ndarray, log_tail: float) -> None:
    """The checks every DIST decoder makes, for distributions that come another way (an engine's JSON
    answer, costeer.device.engines); raises FrameError."""
    _check_values(np.asarray(values, dtype=np.float64), log_tail)


def _check_ids(ids: np.ndarray, vocab: int) -> None:
    if len(ids) and int(ids.max()) >= vocab:
        raise FrameError("DIST frame holds a token id outside the vocabulary")
    if len(np.unique(ids)) != len(ids):
        raise FrameError("DIST frame holds a token id twice")


def decode_downlink(data: bytes) -> Downlink:
    """Cloud -> device bytes -> message; raises FrameError (malformed, wrong version, impossible
    values: a token id twice or outside the vocabulary, NaN, +inf or positive log-probabilities, no mass; a TREE frame
    whose parents, tokens, counts or node positions do not make one tree)."""
    version, kind = _header(data)
    if kind == TREE:
        return _decode_tree(data)
    if kind == LEVEL:
        return _decode_level(data)
    if kind == READY:
        _expect_size(data, _READY, "READY")
        _, _, _, sid, vocab, pos = _READY.unpack(data)
        return Ready(sid, vocab, pos)
    if kind == DIST:
        if len(data) < _DIST.size:
            raise FrameError("DIST frame too short")
        _, _, enc, width, pos, vocab, k, log_tail = _DIST.unpack_from(data)
        body = memoryview(data)[_DIST.size :]
        if vocab < 1:
            raise FrameError("DIST frame with an empty vocabulary")
        if enc == FULL_F32:
            if k != vocab or len(body) != 4 * vocab:
                raise FrameError("full DIST frame length does not match its vocabulary size")
            logp = np.frombuffer(body, dtype="<f4").astype(np.float32)
            _check_values(logp, -math.inf)
            return Dist(pos, vocab, torch.from_numpy(logp), None, float("-inf"))
        if enc == TOPK_PACKED:
            return _decode_packed(body, pos, vocab, k, log_tail)
        if enc not in (TOPK_F16, TOPK_F32) or width not in (2, 4):
            raise FrameError(f"unknown DIST encoding {enc} / id width {width}")
        vbytes = 2 if enc == TOPK_F16 else 4
        if k < 1:  # no entry, no smallest value to bound the tail by (densify raised torch's RuntimeError)
            raise FrameError("top-k DIST frame with no entries")
        if len(body) != k * (width + vbytes) or k > vocab:
            raise FrameError("top-k DIST frame length does not match k")
        ids = np.frombuffer(body[: k * width], dtype="<u2" if width == 2 else "<u4").astype(np.int64)
        vals = np.frombuffer(body[k * width :], dtype="<f2" if vbytes == 2 else "<f4").astype(np.float32)
        _check_ids(ids, vocab)
        _check_values(vals, log_tail)
        cap = None
        if k and vbytes == 2:  # the k-th value was rounded to float16: the bound is half a step above it
            low = np.float16(vals.min())
            # a -inf sent (a token ruled out) is its own bound: its spacing is NaN, and a NaN cap made
            # the device's whole tail NaN (a hostile cloud's -inf beside a finite tail mass)
            cap = float(low) + float(np.spacing(np.abs(low))) / 2 if np.isfinite(low) else float(low)
        return Dist(pos, vocab, torch.from_numpy(vals), torch.from_numpy(ids), float(log_tail), cap=cap)
    raise FrameError(f"unknown downlink message type 0x{kind:02x}")


def _decode_tree(data: bytes) -> Tree:
    if len(data) < _TREE.size:
        raise FrameError("TREE frame too short")
    _, _, n, position, cloud_us = _TREE.unpack_from(data)
    at = _TREE.size
    if n < 1 or len(data) < at + 6 * (n - 1) + 4 * n:
        raise FrameError(f"TREE frame of {len(data)} bytes cannot hold {n} nodes")
    parents = np.frombuffer(data, "<u2", n - 1, at).astype(np.int64)
    tokens = np.frombuffer(data, "<u4", n - 1, at + 2 * (n - 1)).astype(np.int64)
    dists = _nodes(data, at + 6 * (n - 1), n, "TREE")
    if (parents >= np.arange(1, n)).any():
        raise FrameError("TREE frame: a node's parent does not come before it")
    pairs = set(zip(parents.tolist(), tokens.tolist()))
    if len(pairs) != n - 1:
        raise FrameError("TREE frame: two children of one node hold the same token")
    tree = Tree(position, (-1, *parents.tolist()), (NO_TOKEN, *tokens.tolist()), ())
    for i, (dist, depth) in enumerate(zip(dists, tree.depths())):
        if dist.position != position + depth:
            raise FrameError(f"TREE frame: node {i} is at position {dist.position}, not {position + depth}")
    if (tokens >= dists[0].vocab_size).any():
        raise FrameError("TREE frame holds a token id outside the vocabulary")
    return Tree(position, tree.parents, tree.tokens, tuple(dists), cloud_us)


def _decode_level(data: bytes) -> Level:
    """LEVEL bytes -> Level: the frame on its own (the round it belongs to checks the rest, `Round.add`)."""
    if len(data) < _LEVEL.size:
        raise FrameError("LEVEL frame too short")
    _, _, n, position, first, m = _LEVEL.unpack_from(data)
    at = _LEVEL.size
    if n < 1 or first + n + m > 0xFFFF or len(data) < at + 6 * m + 4 * n:
        raise FrameError(f"LEVEL frame of {len(data)} bytes cannot hold {n} nodes and {m} announced")
    parents = np.frombuffer(data, "<u2", m, at).astype(np.int64).tolist()
    tokens = np.frombuffer(data, "<u4", m, at + 2 * m).astype(np.int64).tolist()
    dists = _nodes(data, at + 6 * m, n, "LEVEL")
    return Level(position, first, tuple(dists), tuple(parents), tuple(tokens))


def _nodes(data: bytes, at: int, n: int, name: str) -> list[Dist]:
    """A round frame's tail: u32 lengths[n], then n version-1 DIST frames of one vocabulary."""
    lengths = np.frombuffer(data, "<u4", n, at).astype(np.int64)
    at += 4 * n
    if int(lengths.sum()) != len(data) - at:
        raise FrameError(f"{name} frame: the node lengths do not add up to the frame")
    dists, view = [], memoryview(data)
    for i, length in enumerate(lengths.tolist()):
        node = view[at : at + length]
        if _header(node) != (VERSION, DIST):
            raise FrameError(f"{name} frame: node {i} is not a DIST frame")
        dist = decode_downlink(node)
        if dists and dist.vocab_size != dists[0].vocab_size:
            raise FrameError(f"{name} frame: node {i} has another vocabulary")
        dists.append(dist)
        at += length
    return dists


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


def max_downlink_bytes(vocab_size: int, k: int, packed: bool) -> int:
    """The largest downlink message a device that asked for (k, packed) can need: a device refuses
    longer ones unread. Top-k and full frames: their size with float32 values. Packed frames: every
    band count a u16 may announce, and at most 66 Exp-Golomb bits per id (a gap below 2**32 at an
    order of at most 15) plus each stream's last partial byte."""
    if not packed:
        return frame_bytes(vocab_size, k, "f32")
    bands = 0xFFFF
    fixed = _DIST.size + _PACKED.size + 2 * bands + (bands + 1) + 2 * PACKED_HEAD + 4
    return fixed + (66 * k + 7) // 8 + 2


# ---------------------------------------------------------------------------------------
# Packed frames: more entries in the same bytes
# ---------------------------------------------------------------------------------------
#
# Across tokenizers the fused argmax sometimes is a token the LLM ranks in the thousands that
# the delta lifts by 7-10 nats; a frame has to reach that deep (docs/wire-format.md). Packed
# frames send every token down to an absolute floor (PACKED_FLOOR by default), at most k of them:
#   - the head (the PACKED_HEAD most likely): values to 1/2048 nat below the top value;
#   - the rest in bands PACKED_STEP nats wide below the head; the device places each entry
#     inside its band with its tail model;
#   - ids sorted within each group and sent as gaps in order-k Exp-Golomb codes, written as
#     two bit streams (the unary prefixes, then the binary suffixes) so that both sides code
#     and decode with whole-array numpy operations rather than a loop over entries.


def _bit_length(y: np.ndarray) -> np.ndarray:
    """Bits of each y >= 1 (exact for y < 2**52)."""
    return np.floor(np.log2(y.astype(np.float64))).astype(np.int64) + 1


def _eg_choose(gaps: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per group (starting at `starts`), the Exp-Golomb order 0..15 with the fewest bits."""
    orders = np.arange(16)[:, None]
    n = _bit_length(gaps[None, :] + (1 << orders))  # [16, n]
    cost = 2 * n - orders - 1
    return np.add.reduceat(cost, starts, axis=1).argmin(axis=0) if len(gaps) else np.zeros(len(starts), np.int64)


def _eg_encode(x: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values x >= 0 with per-value orders -> (prefix bits, suffix bits) as uint8 0/1 arrays.
    With y = x + 2**order of N bits: the prefix is N-order-1 zeros and a one, the suffix the
    N-1 bits of y below its leading one."""
    y = x.astype(np.int64) + (np.int64(1) << order)
    w = _bit_length(y) - 1  # suffix width
    ends = np.cumsum(w - order + 1) - 1
    prefix = np.zeros(int(ends[-1]) + 1 if len(x) else 0, dtype=np.uint8)
    prefix[ends] = 1
    j = np.arange(int(w.max()) if len(x) else 0)
    inside = j[None, :] < w[:, None]
    bits = (y[:, None] >> np.maximum(w[:, None] - 1 - j[None, :], 0)) & 1
    suffix = np.zeros(int(w.sum()), dtype=np.uint8)
    suffix[((np.cumsum(w) - w)[:, None] + j[None, :])[inside]] = bits[inside]
    return prefix, suffix


def _eg_decode(prefix: np.ndarray, suffix: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The inverse of _eg_encode for len(order) values; raises FrameError on short streams."""
    n = len(order)
    ones = np.flatnonzero(prefix)[:n]
    if len(ones) < n:
        raise FrameError("packed DIST frame: id stream too short")
    w = np.diff(ones, prepend=-1) - 1 + order
    if n and int(w.max()) > _MAX_EG_WIDTH:
        raise FrameError("packed DIST frame: id gap out of range")
    off = np.cumsum(w) - w
    if n and int(off[-1] + w[-1]) > len(suffix):
        raise FrameError("packed DIST frame: id stream too short")
    j = np.arange(int(w.max()) if n else 0)
    inside = j[None, :] < w[:, None]
    bits = np.where(inside, suffix[np.where(inside, off[:, None] + j[None, :], 0)], 0).astype(np.int64)
    y = (np.int64(1) << w) + (bits << np.maximum(w[:, None] - 1 - j[None, :], 0)).sum(axis=1)
    return y - (np.int64(1) << order)


def encode_packed(logp: Tensor, k: int, position: int, floor: float = PACKED_FLOOR) -> bytes:
    """The cloud's [V] log-probabilities -> a TOPK_PACKED DIST frame: the tokens at least
    exp(floor) likely, at least the head and at most k of them (k = 0: no upper limit)."""
    x = logp.detach().float().cpu().reshape(-1)
    V = x.shape[0]
    above = x >= floor
    n = int(above.sum())
    # entry counts travel as u16 per band: 65,535 entries in all keeps every band within one;
    # a token ruled out (-inf) is never an entry (no band holds it)
    k = min(V - 1, max(n, PACKED_HEAD), k or V, 0xFFFF, int(torch.isfinite(x).sum()))
    if k == n:  # the usual case: the floor decides, one pass over V instead of a top-k
        ids_t = above.nonzero().squeeze(1)
        vals_t, order = torch.sort(x[ids_t], descending=True)
        ids_t = ids_t[order]
        rest = x.masked_fill(above, float("-inf"))
    else:
        vals_t, ids_t = torch.topk(x, k)  # descending
        rest = x.clone()
        rest[ids_t] = float("-inf")
    # float32 is enough here: the tail mass only scales the device's guesses for unsent tokens
    log_tail = float(torch.logsumexp(rest, dim=0))
    vals, ids = vals_t.numpy().astype(np.float64), ids_t.numpy().astype(np.int64)
    top_value, kth = float(vals_t[0]), float(vals_t[-1])
    h = min(k, PACKED_HEAD)
    head_floor = vals[h - 1]
    band = np.zeros(k, dtype=np.int64)  # group: 0 = head, 1 + b = band b
    band[h:] = 1 + np.floor((head_floor - vals[h:]) / PACKED_STEP).astype(np.int64)
    n_bands = int(band.max())
    order = np.lexsort((ids, band))  # by group, ids ascending within each
    ids, band, vals = ids[order], band[order], vals[order]
    counts = np.bincount(band, minlength=n_bands + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    prev = np.concatenate([[-1], ids[:-1]])
    prev[starts] = -1  # each group's first id is coded from -1
    gaps = ids - prev - 1
    used = counts > 0
    eg_order = np.zeros(n_bands + 1, dtype=np.int64)
    eg_order[used] = _eg_choose(gaps, starts[used])
    prefix, suffix = _eg_encode(gaps, np.repeat(eg_order, counts))
    head_q = np.clip(np.round((top_value - vals[:h]) * PACKED_HEAD_SCALE), 0, 65535)
    pre = np.packbits(prefix).tobytes()
    return b"".join(
        [
            _DIST.pack(VERSION, DIST, TOPK_PACKED, 0, position, V, k, log_tail),
            _PACKED.pack(top_value, float(head_floor), kth, h, n_bands, PACKED_STEP),
            counts[1:].astype("<u2").tobytes(),
            eg_order.astype(np.uint8).tobytes(),
            head_q.astype("<u2").tobytes(),
            struct.pack("<I", len(pre)),
            pre,
            np.packbits(suffix).tobytes(),
        ]
    )


def _decode_packed(body: memoryview, pos: int, vocab: int, k: int, log_tail: float) -> Dist:
    if len(body) < _PACKED.size:
        raise FrameError("packed DIST frame too short")
    top, head_floor, kth, h, n_bands, step = _PACKED.unpack_from(body)
    if not all(math.isfinite(v) for v in (top, head_floor, kth, step)):
        raise FrameError("packed DIST frame: a value in its header is not finite")
    if not log_tail < math.inf:  # NaN compares False (the values are checked once read)
        raise FrameError("DIST frame holds a value that is not a log-probability (NaN or +inf)")
    at = _PACKED.size
    fixed = 2 * n_bands + (n_bands + 1) + 2 * h + 4
    if len(body) < at + fixed or not 0 < k < vocab or h > k or not step > 0:
        raise FrameError("packed DIST frame: header does not match its length")
    counts = np.concatenate([[h], np.frombuffer(body, "<u2", n_bands, at).astype(np.int64)])
    at += 2 * n_bands
    eg_order = np.frombuffer(body, np.uint8, n_bands + 1, at).astype(np.int64)
    at += n_bands + 1
    head_q = np.frombuffer(body, "<u2", h, at).astype(np.float64)
    at += 2 * h
    (n_pre,) = struct.unpack_from("<I", body, at)
    at += 4
    if int(counts.sum()) != k or len(body) < at + n_pre or int(eg_order.max()) > 15:
        raise FrameError("packed DIST frame: entry counts do not match k")
    prefix = np.unpackbits(np.frombuffer(body, np.uint8, n_pre, at))
    suffix = np.unpackbits(np.frombuffer(body, np.uint8, len(body) - at - n_pre, at + n_pre))
    gaps = _eg_decode(prefix, suffix, np.repeat(eg_order, counts))
    steps = gaps + 1
    total = np.cumsum(steps)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    before = np.repeat(np.where(starts > 0, total[np.maximum(starts - 1, 0)], 0), counts)
    ids = total - before - 1
    _check_ids(ids, vocab)
    band = np.repeat(np.arange(n_bands + 1), counts)[h:] - 1
    hi = head_floor - band * step
    lo = np.maximum(hi - step, kth)  # every entry sent is at least the k-th value
    # a head value at the u16 ceiling was clipped: it lies anywhere from 32 nats below the top down to kth
    head_hi = top - head_q / PACKED_HEAD_SCALE
    head_lo = np.where(head_q >= 0xFFFF, np.minimum(head_hi, kth), head_hi)
    values = np.concatenate([(head_hi + head_lo) / 2, (hi + lo) / 2]).astype(np.float32)
    width = np.concatenate([head_hi - head_lo, hi - lo])
    _check_values(values, log_tail)
    return Dist(
        pos, vocab, torch.from_numpy(values), torch.from_numpy(ids), float(log_tail),
        torch.from_numpy(width.astype(np.float32)), float(kth),
    )  # fmt: skip


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
    Either way no tail token is set above the smallest top-k value: the cloud sent its k most
    likely tokens, so every other token is at most that likely. The stand-in breaks this bound
    where the two models disagree, and a tail token lifted there by the delta would win fusion
    on a probability the LLM cannot have given it (docs/wire-format.md, "The tail model").
    Entries of a packed frame that come as a band (width > 0) take the reference's value
    clamped into their band, or the band's middle without a reference.
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
    level = min(dist.log_tail - math.log(n_tail), dist.floor)
    out = torch.full((V,), level, dtype=torch.float32)
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
    scaled = ref + (dist.log_tail - norm)
    out = scaled.clamp(max=dist.floor)
    if dist.width is None:
        out[dist.ids] = dist.logp
    else:
        guess = scaled[dist.ids]
        inside = (guess - dist.logp).abs() <= dist.width / 2 + 1e-4  # rounding at the band edges
        out[dist.ids] = torch.where(inside, guess, dist.logp)
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
