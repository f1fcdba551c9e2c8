"""Vocabulary alignment: identity for one tokenizer, decoded-string intersection for two."""

import pytest
import torch

from costeer.engine.vocab import IncompatibleVocabularies, align_vocabularies, support_mask, token_strings
from tests.tiny import bpe_tokenizer, disjoint_tokenizer, sp_tokenizer


def _align(a, b, va=None, vb=None, **kw):
    stops = lambda t: frozenset({t.eos_token_id})  # noqa: E731
    return align_vocabularies(a, b, va or len(a), vb or len(b), stops(a), stops(b), **kw)


def test_same_tokenizer_is_identity_cut_to_the_smaller_logits():
    tok = bpe_tokenizer()
    vm = _align(tok, tok, va=len(tok) + 64, vb=len(tok))
    assert vm.identity and vm.size == len(tok)
    x = torch.randn(2, len(tok) + 64)
    assert vm.llm_view(x).shape == (2, len(tok))
    assert vm.is_stop(tok.eos_token_id) and not vm.is_stop(5)
    assert vm.llm_token(17) == vm.slm_token(17) == 17


def test_metaspace_tokens_keep_their_leading_space():
    # SentencePiece's decoder drops the leading space of a lone first token; the anchor keeps it.
    sp = sp_tokenizer()
    strings = token_strings(sp)
    assert strings[sp.convert_tokens_to_ids("▁the")] == " the"
    assert strings[sp.eos_token_id] is None


def test_different_tokenizers_meet_on_decoded_strings():
    bpe, sp = bpe_tokenizer(), sp_tokenizer()
    vm = _align(bpe, sp, min_shared=0.1)
    assert not vm.identity
    a_strings, b_strings = token_strings(bpe), token_strings(sp)
    for k in range(vm.size - 1):
        assert a_strings[vm.llm_token(k)] == b_strings[vm.slm_token(k)]
    # Ġthe and ▁the are the same text, so they are one aligned token
    the_a, the_b = bpe.convert_tokens_to_ids("Ġthe"), sp.convert_tokens_to_ids("▁the")
    k = vm.llm_index.tolist().index(the_a)
    assert vm.slm_token(k) == the_b
    # the last entry is STOP, mapped explicitly to each side's end-of-sequence token
    assert vm.is_stop(vm.size - 1) and vm.stop_index == vm.size - 1
    assert vm.llm_token(vm.stop_index) == bpe.eos_token_id and vm.slm_token(vm.stop_index) == sp.eos_token_id


def test_views_gather_and_pool_the_stop_mass():
    bpe, sp = bpe_tokenizer(), sp_tokenizer()
    vm = align_vocabularies(bpe, sp, len(bpe), len(sp), frozenset({0, 1}), frozenset({sp.eos_token_id}), 0.1)
    lp = torch.log_softmax(torch.randn(len(bpe), dtype=torch.float64), -1)
    view = vm.llm_view(lp)
    assert view.shape == (vm.size,)
    assert torch.equal(view[:-1], lp[vm.llm_index])
    assert view[-1].item() == pytest.approx(torch.logsumexp(lp[[0, 1]], 0).item())
    batched = vm.slm_view(torch.randn(2, len(sp)))
    assert batched.shape == (2, vm.size)


def test_too_small_an_intersection_is_refused():
    with pytest.raises(IncompatibleVocabularies, match="share"):
        _align(bpe_tokenizer(), disjoint_tokenizer())


@pytest.mark.parametrize("cross", [False, True])
def test_the_support_is_the_context_tokens_with_and_without_a_leading_space(cross):
    a = bpe_tokenizer()
    b = sp_tokenizer() if cross else a
    vm = _align(a, b, min_shared=0.1)
    text = "my dog\nBiscuit likes Seattle"
    mask = support_mask(vm, a, text)
    assert mask.dtype == torch.bool and mask.shape == (vm.size,)
    llm_ids = [vm.llm_token(k) for k in mask.nonzero().flatten().tolist() if not vm.is_stop(k)]
    for piece in ("Biscuit", " Biscuit", " Seattle", " dog"):
        ids = a(piece, add_special_tokens=False)["input_ids"]
        shared = [i for i in ids if i in set(vm.llm_index.tolist())] if cross else ids
        assert shared and set(shared) <= set(llm_ids), piece
    assert all(mask[k] for k in range(vm.size) if vm.is_stop(k))  # the stop entry: a context may end the answer
    other = a(" park quick fox", add_special_tokens=False)["input_ids"]
    assert not set(other) & set(llm_ids)
    assert mask.sum() < vm.size // 2


def test_a_pair_of_loaded_tokenizers_is_aligned_once(monkeypatch):
    """A new CoSteer over models already loaded (a fresh prefix cache, another request) reuses the
    alignment: across tokenizers it took 1.9 s on Gemma-3 / SmolLM2, paid again by every new object."""
    from costeer.engine import vocab as vocab_module
    from costeer.engine.vocab import shared_alignment

    calls = []
    real = vocab_module.align_vocabularies
    monkeypatch.setattr(vocab_module, "align_vocabularies", lambda *a, **k: calls.append(a) or real(*a, **k))
    vocab_module._aligned.cache_clear()
    bpe, sp = bpe_tokenizer(), sp_tokenizer()
    args = (len(bpe), len(sp), {bpe.eos_token_id}, [sp.eos_token_id], 0.1)
    first = shared_alignment(bpe, sp, *args)
    assert shared_alignment(bpe, sp, *args) is first and len(calls) == 1
    import copy

    other = copy.deepcopy(bpe)  # another tokenizer object (another loaded model): aligned on its own
    assert shared_alignment(other, sp, *args) is not first and len(calls) == 2
    assert shared_alignment(bpe, sp, *args[:-1], 0.2) is not first  # another threshold: another map
