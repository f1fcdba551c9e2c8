"""Sampling as named stages over log-probabilities; each returns a new tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from costeer.engine.config import SamplingConfig


def apply_temperature(logp: Tensor, temperature: float) -> Tensor:
    """[V] -> [V]; temperature > 0."""
    return torch.log_softmax(logp / temperature, dim=-1)


def apply_top_k(logp: Tensor, k: int) -> Tensor:
    """Keep the k most likely tokens.  [V] -> [V]"""
    if k <= 0 or k >= logp.shape[-1]:
        return logp
    kth = torch.topk(logp, k, dim=-1).values[..., -1:]
    return logp.masked_fill(logp < kth, float("-inf"))


def apply_top_p(logp: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches p.  [V] -> [V]"""
    if p >= 1.0:
        return logp
    sorted_logp, order = torch.sort(logp, descending=True, dim=-1)
    cum = torch.cumsum(sorted_logp.exp(), dim=-1)
    drop_sorted = (cum - sorted_logp.exp()) >= p  # mass before this token already reaches p
    drop_sorted[..., 0] = False  # the top token always stays: a p that is 0 in float32 would drop it too
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logp.masked_fill(drop, float("-inf"))


def sample(logp: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> int:
    """Pick the next token from log-probabilities [V] (greedy when temperature = 0)."""
    if cfg.greedy:
        return int(torch.argmax(logp))
    logp = apply_temperature(logp, cfg.temperature)
    logp = apply_top_k(logp, cfg.top_k)
    logp = apply_top_p(logp, cfg.top_p)
    probs = torch.softmax(logp, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)
