"""Kill the cloud process mid-generation and start it again: the device reconnects, reopens
with the query plus the tokens so far, and the output equals the uninterrupted one."""

import pytest

from costeer.api import CoSteer
from costeer.device import CloudError, Retry, connect_cloud
from costeer.engine.models import load_lm
from tests.cloud.server_util import KEY_A, ProcessServer, free_port

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam, I live in Seattle and I like spicy tofu and long runs on Sunday morning"
N = 32


def test_killed_and_restarted_cloud_resumes_into_one_identical_stream(folders, tmp_path):
    llm, slm = load_lm(folders["llm"], "cpu"), load_lm(folders["slm"], "cpu")
    want = CoSteer(llm, slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    server = ProcessServer(folders["llm"], free_port()).start()
    try:
        cloud = connect_cloud(server.url, api_key=KEY_A, k="full", wire_log=tmp_path / "wire.jsonl",
                              retry=Retry(budget_s=60, backoff_s=0.1, max_backoff_s=0.5))  # fmt: skip
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


class VirtualClock:
    """The device's retry waits advance this clock instead of sleeping: an outage of minutes takes
    milliseconds. `at(t, fn)` runs fn once the device has waited t seconds."""

    def __init__(self):
        self.now, self.events = 0.0, []

    def at(self, t: float, fn) -> None:
        self.events.append((t, fn))

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for event in [e for e in self.events if e[0] <= self.now]:
            self.events.remove(event)
            event[1]()


@pytest.fixture()
def clock(monkeypatch):
    from costeer.device import transport

    c = VirtualClock()
    monkeypatch.setattr(transport, "monotonic", lambda: c.now)
    monkeypatch.setattr(transport, "sleep", c.sleep)
    return c


def restarted_cloud(lm, clock, outage_s: float, budget_s: float):
    """A cloud stopped when the device has its 10th token, back on the same port after outage_s
    (every session lost: the device re-opens with the tokens so far) -> (device pair, the servers)."""
    from costeer.cloud import ServerSettings, create_app
    from tests.device.stand_in import AppThread

    def start(port=0):
        servers.append(AppThread(create_app(lm, ServerSettings(api_keys=frozenset({KEY_A}))), port=port))

    servers: list = []
    start()
    cloud = connect_cloud(servers[0].url(), api_key=KEY_A, k="full", retry=Retry(budget_s=budget_s))
    clock.at(outage_s, lambda: start(servers[0].port))
    return cloud, servers


@pytest.mark.parametrize("outage_s", [14.0, 50.0])
def test_a_restart_longer_than_six_retries_resumes_into_the_same_stream(tiny_llm, tiny_slm, clock, outage_s):
    want = CoSteer(tiny_llm, tiny_slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    cloud, servers = restarted_cloud(tiny_llm, clock, outage_s, budget_s=Retry().budget_s)
    try:
        stream = CoSteer(cloud, tiny_slm).stream(QUERY, CONTEXT, "costeer", max_new_tokens=N)
        for i, _ in enumerate(stream):
            if i == 9:
                servers[0].stop()
        assert stream.generation.token_ids == want.token_ids
        assert len(servers) == 2 and clock.now >= outage_s  # it did wait out the whole outage
    finally:
        for s in servers:
            s.stop()


def test_an_outage_past_the_budget_ends_in_one_clear_error(tiny_llm, tiny_slm, clock):
    cloud, servers = restarted_cloud(tiny_llm, clock, outage_s=30.0, budget_s=5.0)
    try:
        stream = CoSteer(cloud, tiny_slm).stream(QUERY, CONTEXT, "costeer", max_new_tokens=N)
        with pytest.raises(CloudError, match="could not resume within 5 s"):
            for i, _ in enumerate(stream):
                if i == 9:
                    servers[0].stop()
        assert 5.0 <= clock.now < 6.0 and len(servers) == 1
    finally:
        for s in servers:
            s.stop()


def test_the_default_budget_is_at_least_a_minute():
    assert Retry().budget_s >= 60


def test_a_count_of_attempts_also_bounds_the_retries(clock):
    outage = Retry(budget_s=60, attempts=2).outage()
    assert outage.wait("down") and outage.wait("down") and not outage.wait("down")
    assert clock.now == pytest.approx(0.25 + 0.5)
