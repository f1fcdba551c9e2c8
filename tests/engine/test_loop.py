"""The decode loop over scripted sources: order of calls, stopping, steering on/off."""

import pytest
import torch

from costeer.engine.config import SamplingConfig
from costeer.engine.fusion import paper_pipeline
from costeer.engine.loop import DecodePlan, decode
from costeer.engine.vocab import VocabMap

V, STOP = 6, 5


def one_hot_logp(i: int) -> torch.Tensor:
    x = torch.full((V,), -10.0)
    x[i] = 0.0
    return torch.log_softmax(x, -1)


class ScriptedLLM:
    """Prefers token 1, 2, 3, … in turn, then STOP; records what it was fed."""

    def __init__(self, prompt_ids=(9,)):
        self.prompt_ids = list(prompt_ids)  # given when built, as every source's prompt
        self.fed: list[int] = []

    def start(self):
        self.prompt = self.prompt_ids
        return one_hot_logp(1)

    def advance(self, token_id):
        self.fed.append(token_id)
        return one_hot_logp(min(token_id + 1, STOP))


class ScriptedSLM:
    """Its context branch pushes hard towards token 4."""

    def __init__(self):
        self.fed: list[int] = []

    def start(self):
        return self._pair()

    def advance(self, token_id):
        self.fed.append(token_id)
        return self._pair()

    def _pair(self):
        base = torch.log_softmax(torch.zeros(V), -1)
        pers = base.clone()
        pers[4] += 30.0
        return torch.stack([base, torch.log_softmax(pers, -1)])


def vocab():
    return VocabMap(size=V, identity=True, stop_ids=frozenset({STOP}))


def test_unsteered_loop_stops_on_the_stop_token():
    llm = ScriptedLLM([9, 9])
    steps = list(decode(DecodePlan(llm, vocab(), SamplingConfig(max_new_tokens=50))))
    assert [s.token_id for s in steps] == [1, 2, 3, 4, 5]
    assert steps[-1].stop and not any(s.stop for s in steps[:-1])
    assert llm.fed == [1, 2, 3, 4]  # the stop token is never fed back
    assert llm.prompt == [9, 9]


def test_max_new_tokens_bounds_the_loop():
    steps = list(decode(DecodePlan(ScriptedLLM(), vocab(), SamplingConfig(max_new_tokens=2))))
    assert [s.token_id for s in steps] == [1, 2]


def test_steering_moves_the_choice_and_both_sides_get_the_token():
    llm, slm = ScriptedLLM(), ScriptedSLM()
    steps = list(decode(DecodePlan(llm, vocab(), SamplingConfig(max_new_tokens=3), slm, paper_pipeline(1.0))))
    assert [s.token_id for s in steps] == [4, 4, 4]
    assert llm.fed == slm.fed == [4, 4]


def test_a_plan_pairs_a_steering_source_with_a_pipeline():
    with pytest.raises(ValueError, match="fusion pipeline"):
        DecodePlan(ScriptedLLM(), vocab(), SamplingConfig(), ScriptedSLM())
    with pytest.raises(ValueError, match="fusion pipeline"):
        DecodePlan(ScriptedLLM(), vocab(), SamplingConfig(), fusion=paper_pipeline(1.0))


def test_decode_closes_the_sources_however_the_stream_ends():
    class Closing(ScriptedLLM):
        closed = 0

        def close(self):
            self.closed += 1

    llm = Closing()
    steps = decode(DecodePlan(llm, vocab(), SamplingConfig(max_new_tokens=50)))
    next(steps)
    steps.close()  # the consumer stops early
    assert llm.closed == 1


def test_every_llm_states_the_llm_protocol():
    from costeer.device import CloudLLM, EngineLLM
    from costeer.engine.loop import LLMSide
    from costeer.engine.models import LM

    assert all(LLMSide in c.__mro__ for c in (LM, CloudLLM, EngineLLM))  # stated, not just matched
    assert LM.remote is False and CloudLLM.remote is True and EngineLLM.remote is True


def test_inspection_is_off_by_default_and_changes_no_token():
    cfg = SamplingConfig(max_new_tokens=3)
    plain = list(decode(DecodePlan(ScriptedLLM(), vocab(), cfg, ScriptedSLM(), paper_pipeline(1.0))))
    seen = list(decode(DecodePlan(ScriptedLLM(), vocab(), cfg, ScriptedSLM(), paper_pipeline(1.0), inspect=3)))
    assert all(s.inspection is None for s in plain)
    assert [s.token_id for s in seen] == [s.token_id for s in plain]
    assert all(s.inspection is not None for s in seen)


def test_inspection_shows_the_shift_and_the_alternatives_before_and_after():
    steps = list(decode(DecodePlan(ScriptedLLM(), vocab(), SamplingConfig(max_new_tokens=1), ScriptedSLM(),
                                   paper_pipeline(1.0), inspect=2)))  # fmt: skip
    insp = steps[0].inspection
    assert steps[0].token_id == 4
    assert insp.before[0][0] == 1 and insp.before[0][1] > 0.99  # the LLM's own favourite, before steering
    assert insp.after[0][0] == 4 and insp.after[0][1] > 0.5  # steering made 4 the favourite
    assert len(insp.before) == len(insp.after) == 2
    # log π_fused(4) − log π_llm(4): 4 was at e^-10 relative to the LLM's favourite
    assert insp.shift > 9.0


def test_inspection_of_an_unsteered_token_shows_no_shift():
    steps = list(decode(DecodePlan(ScriptedLLM(), vocab(), SamplingConfig(max_new_tokens=2), inspect=1)))
    assert [s.inspection.shift for s in steps] == [0.0, 0.0]
    assert steps[0].inspection.before == steps[0].inspection.after == ((1, steps[0].inspection.after[0][1]),)
