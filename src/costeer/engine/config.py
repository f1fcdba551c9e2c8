"""Options gathered in one place (pydantic, validated at the edge)."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from costeer.steering import FTRLParams, effective_coefficient, light_coefficient


class Method(str, Enum):
    """What drives the decoding. Only `llm_context` ever shows the private context to the LLM."""

    costeer = "costeer"  # LLM steered by the SLM delta, T-step FTRL update (the paper's method)
    light = "light"  # LightCoSteer: the T = 1 update (Eq. 8)
    llm = "llm"  # LLM alone, public query only
    llm_context = "llm_context"  # LLM sees the context: privacy-VIOLATING upper bound, for comparison only
    slm = "slm"  # SLM alone, public query only
    slm_context = "slm_context"  # SLM alone with the context (stays on the device)

    @property
    def steered(self) -> bool:
        return self in (Method.costeer, Method.light)

    @property
    def uses_llm(self) -> bool:
        return self in (Method.costeer, Method.light, Method.llm, Method.llm_context)

    @property
    def uses_slm(self) -> bool:
        return self is not Method.llm and self is not Method.llm_context


METHOD_HELP = {
    Method.costeer: "LLM steered by the on-device SLM delta (paper's T-step FTRL update)",
    Method.light: "LightCoSteer: one-step update, β* = β/(λ+1/η)",
    Method.llm: "LLM alone on the public query (baseline)",
    Method.llm_context: "LLM is GIVEN the private context: privacy-violating upper bound, never for real use",
    Method.slm: "SLM alone on the public query (baseline)",
    Method.slm_context: "SLM alone with the private context (on-device baseline)",
}


class SteeringConfig(BaseModel):
    """The paper's FTRL hyper-parameters (Appendix B.1 defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    T: int = Field(20, ge=1, le=100_000)
    alpha: float = Field(2.0, ge=0)
    beta: float = 1.0
    lam: float = Field(2.0, ge=0)
    eta: float = Field(10.0, gt=0)

    def params(self) -> FTRLParams:
        return FTRLParams(T=self.T, alpha=self.alpha, beta=self.beta, lam=self.lam, eta=self.eta)

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


class GenerationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    steering: SteeringConfig = SteeringConfig()
    sampling: SamplingConfig = SamplingConfig()
    min_shared_vocab: float = Field(
        0.3, ge=0, le=1, description="smallest share of the smaller vocabulary two tokenizers must share"
    )
