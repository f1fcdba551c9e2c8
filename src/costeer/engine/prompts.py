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


def prompt_ids(tokenizer, content: str) -> list[int]:
    """Tokenised prompt: the chat template when the tokenizer has one, plain text otherwise."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(PLAIN_TEMPLATE.format(content=content), add_special_tokens=True)["input_ids"])


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
    if not text.strip() or text.strip() == "None":
        raise ValueError(f"context file {path} is empty")
    return text.strip()
