"""The fusion pipeline: each method's named stages, equal to the pure steering functions they call."""

import math

import pytest
import torch
from pydantic import ValidationError

from costeer.engine.config import STEERING_STAGES, Method, SteeringConfig, VariantConfig
from costeer.engine.fusion import (
    FusionPipeline,
    PaperUpdate,
    PlausibilityHead,
    RepetitionGuard,
    fusion_pipeline,
    paper_pipeline,
)
from costeer.steering import (
    fuse,
    fuse_delta,
    fuse_plausible,
    fuse_plausible_trust,
    fuse_trust,
    lift_supported,
    repetition_guard,
    safe_delta,
)


def triplet(V: int = 3000, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(3, V, generator=g) * 3, dim=-1).to(dtype)
    return lp[0] + 0.37, lp[1], lp[2]  # the LLM's aligned view: off by a constant, as for two vocabularies


HISTORY = [5, 9, 11, 5, 9, 2, 5, 9]
CFG = SteeringConfig(variant=VariantConfig(tau=0.05, epsilon=0.4, repetition_penalty=0.8, no_repeat_ngram=3))
OFF = SteeringConfig(variant=VariantConfig(tau=0.0, epsilon=None, repetition_penalty=0.0, no_repeat_ngram=0))


def test_every_steered_method_has_stages_starting_with_the_paper_update():
    assert {m for m in Method if m.steered} == set(STEERING_STAGES)
    assert not any(m.steered for m in (Method.llm, Method.llm_context, Method.slm, Method.slm_context))
    for m in STEERING_STAGES:
        p = fusion_pipeline(m, SteeringConfig())
        assert p.names == STEERING_STAGES[m] and p.names[0] == "costeer"
    assert fusion_pipeline(Method.costeer_guarded, SteeringConfig()).names == ("costeer", "guard", "plausible", "trust")
    with pytest.raises(ValueError, match="does not steer"):
        fusion_pipeline(Method.llm, SteeringConfig())


@pytest.mark.parametrize("tau_pers", [None, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_each_method_equals_its_pure_function(seed, tau_pers):
    base, pers, base_slm = triplet(seed=seed)
    cfg = SteeringConfig(variant=CFG.variants().model_copy(update=dict(tau_pers=tau_pers)))
    b = cfg.coefficient(Method.costeer)
    v = cfg.variants()
    expected = {
        Method.costeer: fuse(base, pers, base_slm, b),
        Method.light: fuse(base, pers, base_slm, cfg.coefficient(Method.light)),
        Method.costeer_plausible: fuse_plausible(base, pers, base_slm, b, v.tau, v.tau_pers),
        Method.costeer_trust: fuse_trust(base, pers, base_slm, b, v.epsilon),
        Method.costeer_plausible_trust: fuse_plausible_trust(base, pers, base_slm, b, v.tau, v.epsilon, v.tau_pers),
        Method.costeer_guarded: fuse_plausible_trust(
            repetition_guard(base, HISTORY, v.repetition_penalty, v.no_repeat_ngram), pers, base_slm, b, v.tau,
            v.epsilon, v.tau_pers),
    }  # fmt: skip
    for m, ref in expected.items():
        got = fusion_pipeline(m, cfg)(base, pers, base_slm, HISTORY)
        assert torch.equal(got, ref), m
    # the stages did something: every variant differs from the paper here
    for m in (Method.costeer_plausible, Method.costeer_trust, Method.costeer_guarded):
        assert not torch.allclose(expected[m].exp(), expected[Method.costeer].exp(), atol=1e-4), m


@pytest.mark.parametrize("method", [m for m in STEERING_STAGES if m is not Method.light])
def test_every_variant_at_its_off_setting_is_the_paper_update_bit_for_bit(method):
    base, pers, base_slm = triplet(seed=3)
    paper = fuse(base, pers, base_slm, OFF.coefficient(Method.costeer))
    assert torch.equal(fusion_pipeline(method, OFF)(base, pers, base_slm, HISTORY), paper)
    assert torch.equal(paper_pipeline(OFF.coefficient(Method.costeer))(base, pers, base_slm), paper)


def test_the_matched_method_raises_only_supported_tokens_then_guards():
    base, pers, base_slm = triplet(seed=2)
    support = torch.rand(base.shape[-1], generator=torch.Generator().manual_seed(0)) < 0.2
    b, v = CFG.coefficient(Method.costeer), CFG.variants()
    pipe = fusion_pipeline(Method.costeer_matched, CFG, support)
    assert pipe.names == ("costeer", "support", "guard")
    ref = fuse_delta(repetition_guard(base, HISTORY, v.repetition_penalty, v.no_repeat_ngram),
                     lift_supported(safe_delta(pers, base_slm), support), b)  # fmt: skip
    assert torch.allclose(pipe(base, pers, base_slm, HISTORY), ref, atol=1e-6)
    guard_only = fuse(repetition_guard(base, HISTORY, v.repetition_penalty, v.no_repeat_ngram), pers, base_slm, b)
    assert not torch.allclose(ref.exp(), guard_only.exp(), atol=1e-4)
    # no support given: the stage is the identity
    assert torch.equal(fusion_pipeline(Method.costeer_matched, CFG)(base, pers, base_slm, HISTORY), guard_only)


def test_the_state_carries_the_coefficient_used():
    base, pers, base_slm = triplet(seed=1)
    b_T = CFG.coefficient(Method.costeer)
    assert fusion_pipeline(Method.costeer, CFG).run(base, pers, base_slm).b == b_T
    b = fusion_pipeline(Method.costeer_trust, CFG).run(base, pers, base_slm).b
    assert b.shape == (1,) and 0 <= b.item() < b_T


def test_the_paper_update_comes_first():
    with pytest.raises(ValueError, match="starts with the paper"):
        FusionPipeline((PlausibilityHead(0.1), PaperUpdate(1.0)))
    with pytest.raises(ValueError, match="starts with the paper"):
        FusionPipeline(())


def test_the_guard_on_the_base_is_the_guard_after_fusion():
    base, pers, base_slm = triplet(seed=2, dtype=torch.float64)
    b = CFG.coefficient(Method.costeer)
    got = FusionPipeline((PaperUpdate(b), RepetitionGuard(0.8, 3)))(base, pers, base_slm, HISTORY)
    after = repetition_guard(fuse(base, pers, base_slm, b), HISTORY, 0.8, 3)
    assert torch.equal(torch.isinf(got), torch.isinf(after))
    assert torch.allclose(got.exp(), after.exp(), atol=1e-12)


def test_the_guard_bans_even_what_the_head_would_keep_alone():
    # The LLM is sure of token 9, which would repeat the 3-gram (2, 5, 9): banned.
    # Guarding before the head, the head is taken over the tokens still allowed, so the ban holds.
    base = torch.full((20,), -12.0)
    base[9], base[3] = 0.0, -4.0  # 9 dominant; 3 the best allowed alternative (outside τ = 0.1 of 9)
    flat = torch.log_softmax(torch.zeros(20), -1)
    history = [2, 5, 9, 7, 2, 5]  # (2, 5, 9) seen, and the output now ends in (2, 5)
    guarded = fusion_pipeline(Method.costeer_guarded, CFG)(base, flat, flat, history)
    assert torch.isneginf(guarded[9]) and int(guarded.argmax()) == 3
    plain = fusion_pipeline(Method.costeer_plausible_trust, CFG)(base, flat, flat, history)
    assert int(plain.argmax()) == 9 and torch.isfinite(plain).sum() == 1


def test_variant_config():
    v = VariantConfig()
    assert (v.tau, v.tau_pers, v.epsilon, v.repetition_penalty, v.no_repeat_ngram) == (0.1, None, 0.5, 0.0, 4)
    assert VariantConfig(epsilon=math.inf).epsilon is None  # ∞ is "off", and survives JSON
    assert VariantConfig.model_validate_json(VariantConfig(epsilon=None).model_dump_json()).epsilon is None
    for bad in (dict(tau=1.5), dict(tau=-0.1), dict(epsilon=-1.0), dict(epsilon=math.nan),
                dict(tau_pers=2.0), dict(repetition_penalty=-1.0), dict(no_repeat_ngram=-1), dict(typo=1)):  # fmt: skip
        with pytest.raises(ValidationError):
            VariantConfig(**bad)
    # unset, the variant parameters are the defaults and leave the recorded steering config as it was
    assert SteeringConfig().variant is None and SteeringConfig().variants() == VariantConfig()
    assert SteeringConfig().model_dump()["variant"] is None
    s = SteeringConfig(variant=VariantConfig(epsilon=0.2))
    assert SteeringConfig.model_validate_json(s.model_dump_json()) == s


def test_the_loop_threads_the_generated_ids_through_the_stages():
    from costeer.engine.config import SamplingConfig
    from costeer.engine.loop import DecodePlan, decode
    from tests.engine.test_loop import ScriptedLLM, ScriptedSLM, vocab

    seen: list[list[int]] = []

    class Recorder:
        name = "recorder"

        def __call__(self, s):
            seen.append(list(s.history))
            return s

    def run(*stages, n=4):
        pipeline = FusionPipeline((PaperUpdate(1.0), *stages, Recorder()))
        steps = decode(DecodePlan(ScriptedLLM(), vocab(), SamplingConfig(max_new_tokens=n), ScriptedSLM(), pipeline))
        return [s.token_id for s in steps]

    assert run() == [4, 4, 4, 4]  # the SLM's context branch pushes token 4 every time
    assert seen == [[], [4], [4, 4], [4, 4, 4]]
    assert run(RepetitionGuard(0.0, 2)) == [4, 4, 5]  # (4, 4) may not repeat: the LLM's stop token wins
    assert run(RepetitionGuard(0.0, 1)) == [4, 5]
