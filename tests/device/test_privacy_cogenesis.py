"""Privacy over real data: CoGenesis rows (../shared/datasets/cogenesis.jsonl, skipped when
absent) through the split with the real SmolLM2 on both sides, with look-ahead on (a fixed tree,
so that rounds of several tokens do cross the wire). For every row, neither the wire
log (every byte the device sent and received) nor the cloud's own logs, at DEBUG, hold a word
5-gram of the row's private context that appears neither in the public query nor in the
generated text."""

import logging
from pathlib import Path

import pytest

from costeer.api import CoSteer
from costeer.device import audit_wire, connect_cloud
from costeer.device.wire import ngrams
from costeer.eval.tasks import load_task
from tests.cloud.server_util import KEY_A, ThreadServer

pytestmark = pytest.mark.real

DATA = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cogenesis.jsonl"
ROWS, N = 8, 24


@pytest.fixture(scope="module")
def rows():
    if not DATA.is_file():
        pytest.skip(f"{DATA} not present")
    return load_task("cogenesis", DATA, limit=ROWS)


def test_no_private_5gram_on_the_wire_or_in_the_cloud_logs(rows, smollm2_cpp, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("COSTEER_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.DEBUG)  # everything the cloud process logs, every logger
    server = ThreadServer(smollm2_cpp)
    checked = tree_tokens = 0
    try:
        for ex in rows:
            log = tmp_path / f"wire-{ex.id}.jsonl"
            llm = connect_cloud(server.url, api_key=KEY_A, wire_log=log, lookahead="tree:4:12")
            g = CoSteer(llm, smollm2_cpp).generate(ex.query, ex.context, "costeer", max_new_tokens=N,
                                                    context_message=ex.with_context_prompt())
            llm.wire.close()
            report = audit_wire(log, ex.context, ex.query)
            assert report.context_ngrams > 0 and report.tokens_decoded
            assert report.clean and report.prompt_is_query, (ex.id, report.to_dict())
            allowed = ngrams(ex.query) | ngrams(g.text)
            cloud_logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("costeer", "uvicorn")))
            leaked = (ngrams(cloud_logs) & ngrams(ex.context)) - allowed
            assert not leaked, (ex.id, sorted(leaked)[:3])
            checked += 1
            tree_tokens += llm.tree_tokens
    finally:
        server.stop()
    assert checked == len(rows) == ROWS
    assert tree_tokens > 0  # look-ahead was on: the device took tokens from the trees
    assert any(r.name.startswith("costeer.cloud") for r in caplog.records)  # the cloud did log
