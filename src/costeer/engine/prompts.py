"""Prompts and the personal context.

The public query alone goes to the LLM (and the SLM's base branch). The personal context
goes only into the SLM's with-context branch — and into `llm_context`, the baseline that
deliberately breaks privacy.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# Plain-text framing for models without a chat template (base models such as Gemma-3-270m).
PLAIN_TEMPLATE = "User: {content}\nAssistant:"


def user_message(query: str, context: str | None = None) -> str:
    """The user turn: the context (when given) followed by the query."""
    return f"{context.strip()}\n\n{query.strip()}" if context else query.strip()


def prompt_text(tokenizer, content: str) -> str:
    """The prompt as text: the chat template around the user turn, or the plain framing."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    return PLAIN_TEMPLATE.format(content=content)


def _encode(tokenizer, text: str) -> list[int]:
    # a chat template writes its own special tokens; the plain framing takes the tokenizer's (BOS)
    special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(tokenizer, content: str) -> list[int]:
    """Tokenised prompt: the chat template when the tokenizer has one, plain text otherwise."""
    return _encode(tokenizer, prompt_text(tokenizer, content))


def stable_prefix_len(tokenizer, content: str, query: str, context: str | None = None) -> int:
    """How many tokens of `prompt_ids(tokenizer, content)` do not depend on the query: the KV prefix cache
    keeps the model's state after them (engine/prefix_cache.py).

    The stable text is the user turn up to the query's last occurrence (`user_message(query, context)`,
    CoGenesis' `personalized_input`, the matched reference: context first, query last), else, where the
    turn does not hold the query verbatim, the context when the turn starts with it; otherwise nothing.
    In tokens: the longest common prefix of the prompt and its text cut where the stable text ends, so a
    token the query's first characters could merge into is left out; never the whole prompt."""
    q = query.strip()
    cut = content.rfind(q) if q else -1
    if cut <= 0 and context and content.startswith(context.strip()):
        cut = len(context.strip())
    if cut <= 0:
        return 0
    text = prompt_text(tokenizer, content)
    start = text.find(content)
    if start < 0:  # a template that rewrites the turn: no prefix to trust
        return 0
    full, head = _encode(tokenizer, text), _encode(tokenizer, text[: start + cut])
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
    if not p.is_file():
        raise FileNotFoundError(f"context file not found: {path}")
    raw = p.read_text(encoding="utf-8")
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
    if not text.strip() or text.strip() == "None":
        raise ValueError(f"context file {path} is empty")
    return text.strip()
