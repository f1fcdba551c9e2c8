"""Options gathered in one place (pydantic, validated at the edge)."""

from __future__ import annotations

import math
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, field_validator

from costeer.steering import FTRLParams, effective_coefficient, light_coefficient


class Method(str, Enum):
    """What drives the decoding. Only `llm_context` ever shows the private context to the LLM."""

    costeer = "costeer"  # LLM steered by the SLM delta, T-step FTRL update (the paper's method)
    light = "light"  # LightCoSteer: the T = 1 update (Eq. 8)
    # the paper's update plus named fusion stages (VariantConfig; docs/steering-variants.md)
    costeer_plausible = "costeer_plausible"  # delta only among the LLM's plausible tokens (τ)
    costeer_trust = "costeer_trust"  # per-token trust region KL(π ‖ π_base) ≤ ε
    costeer_plausible_trust = "costeer_plausible_trust"  # both
    costeer_guarded = "costeer_guarded"  # both, and the repetition guard
    # the delta against a matched reference context (a public profile in the same format), raising only
    # tokens of the private context, and the repetition guard
    costeer_matched = "costeer_matched"
    llm = "llm"  # LLM alone, public query only
    llm_context = "llm_context"  # LLM sees the context: privacy-VIOLATING upper bound, for comparison only
    slm = "slm"  # SLM alone, public query only
    slm_context = "slm_context"  # SLM alone with the context (stays on the device)

    @property
    def steered(self) -> bool:
        return self in STEERING_STAGES

    @property
    def matched(self) -> bool:
        """The SLM's without-context branch sees a reference context, not the bare query."""
        return self is Method.costeer_matched

    @property
    def uses_llm(self) -> bool:
        return self.steered or self in (Method.llm, Method.llm_context)

    @property
    def uses_slm(self) -> bool:
        return self is not Method.llm and self is not Method.llm_context


METHOD_HELP = {
    Method.costeer: "LLM steered by the on-device SLM delta (paper's T-step FTRL update)",
    Method.light: "LightCoSteer: one-step update, β* = β/(λ+1/η)",
    Method.costeer_plausible: "costeer among the LLM's plausible tokens, π_base ≥ τ·max π_base",
    Method.costeer_trust: "costeer with a per-token trust region, KL(π‖π_base) ≤ ε",
    Method.costeer_plausible_trust: "costeer_plausible and costeer_trust together",
    Method.costeer_guarded: "costeer_plausible_trust plus a repetition penalty and no-repeat n-gram ban",
    Method.costeer_matched: "costeer with the delta taken against a matched public reference profile (raising "
    "only tokens of the private context), plus the no-repeat n-gram guard",
    Method.llm: "LLM alone on the public query (baseline)",
    Method.llm_context: "LLM is GIVEN the private context: privacy-violating upper bound, never for real use",
    Method.slm: "SLM alone on the public query (baseline)",
    Method.slm_context: "SLM alone with the private context (on-device baseline)",
}


# The fusion stages each steered method runs, in order (engine/fusion.py builds them). "costeer" is
# the paper's update log_softmax(log π_base + b Δ) and always comes first; "guard" comes before the
# head and the trust region so that they work on the tokens that may still be said (fusion.py).
STEERING_STAGES: dict[Method, tuple[str, ...]] = {
    Method.costeer: ("costeer",),
    Method.light: ("costeer",),  # the same update with LightCoSteer's coefficient
    Method.costeer_plausible: ("costeer", "plausible"),
    Method.costeer_trust: ("costeer", "trust"),
    Method.costeer_plausible_trust: ("costeer", "plausible", "trust"),
    Method.costeer_guarded: ("costeer", "guard", "plausible", "trust"),
    # and the SLM's without-context branch reads a matched reference (api.py)
    Method.costeer_matched: ("costeer", "support", "guard"),
}


class VariantConfig(BaseModel):
    """Parameters of the fusion stages after the paper's update (docs/steering-variants.md).

    Each stage is the identity at its "off" value, so e.g. `costeer_guarded` with tau=0, epsilon=None
    is the paper's update plus the repetition guard alone.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Contrastive Decoding's own value: keep tokens at least a tenth as likely as the LLM's favourite.
    tau: float = Field(0.1, ge=0, le=1, description="plausible head: π_base(a) ≥ τ·max π_base; 0 = off")
    # The head is the LLM's alone; a union with the with-context SLM's head is the option to
    # measure against it (a personal detail is implausible to the LLM by construction: steering_head).
    tau_pers: float | None = Field(None, ge=0, le=1, description="plus π*_pers ≥ τ_pers·max π*_pers; None: off")
    # 0.5 nats: under greedy decoding the delta can overturn the LLM's favourite p against one rival only
    # while −½·log(4p(1−p)) ≤ ε, i.e. p ≲ 0.9: it re-ranks what the LLM is unsure of, not what it is sure of.
    epsilon: float | None = Field(0.5, ge=0, description="trust region, nats per token; None (or inf) = off")
    # Off by default: the n-gram ban targets loops without taxing every function word already used.
    repetition_penalty: float = Field(0.0, ge=0, description="nats taken from every generated token; 0 = off")
    # 4, the window of the degeneration figure: 3 can already ban a repeated markdown bullet opener.
    no_repeat_ngram: int = Field(4, ge=0, le=64, description="ban repeating any n-gram of the output; 0 = off")

    @field_validator("epsilon")
    @classmethod
    def _infinite_is_off(cls, v: float | None) -> float | None:
        if v is not None and math.isnan(v):
            raise ValueError("epsilon is NaN")
        return None if v is None or math.isinf(v) else v


class SteeringConfig(BaseModel):
    """The paper's FTRL hyper-parameters (Appendix B.1 defaults), and the variants' parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    T: int = Field(20, ge=1, le=100_000)
    alpha: float = Field(2.0, ge=0)
    beta: float = 1.0
    lam: float = Field(2.0, ge=0)
    eta: float = Field(10.0, gt=0)
    # None: VariantConfig()'s defaults. Kept None unless set, so run folders written before the
    # variants existed (no such key) still resume.
    variant: VariantConfig | None = None
    # Confidence gate (off by default): where the LLM's top probability reaches `gate`, the token
    # is the LLM's own and the SLM pair does not run; its caches catch up when steering resumes.
    gate: float | None = Field(None, gt=0, le=1)

    def params(self) -> FTRLParams:
        return FTRLParams(T=self.T, alpha=self.alpha, beta=self.beta, lam=self.lam, eta=self.eta)

    def variants(self) -> VariantConfig:
        """The variant parameters in force (the defaults when none were given)."""
        return self.variant or VariantConfig()

    def coefficient(self, method: Method) -> float:
        """The delta's effective coefficient b for a steered method."""
        if method is Method.light:
            return light_coefficient(self.params())
        return effective_coefficient(self.params())


class SamplingConfig(BaseModel):
    """Greedy by default (the paper sets do_sample=False)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    max_new_tokens: int = Field(128, ge=1, le=32_768)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def unread(self) -> list[str]:
        """The sampling options set that greedy decoding does not read (temperature 0 ignores them)."""
        if not self.greedy:
            return []
        off = {"top_k": 0, "top_p": 1.0, "seed": None}
        return [name for name, value in off.items() if getattr(self, name) != value]


class GenerationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steering: SteeringConfig = SteeringConfig()
    sampling: SamplingConfig = SamplingConfig()
    min_shared_vocab: float = Field(
        0.3, ge=0, le=1, description="smallest share of the smaller vocabulary two tokenizers must share"
    )
