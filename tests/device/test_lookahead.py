"""Look-ahead over a real socket, tiny models: with any tree shape, streamed (LEVEL frames) or whole
(one TREE), the device chooses exactly the tokens of per-token decoding (every steered method,
greedy and seeded sampling), takes tokens from the trees without asking, sends one TOKENS frame per
round, resumes mid-round after a drop, uses a streamed round's root before the round is grown,
waits a bounded time for an announced node, and refuses an inconsistent TREE or LEVEL frame with
4400, which ends and frees its session only."""

import socket
import time

import pytest

from costeer import frames
from costeer.api import CoSteer
from costeer.cloud.sessions import KeyRing
from costeer.device import CloudError, Retry, connect_cloud
from costeer.device.options import Lookahead
from costeer.device.wire import read_wire_log
from costeer.engine.config import Method
from tests.cloud.server_util import KEY_A, KEY_B, wait_until
from tests.device.spies import spy_sources

QUERY = "what should I cook tonight"
CONTEXT = (
    "my name is Sam Okafor, I live in Seattle with my golden retriever Biscuit; "
    "I like spicy tofu and lentils and go for long runs on Sunday morning"
)
REFERENCE = "my name is Alex Doe, I live in Denver with my cat; I like pasta and cycling on Saturday"
N = 30
STEERED = [m.value for m in Method if m.steered]


def generate(server, slm, lookahead, method="costeer", key=KEY_A, streamed=True, **kw):
    llm = connect_cloud(server.url, api_key=key, k="full", lookahead=lookahead, streamed=streamed)
    extra = {"reference_message": REFERENCE} if method == "costeer_matched" else {}
    g = CoSteer(llm, slm).generate(QUERY, CONTEXT, method, max_new_tokens=N, **extra, **kw)
    return g, llm


@pytest.fixture(scope="module")
def per_token(server, tiny_slm):
    """Per-token decoding over the same cloud, per method (greedy)."""
    return {m: generate(server, tiny_slm, "off", m)[0].token_ids for m in STEERED + ["llm"]}


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("method", STEERED + ["llm"])
def test_every_method_with_a_tree_gives_the_per_token_tokens(server, tiny_llm, tiny_slm, per_token, method, streamed):
    got, llm = generate(server, tiny_slm, "tree:3:9", method, streamed=streamed)
    assert llm.lookahead.streamed == streamed
    assert got.token_ids == per_token[method]
    extra = {"reference_message": REFERENCE} if method == "costeer_matched" else {}
    assert got.token_ids == CoSteer(tiny_llm, tiny_slm).generate(QUERY, CONTEXT, method, max_new_tokens=N,
                                                                 **extra).token_ids  # fmt: skip
    assert llm.rounds + llm.tree_tokens == len(got.token_ids)  # each token: its own round or a tree's node


@pytest.mark.parametrize("shape", ["chain:1", "chain:4", "chain:8", "tree:4:12", "auto", "5", "chain:4/whole"])
def test_every_shape_gives_the_per_token_tokens(server, tiny_slm, per_token, shape):
    shape, _, form = shape.partition("/")
    got, llm = generate(server, tiny_slm, shape, streamed=form != "whole")
    assert got.token_ids == per_token["costeer"]
    if shape.startswith(("chain", "tree")):
        assert llm.tree_tokens > 0  # the device did take tokens from the trees


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("method", ["costeer", "light"])
def test_seeded_sampling_with_a_tree_gives_the_per_token_tokens(server, tiny_slm, method, streamed):
    sampled = dict(temperature=0.9, top_k=50, seed=11)
    want = generate(server, tiny_slm, "off", method, **sampled)[0].token_ids
    got, llm = generate(server, tiny_slm, "tree:4:12", method, streamed=streamed, **sampled)
    assert got.token_ids == want and llm.tree_tokens > 0


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
def test_a_chain_the_device_follows_costs_one_round_per_chain(server, tiny_slm, tmp_path, streamed):
    """`llm` alone takes the LLM's greedy token, which is always the chain's next node: N tokens in
    N / (d + 1) rounds, and the uplink holds each round's tokens and nothing else (streamed or not)."""
    llm = connect_cloud(server.url, api_key=KEY_A, k="full", lookahead="chain:4", wire_log=tmp_path / "w.jsonl",
                        streamed=streamed)  # fmt: skip
    g = CoSteer(llm, None).generate(QUERY, method="llm", max_new_tokens=N)
    assert llm.rounds == N // 5 and llm.tree_tokens == N - N // 5
    sent = [frames.decode_uplink(r["data"]) for r in read_wire_log(tmp_path / "w.jsonl")
            if r.get("kind") == "ws-message" and r["dir"] == "sent"]  # fmt: skip
    assert isinstance(sent[0], frames.Open) and sent[0].lookahead == frames.Lookahead(frames.LOOKAHEAD_FIXED, 4, 5, streamed)
    rounds = [m.token_ids for m in sent[1:]]
    assert all(isinstance(m, frames.Tokens) for m in sent[1:]) and all(len(r) == 5 for r in rounds)
    assert [t for r in rounds for t in r] == g.token_ids[: len(rounds) * 5]
    assert llm.bytes_up == sum(4 + 4 * len(r) for r in rounds)


def test_the_wire_audit_reads_look_ahead_rounds(server, tiny_slm, tmp_path):
    """The audit decodes TOKENS (and ATTACH's pending round) like TOKEN: the uplink's token ids are
    exactly the answer, and no 5-gram of the context is on the wire."""
    from costeer.device import audit_wire

    log = tmp_path / "w.jsonl"
    llm = connect_cloud(server.url, api_key=KEY_A, k="full", lookahead="tree:3:9", wire_log=log)
    g = CoSteer(llm, tiny_slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    assert llm.tree_tokens > 0
    report = audit_wire(log, CONTEXT, QUERY)
    assert report.clean and report.prompt_is_query and report.tokens_decoded, report.to_dict()
    # what went up: the answer but the last round's tokens (the device stopped: no uplink for them)
    sent = [llm.tokenizer.decode(g.token_ids[:n], skip_special_tokens=True) for n in range(N - 4, N)]
    assert report.generated_text in sent


def test_off_and_an_old_cloud_mean_per_token_frames(server, tiny_slm, monkeypatch):
    g, llm = generate(server, tiny_slm, "off")
    assert llm.lookahead == frames.NO_LOOKAHEAD and llm.tree_tokens == 0 and llm.rounds == len(g.token_ids)
    from costeer.device import client

    read = client.CloudInfo.read
    monkeypatch.setattr(client.CloudInfo, "read", classmethod(lambda cls, a: read({**a, "lookahead": None})))
    assert connect_cloud(server.url, api_key=KEY_A).lookahead == frames.NO_LOOKAHEAD  # auto: quietly off
    with pytest.raises(CloudError, match="does not offer look-ahead"):
        connect_cloud(server.url, api_key=KEY_A, lookahead="chain:4")


def test_lookahead_option_parsing():
    assert str(Lookahead.parse("auto")) == "auto" and not Lookahead.parse("off").on
    assert Lookahead.parse("chain:4").request(16, 64) == frames.Lookahead(frames.LOOKAHEAD_FIXED, 4, 5)
    assert Lookahead.parse("tree:3:9").request(16, 64) == frames.Lookahead(frames.LOOKAHEAD_FIXED, 3, 10)
    assert Lookahead.parse("auto").request(4, 10) == frames.Lookahead(frames.LOOKAHEAD_AUTO, 4, 10)  # clipped
    assert Lookahead.parse(6).request(16, 64) == frames.Lookahead(frames.LOOKAHEAD_FIXED, 5, 6)  # 6 positions a round
    assert not Lookahead.parse("off").request(16, 64).on and Lookahead.parse("1") == Lookahead.parse("off")
    assert str(Lookahead.parse("tree:3:9")) == "tree:3:9" and Lookahead.parse("chain:4") == Lookahead.parse(5)
    for bad in ("sideways", "chain:0", "tree:4:2", "-3", "chain:x"):
        with pytest.raises(ValueError, match="look-ahead|lookahead"):
            Lookahead.parse(bad)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("lost", ["connection", "session"])
def test_a_drop_in_the_middle_of_a_round_resumes_into_the_same_tokens(server, tiny_slm, per_token, tmp_path, lost,
                                                                      streamed):  # fmt: skip
    """The socket dies while the device walks a tree (it has chosen tokens the cloud has not heard
    of): it re-attaches with the round's tokens (ATTACH's long form), or, when the session is gone,
    re-opens with everything chosen so far; the tokens are those of the uninterrupted run. Streamed,
    the device may be waiting for the round's next level when the drop comes: the cloud starts a
    fresh round after the tokens it re-attached with."""
    llm = connect_cloud(server.url, api_key=KEY_A, k="full", lookahead="chain:4", wire_log=tmp_path / "w.jsonl",
                        retry=Retry(backoff_s=0.05), streamed=streamed)  # fmt: skip
    sources = spy_sources(llm)
    stream = CoSteer(llm, None).stream(QUERY, method="llm", max_new_tokens=N)
    for i, _ in enumerate(stream):
        if i == 7:  # tokens 5-9 are round 1's tree: the device stands inside it
            src = sources[0]
            assert src.node > 0 and src.tree.position == 5 and (streamed or src.tree.size == 5)
            if lost == "session":
                server.registry.end(server.registry.sessions[src.session_id], "test")
            src.ws.socket.shutdown(socket.SHUT_RDWR)
    want = CoSteer(connect_cloud(server.url, api_key=KEY_A, k="full", lookahead="off"), None).generate(
        QUERY, method="llm", max_new_tokens=N).token_ids  # fmt: skip
    assert stream.generation.token_ids == want and sources[0].reconnects >= 1
    sent = [frames.decode_uplink(r["data"]) for r in read_wire_log(tmp_path / "w.jsonl")
            if r.get("kind") == "ws-message" and r["dir"] == "sent"]  # fmt: skip
    attaches = [m for m in sent if isinstance(m, frames.Attach)]
    at = attaches[0].n_generated  # 10 (the round's leaf), or streamed, where it waited for a level
    assert attaches and at - len(attaches[0].pending) == 5 and (at == 10 or streamed and 8 <= at <= 10)
    if lost == "session":
        opens = [m for m in sent if isinstance(m, frames.Open)]
        assert len(opens) == 2 and opens[1].generated == want[:at]


def refused_beside_a_healthy_session(server, tiny_slm, per_token, monkeypatch, name, broken, message, **kw):
    """With frames.`name` replaced by broken(original) for a session of KEY_A (look-ahead `kw`): the
    device refuses with 4400 and the message, the cloud ends and frees that session, and a session of
    KEY_B (whole rounds, begun before) completes with the per-token tokens."""
    healthy = CoSteer(connect_cloud(server.url, api_key=KEY_B, k="full", lookahead="tree:3:9", streamed=False), tiny_slm)
    it = iter(healthy.stream(QUERY, CONTEXT, "costeer", max_new_tokens=N))
    head = [next(it).step.token_id for _ in range(3)]
    original = getattr(frames, name)
    monkeypatch.setattr(frames, name, broken(original))
    llm = connect_cloud(server.url, api_key=KEY_A, k="full", **kw)
    with pytest.raises(CloudError, match=message) as e:
        CoSteer(llm, tiny_slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    assert e.value.code == frames.CLOSE_MALFORMED
    b = KeyRing.owner(KEY_B)
    wait_until(lambda: all(s.owner == b for s in server.registry.sessions.values()))  # KEY_A's ended
    monkeypatch.setattr(frames, name, original)
    rest = [c.step.token_id for c in it]
    assert head + rest == per_token["costeer"]
    wait_until(lambda: not server.registry.sessions)


def test_an_inconsistent_tree_is_refused_and_its_session_freed(server, tiny_slm, per_token, monkeypatch):
    """The cloud sends a TREE whose node 2 names itself as parent."""

    def broken(encode_tree):
        def encode(position, parents, tokens, blobs, cloud_us=0):
            if len(parents) > 1:
                parents = [parents[0], 2, *parents[2:]]
            return encode_tree(position, parents, tokens, blobs, cloud_us)

        return encode

    refused_beside_a_healthy_session(server, tiny_slm, per_token, monkeypatch, "encode_tree", broken,
                                     "parent does not come before it", lookahead="tree:3:9", streamed=False)  # fmt: skip


def test_through_a_delay_relay_the_tokens_are_the_same_and_auto_looks_ahead(server, tiny_slm, per_token):
    """Over a 40 ms round trip (tests/device/relay.py): a tree gives the per-token tokens, and `auto`
    measures the round trip and looks ahead, at least two tokens per round trip for `llm` (whose
    choice is always the LLM's greedy token)."""
    from tests.device.relay import DelayRelay

    with DelayRelay(server.port, rtt_s=0.04) as relay:
        llm = connect_cloud(relay.url("ws"), api_key=KEY_A, k="full", lookahead="tree:3:9")
        assert CoSteer(llm, tiny_slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N).token_ids == per_token["costeer"]
        auto = connect_cloud(relay.url("ws"), api_key=KEY_A, k="full")
        g = CoSteer(auto, None).generate(QUERY, method="llm", max_new_tokens=N)
        assert g.token_ids == per_token["llm"]
        assert auto.rounds * 2 <= N, (auto.rounds, auto.tree_tokens)


# -- streamed rounds -----------------------------------------------------------------------------------


def _slow_levels(server, monkeypatch, seconds: float) -> None:
    pool = server.registry.scheduler.pool
    grow = pool.grow

    def slow(rows, stop=None):
        time.sleep(seconds)
        return grow(rows, stop)

    monkeypatch.setattr(pool, "grow", slow)


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
def test_a_streamed_round_is_used_before_it_is_grown(server, per_token, monkeypatch, streamed):
    """Levels that take 0.15 s each: streamed, the device chooses the round's first token from the
    root while the cloud still grows the chain (its last level arrives later); whole, it waits for
    the complete tree first. The tokens are the per-token ones either way."""
    _slow_levels(server, monkeypatch, 0.15)
    arrived, add, of = {}, frames.Round.add, frames.Round.of

    def timed_add(self, level):
        add(self, level)
        if self.final:
            arrived.setdefault(self.position, time.monotonic())

    def timed_of(msg, bounds):
        out = of(msg, bounds)
        if out.final:
            arrived.setdefault(out.position, time.monotonic())
        return out

    monkeypatch.setattr(frames.Round, "add", timed_add)
    monkeypatch.setattr(frames.Round, "of", staticmethod(timed_of))
    llm = connect_cloud(server.url, api_key=KEY_A, k="full", lookahead="chain:4", streamed=streamed)
    used = []
    stream = CoSteer(llm, None).stream(QUERY, method="llm", max_new_tokens=10)
    for _ in stream:
        used.append(time.monotonic())
    assert stream.generation.token_ids == per_token["llm"][:10]
    if streamed:
        assert used[0] < arrived[0] - 0.3  # the first token before the round's last level (4 x 0.15 s)
    else:
        assert used[0] >= arrived[0]


BAD_STREAMS = {
    "a child of a node the frame did not bring": (lambda blobs, parents: (blobs, [p - 1 for p in parents]),
                                                  "not a node of the frame"),
    "more nodes than announced": (lambda blobs, parents: (blobs + blobs[-1:], parents), "announced"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_a_bad_streamed_frame_is_refused_and_its_session_freed(server, tiny_slm, per_token, monkeypatch, case):
    """The cloud's LEVEL frames after the root break the round."""
    bend, message = BAD_STREAMS[case]

    def broken(encode_level):
        def encode(position, first, blobs, parents, tokens):
            if first > 0:
                blobs, parents = bend(list(blobs), list(parents))
            return encode_level(position, first, blobs, parents, tokens)

        return encode

    refused_beside_a_healthy_session(server, tiny_slm, per_token, monkeypatch, "encode_level", broken, message,
                                     lookahead="tree:3:9")  # fmt: skip


def test_an_announced_node_that_never_comes_is_waited_for_a_bounded_time_then_resumed(server, per_token, monkeypatch):
    """The cloud announces the first round's chain but never sends it: the device waits
    recv_timeout_s for the node it chose, then re-attaches with that token and goes on, into the
    uninterrupted run's tokens."""
    post = server.registry._post_level

    def lossy(sess, job):
        if sess.position > 0 or job.tree.sent == 0:  # the first round's levels after its root are lost
            post(sess, job)

    monkeypatch.setattr(server.registry, "_post_level", lossy)
    llm = connect_cloud(server.url, api_key=KEY_A, k="full", lookahead="chain:4",
                        retry=Retry(backoff_s=0.05, recv_timeout_s=0.5))  # fmt: skip
    sources = spy_sources(llm)
    g = CoSteer(llm, None).generate(QUERY, method="llm", max_new_tokens=N)
    assert g.token_ids == per_token["llm"] and sources[0].reconnects == 1
    wait_until(lambda: not server.registry.sessions)
