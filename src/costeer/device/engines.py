"""Existing serving engines as the cloud: an LLM-side next-token source over the HTTP API of
an OpenAI-compatible completion server that returns top-k log-probabilities.

Each step is ONE stateless `max_tokens=1` request whose prompt is the public query's token ids
plus the tokens chosen so far; the engine's prefix cache makes it incremental, and resuming
after a dropped connection or an engine restart is just the next request. What the device asks
for is a COUNT of entries (k), never which tokens: what the answer holds is chosen by the
engine alone, so the request reveals nothing about what the private context favours.

Flavours (`api`):
- `llamacpp`: llama.cpp's own `llama-server`, `POST /completion` with a token-array prompt,
  `n_probs=k`, `cache_prompt=true`; the answer's `completion_probabilities[0].top_logprobs`
  are computed from the full softmax of the raw logits (not after the sampling chain).
- `openai`: vLLM / SGLang, `POST /v1/completions` with the prompt as a list of token ids,
  `logprobs=k` (at most the server's `--max-logprobs`) and `return_tokens_as_token_ids=true`,
  so the top-k comes back keyed "token_id:<id>".
- `auto`: `llamacpp` when the server answers `GET /props` (llama-server only), else `openai`.

The device needs the LLM's tokenizer (ids only, no weights): the `tokenizer` spec names the
model the engine serves, and connect_engine checks the engine tokenises a probe the same way.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from costeer import frames
from costeer.device.ahead import SteeringAhead
from costeer.device.options import DEFAULT_K, CloudFrames, check_tail
from costeer.device.transport import CloudError, HttpClient, Link, Retry
from costeer.device.wire import WireLog
from costeer.engine.loop import LLMSide, SteeringSource
from costeer.engine.prefix_cache import PrefixPlan
from costeer.engine.vocab import VocabMap

TRANSIENT = frozenset({502, 503, 504})  # HTTP answers that a later try may not get

APIS = ("auto", "llamacpp", "openai")
_PROBE = "Hello, world! Ünïcödé 123 — tokenisation probe."


def parse_top(entries: dict[int, float], vocab_size: int, position: int) -> frames.Dist:
    """Top-k {token id: log-probability} from an engine -> a top-k Dist with its tail mass."""
    if not entries:
        raise CloudError("the engine returned no log-probabilities")
    ids = torch.tensor(list(entries), dtype=torch.long)
    logp = torch.tensor(list(entries.values()), dtype=torch.float32)
    if int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise CloudError(f"the engine returned token id {int(ids.max())} outside the vocabulary ({vocab_size})")
    order = torch.argsort(logp, descending=True)
    ids, logp = ids[order], logp[order]
    # The mass outside the top-k; float rounding of k probabilities can push the sum past 1.
    inside = float(torch.logsumexp(logp.double(), 0))
    log_tail = math.log1p(-math.exp(inside)) if inside < -1e-7 else float("-inf")
    return frames.Dist(position, vocab_size, logp, ids, log_tail)


class EngineLLM(LLMSide):
    """An LLM served by a third-party engine, as CoSteer's `llm` (like `CloudLLM`)."""

    remote = True  # CoSteer refuses `llm_context`: it would send the private context

    def __init__(self, base_url: str, api: str, tokenizer, stop_ids, vocab_size: int, model: str | None,
                 http: HttpClient, k: int = DEFAULT_K, tail: str = "slm", retry: Retry = Retry()):  # fmt: skip
        self.base_url, self.api, self.model = base_url, api, model
        self.name = f"{api}:{model or base_url}"
        self.tokenizer, self.stop_ids, self.vocab_size = tokenizer, frozenset(stop_ids), vocab_size
        self.device = torch.device("cpu")
        self.http, self.k, self.tail, self.retry = http, k, check_tail(tail), retry
        self.wire = http.wire
        self.requests = 0

    def connect(self, prompt_ids: list[int], vocab: VocabMap, max_new_tokens: int,
                steering: SteeringSource | None = None,
                prefix: PrefixPlan | None = None) -> tuple[EngineSource, SteeringAhead | None]:  # fmt: skip
        """LLMSide: a source of one request per step over `prompt_ids`; the SLM pair runs meanwhile.
        No `prefix` comes here (LLMSide)."""
        ahead = SteeringAhead(steering, vocab, self.vocab_size) if steering is not None else None
        return EngineSource(self, prompt_ids, ahead), ahead

    # -- one step ----------------------------------------------------------------------

    def request_body(self, ids: list[int]) -> tuple[str, dict]:
        if self.api == "llamacpp":
            return "/completion", {"prompt": ids, "n_predict": 1, "n_probs": self.k, "cache_prompt": True,
                                   "temperature": 0.0, "post_sampling_probs": False}  # fmt: skip
        body = {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": self.k,
                "return_tokens_as_token_ids": True}  # fmt: skip
        if self.model:
            body["model"] = self.model
        return "/v1/completions", body

    def parse(self, resp: dict, position: int) -> frames.Dist:
        try:
            if self.api == "llamacpp":
                top = resp["completion_probabilities"][0]["top_logprobs"]
                entries = {int(e["id"]): float(e["logprob"]) for e in top}
            else:
                top = resp["choices"][0]["logprobs"]["top_logprobs"][0]
                entries = {int(key.rsplit(":", 1)[1]): float(v) for key, v in top.items()}
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CloudError(f"unexpected answer from the engine ({type(e).__name__}: {e})") from None
        return parse_top(entries, self.vocab_size, position)

    def step(self, ids: list[int], position: int) -> frames.Dist:
        """One request, retried with back-off while the engine is unreachable (restarts)."""
        path, body = self.request_body(ids)
        outage = None  # the run of failures this step is in, if any
        while True:
            try:
                resp = self.http.post_json(path, body)
                self.requests += 1
                return self.parse(resp, position)
            except CloudError as e:
                # unreachable or 502/503/504 (llama-server answers 503 while it loads the model
                # after a restart; a proxy answers 502/504) are worth retrying; other refusals are final
                if e.code is not None and e.code not in TRANSIENT:
                    raise
                outage = outage or self.retry.outage()
                if not outage.wait(str(e)):
                    raise CloudError(f"{e} (still, after {self.retry.budget_s:g} s of retries)", e.code) from None

    def close(self) -> None:
        self.http.close()


class EngineSource:
    """A NextTokenSource over an engine: per step one request, the SLM pair computed meanwhile."""

    def __init__(self, llm: EngineLLM, prompt_ids: list[int], ahead: SteeringAhead | None = None):
        self.llm, self.ahead = llm, ahead
        self.prompt: list[int] = list(prompt_ids)
        self.chosen: list[int] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="engine")

    def start(self) -> Tensor:
        self.chosen = []
        return self._exchange(self.ahead.run_start if self.ahead else None)

    def advance(self, token_id: int) -> Tensor:
        self.chosen.append(int(token_id))
        return self._exchange((lambda: self.ahead.run_advance(token_id)) if self.ahead else None)

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _exchange(self, hook) -> Tensor:
        pending = self._pool.submit(self.llm.step, self.prompt + self.chosen, len(self.chosen))
        if hook is not None:
            hook()  # the SLM pair's forward, while the engine computes
        dist = pending.result()
        use_slm = self.llm.tail == "slm" and self.ahead is not None
        return frames.densify(dist, self.ahead.reference() if use_slm else None)


def connect_engine(url: str, tokenizer: str, api: str = "auto", k: CloudFrames | int = DEFAULT_K, tail: str = "slm",
                   api_key: str | None = None, wire_log: str | Path | WireLog | None = None,
                   retry: Retry = Retry(), ca_file: str | Path | None = None, insecure: bool = False) -> EngineLLM:  # fmt: skip
    """Connect to an engine at http(s)://HOST:PORT; `tokenizer` is a model spec (preset, GGUF,
    folder or hub name) of the model it serves: only its tokenizer is loaded. k: a top-k size
    (options.CloudFrames: engines answer with top-k lists, neither packed nor full frames)."""
    from costeer.engine.models import load_tokenizer

    if api not in APIS:
        raise ValueError(f"unknown engine api '{api}' (choose from {', '.join(APIS)})")
    k = CloudFrames.parse(k).top_k_only().k
    tok, stop_ids = load_tokenizer(tokenizer)
    api_key = api_key if api_key is not None else os.environ.get("COSTEER_ENGINE_API_KEY", "")
    wire = WireLog(wire_log) if isinstance(wire_log, (str, Path)) else wire_log
    http = HttpClient(url.rstrip("/"), api_key, wire, link=Link(ca_file, insecure))
    try:
        if api == "auto":
            try:
                http.get_json("/props")
                api = "llamacpp"
            except CloudError as e:
                if e.code is None:
                    raise
                api = "openai"
        model, vocab_size = None, None
        try:
            models = http.get_json("/v1/models").get("data") or []
        except CloudError as e:
            if e.code is None:
                raise
            models = []
        if models:
            model = models[0].get("id")
            vocab_size = (models[0].get("meta") or {}).get("n_vocab")  # llama-server reports it
        vocab_size = int(vocab_size or len(tok))
        probe = tok.encode(_PROBE, add_special_tokens=False)
        if api == "llamacpp":
            theirs = http.post_json("/tokenize", {"content": _PROBE, "add_special": False}).get("tokens")
        else:
            theirs = http.post_json("/tokenize", {"model": model, "prompt": _PROBE, "add_special_tokens": False})
            theirs = theirs.get("tokens")
        if theirs is not None and list(theirs) != probe:
            raise CloudError(f"the engine tokenises differently from '{tokenizer}': give the model it serves")
    except BaseException:
        http.close()
        raise
    if wire is not None:
        wire.meta(url=url, model=model, api=api)
    return EngineLLM(url, api, tok, stop_ids, vocab_size, model, http, k, tail, retry)
