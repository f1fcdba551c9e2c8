"""A tiny LLM/SLM pair (llama + gemma3 on one BPE tokenizer) saved to folders, for the eval-runner tests."""

from __future__ import annotations

from pathlib import Path

from costeer.api import CoSteer
from costeer.engine.config import GenerationConfig, SamplingConfig
from costeer.engine.models import load_lm
from tests.tiny import bpe_tokenizer, gemma3, llama

CONFIG = GenerationConfig(sampling=SamplingConfig(max_new_tokens=8))


def _save(path: Path, model, tok) -> str:
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_pair(root: Path) -> dict[str, str]:
    tok = bpe_tokenizer()
    return {"llm": _save(root / "llm", llama(len(tok), seed=1), tok),
            "slm": _save(root / "slm", gemma3(len(tok), seed=2), tok)}


def load_pair(folders: dict[str, str], config: GenerationConfig = CONFIG) -> CoSteer:
    return CoSteer(load_lm(folders["llm"], "cpu"), load_lm(folders["slm"], "cpu"), config)


class CountingCoSteer:
    """Wraps a CoSteer and counts generate() calls per method (the runner only calls generate)."""

    def __init__(self, cs: CoSteer):
        self.cs = cs
        self.calls: list[tuple[str, str]] = []  # (method, query)

    def __getattr__(self, name):
        return getattr(self.cs, name)

    def generate(self, query, context=None, method="costeer", **kw):
        self.calls.append((str(getattr(method, "value", method)), query))
        return self.cs.generate(query, context, method, **kw)
