"""The official way, kept literal as the reference: three full forward passes per token
(no KV cache, no batching) and the paper's T-step FTRL loop."""

from __future__ import annotations

import torch

from costeer.api import CoSteer
from costeer.engine.models import full_forward_logprobs
from costeer.steering import FTRLParams, ftrl_literal


def literal_costeer(cs: CoSteer, query: str, context: str, n_tokens: int, params: FTRLParams | None = None) -> list[int]:
    params = params or cs.config.steering.params()
    return literal_steered(cs, query, context, n_tokens, lambda lp, lq, lb, _: ftrl_literal(lp, lq, lb, params))


def literal_steered(cs: CoSteer, query: str, context: str, n_tokens: int, fusion,
                    reference: str | None = None) -> list[int]:  # fmt: skip
    """The same loop with any fusion(log π_base, log π*_pers, log π*_base, aligned ids so far) -> log π.
    With `reference`, the SLM's without-context branch reads that user message (costeer_matched)."""
    p = cs.prompts(query, context, reference_message=reference)
    vm = cs.vocab()
    llm_ids, base_ids, pers_ids = list(p["llm"]), list(p["slm_reference" if reference else "slm"]), list(p["slm_context"])
    out: list[int] = []
    history: list[int] = []  # aligned ids
    for _ in range(n_tokens):
        view = lambda x, f: torch.log_softmax(f(x).double(), -1)  # noqa: E731
        lp = view(full_forward_logprobs(cs.llm, llm_ids), vm.llm_view)
        lb = view(full_forward_logprobs(cs.slm, base_ids), vm.slm_view)
        lq = view(full_forward_logprobs(cs.slm, pers_ids), vm.slm_view)
        k = int(torch.argmax(fusion(lp, lq, lb, list(history))))
        history.append(k)
        if vm.is_stop(k):
            break
        out.append(vm.llm_token(k))
        llm_ids.append(vm.llm_token(k))
        base_ids.append(vm.slm_token(k))
        pers_ids.append(vm.slm_token(k))
    return out
