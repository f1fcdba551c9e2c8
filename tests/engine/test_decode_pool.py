"""The transformers sequence pool (the cloud's sessions, engine/models.py DecodePool): a tick's steps
of several sessions go into ONE forward (their caches left-padded into one batch, each row at its
own position); each session then holds its own cache again. A session stepped alone computes
exactly what a decode batch of its own computes; rows stepped together round as several rows do,
within a tight bound and with the same greedy tokens, whatever the other rows hold. Look-ahead
trees, commit and drop go on after batched steps."""

import logging

import pytest
import torch

from costeer.engine.models import DecodePool, full_forward_logprobs, pool_strategy
from tests.tiny import bpe_tokenizer, gemma3, llama, make_lm

STEPS = 12
TINY_BOUND = 1e-4  # measured: at most 1e-6 on the tiny models
REAL_BOUND = 1e-3  # the llama.cpp pool's bound (tests/engine/test_llamacpp_pool.py); measured below it


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request):
    """A llama, and a gemma3 whose sliding window (8) the prompts and steps cross."""
    tok = bpe_tokenizer()
    model = llama(len(tok), seed=1) if request.param == "llama" else gemma3(len(tok), seed=1)
    return make_lm(f"tiny-{request.param}", model, tok)


class ForwardSpy:
    """Counts the model's forwards (its top module's calls) and the rows of each."""

    def __init__(self, lm):
        self.rows: list[int] = []
        self._hook = lm.model.register_forward_hook(lambda _m, args, kw, _out: self.rows.append(kw["input_ids"].shape[0]),
                                                    with_kwargs=True)  # fmt: skip

    def close(self):
        self._hook.remove()


def prompts_of(lengths, start=5):
    return [[(start + 3 * i + j) % 90 + 5 for j in range(n)] for i, n in enumerate(lengths)]


def alone(lm, prompt, steps=STEPS):
    """Greedy decoding of one sequence alone -> (tokens, [V] after the prompt and after each token)."""
    batch = lm.open([prompt])
    out, toks = [batch.start()[0]], []
    for _ in range(steps):
        toks.append(int(out[-1].argmax()))
        out.append(batch.advance([toks[-1]])[0])
    return toks, out


def together(pool, prompts, steps=STEPS):
    """Greedy decoding of every prompt at once, each tick's steps in one pool.step."""
    got = {s: [pool.prefill(s, p)] for s, p in enumerate(prompts)}
    toks = {s: [] for s in got}
    for _ in range(steps):
        items = [(s, int(got[s][-1].argmax())) for s in got]
        for (s, t), lp in zip(items, pool.step(items)):
            toks[s].append(t)
            got[s].append(lp)
    return toks, got


def worst(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_a_tick_of_n_sessions_is_one_forward(tiny):
    """Four sessions of similar lengths: one forward of 4 rows. Two: each alone (the measured rule:
    two rows cost what two lone steps cost)."""
    pool = DecodePool(tiny)
    for s, p in enumerate(prompts_of([3, 17, 9, 30])):
        pool.prefill(s, p)
    spy = ForwardSpy(tiny)
    try:
        pool.step([(0, 7), (1, 8), (2, 9), (3, 10)])
        pool.step([(2, 11), (0, 12)])
    finally:
        spy.close()
    assert spy.rows == [4, 1, 1]


def test_a_cache_far_longer_than_the_others_is_stepped_alone(tiny):
    """Padding three short caches to a long one would copy far more than the batch saves: the short
    ones go together, the long one alone, each row in its place in the answer."""
    prompts = prompts_of([200, 10, 12, 11])
    pool, ref = DecodePool(tiny), DecodePool(tiny, "sequential")
    for p in (pool, ref):
        for s, prompt in enumerate(prompts):
            p.prefill(s, prompt)
    spy = ForwardSpy(tiny)
    try:
        got = pool.step([(0, 7), (1, 8), (2, 9), (3, 10)])
    finally:
        spy.close()
    assert sorted(spy.rows) == [1, 3]
    want = ref.step([(0, 7), (1, 8), (2, 9), (3, 10)])
    assert torch.equal(got[0], want[0])  # the long one alone: exact
    assert (got - want).abs().max().item() <= TINY_BOUND


def test_the_sequential_strategy_feeds_each_session_alone(tiny, monkeypatch, caplog):
    monkeypatch.setenv("COSTEER_DECODE_POOL", "sequential")
    pool = tiny.open_pool(4096, 4)
    assert pool.strategy == "sequential"
    assert pool.batch_pays_at is None  # nothing to gather a tick's steps for
    assert DecodePool(tiny).batch_pays_at == DecodePool.min_rows
    for s, p in enumerate(prompts_of([3, 17])):
        pool.prefill(s, p)
    spy = ForwardSpy(tiny)
    try:
        pool.step([(0, 7), (1, 8)])
    finally:
        spy.close()
    assert spy.rows == [1, 1]
    monkeypatch.setenv("COSTEER_DECODE_POOL", "sideways")
    with caplog.at_level(logging.WARNING):
        assert pool_strategy() == "batched"
    assert "COSTEER_DECODE_POOL" in caplog.text
    with pytest.raises(ValueError, match="strategy"):
        DecodePool(tiny, "sideways")


def test_a_session_stepped_alone_is_exact(tiny):
    """One session's step (a tick with nothing else to step) is the one-row path, bit for bit."""
    prompts = prompts_of([3, 17, 9])
    want_toks, want = alone(tiny, prompts[1])
    pool = DecodePool(tiny)
    for s, p in enumerate(prompts):
        pool.prefill(s, p)
    got = [want[0]]
    for t in want_toks:
        got.append(pool.step([(1, t)])[0])
    assert worst(got, want) == 0.0


def test_sessions_of_different_lengths_stepped_together_are_each_at_their_own_position(tiny):
    """Prompts of 3 to 30 tokens stepped together: each row is what it computes alone (and what a whole
    forward over its tokens gives), so its positions count its own tokens and the padding is hidden."""
    prompts = prompts_of([3, 17, 9, 30, 1])
    toks, got = together(DecodePool(tiny), prompts)
    for s, p in enumerate(prompts):
        want_toks, want = alone(tiny, p)
        assert toks[s] == want_toks, s
        assert worst(got[s], want) <= TINY_BOUND, s
        assert (got[s][-1] - full_forward_logprobs(tiny, p + toks[s])).abs().max().item() <= TINY_BOUND


def test_a_sessions_tokens_do_not_depend_on_the_other_rows(tiny):
    """The same session beside short and beside long prompts (it is padded, then it pads): the same
    greedy tokens, its distributions within rounding."""
    mine = prompts_of([12], start=40)[0]
    spy = ForwardSpy(tiny)
    try:
        runs = [together(DecodePool(tiny), [mine, *others]) for others in (prompts_of([2, 3]), prompts_of([31, 25], start=7))]
    finally:
        spy.close()
    assert spy.rows.count(3) == 2 * STEPS  # every step of both runs in one forward of the three
    (toks_a, got_a), (toks_b, got_b) = runs
    assert toks_a[0] == toks_b[0]
    assert worst(got_a[0], got_b[0]) <= TINY_BOUND


def test_trees_commit_and_drop_after_batched_steps(tiny):
    """After batched steps a look-ahead node is the lone step it stands for, bit for bit; a kept path
    and a dropped session leave the others going on as they would."""
    prompts = prompts_of([5, 14, 8])
    pool, ref = DecodePool(tiny), DecodePool(tiny)
    for p in (pool, ref):
        together(p, prompts, steps=3)
    node = pool.grow([(1, 0, 21), (1, 0, 22)])  # two children of session 1's root
    deeper = pool.grow([(1, 1, 23)])
    lone = ref.step([(1, 21)])[0]
    assert torch.equal(node[0], lone) and torch.equal(deeper[0], ref.step([(1, 23)])[0])
    assert pool.commit(1, 3) == []  # keep 21, 23
    pool.drop(0)
    ref.drop(0)
    assert not pool.trees and 0 not in pool._seqs
    got, want = pool.step([(2, 30), (1, 31)]), ref.step([(2, 30), (1, 31)])
    assert torch.equal(got, want)  # the same batch over the same caches


class Remerged(DecodePool):
    """The pool without its resident batch: every batched step merges the rows' caches and splits them
    back after it (what every tick did before the resident batch)."""

    def _step_together(self, items):
        out = super()._step_together(items)
        self._split()
        return out


def test_the_same_sessions_stepping_again_reuse_their_batch_bit_for_bit(tiny, monkeypatch):
    """Ticks of the same four sessions (in any order) reuse the last step's batch cache instead of
    merging the rows again: one merge for five ticks, and every distribution exactly what merging
    every tick gives. A fifth session joining, one stepping alone, a look-ahead tree and a dropped
    session split the batch back into rows, with the same results as ever."""
    import costeer.engine.models as models

    merges = []
    merge = models._merge_rows
    monkeypatch.setattr(models, "_merge_rows", lambda *a: merges.append(len(a[1])) or merge(*a))
    prompts = prompts_of([5, 14, 8, 11, 9])
    pool, ref = DecodePool(tiny), Remerged(DecodePool(tiny).lm)
    for p in (pool, ref):
        for s, prompt in enumerate(prompts[:4]):
            p.prefill(s, prompt)

    def tick(items):
        """-> how many merges the pool (not the reference) made for this tick."""
        n = len(merges)
        got = pool.step(items)
        made = len(merges) - n
        assert torch.equal(got, ref.step(items)), items
        return made

    ticks = [[(0, 7), (1, 8), (2, 9), (3, 10)], [(3, 11), (1, 12), (0, 13), (2, 14)], [(2, 15), (0, 16), (3, 17), (1, 18)]]
    ticks += [[(1, 19), (0, 20), (2, 21), (3, 22)], [(0, 23), (3, 24), (2, 25), (1, 26)]]
    assert [tick(items) for items in ticks] == [1, 0, 0, 0, 0]
    for p in (pool, ref):
        p.prefill(4, prompts[4])
    assert tick([(0, 30), (1, 31), (2, 32), (3, 33), (4, 34)]) == 1  # another set: merged, then resident
    assert tick([(4, 35), (3, 36), (2, 37), (1, 38), (0, 39)]) == 0
    tick([(2, 40)])  # alone: its own cache, split out of the batch
    tick([(0, 41), (1, 42), (3, 43), (4, 44)])
    assert torch.equal(pool.grow([(1, 0, 45), (1, 0, 46)]), ref.grow([(1, 0, 45), (1, 0, 46)]))
    assert pool.commit(1, 1) == ref.commit(1, 1) == []
    tick([(0, 47), (1, 48), (3, 49), (4, 50)])
    pool.drop(3)
    ref.drop(3)
    tick([(0, 51), (1, 52), (2, 53), (4, 54)])
    assert torch.equal(pool.prefill(2, [60, 61]), ref.prefill(2, [60, 61]))
    tick([(0, 55), (1, 56), (2, 57), (4, 58)])


@pytest.mark.real
def test_smollm2_sessions_stepped_together_stay_within_rounding(smollm2):
    """8 chat prompts of different lengths stepped together on the real SmolLM2 (transformers): the
    same greedy tokens as each alone, log-probabilities within the llama.cpp pool's bound."""
    tok = smollm2.tokenizer
    texts = [f"Question {i}: tell me about topic number {i * 7} and why it matters" + " please" * i for i in range(8)]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for t in texts]  # fmt: skip
    assert len({len(p) for p in prompts}) == 8
    toks, got = together(DecodePool(smollm2), prompts)
    diff = 0.0
    for s, p in enumerate(prompts):
        want_toks, want = alone(smollm2, p)
        assert toks[s] == want_toks, s
        diff = max(diff, worst(got[s], want))
    assert diff <= REAL_BOUND, diff
