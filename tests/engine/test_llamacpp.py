"""The llama.cpp backend on the real GGUFs: its decode batch keeps the transformers backend's
contract (pair = two single calls, extend = token by token), its distributions agree with the
dequantised float32 transformers model within the quantisation error, and the steering loop on
llama.cpp distributions is exactly the paper's literal loop on the same distributions."""

from pathlib import Path

import pytest
import torch
import yaml

from costeer.api import CoSteer
from costeer.engine.prompts import render_context
from costeer.steering import FTRLParams
from tests.reference import literal_costeer

pytestmark = pytest.mark.real

PERSONA = yaml.safe_load((Path(__file__).parents[2] / "src/costeer/examples/persona.yaml").read_text())
QUERY, CONTEXT = PERSONA["query"], render_context(PERSONA["profile"])


def _prompts(lm):
    return CoSteer(lm, lm).prompts(QUERY, CONTEXT)


@pytest.mark.parametrize("name", ["smollm2_cpp", "gemma_cpp"])
def test_pair_in_one_batch_equals_two_single_calls(name, request):
    lm = request.getfixturevalue(name)
    p = _prompts(lm)
    pair, a, b = lm.open([p["slm"], p["slm_context"]]), lm.open([p["slm"]]), lm.open([p["slm_context"]])
    try:
        got, ra, rb = pair.start(), a.start()[0], b.start()[0]
        worst = max((got[0] - ra).abs().max().item(), (got[1] - rb).abs().max().item())
        for tok in p["slm"][-6:]:
            got, ra, rb = pair.advance([tok, tok]), a.advance([tok])[0], b.advance([tok])[0]
            worst = max(worst, (got[0] - ra).abs().max().item(), (got[1] - rb).abs().max().item())
    finally:
        for x in (pair, a, b):
            x.close()
    # Same weights, same kernels; only the batch composition differs (one vs two sequences).
    assert worst <= 1e-3, worst


def test_extend_equals_one_token_at_a_time(smollm2_cpp):
    p = _prompts(smollm2_cpp)
    caught, stepped = smollm2_cpp.open([p["slm"], p["slm_context"]]), smollm2_cpp.open([p["slm"], p["slm_context"]])
    caught.start(), stepped.start()
    toks = p["slm"][-5:]
    for t in toks:
        want = stepped.advance([t, t])
    got = caught.extend(toks)
    assert (got - want).abs().max().item() <= 1e-3
    caught.close(), stepped.close()


@pytest.mark.parametrize("pair", [("smollm2", "smollm2_cpp"), ("gemma", "gemma_cpp")])
def test_first_token_distribution_matches_transformers(pair, request):
    """transformers runs the dequantised weights in float32; llama.cpp multiplies the 4-bit
    weights with activations it quantises to 8 bits (q8 blocks of 32), so logits differ by a few
    tenths of a nat. What steering relies on must agree: the favourite token, the head of the
    distribution and the log-probabilities of every token that carries real mass."""
    hf, cpp = (request.getfixturevalue(n) for n in pair)
    ids = _prompts(hf)["slm_context"]
    from costeer.engine.models import full_forward_logprobs

    a, b = full_forward_logprobs(hf, ids), full_forward_logprobs(cpp, ids)
    assert a.shape == b.shape
    assert int(a.argmax()) == int(b.argmax())
    top_a, top_b = set(a.topk(10).indices.tolist()), set(b.topk(10).indices.tolist())
    assert len(top_a & top_b) >= 8
    heavy = a.exp() > 1e-3  # tokens holding ≥ 0.1% of the mass
    assert (a[heavy] - b[heavy]).abs().max().item() <= 0.5
    # total variation between the two distributions
    assert 0.5 * (a.exp() - b.exp()).abs().sum().item() <= 0.1


def test_costeer_on_llamacpp_equals_the_literal_loop(smollm2_cpp):
    """Steering is backend-independent: the fast loop (KV cache, pair in one batch, O(V) fusion)
    on llama.cpp gives the tokens of the paper's literal loop (three cache-free forwards per
    token, the T-step FTRL iteration) on llama.cpp's own distributions."""
    cs = CoSteer(smollm2_cpp, smollm2_cpp)
    n = 16
    fast = cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=n)
    assert len(fast.token_ids) == n
    assert fast.token_ids == literal_costeer(cs, QUERY, CONTEXT, n, FTRLParams())


def test_auto_backend_picks_llamacpp_for_gguf_on_cpu(smollm2_cpp):
    from costeer.engine.models import load_lm

    lm = load_lm("smollm2-135m-instruct", device="cpu")  # auto
    assert lm.backend == "llamacpp" and lm.vocab_size == 49152
    assert lm.stop_ids == smollm2_cpp.stop_ids and lm.stop_ids


def test_one_model_both_sides_in_one_batch_equals_separate_sources(smollm2_cpp):
    import dataclasses

    shared = CoSteer(smollm2_cpp, smollm2_cpp).generate(QUERY, CONTEXT, "costeer", max_new_tokens=24)
    separate = CoSteer(smollm2_cpp, dataclasses.replace(smollm2_cpp)).generate(QUERY, CONTEXT, "costeer",
                                                                             max_new_tokens=24)
    assert shared.token_ids == separate.token_ids


def test_rewind_then_refeed_is_bit_identical_to_never_feeding_the_guess(smollm2_cpp):
    """A device's wrong guesses undone (device/ahead.py): their cells removed, the real tokens take
    the cells, and compute the logits, of a batch that never saw the guesses (bit for bit)."""
    p = _prompts(smollm2_cpp)
    guessed, straight = smollm2_cpp.open([p["slm"], p["slm_context"]]), smollm2_cpp.open([p["slm"], p["slm_context"]])
    try:
        guessed.start(), straight.start()
        toks = p["slm"][-4:]
        guessed.advance([toks[0]] * 2), straight.advance([toks[0]] * 2)
        assert guessed.room_ahead(4)
        with pytest.raises(ValueError):
            guessed.rewind(2)  # only what was fed since start
        for wrong in ([toks[2]], [toks[3], toks[1]]):
            for t in wrong:
                guessed.advance([t, t])
            guessed.rewind(len(wrong))
        for t in toks[1:]:
            assert torch.equal(guessed.advance([t, t]), straight.advance([t, t]))
    finally:
        guessed.close(), straight.close()
