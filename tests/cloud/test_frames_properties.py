"""Property-based tests (hypothesis) of every frame's encoder and decoder: each message round-trips,
and every truncated or corrupted frame is refused with FrameError (the protocol's error, with its
close code) or read as a well-formed message, never another exception."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from costeer import frames
from costeer.frames import Attach, Dist, FrameError, Open, Ready, Token

U32 = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

opens = st.builds(
    Open,
    prompt_ids=st.lists(U32, max_size=40),
    k=U32,
    max_new_tokens=U32,
    generated=st.lists(U32, max_size=20),
    packed=st.booleans(),
)
attaches = st.builds(Attach, session_id=st.binary(min_size=16, max_size=16), n_generated=U32, last_token=U32)
tokens = st.builds(Token, token_id=U32)
readies = st.builds(Ready, session_id=st.binary(min_size=16, max_size=16), vocab_size=U32, position=U32)
uplinks = st.one_of(opens, attaches, tokens)


@st.composite
def distributions(draw, min_v: int = 2, max_v: int = 300) -> torch.Tensor:
    """[V] log-probabilities: a softmax of random logits at a random temperature, some tokens ruled out."""
    V = draw(st.integers(min_v, max_v))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 12.0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.log_softmax(torch.randn(V, generator=g) * scale, -1)
    if draw(st.booleans()):
        x[torch.randperm(V, generator=g)[: V // 10]] = float("-inf")
        x = torch.log_softmax(x, -1)
    return x


@st.composite
def dist_frames(draw) -> bytes:
    """A DIST frame of every encoding the cloud sends."""
    x = draw(distributions(min_v=130))
    V = x.shape[0]
    kind = draw(st.sampled_from(["full", "f16", "f32", "packed"]))
    position = draw(U32)
    if kind == "full":
        return frames.encode_dist(x, frames.FULL, position)
    if kind == "packed":
        return frames.encode_packed(x, draw(st.integers(0, V)), position, draw(st.floats(-20, -1)))
    return frames.encode_dist(x, draw(st.integers(1, V - 1)), position, kind)


downlinks = st.one_of(readies.map(lambda r: r.encode()), dist_frames())


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------


@FAST
@given(uplinks)
def test_uplink_messages_round_trip(msg):
    assert frames.decode_uplink(msg.encode()) == msg


@FAST
@given(readies)
def test_ready_round_trips(msg):
    assert frames.decode_downlink(msg.encode()) == msg


@FAST
@given(distributions(), U32)
def test_full_frames_are_bit_exact(x, position):
    d = frames.decode_downlink(frames.encode_dist(x, frames.FULL, position))
    assert d.full and d.position == position and torch.equal(frames.densify(d), x)


@FAST
@given(distributions(min_v=3), st.data())
def test_topk_frames_hold_a_top_k_and_the_tail_mass(x, data):
    V = x.shape[0]
    k = data.draw(st.integers(1, V - 1))
    values = data.draw(st.sampled_from(["f16", "f32"]))
    d = frames.decode_downlink(frames.encode_dist(x, k, 7, values))
    ids = d.ids
    assert d.position == 7 and d.vocab_size == V and len(ids) == k == len(set(ids.tolist()))
    rest = x.clone()
    rest[ids] = float("-inf")
    assert bool((x[ids] >= rest.max()).all())  # no token left out is more likely than one sent
    if values == "f32":
        assert torch.equal(d.logp, x[ids])
    else:
        finite = torch.isfinite(x[ids])
        assert torch.allclose(d.logp[finite], x[ids][finite], atol=1e-2, rtol=1e-3)
    tail = torch.logsumexp(rest.double(), 0).item()
    assert d.log_tail == pytest.approx(tail, abs=1e-5) or (math.isinf(tail) and math.isinf(d.log_tail))


@FAST
@given(distributions(min_v=130, max_v=1500), st.floats(-20, -1), st.data())
def test_packed_frames_hold_every_token_above_the_floor_within_its_band(x, floor, data):
    V = x.shape[0]
    k = data.draw(st.integers(0, V))
    d = frames.decode_downlink(frames.encode_packed(x, k, 3, floor))
    ids = d.ids
    assert len(set(ids.tolist())) == len(ids) and int(ids.max()) < V
    above = int((x >= floor).sum())
    limit = min(V - 1, k or V, 0xFFFF, int(torch.isfinite(x).sum()))  # never a ruled-out token
    assert len(ids) == min(limit, max(above, frames.PACKED_HEAD))
    rest = x.clone()
    rest[ids] = float("-inf")
    assert bool((x[ids] >= rest.max()).all())
    err = (d.logp.double() - x[ids].double()).abs()
    assert bool((err <= d.width.double() / 2 + 1e-3).all())  # each entry lies in its band (head: 1/2048 nat)


# ---------------------------------------------------------------------------------------
# Truncated and corrupted frames
# ---------------------------------------------------------------------------------------


def check_dist(d: Dist) -> None:
    """What the device may rely on in a frame it accepted."""
    V = d.vocab_size
    assert V >= 1 and not torch.isnan(d.logp).any() and not (d.logp == float("inf")).any()
    assert not math.isnan(d.log_tail) and d.log_tail != float("inf")
    # a distribution: no probability above 1 (up to rounding) and some mass somewhere
    assert bool((d.logp <= frames.LOGP_SLACK).all()) and d.log_tail <= frames.LOGP_SLACK
    assert bool(torch.isfinite(frames.densify(d)).any())
    if d.full:
        assert d.logp.shape == (V,)
    else:
        assert d.ids.shape == d.logp.shape and len(set(d.ids.tolist())) == len(d.ids)
        assert len(d.ids) == 0 or (0 <= int(d.ids.min()) and int(d.ids.max()) < V)
        if d.width is not None:
            assert d.width.shape == d.logp.shape and bool((d.width >= 0).all())
    dense = frames.densify(d)
    assert dense.shape == (V,) and not torch.isnan(dense).any()


def check_read(decode, data: bytes) -> None:
    """decode(data) raises FrameError with a documented close code, or returns a sound message."""
    try:
        msg = decode(data)
    except FrameError as e:
        assert e.code in (frames.CLOSE_MALFORMED, frames.CLOSE_VERSION)
        return
    if isinstance(msg, Dist):
        check_dist(msg)
    elif isinstance(msg, frames.Tree):  # a look-ahead round: every node a sound distribution
        for d in msg.dists:
            check_dist(d)
    else:  # a fixed-layout message: it reads back the same from its own bytes
        assert decode(msg.encode()) == msg


def is_short_token(data: bytes) -> bool:
    """Any 4-byte uplink frame of this version is a TOKEN, by design (docs/wire-format.md)."""
    return len(data) == frames.TOKEN_BYTES and data[0] == frames.VERSION


@FAST
@given(uplinks, st.data())
def test_every_truncated_uplink_frame_is_refused(msg, data):
    full = msg.encode()
    assume(len(full) > 1)
    cut = data.draw(st.integers(0, len(full) - 1))
    if is_short_token(full[:cut]):
        return
    with pytest.raises(FrameError):
        frames.decode_uplink(full[:cut])


@FAST
@given(downlinks, st.data())
def test_every_truncated_downlink_frame_is_refused(full, data):
    cut = data.draw(st.integers(0, len(full) - 1))
    with pytest.raises(FrameError):
        frames.decode_downlink(full[:cut])


def corrupt(data: bytes, draw) -> bytes:
    """Overwrite, insert or delete a few bytes, or append some."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["set", "set", "insert", "delete", "append"]))
        at = draw(st.integers(0, max(len(b) - 1, 0)))
        if how == "set" and b:
            b[at] = draw(st.integers(0, 255))
        elif how == "insert":
            b[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete" and b:
            del b[at : at + draw(st.integers(1, 8))]
        elif how == "append":
            b += draw(st.binary(min_size=1, max_size=8))
    return bytes(b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(uplinks, st.data())
def test_corrupted_uplink_frames_are_refused_or_read_soundly(msg, data):
    check_read(frames.decode_uplink, corrupt(msg.encode(), data.draw))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(downlinks, st.data())
def test_corrupted_downlink_frames_are_refused_or_read_soundly(full, data):
    check_read(frames.decode_downlink, corrupt(full, data.draw))


@FAST
@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_refused_or_read_soundly(data):
    check_read(frames.decode_uplink, data)
    check_read(frames.decode_downlink, data)


@FAST
@given(dist_frames(), st.sampled_from([float("nan"), float("inf")]), st.data())
def test_impossible_values_are_refused(full, bad, data):
    """NaN or +inf where a log-probability belongs: the header's log_tail or any f32 value."""
    b = bytearray(full)
    where = data.draw(st.sampled_from(["log_tail", "value"]))
    if where == "log_tail":
        assume(b[2] != frames.FULL_F32)  # a full frame's log_tail is not read: it is -inf by definition
        b[16:20] = np.float32(bad).tobytes()
    else:
        enc, id_width, k = b[2], b[3], int.from_bytes(b[12:16], "little")
        assume(enc in (frames.FULL_F32, frames.TOPK_F32))
        first = 20 if enc == frames.FULL_F32 else 20 + k * id_width  # the f32 values
        at = first + 4 * data.draw(st.integers(0, k - 1))
        b[at : at + 4] = np.float32(bad).tobytes()
    with pytest.raises(FrameError, match="not a log-probability"):
        frames.decode_downlink(bytes(b))
