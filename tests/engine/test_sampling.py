import torch

from costeer.engine.config import SamplingConfig
from costeer.engine.sampling import apply_top_k, apply_top_p, make_generator, sample

LOGP = torch.log_softmax(torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0]), -1)


def test_greedy_is_argmax():
    assert sample(LOGP, SamplingConfig()) == 1


def test_top_k_keeps_k():
    out = apply_top_k(LOGP, 2)
    assert torch.isfinite(out).tolist() == [False, True, True, False, False]
    assert torch.equal(apply_top_k(LOGP, 0), LOGP)


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = LOGP.exp()
    out = apply_top_p(LOGP, float(p[1]) + 1e-6)  # just over the top token's mass: top two
    assert torch.isfinite(out).tolist() == [False, True, True, False, False]
    out = apply_top_p(LOGP, float(p[1]) - 1e-6)
    assert torch.isfinite(out).tolist() == [False, True, False, False, False]


def test_a_top_p_below_float32s_range_keeps_the_top_token():
    # 1e-300 is 0 in float32: a mass of 0 before the top token must not drop it (all -inf: no token)
    out = apply_top_p(LOGP, 1e-300)
    assert torch.isfinite(out).tolist() == [False, True, False, False, False]
    assert sample(LOGP, SamplingConfig(temperature=1.0, top_p=1e-300)) == 1


def test_seeded_sampling_is_reproducible_and_respects_filters():
    cfg = SamplingConfig(temperature=1.0, top_k=3, seed=5)
    draws = [sample(LOGP, cfg, make_generator(5)) for _ in range(3)]
    assert len(set(draws)) == 1
    gen = make_generator(1)
    seen = {sample(LOGP, cfg, gen) for _ in range(300)}
    assert seen == {0, 1, 2}
