"""Offline evaluation metrics.

* Overlap with a reference (LongLaMP, as in the paper): ROUGE-1 / ROUGE-L F1 (``rouge-score``, Porter stemmer)
  and METEOR (NLTK, needs WordNet: run ``scripts/setup_wordnet.sh``; never silently skipped).
* Preference proxies: length, VADER sentiment, Flesch reading ease, distinct-n, degeneration.
* CoGenesis personal-detail recall: how much of the user's private vocabulary the answer uses.
* ArmoRM-8B reward (the paper's preference metric) and the LLM-as-judge live in :mod:`costeer.eval.reward`
  and :mod:`costeer.eval.judge`.

Heavy libraries are imported lazily so importing this module stays cheap.
All per-text functions return plain floats; corpus functions take lists.
"""

from __future__ import annotations

import re
from functools import lru_cache
from statistics import fmean
from typing import Sequence

SETUP_HINT = "run scripts/setup_wordnet.sh [DIR] (and export NLTK_DATA=DIR when DIR is not ~/nltk_data)"


class WordNetMissingError(RuntimeError):
    """METEOR was asked for but NLTK cannot find WordNet."""


# ------------------------------------------------------------------------------------------ tokenisation

# Words (with inner apostrophes/hyphens) or single punctuation marks. A regex instead of NLTK's punkt:
# punkt needs a data download, and METEOR only needs word boundaries.
_TOKEN = re.compile(r"\w+(?:['’\-]\w+)*|[^\w\s]")
_WORD = re.compile(r"\w+(?:['’\-]\w+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return _TOKEN.findall(text.lower())


def words(text: str) -> list[str]:
    """Lower-cased word tokens (no punctuation)."""
    return _WORD.findall(text.lower())


# ------------------------------------------------------------------------------------------ ROUGE / METEOR


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F1 of one prediction against one reference (0..1)."""
    s = _rouge_scorer().score(reference, prediction)  # rouge-score takes (target, prediction)
    return {"rouge1": s["rouge1"].fmeasure, "rougeL": s["rougeL"].fmeasure}


def wordnet_available() -> bool:
    try:
        ensure_wordnet()
    except WordNetMissingError:
        return False
    return True


@lru_cache(maxsize=1)
def ensure_wordnet():
    """The loaded WordNet reader, or a clear error naming the setup script."""
    import nltk
    from nltk.corpus import wordnet

    try:
        nltk.data.find("corpora/wordnet")
        wordnet.ensure_loaded()
    except (LookupError, OSError, AssertionError) as err:
        raise WordNetMissingError(f"METEOR needs NLTK's WordNet, which was not found: {SETUP_HINT}") from err
    return wordnet


def meteor(prediction: str, reference: str) -> float:
    """NLTK METEOR (default parameters) on regex-tokenised text. Raises WordNetMissingError without WordNet."""
    from nltk.translate.meteor_score import meteor_score

    wn = ensure_wordnet()
    return float(meteor_score([tokenize(reference)], tokenize(prediction), wordnet=wn))


# ------------------------------------------------------------------------------------------ preference proxies


def length_words(text: str) -> int:
    return len(words(text))


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound polarity in [-1, 1] (a proxy for "uplifting")."""
    return float(_vader().polarity_scores(text)["compound"])


def readability(text: str) -> float:
    """Flesch reading ease (higher = easier); 0.0 for empty text, where it is undefined."""
    import textstat

    return float(textstat.flesch_reading_ease(text)) if text.strip() else 0.0


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus distinct-n: unique n-grams / all n-grams over all texts (Li et al., 2016)."""
    grams = [g for t in texts for g in _ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_ratio(text: str, n: int = 4) -> float:
    """Share of the text's n-grams that repeat an earlier one (0 = no repetition)."""
    grams = _ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def has_repetition_loop(text: str, min_copies: int = 3, min_span: int = 12, max_period: int = 64) -> bool:
    """True when some unit of 1..max_period words repeats back-to-back ≥ min_copies times over ≥ min_span words.

    This is the typical greedy-decoding failure ("I am happy. I am happy. I am happy."); the span floor keeps
    emphatic short repeats ("very very very") from counting.
    """
    toks = words(text)
    for p in range(1, min(max_period, len(toks) // min_copies) + 1):
        run = 0  # consecutive positions i with toks[i] == toks[i + p]
        for i in range(len(toks) - p):
            run = run + 1 if toks[i] == toks[i + p] else 0
            # run matches + one period = a periodic stretch of run + p words, i.e. (run + p) / p copies
            if run + p >= max(min_copies * p, min_span):
                return True
    return False


def degeneration(texts: Sequence[str]) -> dict[str, float]:
    """Share of texts with a repetition loop, and the mean repeated-4-gram ratio."""
    if not texts:
        return {"degenerate": 0.0, "rep4": 0.0}
    return {
        "degenerate": fmean(has_repetition_loop(t) for t in texts),
        "rep4": fmean(repeated_ngram_ratio(t, 4) for t in texts),
    }


# ------------------------------------------------------------------------------------------ personal detail recall

# A fixed English stop-word list (NLTK's list needs a data download). Function words only, so that
# content words that happen to be frequent still count as personal details.
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are aren't as at be because been before being
    below between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during
    each either etc even ever every few for from further get gets got had hadn't has hasn't have haven't having he
    he'd he'll he's her here here's hers herself him himself his how how's however i i'd i'll i'm i've if in into is
    isn't it it's its itself just let's like may me might more most much must mustn't my myself neither no nor not
    now of off on once one only or other ought our ours ourselves out over own per quite rather really same shall
    shan't she she'd she'll she's should shouldn't since so some such than that that's the their theirs them
    themselves then there there's these they they'd they'll they're they've this those though through thus to too
    under until up upon us very via was wasn't we we'd we'll we're we've were weren't what what's whatever when
    when's where where's whether which while who who's whom whose why why's will with within without won't would
    wouldn't yet you you'd you'll you're you've your yours yourself yourselves""".split()
)


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer  # pure code, no NLTK data needed

    return PorterStemmer()


def content_words(text: str) -> set[str]:
    """Stemmed, lower-cased content words: alphabetic, ≥ 3 letters, not stop words."""
    stem = _stemmer().stem
    return {stem(w) for w in words(text) if w.isalpha() and len(w) >= 3 and w not in STOPWORDS}


def profile_words(context: str, query: str) -> set[str]:
    """Content words that only the private context holds (absent from the public query)."""
    return content_words(context) - content_words(query)


def personal_detail_recall(response: str, context: str, query: str) -> dict[str, float]:
    """recall: share of profile words the response uses; precision: share of its content words that are profile words.

    Counted over word types (not tokens) so that long answers are not rewarded for repeating one detail.
    """
    prof = profile_words(context, query)
    resp = content_words(response)
    hit = prof & resp
    return {
        "detail_recall": len(hit) / len(prof) if prof else 0.0,
        "detail_precision": len(hit) / len(resp) if resp else 0.0,
    }


# Re-exported so that every metric is reachable from this module; both import their heavy parts lazily.
from .judge import JudgeClient, build_prompt, parse_rating  # noqa: E402
from .reward import ArmoRMScorer  # noqa: E402

__all__ = [
    "ArmoRMScorer", "JudgeClient", "WordNetMissingError", "build_prompt", "content_words", "degeneration",
    "distinct_n", "ensure_wordnet", "has_repetition_loop", "length_words", "meteor", "parse_rating",
    "personal_detail_recall", "profile_words", "readability", "repeated_ngram_ratio", "rouge", "sentiment",
    "tokenize", "wordnet_available", "words",
]
