"""Metrics on fixed inputs: known ROUGE/METEOR values, proxies, degeneration, personal-detail recall."""

from __future__ import annotations

import pytest

from costeer.eval import metrics as M

PAIRS = [
    # (prediction, reference, rouge1 F1, rougeL F1, METEOR) - computed once with rouge-score 0.1.2 /
    # NLTK 3.10 on WordNet 3.0 and pinned here.
    ("The cat sat on the mat.", "The cat sat on the mat.", 1.0, 1.0, 0.9985422740524781),
    ("A cat was sitting on the rug.", "The cat sat on the mat.", 0.4615384615384615, 0.4615384615384615,
     0.4445422535211268),
    ("The quick brown fox jumps over the lazy dog.", "A fast brown fox leaped over a lazy dog.",
     0.5555555555555556, 0.5555555555555556, 0.7937500000000002),
    ("Traffic signs are classified using prototypes instead of photos.",
     "Traffic sign classification is trained with prototypes rather than photographs.",
     0.3157894736842105, 0.3157894736842105, 0.5160550458715595),
]


@pytest.mark.parametrize("pred, ref, r1, rl, _met", PAIRS)
def test_rouge_known_values(pred, ref, r1, rl, _met):
    s = M.rouge(pred, ref)
    assert s["rouge1"] == pytest.approx(r1, abs=1e-4)
    assert s["rougeL"] == pytest.approx(rl, abs=1e-4)


def test_rouge_uses_the_stemmer():
    assert M.rouge("The dogs were running", "the dog was run")["rouge1"] > 0.7


@pytest.mark.parametrize("pred, ref, _r1, _rl, met", PAIRS)
def test_meteor_known_values(needs_wordnet, pred, ref, _r1, _rl, met):
    assert M.meteor(pred, ref) == pytest.approx(met, abs=1e-4)


def test_meteor_identical_and_empty(needs_wordnet):
    assert M.meteor("a b c d e", "a b c d e") > 0.99
    assert M.meteor("", "the reference") == 0.0  # an empty answer scores 0, it is not skipped


def test_meteor_without_wordnet_raises_with_the_setup_hint(monkeypatch):
    import nltk

    M.ensure_wordnet.cache_clear()

    def not_found(*_a, **_k):
        raise LookupError("Resource wordnet not found")

    monkeypatch.setattr(nltk.data, "find", not_found)
    try:
        with pytest.raises(M.WordNetMissingError, match="setup_wordnet.sh"):
            M.meteor("a", "a")
        assert not M.wordnet_available()
    finally:
        M.ensure_wordnet.cache_clear()


def test_tokenizer_is_offline_and_simple():
    assert M.tokenize("It's a well-known fact, isn't it?") == ["it's", "a", "well-known", "fact", ",", "isn't", "it", "?"]
    assert M.words("Hello, World!") == ["hello", "world"]


def test_proxies():
    assert M.length_words("One two, three.") == 3
    assert M.sentiment("I love this wonderful, happy day!") > 0.5
    assert M.sentiment("This is terrible and I hate it.") < -0.5
    easy = M.readability("The cat sat. The dog ran. We had fun.")
    hard = M.readability("Notwithstanding considerable institutional heterogeneity, comprehensive "
                         "interdisciplinary evaluation methodologies remain insufficiently standardized.")
    assert easy > 80 > hard
    assert M.readability("") == 0.0


def test_distinct_n():
    assert M.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert M.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert M.distinct_n([], 2) == 0.0


def test_degeneration():
    loop = "I am happy. I am happy. I am happy. I am happy."
    fine = "Plants need water, light and a little patience; ask a neighbour to help while you travel."
    assert M.has_repetition_loop(loop)
    assert not M.has_repetition_loop(fine)
    assert not M.has_repetition_loop("This is very very very good advice.")  # short emphatic repeat
    assert M.repeated_ngram_ratio("a b c d a b c d", 4) == pytest.approx(1 / 5)
    assert M.repeated_ngram_ratio(fine, 4) == 0.0
    d = M.degeneration([loop, fine])
    assert d["degenerate"] == 0.5
    assert 0 < d["rep4"] < 1


def test_personal_detail_recall_hand_made():
    context = "Name: Priya. Keeps bees. Rents allotment plot 14 at Meanwood. Owns a spare wheelbarrow."
    query = "Invite neighbours to the garden workday at the allotment."
    # Profile words (stemmed): priya, keep, bee, rent, plot, meanwood, own, spare, wheelbarrow, name
    # ("allotment" is in the query, "a", "at", "the" are stop words, "14" is not alphabetic).
    prof = M.profile_words(context, query)
    assert prof == {"name", "priya", "keep", "bee", "rent", "plot", "meanwood", "own", "spare", "wheelbarrow"}
    response = "Join me at Meanwood! I can lend my spare wheelbarrow for the workday."
    r = M.personal_detail_recall(response, context, query)
    assert r["detail_recall"] == pytest.approx(3 / 10)  # meanwood, spare, wheelbarrow
    # response content words: join, meanwood, lend, spare, wheelbarrow, workday -> 3 of 6 are profile words
    assert r["detail_precision"] == pytest.approx(3 / 6)
    assert M.personal_detail_recall("", context, query) == {"detail_recall": 0.0, "detail_precision": 0.0}
