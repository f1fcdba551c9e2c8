"""Every method in one table: which prompts it reads, which fusion stages it runs, how its
coefficient is chosen, where the paper lists it, and its help text. Everything else the code
knows about a method (the `Method` enum, the CLI's choices and default list, the report's order
and its privacy marks, what `CoSteer.stream` checks and builds) is derived from a row here.

Adding a method is adding a row; a method whose fusion needs a new stage also adds that stage to
engine/fusion.py (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

from costeer.steering import FTRLParams, effective_coefficient, light_coefficient

# The prompts a method may read. Only *_context prompts hold the private context; "slm_reference" is a
# public reference profile in the context's format, then the query (docs/steering-variants.md §5).
BRANCHES = ("llm", "llm_context", "slm", "slm_context", "slm_reference")
STEERED = ("llm", "slm", "slm_context")  # what a steered method reads: the LLM on the query, the SLM pair


@dataclass(frozen=True)
class MethodSpec:
    name: str
    help: str
    # The prompts it reads, the primary source's first: a steered method decodes the LLM on "llm"
    # and steers with the SLM pair (its "slm" — or "slm_reference" when given — and "slm_context").
    branches: tuple[str, ...]
    stages: tuple[str, ...] = ()  # fusion stages in order (engine/fusion.py); () = not steered
    coefficient: Callable[[FTRLParams], float] | None = None  # the delta's b from the FTRL parameters
    paper_rank: int | None = None  # place among the paper's six: the default `eval` list and the report's order

    def __post_init__(self) -> None:
        if not self.branches or set(self.branches) - set(BRANCHES):
            raise ValueError(f"method {self.name}: branches must come from {BRANCHES}")
        if bool(self.stages) != (self.coefficient is not None):
            raise ValueError(f"method {self.name}: a steered method has stages and a coefficient, a baseline neither")
        if self.stages and (self.stages[0] != "costeer" or self.branches[0] != "llm" or "slm_context" not in self.branches):
            raise ValueError(f"method {self.name}: steering starts with the paper's update, over the LLM and the SLM pair")

    @property
    def steered(self) -> bool:
        return bool(self.stages)

    @property
    def primary(self) -> str:
        """The prompt the primary source decodes (the LLM's for a steered method)."""
        return self.branches[0]

    @property
    def uses_llm(self) -> bool:
        return any(b.startswith("llm") for b in self.branches)

    @property
    def uses_slm(self) -> bool:
        return any(b.startswith("slm") for b in self.branches)

    @property
    def needs_context(self) -> bool:
        return any(b.endswith("_context") for b in self.branches)

    @property
    def matched(self) -> bool:
        """The SLM's without-context branch reads a public reference profile, not the bare query."""
        return "slm_reference" in self.branches

    @property
    def privacy_violating(self) -> bool:
        """The LLM reads the private context: a comparison point, refused with a remote LLM."""
        return "llm_context" in self.branches


PAPER = effective_coefficient  # the T-step FTRL update's b (Eq. 7)

METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("costeer", "LLM steered by the on-device SLM delta (paper's T-step FTRL update)",
               STEERED, ("costeer",), PAPER, paper_rank=3),
    MethodSpec("light", "LightCoSteer: one-step update, β* = β/(λ+1/η)",
               STEERED, ("costeer",), light_coefficient, paper_rank=4),
    # the paper's update plus named fusion stages (VariantConfig; docs/steering-variants.md)
    MethodSpec("costeer_plausible", "costeer among the LLM's plausible tokens, π_base ≥ τ·max π_base",
               STEERED, ("costeer", "plausible"), PAPER),
    MethodSpec("costeer_trust", "costeer with a per-token trust region, KL(π‖π_base) ≤ ε",
               STEERED, ("costeer", "trust"), PAPER),
    MethodSpec("costeer_plausible_trust", "costeer_plausible and costeer_trust together",
               STEERED, ("costeer", "plausible", "trust"), PAPER),
    # "guard" comes before the head and the trust region: they then work on the tokens that may still be said
    MethodSpec("costeer_guarded", "costeer_plausible_trust plus a repetition penalty and no-repeat n-gram ban",
               STEERED, ("costeer", "guard", "plausible", "trust"), PAPER),
    MethodSpec("costeer_matched", "costeer with the delta taken against a matched public reference profile (raising "
               "only tokens of the private context), plus the no-repeat n-gram guard",
               ("llm", "slm", "slm_reference", "slm_context"), ("costeer", "support", "guard"), PAPER),
    MethodSpec("llm", "LLM alone on the public query (baseline)", ("llm",), paper_rank=2),
    MethodSpec("llm_context", "LLM is GIVEN the private context: privacy-violating upper bound, never for real use",
               ("llm_context",), paper_rank=5),
    MethodSpec("slm", "SLM alone on the public query (baseline)", ("slm",), paper_rank=0),
    MethodSpec("slm_context", "SLM alone with the private context (on-device baseline)", ("slm_context",), paper_rank=1),
)  # fmt: skip
SPECS: dict[str, MethodSpec] = {s.name: s for s in METHODS}


class _MethodBase(str, Enum):
    """A method's name; `.spec` is its row, and the row's facts read as the member's own
    (`Method.costeer.steered`, `.uses_llm`, `.matched`, …)."""

    @property
    def spec(self) -> MethodSpec:
        return SPECS[self.value]

    def __getattr__(self, name: str):
        if name.startswith("_"):  # the Enum machinery's own lookups
            raise AttributeError(name)
        return getattr(self.spec, name)


# What drives the decoding: one member per row, in the table's order.
Method = _MethodBase("Method", [(s.name, s.name) for s in METHODS], module=__name__, qualname="Method")

# The paper's six, in its order: the default `costeer eval` list and the first rows of a report.
PAPER_METHODS: tuple[str, ...] = tuple(s.name for s in sorted((s for s in METHODS if s.paper_rank is not None),
                                                              key=lambda s: s.paper_rank))  # fmt: skip
