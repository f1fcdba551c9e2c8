"""The O(V) fused update against the paper's literal T-step FTRL loop (Eq. 4-7, Algorithm 1)."""

import itertools

import pytest
import torch

from costeer.steering import (
    FTRLParams,
    delta_coefficients,
    effective_coefficient,
    fuse,
    ftrl_literal,
    light_coefficient,
    light_literal,
)


def random_triplet(V: int, seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, V, generator=g, dtype=torch.float64) * scale
    lp = torch.log_softmax(logits, dim=-1)
    return lp[0], lp[1], lp[2]  # log π_base (LLM), log π*_pers, log π*_base (SLM)


def test_default_coefficients_match_the_paper():
    p = FTRLParams()
    b = delta_coefficients(p)
    assert b[1] == pytest.approx(1 / 2.1, abs=1e-12)  # LightCoSteer's β* = β/(λ+1/η)
    assert round(b[1], 4) == 0.4762
    assert round(effective_coefficient(p), 4) == 1.7833
    assert light_coefficient(p) == pytest.approx(b[1], abs=1e-15)


GRID = [
    FTRLParams(T=T, alpha=a, beta=be, lam=l, eta=e)
    for T, (a, be, l, e) in itertools.product(
        [1, 2, 5, 20, 100],
        [(2.0, 1.0, 2.0, 10.0), (0.1, 5.0, 0.5, 2.0), (5.0, 0.1, 5.0, 20.0), (3.0, 2.0, 1.5, 10.0), (1.0, 1.0, 1.0, 1.0)],
    )
]


@pytest.mark.parametrize("p", GRID, ids=lambda p: f"T{p.T}-a{p.alpha}-b{p.beta}-l{p.lam}-e{p.eta}")
def test_fused_equals_literal_loop(p):
    base, pers, base_slm = random_triplet(4096, seed=p.T)
    ref = ftrl_literal(base, pers, base_slm, p)
    got = fuse(base, pers, base_slm, effective_coefficient(p))
    assert (ref - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("V", [49_152, 262_144])
@pytest.mark.parametrize("T", [1, 20, 100])
def test_fused_equals_literal_loop_full_vocabularies(V, T):
    p = FTRLParams(T=T, alpha=1.5, beta=1.0, lam=2.5, eta=10.0)  # α ≠ λ
    base, pers, base_slm = random_triplet(V, seed=V + T, scale=4.0)
    ref = ftrl_literal(base, pers, base_slm, p)
    got = fuse(base, pers, base_slm, effective_coefficient(p))
    assert (ref - got).abs().max().item() <= 1e-5


@pytest.mark.parametrize("T", [1, 2])
def test_lambda_zero_short_horizon(T):
    p = FTRLParams(T=T, alpha=3.0, beta=2.0, lam=0.0, eta=10.0)
    base, pers, base_slm = random_triplet(4096, seed=11)
    ref = ftrl_literal(base, pers, base_slm, p)
    assert (ref - fuse(base, pers, base_slm, effective_coefficient(p))).abs().max().item() <= 1e-5


def test_lambda_zero_diverges_to_a_point_mass():
    # Without the KL anchor (λ = 0) the recurrence multiplies b by about (αη + 1) per step:
    # the policy collapses onto argmax Δ. Both forms agree on where it collapses.
    p = FTRLParams(T=20, alpha=3.0, beta=2.0, lam=0.0, eta=10.0)
    assert effective_coefficient(p) > 1e20
    base, pers, base_slm = random_triplet(4096, seed=12)
    ref = ftrl_literal(base, pers, base_slm, p)
    got = fuse(base, pers, base_slm, effective_coefficient(p))
    assert ref.argmax() == got.argmax() == (pers - base_slm).argmax()


def test_light_is_the_T1_case_and_eq8():
    p = FTRLParams()
    base, pers, base_slm = random_triplet(10_000, seed=7)
    light = light_literal(base, pers, base_slm, p)
    t1 = ftrl_literal(base, pers, base_slm, FTRLParams(T=1, alpha=p.alpha, beta=p.beta, lam=p.lam, eta=p.eta))
    assert (light - t1).abs().max().item() <= 1e-12
    assert (light - fuse(base, pers, base_slm, light_coefficient(p))).abs().max().item() <= 1e-12


def test_fuse_keeps_llm_masks_and_survives_doubly_masked_tokens():
    base = torch.log_softmax(torch.tensor([0.0, 1.0, float("-inf"), 2.0]), -1)
    pers = torch.log_softmax(torch.tensor([0.0, 3.0, 1.0, float("-inf")]), -1)
    base_slm = torch.log_softmax(torch.tensor([0.0, 1.0, 1.0, float("-inf")]), -1)
    out = fuse(base, pers, base_slm, 1.0)
    assert torch.isneginf(out[2])  # the LLM ruled it out; the delta cannot revive it
    assert torch.isfinite(out[[0, 1, 3]]).all()
    assert torch.exp(out).sum().item() == pytest.approx(1.0)


def test_zero_delta_returns_the_llm_policy():
    base, pers, _ = random_triplet(1000, seed=3)
    out = fuse(base, pers, pers, effective_coefficient(FTRLParams()))
    assert torch.allclose(out, base, atol=1e-12)


def test_invalid_params_are_rejected():
    with pytest.raises(ValueError):
        FTRLParams(T=0)
    with pytest.raises(ValueError):
        FTRLParams(eta=0)


def test_coefficient_limit_when_the_kl_anchor_dominates():
    # For λ > α the fixed point of the recurrence is b* = β / (λ − α).
    p = FTRLParams(T=5000, alpha=0.5, beta=1.0, lam=2.0, eta=10.0)
    assert effective_coefficient(p) == pytest.approx(1.0 / 1.5, rel=2e-3)
