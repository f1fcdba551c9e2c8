"""Look-ahead trees in the sequence pools (the cloud's sessions), both backends: every node's
distribution is, bit for bit, the one the step it stands for gives; keeping a path (commit), into
the main chain or a branch, leaves the sequence exactly as the steps would have (llama.cpp feeds a
kept branch leaf again: commit returns its token); dropping frees the tree. llama.cpp runs on the real
SmolLM2 past 256 cached tokens, where the kernels round by batch size and cell layout."""

import pytest
import torch

from tests.tiny import bpe_tokenizer, llama, make_lm


@pytest.fixture(scope="module")
def tiny():
    tok = bpe_tokenizer()
    return make_lm("tiny-llm", llama(len(tok), seed=1), tok)


def per_token(lm, prompt, tokens):
    """[V] after the prompt and after each of `tokens`, one step at a time."""
    pool = lm.open_pool(4096, 4)
    try:
        out = [pool.prefill(0, prompt).clone()]
        for t in tokens:
            out.append(pool.step([(0, t)])[0].clone())
        return out
    finally:
        pool.close()


def check_tree(lm, prompt):
    """A tree with branches at the root and at level 1 (on transformers a branch's own child too):
    nodes equal steps; commit into the main chain and into a branch both go on exactly."""
    greedy, ref = [], per_token(lm, prompt, [])
    x = ref[0]
    for _ in range(5):  # the greedy continuation and its distributions
        greedy.append(int(ref[-1].argmax()))
        ref = per_token(lm, prompt, greedy)
    alt = int(x.topk(2).indices[1])
    pool = lm.open_pool(4096, 4)
    deep = pool.extends_branches
    try:
        root = pool.prefill(0, prompt)
        assert torch.equal(root, ref[0])
        l1 = pool.grow([(0, 0, greedy[0]), (0, 0, alt)])  # nodes 1, 2
        l2 = pool.grow([(0, 1, greedy[1]), (0, 1, 7)] + ([(0, 2, 5)] if deep else []))  # nodes 3, 4 (, 5)
        l3 = pool.grow([(0, 3, greedy[2])])  # node 5 (6)
        assert torch.equal(l1[0], ref[1]) and torch.equal(l2[0], ref[2]) and torch.equal(l3[0], ref[3])
        assert torch.equal(l1[1], per_token(lm, prompt, [alt])[1])
        assert torch.equal(l2[1], per_token(lm, prompt, [greedy[0], 7])[2])
        if deep:
            assert torch.equal(l2[2], per_token(lm, prompt, [alt, 5])[2])
        assert pool.commit(0, 6 if deep else 5) == []  # the main chain, three deep
        assert torch.equal(pool.step([(0, greedy[3])])[0], ref[4])
        g = pool.grow([(0, 0, greedy[4]), (0, 0, 9)])  # a new round; keep its branch
        for t in pool.commit(0, 2):  # llama.cpp: the leaf's token, fed again
            pool.step([(0, t)])
        after = pool.step([(0, 11)])[0]
        want = per_token(lm, prompt, greedy[:4] + [9, 11])
        assert torch.equal(g[1], want[5]) and torch.equal(after, want[6])
        pool.drop(0)
        assert not pool.trees
    finally:
        pool.close()


def check_stopped_level(lm, prompt):
    """A level whose sequence stops partway (its device left the round): the rows still to compute are
    not (NaN), those computed are the steps they stand for, and keeping a path of the levels before
    leaves the sequence exactly as the steps would have."""
    greedy = []
    for _ in range(2):
        greedy.append(int(per_token(lm, prompt, greedy)[-1].argmax()))
    ref = per_token(lm, prompt, greedy)
    asked = []
    stop = lambda seq: asked.append(seq) or len(asked) > 2  # noqa: E731 - stops before the third forward or row
    pool = lm.open_pool(4096, 4)
    try:
        pool.prefill(0, prompt)
        pool.grow([(0, 0, greedy[0])])  # node 1
        level = pool.grow([(0, 1, greedy[1]), (0, 1, 7), (0, 1, 8)], stop=stop)
        assert torch.equal(level[1], per_token(lm, prompt, [greedy[0], 7])[2])  # computed before the stop
        assert torch.isnan(level[2]).all()  # never computed
        if not pool.extends_branches:  # llama.cpp decodes the main chain's node after the leaves: skipped too
            assert torch.isnan(level[0]).all()
        assert pool.commit(0, 1) == []
        assert torch.equal(pool.step([(0, greedy[1])])[0], ref[2])
    finally:
        pool.close()


def test_transformers_tree_nodes_are_the_steps_they_stand_for(tiny):
    check_tree(tiny, list(range(5, 40)))
    check_stopped_level(tiny, list(range(5, 40)))


def test_commit_without_a_tree_and_a_stray_node_are_refused(tiny):
    pool = tiny.open_pool(4096, 4)
    pool.prefill(0, [5, 6, 7])
    pool.commit(0, 0)  # nothing grown: nothing to do
    with pytest.raises(ValueError, match="never grown"):
        pool.commit(0, 3)
    pool.close()


@pytest.mark.real
def test_llamacpp_tree_nodes_are_the_steps_they_stand_for(smollm2_cpp):
    text = "The quick brown fox jumps over the lazy dog near the river bank on a sunny day. " * 30
    prompt = smollm2_cpp.tokenizer(text)["input_ids"][:300]
    check_tree(smollm2_cpp, prompt)
    check_stopped_level(smollm2_cpp, prompt)
    pool = smollm2_cpp.open_pool(1024, 4)
    try:
        pool.prefill(0, prompt[:20])
        pool.grow([(0, 0, 5), (0, 0, 6)])
        with pytest.raises(ValueError, match="only the main chain"):
            pool.grow([(0, 2, 7)])  # a branch leaf takes no children on llama.cpp
    finally:
        pool.close()
