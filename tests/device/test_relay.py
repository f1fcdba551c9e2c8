"""The delay relay (tests/device/relay.py) that stands for a real network in the split's tests and
bench/split_network.py: it adds the delay it promises in each direction, delays a burst without
spacing it out, passes bytes unchanged, and a generation through it equals one without it."""

import os
import socket
import threading
import time

import pytest

from costeer.api import CoSteer
from costeer.device import connect_cloud
from tests.cloud.server_util import KEY_A
from tests.device.relay import DelayRelay


class Echo:
    """A TCP server on 127.0.0.1 that echoes what it reads and notes when each chunk arrived."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.arrivals: list[tuple[float, bytes]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn):
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1 << 16):
                self.arrivals.append((time.monotonic(), data))
                conn.sendall(data)

    def close(self):
        self.sock.close()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def connect(relay: DelayRelay) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", relay.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return out


@pytest.mark.parametrize("rtt", [0.0, 0.04, 0.1])
def test_each_direction_is_delayed_by_half_the_round_trip(echo, rtt):
    with DelayRelay(echo.port, rtt) as relay, connect(relay) as s:
        for i in range(3):
            t0 = time.monotonic()
            s.sendall(b"ping %d" % i)
            assert recv_exactly(s, 6) == b"ping %d" % i
            back = time.monotonic()
            there = echo.arrivals[-1][0]
            assert there - t0 >= rtt / 2 - 1e-3  # uplink half
            assert back - there >= rtt / 2 - 1e-3  # downlink half
            assert back - t0 < rtt + 1.0  # and not much more (generous: a loaded 2-core machine stalls threads)


def test_a_burst_is_delayed_not_spaced_out(echo):
    """Ten chunks 10 ms apart through 200 ms: the last is back about 200 + 90 ms after the first
    left, not 10 x 200 ms = 2 s (latency, not a queue of round trips)."""
    with DelayRelay(echo.port, 0.2) as relay, connect(relay) as s:
        t0 = time.monotonic()
        for i in range(10):
            s.sendall(bytes([i]) * 100)
            time.sleep(0.01)
        got = recv_exactly(s, 1000)
        took = time.monotonic() - t0
    assert got == b"".join(bytes([i]) * 100 for i in range(10))
    assert 0.29 <= took < 1.2


def test_bytes_pass_unchanged_both_ways(echo):
    payload = os.urandom(3 << 20)
    with DelayRelay(echo.port, 0.01) as relay, connect(relay) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        got = recv_exactly(s, len(payload))
        sender.join()
        assert got == payload
        assert relay.bytes_up == len(payload) and relay.bytes_down == len(payload)


def test_a_closed_target_closes_the_client(echo):
    with DelayRelay(echo.port, 0.02) as relay, connect(relay) as s:
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        s.shutdown(socket.SHUT_WR)  # the half-close travels on: the echo ends and closes too
        s.settimeout(5)
        assert s.recv(1) == b""


def test_an_unreachable_target_closes_the_client():
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with DelayRelay(port, 0.0) as relay, connect(relay) as s:
        s.settimeout(5)
        assert s.recv(1) == b""


def test_negative_round_trip_is_refused():
    with pytest.raises(ValueError):
        DelayRelay(1, -0.01)


@pytest.mark.parametrize("lookahead", ["off", "auto"])
def test_a_generation_through_the_relay_equals_one_without(server, tiny_slm, lookahead):
    query, context = "what should I cook tonight", "I am Sam, a vegetarian runner in Seattle."
    direct = CoSteer(connect_cloud(server.url, api_key=KEY_A, lookahead=lookahead), tiny_slm)
    want = direct.generate(query, context, "costeer", max_new_tokens=12)
    with DelayRelay(server.port, 0.03) as relay:
        cloud = connect_cloud(relay.url("ws"), api_key=KEY_A, lookahead=lookahead)
        relayed = CoSteer(cloud, tiny_slm)
        t0 = time.monotonic()
        got = relayed.generate(query, context, "costeer", max_new_tokens=12)
        took = time.monotonic() - t0
    assert got.token_ids == want.token_ids and got.text == want.text
    # the relay really stood between them: each round waited out a round trip, one after another.
    # Per token that is one round a token; look-ahead takes several tokens from one round.
    if lookahead == "off":
        assert cloud.rounds >= len(got.token_ids)
    assert cloud.rounds >= 1 and took >= 0.03 * cloud.rounds - 1e-3
    assert relay.bytes_down > 0 and relay.bytes_up > 0
