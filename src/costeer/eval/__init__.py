"""Evaluation harness: dataset adapters (tasks), metrics, LLM judge, ArmoRM reward, reports.

Model-free except the optional ArmoRM scorer, the embedding / reranker retrievers and the judge endpoint.
Run ``scripts/setup_wordnet.sh`` once for METEOR.
"""

from .tasks import PREFERENCES, TASKS, Example, load_task

__all__ = ["PREFERENCES", "TASKS", "Example", "load_task"]
