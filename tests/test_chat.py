"""Chat over CoSteer on tiny random models: the turns each branch reads, stop strings, history."""

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from costeer import CoSteer
from costeer.api import Chunk
from costeer.chat import Chat, Reply, StopText, reply
from costeer.engine.prompts import chat_ids, conversation, user_message, with_context
from tests.tiny import bpe_tokenizer, gemma3, llama, make_lm, sp_tokenizer

CONTEXT = "my name is Sam, I live in Seattle and I like spicy tofu"
REFERENCE = "my name is Ana, I live in Porto and I like grilled fish"
TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what should I cook tonight"},
    {"role": "assistant", "content": "the cat sat on the mat"},
    {"role": "user", "content": "and for the dog"},
]


@pytest.fixture(scope="module")
def pair():
    tok = bpe_tokenizer()
    return CoSteer(make_lm("llm", llama(len(tok), seed=1), tok), make_lm("slm", gemma3(len(tok), seed=2), tok))


def test_a_one_turn_chat_is_generate(pair):
    r = reply(pair, "what should I cook tonight", "costeer", CONTEXT, max_new_tokens=12)
    text = "".join(r)
    g = pair.generate("what should I cook tonight", CONTEXT, "costeer", max_new_tokens=12)
    assert text == r.text == g.text and r.finish_reason == g.stop_reason
    assert r.completion_tokens == len(g.token_ids)
    assert r.prompt_tokens == len(g.prompt_ids["llm"])


def test_each_branch_reads_its_own_turns(pair):
    public = conversation(TURNS)
    tok = pair.llm.tokenizer
    g = pair.stream(TURNS, CONTEXT, "costeer_matched", reference_message=user_message(TURNS[1]["content"], REFERENCE))
    prompts = g.generation.prompt_ids
    assert prompts["llm"] == prompts["slm"] == chat_ids(tok, public)  # the public conversation only
    assert prompts["slm_context"] == chat_ids(tok, with_context(public, CONTEXT))
    assert prompts["slm_reference"] == chat_ids(tok, with_context(public, REFERENCE))
    assert "Seattle" not in tok.decode(prompts["llm"]) and "Porto" not in tok.decode(prompts["slm"])


def test_reply_passes_the_reference_to_matched_only(pair):
    a = reply(pair, TURNS, "costeer_matched", CONTEXT, REFERENCE, max_new_tokens=8)
    "".join(a)
    assert a.stream.generation.prompt_ids["slm_reference"] == chat_ids(
        pair.slm.tokenizer, with_context(conversation(TURNS), REFERENCE))
    b = reply(pair, TURNS, "costeer", CONTEXT, REFERENCE, max_new_tokens=8)
    "".join(b)
    assert "slm_reference" not in b.stream.generation.prompt_ids


def test_stop_strings_end_the_answer(pair):
    full = pair.generate("what should I cook tonight", CONTEXT, "costeer", max_new_tokens=16).text
    assert len(full) > 6
    stop = full[3:6]
    r = reply(pair, "what should I cook tonight", "costeer", CONTEXT, stop=[stop], max_new_tokens=16)
    assert "".join(r) == full[: full.index(stop)] and r.finish_reason == "stop"


def test_plain_turn_models_stop_at_the_next_user_turn():
    tok = sp_tokenizer()
    cs = CoSteer(None, make_lm("slm", gemma3(len(tok), seed=3), tok))
    r = reply(cs, TURNS, "slm", max_new_tokens=4)
    assert r.stops == ("\nUser:",)


@given(text=st.text(alphabet="abUs:\n", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet="abUs:\n", min_size=1, max_size=4), max_size=3))  # fmt: skip
def test_stop_text_cuts_at_the_first_stop_however_the_text_is_split(text, cuts, stops):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    cut, out, hit = StopText(stops), "", False
    for p in pieces:
        emitted, hit = cut.push(p)
        out += emitted
        if hit:
            break
    if not hit:
        out += cut.flush()
    hits = [text.find(s) for s in stops if s in text]
    assert out == (text[: min(hits)] if hits else text)
    assert hit == bool(hits)


def test_chat_keeps_the_public_history_and_resets(pair):
    chat = Chat(pair, "costeer", CONTEXT, system="Be brief.", max_new_tokens=6)
    first = chat.say("what should I cook tonight")
    "".join(first)
    chat.keep(first)
    assert chat.history == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "what should I cook tonight"},
                            {"role": "assistant", "content": first.text}]  # fmt: skip
    second = chat.say("and for the dog")
    "".join(second)
    assert second.stream.generation.prompt_ids["llm"] == chat_ids(
        pair.llm.tokenizer, conversation([*chat.history, {"role": "user", "content": "and for the dog"}]))
    chat.reset()
    assert chat.history == [{"role": "system", "content": "Be brief."}]


def test_a_reply_streams_once(pair):
    r = reply(pair, "hello", "llm", max_new_tokens=2)
    list(r)
    with pytest.raises(RuntimeError, match="once"):
        list(r)


@pytest.mark.real
def test_two_turns_on_the_real_gemma_smollm2_pair(gemma, smollm2):
    """Gemma-3-270m base (plain-text turns) steered by SmolLM2 (its chat template), over two turns."""
    cs = CoSteer(gemma, smollm2)
    chat = Chat(cs, "costeer", CONTEXT, max_new_tokens=24)
    for question in ("What should I cook tonight?", "And for breakfast?"):
        answer = chat.say(question)
        text = "".join(answer)
        assert text.strip() and "\nUser:" not in text
        prompts = answer.stream.generation.prompt_ids
        public = conversation([*chat.history, {"role": "user", "content": question}])
        # the LLM reads the public turns only (an earlier answer may reflect the context, as it is meant to)
        assert prompts["llm"] == chat_ids(gemma.tokenizer, public)
        assert gemma.tokenizer.decode(prompts["llm"]).endswith(f"User: {question}\nAssistant:")
        assert prompts["slm_context"] == chat_ids(smollm2.tokenizer, with_context(public, CONTEXT))
        assert CONTEXT in smollm2.tokenizer.decode(prompts["slm_context"])
        chat.keep(answer)
    assert [m["role"] for m in chat.history] == ["user", "assistant", "user", "assistant"]
    assert gemma.tokenizer.decode(prompts["llm"]).count("Assistant:") == 2


class _Stream:
    """A stand-in GenerationStream: fixed text pieces, one chunk each; records its close."""

    def __init__(self, pieces):
        self.chunks = [Chunk(step=None, text=p) for p in pieces]
        self.generation = SimpleNamespace(stop_reason="length", token_ids=[])
        self.closed = False

    def __iter__(self):
        try:
            yield from self.chunks
        finally:
            self.closed = True


@pytest.mark.parametrize("pieces, want, text, finish", [
    # a tail that may begin the stop string is held back, then let out at the end without a chunk
    (["ab", "cd"], [(0, ""), (1, "ab"), (None, "cd")], "abcd", "length"),
    # the stop string is cut, and the token that completed it lets out nothing
    (["ab", "xy", "z!"], [(0, ""), (1, "ab"), (2, "")], "ab", "stop"),
])  # fmt: skip
def test_reply_tokens_pair_each_chunk_with_the_text_it_lets_out(pieces, want, text, finish):
    stream = _Stream(pieces)
    r = Reply(stream, ("xyz",), prompt_tokens=0)
    got = [(None if c is None else stream.chunks.index(c), piece) for c, piece in r.tokens()]
    assert got == want and r.text == text and r.finish_reason == finish and stream.closed
    again = Reply(_Stream(pieces), ("xyz",), prompt_tokens=0)
    assert "".join(again) == text  # iterating the reply gives the same text
