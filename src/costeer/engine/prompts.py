"""Prompts and the personal context.

The public conversation alone goes to the LLM (and the SLM's base branch). The personal context
goes only into the SLM's with-context branch — and into `llm_context`, the baseline that
deliberately breaks privacy.

A query is a conversation of one user turn. The context (or a matched reference profile) is put
before the content of the FIRST user turn, the layout of `user_message`: a conversation's earlier
turns, and so the context, stay a stable prefix of every later turn's with-context prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

# Plain-text framing for models without a chat template (base models such as Gemma-3-270m): one
# `Role: content` line a turn, then the assistant's cue. A single user turn reads PLAIN_TEMPLATE.
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_TEMPLATE = "User: {content}\nAssistant:"
# Where a base model's answer ends under plain turns: it starts writing the next user turn.
PLAIN_STOP = "\nUser:"
ROLES = tuple(PLAIN_ROLES)

Messages = list[dict[str, str]]  # [{"role": "system" | "user" | "assistant", "content": text}, ...]


def user_message(query: str, context: str | None = None) -> str:
    """The user turn: the context (when given) followed by the query."""
    return f"{context.strip()}\n\n{query.strip()}" if context else query.strip()


def check_text(text: str, what: str) -> str:
    """`text` unchanged, or ValueError when it holds characters no UTF-8 can carry: the lone surrogates
    Python makes of argv / stdin bytes that are not UTF-8 (a Latin-1 terminal); no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not UTF-8 text (character {e.start} is a byte that is not UTF-8); "
                         "give it as UTF-8") from None  # fmt: skip
    return text


def conversation(query: str | Sequence[Mapping[str, str]]) -> Messages:
    """A query or a list of turns as checked turns (contents stripped): roles in ROLES, text contents,
    and a last turn from the user that is not empty."""
    if isinstance(query, str):
        query = [{"role": "user", "content": query}]
    if not query:
        raise ValueError("the conversation is empty")
    turns = []
    for i, m in enumerate(query):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, Mapping) else (None, None)
        if role not in PLAIN_ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: the content must be text")
        check_text(content, "the query" if i == len(query) - 1 else f"message {i}")
        turns.append({"role": role, "content": content.strip()})
    if turns[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user turn")
    if not turns[-1]["content"]:
        raise ValueError("the query is empty")
    return turns


def first_user(messages: Messages) -> str:
    """The text of the conversation's first user turn (where the context goes)."""
    return next(m["content"] for m in messages if m["role"] == "user")


def first_user_turn(messages: Messages, content: str) -> Messages:
    """The conversation with its first user turn's content replaced by `content`."""
    i = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return [*messages[:i], {"role": "user", "content": content}, *messages[i + 1 :]]


def with_context(messages: Messages, context: str) -> Messages:
    """The conversation with `context` before its first user turn (the with-context branch's layout)."""
    return first_user_turn(messages, user_message(first_user(messages), context))


def chat_ids(tokenizer, messages: Messages) -> list[int]:
    """Tokenised conversation with the assistant's cue: the chat template when the tokenizer has one,
    plain-text turns otherwise. A template that refuses the conversation raises ValueError."""
    text, special = _chat_text(tokenizer, messages)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_text(tokenizer, messages: Messages) -> tuple[str, bool]:
    """-> (the conversation as prompt text, whether the tokenizer adds its special tokens: a chat template
    writes its own, plain turns take the tokenizer's BOS)."""
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:
            raise ValueError(f"the model's chat template refuses this conversation: {e}") from None
        return text, False
    return plain_turns(messages), True


def plain_turns(messages: Messages) -> str:
    """`Role: content` lines, then the assistant's cue (PLAIN_TEMPLATE for one user turn)."""
    lines = [f"{PLAIN_ROLES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines) + f"\n{PLAIN_ROLES['assistant']}:"


def prompt_ids(tokenizer, content: str) -> list[int]:
    """Tokenised prompt of one user turn (see chat_ids)."""
    return chat_ids(tokenizer, [{"role": "user", "content": content}])


def stable_prefix_len(tokenizer, content: str, query: str, context: str | None = None,
                      ids: list[int] | None = None, head: bool = False) -> int:  # fmt: skip
    """How many tokens of `prompt_ids(tokenizer, content)` do not depend on the query: the KV prefix cache
    keeps the model's state after them (engine/prefix_cache.py).

    The stable text is the user turn up to the query's last occurrence (`user_message(query, context)`,
    CoGenesis' `personalized_input`, the matched reference: context first, query last), else, where the
    turn does not hold the query verbatim, the context when the turn starts with it; otherwise nothing,
    or with `head` (a turn that starts with the query: the public prompt) the chat template's text before
    the turn (a default system prompt, the role markers), the same for every query.
    In tokens: the longest common prefix of the prompt and its text cut where the stable text ends, so a
    token the query's first characters could merge into is left out; never the whole prompt. `ids`: the
    prompt's tokens when already at hand (`prompt_ids(tokenizer, content)`), not tokenised again."""
    q = query.strip()
    cut = content.rfind(q) if q else -1
    if cut <= 0 and context and content.startswith(context.strip()):
        cut = len(context.strip())
    if cut < 0 or (cut == 0 and not head):
        return 0
    text, special = _chat_text(tokenizer, [{"role": "user", "content": content}])
    start = text.find(content)
    if start < 0:  # a template that rewrites the turn: no prefix to trust
        return 0
    full = ids if ids is not None else list(tokenizer(text, add_special_tokens=special)["input_ids"])
    head = list(tokenizer(text[: start + cut], add_special_tokens=special)["input_ids"])
    n = 0
    for a, b in zip(full, head):
        if a != b:
            break
        n += 1
    return min(n, len(full) - 1)


def render_context(data: object, indent: str = "") -> str:
    """Structured context (from JSON / YAML) as readable lines: `key: value`, `- item`."""
    if isinstance(data, dict):
        lines = []
        for k, v in data.items():
            if isinstance(v, (dict, list)):
                lines.append(f"{indent}{k}:")
                lines.append(render_context(v, indent + "  "))
            else:
                lines.append(f"{indent}{k}: {v}")
        return "\n".join(lines)
    if isinstance(data, list):
        return "\n".join(
            f"{indent}-\n{render_context(v, indent + '  ')}" if isinstance(v, (dict, list)) else f"{indent}- {v}"
            for v in data
        )
    return f"{indent}{data}"


def load_context(path: str | Path) -> str:
    """A profile / history file as text: .txt/.md as is, .json / .yaml / .yml rendered."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"context file {path} is a folder: give the file")
    if not p.is_file():
        raise FileNotFoundError(f"context file not found: {path}")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"context file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            text = render_context(json.loads(raw))
        elif suffix in (".yaml", ".yml"):
            text = render_context(yaml.safe_load(raw))
        else:
            text = raw
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0]
        raise ValueError(f"context file {path} is not valid {suffix[1:].upper()}: {first}") from None
    except RecursionError:  # the parsers and render_context recurse once per level
        raise ValueError(f"context file {path} is nested too deeply to be a profile") from None
    if not text.strip() or text.strip() == "None":
        raise ValueError(f"context file {path} is empty")
    return text.strip()
