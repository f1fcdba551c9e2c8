"""The transformers backend with a prefix cache (tiny models): a hit computes exactly what a miss does,
both match the cache-free batch, and the API reuses a context across generations and processes."""

import copy
import logging

import pytest
import torch

from costeer.api import HEAD_PROMPT_BELOW, MIN_HEAD_TOKENS, CoSteer
from costeer.engine import models
from costeer.engine.models import DecodeBatch, KVSnapshot, _snapshot_codec, hf_identity
from costeer.engine.prefix_cache import PrefixCache, PrefixCacheConfig, PrefixPlan, new_key
from costeer.engine.prompts import prompt_ids, stable_prefix_len, user_message
from tests.tiny import CHAT_TEMPLATE, bpe_tokenizer, gemma3, llama, make_lm, sp_tokenizer

MODELS = {"llama": llama, "gemma3": gemma3}
SHORT = [3, 17, 42, 8]
LONG = [3, 99, 12, 54, 61, 7, 23, 17, 42, 8, 11, 5, 19, 40, 41]  # longer than gemma3's sliding window
STEPS = [14, 200, 31, 77, 5, 130, 9, 62, 250, 33, 18, 4]
CONTEXT = "I live in Seattle with my dog Biscuit and I like spicy food, tofu and long runs on Sunday morning"


@pytest.fixture(params=sorted(MODELS))
def lm(request):
    tok = bpe_tokenizer()
    return make_lm(request.param, MODELS[request.param](len(tok)), tok)


def run(batch: DecodeBatch, steps=STEPS) -> list[torch.Tensor]:
    out = [batch.start()]
    out += [batch.advance([t] * len(batch.prompts)) for t in steps]
    return out


@pytest.mark.parametrize("n", [3, 11])  # inside gemma3's window, and across it
def test_hit_equals_miss_bit_for_bit_and_both_equal_the_plain_batch(lm, n):
    cache = PrefixCache()
    plan = PrefixPlan(cache, (0, n))
    plain = run(DecodeBatch(lm, [SHORT, LONG]))
    miss = run(DecodeBatch(lm, [SHORT, LONG], plan))
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    hit = run(DecodeBatch(lm, [SHORT, LONG], plan))
    assert cache.hits == 1
    for a, b, c in zip(miss, hit, plain):
        assert torch.equal(a, b)
        assert (a - c).abs().max().item() <= 1e-4


def test_a_row_equal_to_an_earlier_one_is_prefilled_once_and_the_rows_merged_at_the_first_step(lm, monkeypatch):
    """The shared model's LLM row and the SLM's row without context read one prompt: prefilled once (a row
    alone computes the same either way); the rows' caches are merged only when the first step needs them."""
    plan = PrefixPlan(PrefixCache(), (0, 0, 11))
    with monkeypatch.context() as m:
        m.setattr(DecodeBatch, "_twin", lambda self, b: None)
        want = run(DecodeBatch(lm, [SHORT, SHORT, LONG], plan))
    calls = {"_row_forward": 0, "_merge_rows": 0}
    for owner, name in ((DecodeBatch, "_row_forward"), (models, "_merge_rows")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **k))
    batch = DecodeBatch(lm, [SHORT, SHORT, LONG], plan)
    got = [batch.start()]
    assert calls == {"_row_forward": 2, "_merge_rows": 0}  # SHORT once; LONG's rest after its cached prefix
    got += [batch.advance([t] * 3) for t in STEPS]
    assert calls == {"_row_forward": 2, "_merge_rows": 1}
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_one_row_and_a_new_query_after_the_prefix(lm):
    cache = PrefixCache()
    plan = PrefixPlan(cache, (9,))
    run(DecodeBatch(lm, [LONG], plan))
    other = LONG[:9] + [77, 78, 79]  # same prefix, another query
    got = run(DecodeBatch(lm, [other], plan))
    want = run(DecodeBatch(lm, [other]))
    assert cache.hits == 1
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1e-4


def test_snapshot_survives_the_disk_codec(lm):
    cache = PrefixCache()
    DecodeBatch(lm, [LONG], PrefixPlan(cache, (11,))).start()
    snap = cache.lookup(hf_identity(lm), LONG[:11], _snapshot_codec(lm))
    codec = _snapshot_codec(lm)
    back = codec.decode(codec.encode(snap))
    assert back.length == 11 and len(back.layers) == len(snap.layers)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(snap.layers, back.layers))
    assert codec.decode(b"not safetensors") is None
    fewer = KVSnapshot(snap.layers[:-1], 11)  # a state from a model with another layer count
    assert codec.decode(codec.encode(fewer)) is None


def test_stable_prefix_is_the_context_whatever_the_query():
    for tok in (bpe_tokenizer(), sp_tokenizer()):
        cuts = []
        for q in ("Plan my weekend.", "what should I cook tonight?"):
            ids = prompt_ids(tok, user_message(q, CONTEXT))
            n = stable_prefix_len(tok, user_message(q, CONTEXT), q, CONTEXT)
            assert 0 < n < len(ids)
            assert stable_prefix_len(tok, user_message(q, CONTEXT), q, CONTEXT, ids=ids) == n  # ids at hand
            cuts.append(ids[:n])
        assert cuts[0] == cuts[1]
        assert "Sunday morning" in tok.decode(cuts[0])  # the whole context
    tok = bpe_tokenizer()
    # the query first (the preference tasks' layout): nothing is stable
    assert stable_prefix_len(tok, "Plan my weekend.\nYour answer should be concise", "Plan my weekend.") == 0


def pair():
    tok = bpe_tokenizer()
    return make_lm("llm", llama(len(tok), seed=1), tok), make_lm("slm", gemma3(len(tok), seed=2), tok)


@pytest.mark.parametrize("method", ["costeer", "slm_context", "costeer_matched"])
def test_api_output_is_the_same_with_and_without_the_cache(method):
    llm, slm = pair()
    ref = user_message("Plan my weekend.", "I live in Lisbon and like surfing and the sea")
    kw = dict(method=method, max_new_tokens=12, reference_message=ref)
    plain = CoSteer(llm, slm, prefix_cache=None).generate("Plan my weekend.", CONTEXT, **kw)
    cs = CoSteer(llm, slm)
    first = cs.generate("Plan my weekend.", CONTEXT, **kw)
    again = cs.generate("Plan my weekend.", CONTEXT, **kw)
    assert first.token_ids == again.token_ids == plain.token_ids
    assert cs.prefix_cache.hits == (2 if method == "costeer_matched" else 1)


def test_the_cache_crosses_processes_through_the_encrypted_file(tmp_path, caplog):
    llm, slm = pair()
    cfg = PrefixCacheConfig(directory=tmp_path / "prefix", key=new_key())
    first = CoSteer(llm, slm, prefix_cache=PrefixCache(cfg)).generate("Plan my weekend.", CONTEXT, max_new_tokens=8)
    (f,) = (tmp_path / "prefix").glob("*.kv")
    fresh = PrefixCache(cfg)  # a second process: nothing in memory
    again = CoSteer(llm, slm, prefix_cache=fresh).generate("Plan my weekend.", CONTEXT, max_new_tokens=8)
    assert fresh.hits == 1 and again.token_ids == first.token_ids
    f.write_bytes(f.read_bytes()[:-7])  # truncated: ignored, rebuilt, the same answer
    broken = PrefixCache(cfg)
    with caplog.at_level(logging.WARNING):
        third = CoSteer(llm, slm, prefix_cache=broken).generate("Plan my weekend.", CONTEXT, max_new_tokens=8)
    assert third.token_ids == first.token_ids and broken.hits == 0
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert len(list((tmp_path / "prefix").glob("*.kv"))) == 1  # rebuilt


# A chat template with a default system turn before the user's (as SmolLM2's): a head of ~13 tokens on the
# tiny tokenizer, the same for every query.
SYSTEM = "the cat sat on the mat and the dog ran to the park"


def head_pair(shared: bool = False):
    tok = copy.deepcopy(bpe_tokenizer())
    tok.chat_template = "<|user|>" + SYSTEM + "<|end|>" + CHAT_TEMPLATE
    llm = make_lm("llm", llama(len(tok), seed=1), tok)
    return (llm, llm) if shared else (llm, make_lm("slm", gemma3(len(tok), seed=2), tok))


def test_the_slm_public_prompt_keeps_its_template_head_for_every_query():
    """The SLM pair's row without context reads the public prompt: its template head (the default system
    turn) is kept once and restored for another query; the context's prefix beside it as before."""
    llm, slm = head_pair()
    assert stable_prefix_len(slm.tokenizer, "Plan my weekend.", "Plan my weekend.", head=True) >= MIN_HEAD_TOKENS
    cs, plain = CoSteer(llm, slm), CoSteer(llm, slm, prefix_cache=None)
    for q in ("Plan my weekend.", "what should I cook tonight?"):
        got = cs.generate(q, CONTEXT, "costeer", max_new_tokens=8)
        assert got.token_ids == plain.generate(q, CONTEXT, "costeer", max_new_tokens=8).token_ids
    # the first query keeps the head and the context's prefix, the second finds both
    assert (cs.prefix_cache.misses, cs.prefix_cache.hits, len(cs.prefix_cache)) == (2, 2, 2)


def test_no_head_where_the_llm_row_is_copied_or_the_public_prompt_is_long():
    """One model on both sides: the SLM's public row copies the LLM's (no prefill, no head). A public prompt
    of HEAD_PROMPT_BELOW tokens or more is prefilled whole. Only the context's prefix is kept."""
    lm, _ = head_pair(shared=True)
    cs = CoSteer(lm, lm)
    cs.generate("Plan my weekend.", CONTEXT, "costeer", max_new_tokens=4)
    assert len(cs.prefix_cache) == 1
    llm, slm = head_pair()
    cs = CoSteer(llm, slm)
    long_query = " ".join(["a quick brown fox jumps over the lazy dog near the river"] * 6)
    assert len(cs.prompts(long_query, None)["slm"]) >= HEAD_PROMPT_BELOW
    cs.generate(long_query, CONTEXT, "costeer", max_new_tokens=4)
    assert len(cs.prefix_cache) == 1


def test_stable_prefix_of_a_public_prompt_is_its_template_head_only_when_asked():
    llm, _ = head_pair()
    tok = llm.tokenizer
    heads = []
    for q in ("Plan my weekend.", "what should I cook tonight?"):
        ids = prompt_ids(tok, q)
        assert stable_prefix_len(tok, q, q) == 0  # a turn that starts with the query: nothing by default
        n = stable_prefix_len(tok, q, q, head=True)
        assert 0 < n < len(ids)
        heads.append(ids[:n])
    assert heads[0] == heads[1] and SYSTEM in tok.decode(heads[0]) and "weekend" not in tok.decode(heads[0])
