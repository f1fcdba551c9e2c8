"""Chat over CoSteer: a public conversation in, one assistant turn out.

`reply` is the one code path of `costeer chat` and of the gateway's /v1/chat/completions: it
checks the conversation, puts the private context (and, for `costeer_matched`, the public
reference profile) before the first user turn of the SLM's branches only, streams the answer,
and cuts it at a stop string. `Chat` keeps a terminal session's public history.

    chat = Chat(cs, method="costeer", context="I live in Lisbon and surf.")
    reply = chat.say("Plan my weekend.")
    for piece in reply:
        print(piece, end="")
    chat.keep(reply)          # the answer joins the public history for the next turn
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from costeer.api import Chunk, CoSteer, GenerationStream
from costeer.engine.config import Method
from costeer.engine.prompts import PLAIN_STOP, Messages, chat_ids, conversation, first_user, user_message


class StopText:
    """Cuts streamed text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.keep = max((len(s) - 1 for s in self.stops), default=0)  # longest partial match
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was reached)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = len(self.pending) - self.keep
        out, self.pending = (self.pending[:cut], self.pending[cut:]) if cut > 0 else ("", self.pending)
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Reply:
    """One assistant turn. Iterate for its text pieces; then `text`, `finish_reason`
    ("stop": the model's end or a stop string, "length": the token limit) and the token counts."""

    stream: GenerationStream
    stops: tuple[str, ...]
    prompt_tokens: int  # the public conversation in the answering model's tokens (never the context)
    text: str = ""
    finish_reason: str = "length"
    _done: bool = field(default=False, repr=False)

    def __iter__(self) -> Iterator[str]:
        tokens = self.tokens()
        try:
            for _, piece in tokens:
                if piece:
                    yield piece
        finally:
            tokens.close()  # a cloud session ends as soon as the turn does

    def tokens(self) -> Iterator[tuple[Chunk | None, str]]:
        """Each streamed token with the text it lets out once stop strings are cut: a tail that may
        begin one is held back and let out with a later token, or at the end as (None, tail). For a
        caller that shows each token (the playground's heat-map); iterating the reply gives the text."""
        if self._done:
            raise RuntimeError("a reply streams once")
        self._done = True
        cut = StopText(self.stops)
        chunks = iter(self.stream)
        try:
            for chunk in chunks:
                piece, hit = cut.push(chunk.text)
                self.text += piece
                yield chunk, piece
                if hit:
                    self.finish_reason = "stop"
                    return
            tail = cut.flush()
            if tail:
                self.text += tail
                yield None, tail
            self.finish_reason = self.stream.generation.stop_reason
        finally:
            chunks.close()  # a cloud session ends as soon as the turn does

    @property
    def completion_tokens(self) -> int:
        return len(self.stream.generation.token_ids)


def reply(cs: CoSteer, messages: str | Messages, method: Method | str = Method.costeer, context: str | None = None,
          reference: str | None = None, stop: Sequence[str] = (), **overrides) -> Reply:  # fmt: skip
    """Start the assistant's next turn of a public conversation (nothing runs until it is iterated).

    context: the private profile, read only by the SLM's with-context branch. reference: for
    `costeer_matched`, a public profile in the context's format that the SLM's without-context
    branch reads in the same place. stop: strings that end the answer (not included); a model with
    plain-text turns also ends where it starts the next user turn. Overrides: as CoSteer.stream."""
    method = Method(method)
    public = conversation(messages)
    ref = user_message(first_user(public), reference) if reference and method.matched else None
    stream = cs.stream(public, context, method, reference_message=ref, **overrides)
    answerer = cs.llm if method.uses_llm else cs.slm
    stops = tuple(stop) + (() if getattr(answerer.tokenizer, "chat_template", None) else (PLAIN_STOP,))
    return Reply(stream, stops, len(chat_ids(answerer.tokenizer, public)))


class Chat:
    """A terminal conversation: the public history, and the private context beside it."""

    def __init__(self, cs: CoSteer, method: Method | str = Method.costeer, context: str | None = None,
                 reference: str | None = None, system: str | None = None, **overrides):  # fmt: skip
        self.cs, self.method, self.context, self.reference = cs, Method(method), context, reference
        self.overrides = overrides
        self.system = [{"role": "system", "content": system}] if system and system.strip() else []
        self.history: Messages = list(self.system)
        self._asked: Messages = []  # the history and the user turn `say` answers

    def say(self, text: str) -> Reply:
        """The assistant's answer to a new user turn (the turn joins the history once kept)."""
        self._asked = [*self.history, {"role": "user", "content": text}]
        return reply(self.cs, self._asked, self.method, self.context, self.reference, **self.overrides)

    def keep(self, answer: Reply) -> None:
        """Add the user turn and its streamed answer to the public history."""
        self.history = [*self._asked, {"role": "assistant", "content": answer.text}]

    def reset(self) -> None:
        """Forget the conversation (the system prompt and the context stay)."""
        self.history = list(self.system)
