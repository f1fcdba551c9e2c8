"""Look-ahead with a serving engine (issue #14 item 4): one request of `max_tokens = d` with the
top-k of every position. A stand-in engine computes the tiny LLM's exact distribution for every
prefix it is asked about, in llama-server's and in the OpenAI (vLLM) answer shape; the device's
output with any look-ahead must be the per-token output, token for token, and each request must
carry exactly the prefix the device chose."""

import math

import pytest
import torch

from costeer.api import CoSteer
from costeer.device import CloudError
from costeer.device.engines import ChainDepth, EngineLLM
from costeer.device.options import Lookahead

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam, I live in Seattle with my dog Biscuit; I like spicy tofu and long runs"
N = 24
K = 16


class StandInEngine:
    """Answers /completion (llamacpp) or /v1/completions (openai) like the real servers: the greedy
    chain of n tokens from the prompt, with the top-K log-probabilities of each position. `feeds`
    (position in the chain, top ids) -> the token the engine goes on with: greedy by default."""

    def __init__(self, lm, api: str, feeds=None):
        self.lm, self.api, self.feeds = lm, api, feeds
        self.bodies: list[dict] = []
        self.wire = None

    @torch.no_grad()
    def logp(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.lm.model(torch.tensor([ids])).logits[0, -1].float(), -1)

    def request_json(self, method, path, body=None, max_bytes=None):
        self.bodies.append(body)
        n = body["n_predict"] if self.api == "llamacpp" else body["max_tokens"]
        ids, chain = list(body["prompt"]), []
        for j in range(n):
            top = torch.topk(self.logp(ids), K)
            tok = self.feeds(j, top.indices.tolist()) if self.feeds else int(top.indices[0])
            chain.append((tok, top))
            ids.append(tok)
            if tok in self.lm.stop_ids:
                break
        if self.api == "llamacpp":
            return {"completion_probabilities": [
                {"id": tok, "logprob": 0.0, "top_logprobs": [{"id": int(i), "logprob": float(v)}
                                                             for v, i in zip(top.values, top.indices)]}
                for tok, top in chain]}  # fmt: skip
        return {"choices": [{"logprobs": {
            "tokens": [f"token_id:{tok}" for tok, _ in chain],
            "top_logprobs": [{f"token_id:{int(i)}": float(v) for v, i in zip(top.values, top.indices)}
                             for _, top in chain]}}]}  # fmt: skip

    def post_json(self, path, body):
        return self.request_json("POST", path, body)

    def close(self):
        pass

    def prompts(self) -> list[list[int]]:
        return [b["prompt"] for b in self.bodies]

    def positions_asked(self) -> list[int]:
        return [b.get("n_predict", b.get("max_tokens")) for b in self.bodies]


def engine_llm(lm, api: str, lookahead, feeds=None, rtt_s: float = 0.0) -> tuple[EngineLLM, StandInEngine]:
    fake = StandInEngine(lm, api, feeds)
    llm = EngineLLM("http://127.0.0.1:1", api, lm.tokenizer, lm.stop_ids, lm.vocab_size, "m", http=fake, k=K,
                    lookahead=lookahead, rtt_s=rtt_s)  # fmt: skip
    return llm, fake


def generate(lm, slm, api, lookahead, method="costeer", feeds=None, rtt_s=0.0, **sampling):
    llm, fake = engine_llm(lm, api, lookahead, feeds, rtt_s)
    out = CoSteer(llm, slm).generate(QUERY, CONTEXT if method != "llm" else None, method, max_new_tokens=N, **sampling)
    return out, fake


SAMPLED = {"temperature": 0.9, "top_k": 0, "seed": 11}


@pytest.mark.parametrize("api", ["llamacpp", "openai"])
@pytest.mark.parametrize("method", ["costeer", "costeer_matched", "light", "llm"])
@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "seeded"])
def test_any_lookahead_gives_the_per_token_output(tiny_llm, tiny_slm, api, method, sampling):
    want, per_token = generate(tiny_llm, tiny_slm, api, "off", method, **sampling)
    assert set(per_token.positions_asked()) == {1} and len(per_token.bodies) == len(want.token_ids)
    for lookahead in (2, 4, 8, "auto"):
        got, chained = generate(tiny_llm, tiny_slm, api, lookahead, method, rtt_s=0.05, **sampling)
        assert got.token_ids == want.token_ids, (lookahead, method)
        assert got.text == want.text
        if lookahead != "auto":
            assert max(chained.positions_asked()) == lookahead


def test_the_llm_alone_follows_the_whole_chain(tiny_llm, tiny_slm):
    """Greedy `llm` picks the engine's own greedy token: a chain of d carries d tokens."""
    got, fake = generate(tiny_llm, tiny_slm, "llamacpp", 4, "llm")
    assert len(fake.bodies) == math.ceil(len(got.token_ids) / 4)


def test_each_request_carries_the_prefix_the_device_chose(tiny_llm, tiny_slm):
    got, fake = generate(tiny_llm, tiny_slm, "llamacpp", 4, "costeer")
    prompt = fake.prompts()[0]
    done = 0
    for asked, n in zip(fake.prompts(), fake.positions_asked()):
        assert asked[: len(prompt)] == prompt
        chosen = asked[len(prompt) :]
        assert chosen == got.token_ids[: len(chosen)]  # exactly the device's tokens so far
        assert len(chosen) >= done  # and never behind what it already had
        assert n <= N - len(chosen)  # never more positions than tokens left
        done = len(chosen)
    assert len(fake.bodies) < len(got.token_ids)  # the steered tokens stayed on some chains


def test_a_chain_that_is_not_greedy_is_followed_by_its_tokens(tiny_llm, tiny_slm):
    """The device compares its token with the token the engine fed, not with the top one: an
    engine that goes on with its second-best token at odd positions changes nothing."""
    feeds = lambda j, top: top[1] if j % 2 else top[0]  # noqa: E731
    want, _ = generate(tiny_llm, tiny_slm, "openai", "off", "costeer")
    got, fake = generate(tiny_llm, tiny_slm, "openai", 4, "costeer", feeds=feeds)
    assert got.token_ids == want.token_ids


def test_chain_answers_are_read_to_the_positions_asked(tiny_llm):
    llm, _ = engine_llm(tiny_llm, "llamacpp", 2)
    pos = lambda i: {"id": i, "logprob": -0.1, "top_logprobs": [{"id": i, "logprob": -0.1}, {"id": 9, "logprob": -2.5}]}  # noqa: E731
    links = llm.parse_chain({"completion_probabilities": [pos(3), pos(4), pos(5)]}, position=7, n=2)
    assert [link.token for link in links] == [3, 4]  # a third position, not asked for, is dropped
    assert [link.dist.position for link in links] == [7, 8]
    assert links[1].dist.ids.tolist() == [4, 9]


@pytest.mark.parametrize("answer", [
    {"completion_probabilities": []},
    {"completion_probabilities": [{"top_logprobs": [{"id": 1, "logprob": -1.0}]}]},  # no chain token
    {"completion_probabilities": [{"id": 1, "top_logprobs": [{"id": 10 ** 6, "logprob": -1.0}]}]},
    {"completion_probabilities": "x"},
])  # fmt: skip
def test_bad_chain_answers_are_clear_errors(tiny_llm, answer):
    llm, _ = engine_llm(tiny_llm, "llamacpp", 2)
    with pytest.raises(CloudError):
        llm.parse_chain(answer, position=0, n=2)


def test_openai_chain_shape(tiny_llm):
    llm, _ = engine_llm(tiny_llm, "openai", 3)
    answer = {"choices": [{"logprobs": {"tokens": ["token_id:5", "token_id:6"],
                                        "top_logprobs": [{"token_id:5": -0.2, "token_id:1": -2.0},
                                                         {"token_id:6": -0.1}]}}]}  # fmt: skip
    links = llm.parse_chain(answer, position=0, n=3)  # the engine stopped early: two positions
    assert [(link.token, link.dist.ids.tolist()) for link in links] == [(5, [5, 1]), (6, [6])]


# -- the depth of a request ----------------------------------------------------------------------


def measured(policy: ChainDepth, cost_s: float, device_s: float, stayed: int, offered: int) -> ChainDepth:
    policy.requested(1, policy.rtt_s + cost_s)
    policy.device(device_s)
    for i in range(offered):
        policy.walked(i < stayed)
    return policy


def test_fixed_depth_is_bounded_by_the_tokens_left():
    assert ChainDepth(Lookahead(4), 0.0).depth(left=10) == 4
    assert ChainDepth(Lookahead(4), 0.0).depth(left=3) == 3
    assert ChainDepth(Lookahead.parse("off"), 1.0).depth(left=10) == 1


def test_auto_asks_for_one_position_until_it_has_measured():
    assert ChainDepth(Lookahead(), 0.1).depth(left=64) == 1


def test_auto_stays_per_token_where_the_round_trip_is_cheap():
    # loopback: 1 ms round trip, 10 ms a position, half the chain taken
    assert measured(ChainDepth(Lookahead(), 0.001), 0.010, 0.015, 5, 10).depth(64) == 1


def test_auto_goes_deeper_with_the_round_trip_and_the_stay_rate():
    far = [measured(ChainDepth(Lookahead(), rtt), 0.010, 0.015, 7, 10).depth(64) for rtt in (0.01, 0.05, 0.2)]
    assert far[0] <= far[1] <= far[2] and far[2] > 1
    sure = measured(ChainDepth(Lookahead(), 0.05), 0.010, 0.015, 19, 20).depth(64)
    unsure = measured(ChainDepth(Lookahead(), 0.05), 0.010, 0.015, 2, 20).depth(64)
    assert sure > unsure
    assert sure <= 8  # auto's own bound
