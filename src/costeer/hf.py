"""CoSteer inside Hugging Face's own `generate`: a transformers `LogitsProcessor`.

    proc = CoSteerLogitsProcessor("smollm2-135m-instruct", tokenizer, context=profile, method="costeer")
    inputs = proc.encode("Plan my weekend.")
    out = llm.generate(**inputs, logits_processor=[proc], max_new_tokens=64, do_sample=False)

`generate` runs the LLM; the processor runs the SLM pair (without / with the private context) and
returns the fused distribution in place of the LLM's scores. It reuses the engine's pieces: the prompts
(engine/prompts.py), the vocabulary alignment (engine/vocab.py) and the fusion pipeline of the method
(engine/fusion.py), so a greedy `generate` gives the tokens `CoSteer.generate` gives.

What it returns: the fused log-probabilities, normalised, written at the LLM ids of the aligned
vocabulary and −inf everywhere else (ids the SLM does not share, the LLM's padding rows past the
tokenizer). softmax of it is the fused policy, so argmax (greedy) and sampling at temperature 1 pick
from it exactly; transformers' temperature / top-k / top-p warpers run after custom processors and
shape it as they would the LLM's logits. Different tokenizers fuse on the intersection plus one STOP
entry (vocab.py); the STOP entry's mass goes to the LLM's likeliest stop id.

The SLM pair's KV caches live across calls, keyed by the LLM ids they have been fed: a call whose ids
extend those feeds only the new tokens (the next token of one `generate`, or a whole continuation when
a later `generate` resumes from an earlier output); ids that diverge are read again from their prompt.
The prompts are those `encode` made: the processor cannot tell the query from an arbitrary prompt, and
the private context must enter only the SLM's with-context prompt.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import BatchEncoding, LogitsProcessor

from costeer.engine.config import GenerationConfig, Method, SteeringConfig
from costeer.engine.methods import METHODS
from costeer.engine.fusion import FusionPipeline, fusion_pipeline
from costeer.engine.models import LM, from_transformers, load_lm, stop_ids
from costeer.engine.prompts import prompt_ids, user_message
from costeer.engine.vocab import VocabMap, shared_alignment, support_mask

_PROMPTS_KEPT = 16  # prompts `encode` remembers (a long-lived processor must not grow without bound)


@dataclass(frozen=True)
class _Prompt:
    """One prompt `encode` made: the LLM's ids, the SLM pair's two prompts, and the fusion to run."""

    llm: tuple[int, ...]
    slm: tuple[tuple[int, ...], tuple[int, ...]]  # (without context | matched reference, with context)
    fusion: FusionPipeline


@dataclass
class _PairState:
    """The SLM pair's decode batch and what it has read."""

    prompt: _Prompt
    batch: object  # LM.open(...) over the two SLM rows
    seen: list[int]  # LLM ids (prompt included) whose SLM counterparts the batch has been fed
    logp: Tensor  # [2, V_slm] the pair's next-token log-probabilities after `seen`


class CoSteerLogitsProcessor(LogitsProcessor):
    """Steer an LLM's `generate` with an on-device SLM and a private context (batch size 1).

    slm: a costeer `LM`, a model spec (`load_lm`: preset, folder, GGUF file, hub name) or a loaded
        transformers causal LM (then `slm_tokenizer` is its tokenizer).
    tokenizer: the LLM's tokenizer. eos_token_id: the LLM's generation eos
        (`llm.generation_config.eos_token_id`), joined to the tokenizer's own stop tokens.
    context: the private context; it enters only the SLM's with-context prompt.
    method: a steered method (`costeer`, `light`, the `costeer_*` variants).
    steering: the FTRL hyper-parameters and variant parameters (SteeringConfig); its `gate` is honoured.
    max_new_tokens: tokens the SLM pair reads after a prefill (llama.cpp sizes its context for it).
    """

    supports_continuous_batching = False

    def __init__(self, slm, tokenizer, context: str | None = None, method: Method | str = Method.costeer, *,
                 slm_tokenizer=None, eos_token_id: int | list[int] | None = None,
                 steering: SteeringConfig | None = None, min_shared_vocab: float | None = None,
                 device: str = "auto", max_new_tokens: int = 1024):  # fmt: skip
        self.method = _steered_method(method)
        if context is not None and not context.strip():
            raise ValueError("the context is empty")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.context, self.tokenizer, self.reserve = context, tokenizer, max_new_tokens
        self.steering = steering or SteeringConfig()
        self.slm = _as_lm(slm, slm_tokenizer, device)
        shared = GenerationConfig().min_shared_vocab if min_shared_vocab is None else min_shared_vocab
        self.vocab = shared_alignment(tokenizer, self.slm.tokenizer, len(tokenizer), self.slm.vocab_size,
                                      stop_ids(tokenizer, eos_token_id), self.slm.stop_ids, shared)  # fmt: skip
        self._positions = self.vocab.llm_positions()  # LLM id -> aligned position (-1: not shared)
        self._log_gate = math.log(self.steering.gate) if self.steering.gate is not None else math.inf
        self._prompts: OrderedDict[tuple[int, ...], _Prompt] = OrderedDict()
        self._state: _PairState | None = None

    @property
    def coefficient(self) -> float:
        """The delta's coefficient b of the method (the trust region's cap for `costeer_trust`)."""
        return self.steering.coefficient(self.method)

    # -- prompts ---------------------------------------------------------------------------

    def encode(self, query: str, *, context_message: str | None = None,
               reference_message: str | None = None) -> BatchEncoding:  # fmt: skip
        """The LLM's prompt for `query` (input_ids and attention_mask, [1, L]), as `CoSteer.generate` builds
        it; the SLM pair's prompts for it are remembered. context_message: the whole with-context user
        message instead of context + query; reference_message: for `costeer_matched`, what the SLM's
        without-context branch reads (CoSteer.stream documents both)."""
        if not query or not query.strip():
            raise ValueError("the query is empty")
        with_ctx = context_message or (user_message(query, self.context) if self.context else None)
        if not with_ctx or not with_ctx.strip():
            raise ValueError(f"method '{self.method.value}' needs a personal context")
        slm_tok = self.slm.tokenizer
        base = prompt_ids(slm_tok, reference_message) if reference_message and self.method.matched else None
        prompt = _Prompt(
            llm=tuple(prompt_ids(self.tokenizer, user_message(query))),
            slm=(tuple(base or prompt_ids(slm_tok, user_message(query))), tuple(prompt_ids(slm_tok, with_ctx))),
            fusion=self._fusion(with_ctx if base else None),
        )
        self._prompts[prompt.llm] = prompt
        self._prompts.move_to_end(prompt.llm)
        while len(self._prompts) > _PROMPTS_KEPT:
            self._prompts.popitem(last=False)
        ids = torch.tensor([prompt.llm], dtype=torch.long)
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tensor_type="pt")

    def _fusion(self, support_text: str | None) -> FusionPipeline:
        """The method's stages; the support rule only with a matched reference, as in CoSteer.stream."""
        support = None
        if support_text is not None and "support" in self.method.stages:
            support = support_mask(self.vocab, self.tokenizer, support_text).to(self.slm.device)
        return fusion_pipeline(self.method, self.steering, support)

    def _prompt_of(self, ids: list[int]) -> _Prompt:
        """The longest remembered prompt that `ids` starts with."""
        found = [p for key, p in self._prompts.items() if len(key) <= len(ids) and tuple(ids[: len(key)]) == key]
        if not found:
            raise ValueError("these input ids do not start with a prompt from CoSteerLogitsProcessor.encode(query): "
                             "the SLM's with-context prompt needs the query apart from the context")  # fmt: skip
        return max(found, key=lambda p: len(p.llm))

    # -- the processor ---------------------------------------------------------------------

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """input_ids [1, L] (prompt and tokens so far), scores [1, W] the LLM's logits -> [1, W] fused."""
        self._check(input_ids, scores)
        ids = input_ids[0].tolist()
        st = self._pair_for(ids)
        logp = torch.log_softmax(scores[0].float(), dim=-1).to(self.slm.device)  # [W]
        z = self.vocab.llm_view(logp)  # [K]
        gated = len(ids) > len(st.seen) and float(z.max()) >= self._log_gate  # the LLM is sure: no SLM pair
        if not gated:
            pair = self.vocab.slm_view(self._catch_up(ids))  # [2, K]
            z = st.prompt.fusion(z, pair[1], pair[0], self._history(ids, st.prompt))
        return self._to_llm_ids(z, logp).to(device=scores.device, dtype=scores.dtype).unsqueeze(0)

    def _check(self, input_ids: Tensor, scores: Tensor) -> None:
        if input_ids.shape[0] != 1 or scores.shape[0] != 1:
            raise ValueError(f"CoSteerLogitsProcessor steers one sequence at a time (batch size 1, no beams); "
                             f"got {input_ids.shape[0]} rows")  # fmt: skip
        needed = len(self._positions)  # every LLM id the alignment maps
        if scores.shape[-1] < needed:
            raise ValueError(f"the scores have {scores.shape[-1]} entries but the tokenizer needs {needed}: "
                             "pass the LLM's own tokenizer")  # fmt: skip

    def _pair_for(self, ids: list[int]) -> _PairState:
        """The pair state that `ids` extends; ids that diverge from what it has read start it again."""
        st = self._state
        if st is None or len(ids) < len(st.seen) or ids[: len(st.seen)] != st.seen:
            st = self._prefill(ids)
        return st

    def _catch_up(self, ids: list[int]) -> Tensor:
        """Feed the pair the tokens it has not read (one forward) -> [2, V_slm]."""
        st = self._state
        new = ids[len(st.seen) :]
        if new:
            slm_ids = self._slm_ids(new)
            if slm_ids is None:  # a token outside the shared vocabulary: read the text again
                return self._prefill(ids).logp
            st.logp = st.batch.advance(slm_ids * 2) if len(slm_ids) == 1 else st.batch.extend(slm_ids)
            st.seen = ids
        return st.logp

    def _prefill(self, ids: list[int]) -> _PairState:
        """Start the pair on its prompts and what `ids` holds after the LLM's prompt."""
        prompt = self._prompt_of(ids)
        after = ids[len(prompt.llm) :]
        tail = self._slm_ids(after)
        if tail is None:
            tail = self.slm.tokenizer(self.tokenizer.decode(after), add_special_tokens=False)["input_ids"]
        self.close()
        batch = self.slm.open([list(prompt.slm[0]) + tail, list(prompt.slm[1]) + tail], self.reserve)
        self._state = _PairState(prompt, batch, list(ids), batch.start())
        return self._state

    def _aligned(self, llm_ids: list[int]) -> Tensor:
        """LLM ids -> aligned positions, -1 where not shared.   [n] long"""
        t = torch.tensor(llm_ids, dtype=torch.long)
        inside = t < len(self._positions)
        return torch.where(inside, self._positions[t.clamp(max=len(self._positions) - 1)], -1)

    def _slm_ids(self, llm_ids: list[int]) -> list[int] | None:
        """The SLM's ids for these LLM tokens through the alignment; None if one is not shared."""
        k = self._aligned(llm_ids)
        if bool((k < 0).any()):
            return None
        return [self.vocab.slm_token(int(i)) for i in k]

    def _history(self, ids: list[int], prompt: _Prompt) -> list[int]:
        """Aligned ids after the prompt (what the repetition guard reads); unshared ones are left out."""
        k = self._aligned(ids[len(prompt.llm) :])
        return k[k >= 0].tolist()

    def _to_llm_ids(self, z: Tensor, logp: Tensor) -> Tensor:
        """Aligned log-probabilities [K] -> the LLM's ids [W], −inf where not aligned."""
        out = torch.full_like(logp, -math.inf)
        if self.vocab.identity:
            out[: self.vocab.size] = z
            return out
        out[self.vocab.llm_index.to(out.device)] = z[:-1]
        stops = self.vocab.llm_stop.to(out.device)
        out[stops[logp[stops].argmax()]] = z[-1]  # the STOP entry: the LLM's likeliest stop id
        return out

    def close(self) -> None:
        """Free the SLM pair's caches (the next call reads its prompt again)."""
        if self._state is not None:
            self._state.batch.close()
            self._state = None


def _steered_method(method: Method | str) -> Method:
    names = ", ".join(s.name for s in METHODS if s.steered)
    try:
        m = Method(method)
    except ValueError:
        raise ValueError(f"unknown method '{method}' (steered methods: {names})") from None
    if not m.steered:
        raise ValueError(f"method '{m.value}' does not steer: call generate without the processor "
                         f"(steered methods: {names})")  # fmt: skip
    return m


def _as_lm(slm, slm_tokenizer, device: str) -> LM:
    """A costeer LM, a model spec, or a loaded transformers model with its tokenizer."""
    if isinstance(slm, LM):
        return slm
    if isinstance(slm, str):
        return load_lm(slm, device)
    if slm_tokenizer is None:
        raise ValueError("a transformers SLM needs its tokenizer: pass slm_tokenizer=")
    return from_transformers(slm.eval(), slm_tokenizer)
