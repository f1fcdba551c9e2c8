"""What the device asks a cloud for per token, as one value checked once (`--cloud-k`).

docs/wire-format.md describes the frame kinds; this module holds the device's choice among them
and its defaults, so that the CLI, `connect_cloud` and `connect_engine` read one parsed value.
"""

from __future__ import annotations

from dataclasses import dataclass

from costeer import frames

DEFAULT_K = 256  # top-k entries per frame: 1,044 bytes for SmolLM2 (docs/wire-format.md)
PACKED_K = 4096  # 'packed' without a number: the largest packed frame (about 5.5 KB at V = 262,144)
TAILS = ("slm", "uniform")  # models of the mass outside a top-k: the SLM's own distribution, or flat

HELP = ("'packed[:N]' (every token down to the cloud's floor, at most N; the default with costeer serve), "
        "a top-k size (256 with a serving engine), or 'full' (exact). docs/wire-format.md.")  # fmt: skip


@dataclass(frozen=True)
class CloudFrames:
    """The frames a device asks for: the whole vocabulary (k = frames.FULL), a top-k list (k >= 1),
    or packed frames (every token down to the cloud's floor, at most k >= 1)."""

    k: int
    packed: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"k must be a positive integer or 'full', got {self.k!r}")
        if self.packed and self.k < 1:
            raise ValueError(f"k must be 'packed' or 'packed:N' with N >= 1, got 'packed:{self.k}'")

    @classmethod
    def parse(cls, value: CloudFrames | int | str | None) -> CloudFrames:
        """'full' / 0 / None, a top-k size, 'packed' or 'packed:N' -> CloudFrames (itself when given one)."""
        if isinstance(value, CloudFrames):
            return value
        if value is None:
            return cls(frames.FULL)
        if isinstance(value, int):
            return cls(value)
        text = value.strip().lower()
        if text == "full":
            return cls(frames.FULL)
        if text.startswith("packed"):
            rest = text[len("packed") :]
            if not rest:
                return cls(PACKED_K, packed=True)
            if not rest.startswith(":") or not rest[1:].isdigit() or int(rest[1:]) < 1:
                raise ValueError(f"k must be 'packed' or 'packed:N' with N >= 1, got {value!r}")
            return cls(int(rest[1:]), packed=True)
        try:
            return cls(int(text))
        except ValueError:
            raise ValueError(f"k must be a positive integer, 'full', 'packed' or 'packed:N', got {value!r}") from None

    @classmethod
    def default_for(cls, api: str) -> CloudFrames:
        """Packed frames from costeer serve (under 2 KB a token at >= 99.5% greedy agreement across
        tokenizers, docs/wire-format.md); top-256 lists from a serving engine."""
        return cls(PACKED_K, packed=True) if api == "costeer" else cls(DEFAULT_K)

    @property
    def full(self) -> bool:
        return self.k == frames.FULL and not self.packed

    def top_k_only(self) -> CloudFrames:
        """Itself, when it is a top-k list: what a serving engine can answer."""
        if self.packed:
            raise ValueError("--cloud-k packed needs --cloud-api costeer (serving engines answer with top-k lists)")
        if self.full:
            raise ValueError("engines return a top-k only: give a number for k")
        return self

    def __str__(self) -> str:
        if self.packed:
            return "packed" if self.k == PACKED_K else f"packed:{self.k}"
        return "full" if self.full else str(self.k)


DEFAULT_FRAMES = CloudFrames.default_for("costeer")


def check_tail(tail: str) -> str:
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    return tail


# Look-ahead (docs/wire-format.md, "Look-ahead"): what the device lets the cloud compute ahead.
AUTO_DEPTH, AUTO_NODES = 8, 16  # 'auto' within these (and the server's limits): enough for ~100 ms RTT
LOOKAHEAD_HELP = ("'auto' (the cloud sizes each round's tree from the round trip it measures, its cost per level "
                  "and how often this device stays in the tree; none where the round trip is cheap), 'off', N "
                  "(auto, at most N nodes ahead), 'chain:D' or 'tree:D:N' (that shape every round: for benchmarks).")


@dataclass(frozen=True)
class Lookahead:
    """The device's look-ahead choice, checked once; `request(limits)` -> what OPEN asks for."""

    mode: int = frames.LOOKAHEAD_AUTO
    depth: int = AUTO_DEPTH
    ahead: int = AUTO_NODES - 1  # nodes below the root

    def __post_init__(self) -> None:
        if self.mode not in (frames.LOOKAHEAD_OFF, frames.LOOKAHEAD_AUTO, frames.LOOKAHEAD_FIXED):
            raise ValueError(f"unknown look-ahead mode {self.mode}")
        if self.mode != frames.LOOKAHEAD_OFF and not (1 <= self.depth <= 255 and self.depth <= self.ahead < 0xFFFF):
            raise ValueError("look-ahead needs 1 to 255 levels and at least one node per level")

    @classmethod
    def parse(cls, value: "Lookahead | int | str | None") -> "Lookahead":
        """'auto' | 'off' | N | 'chain:D' | 'tree:D:N' -> Lookahead (itself when given one)."""
        if isinstance(value, Lookahead):
            return value
        if value is None:
            return cls()
        text = str(value).strip().lower()
        parts = text.split(":")
        try:
            if text == "auto":
                return cls()
            if text in ("off", "0"):
                return cls(frames.LOOKAHEAD_OFF, 0, 0)
            if len(parts) == 1:
                n = int(text)
                return cls(frames.LOOKAHEAD_AUTO, min(n, 255), n)
            if parts[0] == "chain" and len(parts) == 2:
                return cls(frames.LOOKAHEAD_FIXED, int(parts[1]), int(parts[1]))
            if parts[0] == "tree" and len(parts) == 3:
                return cls(frames.LOOKAHEAD_FIXED, int(parts[1]), int(parts[2]))
        except ValueError as e:
            if "look-ahead" in str(e):
                raise
        raise ValueError(f"lookahead must be 'auto', 'off', N, 'chain:D' or 'tree:D:N', got {value!r}")

    @property
    def on(self) -> bool:
        return self.mode != frames.LOOKAHEAD_OFF

    def request(self, max_depth: int, max_nodes: int) -> frames.Lookahead:
        """What OPEN asks for, within the server's limits: auto is clipped to them; a fixed shape
        is asked for as it is (a server that allows less refuses it with 4413)."""
        if not self.on:
            return frames.NO_LOOKAHEAD
        if self.mode == frames.LOOKAHEAD_AUTO:
            depth = min(self.depth, max_depth)
            nodes = min(self.ahead + 1, max_nodes)
            return frames.Lookahead(frames.LOOKAHEAD_AUTO, depth, nodes) if depth and nodes > 1 else frames.NO_LOOKAHEAD
        return frames.Lookahead(frames.LOOKAHEAD_FIXED, self.depth, self.ahead + 1)

    def __str__(self) -> str:
        if not self.on:
            return "off"
        if self.mode == frames.LOOKAHEAD_AUTO:
            return "auto" if (self.depth, self.ahead) == (AUTO_DEPTH, AUTO_NODES - 1) else str(self.ahead)
        return f"chain:{self.depth}" if self.ahead == self.depth else f"tree:{self.depth}:{self.ahead}"
