"""The SLM pair run ahead: while a remote LLM computes its next distribution, the device runs the
SLM pair's forward for the same token (both depend only on the previous one) and builds the SLM's
reference for the LLM's tail; decode() then finds the pair already computed. Used by both kinds of
remote LLM source (client.py, engines.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from costeer.engine.loop import SteeringSource
from costeer.engine.vocab import VocabMap


class SteeringAhead:
    """The SLM pair as a SteeringSource whose forwards CloudSource runs ahead, while it
    waits for the cloud; decode() then gets the pair already computed."""

    def __init__(self, inner: SteeringSource, vocab: VocabMap, llm_vocab_size: int):
        self.inner, self.vocab, self.V = inner, vocab, llm_vocab_size  # inner holds its prompts
        self.pair: Tensor | None = None
        self._ready_for = None  # ("start",) | ("advance", slm_id)
        self._to_slm: dict[int, int] | None = None
        self._ref: tuple[Tensor, Tensor] | None = None  # (pair it was built from, reference)

    def _slm_id(self, llm_id: int) -> int:
        if self.vocab.identity:
            return llm_id
        if self._to_slm is None:
            self._to_slm = dict(zip(self.vocab.llm_index.tolist(), self.vocab.slm_index.tolist()))
            self._to_slm.update((int(i), int(self.vocab.slm_stop[0])) for i in self.vocab.llm_stop)
        return self._to_slm[llm_id]

    # run ahead (called by CloudSource while the cloud computes)
    # The reference is built here too, so that it is ready when the cloud's answer arrives:
    # across tokenizers it is a scatter into [V_llm] (0.3 ms at V = 262,144) that would
    # otherwise sit on the critical path between the DIST frame and the next TOKEN.
    def run_start(self) -> None:
        self.pair, self._ready_for = self.inner.start(), ("start",)
        self.reference()

    def run_advance(self, llm_id: int) -> None:
        slm = self._slm_id(llm_id)
        self.pair, self._ready_for = self.inner.advance(slm), ("advance", slm)
        self.reference()

    # SteeringSource
    def start(self) -> Tensor:
        if self._ready_for != ("start",):  # not run ahead (a source that starts it first runs it)
            self.run_start()
        self._ready_for = None
        return self.pair

    def advance(self, token_id: int) -> Tensor:
        if self._ready_for != ("advance", token_id):
            raise RuntimeError("the SLM pair is out of step with the cloud source")
        self._ready_for = None
        return self.pair

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def reference(self) -> Tensor:
        """The SLM's no-context log-probabilities on the LLM's vocabulary ([V_llm]; LLM ids with
        no SLM counterpart get -inf): the stand-in for the LLM's tail. Built once per pair."""
        if self._ref is not None and self._ref[0] is self.pair:
            return self._ref[1]
        base = self.pair[0]
        if self.vocab.identity:
            ref = base[: self.V]
            if ref.shape[0] < self.V:
                ref = torch.cat([ref, torch.full((self.V - ref.shape[0],), float("-inf"))])
        else:
            ref = torch.full((self.V,), float("-inf"))
            ref[self.vocab.llm_index] = base[self.vocab.slm_index]
            stop = torch.logsumexp(base[self.vocab.slm_stop], dim=0) - math.log(len(self.vocab.llm_stop))
            ref[self.vocab.llm_stop] = stop
        self._ref = (self.pair, ref)
        return ref
