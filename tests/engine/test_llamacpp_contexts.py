"""The llama.cpp decode batch's kept contexts (engine/llamacpp.py, `IdleContexts`) on the real SmolLM2.

A query takes an idle context of its shape instead of creating one, and computes on it bit for bit what it
computes on a fresh one: with the prefix kept in the cells from the last query, restored, or prefilled, on
a context that held another user's prompt, on a bigger one. A prompt equal to an earlier row's (the shared
model's LLM row and the SLM's row without context) is copied, not prefilled, with the same result. A
context is in one batch at a time; the idle ones are bounded and freed."""

import ctypes
import gc
import threading
from pathlib import Path

import pytest
import torch
import yaml

from costeer.api import CoSteer
from costeer.engine import llamacpp as L
from costeer.engine.prefix_cache import PrefixCache, PrefixPlan
from costeer.engine.prompts import render_context, stable_prefix_len
from tests.engine.test_prefix_real import cogenesis_rows

pytestmark = pytest.mark.real

PERSONA = yaml.safe_load((Path(__file__).parents[2] / "src/costeer/examples/persona.yaml").read_text())
QUERY, CONTEXT = PERSONA["query"], render_context(PERSONA["profile"])
STEPS = 6


def shared_rows(lm, row: dict) -> tuple[list[list[int]], int]:
    """The shared model's three prompts for a CoGenesis row (LLM, SLM without and with context) and the
    with-context prompt's stable prefix."""
    msg = row["personalized_input"]
    p = CoSteer(lm, lm, prefix_cache=None).prompts(row["input"], None, msg)
    return [p["llm"], p["slm"], p["slm_context"]], stable_prefix_len(lm.tokenizer, msg, row["input"])


def run(lm, prompts, plan, follow: list[int], reserve: int = 16) -> list[torch.Tensor]:
    """start(), then one step per token of `follow` (the same token on every row) -> each [B, V]."""
    batch = lm.open(prompts, reserve=reserve, prefix=plan)
    try:
        out = [batch.start().clone()]
        out += [batch.advance([t] * len(prompts)).clone() for t in follow]
        return out
    finally:
        batch.close()


def address(ctx) -> int:
    return ctypes.cast(ctx, ctypes.c_void_p).value


class Spy:
    """Counts the calls of a function (and still makes them)."""

    def __init__(self, monkeypatch, owner, name: str):
        real, self.calls = getattr(owner, name), 0

        def spy(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(owner, name, spy)


def fresh_contexts(lm, monkeypatch) -> None:
    """The model's idle contexts freed, and counted from zero."""
    lm.model.close_contexts()
    monkeypatch.setattr(lm.model, "contexts", L.IdleContexts(lm.model._ll))


@pytest.fixture
def lm(smollm2_cpp, monkeypatch):
    fresh_contexts(smollm2_cpp, monkeypatch)  # other tests leave contexts behind
    yield smollm2_cpp
    smollm2_cpp.model.close_contexts()


def test_a_kept_context_computes_bit_for_bit_what_a_fresh_one_does(lm, monkeypatch):
    (row, other) = cogenesis_rows(2)
    prompts, n = shared_rows(lm, row)
    follow = prompts[0][-STEPS:]  # fed to every row: any tokens do, the same on every path
    # the reference: what every query computed before contexts were kept and twins copied: a fresh
    # context, every row prefilled, the prefix a miss
    with monkeypatch.context() as m:
        m.setattr(L.LlamaDecodeBatch, "_twin", lambda self, seq: None)
        want = run(lm, prompts, PrefixPlan(PrefixCache(), (0, 0, n)), follow)
    fresh_contexts(lm, monkeypatch)
    cache, model = PrefixCache(), lm.model
    plan = PrefixPlan(cache, (0, 0, n))
    restores, prefills = Spy(monkeypatch, L.LlamaDecodeBatch, "_restore"), Spy(monkeypatch, L.LlamaDecodeBatch, "_restore_or_prefill")
    got = {"miss, fresh context, twin copied": run(lm, prompts, plan, follow)}
    assert (model.contexts.created, prefills.calls, restores.calls) == (1, 1, 1)  # the one restore: the twin's copy
    got["hit, the prefix kept in the cells"] = run(lm, prompts, plan, follow)
    assert (model.contexts.reused, prefills.calls, restores.calls, cache.hits) == (1, 1, 2, 1)  # no restore of the prefix
    other_prompts, m = shared_rows(lm, other)
    run(lm, other_prompts, PrefixPlan(cache, (0, 0, m)), follow[:1])  # the context now holds another user's prompt
    got["hit, restored over another user's cells"] = run(lm, prompts, plan, follow)
    assert prefills.calls == 3 and restores.calls == 5  # another prefix prefilled; this one restored (and twins)
    model.close_contexts()
    got["hit, restored into a fresh context"] = run(lm, prompts, plan, follow)
    model.close_contexts()
    run(lm, prompts, plan, [], reserve=1000)  # a bigger context kept ...
    got["hit, a bigger kept context"] = run(lm, prompts, plan, follow)  # ... taken by a smaller batch
    assert (model.contexts.created, model.contexts.reused) == (3, 4)
    for how, steps in got.items():
        assert all(torch.equal(a, b) for a, b in zip(steps, want)), how


def test_a_row_equal_to_an_earlier_one_is_copied_not_prefilled(lm, monkeypatch):
    p = CoSteer(lm, lm).prompts(QUERY, CONTEXT)
    prompts = [p["llm"], p["slm"], p["slm_context"]]
    assert prompts[0] == prompts[1]  # one model: the LLM's prompt is the SLM's without context
    follow = [int(lm.tokenizer.encode(" Lisbon")[0])] * 4
    with monkeypatch.context() as m:
        m.setattr(L.LlamaDecodeBatch, "_twin", lambda self, seq: None)
        want = run(lm, prompts, None, follow)
    decodes = Spy(monkeypatch, L, "_decode_rows")
    got = run(lm, prompts, None, follow)
    assert decodes.calls == 2 + len(follow)  # two prompts prefilled, then one llama_decode per step
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_query_takes_an_idle_context_instead_of_creating_one(lm, monkeypatch):
    created = Spy(monkeypatch, L, "_new_context")
    cs = CoSteer(lm, lm, prefix_cache=PrefixCache())
    answers = [cs.generate(QUERY, CONTEXT, "costeer", max_new_tokens=3).token_ids for _ in range(3)]
    plain = CoSteer(lm, lm, prefix_cache=None)
    answers += [plain.generate(QUERY, None, "llm", max_new_tokens=3).token_ids for _ in range(2)]
    assert created.calls == 2  # one context of each shape (three streams; one)
    assert lm.model.contexts.reused == 3 and len(lm.model.contexts) == 2
    assert answers[0] == answers[1] == answers[2]


def test_a_context_is_in_one_batch_at_a_time_across_threads(lm):
    p = CoSteer(lm, lm).prompts(QUERY, CONTEXT)
    prompts = [p["llm"], p["slm"], p["slm_context"]]
    cache = PrefixCache()
    n = stable_prefix_len(lm.tokenizer, f"{CONTEXT}\n\n{QUERY}", QUERY, CONTEXT)
    plan = PrefixPlan(cache, (0, 0, n))
    follow = [int(lm.tokenizer.encode(" Lisbon")[0])] * 3
    want = run(lm, prompts, plan, follow)
    in_use, lock, clashes, results = set(), threading.Lock(), [], []

    def worker():
        for _ in range(3):
            batch = lm.open(prompts, reserve=8, prefix=plan)
            with lock:
                clashes.append(address(batch.ctx) in in_use)
                in_use.add(address(batch.ctx))
            try:
                steps = [batch.start().clone()] + [batch.advance([t] * 3).clone() for t in follow]
            finally:
                with lock:
                    in_use.discard(address(batch.ctx))
                batch.close()
            results.append(steps)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12 and not any(clashes)
    assert all(torch.equal(a, b) for steps in results for a, b in zip(steps, want))
    assert len(lm.model.contexts) <= lm.model.contexts.size


def test_idle_contexts_are_bounded_and_freed(lm, monkeypatch):
    prompt = CoSteer(lm, lm).prompts(QUERY, None)["llm"]
    freed = Spy(monkeypatch, L.KeptContext, "free")
    batches = [lm.open([prompt], reserve=8) for _ in range(4)]  # four in use at once: four contexts
    assert len({address(b.ctx) for b in batches}) == 4
    for b in batches:
        b.close()
    assert (len(lm.model.contexts), freed.calls) == (2, 2)  # two kept, the least recently given back freed
    batches[0].close()  # twice: nothing more
    assert len(lm.model.contexts) == 2
    lm.model.close_contexts()
    assert (len(lm.model.contexts), freed.calls) == (0, 4)
    monkeypatch.setattr(lm.model, "contexts", L.IdleContexts(lm.model._ll, 0))  # keep none
    lm.open([prompt], reserve=8).close()
    assert (len(lm.model.contexts), freed.calls) == (0, 5)
    forgotten = lm.open([prompt], reserve=8)  # never closed: freed when collected, not kept
    del forgotten
    gc.collect()
    assert freed.calls == 6


def test_a_model_frees_its_idle_contexts(lm, monkeypatch):
    freed = Spy(monkeypatch, L.KeptContext, "free")
    model = L.LlamaCppModel(lm.model.path)
    model.open([[1, 2, 3]], reserve=8).close()
    assert len(model.contexts) == 1
    del model
    gc.collect()
    assert freed.calls == 1


def test_a_bigger_kept_context_keeps_the_batch_to_its_own_size(lm):
    prompt = CoSteer(lm, lm).prompts(QUERY, None)["llm"]
    lm.open([prompt], reserve=3000).close()
    small = lm.open([prompt], reserve=16)
    try:
        assert lm.model.contexts.reused == 1 and small.n_ctx_seq < 3000
        small.start()
        with pytest.raises(L.LlamaCppError, match="is full"):
            small.extend([prompt[-1]] * small.n_ctx_seq)
    finally:
        small.close()
