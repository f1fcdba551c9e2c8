"""The wire format: every message round-trips; full frames are exact; top-k frames keep the
top-k and the tail mass; the tail models; malformed frames get their close codes."""

import math
import struct

import numpy as np
import pytest
import torch

from costeer import frames
from costeer.frames import Attach, Dist, FrameError, Open, Ready, Token


def logp(V=1000, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(V, generator=g) * scale, -1)


def test_uplink_messages_round_trip():
    for msg in (
        Open([5, 6, 7], k=256, max_new_tokens=99, generated=[1, 2]),
        Open([0], k=frames.FULL, max_new_tokens=1),
        Open([9, 8], k=4096, max_new_tokens=64, packed=True),
        Attach(b"\x07" * 16, 12, 345),
        Attach(b"\x00" * 16, 0, frames.NO_TOKEN),
        Token(49151),
    ):
        assert frames.decode_uplink(msg.encode()) == msg


def test_token_frame_is_four_bytes_and_ready_round_trips():
    for t in (0, 7, 262_143, (1 << 24) - 1):
        assert len(Token(t).encode()) == frames.TOKEN_BYTES == 4
        assert frames.decode_uplink(Token(t).encode()) == Token(t)
    # ids beyond 24 bits (no real vocabulary) and frames from older devices: the 6-byte form
    assert len(Token(1 << 24).encode()) == 6 and frames.decode_uplink(Token(1 << 24).encode()) == Token(1 << 24)
    assert frames.decode_uplink(struct.pack("<BBI", 1, frames.TOKEN, 9)) == Token(9)
    with pytest.raises(FrameError) as e:
        frames.decode_uplink(b"\x03\x05\x00\x00")  # another version (2 is the look-ahead frames)
    assert e.value.code == frames.CLOSE_VERSION
    r = Ready(b"\x01" * 16, 49152, 3)
    assert frames.decode_downlink(r.encode()) == r


def test_full_frame_is_bit_exact():
    x = logp(V=777)
    x[3] = float("-inf")
    data = frames.encode_dist(x, frames.FULL, position=4)
    assert len(data) == frames.frame_bytes(777, frames.FULL) == 20 + 4 * 777
    d = frames.decode_downlink(data)
    assert d.full and d.position == 4 and d.vocab_size == 777
    assert torch.equal(frames.densify(d), x)
    # k >= V is the full vector too
    assert frames.decode_downlink(frames.encode_dist(x, 777, 0)).full


@pytest.mark.parametrize("values, tol", [("f16", 1e-2), ("f32", 0.0)])
def test_topk_frame_holds_the_top_k_and_the_tail_mass(values, tol):
    x = logp()
    data = frames.encode_dist(x, 32, position=9, values=values)
    assert len(data) == frames.frame_bytes(1000, 32, values) == 20 + 32 * (2 + (2 if values == "f16" else 4))
    d = frames.decode_downlink(data)
    top = torch.topk(x, 32)
    assert d.ids.tolist() == top.indices.tolist() and d.position == 9
    assert torch.allclose(d.logp, top.values, atol=tol, rtol=1e-3 if tol else 0)
    rest = x.clone()
    rest[top.indices] = float("-inf")
    assert d.log_tail == pytest.approx(torch.logsumexp(rest.double(), 0).item(), abs=1e-6)


def test_wide_vocabularies_use_four_byte_ids():
    x = logp(V=70_000)
    d = frames.decode_downlink(frames.encode_dist(x, 8, 0))
    assert d.ids.max() < 70_000 and d.ids.tolist() == torch.topk(x, 8).indices.tolist()
    assert len(frames.encode_dist(x, 8, 0)) == 20 + 8 * (4 + 2)


def test_uniform_tail_spreads_the_mass_evenly():
    x = logp()
    d = frames.decode_downlink(frames.encode_dist(x, 16, 0, values="f32"))
    dense = frames.densify(d)
    assert torch.logsumexp(dense.double(), 0).item() == pytest.approx(0.0, abs=1e-5)
    tail = torch.ones(1000, dtype=torch.bool)
    tail[d.ids] = False
    assert torch.allclose(dense[tail], torch.full((984,), d.log_tail - math.log(984)))
    assert torch.equal(dense[d.ids], d.logp)


def test_reference_tail_is_exact_when_the_reference_is_the_model():
    x = logp()
    d = frames.decode_downlink(frames.encode_dist(x, 16, 0, values="f32"))
    assert torch.allclose(frames.densify(d, reference=x), x, atol=1e-5)
    # a different reference: top-k kept, tail in the reference's proportions, same total
    ref = logp(seed=1)
    dense = frames.densify(d, reference=ref)
    assert torch.equal(dense[d.ids], d.logp)
    tail = torch.ones(1000, dtype=torch.bool)
    tail[d.ids] = False
    kth = float(d.logp.min())
    assert dense[tail].max() <= kth  # no tail token above the cloud's k-th value
    scaled = ref[tail] - torch.logsumexp(ref[tail].double(), 0).float() + d.log_tail
    capped = scaled > kth
    assert torch.equal(dense[tail][capped], torch.full((int(capped.sum()),), kth))
    ratio = dense[tail][~capped] - ref[tail][~capped]  # the rest in the reference's proportions
    assert ratio.max() - ratio.min() < 1e-4
    assert float(ratio[0]) == pytest.approx(float(scaled[~capped][0] - ref[tail][~capped][0]), abs=1e-5)


def test_the_tail_is_capped_at_the_kth_value():
    """A stand-in that ranks a tail token above the cloud's k-th entry would let a delta lift it
    to a win the LLM's own numbers rule out: the cap keeps it at the k-th value."""
    # a flat tail: 20 tokens that together outweigh the k-th entry
    x = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0] + [0.5] * 20), 0)
    d = frames.decode_downlink(frames.encode_dist(x, 3, 0, values="f32"))
    assert d.log_tail > float(x[2])
    ref = torch.log_softmax(torch.tensor([0.0] * 3 + [9.0] + [0.0] * 19), 0)  # token 3 far too likely
    dense = frames.densify(d, reference=ref)
    assert float(dense[3]) == pytest.approx(float(x[2]))  # capped: it would be ~log_tail
    assert dense[4:].max() <= float(x[2])
    # with a delta that favours token 3 by 1.5 nats, the LLM's own numbers keep token 0 ahead
    delta = torch.zeros(23)
    delta[3] = 1.5
    assert int(torch.argmax(x + delta)) == 0 and int(torch.argmax(dense + delta)) == 0
    # also when the uniform level (log_tail - log 2) would exceed the k-th value
    uniform = frames.densify(frames.Dist(0, 5, x[:3], torch.arange(3), math.log(0.9)))
    assert torch.equal(uniform[3:], torch.full((2,), float(x[2])))


def test_a_ruled_out_value_beside_a_finite_tail_mass_gives_no_nan():
    """A float16 top-k frame whose smallest value is -inf (a token ruled out) while its tail mass is
    finite, as a hostile cloud may send: its cap was NaN (np.spacing(inf)), and the device's tail,
    clamped to it, came out NaN for every token outside the top-k."""
    V, k = 40, 4
    header = frames._DIST.pack(frames.VERSION, frames.DIST, frames.TOPK_F16, 2, 0, V, k, math.log(0.1))
    ids = np.array([3, 7, 11, 20], dtype="<u2").tobytes()
    vals = np.array([math.log(0.6), math.log(0.3), -20.0, -np.inf], dtype="<f2").tobytes()
    dist = frames.decode_downlink(header + ids + vals)
    assert dist.cap == float("-inf")
    reference = torch.log_softmax(torch.randn(V), -1)
    for ref in (None, reference):
        out = frames.densify(dist, ref)
        assert not torch.isnan(out).any()
        assert out[20] == float("-inf") and torch.equal(out[[3, 7]], dist.logp[:2])


def test_reference_that_rules_out_tokens_gives_them_nothing_and_falls_back_when_empty():
    x = logp(V=50)
    d = frames.decode_downlink(frames.encode_dist(x, 5, 0, values="f32"))
    ref = x.clone()
    ref[40:] = float("-inf")  # e.g. LLM ids with no SLM counterpart
    dense = frames.densify(d, reference=ref)
    assert torch.isinf(dense[40:]).all() or set(d.ids.tolist()) & set(range(40, 50))
    nothing = torch.full((50,), float("-inf"))
    assert torch.isfinite(frames.densify(d, reference=nothing)).all()  # uniform fallback


@pytest.mark.parametrize(
    "data, code, message",
    [
        (b"", frames.CLOSE_MALFORMED, "too short"),
        (b"\x01", frames.CLOSE_MALFORMED, "too short"),
        (b"\x02\x03\x00\x00\x00\x00", frames.CLOSE_VERSION, "version 2"),
        (b"\x01\x7f\x00\x00\x00", frames.CLOSE_MALFORMED, "unknown uplink message type"),
        (b"\x01\x03\x01\x00\x00", frames.CLOSE_MALFORMED, "TOKEN frame must be 6 bytes"),
        (Open([1, 2, 3]).encode()[:-2], frames.CLOSE_MALFORMED, "does not match"),
        (struct.pack("<BBHIIII", 1, 1, 0, 0, 5, 10**6, 0), frames.CLOSE_MALFORMED, "does not match"),
        (Attach(b"x" * 16, 1, 2).encode() + b"!", frames.CLOSE_MALFORMED, "ATTACH frame must be"),
        (struct.pack("<BBHIIIII", 1, 1, 4, 8, 5, 1, 0, 3), frames.CLOSE_MALFORMED, "unknown OPEN flags"),
    ],
)
def test_malformed_uplink_frames(data, code, message):
    with pytest.raises(FrameError, match=message) as e:
        frames.decode_uplink(data)
    assert e.value.code == code


def test_malformed_downlink_frames():
    good = frames.encode_dist(logp(V=100), 4, 0)
    for bad in (good[:-1], good[:10], b"\x01\x99" + good[2:], good[:2] + b"\x07" + good[3:]):
        with pytest.raises(FrameError):
            frames.decode_downlink(bad)


def test_tokenizer_fingerprint_tracks_vocab_and_template():
    from tests.tiny import bpe_tokenizer

    a = bpe_tokenizer()
    fp = frames.tokenizer_fingerprint(a)
    assert fp == frames.tokenizer_fingerprint(a) and len(fp) == 64
    b = bpe_tokenizer(chat=False)
    assert frames.tokenizer_fingerprint(b) != fp


def test_dist_full_property():
    assert Dist(0, 3, torch.zeros(3), None, float("-inf")).full


def test_float16_frames_cap_half_a_rounding_step_above_the_kth_value():
    """The k-th value travels rounded to float16; the true one (and so every tail token) can be
    up to half a float16 step above what arrives, and the cap must not cut below it."""
    x = logp()
    d = frames.decode_downlink(frames.encode_dist(x, 16, 0))
    kth = torch.topk(x, 17).values
    assert d.floor >= float(kth[15]) >= float(kth[16])
    assert d.floor - float(d.logp.min()) <= float(np.spacing(np.float16(abs(float(d.logp.min()))))) / 2 + 1e-9


# --- packed frames ---------------------------------------------------------------------


def test_exp_golomb_streams_round_trip():
    rng = np.random.default_rng(0)
    gaps = np.concatenate([np.zeros(5, np.int64), rng.integers(0, 300, 200), [2**18, 2**20 - 1, 1]])
    order = rng.integers(0, 16, len(gaps))
    prefix, suffix = frames._eg_encode(gaps, order)
    assert np.array_equal(frames._eg_decode(prefix, suffix, order), gaps)
    # the chosen order is the cheapest one for each group
    starts = np.array([0, 5, 205])
    best = frames._eg_choose(gaps, starts)
    cost = [sum(len(s) for s in frames._eg_encode(gaps[a:b], np.full(b - a, o))) for a, b, o in
            zip(starts, [5, 205, len(gaps)], best)]  # fmt: skip
    for (a, b), c in zip([(0, 5), (5, 205), (205, len(gaps))], cost):
        assert c == min(sum(len(s) for s in frames._eg_encode(gaps[a:b], np.full(b - a, o))) for o in range(16))
    empty = frames._eg_encode(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert frames._eg_decode(*empty, np.zeros(0, np.int64)).size == 0


@pytest.mark.parametrize("V, k, floor", [(262_144, 4096, -12.0), (262_144, 300, -12.0), (49_152, 4096, -9.0), (5000, 4096, -99.0)])
def test_packed_frames_hold_every_token_above_the_floor_within_their_bands(V, k, floor):
    x = logp(V=V, seed=3, scale=2.5)
    d = frames.decode_downlink(frames.encode_packed(x, k, 7, floor))
    n = min(V - 1, max(int((x >= floor).sum()), frames.PACKED_HEAD), k)
    top = torch.topk(x, n)
    assert d.position == 7 and d.ids.numel() == n
    assert set(d.ids.tolist()) == set(top.indices.tolist())
    true = x[d.ids]
    head = d.width == 0
    assert int(head.sum()) == min(n, frames.PACKED_HEAD)
    assert (true[head] - d.logp[head]).abs().max() <= 0.5 / frames.PACKED_HEAD_SCALE + 1e-6
    body = ~head
    assert ((true[body] - d.logp[body]).abs() <= d.width[body] / 2 + 1e-5).all()
    assert (d.width[body] <= frames.PACKED_STEP + 1e-6).all()
    assert d.floor == pytest.approx(float(top.values[-1]))
    rest = x.double().clone()
    rest[top.indices] = float("-inf")
    assert d.log_tail == pytest.approx(float(torch.logsumexp(rest, 0)), abs=1e-5)


def test_packed_frames_fit_many_more_entries_than_float16_top_k():
    x = logp(V=262_144, seed=4, scale=2.5)
    packed = frames.encode_packed(x, 4096, 0, -12.0)
    n = frames.decode_downlink(packed).ids.numel()
    assert n > 1000
    assert len(packed) < 0.4 * len(frames.encode_dist(x, n, 0))


def test_packed_frames_with_the_model_as_reference_rebuild_the_model():
    """Same model on both sides: each band entry takes the reference's (exact) value."""
    x = logp(V=20_000, seed=5, scale=2.5)
    d = frames.decode_downlink(frames.encode_packed(x, 4096, 0, -14.0))
    assert (d.width > 0).any()
    dense = frames.densify(d, reference=x)
    head = d.ids[d.width == 0]
    body = d.ids[d.width > 0]
    assert torch.allclose(dense[body], x[body], atol=1e-5)
    assert (dense[head] - x[head]).abs().max() <= 0.5 / frames.PACKED_HEAD_SCALE + 1e-6
    tail = torch.ones(20_000, dtype=torch.bool)
    tail[d.ids] = False
    assert torch.allclose(dense[tail], x[tail], atol=1e-4)
    # without a reference, each band entry sits in the middle of its band
    mid = frames.densify(d)
    assert torch.equal(mid[d.ids], d.logp)


def test_malformed_packed_frames():
    x = logp(V=70_000, seed=6, scale=2.5)
    good = frames.encode_packed(x, 2000, 0, -12.0)
    head = frames._DIST.size
    bad_k = bytearray(good)
    struct.pack_into("<I", bad_k, 12, 1999)  # k no longer matches the counts
    small_v = bytearray(good)
    struct.pack_into("<I", small_v, 8, 100)  # ids beyond a (claimed) vocabulary of 100
    for bad in (good[: head + 10], good[:-40], bytes(bad_k), bytes(small_v)):
        with pytest.raises(FrameError):
            frames.decode_downlink(bad)


def _full_frame(values) -> bytes:
    """A full DIST frame holding `values` as sent, whatever they are."""
    V = len(values)
    head = frames._DIST.pack(frames.VERSION, frames.DIST, frames.FULL_F32, 0, 0, V, V, float("-inf"))
    return head + np.asarray(values, "<f4").tobytes()


def _topk_frame(values, log_tail: float, enc: int = frames.TOPK_F32) -> bytes:
    k, V = len(values), 100
    vdtype = "<f4" if enc == frames.TOPK_F32 else "<f2"
    head = frames._DIST.pack(frames.VERSION, frames.DIST, enc, 2, 0, V, k, log_tail)
    return head + np.arange(k, dtype="<u2").tobytes() + np.asarray(values, vdtype).tobytes()


def _packed_with_top(top: float) -> bytes:
    b = bytearray(frames.encode_packed(logp(V=3000, seed=2), 500, 0))
    struct.pack_into("<f", b, frames._DIST.size, top)  # the head's values are read below `top`
    return bytes(b)


@pytest.mark.parametrize(
    "frame, message",
    [
        (_full_frame([float("-inf")] * 50), "no token any probability"),
        (_topk_frame([float("-inf")] * 4, float("-inf"), frames.TOPK_F16), "no token any probability"),
        (_topk_frame([float("-inf")], 0.0), "no token any probability"),  # the tail is capped at -inf
        (_full_frame([3e38] * 50), "above 0"),  # exp overflows: the device's scores became NaN
        (_full_frame([-4.0] * 49 + [0.5]), "above 0"),
        (_topk_frame([-1.0, -2.0], 2.0), "above 0"),  # a tail mass of e^2
        (_packed_with_top(40.0), "above 0"),
    ],
)
def test_a_distribution_with_no_mass_or_a_probability_above_one_is_refused(frame, message):
    """Finite values a hostile cloud may send that are no distribution: with every token ruled out the
    device's greedy pick was token 0 (argmax over NaN: an empty answer when 0 is a stop id) and its
    sampling a RuntimeError; values whose exp overflows did the same."""
    with pytest.raises(FrameError, match=message) as e:
        frames.decode_downlink(frame)
    assert e.value.code == frames.CLOSE_MALFORMED


def test_log_probabilities_at_zero_and_ruled_out_tokens_are_still_read():
    one = [float("-inf")] * 50
    one[7] = 0.0  # a certain token: log p = 0 exactly
    assert int(frames.densify(frames.decode_downlink(_full_frame(one))).argmax()) == 7
    tail = frames.decode_downlink(_topk_frame([-9.0], -1e-4))  # nearly all the mass in the tail
    assert torch.isfinite(frames.densify(tail)).all()


@pytest.mark.parametrize("enc", [frames.TOPK_F16, frames.TOPK_F32])
def test_a_top_k_frame_with_no_entries_is_refused(enc):
    """k = 0 with a top-k encoding (the cloud sends encoding 0 for the full vocabulary): the frame was
    read, and densify then raised torch's RuntimeError (the smallest of no values)."""
    with pytest.raises(FrameError, match="no entries"):
        frames.decode_downlink(_topk_frame([], -0.5, enc))
