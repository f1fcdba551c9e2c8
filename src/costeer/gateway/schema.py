"""The OpenAI chat-completions shapes the gateway reads and writes.

A request body is untrusted: it is decoded and validated here, once, into `ChatRequest`, and any
problem becomes an `ApiError` (the OpenAI error shape, `{"error": {message, type, param, code}}`,
with its HTTP status). Unknown fields are ignored, as OpenAI-compatible servers do; fields the
gateway cannot honour (n > 1, log-probabilities, tools, response formats, logit biases, penalties) are
refused rather than silently dropped, unless they are at their neutral values.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated

import pydantic_core
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from costeer.engine.config import SEED_MAX, SEED_MIN

MAX_STOPS = 4  # OpenAI's own limit on `stop`
MAX_STOP_CHARS = 256


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}  # fmt: skip

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _text(content):
    """A message's content as text: a string, null (an assistant turn that only called a tool), or
    text parts (the newer OpenAI shape), read as their concatenation. Other parts are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(_is_text_part(p) for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError("the content must be a string or a list of text parts ({'type': 'text', 'text': ...})")


def _is_text_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str  # checked against the chat roles by costeer.engine.prompts.conversation
    content: Annotated[str, BeforeValidator(_text)] = ""

    @field_validator("role", mode="after")
    @classmethod
    def _developer_is_system(cls, v):
        """OpenAI's newer name for the system turn (its client sends it for reasoning models)."""
        return "system" if v == "developer" else v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Sampling fields left out take the gateway's defaults."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name; wins over max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM and llama-server accept it too
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(None, validate_default=True)  # read as a list
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # fields this server cannot honour: accepted at their neutral values, refused otherwise
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    functions: list | None = None  # the older name of tools
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    logit_bias: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, v, info):
        """OpenAI reads null as the field left out (some clients send every field)."""
        return cls.model_fields[info.field_name].default if v is None else v

    @field_validator("stop", mode="after")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings of 1 to {MAX_STOP_CHARS} characters")
        return stops

    def new_tokens(self, default: int, limit: int) -> int:
        """The answer's token budget, checked against the gateway's limit."""
        given = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        name = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if given is None:
            return min(default, limit)
        if given <= 0 or given > limit:
            raise ApiError(400, f"{name} must be between 1 and {limit}, got {given}", "invalid_value", name)
        return given

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise ApiError(400, "only n = 1 is supported", "invalid_value", "n")
        neutral = {  # each field -> whether it asks for nothing that would be silently ignored
            "logprobs": not self.logprobs,
            "top_logprobs": not self.top_logprobs,
            "tools": not self.tools,
            "functions": not self.functions,
            "tool_choice": self.tool_choice in (None, "none"),
            "response_format": (self.response_format or {}).get("type", "text") == "text",
            "logit_bias": not self.logit_bias,
            "presence_penalty": not self.presence_penalty,
            "frequency_penalty": not self.frequency_penalty,
        }
        for name, ok in neutral.items():
            if not ok:
                raise ApiError(400, f"{name} is not supported by this server", "unsupported_parameter", name)


def parse_request(body: bytes) -> ChatRequest:
    """Raw body -> ChatRequest, or ApiError(400) naming the first problem (never echoing values)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8", "invalid_encoding") from None
    try:
        # pydantic's parser, not json's: it bounds the nesting depth (json.loads recurses until
        # RecursionError) and refuses lone surrogate escapes, which no tokenizer can encode
        data = pydantic_core.from_json(text)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", "invalid_value", where or None) from None
    req.refuse_unsupported()
    return req


# -- answers ------------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def completion(cid: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    """The non-streaming answer."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],  # fmt: skip
        "usage": usage_,
        "system_fingerprint": None,
    }


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:  # fmt: skip
    """One streamed chunk; the usage chunk (stream_options.include_usage) has no choices. Every
    chunk of a stream has the stream's `created` (OpenAI's rule), not the time it is sent."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None}  # fmt: skip
    if usage_ is not None:
        out.update(choices=[], usage=usage_)
    else:
        out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    return out


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or `data: [DONE]`) and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def models(names: list[str], created: int) -> dict:
    data = [{"id": n, "object": "model", "created": created, "owned_by": "costeer"} for n in names]
    return {"object": "list", "data": data}
