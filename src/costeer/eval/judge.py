"""LLM-as-judge for CoGenesis: the paper's two prompts (Appendix B.4), an OpenAI-compatible client, a parser.

The paper says it uses "exactly the same prompt as Cogenesis"; the wording below is Appendix B.4's (Figures 6
and 7, including its "an evaluate" typo) laid out with CoGenesis's line breaks and quotes around the rating
format, which the paper's typesetting drops. ``profile_info`` / ``writing_history`` come from the CoGenesis
``personalized_input`` sections ("## User Profile", "## User Writing History").
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .tasks import Example, cogenesis_sections

_FORMAT_RULE = (
    'After providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following '
    'this format: "[[rating]]", for example: "Rating: [[5]]".'
)
_TAIL = (
    "[User Profile and Writing History]\n{profile_info}\n{writing_history}\n\n"
    "[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)

OVERALL_PROMPT = (
    "[Instruction]\n"
    "Please act as an impartial evaluator and assess the quality of the AI assistant's response to the user "
    "question shown below. Your assessment should focus on how well the response aligns with the user's "
    "personalized profile and writing history. Evaluate factors such as the response's adherence to the user's "
    "personal style, consistency with their profile, helpfulness, relevance, accuracy, depth, creativity, and "
    "level of detail. Begin your evaluation by providing a short explanation. Be as objective as possible. "
    f"{_FORMAT_RULE}\n\n{_TAIL}"
)

PERSONAL_PROMPT = (
    "[Instruction]\n"
    "Please act as an impartial judge an evaluate the AI assistant's response based on its alignment with the "
    "user's personal profile and writing history. Focus your assessment on the personalization aspects of the "
    "response, including its adherence to the user's unique style, preferences, and consistency with their "
    "profile. Consider how well the response addresses the user's individual needs and interests. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. "
    f"{_FORMAT_RULE}\n\n{_TAIL}"
)

PROMPTS = {"overall": OVERALL_PROMPT, "personal": PERSONAL_PROMPT}

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def parse_rating(reply: str | None) -> float | None:
    """The judge's ``[[rating]]`` in 1..10, or None when missing, malformed or out of range.

    The last bracketed number wins: a judge that quotes the format example ("Rating: [[5]]") before giving
    its own verdict is still read correctly.
    """
    if not reply:
        return None
    found = _RATING.findall(reply)
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None


def judge_fields(example: Example) -> dict[str, str]:
    """profile_info, writing_history and question for a CoGenesis example, as CoGenesis formats them."""
    sec = cogenesis_sections(example.raw.get("personalized_input", example.context))
    profile = sec.get("User Profile", "")
    return {
        "profile_info": profile + "\n" if profile else "",
        "writing_history": sec.get("User Writing History", ""),
        "question": example.query,
    }


def build_prompt(kind: str, example: Example, answer: str) -> str:
    """The filled judge prompt; ``kind`` is "overall" or "personal"."""
    if kind not in PROMPTS:
        raise ValueError(f"unknown judge prompt {kind!r}; choose one of: {', '.join(PROMPTS)}")
    return PROMPTS[kind].format(**judge_fields(example), answer=answer)


class JudgeError(RuntimeError):
    """The judge endpoint failed or answered in an unexpected shape."""


@dataclass
class JudgeClient:
    """Minimal client for any OpenAI-compatible ``/chat/completions`` endpoint (stdlib only).

    ``base_url`` is the API root, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1".
    The paper's judge was gpt-4o-2024-08-06 at its defaults; we ask for temperature 0 for repeatability.
    """

    base_url: str
    api_key: str | None = None
    model: str = "gpt-4o-2024-08-06"
    temperature: float = 0.0
    max_tokens: int = 1024
    timeout: float = 120.0
    retries: int = 2

    def complete(self, prompt: str) -> str:
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        last: Exception | None = None
        for _ in range(self.retries + 1):
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload: Any = json.loads(resp.read().decode())
                return str(payload["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as err:
                last = err
                if err.code < 500 and err.code != 429:  # client errors do not improve on retry
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = err
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as err:
                raise JudgeError(f"judge endpoint {url} returned an unexpected body: {err!r}") from err
        raise JudgeError(f"judge endpoint {url} failed: {last}") from last

    def rate(self, kind: str, example: Example, answer: str) -> tuple[float | None, str]:
        """(rating or None, the judge's full reply)."""
        reply = self.complete(build_prompt(kind, example, answer))
        return parse_rating(reply), reply
