"""The llama.cpp sequence pool (one context, one shared KV cache, many sequences) on the real
SmolLM2: a sequence alone in the pool computes exactly what a decode batch of its own computes;
sequences stepped together in one llama_decode stay within the backend's batching noise; the
cache is one fixed size shared by all, and a dropped sequence's cells are used again."""

import pytest

from costeer.engine.llamacpp import LlamaCppError

pytestmark = pytest.mark.real

N = 12


def _prompts(lm, n):
    tok = lm.tokenizer
    texts = [f"Question {i}: tell me about topic number {i * 7} and why it matters" for i in range(n)]
    return [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"] for t in texts]  # fmt: skip


def _alone(lm, prompt):
    """Greedy decoding on a decode batch of its own -> (tokens, log-probabilities at each step)."""
    batch = lm.open([prompt], N + 1)
    try:
        out, toks = [batch.start()[0]], []
        for _ in range(N):
            toks.append(int(out[-1].argmax()))
            out.append(batch.advance([toks[-1]])[0])
        return toks, out
    finally:
        batch.close()


def test_a_sequence_alone_in_the_pool_is_exact(smollm2_cpp):
    prompt = _prompts(smollm2_cpp, 1)[0]
    want_toks, want = _alone(smollm2_cpp, prompt)
    pool = smollm2_cpp.open_pool(4096, 4)
    try:
        for seq in (0, 3):  # a fresh pool, then a sequence whose cells were another's before
            got = [pool.prefill(seq, prompt)]
            toks = []
            for _ in range(N):
                toks.append(int(got[-1].argmax()))
                got.append(pool.step([(seq, toks[-1])])[0])
            pool.drop(seq)
            assert toks == want_toks
            assert max((a - b).abs().max().item() for a, b in zip(got, want)) == 0.0
    finally:
        pool.close()


def test_sequences_stepped_together_stay_within_batching_noise(smollm2_cpp):
    """One llama_decode over 8 sequences whose cells interleave in the shared cache: the matrix
    products see 8 rows instead of 1 and attention skips the other sequences' cells. Measured
    here: no difference at all; the bound allows rounding (the pair's bound, 1e-3 nats)."""
    prompts = _prompts(smollm2_cpp, 8)
    want = [_alone(smollm2_cpp, p) for p in prompts]
    pool = smollm2_cpp.open_pool(4096, 8)
    try:
        got = {s: [pool.prefill(s, p)] for s, p in enumerate(prompts)}
        toks = {s: [] for s in got}
        for _ in range(N):
            items = []
            for s in got:
                toks[s].append(int(got[s][-1].argmax()))
                items.append((s, toks[s][-1]))
            for row, lp in enumerate(pool.step(items)):
                got[items[row][0]].append(lp)
    finally:
        pool.close()
    worst = 0.0
    for s, (want_toks, want_lp) in enumerate(want):
        assert toks[s] == want_toks, s
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(got[s], want_lp)))
    assert worst <= 1e-3, worst


def test_the_cache_is_one_fixed_size_shared_by_all_and_reused(smollm2_cpp):
    pool = smollm2_cpp.open_pool(512, 4)
    try:
        assert pool.n_cells == 512
        for seq in range(4):  # four sequences of 400 tokens, one after another: dropping frees the cells
            pool.prefill(seq, [100 + seq] * 400)
            pool.drop(seq)
        pool.prefill(0, [100] * 400)
        with pytest.raises(LlamaCppError, match="full"):  # two at once do not fit
            pool.prefill(1, [101] * 400)
    finally:
        pool.close()
