"""ArmoRM path: guarded loading (never downloads) and output handling with a stand-in model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from costeer.eval.reward import ArmoRMScorer
from costeer.eval.retrieval import CrossEncoderRetriever
from costeer.eval.tasks import load_task, sample_path


def test_armorm_absent_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ArmoRM model not found"):
        ArmoRMScorer(str(tmp_path / "no-such-model"))


def test_reranker_absent_model_is_a_clear_error(tmp_path):
    pytest.importorskip("sentence_transformers")
    with pytest.raises(FileNotFoundError, match="reranker not found"):
        CrossEncoderRetriever(str(tmp_path / "no-such-reranker"))


@pytest.mark.parametrize("as_dict", [True, False])
def test_armorm_scores_the_preference_prompt(as_dict):
    torch = pytest.importorskip("torch")
    seen = {}

    class Tok:
        def apply_chat_template(self, messages, return_tensors):
            seen["messages"] = messages
            ids = torch.tensor([[1, 2, 3]])
            return {"input_ids": ids} if as_dict else ids

    def model(ids):
        return SimpleNamespace(score=torch.tensor([[0.125]]), rewards=torch.zeros(1, 19))

    scorer = ArmoRMScorer.__new__(ArmoRMScorer)  # skip loading 8B weights
    scorer._torch, scorer.device, scorer.tokenizer, scorer.model = torch, "cpu", Tok(), model
    scorer.use_preference_prompt = True
    ex = load_task("ultrachat", sample_path("ultrachat"), preference="concise")[0]
    assert scorer.score(ex, "Water them first.") == 0.125
    assert seen["messages"] == [
        {"role": "user", "content": ex.query + "\nYour answer should be as concise as possible"},
        {"role": "assistant", "content": "Water them first."},
    ]
    assert len(scorer.score_text("q", "a")["rewards"]) == 19
