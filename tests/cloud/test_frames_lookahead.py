"""The look-ahead frames (version 2): OPEN and ATTACH's long forms, TOKENS, TREE and LEVEL round-trip;
a TREE frame whose parents, tokens, counts or node positions do not make one tree is refused with
FrameError (4400), and so is every truncated one; a streamed round's LEVEL frames that do not bring
exactly the nodes announced before, announce children of nodes they did not bring, or grow the round
past the bounds asked for are refused (4400); version-1 frames read as before."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from costeer import frames
from costeer.frames import Attach, FrameError, Lookahead, Open, Token, Tokens, Tree
from tests.cloud.test_frames_properties import FAST, U32, check_dist, corrupt, distributions

U16 = st.integers(1, 0xFFFF)
lookaheads = st.builds(Lookahead, mode=st.sampled_from([frames.LOOKAHEAD_AUTO, frames.LOOKAHEAD_FIXED]),
                       depth=st.integers(0, 255), nodes=st.integers(0, 0xFFFF), streamed=st.booleans())  # fmt: skip
opens2 = st.builds(Open, prompt_ids=st.lists(U32, max_size=30), k=U32, max_new_tokens=U32,
                   generated=st.lists(U32, max_size=10), packed=st.booleans(), lookahead=lookaheads)  # fmt: skip
attaches2 = st.builds(Attach, session_id=st.binary(min_size=16, max_size=16), n_generated=U32,
                      pending=st.lists(U32, min_size=1, max_size=20).map(tuple))  # fmt: skip
tokens2 = st.builds(Tokens, token_ids=st.lists(U32, min_size=1, max_size=40).map(tuple))
uplinks2 = st.one_of(opens2, attaches2, tokens2)


@st.composite
def trees(draw):
    """A TREE frame of a random shape and frame kind -> (bytes, parents, tokens, the node vectors)."""
    n = draw(st.integers(1, 12))
    V = draw(st.integers(130, 400))
    parents = [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens, seen = [], set()
    for p in parents:
        t = draw(st.integers(0, V - 1).filter(lambda t, p=p: (p, t) not in seen))
        seen.add((p, t))
        tokens.append(t)
    depth = [0]
    for p in parents:
        depth.append(depth[p] + 1)
    position = draw(st.integers(0, 2**31))
    kind = draw(st.sampled_from(["full", "f16", "packed"]))
    xs, blobs = [], []
    for d in depth:
        x = draw(distributions(min_v=V, max_v=V))
        xs.append(x)
        if kind == "full":
            blobs.append(frames.encode_dist(x, frames.FULL, position + d))
        elif kind == "f16":
            blobs.append(frames.encode_dist(x, 16, position + d))
        else:
            blobs.append(frames.encode_packed(x, 0, position + d))
    return frames.encode_tree(position, parents, tokens, blobs, 1234), parents, tokens, xs


@FAST
@given(uplinks2)
def test_lookahead_uplink_messages_round_trip(msg):
    assert frames.decode_uplink(msg.encode()) == msg


@FAST
@given(trees())
def test_tree_frames_round_trip(case):
    data, parents, tokens, xs = case
    tree = frames.decode_downlink(data)
    assert isinstance(tree, Tree) and tree.size == len(xs) and tree.cloud_us == 1234
    assert list(tree.parents[1:]) == parents and list(tree.tokens[1:]) == tokens
    for i, d in enumerate(tree.dists):
        check_dist(d)
        if d.full:
            assert torch.equal(d.logp, xs[i])
    for i in range(1, tree.size):  # every node is reached from its parent by its token
        assert tree.child(tree.parents[i], tree.tokens[i]) == i
        assert tree.path(i)[-1] == tokens[i - 1] and len(tree.path(i)) == tree.depths()[i]


@FAST
@given(trees(), st.data())
def test_every_truncated_tree_frame_is_refused(case, data):
    full = case[0]
    cut = data.draw(st.integers(0, len(full) - 1))
    with pytest.raises(FrameError) as e:
        frames.decode_downlink(full[:cut])
    assert e.value.code == frames.CLOSE_MALFORMED


@FAST
@given(trees(), st.data())
def test_corrupted_tree_frames_are_refused_or_read_as_one_tree(case, data):
    try:
        tree = frames.decode_downlink(corrupt(case[0], data.draw))
    except FrameError as e:
        assert e.code in (frames.CLOSE_MALFORMED, frames.CLOSE_VERSION)
        return
    if isinstance(tree, Tree):  # whatever was read is a tree the device can walk
        assert all(tree.parents[i] < i for i in range(1, tree.size))
        depths = tree.depths()
        for i, d in enumerate(tree.dists):
            check_dist(d)
            assert d.position == tree.position + depths[i]


def node_frames(V: int, position: int, depths: list[int]) -> list[bytes]:
    x = torch.log_softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), -1)
    return [frames.encode_dist(x, 8, position + d) for d in depths]


@pytest.mark.parametrize(
    "parents, tokens, depths, message",
    [
        ([1], [5], [0, 1], "parent does not come before it"),  # node 1's parent is itself
        ([0, 2], [5, 6], [0, 1, 2], "parent does not come before it"),  # a cycle
        ([0, 0], [5, 5], [0, 1, 1], "same token"),  # two children of the root with one token
        ([0], [5], [0, 2], "position"),  # a node at the wrong position
        ([0], [500], [0, 1], "outside the vocabulary"),
    ],
)
def test_inconsistent_trees_are_refused(parents, tokens, depths, message):
    data = frames.encode_tree(10, parents, tokens, node_frames(100, 10, depths))
    with pytest.raises(FrameError, match=message) as e:
        frames.decode_downlink(data)
    assert e.value.code == frames.CLOSE_MALFORMED


def test_tree_counts_that_do_not_add_up_are_refused():
    good = frames.encode_tree(0, [0], [3], node_frames(100, 0, [0, 1]))
    n_more = bytearray(good)
    n_more[2:4] = struct.pack("<H", 3)  # claims a third node
    lengths_off = bytearray(good)
    lengths_off[struct.calcsize("<BBHII") + 6] += 1  # the root's length one too many
    for bad, message in ((bytes(n_more), "do not add up|cannot hold"), (bytes(lengths_off), "do not add up"),
                         (good + b"\0", "do not add up"), (good[:2] + b"\0\0" + good[4:], "cannot hold")):  # fmt: skip
        with pytest.raises(FrameError, match=message):
            frames.decode_downlink(bad)


def test_a_node_that_is_not_a_dist_frame_is_refused():
    ready = frames.Ready(b"s" * 16, 100, 0).encode()
    with pytest.raises(FrameError, match="not a DIST frame"):
        frames.decode_downlink(frames.encode_tree(0, [], [], [ready]))


def test_version_one_frames_are_unchanged_and_version_two_is_known():
    assert Open([1, 2]).encode()[0] == frames.VERSION  # no look-ahead: the version-1 form, as before
    assert Open([1, 2], lookahead=Lookahead(frames.LOOKAHEAD_AUTO, 4, 9)).encode()[0] == frames.LOOKAHEAD_VERSION
    assert Attach(b"s" * 16, 3, 7).encode()[0] == frames.VERSION
    assert Attach(b"s" * 16, 3, 7).tail() == (7,) and Attach(b"s" * 16, 3, pending=(1, 2)).tail() == (1, 2)
    assert frames.decode_uplink(Token(9).encode()) == Token(9)
    for bad in (b"\x02\x03" + struct.pack("<I", 9), b"\x01\x04\x01\x00" + struct.pack("<I", 9)):  # TOKEN v2, TOKENS v1
        with pytest.raises(FrameError) as e:
            frames.decode_uplink(bad)
        assert e.value.code == frames.CLOSE_VERSION
    with pytest.raises(FrameError, match="look-ahead mode"):
        frames.decode_uplink(Open([1], lookahead=Lookahead(7, 1, 2)).encode())
    with pytest.raises(FrameError, match="does not match"):
        frames.decode_uplink(struct.pack("<BBH", 2, frames.TOKENS, 0))  # an empty round


def test_a_dist_frame_reads_as_a_round_without_look_ahead():
    d = frames.decode_downlink(node_frames(100, 4, [0])[0])
    tree = Tree.single(d)
    assert tree.size == 1 and tree.position == 4 and tree.child(0, 3) is None and tree.path(0) == []


def test_tree_overhead_is_what_the_frame_adds():
    blobs = node_frames(100, 0, [0, 1, 2])
    assert len(frames.encode_tree(0, [0, 1], [4, 5], blobs)) == sum(map(len, blobs)) + frames.tree_overhead(3)
    assert np.frombuffer(Tokens((1, 2, 3)).encode(), "<u4", 3, 4).tolist() == [1, 2, 3]


# -- streamed rounds: LEVEL frames ---------------------------------------------------------------------

CHAIN = Lookahead(frames.LOOKAHEAD_FIXED, 3, 4, streamed=True)


def level(position, first, depths, parents=(), tokens=(), V=100):
    """A LEVEL frame of nodes at `depths` (below the root at `position`) announcing (parents, tokens)."""
    return frames.decode_downlink(frames.encode_level(position, first, node_frames(V, position, depths),
                                                      list(parents), list(tokens)))  # fmt: skip


def test_a_streamed_round_grows_frame_by_frame_and_every_node_is_announced_first():
    r = frames.Round.of(level(7, 0, [0], [0, 0], [5, 6]), CHAIN)  # the root, and two children on their way
    assert r.size == 3 and r.ready(0) and not r.ready(1) and r.child(0, 6) == 2 and r.child(0, 9) is None
    assert not r.final and r.path(2) == [6]
    r.add(level(7, 1, [1, 1], [2], [8]))  # level 1; node 2 takes a child
    assert r.ready(2) and r.child(2, 8) == 3 and not r.ready(3)
    r.add(level(7, 3, [2]))  # the last frame: nothing announced
    assert r.final and r.ready(3) and r.path(3) == [6, 8] and r.dists[3].position == 9


def test_a_root_alone_is_a_final_round():
    r = frames.Round.of(level(0, 0, [0]), CHAIN)
    assert r.final and r.size == 1


def test_level_frames_round_trip_and_need_version_two():
    data = frames.encode_level(3, 4, node_frames(100, 3, [1, 1]), [4, 5], [9, 10])
    msg = frames.decode_downlink(data)
    assert isinstance(msg, frames.Level) and (msg.position, msg.first, msg.parents, msg.tokens) == (3, 4, (4, 5), (9, 10))
    assert len(msg.dists) == 2 and not msg.final
    with pytest.raises(FrameError) as e:
        frames.decode_downlink(bytes([frames.VERSION]) + data[1:])
    assert e.value.code == frames.CLOSE_VERSION
    for cut in range(len(data)):
        with pytest.raises(FrameError):
            frames.decode_downlink(data[:cut])


BAD_ROUNDS = {
    "a first frame that is not the root alone": ([(0, [0, 1], [], [])], "starts with its root alone"),
    "more nodes than announced": ([(0, [0], [0], [5]), (1, [1, 1], [], [])], "announced"),
    "fewer nodes than announced": ([(0, [0], [0, 0], [5, 6]), (1, [1], [], [])], "announced"),
    "nodes that skip ahead": ([(0, [0], [0], [5]), (2, [1], [], [])], "announced"),
    "a frame after the last": ([(0, [0], [0], [5]), (1, [1], [], []), (2, [2], [], [])], "after the round's last"),
    "a child of a node the frame did not bring": ([(0, [0], [0], [5]), (1, [1], [0], [6])], "not a node of the frame"),
    "two children of one node with one token": ([(0, [0], [0, 0], [5, 5])], "same token"),
    "a token outside the vocabulary": ([(0, [0], [0], [500])], "outside the vocabulary"),
    "a node at the wrong position": ([(0, [0], [0], [5]), (1, [2], [], [])], "position"),
    "deeper than asked": ([(0, [0], [0], [5]), (1, [1], [1], [5]), (2, [2], [2], [5]), (3, [3], [3], [5])], "asked for"),
    "more nodes than asked": ([(0, [0], [0] * 4, [5, 6, 7, 8])], "asked for"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_ROUNDS))
def test_inconsistent_streamed_rounds_are_refused(case):
    steps, message = BAD_ROUNDS[case]
    with pytest.raises(FrameError, match=message) as e:
        (first, depths, parents, tokens), *rest = steps
        r = frames.Round.of(level(0, first, depths, parents, tokens), CHAIN)
        for first, depths, parents, tokens in rest:
            r.add(level(0, first, depths, parents, tokens))
    assert e.value.code == frames.CLOSE_MALFORMED


def test_open_asks_for_streamed_rounds_with_a_flag_only_in_its_version_two_form():
    streamed = Open([1, 2], lookahead=CHAIN)
    assert frames.decode_uplink(streamed.encode()).lookahead.streamed
    assert not frames.decode_uplink(Open([1, 2], lookahead=Lookahead(frames.LOOKAHEAD_FIXED, 3, 4)).encode()).lookahead.streamed
    v1 = bytearray(Open([1, 2], packed=True).encode())
    v1[2:4] = struct.pack("<H", frames.FLAG_PACKED | frames.FLAG_STREAMED)  # streamed without look-ahead
    with pytest.raises(FrameError, match="unknown OPEN flags"):
        frames.decode_uplink(bytes(v1))
