"""The split with the real SmolLM2-135M-Instruct on both sides, over a socket on 127.0.0.1:
greedy output identical to in-process CoSteer on the example persona, with k = full, packed
frames (the default) and top-256; the wire log of those runs holds no 5-gram of the persona's profile.
Look-ahead gives the per-token tokens on that pair (both cloud backends) and across tokenizers
(Gemma-3 270M in the cloud, SmolLM2 on the device)."""

from pathlib import Path

import pytest
import yaml

from costeer.api import CoSteer
from costeer.device import DEFAULT_FRAMES, DEFAULT_K, audit_wire, connect_cloud
from costeer.engine.prompts import render_context
from tests.cloud.server_util import KEY_A, ThreadServer
from tests.device.relay import DelayRelay

pytestmark = pytest.mark.real

PERSONA = yaml.safe_load((Path(__file__).parents[2] / "src/costeer/examples/persona.yaml").read_text())
QUERY, CONTEXT = PERSONA["query"], render_context(PERSONA["profile"])
N = 48


def test_smollm2_over_the_socket_equals_in_process(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("COSTEER_CACHE_DIR", str(tmp_path / "cache"))  # the tokenizer fetched from the cloud
    want = CoSteer(smollm2, smollm2).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    assert len(want.token_ids) == N
    server = ThreadServer(smollm2)
    log = tmp_path / "wire.jsonl"
    try:
        for k in ("full", DEFAULT_FRAMES, DEFAULT_K):
            llm = connect_cloud(server.url, api_key=KEY_A, k=k, wire_log=log, lookahead="off")
            got = CoSteer(llm, smollm2).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
            assert got.token_ids == want.token_ids, f"k={k}"
            assert got.text == want.text
            per_token = llm.bytes_down / llm.frames_down
            if k == DEFAULT_FRAMES:
                assert llm.packed and per_token < 2048
            else:
                assert per_token == (20 + 4 * 49152 if k == "full" else 20 + 4 * DEFAULT_K)
    finally:
        server.stop()
    report = audit_wire(log, CONTEXT, QUERY)
    assert report.clean and report.prompt_is_query, report.to_dict()


@pytest.mark.parametrize("backend", ["smollm2", "smollm2_cpp"])
def test_look_ahead_gives_the_per_token_tokens_on_the_real_pair(backend, request, tmp_path, monkeypatch):
    """SmolLM2 on both sides, each cloud backend (transformers; llama.cpp with its tree in shared
    cells): a fixed tree and chain give the per-token run's tokens for costeer and costeer_matched,
    greedy and with seeded sampling, streamed and whole, and through a 50 ms delay relay; the device
    does take tokens from the trees."""
    monkeypatch.setenv("COSTEER_CACHE_DIR", str(tmp_path / "cache"))
    lm = request.getfixturevalue(backend)
    server = ThreadServer(lm)
    reference = "Name: Alex Doe. Lives in Denver. Likes pasta, cycling and jazz."
    try:
        def run(lookahead, method, url=server.url, streamed=True, **kw):
            llm = connect_cloud(url, api_key=KEY_A, lookahead=lookahead, streamed=streamed)
            extra = {"reference_message": f"{reference}\n\n{QUERY}"} if method == "costeer_matched" else {}
            g = CoSteer(llm, lm).generate(QUERY, CONTEXT, method, max_new_tokens=32, **extra, **kw)
            return g.token_ids, llm.tree_tokens

        for method, kw in (("costeer", {}), ("costeer_matched", {}), ("costeer", dict(temperature=0.8, seed=3))):
            want, _ = run("off", method, **kw)
            for shape, streamed in (("tree:4:12", True), ("chain:4", True), ("chain:4", False)):
                got, taken = run(shape, method, streamed=streamed, **kw)
                assert got == want, (method, kw, shape, streamed)
                assert taken > 0
        with DelayRelay(server.port, rtt_s=0.05) as relay:
            assert run("auto", "costeer", url=relay.url("ws"))[0] == run("off", "costeer")[0]
    finally:
        server.stop()


def test_look_ahead_across_tokenizers_gives_the_per_token_tokens(gemma, smollm2, tmp_path, monkeypatch):
    """Gemma-3 270M behind the cloud (transformers, 262,144 tokens) steered by SmolLM2 on the device
    (49,152 tokens, through the vocabulary map): a streamed tree gives the per-token run's tokens,
    greedy and sampled, and the device does take tokens from it."""
    monkeypatch.setenv("COSTEER_CACHE_DIR", str(tmp_path / "cache"))
    server = ThreadServer(gemma)
    try:
        def run(lookahead, **kw):
            llm = connect_cloud(server.url, api_key=KEY_A, lookahead=lookahead)
            g = CoSteer(llm, smollm2).generate(QUERY, CONTEXT, "costeer", max_new_tokens=20, **kw)
            return g.token_ids, llm.tree_tokens

        taken = 0
        for kw in ({}, dict(temperature=0.8, seed=5)):
            want, _ = run("off", **kw)
            got, n = run("tree:4:12", **kw)
            assert len(want) == 20 and got == want, kw
            taken += n
        assert taken > 0
    finally:
        server.stop()


def test_run_ahead_gives_the_per_token_tokens_and_distributions_on_llamacpp(smollm2_cpp, tmp_path, monkeypatch):
    """SmolLM2 llama.cpp on both sides through a 40 ms relay: with run-ahead (guessed SLM-pair
    forwards while a round is on its way, rewound with llama_memory_seq_rm when wrong), greedy and
    seeded sampling give the per-token run's tokens and, bit for bit, its SLM-pair distributions;
    guesses are made and used."""
    import torch

    from costeer.device.ahead import SteeringAhead

    monkeypatch.setenv("COSTEER_CACHE_DIR", str(tmp_path / "cache"))
    server = ThreadServer(smollm2_cpp)
    try:
        with DelayRelay(server.port, rtt_s=0.04) as relay:
            def run(lookahead, **kw):
                pairs, advance = [], SteeringAhead.advance
                with monkeypatch.context() as m:
                    m.setattr(SteeringAhead, "advance", lambda self, t: pairs.append(advance(self, t).clone()) or pairs[-1])
                    llm = connect_cloud(relay.url("ws"), api_key=KEY_A, lookahead=lookahead)
                    g = CoSteer(llm, smollm2_cpp).generate(QUERY, CONTEXT, "costeer", max_new_tokens=24, **kw)
                return g.token_ids, pairs, llm.guesses

            for kw in ({}, dict(temperature=0.8, seed=3)):
                want, want_pairs, _ = run("off", **kw)
                got, pairs, guesses = run("tree:4:8", **kw)
                assert got == want and len(pairs) == len(want_pairs)
                assert all(torch.equal(a, b) for a, b in zip(pairs, want_pairs))
                assert guesses.made > 0 and guesses.used > 0, guesses
    finally:
        server.stop()
