"""Run-ahead over a real socket through a 40 ms delay relay, tiny models: while a look-ahead round
is on its way, the device feeds its SLM pair guessed tokens (device/ahead.py); whatever the
guesses, every token and every SLM-pair distribution is bit for bit the one of per-token decoding
(every steered method, greedy and seeded sampling, guesses all right, all wrong, across tokenizers),
and guesses are made only where look-ahead is on and the pair can take them back."""

import pytest
import torch

from costeer.api import CoSteer
from costeer.device import connect_cloud
from costeer.device.ahead import SteeringAhead
from costeer.engine.config import Method
from costeer.engine.loop import Guess
from costeer.engine.models import DecodeBatch
from tests.cloud.server_util import KEY_A
from tests.device.relay import DelayRelay
from tests.device.spies import spy_sources
from tests.tiny import bpe_tokenizer, llama, make_lm, sp_tokenizer

QUERY = "what should I cook tonight"
CONTEXT = "my name is Sam, I live in Seattle with my dog Biscuit; I like spicy tofu and long runs on Sunday"
REFERENCE = "my name is Alex, I live in Denver with my cat; I like pasta and cycling on Saturday"
N = 30
STEERED = [m.value for m in Method if m.steered]


@pytest.fixture(scope="module")
def relay(server):
    with DelayRelay(server.port, rtt_s=0.04) as r:
        yield r


@pytest.fixture(scope="module")
def slm():
    """A llama SLM (no sliding layers: the pair can take guesses back at any length)."""
    tok = bpe_tokenizer()
    return make_lm("tiny-slm-llama", llama(len(tok), seed=2), tok)


def run(relay, slm, lookahead="tree:3:9", run_ahead=True, method="costeer", monkeypatch=None, **sampling):
    """One generation -> (token ids, the SLM pair's distributions decode() got, the CloudLLM)."""
    pairs = []
    for name in ("start", "advance"):
        original = getattr(SteeringAhead, name)

        def recorded(self, *a, _original=original):
            out = _original(self, *a)
            pairs.append(out.clone())
            return out

        monkeypatch.setattr(SteeringAhead, name, recorded)
    llm = connect_cloud(relay.url("ws"), api_key=KEY_A, k="full", lookahead=lookahead, run_ahead=run_ahead)
    extra = {"reference_message": REFERENCE} if method == "costeer_matched" else {}
    g = CoSteer(llm, slm).generate(QUERY, CONTEXT, method, max_new_tokens=N, **extra, **sampling)
    monkeypatch.undo()
    return g.token_ids, pairs, llm


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("method", STEERED)
def test_every_method_gives_the_per_token_tokens_and_distributions(relay, slm, method, monkeypatch):
    want, want_pairs, _ = run(relay, slm, "off", method=method, monkeypatch=monkeypatch)
    got, got_pairs, llm = run(relay, slm, method=method, monkeypatch=monkeypatch)
    assert got == want and same(got_pairs, want_pairs)
    assert llm.guesses.made > 0 and llm.guesses.made >= llm.guesses.used + llm.guesses.undone


def test_seeded_sampling_gives_the_per_token_tokens_and_distributions(relay, slm, monkeypatch):
    sampled = dict(temperature=0.9, top_k=50, seed=7)
    want, want_pairs, _ = run(relay, slm, "off", monkeypatch=monkeypatch, **sampled)
    got, got_pairs, llm = run(relay, slm, "tree:4:12", monkeypatch=monkeypatch, **sampled)
    assert got == want and same(got_pairs, want_pairs) and llm.guesses.made > 0


def test_every_guess_wrong_is_undone_into_the_same_output(relay, slm, monkeypatch):
    """Guess the fused policy's least likely token (greedy never chooses it): every guess is rewound,
    and the pair's distributions are still bit for bit the per-token ones."""
    want, want_pairs, _ = run(relay, slm, "off", monkeypatch=monkeypatch)

    def worst(self, stand_in, pair, history):
        from costeer.engine.loop import steer

        return int(torch.argmin(steer(self.fusion, self.vocab, self.vocab.llm_view(stand_in), pair, history)))

    monkeypatch.setattr(Guess, "__call__", worst)
    got, got_pairs, llm = run(relay, slm, monkeypatch=monkeypatch)
    assert got == want and same(got_pairs, want_pairs)
    assert llm.guesses.made > 0 and llm.guesses.used == 0 and llm.guesses.undone > 0


def test_every_guess_right_saves_the_forwards(relay, slm, monkeypatch):
    """An oracle guess (the per-token run's next token): guesses are used, none undone, and the pair
    runs no forward beyond per-token decoding's (a used guess is the forward the choice needed)."""
    want, want_pairs, _ = run(relay, slm, "off", monkeypatch=monkeypatch)
    monkeypatch.setattr(Guess, "__call__", lambda self, stand_in, pair, history: want[len(history)])
    forwards, advance = [], DecodeBatch.advance

    def counted(self, tokens):
        if len(tokens) == 2:  # the SLM pair's (the cloud's tiny LLM steps its one sequence)
            forwards.append(tokens)
        return advance(self, tokens)

    monkeypatch.setattr(DecodeBatch, "advance", counted)
    tokens, pairs, llm = run(relay, slm, monkeypatch=monkeypatch)
    assert tokens == want and same(pairs, want_pairs)
    assert llm.guesses.used > 0 and llm.guesses.undone == 0
    assert len(forwards) == len(want) - 1 + llm.guesses.made - llm.guesses.used  # only unjudged extras


def test_across_tokenizers_the_output_is_the_same(relay, monkeypatch):
    """An SLM with its own tokenizer (SentencePiece-style against the LLM's byte-level BPE): guesses
    are mapped through the aligned vocabulary and back."""
    tok = sp_tokenizer()
    other = make_lm("tiny-slm-sp", llama(len(tok), seed=3), tok)
    want, want_pairs, _ = run(relay, other, "off", monkeypatch=monkeypatch)
    got, got_pairs, llm = run(relay, other, monkeypatch=monkeypatch)
    assert got == want and same(got_pairs, want_pairs) and llm.guesses.made > 0


@pytest.mark.parametrize("lookahead, run_ahead", [("off", True), ("tree:3:9", False)])
def test_no_guesses_per_token_or_when_switched_off(relay, slm, lookahead, run_ahead, monkeypatch):
    _, _, llm = run(relay, slm, lookahead, run_ahead, monkeypatch=monkeypatch)
    assert llm.run_ahead is False and llm.guesses.made == 0


def test_a_pair_that_could_not_take_a_guess_back_gets_none(relay, tiny_slm, monkeypatch):
    """The tiny Gemma SLM's sliding layers are past their window: no room ahead, no guesses, the same tokens."""
    want, _, _ = run(relay, tiny_slm, "off", monkeypatch=monkeypatch)
    got, _, llm = run(relay, tiny_slm, monkeypatch=monkeypatch)
    assert got == want and llm.guesses.made == 0


def test_guesses_stay_within_the_round_depth_and_the_generation(relay, slm, monkeypatch):
    """Never more guessed tokens held than the round's depth, nor past the generation's last token."""
    held = []
    run_guess = SteeringAhead.run_guess

    def watched(self):
        out = run_guess(self)
        held.append((len(self.guessed), len(self.history)))
        return out

    monkeypatch.setattr(SteeringAhead, "run_guess", watched)
    _, _, llm = run(relay, slm, "chain:2", monkeypatch=monkeypatch)
    assert held and max(g for g, _ in held) <= 2
    assert all(g + h <= N - 1 for g, h in held)


def test_a_guess_taken_on_a_tree_walk_counts_as_a_saved_forward(relay, slm, monkeypatch):
    """`walked` counts the used guesses a tree walk took (a forward off the critical path); the pace
    weighs guesses by that share."""
    want, _, _ = run(relay, slm, "off", monkeypatch=monkeypatch)
    monkeypatch.setattr(Guess, "__call__", lambda self, stand_in, pair, history: want[len(history)])
    _, _, llm = run(relay, slm, "chain:4", monkeypatch=monkeypatch)
    g = llm.guesses
    assert 0 < g.walked <= g.used and g.useful == g.walked / (g.used + g.undone)
    assert g.walked <= llm.tree_tokens  # only tokens taken from a tree are walked


def test_the_pace_starts_a_forward_only_where_it_pays_on_average():
    from costeer.device.ahead import Pace

    pace = Pace()
    assert pace.worth(1.0, None)  # nothing measured yet
    pace.waited(0.100), pace.forwarded(0.030)
    assert pace.worth(0.040, 0.5) and not pace.worth(0.090, 0.5)  # 60 ms left covers 15; 10 ms does not
    assert pace.worth(0.090, 0.9) and not pace.worth(0.090, 0.0)  # unless nearly every guess saves a forward


def test_a_cloud_flooding_frames_of_a_left_round_while_the_device_runs_ahead_is_refused(relay, slm, monkeypatch):
    """A hostile cloud: while the device polls for its answer between guessed forwards, it gets the
    first round's LEVEL frame again and again (a round it left long ago). The device drops at most a
    round's worth of them, then closes with one clear error: no endless polling, no frame of a left
    round taken as the answer."""
    from costeer import frames
    from costeer.device import CloudError
    from costeer.device.client import CloudSource

    first: list[bytes] = []
    flooded = [0]  # stale frames handed to the device's polls
    real_connect = CloudSource._connect_and_open

    def connect(self):
        real_connect(self)
        ws, real_recv = self.ws, self.ws.recv

        def recv(timeout=None):
            if first and self.chosen and timeout == 0:
                flooded[0] += 1
                return first[0]  # the first round's root frame, position 0: a round the device left
            data = real_recv(timeout=timeout)
            if not first and isinstance(frames.decode_downlink(data), frames.Level):
                first.append(data)
            return data

        ws.recv = recv

    monkeypatch.setattr(CloudSource, "_connect_and_open", connect)
    llm = connect_cloud(relay.url("ws"), api_key=KEY_A, k="full", lookahead="tree:3:9", run_ahead=True)
    with pytest.raises(CloudError, match="more LEVEL frames of a left round"):
        CoSteer(llm, slm).generate(QUERY, CONTEXT, "costeer", max_new_tokens=N)
    assert flooded[0] == llm.lookahead.depth + 1  # dropped a round's worth (its depth), refused the next
