"""The SLM pair run ahead: while a remote LLM computes its next distribution, the device runs the
SLM pair's forward for the same token (both depend only on the previous one) and builds the SLM's
reference for the LLM's tail; decode() then finds the pair already computed. Used by both kinds of
remote LLM source (client.py, engines.py).

With look-ahead rounds, each token the device takes from a tree costs one pair forward that no wait
hides. So, with a `Guess` (engine/loop.py: the method's own fusion with the SLM's no-context
distribution standing in for the LLM's, argmax), the WebSocket source fills the rest of a round
trip with guessed forwards (`run_guess`): the pair is fed the guessed next token, then the one
guessed after it, one token at a time, each with the same one-token forward over the same cache
as per-token decoding. When the device's choice equals the guess, the pair is already computed;
the first wrong guess rewinds all that were fed (the batch's `rewind`: llama.cpp removes the cells,
transformers crops the cache) and the chosen token is fed as usual. So every distribution the pair
gives is, bit for bit, the one per-token decoding computes; the guess decides only which forwards
run early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from costeer.engine.loop import Guess, SteeringSource
from costeer.engine.vocab import VocabMap


@dataclass
class Guesses:
    """Guessed pair forwards of a connection (run_guess): made, used (the device then chose the
    guess: a forward it needed, done while it waited) and undone (rewound: a guess, or one after
    it, was wrong)."""

    made: int = 0
    used: int = 0
    undone: int = 0

    @property
    def hit_rate(self) -> float | None:
        """Of the guesses judged so far, the share used (None before any was)."""
        judged = self.used + self.undone
        return self.used / judged if judged else None


@dataclass
class Pace:
    """Whether another guessed forward is worth starting while the device waits: the expected rest
    of the wait (the mean wait for a round's first frame, less the time waited so far) must cover
    what a wrong guess costs when the answer comes in the middle of its forward: a forward, times
    the share of guesses that miss. Until both are measured: yes (an arrived answer stops it anyway)."""

    wait_s: float | None = None  # mean wait from sending a round's tokens to its first frame
    forward_s: float | None = None  # mean guessed forward

    @staticmethod
    def _mean(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new  # recent rounds weigh most: the link drifts

    def waited(self, seconds: float) -> None:
        self.wait_s = self._mean(self.wait_s, seconds)

    def forwarded(self, seconds: float) -> None:
        self.forward_s = self._mean(self.forward_s, seconds)

    def worth(self, elapsed_s: float, hit_rate: float | None) -> bool:
        if self.wait_s is None or self.forward_s is None:
            return True
        miss = 1.0 - (hit_rate if hit_rate is not None else 0.5)
        return self.wait_s - elapsed_s >= self.forward_s * miss


class SteeringAhead:
    """The SLM pair as a SteeringSource whose forwards CloudSource runs ahead, while it
    waits for the cloud; decode() then gets the pair already computed. With `guess`, also the
    guessed forwards beyond (see the module docs); `counts` tallies them."""

    def __init__(self, inner: SteeringSource, vocab: VocabMap, llm_vocab_size: int, guess: Guess | None = None,
                 counts: Guesses | None = None):  # fmt: skip
        self.inner, self.vocab, self.V = inner, vocab, llm_vocab_size  # inner holds its prompts
        self.pair: Tensor | None = None
        self._ready_for = None  # ("start",) | ("advance", slm_id)
        self._to_slm: dict[int, int] | None = None
        self._ref: tuple[Tensor, Tensor] | None = None  # (pair it was built from, reference)
        # guessing needs a pair that can take its guesses back (LocalSteeringSource.rewind)
        self.guess = guess if hasattr(inner, "rewind") else None
        self.counts = counts if counts is not None else Guesses()
        self.history: list[int] = []  # aligned ids the pair was fed as chosen (the guess's fusion reads them)
        self.guessed: list[tuple[int, int, Tensor]] = []  # fed beyond them: (slm id, aligned id, pair after it)
        self._aligned_of: Tensor | None = None  # LLM id -> aligned id

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
        self.history, self.guessed = [], []  # a new batch: nothing fed yet
        self.pair, self._ready_for = self.inner.start(), ("start",)
        self.reference()

    def run_advance(self, llm_id: int) -> None:
        """Feed the chosen token, or take its guessed forward when it was the guess."""
        slm = self._slm_id(llm_id)
        if self.guess is not None:
            self.history.append(self._aligned(llm_id))
        if self.guessed and self.guessed[0][0] == slm:
            pair = self.guessed.pop(0)[2]
            self.counts.used += 1
        else:
            self._undo()
            pair = self.inner.advance(slm)
        self.pair, self._ready_for = pair, ("advance", slm)
        self.reference()

    def run_guess(self) -> bool:
        """Feed the pair the guessed token after the last it was fed -> whether it was (not without a
        guess, after a guessed stop, which nothing follows, or where it could not be taken back)."""
        if self.guess is None or self.pair is None or not self.inner.room_ahead(1):
            return False
        pair = self.guessed[-1][2] if self.guessed else self.pair
        stand_in = self._reference_of(pair) if self.guessed else self.reference()
        k = self.guess(stand_in, pair, self.history + [a for _, a, _ in self.guessed])
        if self.vocab.is_stop(k):
            return False
        slm = self.vocab.slm_token(k)
        self.guessed.append((slm, k, self.inner.advance(slm)))
        self.counts.made += 1
        return True

    def _undo(self) -> None:
        """Take back every guessed token the pair was fed."""
        if self.guessed:
            self.inner.rewind(len(self.guessed))
            self.counts.undone += len(self.guessed)
            self.guessed = []

    def _aligned(self, llm_id: int) -> int:
        if self.vocab.identity:
            return llm_id
        if self._aligned_of is None:
            self._aligned_of = self.vocab.llm_positions()
        return int(self._aligned_of[llm_id])

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
        if self._ref is None or self._ref[0] is not self.pair:
            self._ref = (self.pair, self._reference_of(self.pair))
        return self._ref[1]

    def _reference_of(self, pair: Tensor) -> Tensor:
        """reference() of any pair [2, V_slm] -> [V_llm]"""
        base = pair[0]
        if self.vocab.identity:
            ref = base[: self.V]
            if ref.shape[0] < self.V:
                ref = torch.cat([ref, torch.full((self.V - ref.shape[0],), float("-inf"))])
        else:
            ref = torch.full((self.V,), float("-inf"))
            ref[self.vocab.llm_index] = base[self.vocab.slm_index]
            stop = torch.logsumexp(base[self.vocab.slm_stop], dim=0) - math.log(len(self.vocab.llm_stop))
            ref[self.vocab.llm_stop] = stop
        return ref
