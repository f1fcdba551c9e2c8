"""The decode loop, written once, over two small interfaces (see DESIGN.md):

- a next-token source (the LLM side): start(prompt_ids) -> [V], advance(token_id) -> [V]
- a steering source (the SLM side, both branches): start(base_ids, pers_ids) -> [2, V]
  (row 0: without context, row 1: with context), advance(token_id) -> [2, V]

Per token: fuse on the aligned vocabulary (a `FusionPipeline` of named stages, engine/fusion.py),
sample, advance both sources. The baselines are the same loop with the steering source switched off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from torch import Tensor

from costeer.engine.config import SamplingConfig
from costeer.engine.fusion import FusionPipeline, paper_pipeline
from costeer.engine.models import LM, DecodeBatch
from costeer.engine.sampling import make_generator, sample
from costeer.engine.vocab import VocabMap


class NextTokenSource(Protocol):
    def start(self, prompt_ids: list[int]) -> Tensor: ...
    def advance(self, token_id: int) -> Tensor: ...


class SteeringSource(Protocol):
    def start(self, base_ids: list[int], pers_ids: list[int]) -> Tensor: ...
    def advance(self, token_id: int) -> Tensor: ...


class LocalModelSource:
    """A next-token source backed by an in-process model."""

    def __init__(self, lm: LM):
        self.lm = lm
        self.batch: DecodeBatch | None = None

    def start(self, prompt_ids: list[int]) -> Tensor:
        self.batch = DecodeBatch(self.lm, [prompt_ids])
        return self.batch.start()[0]

    def advance(self, token_id: int) -> Tensor:
        return self.batch.advance([token_id])[0]


class LocalSteeringSource:
    """Both SLM branches in ONE batched forward per step (left-padded, masked)."""

    def __init__(self, lm: LM):
        self.lm = lm
        self.batch: DecodeBatch | None = None

    def start(self, base_ids: list[int], pers_ids: list[int]) -> Tensor:
        self.batch = DecodeBatch(self.lm, [base_ids, pers_ids])
        return self.batch.start()

    def advance(self, token_id: int) -> Tensor:
        return self.batch.advance([token_id, token_id])


@dataclass(frozen=True)
class Step:
    """One chosen token. Seconds spent on the forwards that produced its distributions
    (the prompt prefill for the first token), on fusion and on sampling."""

    index: int
    aligned_id: int
    token_id: int  # in the primary model's vocabulary (the LLM for steered methods)
    stop: bool
    llm_s: float
    slm_s: float
    fusion_s: float
    sample_s: float


def decode(
    primary: NextTokenSource,
    primary_prompt: list[int],
    vocab: VocabMap,
    sampling: SamplingConfig,
    steering: SteeringSource | None = None,
    slm_prompts: tuple[list[int], list[int]] | None = None,
    b: float = 0.0,
    fusion: FusionPipeline | None = None,
) -> Iterator[Step]:
    """Yield chosen tokens until a stop token (yielded with stop=True) or max_new_tokens.

    Steered, each token is fused by `fusion` (default: the paper's update with coefficient b), which
    sees the aligned ids chosen so far."""
    fusion = fusion or paper_pipeline(b)
    history: list[int] = []  # aligned ids chosen so far
    gen = make_generator(sampling.seed)
    clock = time.perf_counter
    t = clock()
    logp = primary.start(primary_prompt)  # [V_llm]
    llm_s, t = clock() - t, clock()
    pair = steering.start(*slm_prompts) if steering else None  # [2, V_slm]
    slm_s = clock() - t
    for i in range(sampling.max_new_tokens):
        t = clock()
        z = vocab.llm_view(logp)  # [K]
        if pair is not None:
            slm = vocab.slm_view(pair)  # [2, K]
            z = fusion(z, slm[1], slm[0], history)
        t_fused = clock()
        k = sample(z, sampling, gen)
        history.append(k)
        stop = vocab.is_stop(k)
        t_sampled = clock()
        yield Step(i, k, vocab.llm_token(k), stop, llm_s, slm_s, t_fused - t, t_sampled - t_fused)
        if stop or i + 1 == sampling.max_new_tokens:
            return
        t = clock()
        logp = primary.advance(vocab.llm_token(k))
        llm_s, t = clock() - t, clock()
        if steering is not None:
            pair = steering.advance(vocab.slm_token(k))
        slm_s = clock() - t
