"""ArmoRM-8B reward scoring, the paper's preference-alignment metric (optional; needs a GPU-sized model).

Follows the ArmoRM model card (RLHFlow/ArmoRM-Llama3-8B-v0.1): a sequence-classification model with
``trust_remote_code`` whose output carries ``score`` (the gated preference score) and ``rewards`` (19 objectives).

The paper does not spell out which prompt it scores against. We score the answer against the with-context
prompt (``"<input>\\nYour answer should be as <preference> as possible"``), so that the reward measures how
well the answer meets the stated preference; pass ``use_preference_prompt=False`` to score against the bare
input instead. Nothing is downloaded unless ``allow_download=True``; tests never construct this class.
"""

from __future__ import annotations

from typing import Any

from .tasks import Example

ARMORM = "RLHFlow/ArmoRM-Llama3-8B-v0.1"


class ArmoRMScorer:
    def __init__(self, model_path: str = ARMORM, device: str | None = None, dtype: str = "bfloat16",
                 allow_download: bool = False, use_preference_prompt: bool = True) -> None:
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as err:  # pragma: no cover - torch/transformers are core dependencies
            raise RuntimeError("ArmoRM scoring needs torch and transformers") from err
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.use_preference_prompt = use_preference_prompt
        local_only = not allow_download
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=True, local_files_only=local_only)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_path, trust_remote_code=True, dtype=getattr(torch, dtype), local_files_only=local_only,
            ).to(self.device).eval()
        except OSError as err:
            raise FileNotFoundError(
                f"ArmoRM model not found at {model_path!r} (pass a local folder, or allow_download=True)"
            ) from err

    def _input_ids(self, prompt: str, response: str) -> Any:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        enc = self.tokenizer.apply_chat_template(messages, return_tensors="pt")
        # transformers >= 5 returns a BatchEncoding by default; older versions a tensor.
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        return ids.to(self.device)

    def score_text(self, prompt: str, response: str) -> dict[str, Any]:
        """{"score": gated preference score, "rewards": list of the 19 objective rewards}."""
        with self._torch.no_grad():
            out = self.model(self._input_ids(prompt, response))
        return {"score": float(out.score.float().cpu().item()),
                "rewards": [float(x) for x in out.rewards.float().cpu()[0]]}

    def score(self, example: Example, response: str) -> float:
        prompt = example.context_prompt if self.use_preference_prompt else example.query
        return self.score_text(prompt, response)["score"]
