"""The playground on tiny models: a loader that knows two specs, SSE parsing, a live server (the
gateway's app with the playground's router: the one server both commands run)."""

from __future__ import annotations

import json
import time
from dataclasses import fields

import pytest

from costeer.engine.models import LM
from costeer.gateway import create_app
from costeer.playground import Models, PlaygroundSettings, playground_router
from tests.cloud.conftest import _own_cache, server, tiny_llm, tiny_slm  # noqa: F401 (fixtures)
from tests.servers import UvicornThread

QUERY = "what should I cook tonight"
PROFILE = "my name is Sam, I live in Seattle and I like spicy tofu"
STEP_DELAY_S = 0.02  # SlowLM: a stop lands mid-answer


def request_body(**over) -> dict:
    body = {"query": QUERY, "profile": PROFILE, "llm": "tiny-llm", "slm": "tiny-slm", "max_new_tokens": 16}
    return body | over


def sse_events(lines) -> list[tuple[str, dict]]:
    """text/event-stream lines -> [(event, data)] (keep-alive comments skipped)."""
    out, kind, data = [], "message", []
    for line in lines:
        if not line:
            if data:
                out.append((kind, json.loads("\n".join(data))))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return out


class SlowLM(LM):
    """Every forward after the prefill waits a little, so that a stop lands mid-answer; `advances`
    counts those forwards."""

    advances = 0

    def open(self, prompts, reserve=1024, prefix=None):
        return _SlowBatch(self, super().open(prompts, reserve, prefix))


class _SlowBatch:
    def __init__(self, lm: SlowLM, inner):
        self.lm, self.inner = lm, inner

    def start(self):
        return self.inner.start()

    def advance(self, tokens):
        time.sleep(STEP_DELAY_S)
        self.lm.advances += 1
        return self.inner.advance(tokens)

    def extend(self, tokens):
        return self.inner.extend(tokens)

    def close(self):
        self.inner.close()


def slow(lm: LM) -> SlowLM:
    return SlowLM(**{f.name: getattr(lm, f.name) for f in fields(lm)})


@pytest.fixture(scope="module")
def lms(tiny_llm, tiny_slm):
    return {"tiny-llm": tiny_llm, "tiny-slm": tiny_slm, "slow-llm": slow(tiny_llm)}


def make_models(lms, **settings) -> Models:
    s = PlaygroundSettings(**({"llm": "tiny-llm", "slm": "tiny-slm", "models": ("slow-llm",)} | settings))
    return Models(s, load_lm=lms.__getitem__)


def playground_app(models: Models, prefix: str = ""):
    """What `costeer playground` serves: the gateway's app, no /v1 API, the page at `prefix` (/)."""
    return create_app(None, routers=[playground_router(models, prefix=prefix)])


@pytest.fixture
def live(lms):
    """Start playground apps on tiny models; all stopped at the end of the test."""
    started = []

    def start(**settings) -> UvicornThread:
        srv = UvicornThread(playground_app(make_models(lms, **settings)))
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()
