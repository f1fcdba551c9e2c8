import json

import pytest

from costeer.engine.prompts import PLAIN_TEMPLATE, load_context, prompt_ids, render_context, user_message
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
