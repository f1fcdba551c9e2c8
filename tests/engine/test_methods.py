"""The method table: every list the code keeps about methods is read from its rows, and a row
that contradicts itself is refused when the table is built."""

import pytest

from costeer.engine.config import METHOD_HELP, STEERING_STAGES, Method, SteeringConfig
from costeer.engine.methods import METHODS, PAPER_METHODS, STEERED, MethodSpec
from costeer.steering import effective_coefficient, light_coefficient


def test_the_enum_and_the_derived_lists_follow_the_rows():
    assert [m.value for m in Method] == [s.name for s in METHODS]
    assert all(METHOD_HELP[m] == m.spec.help for m in Method)
    assert set(STEERING_STAGES) == {m for m in Method if m.spec.stages}
    assert PAPER_METHODS == ("slm", "slm_context", "llm", "costeer", "light", "llm_context")


def test_what_the_rows_say_about_each_method():
    assert [m.value for m in Method if m.spec.privacy_violating] == ["llm_context"]
    assert [m.value for m in Method if m.matched] == ["costeer_matched"]
    assert {m.value for m in Method if not m.uses_slm} == {"llm", "llm_context"}
    assert {m.value for m in Method if not m.uses_llm} == {"slm", "slm_context"}
    assert {m.value for m in Method if not m.spec.needs_context} == {"llm", "slm"}
    assert Method.slm_context.spec.primary == "slm_context" and Method.costeer_matched.spec.primary == "llm"


def test_the_coefficient_rule_is_the_rows():
    cfg = SteeringConfig()
    assert cfg.coefficient("light") == light_coefficient(cfg.params())
    assert cfg.coefficient(Method.costeer_guarded) == effective_coefficient(cfg.params())
    with pytest.raises(ValueError, match="does not steer"):
        cfg.coefficient(Method.llm)


def test_a_new_row_needs_nothing_else():
    row = MethodSpec("costeer_new", "help", STEERED, ("costeer", "guard"), effective_coefficient)
    assert row.steered and row.uses_llm and row.uses_slm and row.needs_context and not row.privacy_violating


@pytest.mark.parametrize(
    "kw",
    [dict(branches=("llm", "slm_secret")), dict(branches=()),
     dict(branches=STEERED, stages=("costeer",)),  # steered without a coefficient
     dict(branches=("llm",), coefficient=effective_coefficient),  # a coefficient without stages
     dict(branches=STEERED, stages=("guard", "costeer"), coefficient=effective_coefficient),
     dict(branches=("llm",), stages=("costeer",), coefficient=effective_coefficient)],  # no SLM pair
)  # fmt: skip
def test_contradictory_rows_are_refused(kw):
    with pytest.raises(ValueError):
        MethodSpec("bad", "help", **kw)
