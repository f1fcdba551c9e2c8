"""One playground answer: the chosen methods decoded side by side, as events for the page.

Each column is one assistant turn of the same public conversation (`chat.reply`, the path of
`costeer chat` and of the gateway): one question, or in chat mode the earlier turns then the new
question. The streams advance in turn, one token each, in the server's worker thread, the one that
owns the models (llama.cpp and torch are driven from one thread at a time). Between tokens it checks
for a stop; a stop closes every stream, which ends its cloud session at once (close code 1000).
With a remote cloud, every wire-log record written while a stream advanced is that stream's, so the
wire panel shows exactly what each answer sent and received.

Events (kind, payload): run, status, start, token, done, error, wire, end (docs/playground.md).
"""

from __future__ import annotations

import base64
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from costeer.api import CoSteer
from costeer.chat import Reply, reply
from costeer.engine.config import GenerationConfig, Method, SamplingConfig, SteeringConfig
from costeer.engine.methods import METHODS
from costeer.errors import CoSteerError

# Bounds on what a page may ask for (the request comes over HTTP: untrusted).
MAX_QUERY_CHARS = 2_000
MAX_SECTION_CHARS = 8_000  # each of profile / history / preference
MAX_NEW_TOKENS = 256
MAX_TURNS = 16  # earlier user turns a chat-mode request may carry
MAX_TURN_CHARS = 4_000  # each earlier turn (a question, or an answer of at most MAX_NEW_TOKENS)
ALTERNATIVES = 5  # tokens shown before / after steering on hover
BASELINE = Method.llm  # the first column of every answer: the LLM alone on the public conversation
# What a user can cause: the API's errors (CoSteerError: PromptTooLong, CloudError, ModelLoadError…)
# and its plain ValueError checks; anything else is a bug: logged with its traceback, and named on the page.
USER_ERRORS = (CoSteerError, ValueError)

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


def offered_methods() -> list[dict]:
    """The methods a page may show, from the method table: every row but the privacy-violating ones
    (they hand the context to the LLM). Whether a row is steered or needs a context comes with it."""
    return [{"name": s.name, "help": s.help, "steered": s.steered, "needs_context": s.needs_context,
             "uses_llm": s.uses_llm, "uses_slm": s.uses_slm} for s in METHODS if not s.privacy_violating]  # fmt: skip


class Turn(BaseModel):
    """An earlier turn of a chat-mode conversation (public: the LLM reads it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_TURN_CHARS)


class PlayRequest(Sliders):
    """What the page sends for one answer (validated once, here)."""

    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    # chat mode: the earlier turns, user and assistant in turn (the assistant's: the steered column's answers)
    turns: tuple[Turn, ...] = Field((), max_length=2 * MAX_TURNS)
    profile: str = Field("", max_length=MAX_SECTION_CHARS)
    history: str = Field("", max_length=MAX_SECTION_CHARS)
    preference: str = Field("", max_length=MAX_SECTION_CHARS)
    # costeer_matched: a PUBLIC profile in the context's format, read by the SLM's without-context branch
    reference: str = Field("", max_length=3 * MAX_SECTION_CHARS)
    llm: str = Field(min_length=1, max_length=200)
    slm: str = Field(min_length=1, max_length=200)
    method: Method = Method.costeer
    extra: tuple[Method, ...] = Field((), max_length=len(METHODS))
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
        shown = [m for m in self.extra if m.privacy_violating]
        if shown:
            raise ValueError(f"extra columns never give the LLM the context: {', '.join(m.value for m in shown)} "
                             "is not offered")  # fmt: skip
        readers = [m.value for m in self.methods if m.needs_context]
        if readers and not self.context.strip():
            raise ValueError(f"the personal context is empty: {', '.join(readers)} read a profile, history or "
                             "preference")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _turns(self) -> "PlayRequest":
        roles = [t.role for t in self.turns]
        if roles != ["user", "assistant"] * (len(roles) // 2) or len(roles) % 2:
            raise ValueError("the earlier turns go user, assistant, user, assistant…")
        return self

    def conversation(self) -> list[dict]:
        """The public conversation every column answers: the earlier turns, then the query."""
        return [t.model_dump() for t in self.turns] + [{"role": "user", "content": self.query}]

    @property
    def context(self) -> str:
        """The three panels as one context text (only the SLM's with-context branch reads it)."""
        parts = [(name, text.strip()) for name, text in
                 (("Profile", self.profile), ("History", self.history), ("Preferences", self.preference))]  # fmt: skip
        return "\n\n".join(f"{name}:\n{text}" for name, text in parts if text)

    @property
    def reference_context(self) -> str | None:
        """The reference panel in the context's format (a profile section), or None when empty."""
        return f"Profile:\n{self.reference.strip()}" if self.reference.strip() else None

    @property
    def methods(self) -> tuple[Method, ...]:
        """The columns, left to right: the LLM alone, the steered method, the extras (no repeats)."""
        return tuple(dict.fromkeys((BASELINE, self.method, *self.extra)))

    def config(self) -> GenerationConfig:
        sampling = SamplingConfig(temperature=self.temperature, top_k=self.top_k, max_new_tokens=self.max_new_tokens)
        return GenerationConfig(steering=self.steering(), sampling=sampling)


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
    """One method's answer on the page, and what crossed the wire for it."""

    method: Method
    reply: Reply
    chunks: Iterator = field(init=False)  # (Chunk | None, text): reply.tokens()
    records: list[dict] = field(default_factory=list)  # wire-log records written while it advanced
    done: bool = False

    def __post_init__(self):
        self.chunks = self.reply.tokens()

    @property
    def generation(self):
        return self.reply.stream.generation


class Play:
    """One answer. `events()` runs in the worker thread that owns the models; `stop()` may be called
    from any thread. The server sends the "run" event itself, before the answer waits for the models."""

    def __init__(self, run_id: str, req: PlayRequest, load):
        self.run_id, self.req, self.load = run_id, req, load
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def events(self) -> Iterator[tuple[str, dict]]:
        if self.stopped:  # stopped while it waited for the models
            yield "end", {"stopped": True}
            return
        try:
            yield from self._answer()
        except Exception as e:  # noqa: BLE001 - a bug: keep the traceback in the log, tell the page
            log.exception("playground answer %s failed", self.run_id)
            yield "error", {"message": f"internal error (see the server log): {_one_line(e)}"}
            yield "end", {"stopped": self.stopped}

    def _answer(self) -> Iterator[tuple[str, dict]]:
        req = self.req
        yield "status", {"message": f"loading LLM={req.llm} SLM={req.slm} …"}
        try:
            cs = self.load(req.llm, req.slm)
            cfg, public = req.config(), req.conversation()
            columns = [Column(m, reply(cs, public, m, req.context, req.reference_context, sampling=cfg.sampling,
                                       steering=cfg.steering, inspect=ALTERNATIVES)) for m in req.methods]  # fmt: skip
        except USER_ERRORS as e:  # a bad model, a prompt too long, a refused or unreachable cloud: one line
            yield "error", {"message": _one_line(e)}
            yield "end", {"stopped": False}
            return
        remote = bool(cs.llm.remote)
        wire = getattr(cs.llm, "wire", None) if remote else None  # a connection kept without a log has none
        yield "start", self._start_payload(cs, columns, remote)
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
                yield "wire", self._wire_payload(cs, col, remote, tap)
        yield "end", {"stopped": self.stopped}

    def _decode(self, cs: CoSteer, columns: list[Column], tap: WireTap | None) -> Iterator[tuple[str, dict]]:
        """Round robin: one token of each live column per turn, until all end or a stop."""
        tok = cs.llm.tokenizer  # the steered columns' ids are the LLM's
        while not self.stopped and not all(c.done for c in columns):
            for col in columns:
                if col.done or self.stopped:
                    continue
                try:
                    token = next(col.chunks, None)
                except USER_ERRORS as e:  # e.g. the cloud went away mid-answer
                    col.done = True
                    yield "error", {"stream": col.method.value, "message": _one_line(e)}
                    continue
                finally:
                    if tap is not None:
                        col.records += tap.take()
                if token is None:
                    col.done = True
                    yield "done", self._done_payload(col)
                else:
                    yield "token", _token_payload(col.method, *token, tok)

    def _start_payload(self, cs: CoSteer, columns: list[Column], remote: bool) -> dict:
        st = self.req.steering()
        return {
            "run_id": self.run_id,
            "streams": [{"method": c.method.value, "help": c.method.spec.help, "steered": c.method.steered,
                         "coefficient": st.coefficient(c.method) if c.method.steered else None} for c in columns],
            "remote": remote,
            "cloud": getattr(cs.llm, "ws_url", None),
            "llm": self.req.llm,
            "slm": self.req.slm,
            "turn": len(self.req.turns) // 2 + 1,  # this question's place in the conversation
            # the public conversation as the LLM reads it (the first column is always BASELINE)
            "llm_prompt_tokens": len(columns[0].generation.prompt_ids["llm"]),
        }  # fmt: skip

    def _done_payload(self, col: Column) -> dict:
        g = col.generation
        steps = g.steps[1:]  # the first step holds the prefill
        ms = 1000 * sum(s.llm_s + s.slm_s + s.fusion_s + s.sample_s for s in steps) / max(1, len(steps))
        return {"stream": col.method.value, "stop_reason": col.reply.finish_reason, "tokens": len(g.token_ids),
                "ms_per_token": round(ms, 2), "text": col.reply.text}  # fmt: skip

    def _wire_payload(self, cs: CoSteer, col: Column, remote: bool, tap: WireTap | None) -> dict:
        """What crossed the wire for this column (a remote LLM with a wire log), or what the LLM was fed."""
        g = col.generation
        out = {"stream": col.method.value, "remote": remote, "logged": tap is not None,
               "llm_prompt_ids": g.prompt_ids.get("llm", [])}  # fmt: skip
        if tap is None:
            return out | {"token_ids": list(g.token_ids)}
        from costeer import frames
        from costeer.device.wire import audit_records

        sent = [r for r in col.records if r["dir"] == "sent"]
        uplink = [frames.decode_uplink(r["data"]) for r in sent if r.get("kind") == "ws-message"]
        opened = [list(m.prompt_ids) for m in uplink if isinstance(m, frames.Open)]
        # the public conversation may be on the wire (the audit allows its text, and checks that every OPEN
        # is exactly its prompt, as the API built it from the turns)
        report = audit_records(col.records, self.req.context, self.req.conversation(), cs.llm.tokenizer)
        return out | {
            "bytes_up": sum(r["len"] for r in sent),
            "bytes_down": sum(r["len"] for r in col.records if r["dir"] == "received"),
            "messages": len(col.records),
            "prompt_ids": opened,
            # one TOKEN per token, or one TOKENS per look-ahead round (docs/wire-format.md)
            "token_ids": [t for m in uplink if isinstance(m, (frames.Token, frames.Tokens))
                          for t in ([m.token_id] if isinstance(m, frames.Token) else m.token_ids)],  # fmt: skip
            "session_closed": any(r.get("kind") == "ws-close" for r in sent),
            "audit": {"clean": report.clean, "leaks": report.leaks, "prompt_is_public": report.prompt_is_query is True},
        }  # fmt: skip


def _token_payload(method: Method, chunk, text: str, llm_tokenizer) -> dict:
    """A token event: the text it lets out and, on a steered column, what steering did to it.
    No chunk: the held-back tail of the answer (chat.Reply.tokens)."""
    if chunk is None:
        return {"stream": method.value, "text": text}
    step = chunk.step
    out = {"stream": method.value, "i": step.index, "text": text, "id": step.token_id}
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
