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


# Look-ahead (docs/wire-format.md, "Look-ahead"): how many positions one round trip may carry.
MAX_LOOKAHEAD = 32  # positions one round may carry: the device bounds what it asks for
AUTO_DEPTH, AUTO_NODES = 8, 16  # costeer serve's 'auto' asks within these (and the server's limits)
LOOKAHEAD_HELP = ("How many positions one round trip may carry: 'auto' (from the measured round trip, the cloud's "
                  "cost per position and how often the device stayed on the look-ahead), 'off' (one token per "
                  f"round trip), N <= {MAX_LOOKAHEAD} (a chain of N positions each round); with costeer serve also "
                  "'chain:D' (D positions past the first) and 'tree:D:M' (D levels, M nodes past the first: where the "
                  "LLM is unsure, its other candidates too). Outputs are the same whatever it is.")  # fmt: skip


@dataclass(frozen=True)
class Lookahead:
    """`--lookahead`: depth None is auto; 1 is off (one position per round trip); N a chain of N
    positions per round. `tree` > 0 (costeer serve only): a tree of depth - 1 levels and `tree`
    nodes past the round's first position."""

    depth: int | None = None
    tree: int = 0

    def __post_init__(self) -> None:
        d = self.depth
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_LOOKAHEAD):
            raise ValueError(f"lookahead must be 'auto', 'off' or a number from 1 to {MAX_LOOKAHEAD}, got {d!r}")
        if self.tree and (d is None or d < 2 or self.tree < d - 1 or self.tree >= 0xFFFF):
            raise ValueError("a look-ahead tree needs at least one level and one node per level")

    @classmethod
    def parse(cls, value: Lookahead | int | str | None) -> Lookahead:
        """'auto' / None, 'off' / 0, N, 'chain:D' or 'tree:D:M' -> Lookahead (itself when given one)."""
        if isinstance(value, Lookahead):
            return value
        if value is None:
            return cls()
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(max(1, value))
        text = str(value).strip().lower()
        if text == "auto":
            return cls()
        if text in ("off", "0"):
            return cls(1)
        if text.isdigit():
            return cls(int(text))
        kind, *nums = text.split(":")
        if all(n.isdigit() for n in nums) and ((kind, len(nums)) in (("chain", 1), ("tree", 2))) and int(nums[0]) >= 1:
            depth = int(nums[0]) + 1
            return cls(depth, int(nums[1]) if kind == "tree" else 0)
        raise ValueError(f"lookahead must be 'auto', 'off', a number from 1 to {MAX_LOOKAHEAD}, 'chain:D' or "
                         f"'tree:D:M', got {value!r}")  # fmt: skip

    @property
    def auto(self) -> bool:
        return self.depth is None

    @property
    def on(self) -> bool:
        return self.depth != 1

    def request(self, max_depth: int, max_nodes: int) -> frames.Lookahead:
        """What OPEN asks costeer serve for: auto within AUTO_DEPTH / AUTO_NODES and the server's
        limits; a chain or a tree as it is (a server that allows less refuses it with 4413)."""
        if self.auto:
            depth, nodes = min(AUTO_DEPTH, max_depth), min(AUTO_NODES, max_nodes)
            return frames.Lookahead(frames.LOOKAHEAD_AUTO, depth, nodes) if depth and nodes > 1 else frames.NO_LOOKAHEAD
        if not self.on:
            return frames.NO_LOOKAHEAD
        ahead = self.tree or self.depth - 1
        return frames.Lookahead(frames.LOOKAHEAD_FIXED, self.depth - 1, ahead + 1)

    def __str__(self) -> str:
        if self.tree:
            return f"tree:{self.depth - 1}:{self.tree}"
        return "auto" if self.auto else "off" if self.depth == 1 else str(self.depth)
