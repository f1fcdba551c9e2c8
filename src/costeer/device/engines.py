"""Existing serving engines as the cloud: an LLM-side next-token source over the HTTP API of
an OpenAI-compatible completion server that returns top-k log-probabilities.

Each request is stateless: its prompt is the public query's token ids plus the tokens chosen so
far; the engine's prefix cache makes it incremental, and resuming after a dropped connection or
an engine restart is just the next request. What the device asks for is a COUNT of entries (k)
and of positions (d), never which tokens: what the answer holds is chosen by the engine alone,
so the request reveals nothing about what the private context favours.

A request is a chain (look-ahead): `max_tokens = d` with the top-k log-probabilities of every
position, so the answer holds the engine's own greedy continuation g_0..g_{d-1} and, for each
position j, the distribution after the prefix + g_0..g_{j-1}. The device decodes exactly as with
one request per token (SLM pair, fusion, sampling per chosen token); as long as its chosen token
equals the chain's, the next position's distribution is already there, computed for the prefix
it actually chose, and when it leaves the chain the next request carries the chosen prefix. So
the output is the per-token output, token for token, and d only changes the requests per token.
d is `--lookahead` (options.Lookahead): off is d = 1; auto picks d per request (ChainDepth) from
the round trip, the engine's time per position, the device's time per token and how often the
device stayed on the chain so far; a private context can change the last of these only through
the chosen tokens, which the engine sees anyway.

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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from costeer import frames
from costeer.device.ahead import SteeringAhead
from costeer.device.options import DEFAULT_K, CloudFrames, Lookahead, check_tail
from costeer.device.transport import MAX_JSON_BYTES, CloudError, HttpClient, Link, Retry
from costeer.device.wire import WireLog
from costeer.engine.loop import Guess, LLMSide, SteeringSource
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
    try:  # JSON's NaN and Infinity parse as floats: the engine's values get a DIST frame's checks
        frames.check_log_probabilities(logp.numpy(), float("-inf"))
    except frames.FrameError as e:
        raise CloudError(f"the engine returned log-probabilities that are no distribution: {e.reason}") from None
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
                 http: HttpClient, k: int = DEFAULT_K, tail: str = "slm", retry: Retry = Retry(),
                 lookahead: Lookahead | int | str | None = None, rtt_s: float = 0.0):  # fmt: skip
        self.base_url, self.api, self.model = base_url, api, model
        self.lookahead = Lookahead.parse(lookahead)
        self.rtt_s = rtt_s  # the fastest answer to a request that computes nothing (connect_engine's probes)
        self.name = f"{api}:{model or base_url}"
        self.tokenizer, self.stop_ids, self.vocab_size = tokenizer, frozenset(stop_ids), vocab_size
        self.device = torch.device("cpu")
        self.http, self.k, self.tail, self.retry = http, k, check_tail(tail), retry
        self.wire = http.wire
        self.requests = 0

    def connect(self, prompt_ids: list[int], vocab: VocabMap, max_new_tokens: int,
                steering: SteeringSource | None = None,
                prefix: PrefixPlan | None = None,
                guess: Guess | None = None) -> tuple[EngineSource, SteeringAhead | None]:  # fmt: skip
        """LLMSide: a source of chain requests over `prompt_ids`; the SLM pair runs meanwhile.
        No `prefix` comes here (LLMSide); no run-ahead on a `guess` (the WebSocket source's)."""
        ahead = SteeringAhead(steering, vocab, self.vocab_size) if steering is not None else None
        return EngineSource(self, prompt_ids, ahead, max_new_tokens), ahead

    # -- one request -------------------------------------------------------------------

    def request_body(self, ids: list[int], n: int = 1) -> tuple[str, dict]:
        """n positions: the engine's greedy chain of n tokens with the top-k of each position
        (no repetition penalty, so that the chain is the LLM's own greedy continuation)."""
        if self.api == "llamacpp":
            return "/completion", {"prompt": ids, "n_predict": n, "n_probs": self.k, "cache_prompt": True,
                                   "temperature": 0.0, "repeat_penalty": 1.0, "post_sampling_probs": False}  # fmt: skip
        body = {"prompt": ids, "max_tokens": n, "temperature": 0.0, "logprobs": self.k,
                "return_tokens_as_token_ids": True}  # fmt: skip
        if self.model:
            body["model"] = self.model
        return "/v1/completions", body

    def parse_chain(self, resp: dict, position: int, n: int = 1) -> list[ChainLink]:
        """The answer -> its first n positions, each (the token the engine went on with, the
        distribution at position + j); at least one, or CloudError."""
        try:
            if self.api == "llamacpp":
                probs = resp["completion_probabilities"][:n]
                links = [(int(p["id"]), {int(e["id"]): float(e["logprob"]) for e in p["top_logprobs"]}) for p in probs]
            else:
                lp = resp["choices"][0]["logprobs"]
                links = [(_openai_id(tok), {_openai_id(key): float(v) for key, v in top.items()})
                         for tok, top in zip(lp["tokens"][:n], lp["top_logprobs"][:n])]  # fmt: skip
            if not links:
                raise IndexError("no positions")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise CloudError(f"unexpected answer from the engine ({type(e).__name__}: {e})") from None
        return [ChainLink(tok, parse_top(entries, self.vocab_size, position + j)) for j, (tok, entries) in enumerate(links)]

    def parse(self, resp: dict, position: int) -> frames.Dist:
        return self.parse_chain(resp, position)[0].dist

    def step(self, ids: list[int], position: int) -> frames.Dist:
        return self.chain(ids, position, 1)[0].dist

    def chain(self, ids: list[int], position: int, n: int) -> list[ChainLink]:
        """One request for n positions, retried with back-off while the engine is unreachable (restarts)."""
        path, body = self.request_body(ids, n)
        outage = None  # the run of failures this request is in, if any
        while True:
            try:
                resp = self.http.request_json("POST", path, body, max_bytes=MAX_JSON_BYTES * n)
                self.requests += 1
                return self.parse_chain(resp, position, n)
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


AUTO_CAP = 8  # auto asks for at most this many positions (tokens per round trip level off well before)


def _timed(fn) -> float:
    """Run fn (if any) -> its seconds."""
    if fn is None:
        return 0.0
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class ChainLink(NamedTuple):
    token: int  # the token the engine fed after this position (its greedy choice)
    dist: frames.Dist  # the distribution at this position


def _openai_id(key: str) -> int:
    """'token_id:<id>' (return_tokens_as_token_ids) -> id."""
    return int(key.rsplit(":", 1)[1])


class ChainDepth:
    """How many positions the next request asks for: the fixed --lookahead N, or (auto) the d that
    maximises the expected tokens per second of one round,

        E(d) / (rtt + c * d + (E(d) - 1) * s),   E(d) = 1 + p + ... + p^(d-1),

    rtt: the round trip of a request that computes nothing; c: the engine's seconds per position;
    s: the device's seconds per token (SLM pair, fusion, sampling, the decode loop); p:
    how often the device stayed on the chain where it could (Laplace's estimate). Until c and s
    are measured it asks for one position: on loopback, where rtt << c, that stays d = 1."""

    SMOOTH = 0.3  # weight of the newest measurement in the running means

    def __init__(self, lookahead: Lookahead, rtt_s: float, cap: int = AUTO_CAP):
        self.fixed, self.rtt_s, self.cap = lookahead.depth, max(0.0, rtt_s), cap
        self.cost_s: float | None = None  # engine seconds per position
        self.device_s: float | None = None  # device seconds per token served from a chain
        self.stayed, self.offered = 0, 0

    def depth(self, left: int) -> int:
        """Positions for the next request, with `left` tokens still to generate (>= 1)."""
        if self.fixed is not None:
            return max(1, min(self.fixed, left))
        if self.cost_s is None or self.device_s is None:
            return 1
        p = (self.stayed + 1) / (self.offered + 2)
        best, best_rate, expected = 1, 0.0, 0.0
        for d in range(1, min(self.cap, left) + 1):
            expected += p ** (d - 1)
            rate = expected / (self.rtt_s + self.cost_s * d + (expected - 1) * self.device_s)
            if rate > best_rate:
                best, best_rate = d, rate
        return best

    def requested(self, n: int, wall_s: float) -> None:
        self.cost_s = self._mean(self.cost_s, max(0.0, wall_s - self.rtt_s) / n)

    def device(self, device_s: float) -> None:
        self.device_s = self._mean(self.device_s, device_s)

    def walked(self, stayed: bool) -> None:
        self.offered += 1
        self.stayed += stayed

    def _mean(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.SMOOTH) * old + self.SMOOTH * new


class EngineSource:
    """A NextTokenSource over an engine: a request per chain (see the module docs), the SLM pair
    computed while the engine answers; positions the chain already holds cost no request."""

    def __init__(self, llm: EngineLLM, prompt_ids: list[int], ahead: SteeringAhead | None = None,
                 max_new_tokens: int = 1 << 30):  # fmt: skip
        self.llm, self.ahead, self.max_new_tokens = llm, ahead, max_new_tokens
        self.policy = ChainDepth(llm.lookahead, llm.rtt_s)
        self.prompt: list[int] = list(prompt_ids)
        self.chosen: list[int] = []
        self.chain: list[ChainLink] = []  # chain[0]: the current position's; the rest follow chain[0].token
        self.requests = self.served = 0
        self._returned: float | None = None  # when the last distribution went to the decoder
        self._asked: float | None = None  # when the decoder came back with its token
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="engine")

    def start(self) -> Tensor:
        self.chosen, self.chain = [], []
        return self._next(self.ahead.run_start if self.ahead else None, first=True)

    def advance(self, token_id: int) -> Tensor:
        self._asked = time.perf_counter()
        token_id = int(token_id)
        self.chosen.append(token_id)
        stays = len(self.chain) > 1 and self.chain[0].token == token_id
        if len(self.chain) > 1:
            self.policy.walked(stays)
        self.chain = self.chain[1:] if stays else []
        return self._next((lambda: self.ahead.run_advance(token_id)) if self.ahead else None)

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _request(self, n: int) -> tuple[list[ChainLink], float]:
        """One chain request (in the pool's thread) -> its answer and its own wall time."""
        t0 = time.perf_counter()
        links = self.llm.chain(self.prompt + self.chosen, len(self.chosen), n)
        return links, time.perf_counter() - t0

    def _next(self, hook, first: bool = False) -> Tensor:
        """The current position's distribution: from the chain when the chosen prefix is on it,
        else from one request (whose answer becomes the chain)."""
        clock = time.perf_counter
        if self.chain:
            hook_s = _timed(hook)
            self.served += 1
        else:
            n = self.policy.depth(max(1, self.max_new_tokens - len(self.chosen)))
            pending = self._pool.submit(self._request, n)
            hook_s = _timed(hook)  # the SLM pair's forward, while the engine computes
            self.chain, wall_s = pending.result()
            self.requests += 1
            if not first:  # the first request also prefilled the prompt
                self.policy.requested(n, wall_s)
        if self._returned is not None and self._asked is not None:  # the decoder's time, and the SLM pair's
            self.policy.device(self._asked - self._returned + hook_s)
        now = clock()
        dist = self.chain[0].dist
        if dist.position != len(self.chosen):
            raise CloudError(f"the engine's chain is out of step (position {dist.position}, expected {len(self.chosen)})")
        self._returned = now
        use_slm = self.llm.tail == "slm" and self.ahead is not None
        return frames.densify(dist, self.ahead.reference() if use_slm else None)


def connect_engine(url: str, tokenizer: str, api: str = "auto", k: CloudFrames | int = DEFAULT_K, tail: str = "slm",
                   api_key: str | None = None, wire_log: str | Path | WireLog | None = None,
                   retry: Retry = Retry(), ca_file: str | Path | None = None, insecure: bool = False,
                   lookahead: Lookahead | int | str | None = None) -> EngineLLM:  # fmt: skip
    """Connect to an engine at http(s)://HOST:PORT; `tokenizer` is a model spec (preset, GGUF,
    folder or hub name) of the model it serves: only its tokenizer is loaded. k: a top-k size
    (options.CloudFrames: engines answer with top-k lists, neither packed nor full frames).
    lookahead: positions per request (options.Lookahead: 'auto', 'off' or N). The probes made
    here are timed: the fastest is the round trip that auto weighs against the engine's work."""
    from costeer.engine.models import load_tokenizer

    if api not in APIS:
        raise ValueError(f"unknown engine api '{api}' (choose from {', '.join(APIS)})")
    k = CloudFrames.parse(k).top_k_only().k
    lookahead = Lookahead.parse(lookahead)
    tok, stop_ids = load_tokenizer(tokenizer)
    api_key = api_key if api_key is not None else os.environ.get("COSTEER_ENGINE_API_KEY", "")
    wire = WireLog(wire_log) if isinstance(wire_log, (str, Path)) else wire_log
    http = HttpClient(url.rstrip("/"), api_key, wire, link=Link(ca_file, insecure))
    probes: list[float] = []

    def timed_json(method: str, path: str, body: dict | None = None) -> dict:
        t = time.perf_counter()
        answer = http.request_json(method, path, body)
        probes.append(time.perf_counter() - t)
        return answer

    try:
        if api == "auto":
            try:
                timed_json("GET", "/props")
                api = "llamacpp"
            except CloudError as e:
                if e.code is None:
                    raise
                api = "openai"
        model, vocab_size = None, None
        try:
            models = timed_json("GET", "/v1/models").get("data") or []
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
            theirs = timed_json("POST", "/tokenize", {"content": _PROBE, "add_special": False}).get("tokens")
        else:
            theirs = timed_json("POST", "/tokenize", {"model": model, "prompt": _PROBE, "add_special_tokens": False})
            theirs = theirs.get("tokens")
        if theirs is not None and list(theirs) != probe:
            raise CloudError(f"the engine tokenises differently from '{tokenizer}': give the model it serves")
    except BaseException:
        http.close()
        raise
    if wire is not None:
        wire.meta(url=url, model=model, api=api)
    return EngineLLM(url, api, tok, stop_ids, vocab_size, model, http, k, tail, retry, lookahead,
                     min(probes, default=0.0))  # fmt: skip
