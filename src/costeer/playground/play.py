"""One playground answer: the chosen methods decoded side by side, as events for the page.

The streams advance in turn, one token each, in the worker thread that owns the models (llama.cpp
and torch are driven from one thread at a time). Between tokens the worker checks for a stop; a
stop closes every stream, which ends its cloud session at once (close code 1000). With a remote
cloud, every wire-log record written while a stream advanced is that stream's, so the wire panel
shows exactly what each answer sent and received.

Events (kind, payload): run, status, start, token, done, error, wire, end (docs/playground.md).
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from costeer.api import CoSteer, GenerationStream
from costeer.engine.config import GenerationConfig, Method, SamplingConfig, SteeringConfig
from costeer.errors import CoSteerError

# Bounds on what a page may ask for (the request comes over HTTP: untrusted).
MAX_QUERY_CHARS = 2_000
MAX_SECTION_CHARS = 8_000  # each of profile / history / preference
MAX_NEW_TOKENS = 256
ALTERNATIVES = 5  # tokens shown before / after steering on hover
# Methods a page may add beside `llm` and the steered one: none shows the context to the LLM.
EXTRA_METHODS = (Method.light, Method.slm_context, Method.slm)
LOCK_WAIT_S = 30.0  # a new answer waits this long for the previous one to finish its last token
# What a user can cause (ValueError covers CloudError, ModelLoadError, IncompatibleVocabularies);
# anything else is a bug: logged with its traceback, and named on the page.
USER_ERRORS = (CoSteerError, ValueError, FileNotFoundError)

log = logging.getLogger("costeer.playground")


class Sliders(BaseModel):
    """The FTRL hyper-parameters' sliders (the paper's defaults, Appendix B.1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    T: int = Field(20, ge=1, le=100)
    alpha: float = Field(2.0, ge=0, le=10)
    beta: float = Field(1.0, ge=0, le=10)
    lam: float = Field(2.0, ge=0, le=10)
    eta: float = Field(10.0, gt=0, le=100)

    def steering(self) -> SteeringConfig:
        return SteeringConfig(T=self.T, alpha=self.alpha, beta=self.beta, lam=self.lam, eta=self.eta)


class PlayRequest(Sliders):
    """What the page sends for one answer (validated once, here)."""

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    profile: str = Field("", max_length=MAX_SECTION_CHARS)
    history: str = Field("", max_length=MAX_SECTION_CHARS)
    preference: str = Field("", max_length=MAX_SECTION_CHARS)
    llm: str = Field(min_length=1, max_length=200)
    slm: str = Field(min_length=1, max_length=200)
    method: Method = Method.costeer
    extra: tuple[Method, ...] = Field((), max_length=len(EXTRA_METHODS))
    temperature: float = Field(0.0, ge=0, le=2)
    top_k: int = Field(0, ge=0, le=200)
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the query is empty")
        return v

    @model_validator(mode="after")
    def _methods(self) -> "PlayRequest":
        if not self.method.steered:
            raise ValueError(f"the steered column needs a steered method, not '{self.method.value}'")
        if any(m not in EXTRA_METHODS for m in self.extra):
            raise ValueError(f"extra columns: {', '.join(m.value for m in EXTRA_METHODS)}")
        if not self.context.strip():
            raise ValueError("the personal context is empty: steering needs a profile, history or preference")
        return self

    @property
    def context(self) -> str:
        """The three panels as one context text (only the SLM's with-context branch reads it)."""
        parts = [(name, text.strip()) for name, text in
                 (("Profile", self.profile), ("History", self.history), ("Preferences", self.preference))]  # fmt: skip
        return "\n\n".join(f"{name}:\n{text}" for name, text in parts if text)

    @property
    def methods(self) -> tuple[Method, ...]:
        """The columns, left to right: the LLM alone, the steered method, the extras (no repeats)."""
        return tuple(dict.fromkeys((Method.llm, self.method, *self.extra)))

    def config(self) -> GenerationConfig:
        sampling = SamplingConfig(temperature=self.temperature, top_k=self.top_k, max_new_tokens=self.max_new_tokens)
        return GenerationConfig(steering=self.steering(), sampling=sampling)


def context_window(lm) -> int | None:
    """Positions a model reads (llama.cpp: the GGUF's training context; transformers: the config's)."""
    model = getattr(lm, "model", None)
    n = getattr(model, "n_ctx_train", None) or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


def check_fits(cs: CoSteer, req: PlayRequest) -> None:
    """Refuse a context the SLM cannot read with room for the answer (one line for the page)."""
    window = context_window(cs.slm)
    if window is None:
        return
    n = len(cs.prompts(req.query, req.context)["slm_context"])
    if n + req.max_new_tokens > window:
        raise ValueError(f"the context is too long: {n} tokens with the query, and the SLM reads at most "
                         f"{window} including the {req.max_new_tokens} new tokens")  # fmt: skip


class WireTap:
    """Collects the cloud connection's wire-log records, to be taken per stream step."""

    def __init__(self, wire):
        self.wire, self.records = wire, []
        wire.listeners.append(self.records.append)

    def take(self) -> list[dict]:
        out, self.records[:] = list(self.records), []
        return [r | {"data": base64.b64decode(r["b64"])} for r in out if "b64" in r]

    def close(self) -> None:
        self.wire.listeners.remove(self.records.append)


@dataclass
class Column:
    """One method's stream on the page, and what crossed the wire for it."""

    method: Method
    stream: GenerationStream
    chunks: Iterator = field(init=False)
    records: list[dict] = field(default_factory=list)  # wire-log records written while it advanced
    done: bool = False

    def __post_init__(self):
        self.chunks = iter(self.stream)


class Play:
    """One answer. `events()` runs in a worker thread; `stop()` may be called from any thread."""

    def __init__(self, run_id: str, req: PlayRequest, load, lock: threading.Lock):
        self.run_id, self.req, self.load, self.lock = run_id, req, load, lock
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def events(self) -> Iterator[tuple[str, dict]]:
        yield "run", {"run_id": self.run_id}  # first, so that the page can stop it while it waits or loads
        if not self.lock.acquire(timeout=LOCK_WAIT_S):
            yield "error", {"message": "another answer is still running: stop it first"}
            yield "end", {"stopped": False}
            return
        try:
            yield from self._answer()
        except Exception as e:  # noqa: BLE001 - a bug: keep the traceback in the log, tell the page
            log.exception("playground answer %s failed", self.run_id)
            yield "error", {"message": f"internal error (see the server log): {_one_line(e)}"}
            yield "end", {"stopped": self.stopped}
        finally:
            self.lock.release()

    def _answer(self) -> Iterator[tuple[str, dict]]:
        req = self.req
        yield "status", {"message": f"loading LLM={req.llm} SLM={req.slm} …"}
        try:
            cs = self.load(req.llm, req.slm)
            check_fits(cs, req)
            cfg = req.config()
            columns = [Column(m, cs.stream(req.query, req.context, m, cfg.sampling, cfg.steering, inspect=ALTERNATIVES))
                       for m in req.methods]  # fmt: skip
        except USER_ERRORS as e:  # a bad model, a refused or unreachable cloud: one line on the page
            yield "error", {"message": _one_line(e)}
            yield "end", {"stopped": False}
            return
        wire = getattr(cs.llm, "wire", None) if cs.llm.remote else None
        yield "start", self._start_payload(cs, columns, wire)
        tap = WireTap(wire) if wire is not None else None
        try:
            yield from self._decode(cs, columns, tap)
        finally:
            for col in columns:  # a stop or a vanished page: end every stream (and its cloud session)
                col.chunks.close()
                if tap is not None:
                    col.records += tap.take()  # its close frame
            if tap is not None:
                tap.close()
        for col in columns:
            if col.method.uses_llm:
                yield "wire", self._wire_payload(cs, col, tap is not None)
        yield "end", {"stopped": self.stopped}

    def _decode(self, cs: CoSteer, columns: list[Column], tap: WireTap | None) -> Iterator[tuple[str, dict]]:
        """Round robin: one token of each live column per turn, until all end or a stop."""
        tok = cs.llm.tokenizer  # the steered columns' ids are the LLM's
        while not self.stopped and not all(c.done for c in columns):
            for col in columns:
                if col.done or self.stopped:
                    continue
                try:
                    chunk = next(col.chunks, None)
                except USER_ERRORS as e:  # e.g. the cloud went away mid-answer
                    col.done = True
                    yield "error", {"stream": col.method.value, "message": _one_line(e)}
                    continue
                finally:
                    if tap is not None:
                        col.records += tap.take()
                if chunk is None:
                    col.done = True
                    yield "done", self._done_payload(col)
                else:
                    yield "token", _token_payload(col.method, chunk, tok)

    def _start_payload(self, cs: CoSteer, columns: list[Column], wire) -> dict:
        st = self.req.steering()
        return {
            "run_id": self.run_id,
            "streams": [{"method": c.method.value, "help": c.method.spec.help, "steered": c.method.steered,
                         "coefficient": st.coefficient(c.method) if c.method.steered else None} for c in columns],
            "remote": wire is not None,
            "cloud": getattr(cs.llm, "ws_url", None),
            "llm": self.req.llm,
            "slm": self.req.slm,
        }  # fmt: skip

    def _done_payload(self, col: Column) -> dict:
        g = col.stream.generation
        steps = g.steps[1:]  # the first step holds the prefill
        ms = 1000 * sum(s.llm_s + s.slm_s + s.fusion_s + s.sample_s for s in steps) / max(1, len(steps))
        return {"stream": col.method.value, "stop_reason": g.stop_reason, "tokens": len(g.token_ids),
                "ms_per_token": round(ms, 2), "text": g.text}  # fmt: skip

    def _wire_payload(self, cs: CoSteer, col: Column, remote: bool) -> dict:
        """What crossed the wire for this column (remote), or what the in-process LLM was fed."""
        g = col.stream.generation
        out = {"stream": col.method.value, "remote": remote, "llm_prompt_ids": g.prompt_ids.get("llm", [])}
        if not remote:
            return out | {"token_ids": list(g.token_ids)}
        from costeer import frames
        from costeer.device.wire import audit_records

        sent = [r for r in col.records if r["dir"] == "sent"]
        uplink = [frames.decode_uplink(r["data"]) for r in sent if r.get("kind") == "ws-message"]
        report = audit_records(col.records, self.req.context, self.req.query, cs.llm.tokenizer)
        return out | {
            "bytes_up": sum(r["len"] for r in sent),
            "bytes_down": sum(r["len"] for r in col.records if r["dir"] == "received"),
            "messages": len(col.records),
            "prompt_ids": [list(m.prompt_ids) for m in uplink if isinstance(m, frames.Open)],
            "token_ids": [m.token_id for m in uplink if isinstance(m, frames.Token)],
            "session_closed": any(r.get("kind") == "ws-close" for r in sent),
            "audit": {"clean": report.clean, "leaks": report.leaks, "prompt_is_query": report.prompt_is_query},
        }


def _token_payload(method: Method, chunk, llm_tokenizer) -> dict:
    """A token event: the text the step adds and, on a steered column, what steering did to it."""
    step = chunk.step
    out = {"stream": method.value, "i": step.index, "text": chunk.text, "id": step.token_id}
    insp = step.inspection
    if method.steered and insp is not None:
        out |= {"shift": round(insp.shift, 4), "gated": step.gated,
                "before": [[_piece(llm_tokenizer, i), round(p, 4)] for i, p in insp.before],
                "after": [[_piece(llm_tokenizer, i), round(p, 4)] for i, p in insp.after]}  # fmt: skip
    return out


def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def new_run_id() -> str:
    return secrets.token_hex(8)
