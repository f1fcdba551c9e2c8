"""The wire log and its audit.

`WireLog` records, as JSON lines, every payload the device sends to or receives from the
cloud: HTTP requests and responses (headers and body), the WebSocket handshake, every
WebSocket message (base64) and close frames. The API key is written as `Bearer <redacted>`.
(WebSocket framing bytes — 2 to 14 per message, masked with random keys — carry no content
and are not recorded.) A few `meta` records annotate the log: the server URL, the
tokenizer fingerprint and where the device keeps that tokenizer, and — when the caller
notes it — the public query, and the turns of a multi-turn conversation (each OPEN's prompt must be
exactly that conversation's prompt: the audit checks it). Meta records are the device's own notes, not wire bytes.

`audit_wire` checks a log against the private context: it reports every word 5-gram of the
context that occurs in what crossed the wire — the raw bytes of every record, and the token
ids of OPEN / ATTACH / TOKEN / TOKENS messages decoded with the LLM's tokenizer — but neither in the
public query nor in the generated text (which the cloud sees by design: it is the answer).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from costeer import frames
from costeer.device.tokenizers import cached_tokenizer

N = 5  # word n-gram length the audit looks for


class WireLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self.sent = self.received = 0
        # called with each record as written (the playground's per-answer wire panel)
        self.listeners: list[Callable[[dict], None]] = []

    def _write(self, rec: dict) -> None:
        with self._lock:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()
            for listen in self.listeners:
                listen(rec)

    def meta(self, **fields) -> None:
        self._write({"t": time.time(), "dir": "meta", **fields})

    def record(self, direction: str, kind: str, data: bytes, **extra) -> None:
        """direction: sent | received; data: the exact payload."""
        if direction == "sent":
            self.sent += len(data)
        else:
            self.received += len(data)
        self._write({"t": time.time(), "dir": direction, "kind": kind, "len": len(data),
                     "b64": base64.b64encode(data).decode("ascii"), **extra})  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._f.close()


def redact_headers(headers) -> str:
    """HTTP headers as text, with the Authorization value hidden."""
    lines = []
    for k, v in headers.items() if hasattr(headers, "items") else headers:
        if k.lower() == "authorization":
            v = v.split(" ", 1)[0] + " <redacted>"
        lines.append(f"{k}: {v}")
    return "\r\n".join(lines)


DIRECTIONS = ("meta", "sent", "received")  # a record's "dir"


def read_wire_log(path: str | Path) -> list[dict]:
    """The records of a wire log, each checked (a log is read as untrusted input: any file may be given);
    a payload's `data` and `len` are those of its `b64`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a wire log (byte {e.start} is not UTF-8)") from None
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            rec = _wire_record(line)
            if rec is None:
                raise ValueError(f"{path}:{i} is not a wire-log record")
            out.append(rec)
    return out


def _wire_record(line: str) -> dict | None:
    """One line of a wire log as a record, or None when it is not one (an eval row, a list, bad base64)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or rec.get("dir") not in DIRECTIONS:
        return None
    if rec["dir"] != "meta":
        try:
            rec["data"] = base64.b64decode(rec.get("b64"), validate=True)
        except (TypeError, ValueError):
            return None
        rec["len"] = len(rec["data"])
    return rec


# ---------------------------------------------------------------------------------------
# Audit
# ---------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def ngrams(text: str, n: int = N) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


@dataclass
class AuditReport:
    leaks: list[str]  # context 5-grams found on the wire outside the query and the answer
    records: int
    bytes_sent: int
    bytes_received: int
    context_ngrams: int
    tokens_decoded: bool  # the uplink token ids were decoded (a tokenizer was available)
    prompt_is_query: bool | None  # every OPEN prompt is exactly the query's prompt (None: unknown)
    generated_text: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.leaks

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("leaks", "records", "bytes_sent", "bytes_received", "context_ngrams", "tokens_decoded",
                 "prompt_is_query", "notes")} | {"clean": self.clean}  # fmt: skip


def _load_tokenizer_for(records: list[dict], tokenizer):
    if tokenizer is not None:
        return tokenizer
    for rec in records:
        if rec.get("dir") == "meta" and rec.get("tokenizer_fingerprint"):
            tok = cached_tokenizer(rec["tokenizer_fingerprint"])
            if tok is not None:
                return tok
    return None


def audit_wire(log_path: str | Path, context: str, query: str | None = None, tokenizer=None) -> AuditReport:
    """Check one wire log (one or more generations) against the private context.

    query: the public query; defaults to the `query` the device noted in the log. Without a
    query, everything on the wire except the generated text counts as a possible leak. Every OPEN's
    prompt must be exactly the prompt of the public conversation the device noted (`messages`, the
    turns of a multi-turn request), or of the one-turn query when none was noted.
    tokenizer: the LLM's tokenizer; defaults to the one the log's fingerprint names in the
    device's cache (without one, only raw bytes are checked)."""
    return audit_records(read_wire_log(log_path), context, query, tokenizer)


def _is_turns(value) -> bool:
    """A noted conversation: a list of {role, content} text turns (a log is read as untrusted input)."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))  # fmt: skip


def _noted(rec: dict) -> str | list | None:
    """The public conversation a meta record notes: its turns, else its query text."""
    if rec.get("dir") != "meta":
        return None
    if _is_turns(rec.get("messages")):
        return rec["messages"]
    q = rec.get("query")
    return q if isinstance(q, str) and q.strip() else None


def _public_text(public: str | list) -> str:
    return public if isinstance(public, str) else "\n".join(m["content"] for m in public)


def _public_prompt(tok, public: str | list) -> list[int] | None:
    """The LLM prompt of a public query or conversation, as the API builds it (None: not a conversation)."""
    from costeer.engine.prompts import chat_ids, conversation

    try:
        return chat_ids(tok, conversation(public))
    except ValueError:  # a noted conversation the API would have refused: no prompt can match it
        return None


def audit_records(records: list[dict], context: str, query: str | list | None = None, tokenizer=None) -> AuditReport:
    """`audit_wire` on records already read (each with its payload as `data` bytes); `query` may be the
    public conversation's turns."""
    given = query
    texts = [_public_text(query)] if query is not None else [_public_text(n) for n in map(_noted, records) if n]
    tok = _load_tokenizer_for(records, tokenizer)
    notes: list[str] = []
    wire_texts: list[str] = []
    generated: list[list[int]] = []  # one token list per generation (OPEN starts one)
    prompts: list[list[int]] = []
    public: list = []  # per OPEN: the public conversation (turns, or the query) its prompt must be
    noted = given  # the conversation the device noted last (a log may hold several runs)
    for rec in records:
        if given is None:
            noted = _noted(rec) or noted
        data = rec.get("data")
        if data is None:
            continue
        wire_texts.append(data.decode("utf-8", errors="ignore"))
        if rec.get("kind") != "ws-message" or rec.get("dir") != "sent":
            continue
        try:
            msg = frames.decode_uplink(data)
        except frames.FrameError as e:
            notes.append(f"unreadable uplink frame: {e.reason}")
            continue
        if isinstance(msg, frames.Open):
            new = list(msg.generated)
            resumed = bool(new) and generated and prompts[-1] == list(msg.prompt_ids)
            resumed = resumed and new[: len(generated[-1])] == generated[-1]
            prompts.append(list(msg.prompt_ids))
            public.append(noted)
            if resumed:  # a resume of the same generation (the tokens so far, maybe one more)
                generated[-1] = new
            else:
                generated.append(new)
        elif isinstance(msg, frames.Attach):
            lost = list(msg.tail())  # the round whose answer was lost, re-sent
            if generated and lost and msg.n_generated == len(generated[-1]) + len(lost):
                generated[-1].extend(lost)
        elif isinstance(msg, (frames.Token, frames.Tokens)):  # one token, or one look-ahead round's
            if not generated:
                notes.append("TOKEN before any OPEN")
                generated.append([])
            generated[-1].extend([msg.token_id] if isinstance(msg, frames.Token) else msg.token_ids)
    gen_text = ""
    prompt_is_query = None
    if tok is not None:
        for p in prompts:
            wire_texts.append(tok.decode(p, skip_special_tokens=True))
        gen_texts = [tok.decode(g, skip_special_tokens=True) for g in generated]
        gen_text = "\n".join(gen_texts)
        if prompts and all(x is not None for x in public):
            prompt_is_query = all(p == _public_prompt(tok, x) for p, x in zip(prompts, public))
            if not prompt_is_query:
                notes.append("an OPEN prompt is not exactly the public query's prompt")
    else:
        notes.append("no tokenizer: uplink token ids were not decoded, only raw bytes checked")
    ctx = ngrams(context)
    allowed = set().union(*(ngrams(t) for t in texts))  # every public query or conversation noted
    for t in gen_texts if tok is not None else ():
        allowed |= ngrams(t)
    found: set[tuple[str, ...]] = set()
    for text in wire_texts:
        found |= ngrams(text) & ctx
    leaks = sorted(" ".join(g) for g in found - allowed)
    sent = sum(r.get("len", 0) for r in records if r.get("dir") == "sent")
    received = sum(r.get("len", 0) for r in records if r.get("dir") == "received")
    return AuditReport(leaks, len(records), sent, received, len(ctx), tok is not None, prompt_is_query, gen_text, notes)
