"""Python API: one object built from (llm, slm, config).

    from costeer import CoSteer
    cs = CoSteer.load("smollm2-135m-instruct", "smollm2-135m-instruct")
    out = cs.generate("Plan my weekend.", context="I live in Lisbon and surf.", method="costeer")
    print(out.text)
    for chunk in cs.stream("Plan my weekend.", context=..., method="costeer"):
        print(chunk.text, end="")
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator

from costeer.engine.config import GenerationConfig, Method, SamplingConfig, SteeringConfig
from costeer.engine.fusion import fusion_pipeline
from costeer.engine.loop import DecodePlan, Guess, LLMSide, LocalSteeringSource, SharedModel, Step, decode
from costeer.engine.methods import MethodSpec
from costeer.engine.models import LM, load_lm
from costeer.engine.prefix_cache import PrefixCache, PrefixPlan
from costeer.engine.prompts import (Messages, chat_ids, check_text, conversation, first_user_turn, stable_prefix_len,
                                    with_context)
from costeer.engine.vocab import VocabMap, shared_alignment, support_mask
from costeer.errors import CoSteerError

# The SLM's public prompt keeps its chat template's head (SmolLM2's default system prompt and role markers:
# 24 tokens) when the head has at least MIN_HEAD_TOKENS (a bare role marker is not worth an entry) and the
# prompt fewer than HEAD_PROMPT_BELOW. Below that, one llama.cpp forward takes flash attention's row-by-row
# path, split or not, and SmolLM2's Q4_1 weights compute each row alone: the split is bit for bit the
# whole prefill. From 64 tokens on the whole prompt takes the tiled path and a split would move its
# rounding (up to 0.5 nats measured), for 24 tokens saved (docs/prefix-cache.md).
MIN_HEAD_TOKENS = 8
HEAD_PROMPT_BELOW = 64


@dataclass
class Chunk:
    """A streamed token: its id in the primary model, the text it adds, and its timing."""

    step: Step
    text: str


@dataclass
class Generation:
    method: str
    text: str
    token_ids: list[int]  # generated ids in the primary model's vocabulary (stop token excluded)
    prompt_ids: dict[str, list[int]]  # the exact prompts each branch started from
    stop_reason: str  # "stop" or "length" (the CLI's "interrupted": Ctrl-C)
    coefficient: float | None  # the delta's coefficient b_T (steered methods; the trust region's cap)
    steps: list[Step] = field(default_factory=list)
    context_cut: int = 0  # characters cut from the context's end to fit a model's window (truncate_context)

    def timing(self) -> dict[str, float]:
        """Totals in seconds over the generation (the first token's forwards are the prefill), and the
        number of tokens the confidence gate left unsteered."""
        return {
            "llm_s": sum(s.llm_s for s in self.steps),
            "slm_s": sum(s.slm_s for s in self.steps),
            "fusion_s": sum(s.fusion_s for s in self.steps),
            "sample_s": sum(s.sample_s for s in self.steps),
            "gated_tokens": sum(s.gated for s in self.steps),  # tokens the confidence gate left unsteered
        }


class _TextStream:
    """Incremental detokenisation: decode the whole output, emit the new suffix; hold back
    while the tail is an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new


class PromptTooLong(CoSteerError, ValueError):
    """A prompt that, with the tokens to generate, does not fit its model's trained window."""


class CoSteer:
    """`prefix_cache`: where the private context's KV state is kept between generations (a long-lived
    object reuses it for every request): True builds one from the environment (memory, and encrypted on
    disk when a key is set: engine/prefix_cache.py), None or False prefills every prompt whole."""

    def __init__(self, llm: LLMSide | None, slm: LM | None, config: GenerationConfig | None = None,
                 prefix_cache: PrefixCache | bool | None = True):  # fmt: skip
        if llm is None and slm is None:
            raise ValueError("need at least one model")
        self.llm, self.slm = llm, slm
        self.config = config or GenerationConfig()
        self._vocab: VocabMap | None = None
        self.prefix_cache = PrefixCache.from_env() if prefix_cache is True else (None if prefix_cache is False else prefix_cache)

    @classmethod
    def load(cls, llm: str | None, slm: str | None, config: GenerationConfig | None = None, device: str = "auto",
             backend: str = "auto", prefix_cache: PrefixCache | bool | None = True):  # fmt: skip
        """Load by preset name, local folder, GGUF file or hub name; the same spec loads once.
        backend: transformers | llamacpp | auto (llama.cpp for GGUF files on the CPU when installed)."""
        llm_lm = load_lm(llm, device, backend) if llm else None
        slm_lm = llm_lm if (slm == llm and llm_lm is not None) else (load_lm(slm, device, backend) if slm else None)
        return cls(llm_lm, slm_lm, config, prefix_cache)

    # -- pieces ------------------------------------------------------------------------

    def vocab(self) -> VocabMap:
        """The LLM/SLM alignment (computed once for a pair of loaded models; raises IncompatibleVocabularies)."""
        if self._vocab is None:
            self._vocab = shared_alignment(
                self.llm.tokenizer,
                self.slm.tokenizer,
                self.llm.vocab_size,
                self.slm.vocab_size,
                self.llm.stop_ids,
                self.slm.stop_ids,
                self.config.min_shared_vocab,
            )
        return self._vocab

    def prompts(self, query: str | Messages, context: str | None, context_message: str | None = None,
                reference_message: str | None = None, branches=None) -> dict[str, list[int]]:  # fmt: skip
        """Every prompt a method may start from (only *_context prompts hold the context); `branches`: only
        these (a method's), the others not tokenised.

        `query`: the public query, or a conversation (system / user / assistant turns). The
        with-context first user turn is `context_message` verbatim when given (a dataset's own
        personalised prompt), else the context followed by the turn's text. `reference_message`
        (public: a reference profile in the context's format, then the query) is the first user turn
        of the SLM's "slm_reference"."""
        public = conversation(query)
        with_ctx = _with_context(public, context, context_message)
        wanted = {"llm": public, "llm_context": with_ctx, "slm": public, "slm_context": with_ctx,
                  "slm_reference": first_user_turn(public, reference_message) if reference_message else None}
        done: dict[tuple[int, str], list[int]] = {}  # (tokenizer, branch's text) -> ids: one model, one tokenisation
        out: dict[str, list[int]] = {}
        for branch, messages in wanted.items():
            lm = self.llm if branch.startswith("llm") else self.slm
            if lm is None or messages is None or (branches is not None and branch not in branches):
                continue
            key = (id(lm.tokenizer), branch.removeprefix("llm").removeprefix("slm"))
            if key not in done:
                done[key] = chat_ids(lm.tokenizer, messages)
            out[branch] = list(done[key])
        return out

    def _prefix(self, prompts: dict[str, list[int]], rows: tuple[str, ...], query: Messages, context: str | None,
                context_message: str | None, reference_message: str | None) -> PrefixPlan | None:  # fmt: skip
        """The prefix-cache plan for a decode batch over the branches `rows`: the private context's branches
        and the public reference keep their stable prefix, the SLM's public prompt its chat template's head
        (`slm`: the same for every query, where it has MIN_HEAD_TOKENS). One-turn prompts only: a longer
        conversation is prefilled whole."""
        if self.prefix_cache is None or len(query) != 1:
            return None
        ctx = _with_context(query, context, context_message)
        turns = {"slm_context": ctx, "llm_context": ctx, "slm": query,
                 "slm_reference": first_user_turn(query, reference_message) if reference_message else None}
        lengths = []
        for branch in rows:
            lm = self.llm if branch == "llm_context" else self.slm
            turn = turns.get(branch) if branch in prompts else None
            n = stable_prefix_len(lm.tokenizer, turn[0]["content"], query[0]["content"], context, ids=prompts[branch],
                                  head=branch == "slm") if turn else 0  # fmt: skip
            head_pays = n >= MIN_HEAD_TOKENS and len(prompts[branch]) < HEAD_PROMPT_BELOW
            lengths.append(n if branch != "slm" or head_pays else 0)
        return PrefixPlan(self.prefix_cache, tuple(lengths)) if any(lengths) else None

    def _config(self, sampling: SamplingConfig | None, steering: SteeringConfig | None, overrides: dict):
        s = sampling or self.config.sampling
        if overrides:  # validated together: a misspelt name is refused, not silently ignored
            s = SamplingConfig.model_validate({**s.model_dump(), **overrides})
        return s, steering or self.config.steering

    # -- generation: check -> plan -> decode -------------------------------------------

    def stream(
        self,
        query: str | Messages,
        context: str | None = None,
        method: Method | str = Method.costeer,
        sampling: SamplingConfig | None = None,
        steering: SteeringConfig | None = None,
        context_message: str | None = None,
        reference_message: str | None = None,
        truncate_context: bool = False,
        inspect: int = 0,
        **overrides,
    ) -> "GenerationStream":
        """Tokens as they are chosen; `.generation` fills in as the stream is consumed.

        query: the public query, or a conversation ending with a user turn (engine/prompts.py puts
        the context before its first user turn).
        context_message: the whole with-context user message, used verbatim instead of
        context + query (e.g. CoGenesis' `personalized_input`).
        reference_message: for `costeer_matched`, what the SLM's without-context branch reads instead of
        the bare query: a public reference profile in the same format as the context, then the query
        (docs/steering-variants.md §5); the delta then raises only tokens of the context. Without it
        `costeer_matched` is the paper's update with the repetition guard. Other methods do not read it.
        steering: the FTRL hyper-parameters and, for the costeer_* variants, `variant`
        (e.g. SteeringConfig(variant=VariantConfig(epsilon=0.3))).
        A prompt that, with max_new_tokens, exceeds its model's trained window raises PromptTooLong
        before any forward; with truncate_context the context's end is cut until every prompt fits
        (`.generation.context_cut` says how many characters went).
        inspect: n > 0 attaches to each Step what steering did to it (`engine.loop.Inspection`: the shift
        log π_fused − log π_llm of the chosen token, the n likeliest tokens before and after); off by default.
        Overrides: temperature, top_k, top_p, seed, max_new_tokens."""
        spec, query = Method(method).spec, conversation(query)
        s_cfg, st_cfg = self._config(sampling, steering, overrides)
        self._check(spec, query, context, context_message, st_cfg)
        prompts, fitted = self._branch_prompts(spec, query, context, context_message, reference_message,
                                               s_cfg.max_new_tokens, truncate_context)  # fmt: skip
        # the prefix cache keeps what the private source reads: the SLM pair's, or a baseline's one prompt
        rows = (_without_context_branch(prompts), "slm_context") if spec.steered else (spec.primary,)
        prefix = self._prefix(prompts, rows, query, fitted, context_message, reference_message)
        plan = self._plan(spec, prompts, s_cfg, st_cfg, _with_context(query, fitted, context_message), prefix)
        plan = replace(plan, inspect=inspect)
        b = plan.fusion.coefficient if plan.fusion is not None else None
        primary = self.llm if spec.uses_llm else self.slm
        cut = len(context) - len(fitted) if context else 0
        return GenerationStream(decode(plan), primary.tokenizer,
                                Generation(spec.name, "", [], prompts, "length", b, context_cut=cut))  # fmt: skip

    def _check(self, spec: MethodSpec, query: Messages, context: str | None, context_message: str | None,
               steering: SteeringConfig) -> None:  # fmt: skip
        """Refuse a request that cannot run here, or must not (the private context to a remote LLM)."""
        for text, what in ((context, "the context"), (context_message, "context_message")):
            if isinstance(text, str):
                check_text(text, what)
        if spec.needs_context and not ((context and context.strip()) or (context_message and context_message.strip())):
            raise ValueError(f"method '{spec.name}' needs a personal context")
        if spec.uses_llm and self.llm is None:
            raise ValueError(f"method '{spec.name}' needs an LLM")
        if spec.uses_slm and self.slm is None:
            raise ValueError(f"method '{spec.name}' needs an SLM")
        if spec.privacy_violating and self.llm.remote:
            raise ValueError(f"method '{spec.name}' would send the private context to the cloud: refused")
        if spec.steered and steering.gate is not None and self.llm.remote:
            raise ValueError("the confidence gate is for in-process generation: with the cloud, the SLM pair "
                             "already runs while the cloud answers")

    def _branch_prompts(self, spec: MethodSpec, query: Messages, context: str | None, context_message: str | None,
                        reference_message: str | None, max_new_tokens: int,
                        truncate_context: bool) -> tuple[dict[str, list[int]], str | None]:  # fmt: skip
        """The prompts the method reads (its row's branches), each fitting its model's window with
        max_new_tokens -> (prompts, the context they hold). Only a method that reads the context sees it;
        with truncate_context a context too long is cut at its end (else PromptTooLong)."""
        private = spec.needs_context

        def build(ctx: str | None) -> dict[str, list[int]]:
            return self.prompts(query, ctx if private else None, context_message if private else None,
                                reference_message if spec.matched else None, spec.branches)  # fmt: skip

        prompts = build(context)
        overflow = self._overflow(prompts, max_new_tokens)
        if overflow is None:
            return prompts, context
        cuttable = private and context and not context_message  # only a context given apart can be cut
        if not (truncate_context and cuttable):
            advice = ("shorten the context, or let it be cut (--truncate-context, truncate_context=True)" if cuttable
                      else "shorten the prompt or lower --max-new-tokens (max_new_tokens)")  # fmt: skip
            raise PromptTooLong(f"{overflow}: {advice}")
        return self._fit_context(context, build, max_new_tokens, overflow)

    def _overflow(self, prompts: dict[str, list[int]], max_new_tokens: int) -> str | None:
        """Why the first prompt that, with max_new_tokens, exceeds its model's trained window does, or None.
        (A remote LLM has no `window` here: its server refuses a session past its model's window, 4413.)"""
        for branch, ids in prompts.items():
            lm = self.llm if branch.startswith("llm") else self.slm
            window = getattr(lm, "window", None)
            if window is not None and len(ids) + max_new_tokens > window:
                return (f"the {branch} prompt ({len(ids):,} tokens) plus max_new_tokens ({max_new_tokens:,}) exceeds "
                        f"the trained window of {lm.name} ({window:,} tokens)")  # fmt: skip
        return None

    def _fit_context(self, context: str, build, max_new_tokens: int, overflow: str) -> tuple[dict, str]:
        """The longest head of the context whose prompts all fit -> (its prompts, that head).
        Binary search over characters: about two tokenisations of the whole context in all."""
        fits, too_long, best = 0, len(context), None  # context[:fits] fits (once best is set)
        while too_long - fits > 1:
            mid = (fits + too_long) // 2
            prompts = build(context[:mid]) if context[:mid].strip() else None
            if prompts is not None and self._overflow(prompts, max_new_tokens) is None:
                fits, best = mid, prompts
            else:
                too_long = mid
        if best is None:
            raise PromptTooLong(f"{overflow}, and still does without the context")
        return best, context[:fits]

    def _plan(self, spec: MethodSpec, prompts: dict[str, list[int]], sampling: SamplingConfig,
              steering: SteeringConfig, with_context: Messages | None, prefix: PrefixPlan | None) -> DecodePlan:  # fmt: skip
        """The sources over their prompts, the vocabulary map and, steered, the fusion pipeline. `prefix`:
        the prefix-cache plan of the source that reads the context (the SLM pair, or a baseline's one)."""
        n = sampling.max_new_tokens
        if not spec.steered:
            lm = self.llm if spec.uses_llm else self.slm
            vocab = VocabMap(size=lm.vocab_size, identity=True, stop_ids=lm.stop_ids)
            source = lm.connect(prompts[spec.primary], vocab, n, prefix=prefix)[0]
            return DecodePlan(source, vocab, sampling, prompts=prompts)
        vocab = self.vocab()
        pair_prompts = (prompts[_without_context_branch(prompts)], prompts["slm_context"])  # (without, with)
        # the support rule goes with the matched reference: together they keep the user's details
        # (docs/steering-variants.md §5); against the bare query the delta stays the paper's
        support = None
        if "support" in spec.stages and "slm_reference" in prompts:
            text = "\n".join(m["content"] for m in with_context)
            support = support_mask(vocab, self.llm.tokenizer, text).to(self.slm.device)  # where Δ lives
        fusion = fusion_pipeline(spec.name, steering, support)
        if self.llm is self.slm and steering.gate is None:
            # one model on both sides: its three sequences in one batch (a gate needs them apart). The SLM's
            # row without context reading the LLM's very prompt copies the LLM's row (no prefill at all): no
            # prefix of its own, or it would be prefilled
            shared_prefix = None
            if prefix is not None:
                lengths = (0, 0 if pair_prompts[0] == prompts["llm"] else prefix.lengths[0], prefix.lengths[1])
                shared_prefix = PrefixPlan(prefix.cache, lengths)
            shared = SharedModel(self.slm, prompts["llm"], pair_prompts, n, shared_prefix)
            primary, pair = shared.llm, shared.steering
        else:
            pair = LocalSteeringSource(self.slm, pair_prompts, n, prefix)
            primary, pair = self.llm.connect(prompts["llm"], vocab, n, pair, guess=Guess(fusion, vocab))
        return DecodePlan(primary, vocab, sampling, pair, fusion, steering.gate, prompts)

    def generate(self, query: str | Messages, context: str | None = None, method: Method | str = Method.costeer,
                 **kw) -> Generation:  # fmt: skip
        """Run to the end and return text, token ids, prompts and per-token timings."""
        stream = self.stream(query, context, method, **kw)
        for _ in stream:
            pass
        return stream.generation


class GenerationStream:
    """Iterate for Chunks; `generation` holds everything produced so far."""

    def __init__(self, steps: Iterator[Step], tokenizer, generation: Generation):
        self._steps = steps
        self._text = _TextStream(tokenizer)
        self.generation = generation

    def __iter__(self) -> Iterator[Chunk]:
        g = self.generation
        try:
            for step in self._steps:
                g.steps.append(step)
                if step.stop:
                    g.stop_reason = "stop"
                    return
                g.token_ids.append(step.token_id)
                piece = self._text.push(step.token_id)
                g.text += piece
                yield Chunk(step, piece)
        finally:
            close = getattr(self._steps, "close", None)
            if close is not None:  # ends a cloud session as soon as the stream ends
                close()


def _without_context_branch(prompts: dict[str, list[int]]) -> str:
    """The branch the SLM pair's row without context reads: the matched reference where there is one."""
    return "slm_reference" if "slm_reference" in prompts else "slm"


def _with_context(public: Messages, context: str | None, context_message: str | None) -> Messages | None:
    """The with-context conversation: its first user turn is `context_message` verbatim, else the
    context then the turn's text."""
    if context_message:
        return first_user_turn(public, context_message)
    return with_context(public, context) if context else None
