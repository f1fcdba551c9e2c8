"""The engine adapter's requests and answers, model-free: what it asks an engine for (a count,
never a choice of tokens), how a top-k answer becomes a distribution with its tail mass, and the
OpenAI-compatible (vLLM / SGLang) answer shape, which no server on these machines can produce."""

import math

import pytest
import torch

from costeer.device import CloudError
from costeer.device.transport import HttpClient
from costeer.device.engines import EngineLLM, parse_top


def engine(api: str, k: int = 4) -> EngineLLM:
    return EngineLLM("http://127.0.0.1:1", api, tokenizer=None, stop_ids=[0], vocab_size=10, model="m",
                     http=HttpClient("http://127.0.0.1:1", "", None), k=k)  # fmt: skip


def test_top_k_becomes_sorted_ids_with_the_tail_mass():
    d = parse_top({3: math.log(0.1), 7: math.log(0.6), 1: math.log(0.2)}, vocab_size=10, position=5)
    assert d.ids.tolist() == [7, 1, 3] and d.position == 5 and d.vocab_size == 10
    assert math.exp(d.log_tail) == pytest.approx(0.1, abs=1e-6)


def test_top_k_summing_past_one_has_no_tail():
    d = parse_top({0: math.log(0.7), 1: math.log(0.30001)}, vocab_size=10, position=0)
    assert d.log_tail == float("-inf")


@pytest.mark.parametrize("bad", [{}, {10: -1.0}, {-1: -1.0},
                                 # JSON's NaN / Infinity literals parse: no log-probability, no mass, p > 1
                                 {3: float("nan")}, {3: -1.0, 4: float("inf")}, {3: float("-inf"), 4: float("-inf")},
                                 {3: 2.0}])  # fmt: skip
def test_bad_answers_are_clear_errors(bad):
    with pytest.raises(CloudError):
        parse_top(bad, vocab_size=10, position=0)


@pytest.mark.parametrize("api", ["llamacpp", "openai"])
def test_a_request_holds_the_public_ids_and_a_count_only(api):
    path, body = engine(api, k=4).request_body([5, 6, 7])
    assert engine(api, k=4).request_body([5, 6, 7], 3)[1] == {**body, ("n_predict" if api == "llamacpp" else "max_tokens"): 3}
    assert body["prompt"] == [5, 6, 7]
    k_field = "n_probs" if api == "llamacpp" else "logprobs"
    assert body[k_field] == 4
    if api == "openai":
        assert path == "/v1/completions" and body["max_tokens"] == 1 and body["return_tokens_as_token_ids"]
        assert body["model"] == "m"
    else:
        assert path == "/completion" and body["n_predict"] == 1 and body["cache_prompt"]
    # nothing in the request names a token the device cares about: only the prompt's ids and k
    ints = sorted(str(v) for v in body.values() if isinstance(v, (int, list)) and not isinstance(v, bool))
    assert ints == sorted(["[5, 6, 7]", "1", "4"])


def test_openai_answer_shape():
    # vLLM /v1/completions with logprobs=k and return_tokens_as_token_ids=true
    answer = {"choices": [{"text": "x", "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-0.5],
                                                     "top_logprobs": [{"token_id:7": -0.5, "token_id:2": -1.5}]}}]}
    d = engine("openai").parse(answer, position=3)
    assert d.ids.tolist() == [7, 2] and torch.allclose(d.logp, torch.tensor([-0.5, -1.5]))


def test_llamacpp_answer_shape():
    answer = {"completion_probabilities": [{"id": 7, "logprob": -0.5, "top_logprobs": [
        {"id": 2, "token": "b", "logprob": -1.5}, {"id": 7, "token": "a", "logprob": -0.5}]}]}
    d = engine("llamacpp").parse(answer, position=0)
    assert d.ids.tolist() == [7, 2]


def test_unexpected_answer_is_a_clear_error():
    with pytest.raises(CloudError, match="unexpected answer"):
        engine("openai").parse({"choices": []}, position=0)


class _Answers:
    """Stands in for HttpClient: answers from a script (a dict, or a CloudError to raise)."""

    def __init__(self, script):
        self.script = list(script)

    def request_json(self, method, path, body=None, max_bytes=None):
        item = self.script.pop(0)
        if isinstance(item, CloudError):
            raise item
        return item


@pytest.mark.parametrize("code, retried", [(503, True), (502, True), (504, True), (400, False), (401, False)])
def test_transient_http_answers_are_retried_and_refusals_are_not(code, retried):
    from costeer.device import Retry

    ok = {"completion_probabilities": [{"id": 7, "logprob": -0.5, "top_logprobs": [{"id": 7, "logprob": -0.5}]}]}
    e = engine("llamacpp")
    e.retry = Retry(budget_s=1, backoff_s=0.001)
    e.http = _Answers([CloudError(f"HTTP {code}", code), ok])
    if retried:
        assert e.step([1, 2], 0).ids.tolist() == [7]
    else:
        with pytest.raises(CloudError, match=str(code)):
            e.step([1, 2], 0)
