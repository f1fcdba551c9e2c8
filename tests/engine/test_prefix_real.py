"""Exactness of the prefix cache on the real SmolLM2 and shared CoGenesis rows (skipped when absent).

What a cached prompt computes is a prefill of the stable prefix, then of the rest: on a hit the prefix's
state is restored, on a miss it is computed, and the two are the same bytes (checked bit for bit). Against
a whole-prompt prefill the only difference is where the prompt is split into forwards, which moves the
log-probabilities by rounding only: the bounds below are measured (docs/prefix-cache.md), and the greedy
tokens are the same."""

import json
from pathlib import Path

import pytest
import torch

from costeer.api import CoSteer
from costeer.engine.prefix_cache import PrefixCache, PrefixPlan
from costeer.engine.prompts import stable_prefix_len

pytestmark = pytest.mark.real

DATA = Path(__file__).resolve().parents[3] / "shared/datasets/cogenesis.jsonl"
ROWS, TOKENS, FIRST = 2, 16, 4
# max |Δ log p| over the tokens with log p ≥ -10, first FIRST positions (measured: docs/prefix-cache.md)
BOUND = {"llamacpp": 0.05, "transformers": 1e-3}


def cogenesis_rows(n: int) -> list[dict]:
    if not DATA.is_file():
        pytest.skip(f"{DATA} not found (the shared evaluation inputs)")
    with DATA.open() as fh:
        return [json.loads(line) for line, _ in zip(fh, range(n))]


def greedy_logprobs(lm, prompt: list[int], plan: PrefixPlan | None, n: int) -> tuple[list[int], list[torch.Tensor]]:
    batch = lm.open([prompt], reserve=n + 1, prefix=plan)
    try:
        lp, out, ids = batch.start()[0], [], []
        for _ in range(n):
            out.append(lp.clone())
            ids.append(int(lp.argmax()))
            lp = batch.advance([ids[-1]])[0]
        return ids, out
    finally:
        batch.close()


@pytest.mark.parametrize("fixture", ["smollm2_cpp", "smollm2"])
def test_cached_prefill_is_a_split_prefill_and_keeps_the_greedy_tokens(request, fixture):
    lm = request.getfixturevalue(fixture)
    worst = 0.0
    for row in cogenesis_rows(ROWS):
        msg = row["personalized_input"]
        prompt = CoSteer(lm, lm, prefix_cache=None).prompts(row["input"], None, msg)["slm_context"]
        n = stable_prefix_len(lm.tokenizer, msg, row["input"])
        assert len(prompt) - 64 < n < len(prompt)  # the profile and history; the task after it
        cache = PrefixCache()
        plan = PrefixPlan(cache, (n,))
        whole_ids, whole = greedy_logprobs(lm, prompt, None, TOKENS)
        miss_ids, miss = greedy_logprobs(lm, prompt, plan, TOKENS)
        hit_ids, hit = greedy_logprobs(lm, prompt, plan, TOKENS)
        assert cache.hits == 1
        assert hit_ids == miss_ids == whole_ids
        assert all(torch.equal(a, b) for a, b in zip(hit, miss))
        for a, b in zip(whole[:FIRST], hit[:FIRST]):
            likely = a >= -10
            worst = max(worst, (a - b)[likely].abs().max().item())
    print(f"{lm.backend}: max |Δ log p| on the first {FIRST} tokens = {worst:.3g}")
    assert worst <= BOUND[lm.backend]


def test_costeer_on_llamacpp_is_the_same_with_the_cache(smollm2_cpp):
    row = cogenesis_rows(1)[0]
    kw = dict(context_message=row["personalized_input"], max_new_tokens=TOKENS)
    plain = CoSteer(smollm2_cpp, smollm2_cpp, prefix_cache=None).generate(row["input"], None, "costeer", **kw)
    cs = CoSteer(smollm2_cpp, smollm2_cpp, prefix_cache=PrefixCache())
    first, again = cs.generate(row["input"], None, "costeer", **kw), cs.generate(row["input"], None, "costeer", **kw)
    assert first.token_ids == again.token_ids == plain.token_ids and cs.prefix_cache.hits == 1
