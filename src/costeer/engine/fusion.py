"""Fusion as a pipeline of named stages (in the manner of vLLM's Sampler / transformers' LogitsProcessor).

Per token the decode loop hands the pipeline the LLM's aligned log-probabilities, the SLM's two branches and
the aligned ids generated so far; each stage maps a `FusionState` to a new one, calling the pure functions
of `costeer.steering`. Every stage shapes the exponential family π ∝ π_base·e^{bΔ}, changing which base or
which b, and recomputes the policy from it: "costeer" (the paper's update, always first), "support",
"guard", "plausible", "trust" ("support" edits the delta rather than the base). Which stages a method runs,
in which order, is data: the method's row in engine/methods.py; `fusion_pipeline` builds them by name.

The guard edits the base. For the paper's update that is the same as editing the fused policy (both are
additive or masks in log space, and the policy is log_softmax(base + bΔ)), i.e. a guard "after fusion";
running it before "plausible" and "trust" makes the head's max and the trust region's anchor those of the
tokens that may still be said. After the head instead, a ban can meet a head holding only the banned
token, and cannot act (seen on SmolLM2: "Dear [Neighbours Name] and [Neighbours Address]").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Protocol, Sequence

from torch import Tensor

from costeer.engine.config import SteeringConfig, VariantConfig
from costeer.engine.methods import Method
from costeer.steering import (
    fuse_delta,
    lift_supported,
    repetition_guard,
    restrict,
    safe_delta,
    steering_head,
    trust_region_coefficient,
)


@dataclass(frozen=True)
class FusionState:
    """What the stages pass along. `base` is log π_base up to a per-row constant (the aligned view)."""

    base: Tensor  # [..., K] the LLM's policy as the stages left it (guarded, restricted to the head)
    pers: Tensor  # [..., K] log π*_pers (the SLM with the context)
    delta: Tensor  # [..., K] Δ = log π*_pers − log π*_base
    b: float | Tensor  # the delta's coefficient: a float, or [..., 1] per row once "trust" ran
    logp: Tensor  # [..., K] the fused policy so far (normalised)
    history: Sequence[int]  # aligned ids generated so far (never modified)


class Stage(Protocol):
    name: ClassVar[str]

    def __call__(self, s: FusionState) -> FusionState: ...


@dataclass(frozen=True)
class PaperUpdate:
    """log π = log_softmax(log π_base + b Δ): the paper's T-step FTRL update collapsed (steering.py)."""

    b: float
    name: ClassVar[str] = "costeer"

    def __call__(self, s: FusionState) -> FusionState:
        return replace(s, b=self.b, logp=fuse_delta(s.base, s.delta, self.b))


@dataclass(frozen=True)
class PlausibilityHead:
    """Steer only among {a : π_base(a) ≥ τ·max π_base} (with tau_pers, united with the with-context SLM's
    head: steering.steering_head); τ = 0 is the identity."""

    tau: float
    tau_pers: float | None = None
    name: ClassVar[str] = "plausible"

    def __call__(self, s: FusionState) -> FusionState:
        if self.tau == 0.0:
            return s
        base = restrict(s.base, steering_head(s.base, s.pers, self.tau, self.tau_pers))
        return replace(s, base=base, logp=fuse_delta(base, s.delta, s.b))


@dataclass(frozen=True)
class TrustRegion:
    """The largest b ≤ the current b with KL(π ‖ π_base) ≤ ε, per row; ε = None is the identity.

    After "plausible", π_base is the head's renormalised policy: ε budgets the steering alone."""

    epsilon: float | None
    name: ClassVar[str] = "trust"

    def __call__(self, s: FusionState) -> FusionState:
        if self.epsilon is None:
            return s
        b = trust_region_coefficient(s.base, s.delta, s.b, self.epsilon)  # [..., 1]
        return replace(s, b=b, logp=fuse_delta(s.base, s.delta, b))


@dataclass(frozen=True)
class RepetitionGuard:
    """Repetition penalty on generated tokens, then the no-repeat-n-gram ban, on the base (see the module
    docstring: for the paper's update the same as after fusion); (0, 0) is the identity."""

    penalty: float
    n: int
    name: ClassVar[str] = "guard"

    def __call__(self, s: FusionState) -> FusionState:
        if self.penalty == 0.0 and self.n == 0:
            return s
        base = repetition_guard(s.base, s.history, self.penalty, self.n)
        return replace(s, base=base, logp=fuse_delta(base, s.delta, s.b))


@dataclass(frozen=True)
class ContextSupport:
    """Δ raises only the tokens of the private context (steering.lift_supported); outside them it may only
    lower. `support` (bool [K]) comes from the request's context (vocab.support_mask); None is the identity."""

    support: Tensor | None
    name: ClassVar[str] = "support"

    def __call__(self, s: FusionState) -> FusionState:
        if self.support is None:
            return s
        d = lift_supported(s.delta, self.support)
        return replace(s, delta=d, logp=fuse_delta(s.base, d, s.b))


@dataclass(frozen=True)
class FusionPipeline:
    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages or not isinstance(self.stages[0], PaperUpdate):
            raise ValueError("a fusion pipeline starts with the paper's update")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(st.name for st in self.stages)

    @property
    def coefficient(self) -> float:
        """The delta's coefficient b_T the paper's update starts from (a later "trust" may lower it per token)."""
        return self.stages[0].b

    def run(self, logp_base: Tensor, logp_pers: Tensor, logp_base_slm: Tensor,
            history: Sequence[int] = ()) -> FusionState:  # fmt: skip
        """Every stage in turn; the final state (its `b` is the coefficient actually used)."""
        d = safe_delta(logp_pers, logp_base_slm)
        s = FusionState(base=logp_base, pers=logp_pers, delta=d, b=0.0, logp=logp_base, history=history)
        for stage in self.stages:
            s = stage(s)
        return s

    def __call__(self, logp_base: Tensor, logp_pers: Tensor, logp_base_slm: Tensor,
                 history: Sequence[int] = ()) -> Tensor:  # fmt: skip
        """The fused log-probabilities.   three [..., K] -> [..., K]"""
        return self.run(logp_base, logp_pers, logp_base_slm, history).logp


def paper_pipeline(b: float) -> FusionPipeline:
    """The paper's update alone (what `costeer` and `light` run)."""
    return FusionPipeline((PaperUpdate(b),))


@dataclass(frozen=True)
class StageInputs:
    """What building a stage may read: the method's coefficient, the variant parameters, the request's support."""

    b: float  # the delta's coefficient by the method's rule (SteeringConfig.coefficient)
    variant: VariantConfig
    support: Tensor | None  # bool [K] (vocab.support_mask of the with-context message), or None


# Each stage by the name a method's row gives it (engine/methods.py). A new stage: its class above and a line here.
_BUILD: dict[str, Callable[[StageInputs], Stage]] = {
    "costeer": lambda i: PaperUpdate(i.b),
    "plausible": lambda i: PlausibilityHead(i.variant.tau, i.variant.tau_pers),
    "trust": lambda i: TrustRegion(i.variant.epsilon),
    "guard": lambda i: RepetitionGuard(i.variant.repetition_penalty, i.variant.no_repeat_ngram),
    "support": lambda i: ContextSupport(i.support),
}


def fusion_pipeline(method: Method | str, steering: SteeringConfig, support: Tensor | None = None) -> FusionPipeline:
    """The stages `method` runs (its row's `stages`), parameterised by `steering`; `support` (bool [K],
    vocab.support_mask of the with-context message) for the "support" stage."""
    method = Method(method)
    if not method.steered:
        raise ValueError(f"method '{method.value}' does not steer")
    inputs = StageInputs(steering.coefficient(method), steering.variants(), support)
    return FusionPipeline(tuple(_BUILD[name](inputs) for name in method.spec.stages))
