"""Kill the cloud process mid-generation and start it again: the device reconnects, reopens
with the query plus the tokens so far, and the output equals the uninterrupted one."""

import pytest

from costeer.api import CoSteer
from costeer.device import Retry, connect_cloud
from costeer.engine.models import load_lm
from tests.cloud.server_util import KEY_A, ProcessServer, free_port
from tests.device.folders import tiny_folders

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam, I live in Seattle and I like spicy tofu and long runs on Sunday morning"
N = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("models"))


def test_killed_and_restarted_cloud_resumes_into_one_identical_stream(folders, tmp_path):
    llm, slm = load_lm(folders["llm"], "cpu"), load_lm(folders["slm"], "cpu")
    want = CoSteer(llm, slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    server = ProcessServer(folders["llm"], free_port()).start()
    try:
        cloud = connect_cloud(server.url, api_key=KEY_A, k="full", wire_log=tmp_path / "wire.jsonl",
                              retry=Retry(attempts=120, backoff_s=0.1, max_backoff_s=0.5))  # fmt: skip
        stream = CoSteer(cloud, slm).stream(QUERY, CONTEXT, "costeer", max_new_tokens=N)
        text = ""
        for i, chunk in enumerate(stream):
            text += chunk.text
            if i == 9:
                server.kill()  # SIGKILL: no close frame, every session gone
                server.start(wait=False)  # comes back on the same port while the device retries
        assert stream.generation.token_ids == want.token_ids
        assert text == want.text
        opens = [line for line in (tmp_path / "wire.jsonl").read_text().splitlines() if '"ws-handshake"' in line]
        assert len(opens) >= 4  # at least two connections (request + response each)
    finally:
        server.kill()
