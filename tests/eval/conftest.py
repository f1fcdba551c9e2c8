"""Shared fixtures for the evaluation-harness tests (fast, model-free)."""

from __future__ import annotations

from pathlib import Path

import pytest

# ../shared/datasets next to the repository root; tests using it skip when it is absent.
SHARED_DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


@pytest.fixture
def shared_file():
    def get(name: str) -> Path:
        path = SHARED_DATASETS / f"{name}.jsonl"
        if not path.is_file():
            pytest.skip(f"shared dataset {path} not present")
        return path

    return get


@pytest.fixture
def needs_wordnet():
    from costeer.eval.metrics import wordnet_available

    if not wordnet_available():
        pytest.skip("NLTK WordNet not installed: run scripts/setup_wordnet.sh (and set NLTK_DATA if not ~/nltk_data)")


@pytest.fixture(scope="module")
def cs(tmp_path_factory):
    """A tiny saved-and-reloaded LLM/SLM pair (one per test module)."""
    from tests.eval.tiny_pair import load_pair, save_pair

    return load_pair(save_pair(tmp_path_factory.mktemp("models")))


@pytest.fixture
def counting(cs):
    """The pair, counting its generate() calls (to check resume and caching)."""
    from tests.eval.tiny_pair import CountingCoSteer

    return CountingCoSteer(cs)
