"""Confidence-gated steering: where the LLM is sure, its own distribution and no SLM forward;
the SLM pair catches up in one forward when steering resumes, so every steered token sees
exactly the state an always-on SLM would have."""

import math

import pytest
import torch

from costeer.engine.config import SamplingConfig, SteeringConfig
from costeer.engine.fusion import paper_pipeline
from costeer.engine.loop import DecodePlan, LocalModelSource, LocalSteeringSource, decode
from tests.engine.test_loop import ScriptedLLM, ScriptedSLM, vocab


class CatchUpSLM(ScriptedSLM):
    def __init__(self):
        super().__init__()
        self.extended: list[list[int]] = []

    def extend(self, token_ids):
        self.extended.append(list(token_ids))
        self.fed.extend(token_ids)
        return self._pair()


class UnsureLLM(ScriptedLLM):
    """As ScriptedLLM, but unsure (top probability ≈ 0.4) on every third step."""

    def advance(self, token_id):
        lp = super().advance(token_id)
        if len(self.fed) % 3 == 0:
            lp = torch.log_softmax(torch.where(lp == lp.max(), 0.0, -0.5), -1)
        return lp


def test_gate_skips_the_slm_where_the_llm_is_sure():
    slm = CatchUpSLM()
    steps = list(decode(DecodePlan(ScriptedLLM(), vocab(), SamplingConfig(max_new_tokens=6), slm, paper_pipeline(1.0),
                                   gate=0.5)))
    # the first token is steered (the prefill always runs); every later one is the LLM's own
    assert [s.gated for s in steps] == [False] + [True] * (len(steps) - 1)
    assert steps[0].token_id == 4 and [s.token_id for s in steps[1:]] == [5]
    assert slm.fed == [] and slm.extended == []


def test_gate_catches_the_slm_up_in_one_forward():
    slm = CatchUpSLM()
    steps = list(decode(DecodePlan(UnsureLLM(), vocab(), SamplingConfig(max_new_tokens=7), slm, paper_pipeline(0.05),
                                   gate=0.5)))
    steered = [s.index for s in steps if not s.gated]
    assert steered[0] == 0 and len(steered) > 1
    # every token chosen before the last steered step reached the SLM, in order
    assert slm.fed == [s.token_id for s in steps[: steered[-1]]]
    assert any(len(x) > 1 for x in slm.extended)


def test_gate_off_and_gate_one_never_skip():
    for gate in (None, 1.0):
        slm = CatchUpSLM()
        steps = list(decode(DecodePlan(UnsureLLM(), vocab(), SamplingConfig(max_new_tokens=5), slm, paper_pipeline(1.0),
                                       gate=gate)))
        assert not any(s.gated for s in steps)  # a top probability of exactly 1 never occurs here
        assert len(slm.fed) == len(steps) - 1 and slm.extended == []


@pytest.fixture(scope="module")
def cs(tmp_path_factory):
    from tests.eval.tiny_pair import load_pair, save_pair

    return load_pair(save_pair(tmp_path_factory.mktemp("models")))


@pytest.mark.parametrize("quantile", [0.25, 0.5, 0.75])
def test_gated_run_equals_always_on_slm_with_the_same_mask(cs, quantile):
    """Real (tiny) models: the gated loop with catch-up gives the tokens of a loop that runs the
    SLM every step and simply does not steer where the LLM's top probability reaches the gate."""
    p = cs.prompts("Plan a weekend trip.", "I live in Lisbon and I surf.")
    vm, b, n = cs.vocab(), SteeringConfig().coefficient("costeer"), 16
    sampling = SamplingConfig(max_new_tokens=n)
    slm_prompts = (p["slm"], p["slm_context"])
    # random tiny models are unsure everywhere: take the gate from their own top probabilities
    paper = paper_pipeline(b)

    def plan(fusion, gate=None):  # fresh sources over the same prompts
        return DecodePlan(LocalModelSource(cs.llm, p["llm"]), vm, sampling, LocalSteeringSource(cs.slm, slm_prompts),
                          fusion, gate)  # fmt: skip

    ungated = list(decode(plan(paper)))
    src, tops = LocalModelSource(cs.llm, p["llm"]), []
    lp = src.start()
    for s in ungated[:-1]:
        tops.append(float(vm.llm_view(lp).exp().max()))
        lp = src.advance(s.token_id)
    gate = float(torch.tensor(tops).quantile(quantile))
    gated = list(decode(plan(paper, gate)))

    class Masked:  # the same decision, taken with the SLM always up to date
        def __call__(self, z, pers, base, history):
            return z if float(z.max()) >= math.log(gate) and history else paper(z, pers, base, history)

    # The first token is always steered: the mask only applies from the second on (history non-empty).
    always = list(decode(plan(Masked())))
    assert [s.token_id for s in gated] == [s.token_id for s in always]
    fired = sum(s.gated for s in gated)
    assert not gated[0].gated and 0 < fired < len(gated) - 1  # the gate fired, and not everywhere


def test_one_model_on_both_sides_runs_one_batch_with_the_same_tokens(cs):
    """LLM = SLM: the LLM's and the SLM pair's sequences go in one batch per token; the tokens are
    those of separate sources."""
    import dataclasses

    from costeer.api import CoSteer

    lm = cs.llm
    opened = []
    real_open = type(lm).open

    def spy(self, prompts, reserve=1024, prefix=None):
        opened.append(len(prompts))
        return real_open(self, prompts, reserve, prefix)

    shared_cs, separate_cs = CoSteer(lm, lm), CoSteer(lm, dataclasses.replace(lm))
    type(lm).open = spy
    try:
        a = shared_cs.generate("Plan a weekend trip.", "I live in Lisbon and I surf.", "costeer", max_new_tokens=12)
        assert opened == [3]  # one batch: LLM row + both SLM branches
        opened.clear()
        b = separate_cs.generate("Plan a weekend trip.", "I live in Lisbon and I surf.", "costeer", max_new_tokens=12)
        assert sorted(opened) == [1, 2]
    finally:
        type(lm).open = real_open
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0


def test_api_gate_reports_how_often_it_fired(cs):
    from costeer.api import CoSteer

    pair = CoSteer(cs.llm, cs.slm)
    on = pair.generate("Plan a weekend trip.", "I live in Lisbon and I surf.", "costeer", max_new_tokens=10,
                       steering=SteeringConfig(gate=1e-6))  # fires on every token after the first
    off = pair.generate("Plan a weekend trip.", "I live in Lisbon and I surf.", "costeer", max_new_tokens=10)
    assert on.timing()["gated_tokens"] == len(on.steps) - 1 > 0
    assert off.timing()["gated_tokens"] == 0
    assert on.steps[0].gated is False and all(s.gated for s in on.steps[1:])


def test_gate_with_the_cloud_is_refused(cs):
    from costeer.api import CoSteer

    class Remote:  # what CoSteer sees of a CloudLLM: connect() gives sources of its own
        remote, tokenizer, vocab_size, stop_ids = True, cs.llm.tokenizer, cs.llm.vocab_size, cs.llm.stop_ids

        def connect(self, vocab, max_new_tokens, steering=None, slm_prompts=None):
            return object(), object()

    with pytest.raises(ValueError, match="confidence gate"):
        CoSteer(Remote(), cs.slm).generate("hi", "ctx", "costeer", steering=SteeringConfig(gate=0.5))
