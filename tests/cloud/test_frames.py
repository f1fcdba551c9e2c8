"""The wire format: every message round-trips; full frames are exact; top-k frames keep the
top-k and the tail mass; the tail models; malformed frames get their close codes."""

import math
import struct

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
        Attach(b"\x07" * 16, 12, 345),
        Attach(b"\x00" * 16, 0, frames.NO_TOKEN),
        Token(49151),
    ):
        assert frames.decode_uplink(msg.encode()) == msg


def test_token_frame_is_six_bytes_and_ready_round_trips():
    assert len(Token(7).encode()) == 6
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
    assert torch.logsumexp(dense[tail].double(), 0).item() == pytest.approx(d.log_tail, abs=1e-5)
    ratio = dense[tail] - ref[tail]
    assert ratio.max() - ratio.min() < 1e-4


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
        (b"\x01\x7f\x00\x00", frames.CLOSE_MALFORMED, "unknown uplink message type"),
        (b"\x01\x03\x01\x00", frames.CLOSE_MALFORMED, "TOKEN frame must be 6 bytes"),
        (Open([1, 2, 3]).encode()[:-2], frames.CLOSE_MALFORMED, "does not match"),
        (struct.pack("<BBHIIII", 1, 1, 0, 0, 5, 10**6, 0), frames.CLOSE_MALFORMED, "does not match"),
        (Attach(b"x" * 16, 1, 2).encode() + b"!", frames.CLOSE_MALFORMED, "ATTACH frame must be"),
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
