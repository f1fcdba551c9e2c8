"""The official way, kept literal as the reference: three full forward passes per token
(no KV cache, no batching) and the paper's T-step FTRL loop."""

from __future__ import annotations

import torch

from costeer.api import CoSteer
from costeer.engine.models import full_forward_logprobs
from costeer.steering import FTRLParams, ftrl_literal


def literal_costeer(cs: CoSteer, query: str, context: str, n_tokens: int, params: FTRLParams | None = None) -> list[int]:
    params = params or cs.config.steering.params()
    p = cs.prompts(query, context)
    vm = cs.vocab()
    llm_ids, base_ids, pers_ids = list(p["llm"]), list(p["slm"]), list(p["slm_context"])
    out: list[int] = []
    for _ in range(n_tokens):
        view = lambda x, f: torch.log_softmax(f(x).double(), -1)  # noqa: E731
        lp = view(full_forward_logprobs(cs.llm, llm_ids), vm.llm_view)
        lb = view(full_forward_logprobs(cs.slm, base_ids), vm.slm_view)
        lq = view(full_forward_logprobs(cs.slm, pers_ids), vm.slm_view)
        k = int(torch.argmax(ftrl_literal(lp, lq, lb, params)))
        if vm.is_stop(k):
            break
        out.append(vm.llm_token(k))
        llm_ids.append(vm.llm_token(k))
        base_ids.append(vm.slm_token(k))
        pers_ids.append(vm.slm_token(k))
    return out
