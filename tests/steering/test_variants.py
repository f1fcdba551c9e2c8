"""The steering variants' math: each gives back the paper's update at its "off" setting, the plausible
head keeps exactly the tokens above τ·max, the trust region's KL bound holds and its b grows with ε,
the repetition guard touches only what was generated; fast paths against literal references."""

import math

import pytest
import torch

from costeer.steering import (
    FTRLParams,
    effective_coefficient,
    fuse,
    fuse_delta,
    fuse_plausible,
    fuse_plausible_trust,
    fuse_trust,
    lift_supported,
    no_repeat_ngram,
    path_kl,
    plausible_head,
    repeated_ngram_bans,
    repetition_guard,
    repetition_penalty,
    safe_delta,
    steering_head,
    trust_region_coefficient,
)

B_T = effective_coefficient(FTRLParams())  # 1.7833
RESOLUTION = 8.0**-4  # the trust region's default search resolution in s = b / b_T


def triplet(V: int, seed: int, scale: float = 3.0, batch: tuple[int, ...] = (), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(3, *batch, V, generator=g, dtype=torch.float64) * scale, dim=-1).to(dtype)
    return lp[0], lp[1], lp[2]  # log π_base (LLM), log π*_pers, log π*_base (SLM)


def kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ ref) in float64, 0·log 0 = 0.   [..., V] -> [...]"""
    logp, logp_ref = logp.double(), torch.log_softmax(logp_ref.double(), -1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logp_ref), torch.zeros_like(p)).sum(-1)


SEEDS = range(12)


# ---------------------------------------------------------------------------------------------- plausible head


@pytest.mark.parametrize("tau", [1e-6, 0.01, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", SEEDS)
def test_head_keeps_exactly_the_tokens_above_tau_times_max(tau, seed):
    base, _, _ = triplet(2000, seed, scale=2.0 + seed % 4)
    p = base.exp()
    expected = p >= tau * p.max()  # the definition, in probability space
    assert torch.equal(plausible_head(base, tau), expected)
    assert torch.equal(plausible_head(base + 7.5, tau), expected)  # a per-row constant does not matter


def test_head_edges():
    base = torch.log_softmax(torch.tensor([0.0, 2.0, float("-inf"), 2.0, -30.0]), -1)
    assert plausible_head(base, 0.0).all()  # τ = 0 keeps every token, even those the LLM rules out
    assert plausible_head(base, 1.0).tolist() == [False, True, False, True, False]  # argmax and its ties
    assert plausible_head(base, 1e-15).tolist() == [True, True, False, True, True]  # -inf is never plausible
    with pytest.raises(ValueError):
        plausible_head(base, 1.5)
    batch = torch.stack([base, base.flip(-1)])  # [2, V]: the max is taken per row
    assert torch.equal(plausible_head(batch, 0.5)[1], plausible_head(base.flip(-1), 0.5))


@pytest.mark.parametrize("seed", SEEDS)
def test_plausible_at_tau_zero_is_the_paper_update_bit_for_bit(seed):
    base, pers, base_slm = triplet(3000, seed, batch=(2,))
    assert torch.equal(fuse_plausible(base, pers, base_slm, B_T, 0.0), fuse(base, pers, base_slm, B_T))
    # a τ below every token's ratio masks nothing: the same tensor as τ → 0
    tiny = 0.5 * (base - base.amax(-1, keepdim=True)).min().exp().item()
    assert torch.equal(fuse_plausible(base, pers, base_slm, B_T, tiny), fuse(base, pers, base_slm, B_T))


@pytest.mark.parametrize("tau", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("seed", SEEDS)
def test_plausible_equals_a_literal_reference(tau, seed):
    base, pers, base_slm = triplet(500, seed)
    got = fuse_plausible(base, pers, base_slm, B_T, tau)
    # literal: token by token, score the plausible ones, normalise over them
    p_max = max(math.exp(x) for x in base.tolist())
    scores = [
        lb + B_T * (lq - ls) if math.exp(lb) >= tau * p_max else -math.inf
        for lb, lq, ls in zip(base.tolist(), pers.tolist(), base_slm.tolist())
    ]
    log_z = math.log(sum(math.exp(s) for s in scores if s > -math.inf))
    ref = torch.tensor([s - log_z for s in scores], dtype=torch.float64)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.allclose(got[~torch.isinf(ref)], ref[~torch.isinf(ref)], atol=1e-10)
    # and it is the paper's policy masked to the head and renormalised
    masked = fuse(base, pers, base_slm, B_T).masked_fill(~plausible_head(base, tau), -math.inf)
    assert torch.allclose(torch.log_softmax(masked, -1).exp(), got.exp(), atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_union_with_the_personalised_head(seed):
    base, pers, base_slm = triplet(2000, seed)
    llm_head, pers_head = plausible_head(base, 0.1), plausible_head(pers, 0.2)
    assert torch.equal(steering_head(base, pers, 0.1), llm_head)  # tau_pers None: the LLM's head alone
    assert torch.equal(steering_head(base, pers, 0.1, 0.2), llm_head | pers_head)
    assert steering_head(base, pers, 0.0, 0.2).all()  # τ = 0 is off, whatever tau_pers
    assert torch.equal(fuse_plausible(base, pers, base_slm, B_T, 0.0, 0.2), fuse(base, pers, base_slm, B_T))
    out = fuse_plausible(base, pers, base_slm, B_T, 0.1, 0.2)
    assert torch.equal(torch.isfinite(out), llm_head | pers_head)
    # a profile word: implausible to the LLM, plausible to the SLM with the context -> kept only by the union
    word = int((pers - base).argmax())
    if not llm_head[word] and pers_head[word]:
        assert math.isinf(fuse_plausible(base, pers, base_slm, B_T, 0.1)[word]) and math.isfinite(out[word])
    both = fuse_plausible_trust(base, pers, base_slm, B_T, 0.1, 0.3, tau_pers=0.2)
    assert torch.equal(torch.isfinite(both), llm_head | pers_head)
    assert kl(both, base.masked_fill(~(llm_head | pers_head), -math.inf)).item() <= 0.3 + 1e-9


# ---------------------------------------------------------------------------------------------- trust region


@pytest.mark.parametrize("seed", SEEDS)
def test_trust_at_infinite_epsilon_is_the_paper_update_bit_for_bit(seed):
    base, pers, base_slm = triplet(3000, seed, batch=(3,))
    paper = fuse(base, pers, base_slm, B_T)
    assert torch.equal(fuse_trust(base, pers, base_slm, B_T, None), paper)
    assert torch.equal(fuse_trust(base, pers, base_slm, B_T, math.inf), paper)
    d = safe_delta(pers, base_slm)
    assert torch.equal(trust_region_coefficient(base, d, B_T, None), torch.full((3, 1), B_T, dtype=base.dtype))
    # a budget above the paper's own KL also gives b_T back
    budget = kl(paper, base).max().item() * 1.01
    assert torch.equal(trust_region_coefficient(base, d, B_T, budget), torch.full((3, 1), B_T, dtype=base.dtype))
    assert torch.allclose(fuse_trust(base, pers, base_slm, B_T, budget), paper, atol=1e-12)


EPSILONS = [0.0, 1e-3, 0.01, 0.1, 0.3, 0.5, 1.0, 2.0, 5.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])
@pytest.mark.parametrize("seed", range(3))
def test_trust_region_kl_bound_holds(seed, scale, dtype):
    base, pers, base_slm = triplet(4096, seed, scale=scale, batch=(8,), dtype=dtype)  # 8 random rows
    # the KL of the returned policy, recomputed in float64; the search itself runs in the inputs' dtype
    tol = 1e-9 if dtype == torch.float64 else 5e-5
    for eps in EPSILONS:
        out = fuse_trust(base, pers, base_slm, B_T, eps)
        assert (kl(out, base) <= eps + tol).all(), eps


@pytest.mark.parametrize("seed", SEEDS)
def test_trust_region_b_is_monotone_in_epsilon_and_bounded_by_b_T(seed):
    base, pers, base_slm = triplet(4096, seed, scale=1.0 + seed % 5, batch=(6,))
    d = safe_delta(pers, base_slm)
    bs = torch.cat([trust_region_coefficient(base, d, B_T, eps) for eps in EPSILONS + [None]], dim=-1)  # [6, E]
    assert (bs[:, 1:] >= bs[:, :-1]).all()
    assert (bs >= 0).all() and (bs <= B_T).all()
    assert (bs[:, 0] == 0).all() and (bs[:, -1] == B_T).all()  # ε = 0: the LLM alone; ε = ∞: the paper


def literal_trust_scale(base, d, b_max, eps, iters=60):
    """Plain scalar bisection on s ∈ [0, 1], one row, float64: the largest s with KL ≤ ε."""

    def f(s):
        return kl(fuse_delta(base, d, s * b_max), base).item()

    if f(1.0) <= eps:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) <= eps else (lo, mid)
    return lo


@pytest.mark.parametrize("eps", [0.01, 0.2, 1.0])
@pytest.mark.parametrize("seed", range(6))
def test_trust_region_matches_a_literal_bisection(seed, eps):
    base, pers, base_slm = triplet(2048, seed, scale=2.0 + seed)
    d = safe_delta(pers, base_slm)
    s_ref = literal_trust_scale(base, d, B_T, eps)
    s = trust_region_coefficient(base, d, B_T, eps).item() / B_T
    assert s <= s_ref + 1e-12 and s_ref - s <= RESOLUTION + 1e-12  # conservative, within one grid step


def test_trust_region_next_candidate_is_infeasible():
    base, pers, base_slm = triplet(4096, 3, batch=(8,))
    d = safe_delta(pers, base_slm)
    for eps in [0.05, 0.5, 2.0]:
        s = trust_region_coefficient(base, d, B_T, eps) / B_T  # [8, 1]
        above = (s + RESOLUTION).clamp(max=1.0)
        kl_above = path_kl(base, d, above * B_T).squeeze(-1)
        assert ((kl_above > eps) | (s.squeeze(-1) == 1.0)).all()


def test_trust_region_rows_are_independent_and_match_single_calls():
    base, pers, base_slm = triplet(1024, 5, batch=(5,))
    batched = fuse_trust(base, pers, base_slm, B_T, 0.3)
    for i in range(5):
        assert torch.allclose(batched[i], fuse_trust(base[i], pers[i], base_slm[i], B_T, 0.3), atol=1e-12)


def test_trust_region_with_a_negative_coefficient():
    base, pers, base_slm = triplet(2048, 9)
    b_neg = effective_coefficient(FTRLParams(beta=-1.0))  # the recurrence is linear in β: −b_T
    assert b_neg == pytest.approx(-B_T)
    d = safe_delta(pers, base_slm)
    b = trust_region_coefficient(base, d, b_neg, 0.2).item()
    assert b_neg <= b < 0
    assert kl(fuse_trust(base, pers, base_slm, b_neg, 0.2), base).item() <= 0.2 + 1e-9


def test_trust_region_edges():
    base, pers, base_slm = triplet(256, 1)
    assert torch.allclose(fuse_trust(base, pers, base_slm, B_T, 0.0), base, atol=1e-12)  # ε = 0: π_base
    flat = torch.zeros_like(base)  # Δ constant: every b costs 0 nats, so b = b_T
    assert trust_region_coefficient(base, flat, B_T, 0.0).item() == B_T
    with pytest.raises(ValueError):
        trust_region_coefficient(base, flat, B_T, -0.1)
    # the LLM rules tokens out: they stay out, and the bound holds on the rest
    base_masked = base.clone()
    base_masked[:100] = -math.inf
    out = fuse_trust(base_masked, pers, base_slm, B_T, 0.1)
    assert torch.isneginf(out[:100]).all() and torch.isfinite(out[100:]).all()
    assert kl(out, base_masked).item() <= 0.1 + 1e-9


def test_decisive_where_the_llm_is_unsure_not_where_it_is_sure():
    # The same delta towards token 1. The paper's update overturns both LLMs; the 0.5-nat trust region
    # still lets it decide between two equally plausible tokens, but not overturn a 0.97 favourite.
    d = torch.tensor([0.0, 3.0, 0.0, 0.0], dtype=torch.float64)
    unsure = torch.log(torch.tensor([0.49, 0.49, 0.01, 0.01], dtype=torch.float64))
    sure = torch.log(torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64))
    for base in (unsure, sure):
        assert fuse_delta(base, d, B_T).argmax() == 1
    assert fuse_delta(unsure, d, trust_region_coefficient(unsure, d, B_T, 0.5)).argmax() == 1
    assert fuse_delta(sure, d, trust_region_coefficient(sure, d, B_T, 0.5)).argmax() == 0
    assert kl(fuse_delta(sure, d, B_T), sure).item() > 2.5  # what the paper's step costs there


# ---------------------------------------------------------------------------------------------- both


@pytest.mark.parametrize("seed", SEEDS)
def test_plausible_trust(seed):
    base, pers, base_slm = triplet(4096, seed, batch=(3,))
    paper = fuse(base, pers, base_slm, B_T)
    assert torch.equal(fuse_plausible_trust(base, pers, base_slm, B_T, 0.0, None), paper)
    x = (base, pers, base_slm, B_T)
    assert torch.equal(fuse_plausible_trust(*x, 0.1, None), fuse_plausible(*x, 0.1))
    assert torch.equal(fuse_plausible_trust(*x, 0.0, 0.3), fuse_trust(*x, 0.3))
    for tau, eps in [(0.05, 0.1), (0.1, 0.5), (0.3, 2.0)]:
        head = plausible_head(base, tau)
        out = fuse_plausible_trust(base, pers, base_slm, B_T, tau, eps)
        assert torch.equal(torch.isfinite(out), head)  # support: exactly the head
        head_base = base.masked_fill(~head, -math.inf)  # KL against π_base renormalised on the head
        assert (kl(out, head_base) <= eps + 1e-9).all()


# ---------------------------------------------------------------------------------------------- repetition guard


def test_repetition_penalty_touches_only_generated_tokens():
    logp, _, _ = triplet(50, 0)
    gen = [3, 7, 7, 41, 3]
    out = repetition_penalty(logp, gen, 1.5)
    shift = out - logp  # the renormalisation constant, minus 1.5 on the generated tokens
    used = torch.zeros(50, dtype=torch.bool)
    used[[3, 7, 41]] = True
    c = shift[~used][0]
    assert torch.allclose(shift[~used], c.expand(int((~used).sum())), atol=1e-12)
    assert torch.allclose(shift[used], (c - 1.5).expand(3), atol=1e-12)  # once per token, not per use
    assert out.exp().sum().item() == pytest.approx(1.0)
    assert repetition_penalty(logp, gen, 0.0) is logp and repetition_penalty(logp, [], 2.0) is logp
    # additive in log space: the same on logits as on log-probabilities
    assert torch.allclose(repetition_penalty(logp + 4.0, gen, 1.5), out, atol=1e-12)


def literal_bans(history, n):
    if n <= 0:
        return set()
    prefix = history[len(history) - (n - 1) :] if n > 1 else []
    return {history[i + n - 1] for i in range(len(history) - n + 1) if history[i : i + n - 1] == prefix}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(20))
def test_ngram_bans_equal_a_literal_reference(n, seed):
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, 4, (int(torch.randint(0, 40, (1,), generator=g)),), generator=g).tolist()
    assert set(repeated_ngram_bans(history, n).tolist()) == literal_bans(history, n)
    logp, _, _ = triplet(10, seed)
    out = no_repeat_ngram(logp, history, n)
    banned = literal_bans(history, n)
    assert all(math.isinf(out[t]) for t in banned)
    kept = [t for t in range(10) if t not in banned]
    ref = torch.log_softmax(logp[kept], -1)
    assert torch.allclose(out[kept], ref, atol=1e-12)


def test_ngram_ban_examples():
    logp = torch.log_softmax(torch.zeros(10, dtype=torch.float64), -1)
    # "Task \n Volun tourism \n Task \n" -> "Volun" would repeat the 3-gram (Task, \n, Volun)
    task, nl, vol, tour = 1, 2, 3, 4
    hist = [task, nl, vol, tour, nl, task, nl]
    assert repeated_ngram_bans(hist, 3).tolist() == [vol]
    assert sorted(set(repeated_ngram_bans(hist, 2).tolist())) == [task, vol]  # after "\n": Task or Volun
    assert repeated_ngram_bans(hist, 4).tolist() == []  # (nl, task, nl) has not been followed before
    assert no_repeat_ngram(logp, hist, 0) is logp and no_repeat_ngram(logp, hist[:2], 3) is logp
    assert torch.isinf(no_repeat_ngram(logp, [5, 6], 1)[[5, 6]]).all()  # n = 1: no token twice
    # a ban that would leave nothing is not applied
    small = torch.log_softmax(torch.zeros(2, dtype=torch.float64), -1)
    assert torch.equal(no_repeat_ngram(small, [0, 1], 1), small)


def test_guard_composes_penalty_then_ban_and_is_off_at_zero():
    logp, _, _ = triplet(12, 4, batch=(2,))
    hist = [1, 2, 1, 2, 1]
    assert repetition_guard(logp, hist, 0.0, 0) is logp
    out = repetition_guard(logp, hist, 0.7, 2)
    assert torch.allclose(out, no_repeat_ngram(repetition_penalty(logp, hist, 0.7), hist, 2), atol=0)
    assert torch.isinf(out[:, 2]).all()  # (1, 2) was seen: 2 is banned after 1, in every row
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- context support

def test_the_delta_raises_only_supported_tokens():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(2, 50, generator=g) * 4
    support = torch.rand(50, generator=g) < 0.3
    out = lift_supported(d, support)
    assert torch.equal(out[:, support], d[:, support])  # inside: untouched, both signs
    assert torch.equal(out[:, ~support], d[:, ~support].clamp(max=0.0))  # outside: the negative part only
    assert (out[:, ~support] <= 0).all() and (d[:, ~support] > 0).any()
    assert torch.equal(lift_supported(d, torch.ones(50, dtype=torch.bool)), d)
    # with b ≥ 0 a token outside the support can never gain on the LLM's own odds against a supported one
    base = torch.log_softmax(torch.randn(50, generator=g), -1)
    fused = fuse_delta(base, out[0], B_T)
    a, s_ = int((~support).nonzero()[0]), int(support.nonzero()[0])
    assert fused[a] - fused[s_] <= base[a] - base[s_] - B_T * out[0, s_] + 1e-5
