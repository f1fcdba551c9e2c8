"""The Python API on tiny random models: every method, exactness against the literal loop."""

import pytest

from costeer import CoSteer, GenerationConfig, Method, SamplingConfig, SteeringConfig, VariantConfig
from costeer.engine.vocab import IncompatibleVocabularies
from costeer.engine.prompts import chat_ids as api_chat_ids
from costeer.engine.prompts import user_message
from costeer.engine.vocab import support_mask
from costeer.steering import fuse_delta, fuse_plausible_trust, lift_supported, repetition_guard, safe_delta
from tests.reference import literal_costeer, literal_steered
from tests.tiny import WINDOW, bpe_tokenizer, disjoint_tokenizer, gemma3, llama, make_lm, sp_tokenizer

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam, I live in Seattle and I like spicy tofu"


@pytest.fixture(scope="module")
def same_pair():
    tok = bpe_tokenizer()
    return CoSteer(make_lm("llm", llama(len(tok), seed=1), tok), make_lm("slm", gemma3(len(tok), seed=2), tok))


@pytest.fixture(scope="module")
def cross_pair():
    a, b = bpe_tokenizer(), sp_tokenizer()
    cfg = GenerationConfig(min_shared_vocab=0.1)
    return CoSteer(make_lm("llm", llama(len(a), seed=4), a), make_lm("slm", gemma3(len(b), seed=5), b), cfg)


@pytest.mark.parametrize("pair", ["same_pair", "cross_pair"])
def test_costeer_equals_the_literal_loop(pair, request):
    cs = request.getfixturevalue(pair)
    got = cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=20)
    assert got.token_ids == literal_costeer(cs, QUERY, CONTEXT, 20)
    assert len(got.token_ids) >= 10
    assert got.coefficient == pytest.approx(1.7833, abs=1e-4)


def test_light_with_unit_coefficient_gives_the_slm_with_context():
    # LLM = SLM = one model, same prompt: log π_base cancels log π*_base, leaving log π*_pers.
    tok = bpe_tokenizer()
    lm = make_lm("m", llama(len(tok), seed=7), tok)
    cs = CoSteer(lm, lm)
    unit = SteeringConfig(beta=2.0 + 1 / 10.0)  # β / (λ + 1/η) = 1
    light = cs.generate(QUERY, CONTEXT, "light", steering=unit, max_new_tokens=24)
    assert light.coefficient == pytest.approx(1.0)
    assert light.token_ids == cs.generate(QUERY, CONTEXT, "slm_context", max_new_tokens=24).token_ids


def test_prompts_tokenises_only_the_branches_asked_for_and_each_text_once_per_tokenizer(monkeypatch):
    from costeer import api

    tok = bpe_tokenizer()
    lm = make_lm("m", llama(len(tok), seed=7), tok)
    cs = CoSteer(lm, lm)
    everything = cs.prompts(QUERY, CONTEXT)
    assert list(everything) == ["llm", "llm_context", "slm", "slm_context"]
    texts = []
    monkeypatch.setattr(api, "chat_ids", lambda t, messages: texts.append(messages) or api_chat_ids(t, messages))
    some = cs.prompts(QUERY, CONTEXT, branches=("llm", "slm", "slm_context"))
    assert some == {k: everything[k] for k in ("llm", "slm", "slm_context")}
    assert len(texts) == 2  # one model: the public prompt once, the with-context prompt once
    some["llm"].append(0)
    assert some["slm"] == everything["slm"]  # each branch its own list


def test_every_method_runs_and_records_its_prompts(same_pair):
    branches = {
        "costeer": {"llm", "slm", "slm_context"},
        "light": {"llm", "slm", "slm_context"},
        "costeer_plausible": {"llm", "slm", "slm_context"},
        "costeer_trust": {"llm", "slm", "slm_context"},
        "costeer_plausible_trust": {"llm", "slm", "slm_context"},
        "costeer_guarded": {"llm", "slm", "slm_context"},
        "costeer_matched": {"llm", "slm", "slm_context"},  # no reference given: the bare query
        "llm": {"llm"},
        "llm_context": {"llm_context"},
        "slm": {"slm"},
        "slm_context": {"slm_context"},
    }
    prompts = same_pair.prompts(QUERY, CONTEXT)
    for method, keys in branches.items():
        g = same_pair.generate(QUERY, CONTEXT, method, max_new_tokens=6)
        assert set(g.prompt_ids) == keys
        assert all(g.prompt_ids[k] == prompts[k] for k in keys)
        assert 1 <= len(g.token_ids) <= 6 and g.method == method
    # the private context is absent from every prompt the LLM sees in a private method
    ctx_ids = bpe_tokenizer()(CONTEXT, add_special_tokens=False)["input_ids"]
    assert not _contains(prompts["llm"], ctx_ids[2:8])
    assert _contains(prompts["slm_context"], ctx_ids[2:8])


def _contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_stream_matches_generate_and_reports_timings(same_pair):
    stream = same_pair.stream(QUERY, CONTEXT, "costeer", max_new_tokens=12)
    chunks = list(stream)
    g = stream.generation
    assert "".join(c.text for c in chunks) == g.text
    assert [c.step.token_id for c in chunks] == g.token_ids
    assert g.token_ids == same_pair.generate(QUERY, CONTEXT, "costeer", max_new_tokens=12).token_ids
    assert all(s.llm_s > 0 and s.slm_s > 0 and s.fusion_s >= 0 and s.sample_s >= 0 for s in g.steps)


def test_seeded_sampling_is_reproducible(same_pair):
    kw = dict(temperature=0.9, top_p=0.95, top_k=50, seed=11, max_new_tokens=10)
    a = same_pair.generate(QUERY, CONTEXT, "costeer", **kw)
    b = same_pair.generate(QUERY, CONTEXT, "costeer", **kw)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(query="  ", context=CONTEXT, method="costeer"), "query is empty"),
        (dict(query=QUERY, context=None, method="costeer"), "needs a personal context"),
        (dict(query=QUERY, context="", method="slm_context"), "needs a personal context"),
        (dict(query=QUERY, context=CONTEXT, method="nope"), "nope"),
    ],
)
def test_bad_requests(same_pair, kwargs, message):
    with pytest.raises(ValueError, match=message):
        same_pair.generate(**kwargs)


def test_missing_model_for_a_method():
    tok = bpe_tokenizer()
    cs = CoSteer(make_lm("llm", llama(len(tok)), tok), None)
    with pytest.raises(ValueError, match="needs an SLM"):
        cs.generate(QUERY, CONTEXT, "costeer")


def test_incompatible_pair_is_refused():
    a, d = bpe_tokenizer(), disjoint_tokenizer()
    cs = CoSteer(make_lm("llm", llama(len(a)), a), make_lm("slm", llama(len(d)), d))
    with pytest.raises(IncompatibleVocabularies):
        cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=2)


def test_sampling_overrides_are_validated(same_pair):
    with pytest.raises(ValueError):
        same_pair.generate(QUERY, CONTEXT, "llm", max_new_tokens=0)
    assert SamplingConfig().greedy


def test_context_message_replaces_context_plus_query(same_pair):
    msg = "PROFILE: Sam, Seattle, spicy tofu. TASK: what should I cook tonight"
    p = same_pair.prompts(QUERY, None, context_message=msg)
    tok = bpe_tokenizer()
    assert tok.decode(p["slm_context"]) == f"<|user|>{msg}<|end|><|assistant|>"
    assert tok.decode(p["llm"]) == f"<|user|>{QUERY}<|end|><|assistant|>"
    g = same_pair.generate(QUERY, None, "costeer", context_message=msg, max_new_tokens=4)
    assert g.prompt_ids["slm_context"] == p["slm_context"]


# ------------------------------------------------------------------------------------------- steering variants

VARIANTS = ["costeer_plausible", "costeer_trust", "costeer_plausible_trust", "costeer_guarded"]
OFF = SteeringConfig(variant=VariantConfig(tau=0.0, epsilon=None, repetition_penalty=0.0, no_repeat_ngram=0))


@pytest.mark.parametrize("pair", ["same_pair", "cross_pair"])
@pytest.mark.parametrize("method", VARIANTS)
def test_each_variant_runs_end_to_end_and_is_the_paper_update_when_off(method, pair, request):
    cs = request.getfixturevalue(pair)
    g = cs.generate(QUERY, CONTEXT, method, max_new_tokens=12)
    assert g.method == method and 1 <= len(g.token_ids) <= 12
    assert g.coefficient == pytest.approx(1.7833, abs=1e-4)  # b_T: the cap the variants steer under
    off = cs.generate(QUERY, CONTEXT, method, steering=OFF, max_new_tokens=12)
    assert off.token_ids == cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=12).token_ids


@pytest.mark.parametrize("pair", ["same_pair", "cross_pair"])
def test_guarded_equals_the_literal_loop(pair, request):
    cs = request.getfixturevalue(pair)
    v = VariantConfig(tau=0.02, tau_pers=0.05, epsilon=0.3, repetition_penalty=0.5, no_repeat_ngram=2)
    b = SteeringConfig().coefficient(Method.costeer)

    def fusion(lp, lq, lb, history):
        return fuse_plausible_trust(repetition_guard(lp, history, 0.5, 2), lq, lb, b, v.tau, v.epsilon, v.tau_pers)

    got = cs.generate(QUERY, CONTEXT, "costeer_guarded", steering=SteeringConfig(variant=v), max_new_tokens=20)
    assert got.token_ids == literal_steered(cs, QUERY, CONTEXT, 20, fusion)


def test_variant_limits_give_back_the_llm(same_pair):
    # τ = 1 keeps only the LLM's favourite; ε = 0 allows no move from π_base: greedy, both are `llm`
    llm = same_pair.generate(QUERY, CONTEXT, "llm", max_new_tokens=16).token_ids
    for method, v in [("costeer_plausible", VariantConfig(tau=1.0)), ("costeer_trust", VariantConfig(epsilon=0.0))]:
        g = same_pair.generate(QUERY, CONTEXT, method, steering=SteeringConfig(variant=v), max_new_tokens=16)
        assert g.token_ids == llm, method
    assert same_pair.generate(QUERY, CONTEXT, "costeer", max_new_tokens=16).token_ids != llm


def _repeats(ids, n):
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("variant", [VariantConfig(tau=0.0, epsilon=None, no_repeat_ngram=2),  # the guard alone
                                     VariantConfig(no_repeat_ngram=2)])  # with the head and the trust region
def test_the_guard_bans_repeated_ngrams_in_the_output(same_pair, variant):
    plain = same_pair.generate(QUERY, CONTEXT, "costeer", max_new_tokens=40).token_ids
    guarded = same_pair.generate(QUERY, CONTEXT, "costeer_guarded", steering=SteeringConfig(variant=variant),
                                 max_new_tokens=40).token_ids  # fmt: skip
    assert _repeats(plain, 2)  # the random tiny model loops
    assert not _repeats(guarded, 2) and len(guarded) >= 20


def test_variant_parameters_are_validated(same_pair):
    with pytest.raises(ValueError):
        same_pair.generate(QUERY, CONTEXT, "costeer_trust", steering=SteeringConfig(variant=dict(epsilon=-1)))
    with pytest.raises(ValueError, match="needs a personal context"):
        same_pair.generate(QUERY, None, "costeer_guarded")


# ------------------------------------------------------------------------------- the matched reference context

REFERENCE = "my name is Alex, I live in Boston and I like mild pasta\n\nwhat should I cook tonight"
GUARD_ONLY = SteeringConfig(variant=VariantConfig(tau=0.0, epsilon=None))  # the paper's update + no-repeat 4-grams


@pytest.mark.parametrize("pair", ["same_pair", "cross_pair"])
def test_matched_is_the_guarded_update_with_the_reference_as_the_slm_base(pair, request):
    cs = request.getfixturevalue(pair)
    b = SteeringConfig().coefficient(Method.costeer)

    support = support_mask(cs.vocab(), cs.llm.tokenizer, user_message(QUERY, CONTEXT))

    def fusion(lp, lq, lb, history):  # the paper's update on the guarded base; Δ against the reference,
        d = lift_supported(safe_delta(lq, lb), support)  # raising only the context's tokens
        return fuse_delta(repetition_guard(lp, history, 0.0, 4), d, b)

    got = cs.generate(QUERY, CONTEXT, "costeer_matched", reference_message=REFERENCE, max_new_tokens=20)
    assert got.token_ids == literal_steered(cs, QUERY, CONTEXT, 20, fusion, reference=REFERENCE)
    assert set(got.prompt_ids) == {"llm", "slm", "slm_reference", "slm_context"}
    assert got.prompt_ids["slm_reference"] == cs.prompts(QUERY, CONTEXT, reference_message=REFERENCE)["slm_reference"]
    # the reference is read: against the bare query the same stages choose other tokens
    bare = cs.generate(QUERY, CONTEXT, "costeer_guarded", steering=GUARD_ONLY, max_new_tokens=20).token_ids
    assert got.token_ids != bare


def test_matched_without_a_reference_is_the_guarded_paper_update(same_pair):
    # the support rule comes with the reference only: a one-line instruction ("be concise") is no profile
    got = same_pair.generate(QUERY, CONTEXT, "costeer_matched", max_new_tokens=20).token_ids
    assert got == same_pair.generate(QUERY, CONTEXT, "costeer_guarded", steering=GUARD_ONLY, max_new_tokens=20).token_ids


def test_the_support_rule_changes_the_matched_tokens(same_pair):
    got = same_pair.generate(QUERY, CONTEXT, "costeer_matched", reference_message=REFERENCE, max_new_tokens=20)
    b = SteeringConfig().coefficient(Method.costeer)
    no_support = literal_steered(same_pair, QUERY, CONTEXT, 20, reference=REFERENCE,
                                 fusion=lambda lp, lq, lb, h: fuse_delta(repetition_guard(lp, h, 0.0, 4),
                                                                         safe_delta(lq, lb), b))  # fmt: skip
    assert got.token_ids != no_support


def test_only_the_matched_method_reads_the_reference(same_pair):
    for method in ("costeer", "costeer_guarded", "llm", "slm_context"):
        with_ref = same_pair.generate(QUERY, CONTEXT, method, reference_message=REFERENCE, max_new_tokens=10)
        assert "slm_reference" not in with_ref.prompt_ids
        assert with_ref.token_ids == same_pair.generate(QUERY, CONTEXT, method, max_new_tokens=10).token_ids


def test_a_prompt_past_the_trained_window_is_refused_before_any_forward(same_pair, monkeypatch):
    from costeer.api import PromptTooLong
    from costeer.engine.models import DecodeBatch

    def no_forward(*a, **k):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(DecodeBatch, "start", no_forward)
    long_context = "I like tofu. " * WINDOW  # past the tiny models' window
    with pytest.raises(PromptTooLong, match="slm_context prompt .* exceeds the trained window of slm"):
        same_pair.stream(QUERY, long_context, "costeer", max_new_tokens=8)
    with pytest.raises(PromptTooLong, match="plus max_new_tokens"):  # the tokens to generate count too
        same_pair.stream(QUERY, CONTEXT, "costeer", max_new_tokens=WINDOW)


def test_truncate_context_equals_generating_from_the_kept_head(same_pair):
    long_context = CONTEXT + ". " + "I like tofu. " * WINDOW
    g = same_pair.generate(QUERY, long_context, "costeer", max_new_tokens=8, truncate_context=True)
    kept = long_context[: len(long_context) - g.context_cut]
    assert 0 < g.context_cut < len(long_context) and kept.startswith(CONTEXT)
    assert len(g.prompt_ids["slm_context"]) + 8 <= same_pair.slm.window
    assert g.token_ids == same_pair.generate(QUERY, kept, "costeer", max_new_tokens=8).token_ids
    assert same_pair.generate(QUERY, CONTEXT, "costeer", max_new_tokens=8, truncate_context=True).context_cut == 0


def test_a_misspelt_sampling_override_is_refused_not_ignored(same_pair):
    # `temprature=0.7` used to decode greedily without a word
    with pytest.raises(ValueError, match="temprature"):
        same_pair.generate(QUERY, CONTEXT, "llm", temprature=0.7, max_new_tokens=2)


@pytest.mark.parametrize("field", ["alpha", "beta", "lam", "eta"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_hyper_parameters_are_refused(field, value):
    # beta = inf used to give b_T = inf, a NaN policy and an empty answer that looked like a normal stop
    with pytest.raises(ValueError, match="finite number"):
        SteeringConfig(**{field: value})
    with pytest.raises(ValueError, match="finite number"):
        SamplingConfig(temperature=value)


@pytest.mark.parametrize("kw", [dict(query="caf\udce9"), dict(context="caf\udce9"),
                                dict(query=[{"role": "system", "content": "x\udcff"}, {"role": "user", "content": "hi"}])])  # fmt: skip
def test_text_that_is_not_utf8_is_a_value_error(same_pair, kw):
    # the lone surrogates of undecodable argv / stdin bytes used to reach the tokenizer: a TypeError
    kw = {"query": QUERY, "context": CONTEXT, **kw}
    with pytest.raises(ValueError, match="not UTF-8 text"):
        same_pair.generate(method="costeer", max_new_tokens=2, **kw)


def test_a_prompt_too_long_is_told_what_would_help(same_pair):
    from costeer.api import PromptTooLong

    with pytest.raises(PromptTooLong, match="shorten the prompt or lower") as e:  # no context to cut
        same_pair.stream(QUERY, None, "llm", max_new_tokens=WINDOW)
    assert "truncate" not in str(e.value)
    with pytest.raises(PromptTooLong, match="shorten the prompt or lower"):  # a dataset's whole message: not cut
        same_pair.stream(QUERY, None, "slm_context", context_message="I like tofu. " * WINDOW, truncate_context=True)
    with pytest.raises(PromptTooLong, match="truncate-context"):  # a context given apart: cutting it helps
        same_pair.stream(QUERY, "I like tofu. " * WINDOW, "slm_context")
