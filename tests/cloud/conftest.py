"""Tiny models and a cloud server on 127.0.0.1 (uvicorn in a thread) for the split's tests."""

import pytest

from tests.cloud.server_util import ThreadServer
from tests.tiny import bpe_tokenizer, gemma3, llama, make_lm


@pytest.fixture(autouse=True)
def _own_cache(request, tmp_path_factory, monkeypatch):
    """Tokenizers fetched from the cloud go to a per-session folder (real-model tests keep the
    user's cache, where the converted GGUF weights live)."""
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("COSTEER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "costeer-cache"))


@pytest.fixture(scope="session")
def tiny_llm():
    tok = bpe_tokenizer()
    return make_lm("tiny-llm", llama(len(tok), seed=1), tok)


@pytest.fixture(scope="session")
def tiny_slm():
    tok = bpe_tokenizer()
    return make_lm("tiny-slm", gemma3(len(tok), seed=2), tok)


@pytest.fixture(scope="module")
def server(tiny_llm):
    srv = ThreadServer(tiny_llm, max_sessions=12, max_sessions_per_key=6, max_prompt_tokens=64,
                       max_new_tokens=40, idle_timeout_s=30)  # fmt: skip
    yield srv
    srv.stop()
