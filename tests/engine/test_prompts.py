import json

import pytest

from costeer.engine.prompts import (
    PLAIN_TEMPLATE,
    chat_ids,
    conversation,
    first_user_turn,
    load_context,
    plain_turns,
    prompt_ids,
    render_context,
    user_message,
    with_context,
)
from tests.tiny import bpe_tokenizer


def test_chat_template_is_used_when_present():
    tok = bpe_tokenizer()
    ids = prompt_ids(tok, "hello world")
    assert tok.decode(ids) == "<|user|>hello world<|end|><|assistant|>"


def test_plain_text_without_a_template():
    tok = bpe_tokenizer(chat=False)
    assert not tok.chat_template
    ids = prompt_ids(tok, "hello world")
    assert tok.decode(ids) == PLAIN_TEMPLATE.format(content="hello world")


def test_context_comes_before_the_query_and_only_when_given():
    assert user_message(" Plan my day ") == "Plan my day"
    assert user_message("Plan my day", "I surf.") == "I surf.\n\nPlan my day"


def test_context_files(tmp_path):
    (tmp_path / "p.txt").write_text("I live in Seattle.\n")
    (tmp_path / "p.json").write_text(json.dumps({"name": "Sam", "likes": ["tofu", "running"]}))
    (tmp_path / "p.yaml").write_text("name: Sam\nhome:\n  city: Seattle\n")
    assert load_context(tmp_path / "p.txt") == "I live in Seattle."
    assert load_context(tmp_path / "p.json") == "name: Sam\nlikes:\n  - tofu\n  - running"
    assert load_context(tmp_path / "p.yaml") == "name: Sam\nhome:\n  city: Seattle"


def test_context_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_context(tmp_path / "missing.txt")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_context(tmp_path / "bad.json")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_context(tmp_path / "empty.yaml")


def test_render_nested_lists():
    assert render_context([{"a": 1}, "x"]) == "-\n  a: 1\n- x"


TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " what should I cook "},
    {"role": "assistant", "content": "Tofu."},
    {"role": "user", "content": "and for dessert?"},
]


def test_a_query_is_a_conversation_of_one_user_turn():
    tok = bpe_tokenizer()
    assert conversation(" hi ") == [{"role": "user", "content": "hi"}]
    assert chat_ids(tok, conversation("hello world")) == prompt_ids(tok, "hello world")


def test_plain_turns_for_a_model_without_a_template():
    tok = bpe_tokenizer(chat=False)
    text = tok.decode(chat_ids(tok, conversation(TURNS)))
    assert text == "System: Be brief.\nUser: what should I cook\nAssistant: Tofu.\nUser: and for dessert?\nAssistant:"
    assert plain_turns([{"role": "user", "content": "x"}]) == PLAIN_TEMPLATE.format(content="x")


def test_the_chat_template_renders_every_turn():
    tok = bpe_tokenizer()
    text = tok.decode(chat_ids(tok, conversation(TURNS)))
    assert text == "<|user|>Be brief.<|end|><|user|>what should I cook<|end|><|user|>Tofu.<|end|>" \
                   "<|user|>and for dessert?<|end|><|assistant|>"


def test_the_context_goes_before_the_first_user_turn_only():
    turns = conversation(TURNS)
    private = with_context(turns, "I am vegan.")
    assert private[1]["content"] == "I am vegan.\n\nwhat should I cook"
    assert [m for i, m in enumerate(private) if i != 1] == [m for i, m in enumerate(turns) if i != 1]
    assert first_user_turn(turns, "verbatim")[1] == {"role": "user", "content": "verbatim"}


@pytest.mark.parametrize(
    "turns, message",
    [
        ([], "conversation is empty"),
        ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
        ([{"content": "x"}], "unknown role None"),
        (["just text"], "unknown role"),
        ([{"role": "user", "content": 3}], "content must be text"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "end with a user turn"),
        ([{"role": "user", "content": "  "}], "query is empty"),
    ],
)
def test_bad_conversations(turns, message):
    with pytest.raises(ValueError, match=message):
        conversation(turns)


def test_a_template_that_refuses_a_conversation_is_a_value_error():
    refusing = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}" \
               "{% endif %}{{ m['content'] }}{% endfor %}"
    tok = bpe_tokenizer(chat=False)
    tok2 = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|end|>")
    tok2.chat_template = refusing
    with pytest.raises(ValueError, match="refuses this conversation: no system role"):
        chat_ids(tok2, conversation(TURNS))
