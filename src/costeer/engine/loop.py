"""The decode loop, written once, over two small interfaces (docs/architecture.md):

- a next-token source (the LLM side), built with its prompt: start() -> [V], advance(token_id) -> [V]
- a steering source (the SLM side, both branches), built with its two prompts: start() -> [2, V]
  (row 0: without context, row 1: with context), advance(token_id) -> [2, V],
  extend(token_ids) -> [2, V] (several tokens in one forward: catching up after gated steps)

and the LLM itself (`LLMSide`: an in-process `LM`, `device.CloudLLM`, `device.EngineLLM`), which
builds the next-token source for one generation. `CoSteer.stream` checks a request, builds a
`DecodePlan` (the sources, the vocabulary map, the fusion pipeline) and `decode` runs it.

Per token: fuse on the aligned vocabulary (a `FusionPipeline` of named stages, engine/fusion.py),
sample, advance both sources. The baselines are the same loop with the steering source switched off.
With a confidence gate, tokens where the LLM is already sure (max π_base ≥ gate) skip the SLM
pair; its caches catch up in one batched forward when steering resumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from costeer.engine.config import SamplingConfig
from costeer.engine.fusion import FusionPipeline
from costeer.engine.sampling import make_generator, sample
from costeer.engine.vocab import VocabMap

if TYPE_CHECKING:
    from costeer.engine.models import LM
    from costeer.engine.prefix_cache import PrefixPlan


class NextTokenSource(Protocol):
    def start(self) -> Tensor: ...
    def advance(self, token_id: int) -> Tensor: ...


class SteeringSource(Protocol):
    def start(self) -> Tensor: ...
    def advance(self, token_id: int) -> Tensor: ...
    def extend(self, token_ids: list[int]) -> Tensor: ...


class LLMSide(Protocol):
    """What CoSteer needs of its LLM: the tokenizer (prompts are the LLM's token ids), the width of
    its distributions, its stop ids, whether it is remote (it then sees only what crosses the wire:
    no private context), and `connect`, the next-token source of one generation. A remote LLM runs
    the steering source's forwards while it computes (device/ahead.py) and returns it wrapped; an
    in-process one returns it unchanged. `prefix`: the prompt's stable prefix for an in-process
    model's prefix cache (engine/prefix_cache.py); a remote LLM is never given one, as only prompts
    holding the private context have a prefix to keep. `guess`: the steered method's guess of its next
    token (`Guess`), for a remote LLM that runs the SLM pair ahead on it while it waits."""

    name: str
    tokenizer: object
    vocab_size: int
    stop_ids: frozenset[int]
    remote: bool

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def connect(self, prompt_ids: list[int], vocab: VocabMap, max_new_tokens: int,
                steering: SteeringSource | None = None,
                prefix: PrefixPlan | None = None,
                guess: Guess | None = None) -> tuple[NextTokenSource, SteeringSource | None]: ...  # fmt: skip


class _Local:
    """An in-process decode batch (either backend: `LM.open`) over its prompts, sized for max_new_tokens;
    `prefix`: the prompts' stable prefixes and the cache that keeps them (engine/prefix_cache.py)."""

    def __init__(self, lm: LM, prompts: list[list[int]], max_new_tokens: int = 1024,
                 prefix: PrefixPlan | None = None):  # fmt: skip
        self.lm, self.prompts, self.reserve = lm, [list(p) for p in prompts], max_new_tokens + 1
        self.prefix = prefix
        self.batch = None

    def _open(self) -> Tensor:
        self.close()
        self.batch = self.lm.open(self.prompts, self.reserve, self.prefix)
        return self.batch.start()

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = None


class LocalModelSource(_Local):
    """A next-token source backed by an in-process model."""

    def __init__(self, lm: LM, prompt_ids: list[int], max_new_tokens: int = 1024,
                 prefix: PrefixPlan | None = None):  # fmt: skip
        super().__init__(lm, [prompt_ids], max_new_tokens, prefix)

    def start(self) -> Tensor:
        return self._open()[0]

    def advance(self, token_id: int) -> Tensor:
        return self.batch.advance([token_id])[0]


class LocalSteeringSource(_Local):
    """Both SLM branches in ONE batched forward per step. prompts: (without context, with context)."""

    def __init__(self, lm: LM, prompts: tuple[list[int], list[int]], max_new_tokens: int = 1024,
                 prefix: PrefixPlan | None = None):  # fmt: skip
        super().__init__(lm, list(prompts), max_new_tokens, prefix)

    def start(self) -> Tensor:
        return self._open()

    def advance(self, token_id: int) -> Tensor:
        return self.batch.advance([token_id, token_id])

    def extend(self, token_ids: list[int]) -> Tensor:
        return self.batch.extend(token_ids)

    def rewind(self, n: int) -> None:
        """Forget the last n tokens advance() fed (guessed ones: device/ahead.py)."""
        self.batch.rewind(n)

    def room_ahead(self, n: int) -> bool:
        """Whether n more tokens fed from here could all be rewound."""
        return self.batch is not None and self.batch.room_ahead(n)


class SharedModel(_Local):
    """LLM and SLM are ONE model (e.g. the SmolLM2/SmolLM2 pair in one process): the LLM's
    sequence and the SLM pair's two are three rows of one decode batch, so each token costs one
    forward instead of two (llama.cpp pays a fixed cost per llama_decode call, ~5 ms of a
    135M model's 11 ms). Every row computes what it computes alone, so the tokens are those of
    separate sources. `.llm` is the next-token source, `.steering` the steering source; the
    loop must call llm.start/advance before steering.start/advance, as decode() does."""

    def __init__(self, lm: LM, llm_prompt: list[int], slm_prompts: tuple[list[int], list[int]],
                 max_new_tokens: int = 1024, prefix: PrefixPlan | None = None):  # fmt: skip
        # prefix: lengths for the three rows, the LLM's, then the SLM pair's
        super().__init__(lm, [llm_prompt, *slm_prompts], max_new_tokens, prefix)
        self.pair: Tensor | None = None  # [2, V] rows 1-2 of the last forward
        self.llm, self.steering = _SharedLLM(self), _SharedSteering(self)

    def start(self) -> Tensor:
        out = self._open()  # [3, V]
        self.pair = out[1:]
        return out[0]

    def advance(self, token_id: int) -> Tensor:
        out = self.batch.advance([token_id] * 3)
        self.pair = out[1:]
        return out[0]


class _SharedLLM:
    def __init__(self, shared: SharedModel):
        self.shared = shared

    def start(self) -> Tensor:
        return self.shared.start()

    def advance(self, token_id: int) -> Tensor:
        return self.shared.advance(token_id)

    def close(self) -> None:
        self.shared.close()


class _SharedSteering:
    """The pair rows of the shared batch, computed in the LLM's forward for the same token."""

    def __init__(self, shared: SharedModel):
        self.shared = shared

    def start(self) -> Tensor:
        return self.shared.pair

    def advance(self, token_id: int) -> Tensor:
        return self.shared.pair

    def extend(self, token_ids: list[int]) -> Tensor:
        return self.shared.pair


@dataclass(frozen=True)
class DecodePlan:
    """One generation, ready to run: its sources (each built with its prompts), the vocabulary map
    they are fused on, the fusion pipeline (with a steering source only) and the sampling options.
    `prompts` records what each branch reads (the sources already hold them)."""

    primary: NextTokenSource
    vocab: VocabMap
    sampling: SamplingConfig
    steering: SteeringSource | None = None
    fusion: FusionPipeline | None = None
    gate: float | None = None  # in (0, 1]: where the LLM's top probability reaches it, no steering
    prompts: dict[str, list[int]] = field(default_factory=dict)
    inspect: int = 0  # n > 0: attach an `Inspection` with n alternatives to each Step (after the timings)

    def __post_init__(self) -> None:
        if (self.steering is None) != (self.fusion is None):
            raise ValueError("a steering source goes with a fusion pipeline, and a pipeline with a steering source")

    def close(self) -> None:
        """Close the sources that hold resources (a decode batch, a cloud session)."""
        for source in (self.primary, self.steering):
            close = getattr(source, "close", None)
            if close is not None:
                close()


@dataclass(frozen=True)
class Inspection:
    """What steering did to one chosen token (DecodePlan.inspect = n, off by default): the shift of its
    log-probability and the n likeliest tokens before and after fusion, as (primary id, probability)."""

    shift: float  # log π_fused(token) − log π_llm(token), nats; 0 where no steering ran
    before: tuple[tuple[int, float], ...]  # the LLM's own top n (its aligned view, renormalised)
    after: tuple[tuple[int, float], ...]  # the fused policy's top n


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
    gated: bool = False  # the confidence gate skipped steering: the LLM's own distribution
    inspection: Inspection | None = None  # only when the plan's `inspect` asked for it


def decode(plan: DecodePlan) -> Iterator[Step]:
    """Yield chosen tokens until a stop token (yielded with stop=True) or max_new_tokens; the
    plan's sources are closed when the iteration ends, however it ends.

    Steered, each token is fused by the plan's pipeline, which sees the aligned ids chosen so far.
    With `gate`, where the LLM's top probability reaches it, take the LLM's distribution and do not
    run the SLM pair. With `inspect` = n > 0, each Step carries an `Inspection` (computed after the timings)."""
    try:
        yield from _decode(plan)
    finally:
        plan.close()


def _decode(plan: DecodePlan) -> Iterator[Step]:
    primary, steering, vocab, fusion, sampling = plan.primary, plan.steering, plan.vocab, plan.fusion, plan.sampling
    inspect = plan.inspect
    log_gate = math.log(plan.gate) if plan.gate is not None else math.inf
    history: list[int] = []  # aligned ids chosen so far
    pending: list[int] = []  # SLM ids the SLM pair has not been fed yet
    gen = make_generator(sampling.seed)
    clock = time.perf_counter
    t = clock()
    logp = primary.start()  # [V_llm]
    llm_s, t = clock() - t, clock()
    pair = steering.start() if steering else None  # [2, V_slm]
    slm_s = clock() - t
    for i in range(sampling.max_new_tokens):
        t = clock()
        z = z_llm = vocab.llm_view(logp)  # [K]
        gated = bool(pending) and float(z.max()) >= log_gate  # the LLM is sure: no SLM, no steering
        if pending and not gated:  # feed the SLM pair what it missed, in one forward
            pair = steering.advance(pending[0]) if len(pending) == 1 else steering.extend(pending)
            pending = []
            slm_s, t = slm_s + clock() - t, clock()
        if steering is not None and not gated:
            z = steer(fusion, vocab, z, pair, history)
        t_fused = clock()
        k = sample(z, sampling, gen)
        history.append(k)
        stop = vocab.is_stop(k)
        t_sampled = clock()
        seen = _inspect(z_llm, z, k, vocab, inspect) if inspect else None
        yield Step(i, k, vocab.llm_token(k), stop, llm_s, slm_s, t_fused - t, t_sampled - t_fused, gated, seen)
        if stop or i + 1 == sampling.max_new_tokens:
            return
        t = clock()
        logp = primary.advance(vocab.llm_token(k))
        llm_s, slm_s = clock() - t, 0.0
        if steering is not None:
            pending.append(vocab.slm_token(k))


def steer(fusion: FusionPipeline, vocab: VocabMap, z: Tensor, pair: Tensor, history: Sequence[int]) -> Tensor:
    """One steered step: the LLM's aligned view z [K] fused with the SLM pair [2, V_slm] (row 0
    without context, row 1 with) -> the fused log-probabilities [K]."""
    slm = vocab.slm_view(pair)  # [2, K]
    return fusion(z, slm[1], slm[0], history)


@dataclass(frozen=True)
class Guess:
    """The token a steered method would choose if the LLM's distribution were `stand_in` (a device's
    guess while the cloud computes the real one: device/ahead.py runs the SLM pair ahead on it).
    Only which forwards run ahead depends on it, never a chosen token."""

    fusion: FusionPipeline
    vocab: VocabMap

    def __call__(self, stand_in: Tensor, pair: Tensor, history: Sequence[int]) -> int:
        """stand_in [V_llm] log-probabilities, pair [2, V_slm], history: aligned ids -> the aligned id of the fused argmax"""
        return int(torch.argmax(steer(self.fusion, self.vocab, self.vocab.llm_view(stand_in), pair, history)))


def _inspect(z_llm: Tensor, z: Tensor, k: int, vocab: VocabMap, n: int) -> Inspection:
    """z_llm [K]: the LLM's aligned view (unnormalised across tokenizers); z [K]: what was sampled from."""
    before, after = torch.log_softmax(z_llm.float(), -1), torch.log_softmax(z.float(), -1)
    return Inspection(float(after[k] - before[k]), _top(before, vocab, n), _top(after, vocab, n))


def _top(logp: Tensor, vocab: VocabMap, n: int) -> tuple[tuple[int, float], ...]:
    values, ids = torch.topk(logp, min(n, logp.shape[-1]))
    return tuple((vocab.llm_token(int(i)), float(v.exp())) for v, i in zip(values, ids))
