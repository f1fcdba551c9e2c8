"""The split with the real SmolLM2-135M-Instruct on both sides, over a socket on 127.0.0.1:
greedy output identical to in-process CoSteer on the example persona, with k = full, packed
frames (the default) and top-256; the wire log of those runs holds no 5-gram of the persona's profile."""

from pathlib import Path

import pytest
import yaml

from costeer.api import CoSteer
from costeer.device import DEFAULT_FRAMES, DEFAULT_K, audit_wire, connect_cloud
from costeer.engine.prompts import render_context
from tests.cloud.server_util import KEY_A, ThreadServer

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
