"""The look-ahead controller on synthetic rounds: what it measures (R, L as medians, the first
round left out), the saving S that decides, zero look-ahead where the round trip is cheaper than
the tree, probes until the device has taken a token from a tree, and the stay estimate per rank."""

import torch

from costeer import frames
from costeer.cloud.lookahead import Controller, RoundPlanner

AUTO = frames.Lookahead(frames.LOOKAHEAD_AUTO, 8, 16)


def rounds(c: Controller, gaps_and_taken, step=0.010):
    c.step_took(step)
    t = 0.0
    c.sent(2000, 1, now=t)
    c.received(0, now=t + 5.0)  # the first round: the device's prompt work, not a round trip
    for gap, taken in gaps_and_taken:
        t += 10
        c.sent(2000, 1 + taken, now=t)
        c.received(taken, now=t + gap)
    return c


def test_a_50_ms_link_is_worth_looking_ahead_and_loopback_is_not():
    far = rounds(Controller(AUTO), [(0.052, 0), (0.050, 0), (0.065, 1), (0.079, 2), (0.051, 0)])
    R, L = far.round_trip()
    assert abs(R - 0.051) < 1e-9 and abs(L - 0.014) < 1e-3  # the first round's 5 s left out
    assert 0.045 < far.saving() < 0.05  # R + c1 - L
    near = rounds(Controller(AUTO), [(0.002, 0), (0.002, 0), (0.020, 1), (0.039, 2), (0.003, 0)])
    assert near.saving() == 0.0  # the device's own token costs more than the round trip it saves


def test_until_a_token_is_taken_from_a_tree_the_saving_is_zero_and_probes_are_offered():
    c = rounds(Controller(AUTO), [(0.050, 0)] * 3)
    assert c.saving() == 0.0 and c.round_trip()[1] == c.round_trip()[0] + c.c1
    due = [Controller(AUTO, n_rounds=n).probe_due() for n in range(20)]
    assert due[:8] == [True] * 8 and due[12] and due[16] and not any(due[9:12])


def test_once_the_device_took_a_token_from_a_tree_probes_stop_for_good():
    # loopback: probes taken early, then many rounds without look-ahead push them out of `rounds`; the
    # device's token cost stays measured, so no probe comes back (each costs the next root a forward)
    c = rounds(Controller(AUTO), [(0.002, 0), (0.020, 1), (0.021, 1), (0.019, 1)] + [(0.002, 0)] * 60)
    assert len(c.rounds) == 32 and all(n == 0 for _, n, _ in c.rounds)
    due = []
    for n in range(3, 200):
        c.n_rounds = n
        due.append(c.probe_due())
    assert not any(due)
    assert abs(c.round_trip()[1] - 0.018) < 1e-9  # L from the rounds it took a token in
    assert RoundPlanner(c).begin(torch.log_softmax(torch.tensor([4.0, 1.0, 0.5]), -1)) == []
    # one round is enough where it says a tree token costs the device several round trips
    hopeless = rounds(Controller(AUTO), [(0.002, 0), (0.040, 1)])
    assert not any(hopeless.probe_due() for hopeless.n_rounds in range(3, 40))


def test_one_slow_round_does_not_switch_look_ahead_off_for_good():
    """At 50 ms a first tree token that happened to take 68 ms (one slow round) put L above R + c1:
    S = 0, and with it no tree, no new measurement, per-token rounds for the rest of the session.
    Probes go on until L rests on MIN_SAMPLES rounds; their median then says look-ahead pays."""
    from costeer.cloud.lookahead import MIN_SAMPLES

    c = rounds(Controller(AUTO), [(0.058, 0), (0.058, 0), (0.126, 1)])
    assert c.saving() == 0.0  # one slow round: R + c1 - L <= 0
    c.n_rounds = 9  # past the first rounds: a probe every 4th
    due = [c.probe_due() for c.n_rounds in range(9, 17)]
    assert due == [False, False, False, True, False, False, False, True]
    t = 100.0
    for gap in (0.090, 0.088)[: MIN_SAMPLES - 1]:  # the probes the device took: ~30 ms a token
        t += 10
        c.sent(2000, 2, now=t)
        c.received(1, now=t + gap)
    assert c.saving() > 0.025  # the median: look-ahead pays
    assert not any(c.probe_due() for c.n_rounds in range(17, 60))  # L known: no more probes
    logp = torch.log_softmax(torch.tensor([4.0, 1.0, 0.5, 0.0]), -1)
    for _ in range(10):
        c.calibrate(0, float(logp.exp()[0]), True)
    assert RoundPlanner(c).begin(logp)  # a tree again


def test_the_planner_grows_where_it_pays_and_not_where_it_does_not():
    logp = torch.log_softmax(torch.tensor([4.0, 1.0, 0.5, 0.0, -1.0]), -1)
    worth = rounds(Controller(AUTO), [(0.050, 0), (0.060, 1), (0.061, 1)])
    planner = RoundPlanner(worth)
    rows = planner.begin(logp)
    assert rows and rows[0] == (0, 0)  # the greedy child first
    cheap = rounds(Controller(AUTO), [(0.002, 0), (0.020, 1), (0.021, 1), (0.019, 1)])
    cheap.n_rounds = 5  # no probe due: L rests on MIN_SAMPLES rounds
    assert RoundPlanner(cheap).begin(logp) == []
    fixed = RoundPlanner(Controller(frames.Lookahead(frames.LOOKAHEAD_FIXED, 2, 5)))
    assert len(fixed.begin(logp)) == 2  # (nodes - 1) / depth per level, whatever the measurements


def test_the_stay_estimate_follows_the_device_per_rank():
    c = Controller(AUTO)
    for _ in range(20):
        c.calibrate(0, 0.4, True)  # the device takes the greedy child nearly always
        c.calibrate(1, 0.2, False)
    assert c.stay(0, 0.4) > 0.9 and c.stay(1, 0.2) < 0.1
    assert c.stay(0, 0.8) == 1.0 and c.stay(0, 0.2) < c.stay(0, 0.4)  # surer than usual: likelier


def _grown(rtt: float, streamed: bool, level_s: float = 0.015) -> RoundPlanner:
    """A round grown to the end by `auto` after rounds over `rtt` where the device took ~15 ms a
    token from the trees and always the greedy child; every level takes `level_s` a node."""
    from dataclasses import replace

    logp = torch.log_softmax(torch.tensor([3.0, 1.0, 0.5, 0.0, -1.0] + [-3.0] * 20), -1)
    c = rounds(Controller(replace(AUTO, streamed=streamed)), [(rtt, 0), (rtt, 0), (rtt + 0.015, 1), (rtt + 0.03, 2), (rtt + 0.015, 1)],
               step=level_s)  # fmt: skip
    for _ in range(20):
        c.calibrate(0, float(logp.exp()[0]), True)
    c.n_rounds = 5  # no probe due: L rests on MIN_SAMPLES rounds
    planner = RoundPlanner(c)
    rows = planner.begin(logp)
    while rows:
        rows = planner.extend(torch.stack([logp] * len(rows)), level_s * len(rows))
    return planner


def test_streamed_rounds_look_further_ahead_the_longer_the_round_trip_and_not_at_all_on_loopback():
    """Streamed, a level the round trip hides costs the device nothing: at 50 ms the round goes
    deeper than a whole one would (whose every level delays it), it grows with the round trip, and
    on loopback neither form computes any look-ahead."""
    assert _grown(0.002, True).size == 1 and _grown(0.002, False).size == 1
    sizes = [_grown(rtt, True).size for rtt in (0.002, 0.025, 0.05, 0.1)]
    assert sizes == sorted(sizes) and sizes[1] > 1
    assert _grown(0.05, True).max_depth() > _grown(0.05, False).max_depth()


def test_a_replayed_round_sends_the_frames_made_for_it_without_encoding_them_again():
    """A device that re-attaches at a streamed round's root gets the round again (Registry.replay, in the
    event loop): every node was encoded again there, up to 64 packed frames at V = 262,144 (~3 ms each)
    per ATTACH, which a key could repeat at the cost of a handshake."""
    g = torch.Generator().manual_seed(3)

    def grown() -> RoundPlanner:
        p = RoundPlanner(Controller(frames.Lookahead(frames.LOOKAHEAD_FIXED, 3, 7)))
        rows = p.begin(torch.log_softmax(torch.randn(200, generator=g), -1))
        while rows:
            rows = p.extend(torch.log_softmax(torch.randn(len(rows), 200, generator=g), -1), 0.001)
        return p

    encoded = []

    def encode(logp, position):
        encoded.append(position)
        return frames.encode_dist(logp, 8, position)

    g.manual_seed(3)
    fresh = grown().replay(5, encode)  # nothing sent yet: every node is encoded
    g.manual_seed(3)
    planner = grown()
    sent = [planner.level_frame(5, encode)]  # the whole round in one frame here (levels computed first)
    encoded.clear()
    assert planner.replay(5, encode) == fresh and not encoded
    assert frames.decode_downlink(sent[0]).dists[-1].logp.shape == (8,)
