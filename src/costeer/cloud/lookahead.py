"""Look-ahead rounds on the cloud: which continuations to compute ahead, and how many.

A round starts from the session's next distribution (the root). `RoundPlanner` grows a tree
level by level: each level's candidates are the top few tokens of the nodes of the level above,
each with an estimated chance that the device goes there,

    P(child) = P(parent) * min(1, q_r * p_LLM(child | parent) / mean p_r),

where r is the child's rank among its siblings (0: the LLM's greedy token), q_r how often the
device took the rank-r child at the nodes it reached in this session, and mean p_r the LLM's
average probability of those children: the device's own acceptance, raised where the LLM is surer
than usual and lowered where it is less sure (the device fuses the LLM with its SLM pair, so it
agrees with the LLM less often than p says).

How much of the tree to compute follows what `Controller` measures per session (docs/wire-format.md,
"Look-ahead", has the derivation and the figures):

  - S, the seconds a token saves when the device finds it in the tree instead of asking: a round
    trip as the device lives it (R: from the cloud sending a round to the next uplink arriving,
    for a round the device left at once) plus the cloud's root step (c1), minus what the device
    spends on a token it finds in the tree (L): medians over the session's last rounds.
  - the cloud's cost of a level of n nodes, a + b * n, fitted to the levels it computed;
  - the bytes per node, through the gaps themselves (each holds its round's transfer);
  - q_r and mean p_r, from how often the device stayed in the tree at the nodes it reached.

What a level costs depends on how the round travels:

  - whole (one TREE frame): every level delays the round, so a node is worth computing when
    P(node) * S exceeds its cost b, a level when its nodes' worth exceeds the level's fixed cost a too;
  - streamed (LEVEL frames, the root at once and each level as it is computed): a level costs the
    device nothing while the cloud keeps ahead of it. A level of n nodes takes t = a + b * n; the
    device needs it one token (L) after the level above, so it waits max(0, t - L) if it got that
    far (chance: the summed P of the level above). And a level that ends past R (the cloud's time
    on this round's levels so far plus t, beyond the round trip) may be under way when the device's
    uplink comes; the next round's root then waits for the forward under way (the scheduler stops a
    left round before its next forward), which the charge bounds by the whole level, as a whole
    round's level is charged (near loopback, where R is about the device's fusion, every level is):

        cost(n) = P(level above) * max(0, t - L) + (t if elapsed + t > R else 0).

    Candidates are taken most likely first while each one's P * S exceeds what it adds to cost(n).
    The levels the round trip hides are free, so the longer the round trip the deeper the tree.

Where the round trip is cheaper than the tree (loopback, a cloud on the same machine) S is about
zero and no look-ahead is computed at all, either way. A FIXED look-ahead (a benchmark's chain or
tree) takes `depth` levels of (nodes - 1) / depth nodes, the most likely first, whatever the
measurements.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from costeer import frames

MAX_WIDTH = 4  # candidates per node: the LLM's top few (issue #14: top 2/4/8 hold 57/63/69% of choices)
HISTORY = 32  # rounds (and levels) the fits look back on
MIN_SAMPLES = 3  # rounds with tokens taken from a tree before L (the device's cost of one) is trusted
PROBE_ROUNDS = 8  # the first rounds of a session each offer a probe until then


def _ridge(x: np.ndarray, y: np.ndarray, prior: np.ndarray, strength: float) -> np.ndarray:
    """Least squares y ~ x @ w pulled toward `prior` (with a few samples the prior decides)."""
    k = x.shape[1]
    a = x.T @ x + strength * np.eye(k)
    return np.linalg.solve(a, x.T @ y + strength * prior)


@dataclass
class Controller:
    """A session's measurements and the look-ahead they call for (module docs)."""

    bounds: frames.Lookahead
    c1: float = 0.0  # seconds: the cloud's root step (EWMA)
    # per sibling rank (0: the greedy child), at the nodes the device reached: children offered,
    # taken, and their LLM probability summed
    offered: list[float] = field(default_factory=lambda: [0.0] * MAX_WIDTH)
    taken: list[float] = field(default_factory=lambda: [0.0] * MAX_WIDTH)
    mass: list[float] = field(default_factory=lambda: [0.0] * MAX_WIDTH)
    rounds: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # (gap s, tokens from the tree, bytes)
    # the last rounds in which the device took tokens from the tree (gap s, tokens): what L is measured on.
    # Kept apart from `rounds`, so that many rounds without look-ahead (loopback) do not push them out and
    # bring the probes back: what a device spends on a token does not change with the round trip.
    took_from_tree: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    levels: deque = field(default_factory=lambda: deque(maxlen=HISTORY))  # (nodes, seconds)
    bytes_per_node: float = 0.0  # EWMA of a node's DIST frame
    sent_at: float | None = None  # when the last round left (server clock)
    sent_bytes: int = 0
    n_rounds: int = 0  # rounds sent

    def stay(self, rank: int, p: float) -> float:
        """Estimated chance that the device takes a rank-`rank` child of LLM probability p at a
        node it reached: q_r * p / mean p_r (q_r with a prior of one half)."""
        q = (self.taken[rank] + 0.5) / (self.offered[rank] + 1.0)
        mean_p = self.mass[rank] / self.offered[rank] if self.offered[rank] else p
        return min(1.0, q * p / max(mean_p, 1e-9))

    # -- measurements ---------------------------------------------------------------------

    def step_took(self, seconds: float) -> None:
        self.c1 = seconds if self.c1 == 0 else 0.8 * self.c1 + 0.2 * seconds

    def level_took(self, nodes: int, seconds: float) -> None:
        self.levels.append((nodes, seconds))

    def sent(self, nbytes: int, nodes: int, now: float | None = None, first: bool = True) -> None:
        """A round's frame left (a streamed round's frames each: the first starts the round's gap)."""
        if first:
            self.sent_at, self.sent_bytes = (time.monotonic() if now is None else now), nbytes
            self.n_rounds += 1
        else:
            self.sent_bytes += nbytes
        if nodes > 1 or not first:
            per = nbytes / nodes
            self.bytes_per_node = per if self.bytes_per_node == 0 else 0.8 * self.bytes_per_node + 0.2 * per

    def received(self, in_tree: int, now: float | None = None) -> None:
        """The device's uplink arrived: it took `in_tree` tokens from the round's tree. The first
        round's gap is not a round trip (the device starts its SLM pair on the prompt meanwhile)."""
        if self.sent_at is not None and self.n_rounds > 1:
            now = time.monotonic() if now is None else now
            self.rounds.append((now - self.sent_at, in_tree, self.sent_bytes))
            if in_tree > 0:
                self.took_from_tree.append((now - self.sent_at, in_tree))
            self.sent_at = None

    def calibrate(self, rank: int, p: float, taken: bool) -> None:
        """At a node the device reached: a child of this rank and LLM probability was offered (and taken)."""
        self.offered[rank] += 1
        self.mass[rank] += p
        self.taken[rank] += taken

    # -- estimates ------------------------------------------------------------------------

    def round_trip(self) -> tuple[float, float]:
        """(R, L): the gap of a round the device left at once (median), and what a token it took
        from a tree added to a round's gap (median per token; until the device has taken one, R + c1:
        look-ahead is assumed to save nothing, and probe_due offers one node until L is known). Medians:
        a slow round (the device's own hiccup, a retransmission) moves neither. Bytes count through
        the gaps themselves, which hold each round's transfer."""
        left = [g for g, n, _ in self.rounds if n == 0]
        R = float(np.median(left)) if left else (float(np.median([g for g, _, _ in self.rounds])) if self.rounds else 0.0)
        taken = [(g - R) / n for g, n in self.took_from_tree]
        L = max(0.0, float(np.median(taken))) if taken else R + self.c1
        return R, L

    def level_cost(self) -> tuple[float, float]:
        """(a, b): a level of n nodes costs a + b * n seconds (prior: the root step's cost, half
        fixed and half per node, until levels of different sizes tell them apart)."""
        if not self.levels:
            return self.c1 / 2, self.c1 / 2
        r = np.array(self.levels, dtype=np.float64)
        x = np.stack([np.ones(len(r)), r[:, 0]], axis=1)
        w = _ridge(x, r[:, 1], np.array([self.c1 / 2, self.c1 / 2]), strength=0.5)
        return max(w[0], 0.0), max(w[1], 1e-6)

    def estimates(self) -> dict:
        """What the shape follows now (milliseconds), for /v1/sessions and the benchmarks."""
        R, L = self.round_trip()
        a, b = self.level_cost()
        ms = lambda x: round(1000 * float(x), 3)  # noqa: E731
        return {"saving_ms": ms(self.saving()), "round_trip_ms": ms(R), "device_token_ms": ms(L), "step_ms": ms(self.c1),
                "level_ms": ms(a), "node_ms": ms(b), "bytes_per_node": round(self.bytes_per_node),
                "stay_greedy": round((self.taken[0] + 0.5) / (self.offered[0] + 1.0), 3), "rounds": self.n_rounds}  # fmt: skip

    def probe_due(self) -> bool:
        """Offer one node (the greedy child) while L is not known well enough to decide: until the device
        has taken tokens from a tree in MIN_SAMPLES rounds, in each of the first PROBE_ROUNDS rounds and
        every 4th after. One round is not enough: a single slow one (the device's own hiccup) put L above
        R + c1, which switched look-ahead off, and with it every later measurement (measured at 50 ms:
        24 rounds of 1 token on a CoGenesis row until the estimates drifted). No probe once L is known,
        nor where the rounds measured already say a tree token costs the device more than twice what
        asking does (loopback: each probe would cost the next root a forward for nothing)."""
        n = len(self.took_from_tree)
        if n >= MIN_SAMPLES:
            return False
        if n:
            R, L = self.round_trip()
            if L > 2 * (R + self.c1):
                return False
        return self.n_rounds < PROBE_ROUNDS or self.n_rounds % 4 == 0

    def saving(self) -> float:
        """S: seconds a token found in the tree saves the device (0: look-ahead does not pay)."""
        R, L = self.round_trip()
        return max(0.0, R + self.c1 - L)


@dataclass
class RoundPlanner:
    """One round's tree (node 0: the root) grown level by level for the scheduler: begin(root
    log-probabilities) and extend(each level's) return the next level's rows [(parent, token)], []
    when the tree is done."""

    controller: Controller
    extends_branches: bool = True  # False (llama.cpp): only the main chain (greedy of greedy...) takes children
    parents: list[int] = field(default_factory=lambda: [-1])
    tokens: list[int] = field(default_factory=lambda: [frames.NO_TOKEN])
    reach: list[float] = field(default_factory=lambda: [1.0])  # P(node)
    depth: list[int] = field(default_factory=lambda: [0])
    logps: list[Tensor] = field(default_factory=list)
    frontier: list[int] = field(default_factory=lambda: [0])
    rank: list[int] = field(default_factory=lambda: [0])  # among its siblings, by the LLM's probability
    pending: list[tuple[float, int, int, int]] = field(default_factory=list)  # the level being computed: (P, parent, token, rank)
    sent: int = 0  # streamed rounds: nodes whose distributions have gone out
    # streamed rounds: each node's top-k or packed DIST frame as first made, so that a replay (a device
    # re-attached at the root, in the event loop) does not encode the round again: 64 packed frames at
    # V = 262,144 took ~0.2 s there, per ATTACH
    node_frames: dict[int, bytes] = field(default_factory=dict)
    elapsed: float = 0.0  # seconds the cloud spent on this round's levels so far

    @property
    def size(self) -> int:
        return len(self.parents)

    def begin(self, root: Tensor) -> list[tuple[int, int]]:
        self.logps = [root]
        return self._next_level()

    def extend(self, logps: Tensor, seconds: float) -> list[tuple[int, int]]:
        """The pending level's [n, V] log-probabilities, computed in `seconds`."""
        self.controller.level_took(len(self.pending), seconds)
        self.elapsed += seconds
        self.frontier = []
        for (p, parent, token, rank), logp in zip(self.pending, logps):
            self.rank.append(rank)
            if self.extends_branches or not self.frontier:  # the first named is the main chain's
                self.frontier.append(self.size)
            self.parents.append(parent)
            self.tokens.append(token)
            self.reach.append(p)
            self.depth.append(self.depth[parent] + 1)
            self.logps.append(logp)
        self.pending = []
        return self._next_level()

    def _candidates(self) -> list[tuple[float, int, int, bool]]:
        """(P, parent, token, rank) for the children of the frontier, most likely first."""
        c, out = self.controller, []
        for node in self.frontier:
            logp = self.logps[node]
            probs, ids = torch.topk(logp.float().exp(), min(MAX_WIDTH, logp.shape[-1]))
            for rank, (p, t) in enumerate(zip(probs.tolist(), ids.tolist())):
                if p > 0:
                    out.append((self.reach[node] * c.stay(rank, p), node, t, rank))
        return sorted(out, key=lambda c: -c[0])

    def _next_level(self) -> list[tuple[int, int]]:
        b = self.controller.bounds
        level = self.depth[self.frontier[0]] + 1 if self.frontier else b.depth + 1
        room = b.nodes - self.size
        if level > b.depth or room <= 0 or not self.frontier:
            return []
        if b.mode == frames.LOOKAHEAD_FIXED:
            take = self._fixed(room, b)
        else:
            take = self._worth(room)
        self.pending = take
        return [(parent, token) for _, parent, token, _ in take]

    def _fixed(self, room: int, b: frames.Lookahead) -> list[tuple[float, int, int, int]]:
        per_level = max(1, (b.nodes - 1) // max(b.depth, 1))
        return self._pick(self._candidates(), min(per_level, room), lambda p: True)

    def _worth(self, room: int) -> list[tuple[float, int, int, int]]:
        c = self.controller
        S, cands, take = c.saving(), self._candidates(), []
        if S > 0 and c.bounds.streamed:
            cost = self._streamed_cost()
            for cand in cands[:room]:
                if cand[0] * S <= cost(len(take) + 1) - cost(len(take)):
                    break
                take.append(cand)
        elif S > 0:
            a, b = c.level_cost()
            node_cost = b
            take = self._pick(cands, room, lambda p: p * S > node_cost)
            if sum(c[0] for c in take) * S - node_cost * len(take) <= a:
                take = []
        if not take and self.size == 1 and c.probe_due():
            take = self._pick(cands, 1, lambda p: True)
        return take

    def _streamed_cost(self):
        """cost(n) of the next level of a streamed round, in seconds (module docs)."""
        R, L = self.controller.round_trip()
        a, b = self.controller.level_cost()
        above = sum(self.reach[node] for node in self.frontier)

        def cost(n: int) -> float:
            if n == 0:
                return 0.0
            t = a + b * n
            return above * max(0.0, t - L) + (t if self.elapsed + t > R else 0.0)

        return cost

    def _pick(self, cands, room: int, keep) -> list[tuple[float, int, int, int]]:
        """The most likely candidates that `keep` accepts, at most `room` (on llama.cpp the first
        named of a level is its main chain's node)."""
        out = []
        for cand in cands:
            if len(out) >= room or not keep(cand[0]):
                break
            out.append(cand)
        return out

    # -- after the round ------------------------------------------------------------------

    def child(self, node: int, token: int) -> int | None:
        return next((i for i in range(node + 1, self.size) if self.parents[i] == node and self.tokens[i] == token), None)

    def max_depth(self) -> int:
        return max(self.depth)

    def follow(self, tokens: list[int]) -> int | None:
        """The node where the device chose its last token (the path of all the others); None when a
        token before the last is not on the tree. Feeds the controller: at each node reached that
        has children, which ranks were offered, with what probability, and which one was taken."""
        node = 0
        for i, t in enumerate(tokens):
            nxt = self.child(node, t)
            for j in range(node + 1, self.size):
                if self.parents[j] == node:
                    p = float(self.logps[node][self.tokens[j]].exp())
                    self.controller.calibrate(self.rank[j], p, j == nxt)
            if i == len(tokens) - 1:
                break
            if nxt is None:
                return None
            node = nxt
        return node

    def stop(self) -> None:
        """The device left the round (its uplink came): the level announced last will not be computed."""
        self.pending = []

    def level_frame(self, position: int, encode_node) -> bytes:
        """A streamed round's next frame: the nodes computed since the last one and the plan of the
        level now being computed (the rows begin/extend returned); a plain DIST for a root alone."""
        if self.size == 1 and not self.pending:
            self.sent = 1
            return self._node_frame(0, position, encode_node)
        frame = self._level(position, encode_node, self.sent, self.size, [(p, t) for _, p, t, _ in self.pending])
        self.sent = self.size
        return frame

    def replay(self, position: int, encode_node) -> list[bytes]:
        """The round as computed so far, level by level (a device that re-attached at its root)."""
        if self.size == 1:
            return [self._node_frame(0, position, encode_node)]
        out, first = [], 0
        for d in range(self.max_depth() + 1):
            end = first + self.depth.count(d)
            plan = [(self.parents[i], self.tokens[i]) for i in range(end, self.size) if self.depth[i] == d + 1]
            out.append(self._level(position, encode_node, first, end, plan))
            first = end
        return out

    def _level(self, position: int, encode_node, first: int, end: int, plan: list[tuple[int, int]]) -> bytes:
        """LEVEL frame of nodes first..end-1 (one level: they are appended level by level) and `plan`."""
        blobs = [self._node_frame(i, position, encode_node) for i in range(first, end)]
        return frames.encode_level(position, first, blobs, [p for p, _ in plan], [t for _, t in plan])

    def _node_frame(self, node: int, position: int, encode_node) -> bytes:
        """Node's DIST frame in the round rooted at `position`, made once. A full frame (4 bytes a
        token: a copy of the node's vector) is not kept: making it again costs only that copy."""
        frame = self.node_frames.get(node)
        if frame is None:
            frame = encode_node(self.logps[node], position + self.depth[node])
            if len(frame) < self.logps[node].numel():
                self.node_frames[node] = frame
        return frame

    def encode(self, position: int, encode_node, cloud_us: int) -> bytes:
        """The round as the device reads it: a DIST frame for the root alone, else a TREE frame;
        `encode_node(logp, position)` makes each node's DIST frame."""
        blobs = [encode_node(logp, position + d) for logp, d in zip(self.logps, self.depth)]
        if self.size == 1:
            return blobs[0]
        return frames.encode_tree(position, self.parents[1:], self.tokens[1:], blobs, cloud_us)
