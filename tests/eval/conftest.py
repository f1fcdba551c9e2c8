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
