"""The cloud adapter for serving engines, against the real third-party server: upstream
llama.cpp's `llama-server` (built from source by scripts/build_llamacpp.sh), started on
loopback by the test with the SmolLM2 GGUF. Same greedy tokens as in-process generation on the
same GGUF through llama.cpp; the engine restarting mid-generation loses nothing."""

import threading
from pathlib import Path

import pytest
import yaml

from costeer.api import CoSteer
from costeer.device import CloudError, connect_engine
from costeer.device.client import Retry
from costeer.engine.prompts import render_context
from tests.device.llama_server import LlamaServer, find_llama_server

pytestmark = pytest.mark.real

PERSONA = yaml.safe_load((Path(__file__).parents[2] / "src/costeer/examples/persona.yaml").read_text())
QUERY, CONTEXT = PERSONA["query"], render_context(PERSONA["profile"])
N = 32


@pytest.fixture(scope="module")
def engine(smollm2_cpp, tmp_path_factory):
    binary = find_llama_server()
    if binary is None:
        pytest.skip("llama-server not built: run scripts/build_llamacpp.sh (make setup does)")
    srv = LlamaServer(binary, smollm2_cpp.model.path, log=tmp_path_factory.mktemp("llama") / "server.log").start()
    yield srv
    srv.stop()


def test_llm_through_llama_server_equals_in_process(engine, smollm2_cpp, smollm2):
    llm = connect_engine(engine.url, "smollm2-135m-instruct", api="auto", k=64, lookahead="off")
    assert llm.api == "llamacpp" and llm.vocab_size == smollm2_cpp.vocab_size
    got = CoSteer(llm, None).generate(QUERY, method="llm", max_new_tokens=N)
    want = CoSteer(smollm2_cpp, None).generate(QUERY, method="llm", max_new_tokens=N)
    assert got.token_ids == want.token_ids and got.text == want.text
    assert llm.requests == len(got.token_ids) + (got.stop_reason == "stop")
    # against the dequantised float32 transformers model the numerics differ (q8 activations):
    # the floor is 95% of positions with the same greedy token
    hf = CoSteer(smollm2, None).generate(QUERY, method="llm", max_new_tokens=N)
    same = sum(a == b for a, b in zip(got.token_ids, hf.token_ids)) / max(len(got.token_ids), len(hf.token_ids))
    assert same >= 0.95 or got.token_ids[:8] == hf.token_ids[:8]


def test_costeer_through_llama_server_equals_in_process(engine, smollm2_cpp):
    """The SLM pair runs here while llama-server answers; with LLM = SLM the SLM-tail rebuilds
    what the top-k left out, so the default k gives the in-process tokens."""
    llm = connect_engine(engine.url, "smollm2-135m-instruct", api="llamacpp", k=256)
    got = CoSteer(llm, smollm2_cpp).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    want = CoSteer(smollm2_cpp, smollm2_cpp).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_k": 0, "seed": 5}], ids=["greedy", "seeded"])
def test_chains_through_llama_server_give_the_per_token_tokens(engine, smollm2_cpp, sampling):
    """One request of n_predict = d with n_probs per position (issue #14 item 4): the same tokens as
    one request per token, in fewer requests."""
    runs = {}
    for lookahead in ("off", 4):
        llm = connect_engine(engine.url, "smollm2-135m-instruct", api="llamacpp", k=256, lookahead=lookahead)
        got = CoSteer(llm, smollm2_cpp).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N, **sampling)
        runs[lookahead] = (got.token_ids, llm.requests)
    assert runs[4][0] == runs["off"][0]
    assert runs["off"][1] == len(runs["off"][0]) and runs[4][1] < runs["off"][1]


def test_chains_over_a_slow_link_keep_the_tokens(engine, smollm2_cpp):
    """Through the delay relay (a 100 ms round trip): the in-process tokens, in fewer requests than
    tokens, and the round trip that auto weighs is the link's. (Whether auto takes chains depends on
    the engine's and the device's speed against the link: tests/device/test_engine_chain.py.)"""
    from tests.device.relay import DelayRelay

    want = CoSteer(smollm2_cpp, smollm2_cpp).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    with DelayRelay(engine.port, 0.1) as relay:
        llm = connect_engine(relay.url(), "smollm2-135m-instruct", api="llamacpp", k=256, lookahead=4)
        assert llm.rtt_s >= 0.1
        got = CoSteer(llm, smollm2_cpp).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    assert got.token_ids == want.token_ids
    assert llm.requests < len(got.token_ids)


def test_engine_restart_mid_generation_loses_nothing(smollm2_cpp, tmp_path):
    binary = find_llama_server()
    if binary is None:
        pytest.skip("llama-server not built")
    srv = LlamaServer(binary, smollm2_cpp.model.path, log=tmp_path / "server.log").start()
    try:
        want = CoSteer(smollm2_cpp, smollm2_cpp).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
        llm = connect_engine(srv.url, "smollm2-135m-instruct", api="llamacpp", k=256,
                             retry=Retry(budget_s=30, backoff_s=0.2, max_backoff_s=2.0))
        cs = CoSteer(llm, smollm2_cpp)
        chunks = []
        restarted = threading.Event()
        for chunk in cs.stream(QUERY, CONTEXT, "costeer", max_new_tokens=N):
            chunks.append(chunk)
            if len(chunks) == N // 2 and not restarted.is_set():
                srv.stop()  # killed: the next request finds no server …
                threading.Timer(1.0, srv.start).start()  # … until it comes back, on the same port
                restarted.set()
        assert [c.step.token_id for c in chunks] == want.token_ids
    finally:
        srv.stop()


def test_engine_with_another_tokenizer_is_refused(engine):
    with pytest.raises(CloudError, match="tokenises differently"):
        connect_engine(engine.url, "gemma3-270m", api="llamacpp")


def test_cli_generate_through_llama_server(engine, smollm2_cpp, tmp_path):
    import json

    from typer.testing import CliRunner

    from costeer.cli import app

    ctx = tmp_path / "me.txt"
    ctx.write_text(CONTEXT)
    r = CliRunner().invoke(app, ["generate", "--cloud", engine.url, "--cloud-api", "llamacpp", "--llm",
                                 "smollm2-135m-instruct", "-q", QUERY, "--context-file", str(ctx),
                                 "--max-new-tokens", "16", "--lookahead", "4", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    want = CoSteer(smollm2_cpp, smollm2_cpp).generate(QUERY, CONTEXT, "costeer", max_new_tokens=16)
    assert out["token_ids"] == want.token_ids


def test_cli_unreachable_engine_is_one_line(smollm2_cpp):
    from typer.testing import CliRunner

    from costeer.cli import app
    from tests.servers import free_port

    r = CliRunner().invoke(app, ["generate", "--cloud", f"http://127.0.0.1:{free_port()}", "--cloud-api", "llamacpp",
                                 "-q", "hi", "--context", "x", "--max-new-tokens", "2"])  # fmt: skip
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "Traceback" not in r.output
