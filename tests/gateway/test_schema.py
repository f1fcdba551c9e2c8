"""The request parser alone (no server): what real OpenAI clients send is read as OpenAI reads it, and
what a hostile one sends is a 400 in OpenAI's shape, never an exception that escapes it."""

import json

import pytest

from costeer.gateway.schema import ApiError, parse_request

HI = [{"role": "user", "content": "hi"}]


def _parse(**fields):
    return parse_request(json.dumps({"model": "llm", "messages": HI} | fields).encode())


def _refused(body: bytes) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_request(body)
    assert e.value.status == 400 and e.value.message
    return e.value


def test_deeply_nested_json_is_a_400_not_a_recursion_error():
    deep = b'{"model": "llm", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100_000
    deep += b"]" * 100_000 + b"}"
    assert _refused(deep).code == "invalid_json"


def test_a_lone_surrogate_escape_is_a_400_before_it_reaches_a_tokenizer():
    body = b'{"model": "llm", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
    assert _refused(body).code == "invalid_json"


def test_null_means_the_default_as_in_openais_api():
    req = _parse(n=None, stream=None, stop=None, temperature=None, max_tokens=None)
    assert req.n == 1 and req.stream is False and req.stop == []


def test_the_developer_role_reads_as_a_system_turn():
    req = _parse(messages=[{"role": "developer", "content": "Be brief."}, *HI])
    assert [m.role for m in req.messages] == ["system", "user"]


def test_an_assistant_turn_without_content_reads_as_empty():
    req = _parse(messages=[*HI, {"role": "assistant", "content": None}, *HI])
    assert req.messages[1].content == ""


def test_text_parts_are_joined_and_other_parts_are_refused_by_name():
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    assert _parse(messages=[{"role": "user", "content": parts}]).messages[0].content == "hi there"
    image = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://x"}}]
    err = _refused(json.dumps({"model": "llm", "messages": [{"role": "user", "content": image}]}).encode())
    assert err.param == "messages.0.content"
    assert "text parts" in err.message  # not "Input should be a valid string"


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_outside_64_bits_is_refused_by_name(seed):
    err = _refused(json.dumps({"model": "llm", "messages": HI, "seed": seed}).encode())
    assert err.param == "seed" and err.code == "invalid_value"


def test_a_seed_inside_64_bits_is_kept():
    assert _parse(seed=2**64 - 1).seed == 2**64 - 1 and _parse(seed=-(2**63)).seed == -(2**63)


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("top_logprobs", 3),
    ("logit_bias", {"42": 100}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1.0),
    ("tool_choice", "required"),
    ("functions", [{"name": "f", "parameters": {}}]),
])  # fmt: skip
def test_a_field_the_gateway_cannot_honour_is_refused_not_dropped(field, value):
    """An app that asks for JSON, or bans a token, must not get an answer that silently ignored it."""
    err = _refused(json.dumps({"model": "llm", "messages": HI, field: value}).encode())
    assert err.param == field and err.code == "unsupported_parameter"


@pytest.mark.parametrize("field, value", [("response_format", {"type": "text"}), ("top_logprobs", 0),
                                          ("logit_bias", {}), ("presence_penalty", 0), ("frequency_penalty", 0.0),
                                          ("tool_choice", "none"), ("functions", []), ("logprobs", False)])  # fmt: skip
def test_the_same_fields_at_their_neutral_values_are_accepted(field, value):
    assert _parse(**{field: value}).model == "llm"
