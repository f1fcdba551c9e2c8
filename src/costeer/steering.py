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

Below the paper's update sit the steering variants (docs/steering-variants.md): a plausibility head
(`fuse_plausible`), a per-token trust region (`fuse_trust`), both (`fuse_plausible_trust`), a
repetition guard (`repetition_guard`) and a context-support rule for the delta (`lift_supported`). Each
reduces to the paper's update at its "off" setting (τ = 0, ε = ∞, penalty = 0, n = 0, an all-True
support), bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

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


def safe_delta(logp_pers: Tensor, logp_base_slm: Tensor) -> Tensor:
    """Δ with a token both SLM branches rule out (-inf − -inf) contributing 0, not NaN.   [..., V] -> [..., V]"""
    return torch.nan_to_num(delta(logp_pers, logp_base_slm), nan=0.0)


def fuse_delta(logp_base: Tensor, d: Tensor, b: float | Tensor) -> Tensor:
    """log_softmax(log π_base + b Δ).   [..., V], [..., V], scalar or [..., 1] -> [..., V]

    `logp_base` need only be known up to a per-row constant (the normalisation removes it)."""
    return torch.log_softmax(logp_base + b * d, dim=-1)


def fuse(logp_base: Tensor, logp_pers: Tensor, logp_base_slm: Tensor, b: float) -> Tensor:
    """log π ∝ log π_base + b Δ, normalised.   three [..., V] -> [..., V]

    -inf entries of the LLM stay -inf; a token both SLM branches rule out (-inf − -inf)
    contributes no delta instead of NaN.
    """
    return fuse_delta(logp_base, safe_delta(logp_pers, logp_base_slm), b)


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


# ------------------------------------------------------------------------------------------------------
# Steering variants. Rationale and math: docs/steering-variants.md.


def plausible_head(logp_base: Tensor, tau: float) -> Tensor:
    """The LLM's plausible head {a : π_base(a) ≥ τ · max π_base}.   [..., V] -> bool [..., V]

    Contrastive Decoding's adaptive plausibility constraint (Li et al. 2023, the paper's [27]). Compared in
    log space, log π_base(a) ≥ log τ + max log π_base, so `logp_base` may be off by a per-row constant
    (the aligned views of two vocabularies are not renormalised). τ = 0 keeps every token, τ = 1 the
    argmax and its ties; tokens the LLM rules out (-inf) are outside every head with τ > 0.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    if tau == 0.0:
        return torch.ones_like(logp_base, dtype=torch.bool)
    top = logp_base.amax(dim=-1, keepdim=True)  # [..., 1]
    return logp_base >= top + math.log(tau)


def steering_head(logp_base: Tensor, logp_pers: Tensor, tau: float, tau_pers: float | None = None) -> Tensor:
    """The tokens steering may choose from.   two [..., V] -> bool [..., V]

    The LLM's plausible head; with `tau_pers`, united with the head of the SLM's with-context branch,
    {a : π*_pers(a) ≥ τ_pers · max π*_pers}. Why the union: a personal detail is implausible to the LLM by
    construction (it never sees the context), so the LLM's head alone blocks exactly what steering is for;
    the with-context branch is the one model that finds it plausible. The union still leaves out what
    only the ratio Δ lifts, tokens implausible to both (π*_pers = 1e-5 over π*_base = 1e-8 is Δ = 6.9).
    τ = 0 keeps every token whatever τ_pers.
    """
    keep = plausible_head(logp_base, tau)
    if tau_pers is not None and tau > 0.0:
        keep = keep | plausible_head(logp_pers, tau_pers)
    return keep


def lift_supported(d: Tensor, support: Tensor) -> Tensor:
    """Δ may raise only the tokens the private context supports.   [..., V], bool [V] -> [..., V]

    Outside `support` (the tokens of the context's text, and the stop entry) Δ keeps its negative part
    only: the context may still argue against a token, but a token that appears nowhere in it cannot be a
    detail taken from it. On small SLMs the lifted outsiders are the failures (an emoji run, a switch to
    Spanish, a hashtag chain: docs/steering-variants.md §5). An all-True support returns `d`."""
    return torch.where(support.to(d.device), d, d.clamp(max=0.0))


def restrict(logp: Tensor, keep: Tensor) -> Tensor:
    """Tokens outside `keep` set to -inf (not renormalised).   [..., V], bool [..., V] -> [..., V]"""
    return logp.masked_fill(~keep, float("-inf"))


def fuse_plausible(
    logp_base: Tensor, logp_pers: Tensor, logp_base_slm: Tensor, b: float, tau: float, tau_pers: float | None = None
) -> Tensor:
    """The paper's update among the tokens the LLM finds plausible.   three [..., V] -> [..., V]

    Why: Δ is a log-ratio of the SLM's two branches and knows nothing of the LLM's fluency; with b_T ≈ 1.78
    a token the LLM gives 1e-4 overtakes its 0.5 favourite once its Δ exceeds the favourite's by 4.8 nats
    (a profile word the context branch copies, a heading it repeats). Restricting the delta to the LLM's
    own head lets it choose *which* fluent continuation is said, never *whether* the text stays fluent.

    Fusion is per-token additive, so fusing the masked base equals masking the fused policy and
    renormalising. At τ = 0 nothing is masked and this is `fuse`, bit for bit. `tau_pers`: see
    `steering_head`.
    """
    return fuse(restrict(logp_base, steering_head(logp_base, logp_pers, tau, tau_pers)), logp_pers, logp_base_slm, b)


def path_kl(logp_base: Tensor, d: Tensor, b: Tensor) -> Tensor:
    """KL(π_b ‖ π_base), π_b ∝ π_base·e^{bΔ}, at G values of b per row.   two [..., V], [..., G] -> [..., G]

    f(b) = KL(π_b ‖ π_base) = b E_b[Δ] − log E_base[e^{bΔ}] has f(0) = 0 and f'(b) = b Var_b(Δ), so it is
    non-decreasing along every ray b = s·b_T, s ≥ 0: the 1-D search in `trust_region_coefficient` is valid.
    Computed in that form (one exp and one matrix-vector product per candidate). `logp_base` may be off by
    a per-row constant; tokens outside its support contribute nothing.
    """
    lp0 = torch.log_softmax(logp_base, dim=-1)  # [..., V]
    d = d.masked_fill(torch.isneginf(lp0), 0.0)  # no mass there at any b: keep ±inf·0 out of the sums
    z = lp0.unsqueeze(-2) + b.unsqueeze(-1) * d.unsqueeze(-2)  # [..., G, V] log π_base + bΔ
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)  # [..., G, 1] log E_base[e^{bΔ}]
    mean_d = (torch.exp(z - log_z) @ d.unsqueeze(-1)).squeeze(-1)  # [..., G] E_b[Δ]
    log_z0 = torch.logsumexp(lp0, dim=-1, keepdim=True)  # [..., 1] 0 up to rounding: cancels lp0's own
    return b * mean_d - (log_z.squeeze(-1) - log_z0)


def trust_region_coefficient(
    logp_base: Tensor, d: Tensor, b_max: float | Tensor, epsilon: float | None, grid: int = 8, rounds: int = 4
) -> Tensor:
    """Per row, the largest b = s·b_max, s ∈ [0, 1], with KL(π_b ‖ π_base) ≤ ε.   two [..., V] -> [..., 1]

    A vectorised grid search: each round evaluates `grid` candidates of s at once ([..., G, V]) inside the
    bracket the previous round left, so s is found to grid**-rounds (1/4096 by default: 29 softmaxes of the
    row, on a GPU as a handful of batched kernels). It is conservative: the returned b is a candidate whose
    computed KL is within ε (s = 0, the LLM's own policy, always qualifies), and the next candidate up is
    not. Because feasible sets only grow with ε, the returned b is non-decreasing in ε. ε = None (or ∞)
    returns b_max: the paper's update. b_max is a float or a [..., 1] tensor; the result is a tensor.
    """
    lead = logp_base.shape[:-1]
    if epsilon is None or math.isinf(epsilon):
        return logp_base.new_ones((*lead, 1)) * b_max
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if grid < 2 or rounds < 1:
        raise ValueError("need grid >= 2 and rounds >= 1")
    support = torch.isfinite(logp_base).reshape(-1, logp_base.shape[-1]).any(dim=0)  # [V]
    if not support.all():  # e.g. after the plausible head: search on the tokens some row can still say
        logp_base, d = logp_base[..., support], d[..., support]  # [..., V'] (the rest add no KL, no mass)
    lo = logp_base.new_zeros((*lead, 1))  # [..., 1] lower end of the bracket: always feasible
    width = 1.0
    for r in range(rounds):
        # the bracket's upper end is known infeasible after round 0, so it is not evaluated again
        ks = torch.arange(1, grid + 1 if r == 0 else grid, dtype=logp_base.dtype, device=logp_base.device)  # [G]
        s = lo + (width / grid) * ks  # [..., G]
        ok = (path_kl(logp_base, d, s * b_max) <= epsilon) & (s <= 1.0)  # [..., G]
        k = (ok * ks).amax(dim=-1, keepdim=True)  # [..., 1] largest feasible step, 0 if none
        lo = lo + (width / grid) * k
        width /= grid
    return lo * b_max


def fuse_trust(
    logp_base: Tensor, logp_pers: Tensor, logp_base_slm: Tensor, b: float, epsilon: float | None
) -> Tensor:
    """The paper's update, b per token: max{b ≤ b_T : KL(π_b ‖ π_base) ≤ ε}.   three [..., V] -> [..., V]

    Why: max_π E_π[Δ] subject to KL(π ‖ π_base) ≤ ε is solved by π ∝ π_base e^{bΔ} with the b that meets
    the bound (Lagrange), the same family as the paper's update, whose KL term λ·KL(π ‖ π_base) fixes one
    b_T for every token. A fixed KL budget instead spends the steering where it is cheap: deciding between
    tokens the LLM finds about equally good (0.49/0.49 -> 0.05/0.95 costs 0.5 nats) but not overturning
    one it is sure of (0.97/0.01 -> 0.31/0.68, what b_T does with Δ = 3, costs 2.5). Capped at b_T, it
    never steers harder than the paper. ε = None (∞) is `fuse`, bit for bit.
    """
    if epsilon is None or math.isinf(epsilon):
        return fuse(logp_base, logp_pers, logp_base_slm, b)
    d = safe_delta(logp_pers, logp_base_slm)
    return fuse_delta(logp_base, d, trust_region_coefficient(logp_base, d, b, epsilon))


def fuse_plausible_trust(
    logp_base: Tensor, logp_pers: Tensor, logp_base_slm: Tensor, b: float, tau: float, epsilon: float | None,
    tau_pers: float | None = None,
) -> Tensor:
    """Both constraints: the trust region taken inside the plausible head.   three [..., V] -> [..., V]

    The head bounds *where* the delta may put mass, the trust region *how much* it may move. The KL is
    measured against π_base renormalised on the head, so ε budgets the steering alone (against the
    unrestricted π_base even b = 0 would cost −log π_base(head), which can exceed ε).
    """
    head = restrict(logp_base, steering_head(logp_base, logp_pers, tau, tau_pers))
    return fuse_trust(head, logp_pers, logp_base_slm, b, epsilon)


def repetition_penalty(logp: Tensor, generated_ids: Sequence[int], penalty: float) -> Tensor:
    """Every token already generated loses `penalty` nats, then renormalise.   [..., V] -> [..., V]

    The additive (presence) form: it divides a repeated token's odds by e^penalty whatever its score, and
    is the same on logits and on log-probabilities. The multiplicative CTRL form (score·θ for a negative
    score) is not: on log-probabilities it barely touches a repeat the policy is sure of (log p ≈ 0),
    exactly the loops it is meant to break.
    """
    if penalty == 0.0 or len(generated_ids) == 0:
        return logp
    ids = torch.tensor(sorted(set(generated_ids)), dtype=torch.long, device=logp.device)  # [U]
    pen = torch.zeros(logp.shape[-1], dtype=logp.dtype, device=logp.device).index_fill(0, ids, penalty)  # [V]
    return torch.log_softmax(logp - pen, dim=-1)


def repeated_ngram_bans(generated_ids: Sequence[int], n: int) -> Tensor:
    """The tokens that would complete an n-gram already in `generated_ids`.   -> long [B] (may repeat)

    Those ending an earlier n-gram whose first n − 1 tokens equal the last n − 1 generated (n = 1: every
    generated token)."""
    if n <= 0 or len(generated_ids) < n:
        return torch.zeros(0, dtype=torch.long)
    h = torch.tensor(list(generated_ids), dtype=torch.long)  # [L]
    windows = h.unfold(0, n, 1)  # [L-n+1, n]: every n-gram so far
    prefix = h[len(h) - (n - 1) :]  # [n-1] the n-gram the next token would complete
    match = (windows[:, : n - 1] == prefix).all(dim=-1)  # [L-n+1]
    return windows[match, n - 1]


def no_repeat_ngram(logp: Tensor, generated_ids: Sequence[int], n: int) -> Tensor:
    """Ban (-inf) every token that would repeat an n-gram of the output, then renormalise.   [..., V] -> [..., V]

    The no-repeat-n-gram rule of Paulus et al. (2018) / transformers' `no_repeat_ngram_size`. If the ban
    would leave no token at all (a vocabulary smaller than the output), the row is returned unchanged.
    """
    banned = repeated_ngram_bans(generated_ids, n).to(logp.device)
    if banned.numel() == 0:
        return logp
    out = logp.index_fill(-1, banned, float("-inf"))
    alive = torch.isfinite(out).any(dim=-1, keepdim=True)  # [..., 1]
    return torch.where(alive, torch.log_softmax(out, dim=-1), logp)


def repetition_guard(logp: Tensor, generated_ids: Sequence[int], penalty: float, n: int) -> Tensor:
    """`repetition_penalty` then `no_repeat_ngram`.   [..., V] -> [..., V]

    Degeneration under steering is repetition (a heading and a bullet run, over and over); the guard acts
    on the output so far and on nothing else. Both parts are additive or masks in log space, so guarding
    the fused policy log_softmax(log π_base + bΔ) equals fusing the guarded log π_base: the pipeline does
    the latter, before the plausible head and the trust region. penalty = 0 and n = 0 return `logp`."""
    return no_repeat_ngram(repetition_penalty(logp, generated_ids, penalty), generated_ids, n)
