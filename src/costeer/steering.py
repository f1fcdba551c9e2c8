"""Steering math: pure functions of log-probability tensors (no models, no I/O).

Notation follows the paper (§3.2, Eq. 4-8, Algorithm 1):

    log π_base   the LLM's next-token log-probabilities from the public query only
    log π*_base  the SLM's, from the public query only
    log π*_pers  the SLM's, from the query plus the private context
    Δ            = log π*_pers − log π*_base   (the local delta)

The paper's FTRL update, for t = 1..T with π_0 = π_base:

    u_{t-1} = α (log π_{t-1} − log π_base) + β Δ                          (Eq. 4)
    π_t  ∝ exp( (Σ_{i<t} u_i + tλ log π_0 + (1/η) log π_{t-1}) / (tλ + 1/η) )   (Eq. 7)

Every term is affine in (log π_base, Δ) up to a per-token constant that the normalisation
removes, so by induction log π_t = log π_base + b_t Δ + const with the scalar recurrence

    b_0 = 0,   b_t = ( Σ_{i<t} (α b_i + β) + b_{t-1}/η ) / (tλ + 1/η).

Hence the whole T-step update is one O(V) fusion, log π_T = log_softmax(log π_base + b_T Δ),
with b_T computed once per configuration.  At the defaults (T=20, α=2, β=1, λ=2, η=10):
b_1 = β/(λ+1/η) = 0.4762 (LightCoSteer's β*, Eq. 8) and b_20 ≈ 1.7833.
`ftrl_literal` keeps the paper's loop verbatim as the reference the tests compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class FTRLParams:
    """The paper's hyper-parameters (Appendix B.1, Table 4 defaults)."""

    T: int = 20
    alpha: float = 2.0
    beta: float = 1.0
    lam: float = 2.0
    eta: float = 10.0

    def __post_init__(self) -> None:
        if self.T < 1:
            raise ValueError(f"T must be >= 1, got {self.T}")
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if self.lam < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")


@lru_cache(maxsize=256)
def _coefficients(T: int, alpha: float, beta: float, lam: float, eta: float) -> tuple[float, ...]:
    b = [0.0]  # b_0 = 0: π_0 = π_base carries no delta
    u_sum = 0.0  # Σ_{i<t} (α b_i + β): the delta coefficient of Σ u_i
    for t in range(1, T + 1):
        u_sum += alpha * b[t - 1] + beta
        b.append((u_sum + b[t - 1] / eta) / (t * lam + 1.0 / eta))
    return tuple(b)


def delta_coefficients(p: FTRLParams) -> tuple[float, ...]:
    """(b_0, b_1, …, b_T): the delta's coefficient after each FTRL step."""
    return _coefficients(p.T, float(p.alpha), float(p.beta), float(p.lam), float(p.eta))


def effective_coefficient(p: FTRLParams) -> float:
    """b_T: the final policy is exactly log_softmax(log π_base + b_T Δ)."""
    return delta_coefficients(p)[-1]


def light_coefficient(p: FTRLParams) -> float:
    """LightCoSteer's β* = β / (λ + 1/η) (Eq. 8): the T = 1 case."""
    return p.beta / (p.lam + 1.0 / p.eta)


def delta(logp_pers: Tensor, logp_base_slm: Tensor) -> Tensor:
    """Δ = log π*_pers − log π*_base.   [..., V] -> [..., V]"""
    return logp_pers - logp_base_slm


def fuse(logp_base: Tensor, logp_pers: Tensor, logp_base_slm: Tensor, b: float) -> Tensor:
    """log π ∝ log π_base + b Δ, normalised.   three [..., V] -> [..., V]

    -inf entries of the LLM stay -inf; a token both SLM branches rule out (-inf − -inf)
    contributes no delta instead of NaN.
    """
    d = delta(logp_pers, logp_base_slm)
    d = torch.nan_to_num(d, nan=0.0)
    return torch.log_softmax(logp_base + b * d, dim=-1)


def ftrl_literal(logp_base: Tensor, logp_pers: Tensor, logp_base_slm: Tensor, p: FTRLParams) -> Tensor:
    """The paper's Algorithm 1 lines 6-12, step by step (the O(T·V) reference).  [V] -> [V]"""
    d = delta(logp_pers, logp_base_slm)
    logp_prev = logp_base  # π_0 = π_base
    u_sum = torch.zeros_like(logp_base)
    for t in range(1, p.T + 1):
        u = p.alpha * (logp_prev - logp_base) + p.beta * d  # Eq. 4 at π_{t-1}
        u_sum = u_sum + u
        z = (u_sum + t * p.lam * logp_base + logp_prev / p.eta) / (t * p.lam + 1.0 / p.eta)  # Eq. 7
        logp_prev = torch.log_softmax(z, dim=-1)
    return logp_prev


def light_literal(logp_base: Tensor, logp_pers: Tensor, logp_base_slm: Tensor, p: FTRLParams) -> Tensor:
    """Eq. 8 as printed: π ∝ exp(log π_0 + β* Δ)."""
    z = logp_base + light_coefficient(p) * delta(logp_pers, logp_base_slm)
    return torch.log_softmax(z, dim=-1)
