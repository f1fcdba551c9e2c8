"""A seeded, time-bounded fuzz run against a running server (cases: tests/cloud/fuzz.py). Each
malformed frame or request must be answered with a documented close code or HTTP status, never an
internal error or a hang, while honest sessions of another key run alongside and produce exactly
the tokens they produce alone."""

import pytest

from costeer.api import CoSteer
from tests.cloud import fuzz
from tests.cloud.server_util import ThreadServer, wait_until

N_FRAMES, N_REQUESTS = 650, 380
BUDGET_S = 240  # a hard stop; the run takes about 20 s on two idle cores


@pytest.fixture(scope="module")
def fuzz_server(tiny_llm):
    srv = ThreadServer(tiny_llm, max_sessions=64, max_sessions_per_key=6, max_prompt_tokens=64,
                       max_new_tokens=40, handshake_timeout_s=1.0, idle_timeout_s=3.0)  # fmt: skip
    yield srv
    srv.stop()


def test_fuzzed_frames_and_requests_get_documented_answers_and_disturb_no_honest_session(
        fuzz_server, tiny_llm, tiny_slm):  # fmt: skip
    reference = CoSteer(tiny_llm, tiny_slm).generate(fuzz.QUERY, fuzz.CONTEXT, "costeer", max_new_tokens=fuzz.N).token_ids
    report = fuzz.run(fuzz_server, tiny_slm, reference, N_FRAMES, N_REQUESTS, budget_s=BUDGET_S)
    assert len(report.outcomes) >= 1000, f"only {len(report.outcomes)} cases within {BUDGET_S} s"
    assert not report.bad, report.bad[:5]
    assert not report.errors, report.errors[:3]
    assert report.honest and all(report.honest), report.honest  # every honest generation, token for token
    # the fuzz clients dropped their sockets: their sessions wait for ATTACH, then are evicted
    wait_until(lambda: not fuzz_server.registry.sessions, timeout=15)
    wait_until(lambda: len(fuzz_server.server.server_state.connections) == 0, timeout=10)
