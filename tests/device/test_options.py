"""The frames option (`--cloud-k`) as one value: parsed once, checked in its constructor, and
shown back as the text that names it (run folders record that text)."""

import pytest

from costeer import frames
from costeer.device.options import DEFAULT_K, MAX_LOOKAHEAD, PACKED_K, CloudFrames, Lookahead


@pytest.mark.parametrize(
    "text, k, packed",
    [("full", frames.FULL, False), (" FULL ", frames.FULL, False), ("0", frames.FULL, False), ("8", 8, False),
     ("packed", PACKED_K, True), ("packed:300", 300, True), ("Packed:1", 1, True)],
)  # fmt: skip
def test_texts_parse_to_one_value(text, k, packed):
    f = CloudFrames.parse(text)
    assert (f.k, f.packed) == (k, packed)
    assert CloudFrames.parse(str(f)) == f  # the recorded text names the same frames
    assert CloudFrames.parse(f) is f  # a parsed value passes through unchanged


def test_numbers_and_none():
    assert CloudFrames.parse(None).full and CloudFrames.parse(0).full
    assert CloudFrames.parse(DEFAULT_K) == CloudFrames(DEFAULT_K)
    assert str(CloudFrames(PACKED_K, packed=True)) == "packed" and str(CloudFrames(12, True)) == "packed:12"


@pytest.mark.parametrize("bad", ["many", "packed:0", "packed:x", "packedy", "-3", "", "packed:"])
def test_bad_texts_are_refused(bad):
    with pytest.raises(ValueError, match="k must be"):
        CloudFrames.parse(bad)


@pytest.mark.parametrize("k, packed", [(-1, False), (0, True), (True, False), (2.5, False)])
def test_the_constructor_checks(k, packed):
    with pytest.raises(ValueError, match="k must be"):
        CloudFrames(k, packed)


def test_defaults_per_cloud_kind_and_what_engines_accept():
    assert CloudFrames.default_for("costeer") == CloudFrames(PACKED_K, packed=True)
    assert CloudFrames.default_for("llamacpp") == CloudFrames(DEFAULT_K)
    assert CloudFrames(16).top_k_only() == CloudFrames(16)
    with pytest.raises(ValueError, match="needs --cloud-api costeer"):
        CloudFrames.parse("packed").top_k_only()
    with pytest.raises(ValueError, match="top-k only"):
        CloudFrames.parse("full").top_k_only()


@pytest.mark.parametrize("text, depth", [("auto", None), (" AUTO", None), (None, None), ("off", 1), ("0", 1), (0, 1),
                                         ("1", 1), ("4", 4), (8, 8), (str(MAX_LOOKAHEAD), MAX_LOOKAHEAD)])  # fmt: skip
def test_lookahead_texts_parse_to_one_value(text, depth):
    la = Lookahead.parse(text)
    assert la.depth == depth and la.auto == (depth is None)
    assert Lookahead.parse(str(la)) == la and Lookahead.parse(la) is la


@pytest.mark.parametrize("bad", ["many", "-1", "", "4.5", str(MAX_LOOKAHEAD + 1), MAX_LOOKAHEAD + 1, True])
def test_bad_lookaheads_are_refused(bad):
    with pytest.raises(ValueError, match="lookahead must be"):
        Lookahead.parse(bad)
