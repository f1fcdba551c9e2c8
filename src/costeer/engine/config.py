"""Options gathered in one place (pydantic, validated at the edge); the methods are engine/methods.py's table."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator

from costeer.engine.methods import Method
from costeer.steering import FTRLParams


# Derived from the method table (engine/methods.py), kept for the code that reads them by these names.
METHOD_HELP: dict[Method, str] = {m: m.spec.help for m in Method}
# The fusion stages each steered method runs, in order (engine/fusion.py builds them).
STEERING_STAGES: dict[Method, tuple[str, ...]] = {m: m.spec.stages for m in Method if m.steered}


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

    # finite numbers only: β = inf or NaN makes b_T non-finite and the fused policy NaN (an empty answer)
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

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

    def coefficient(self, method: Method | str) -> float:
        """The delta's effective coefficient b for a steered method (its row's rule, engine/methods.py)."""
        spec = Method(method).spec
        if spec.coefficient is None:
            raise ValueError(f"method '{spec.name}' does not steer: it has no coefficient")
        return spec.coefficient(self.params())


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch's generator takes (the gateway checks the same)


class SamplingConfig(BaseModel):
    """Greedy by default (the paper sets do_sample=False)."""

    # finite numbers only: temperature = inf would sample uniformly over the whole vocabulary
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_k: int = Field(0, ge=0)  # 0 = off
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
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
