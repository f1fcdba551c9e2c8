"""The cloud's side of look-ahead with a tiny LLM: TREE rounds over a bare socket, and every bad
look-ahead input (a bound above the server's limit, more tokens than the round allows, a token off
the tree followed by more) closes its own session with a documented code and frees it, while a
healthy look-ahead session of another key completes with the right tokens."""

import pytest
import torch
from websockets.sync.client import connect

from costeer import frames
from costeer.api import CoSteer
from costeer.device import connect_cloud
from costeer.frames import Lookahead, Open, Token, Tokens
from tests.cloud.server_util import KEY_A, KEY_B, wait_until
from tests.cloud.test_server import CONTEXT, N, QUERY, closed_with

CHAIN3 = Lookahead(frames.LOOKAHEAD_FIXED, 3, 4)


def ws_open(server, key=KEY_A):
    return connect(server.url + "/v1/stream", additional_headers={"Authorization": f"Bearer {key}"}, compression=None,
                   proxy=None, legacy=True, max_size=None)  # fmt: skip


def open_round(ws, lookahead=CHAIN3, max_new=20):
    """OPEN with look-ahead -> (READY, the first round as a Tree)."""
    ws.send(Open([1, 2, 3], frames.FULL, max_new, lookahead=lookahead).encode())
    ready = frames.decode_downlink(ws.recv(timeout=10))
    first = frames.decode_downlink(ws.recv(timeout=10))
    assert isinstance(ready, frames.Ready)
    return ready, first if isinstance(first, frames.Tree) else frames.Tree.single(first)


def test_a_fixed_chain_is_the_greedy_continuation_and_each_node_its_distribution(server, tiny_llm):
    from costeer.engine.models import full_forward_logprobs

    with ws_open(server) as ws:
        _, tree = open_round(ws)
        assert tree.size == 4 and list(tree.parents) == [-1, 0, 1, 2] and tree.position == 0
        prefix = [1, 2, 3]
        for i in range(4):  # node i: the distribution after the chain's first i tokens, greedy next
            want = full_forward_logprobs(tiny_llm, prefix)
            assert (tree.dists[i].logp - want).abs().max() < 1e-4
            if i < 3:
                assert tree.tokens[i + 1] == int(want.argmax())
                prefix.append(tree.tokens[i + 1])
        # the device takes two nodes and leaves: the next round starts three tokens on
        off = (tree.tokens[3] + 1) % tiny_llm.vocab_size
        ws.send(Tokens((tree.tokens[1], tree.tokens[2], off)).encode())
        nxt = frames.decode_downlink(ws.recv(timeout=10))
        assert nxt.position == 3
        want = full_forward_logprobs(tiny_llm, [1, 2, 3, tree.tokens[1], tree.tokens[2], off])
        assert (nxt.dists[0].logp - want).abs().max() < 1e-4
        ws.send(Token(nxt.tokens[1]).encode())  # one token still goes up as a plain TOKEN
        assert frames.decode_downlink(ws.recv(timeout=10)).position == 4


def _tokens_of(tree: frames.Tree) -> list[int]:
    return [tree.tokens[1], tree.tokens[2], tree.tokens[3]]


BAD = {
    "look-ahead above the limit": (lambda s: Open([1], 0, 5, lookahead=Lookahead(frames.LOOKAHEAD_AUTO, 17, 9)).encode(),
                                   frames.CLOSE_TOO_LARGE, "exceeds the limit of 16"),
    "look-ahead nodes above the limit": (lambda s: Open([1], 0, 5, lookahead=Lookahead(frames.LOOKAHEAD_FIXED, 4, 65)).encode(),
                                         frames.CLOSE_TOO_LARGE, "and 64"),
    "more tokens than the round allows": ("round", lambda t: Tokens((*_tokens_of(t), 5, 6)).encode(),
                                          frames.CLOSE_TOO_LARGE, "its tree allows 4"),
    "a token off the tree, then more": ("round", lambda t: Tokens((t.tokens[1], (t.tokens[2] + 1) % 300, 7)).encode(),
                                        frames.CLOSE_INVALID, "off the round's tree"),
    "two tokens without look-ahead": ("plain", lambda t: Tokens((5, 6)).encode(), frames.CLOSE_TOO_LARGE, "allows 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_look_ahead_input_ends_its_session_and_a_healthy_one_completes(case, server, tiny_slm):
    want = CoSteer(connect_cloud(server.url, api_key=KEY_B, k="full", lookahead="off"), tiny_slm).generate(
        QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids  # fmt: skip
    healthy = CoSteer(connect_cloud(server.url, api_key=KEY_B, k="full", lookahead="tree:3:9"), tiny_slm)
    stream = healthy.stream(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    it = iter(stream)
    head = [next(it) for _ in range(3)]
    *steps, code, reason = BAD[case]
    with ws_open(server, KEY_A) as ws:
        if steps[0] in ("round", "plain"):
            _, tree = open_round(ws, CHAIN3 if steps[0] == "round" else frames.NO_LOOKAHEAD)
            ws.send(steps[1](tree))
        else:
            ws.send(steps[0](server))
        closed_with(ws, code, reason)
    rest = list(it)
    assert len(head) + len(rest) == N and stream.generation.token_ids == want
    wait_until(lambda: not server.registry.sessions)
    wait_until(lambda: not server.registry.scheduler.pool.trees)  # every tree's nodes freed


def test_a_round_cannot_pass_max_new_tokens(server):
    with ws_open(server) as ws:
        _, tree = open_round(ws, max_new=4)
        ws.send(Tokens(tuple(_tokens_of(tree))).encode())  # 3 of 4
        nxt = frames.decode_downlink(ws.recv(timeout=10))
        ws.send(Tokens((nxt.tokens[1], 9)).encode())  # 5 > 4
        closed_with(ws, frames.CLOSE_TOO_LARGE, "reached its 4 new tokens")
    wait_until(lambda: not server.registry.sessions)


def test_info_states_the_look_ahead_limits(server):
    import httpx

    info = httpx.get(server.http + "/v1/info", headers={"Authorization": f"Bearer {KEY_A}"}, trust_env=False).json()
    assert info["lookahead"] == {"frame_version": 2, "max_depth": 16, "max_nodes": 64, "streamed": True}
    assert info["frame_version"] == frames.VERSION  # version-1 devices read the same /v1/info as before


def test_clients_that_drop_or_are_deleted_mid_tree_free_everything_and_others_finish(server, tiny_slm):
    """Hostile clients at once: some open the largest tree the server allows and vanish before
    reading it, some are DELETEd while their tree grows; a healthy session's tokens do not move, and
    every session and every tree node is freed."""
    import threading

    from tests.cloud.test_server import get

    want = CoSteer(connect_cloud(server.url, api_key=KEY_B, k="full", lookahead="off"), tiny_slm).generate(
        QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids  # fmt: skip
    big = Lookahead(frames.LOOKAHEAD_FIXED, 16, 64)

    def drop():
        ws = ws_open(server)
        ws.send(Open([1, 2, 3], frames.FULL, 40, lookahead=big).encode())
        ws.close()  # never reads its round

    def delete():
        with ws_open(server) as ws:
            ws.send(Open([1, 2, 3], frames.FULL, 40, lookahead=big).encode())
            sid = frames.decode_downlink(ws.recv(timeout=10)).session_id.hex()
            assert get(server, f"/v1/sessions/{sid}", KEY_A, "DELETE").status_code in (200, 404)

    threads = [threading.Thread(target=f) for f in (drop, delete, drop, delete)]
    for t in threads:
        t.start()
    got = CoSteer(connect_cloud(server.url, api_key=KEY_B, k="full", lookahead="tree:3:9"), tiny_slm).generate(
        QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids  # fmt: skip
    for t in threads:
        t.join(timeout=30)
    assert got == want
    wait_until(lambda: not server.registry.sessions)
    wait_until(lambda: not server.registry.scheduler.pool.trees)


# -- streamed rounds ------------------------------------------------------------------------------------

STREAMED3 = Lookahead(frames.LOOKAHEAD_FIXED, 3, 4, streamed=True)


def test_a_streamed_chain_comes_level_by_level_each_node_its_distribution(server, tiny_llm):
    """The root at once with its child announced, then one LEVEL frame per level, the last final;
    each node the distribution a step would give; the device's tokens start the next round."""
    from costeer.engine.models import full_forward_logprobs

    with ws_open(server) as ws:
        ws.send(Open([1, 2, 3], frames.FULL, 20, lookahead=STREAMED3).encode())
        assert isinstance(frames.decode_downlink(ws.recv(timeout=10)), frames.Ready)
        levels = [frames.decode_downlink(ws.recv(timeout=10)) for _ in range(4)]
        assert all(isinstance(m, frames.Level) for m in levels)
        assert [(m.first, len(m.dists), len(m.parents)) for m in levels] == [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 0)]
        r = frames.Round.of(levels[0], STREAMED3)
        for m in levels[1:]:
            r.add(m)
        assert r.final and r.size == 4
        prefix = [1, 2, 3]
        for i in range(4):
            want = full_forward_logprobs(tiny_llm, prefix)
            assert (r.dists[i].logp - want).abs().max() < 1e-4 and r.dists[i].position == i
            if i < 3:
                assert r.tokens[i + 1] == int(want.argmax())
                prefix.append(r.tokens[i + 1])
        off = (r.tokens[2] + 1) % tiny_llm.vocab_size
        ws.send(Tokens((r.tokens[1], off)).encode())
        nxt = frames.decode_downlink(ws.recv(timeout=10))
        assert isinstance(nxt, frames.Level) and (nxt.position, nxt.first) == (2, 0)
        want = full_forward_logprobs(tiny_llm, [1, 2, 3, r.tokens[1], off])
        assert (nxt.dists[0].logp - want).abs().max() < 1e-4


def test_an_uplink_mid_round_stops_the_growth_and_frees_the_tree(server, tiny_llm, monkeypatch):
    """A 12-level chain whose levels take 0.2 s each: the device leaves at the root at once. The cloud
    computes no level after the uplink came (the pool skips the level it was about to compute, and
    nothing of it is sent), keeps the root's path (commit) and frees the rest, and the next round's
    root follows; frames of the left round already on their way would come first, marked by the old
    round's position."""
    import time

    pool = server.registry.scheduler.pool
    grows, commits = [], []
    grow, commit = pool.grow, pool.commit

    def slow_grow(rows, stop=None):
        grows.append(len(rows))
        time.sleep(0.2)
        return grow(rows, stop)

    def spy_commit(seq, node):
        held = len(pool.trees.get(seq, [(-1, None)])) - 1
        out = commit(seq, node)
        commits.append((node, held, seq in pool.trees, len(grows)))
        return out

    monkeypatch.setattr(pool, "grow", slow_grow)
    monkeypatch.setattr(pool, "commit", spy_commit)
    with ws_open(server) as ws:
        ws.send(Open([1, 2, 3], frames.FULL, 30, lookahead=Lookahead(frames.LOOKAHEAD_FIXED, 12, 13, streamed=True)).encode())
        frames.decode_downlink(ws.recv(timeout=10))
        root = frames.decode_downlink(ws.recv(timeout=10))
        assert isinstance(root, frames.Level) and root.first == 0 and len(root.parents) == 1
        ws.send(Token((root.tokens[0] + 1) % tiny_llm.vocab_size).encode())  # not the chain's: it leaves at once
        stale = []
        while (msg := frames.decode_downlink(ws.recv(timeout=10))).position == 0:
            stale.append(msg)
        assert (msg.position, msg.first) == (1, 0) and stale == []  # level 1, under way, was not sent
        node, held, kept, grown = commits[0]
        assert node == 0 and held == 0 and grown == 1 and not kept  # stopped before level 1's forward; freed
    wait_until(lambda: not server.registry.sessions)
    wait_until(lambda: not pool.trees)


def test_re_attaching_at_a_streamed_round_root_sends_the_round_again(server, tiny_llm):
    """The connection drops after the root arrived: ATTACH at the same position gets READY and the
    round as the cloud computed it, level by level from the root, the same distributions."""
    with ws_open(server) as ws:
        ws.send(Open([1, 2, 3], frames.FULL, 20, lookahead=STREAMED3).encode())
        ready = frames.decode_downlink(ws.recv(timeout=10))
        root = frames.decode_downlink(ws.recv(timeout=10))
        (sess,) = server.registry.sessions.values()
        wait_until(lambda: sess.round.size == 4)  # the round grown whole before the drop (frames leave at once)
        ws.close(frames.CLOSE_GOING_AWAY)  # a drop: the session waits for ATTACH
    with ws_open(server) as ws:
        ws.send(frames.Attach(ready.session_id, 0).encode())
        assert isinstance(frames.decode_downlink(ws.recv(timeout=10)), frames.Ready)
        r = frames.Round.of(frames.decode_downlink(ws.recv(timeout=10)), STREAMED3)
        while not r.final:
            r.add(frames.decode_downlink(ws.recv(timeout=10)))
        assert r.size == 4 and r.path(3) == [r.tokens[1], r.tokens[2], r.tokens[3]]
        assert torch.equal(r.dists[0].logp, root.dists[0].logp) and r.child(0, root.tokens[0]) == 1
    wait_until(lambda: not server.registry.sessions)
