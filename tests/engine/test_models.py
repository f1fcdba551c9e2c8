"""KV-cached, batched decoding against cache-free single-sequence forwards (tiny models)."""

import pytest
import torch

from costeer.engine.models import DecodeBatch, ModelLoadError, full_forward_logprobs, left_pad, load_lm, resolve
from tests.tiny import bpe_tokenizer, gemma3, llama, make_lm

MODELS = {"llama": llama, "gemma3": gemma3}


@pytest.fixture(params=sorted(MODELS))
def lm(request):
    tok = bpe_tokenizer()
    return make_lm(request.param, MODELS[request.param](len(tok)), tok)


def test_left_pad_positions_count_real_tokens_only():
    ids, mask, pos = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist()[0] == [0, 1, 2] and pos.tolist()[1][-1] == 0


def test_batched_pair_equals_two_single_calls(lm):
    short = [3, 17, 42, 8]
    long = [3, 99, 12, 54, 61, 7, 23, 17, 42, 8, 11, 5, 19]  # longer than the sliding window
    pair = DecodeBatch(lm, [short, long])
    a, b = DecodeBatch(lm, [short]), DecodeBatch(lm, [long])
    got, ra, rb = pair.start(), a.start(), b.start()
    worst = max((got[0] - ra[0]).abs().max().item(), (got[1] - rb[0]).abs().max().item())
    for tok in [14, 200, 31, 77, 5, 130, 9, 62, 250, 33, 18, 4]:
        got, ra, rb = pair.advance([tok, tok]), a.advance([tok]), b.advance([tok])
        worst = max(worst, (got[0] - ra[0]).abs().max().item(), (got[1] - rb[0]).abs().max().item())
    assert worst <= 1e-4


def test_kv_cache_equals_cache_free_forward(lm):
    seq = [3, 17, 42, 8, 91]
    dec = DecodeBatch(lm, [seq])
    lp = dec.start()[0]
    for tok in [14, 200, 31, 77, 5, 130, 9, 62, 250, 33]:
        assert (lp - full_forward_logprobs(lm, seq)).abs().max().item() <= 1e-4
        seq.append(tok)
        lp = dec.advance([tok])[0]


def test_advance_before_start_and_empty_prompt(lm):
    with pytest.raises(ValueError):
        DecodeBatch(lm, [[]])
    with pytest.raises(RuntimeError):
        DecodeBatch(lm, [[1]]).advance([2])


def test_load_from_a_local_folder(tmp_path):
    tok = bpe_tokenizer()
    model = llama(len(tok), seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_lm(str(tmp_path), device="cpu")
    assert tok.eos_token_id in lm.stop_ids
    ids = torch.tensor([[3, 4, 5]])
    with torch.inference_mode():
        assert torch.equal(lm.model(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty model spec"),
        ("no-such-preset", "unknown model 'no-such-preset'"),
        ("./missing/folder", "model file not found: ./missing/folder"),  # a path-like spec (issue #12)
    ],
)
def test_resolve_errors_are_one_line(spec, message):
    with pytest.raises(ModelLoadError, match=message) as e:
        resolve(spec)
    assert "\n" not in str(e.value)


def test_resolve_rejects_non_gguf_files_and_empty_folders(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=".gguf"):
        resolve(str(f))
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve(str(tmp_path))


def test_hub_names_resolve_without_network():
    src = resolve("Qwen/Qwen2.5-1.5B-Instruct")
    assert src.location == "Qwen/Qwen2.5-1.5B-Instruct" and not src.is_local and src.gguf_file is None


def test_extend_equals_one_token_at_a_time(lm):
    """Catching the SLM pair up after gated steps: n tokens in one forward = n single steps."""
    short, long = [3, 17, 42, 8], [3, 99, 12, 54, 61, 7, 23, 17, 42, 8, 11, 5, 19]
    caught, stepped = DecodeBatch(lm, [short, long]), DecodeBatch(lm, [short, long])
    caught.start(), stepped.start()
    stepped.advance([14, 14])
    catch_up = [200, 31, 77, 5]
    for tok in catch_up:
        want = stepped.advance([tok, tok])
    caught.advance([14, 14])
    got = caught.extend(catch_up)
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4
    # and both go on in step
    assert (caught.advance([9, 9]) - stepped.advance([9, 9])).abs().max().item() <= 1e-4


def test_lm_open_gives_the_backend_decode_batch(lm):
    batch = lm.open([[3, 4, 5]])
    assert isinstance(batch, DecodeBatch) and batch.start().shape == (1, lm.vocab_size)


def test_unknown_or_impossible_backend_is_a_clear_error(tmp_path):
    tok = bpe_tokenizer()
    llama(len(tok), seed=3).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unknown backend"):
        load_lm(str(tmp_path), device="cpu", backend="onnx")
    with pytest.raises(ModelLoadError, match="needs a .gguf model"):
        load_lm(str(tmp_path), device="cpu", backend="llamacpp")
    assert load_lm(str(tmp_path), device="cpu", backend="auto").backend == "transformers"  # not a GGUF


def test_rewind_then_refeed_is_bit_identical_to_never_feeding_the_guess(lm):
    """A device's wrong guesses undone (device/ahead.py): rewind(n) and feeding the real tokens gives
    exactly the logits of a batch that never saw the guesses, and both go on in step."""
    short, long = [3, 17, 42], [3, 99, 12, 54]  # within the tiny Gemma's sliding window
    guessed, straight = DecodeBatch(lm, [short, long]), DecodeBatch(lm, [short, long])
    guessed.start(), straight.start()
    want = straight.advance([14, 14])
    guessed.advance([14, 14])
    with pytest.raises(ValueError):
        guessed.rewind(2)  # only what was fed since start
    for wrong in ([200], [31, 77]):
        for tok in wrong:
            guessed.advance([tok, tok])
        guessed.rewind(len(wrong))
    for tok in [5, 130]:
        want, got = straight.advance([tok, tok]), guessed.advance([tok, tok])
        assert torch.equal(got, want)


def test_no_room_ahead_where_a_rewind_could_not_be_exact():
    """A sliding layer that would reach its window within n more tokens could not give their columns
    back: room_ahead(n) says no (transformers' crop refuses it past the window)."""
    tok = bpe_tokenizer()
    lm = make_lm("gemma3", gemma3(len(tok), sliding_window=6), tok)
    batch = DecodeBatch(lm, [[3, 17]])
    batch.start()
    batch.advance([5])
    assert batch.room_ahead(2) and not batch.room_ahead(3)  # 3 cached + 3 reaches the window of 6
    batch.advance([6]), batch.advance([7])
    batch.rewind(2)
    batch.advance([8]), batch.advance([9]), batch.advance([10])
    with pytest.raises((ValueError, RuntimeError)):
        batch.rewind(1)
    llama_lm = make_lm("llama", llama(len(tok)), tok)
    plain = DecodeBatch(llama_lm, [[3, 17]])
    plain.start()
    assert plain.room_ahead(1000)
