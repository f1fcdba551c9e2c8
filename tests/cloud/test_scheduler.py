"""The scheduler on a recording pool: batched steps, prefills in turn across keys, released
sessions freed only between forwards and their queued work dropped, and ticks that gather the
steps of the sessions mid-generation."""

import threading
import time
from collections import deque

import pytest
import torch

from costeer.cloud.scheduler import Gather, Job, Released, Scheduler

V = 8


class RecordingPool:
    """Records every call; `gate` (when cleared) holds a forward open until it is set."""

    def __init__(self, chunk=4, delay=0.0):
        self.chunk, self.delay = chunk, delay
        self.calls: list[tuple] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_forward = threading.Event()
        self.freed_during_forward = False
        self.closed = False
        self._busy = False

    def _forward(self, call, n):
        self._busy = True
        self.in_forward.set()
        self.calls.append(call)
        self.gate.wait(timeout=30)
        time.sleep(self.delay)
        self._busy = False
        return torch.zeros(n, V)

    def prefill(self, seq, tokens):
        return self._forward(("prefill", seq, tuple(tokens)), 1)[0]

    def step(self, items):
        return self._forward(("step", tuple(items)), len(items))

    def drop(self, seq):
        self.freed_during_forward |= self._busy
        self.calls.append(("drop", seq))

    def close(self):
        self.closed = True


def job(owner, prompt=(), steps=(), result="done"):
    return Job(owner, list(prompt), deque(steps), lambda logp: (result, tuple(logp.shape)))


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture(params=[None, 3], ids=["no-gather", "gather"])
def pool(request):
    p = RecordingPool(delay=0.002)  # a forward takes a little time, as a real one does
    p.batch_pays_at = request.param  # the same promises hold where ticks gather their steps
    return p


@pytest.fixture
def sched(pool):
    s = Scheduler(pool, n_seq=8, prefill_budget=4)
    yield s
    pool.gate.set()
    s.close()


def test_a_job_prefills_in_pieces_then_replays_one_step_per_tick(sched, pool):
    fut = sched.submit("a", job("k1", prompt=range(10), steps=[7, 8]))
    assert fut.result(timeout=10) == ("done", (V,))
    assert pool.calls == [("prefill", 0, (0, 1, 2, 3)), ("prefill", 0, (4, 5, 6, 7)), ("prefill", 0, (8, 9)),
                          ("step", ((0, 7),)), ("step", ((0, 8),))]  # fmt: skip


def test_the_steps_of_all_sessions_go_into_one_forward(sched, pool):
    pool.gate.clear()
    first = sched.submit("a", job("k1", steps=[1]))
    pool.in_forward.wait(10)  # the scheduler holds the first forward; queue the others meanwhile
    futs = [sched.submit(k, job(o, steps=[2])) for k, o in (("b", "k1"), ("c", "k2"), ("d", "k3"))]
    pool.gate.set()
    first.result(timeout=10)
    for f in futs:
        f.result(timeout=10)
    assert pool.calls[1] == ("step", ((1, 2), (2, 2), (3, 2)))  # one batched forward, a sequence each


def test_prefills_take_the_keys_in_turn(sched, pool):
    pool.gate.clear()
    sched.submit("a0", job("greedy", prompt=range(12)))
    pool.in_forward.wait(10)
    for i in range(1, 4):
        sched.submit(f"a{i}", job("greedy", prompt=range(12)))
    late = sched.submit("b", job("polite", prompt=range(100, 104)))
    pool.gate.set()
    late.result(timeout=10)
    prefills = [c[2] for c in pool.calls if c[0] == "prefill"]
    # the other key's prompt is the second piece prefilled, however much the first key queued
    assert prefills[:2] == [(0, 1, 2, 3), (100, 101, 102, 103)]


def test_replays_do_not_hold_up_another_keys_steps(sched, pool):
    replays = [sched.submit(f"r{i}", job("replayer", prompt=[1], steps=[5] * 2000)) for i in range(4)]
    wait_until(lambda: len(pool.calls) > 20)
    start = len(pool.calls)
    for _ in range(5):
        sched.submit("x", job("other", prompt=[1] if _ == 0 else [], steps=[] if _ == 0 else [3])).result(timeout=10)
    # five answers in about five ticks: the replays advance beside it, one token each per tick
    assert len(pool.calls) - start <= 12
    assert not any(f.done() for f in replays)
    for i in range(4):
        sched.release(f"r{i}")
    for f in replays:
        with pytest.raises(Released):
            f.result(timeout=10)


def test_a_session_is_freed_only_after_the_forward_that_holds_it(sched, pool):
    other = sched.submit("b", job("k2", prompt=[1]))
    other.result(timeout=10)
    pool.gate.clear()
    pool.in_forward.clear()
    fut = sched.submit("a", job("k1", prompt=[1, 2]))
    pool.in_forward.wait(10)
    sched.release("a")  # DELETE while the forward runs
    time.sleep(0.1)
    assert ("drop", 1) not in pool.calls and sched.holds("a")
    pool.gate.set()
    with pytest.raises(Released):
        fut.result(timeout=10)
    wait_until(lambda: not sched.holds("a"))
    assert not pool.freed_during_forward
    # the other session goes on, and the freed sequence is used again
    assert sched.submit("b", job("k2", steps=[4])).result(timeout=10) == ("done", (V,))
    assert sched.submit("c", job("k1", prompt=[9])).result(timeout=10)
    assert ("prefill", 1, (9,)) in pool.calls


def test_a_released_replay_stops_feeding_at_once(sched, pool):
    fut = sched.submit("a", job("k1", prompt=[1], steps=[2] * 10_000))
    wait_until(lambda: len(pool.calls) > 10)
    assert sched.backlog({"a"}) > 9000
    sched.release("a")
    with pytest.raises(Released):
        fut.result(timeout=10)
    wait_until(lambda: not sched.holds("a"))
    fed = len(pool.calls)
    assert fed < 10_000 and sched.backlog({"a"}) == 0
    time.sleep(0.05)
    assert len(pool.calls) == fed  # nothing runs for it any more


def test_a_failed_forward_fails_its_jobs_only(pool):
    class Broken(RecordingPool):
        def prefill(self, seq, tokens):
            if tokens[0] == 666:
                raise RuntimeError("boom")
            return super().prefill(seq, tokens)

    broken = Broken()
    s = Scheduler(broken, n_seq=2, prefill_budget=4)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            s.submit("bad", job("k", prompt=[666])).result(timeout=10)
        assert s.submit("good", job("k", prompt=[1])).result(timeout=10) == ("done", (V,))
    finally:
        s.close()
    assert broken.closed



class TreePool(RecordingPool):
    """A recording pool with look-ahead: commit hands back one token to feed again (as llama.cpp does
    for a kept branch leaf); grow records its rows."""

    def commit(self, seq, node):
        self.calls.append(("commit", seq, node))
        return [99] if node == 2 else []

    def grow(self, rows, stop=None):
        """One forward for the whole level; `stop` is asked before it (and recorded when it stops)."""
        if stop is not None and any(stop(seq) for seq, _, _ in rows):
            self.calls.append(("grow skipped", tuple(rows)))
            return torch.full((len(rows), V), float("nan"))
        return self._forward(("grow", tuple(rows)), len(rows))


class ChainPlanner:
    """Grows `depth` levels of one node each, then stops."""

    def __init__(self, depth):
        self.depth, self.levels = depth, 0

    def begin(self, logp):
        return [(0, 7)] if self.depth else []

    def extend(self, logps, seconds):
        self.levels += 1
        return [(self.levels, 7)] if self.levels < self.depth else []


def test_a_look_ahead_job_commits_steps_what_the_pool_gave_back_then_grows_one_level_per_tick():
    pool = TreePool()
    sched = Scheduler(pool, n_seq=4, prefill_budget=4)
    try:
        sched.submit("a", job("k1", prompt=[1, 2])).result(timeout=10)
        j = job("k1", steps=[5])
        j.commit, j.tree = 2, ChainPlanner(2)
        assert sched.submit("a", j).result(timeout=10) == ("done", (V,))
        assert pool.calls[1:] == [("commit", 0, 2), ("step", ((0, 99),)), ("step", ((0, 5),)),
                                  ("grow", ((0, 0, 7),)), ("grow", ((0, 1, 7),))]  # fmt: skip
    finally:
        sched.close()


class StoppableChain(ChainPlanner):
    def stop(self):
        self.stopped = True


def test_a_streamed_job_settles_at_its_root_sends_each_level_and_stops_when_asked():
    """Streamed: the result at the root, a frame (`level`) after the root and after each level, and
    `stop` ends the growth at the next tick; meanwhile another session's step is not held back by the
    tree (each tick's steps go first)."""
    pool = TreePool(delay=0.01)
    sched = Scheduler(pool, n_seq=4, prefill_budget=4)
    try:
        sched.submit("a", job("k1", prompt=[1, 2])).result(timeout=10)
        sched.submit("b", job("k2", prompt=[3])).result(timeout=10)
        levels = []
        j = job("k1", steps=[5])
        j.tree, j.level = StoppableChain(200), levels.append
        assert sched.submit("a", j).result(timeout=10) == ("done", (V,))  # at the root: the tree is far from grown
        assert levels[0] == [(0, 7)] and not j.done.done()
        wait_until(lambda: len(levels) >= 3)
        other = sched.submit("b", job("k2", steps=[6]))
        assert other.result(timeout=10) == ("done", (V,)) and not j.done.done()  # served while the tree grows
        sched.stop("a").result(timeout=10)
        grown = [c for c in pool.calls if c[0] == "grow"]
        time.sleep(0.1)
        # the level under way when the device left is not sent (one that ended before it was)
        assert [c for c in pool.calls if c[0] == "grow"] == grown and len(levels) in (len(grown), len(grown) + 1)
        assert len(grown) < 100 and j.tree.stopped  # cut short, told so
        assert sched.submit("a", job("k1", steps=[8])).result(timeout=10) == ("done", (V,))  # the session is free
        assert sched.stop("b").done()  # nothing streamed there: nothing to wait for
    finally:
        sched.close()


def streamed_round(sched, planner, held=None):
    """Session "a" prefilled, then a streamed job growing `planner` submitted (and put in `held` first)
    -> (the job, the rows of each frame it sent), once its root is in."""
    sched.submit("a", job("k1", prompt=[1, 2])).result(timeout=10)
    levels = []
    j = job("k1", steps=[5])
    j.tree, j.level = planner, levels.append
    if held is not None:
        held.append(j)
    sched.submit("a", j).result(timeout=10)
    return j, levels


class HoldingChain(StoppableChain):
    """Holds the pool's forwards (clears its gate) once the first level is in."""

    def __init__(self, depth, pool):
        super().__init__(depth)
        self.pool = pool

    def extend(self, logps, seconds):
        self.pool.gate.clear()
        return super().extend(logps, seconds)


def test_a_level_under_way_when_the_device_leaves_is_neither_sent_nor_followed_by_another():
    """The device's uplink comes while a level's forward runs: that level's frame is not made (nobody
    reads it: the next round's root must not wait for its encoding), no further forward runs for the
    round, and its tree is told it stopped; a pool asked before a forward skips it (test_lookahead_pools)."""
    pool = TreePool()
    sched = Scheduler(pool, n_seq=4, prefill_budget=4)
    try:
        j, levels = streamed_round(sched, HoldingChain(10, pool))
        wait_until(lambda: pool.calls[-1] == ("grow", ((0, 1, 7),)))  # level 2's forward, held open
        done = sched.stop("a")
        time.sleep(0.05)
        assert not done.done()  # the forward under way finishes first
        pool.gate.set()
        done.result(timeout=10)
        assert levels == [[(0, 7)], [(1, 7)]]  # the root's frame and level 1's; not level 2's
        assert [c[0] for c in pool.calls].count("grow") == 2 and j.tree.stopped
    finally:
        pool.gate.set()
        sched.close()


def test_a_streamed_round_frames_are_flushed_before_each_next_forward():
    """After the root's step and after each level, the job's frames leave (its `flush`) before the
    scheduler's next forward: the event loop that sends them shares the cloud's core."""
    pool = TreePool()
    sched = Scheduler(pool, n_seq=4, prefill_budget=4)
    try:
        sched.submit("a", job("k1", prompt=[1, 2])).result(timeout=10)
        levels = []
        j = job("k1", steps=[5])
        j.tree, j.level = StoppableChain(2), levels.append
        j.flush = lambda deadline: pool.calls.append(("flush", len(levels)))
        sched.submit("a", j).result(timeout=10)
        wait_until(lambda: ("flush", 3) in pool.calls)  # the last frame's, after the job left
        assert pool.calls[1:] == [("step", ((0, 5),)), ("flush", 1), ("grow", ((0, 0, 7),)), ("flush", 2),
                                  ("grow", ((0, 1, 7),)), ("flush", 3)]  # fmt: skip
    finally:
        sched.close()


def test_a_level_whose_device_left_before_its_forward_is_skipped_by_the_pool():
    """Stopped between the scheduler's plan and the pool's forward: the pool is asked (`stop`) and
    skips it; nothing is sent for it."""
    pool = TreePool()
    sched = Scheduler(pool, n_seq=4, prefill_budget=4)
    try:
        real_grow, held = pool.grow, []

        def grow_after_leaving(rows, stop=None):
            held[0].stopping = True  # the uplink came as this level was about to start
            return real_grow(rows, stop)

        pool.grow = grow_after_leaving
        j, levels = streamed_round(sched, StoppableChain(10), held)
        j.done.result(timeout=10)
        assert ("grow skipped", ((0, 0, 7),)) in pool.calls and "grow" not in [c[0] for c in pool.calls]
        assert levels == [[(0, 7)]] and j.tree.stopped  # the root's frame only
    finally:
        sched.close()


# -- the gather window: a tick of steps waits, within a bound, for the awaited sessions' steps --------

WIDE = Gather(share=1000.0, cap_s=0.5, quiet_s=5.0)  # the window is the cap: 0.5 s


@pytest.fixture
def gathering():
    """A scheduler whose pool says batching pays from 2 rows, with `WIDE`'s window."""
    pool = RecordingPool(delay=0.002)
    pool.batch_pays_at = 2
    s = Scheduler(pool, n_seq=8, prefill_budget=4, gather=WIDE)
    yield s, pool
    pool.gate.set()
    s.close()


def warm(sched, keys):
    """Each session prefilled and stepped once, one after the other: mid-generation, awaited."""
    for k in keys:
        sched.submit(k, job(k, prompt=[1])).result(timeout=10)
        sched.submit(k, job(k, steps=[2])).result(timeout=10)


def steps_after(pool, n):
    return [c for c in pool.calls[n:] if c[0] == "step"]


def test_steps_arriving_within_the_window_share_one_forward(gathering):
    sched, pool = gathering
    warm(sched, "abc")
    n = len(pool.calls)
    futs = []
    for k in "abc":  # the devices answer one after the other, 50 ms apart
        futs.append(sched.submit(k, job(k, steps=[5])))
        time.sleep(0.05)
    for f in futs:
        f.result(timeout=10)
    assert steps_after(pool, n) == [("step", ((0, 5), (1, 5), (2, 5)))]


def test_a_lone_session_is_never_held():
    pool = RecordingPool(delay=0.002)
    pool.batch_pays_at = 1  # even where a single row would "pay"
    sched = Scheduler(pool, n_seq=4, prefill_budget=4, gather=WIDE)
    try:
        warm(sched, "ab")
        sched.release("b")  # an ended session is not awaited
        wait_until(lambda: not sched.holds("b"))
        t = time.monotonic()
        for _ in range(10):
            sched.submit("a", job("a", steps=[3])).result(timeout=10)
        assert time.monotonic() - t < 0.4  # ten ticks, none of them a 0.5 s window
    finally:
        sched.close()


def test_no_window_below_the_rows_that_pay(gathering):
    sched, pool = gathering
    pool.batch_pays_at = 3
    sched._batch_pays_at = 3  # (read once at construction)
    warm(sched, "ab")
    t = time.monotonic()
    sched.submit("a", job("a", steps=[3])).result(timeout=10)  # one step plus one awaited: 2 < 3 rows
    assert time.monotonic() - t < 0.4


def test_a_session_gone_quiet_holds_the_others_for_the_bound_then_not_at_all():
    pool = RecordingPool(delay=0.002)
    pool.batch_pays_at = 2
    sched = Scheduler(pool, n_seq=4, prefill_budget=4, gather=Gather(share=1000.0, cap_s=0.15, quiet_s=0.6))
    try:
        warm(sched, "abq")  # q answers no more
        t = time.monotonic()
        sched.submit("a", job("a", steps=[3])).result(timeout=10)
        held = time.monotonic() - t
        assert 0.13 <= held < 0.5  # b and q awaited: the window ran out, no longer
        time.sleep(0.7)  # q (and b) quiet for longer than quiet_s
        t = time.monotonic()
        sched.submit("a", job("a", steps=[3])).result(timeout=10)
        assert time.monotonic() - t < 0.1  # nobody awaited any more
    finally:
        sched.close()


def test_a_session_that_answers_later_than_the_window_is_not_waited_for():
    """A client of another key that paces its steps just inside quiet_s is never in time for a window:
    waiting for it held every tick of an honest lone session for the whole cap (80 ms steps: p50 per
    token 92 ms alone, 134 ms beside four such sessions). Once a session answers late it is not
    awaited until it answers promptly again."""
    pool = RecordingPool(delay=0.002)
    pool.batch_pays_at = 2
    sched = Scheduler(pool, n_seq=4, prefill_budget=4, gather=Gather(share=1000.0, cap_s=0.3, quiet_s=5.0))
    try:
        warm(sched, "ab")
        time.sleep(0.35)  # both answer their last result later than the cap
        late = [sched.submit(k, job(k, steps=[3])) for k in "ab"]
        for f in late:
            f.result(timeout=10)
        t = time.monotonic()
        sched.submit("a", job("a", steps=[4])).result(timeout=10)  # a answers at once; b's last answer was late
        assert time.monotonic() - t < 0.15  # not held for b (the window would be 0.3 s)
        t = time.monotonic()
        sched.submit("b", job("b", steps=[4])).result(timeout=10)  # b prompt again: a awaited, the window runs
        assert time.monotonic() - t >= 0.25
    finally:
        sched.close()


def test_a_prefill_or_a_release_starts_the_tick_at_once(gathering):
    sched, pool = gathering
    warm(sched, "abc")
    t = time.monotonic()
    a = sched.submit("a", job("a", steps=[3]))  # b and c awaited: the tick waits
    time.sleep(0.05)
    sched.submit("d", job("d", prompt=[1, 2]))  # a new session's prompt: not delayed
    a.result(timeout=10)
    assert time.monotonic() - t < 0.3
    t = time.monotonic()
    b = sched.submit("b", job("b", steps=[3]))  # a, c awaited
    time.sleep(0.05)
    sched.release("c")  # freed between forwards at once, and the tick goes ahead
    b.result(timeout=10)
    assert time.monotonic() - t < 0.3 and not sched.holds("c")


def test_closing_ends_a_window_at_once(gathering):
    sched, pool = gathering
    warm(sched, "ab")
    a = sched.submit("a", job("a", steps=[3]))
    time.sleep(0.05)
    t = time.monotonic()
    sched.close()
    assert time.monotonic() - t < 0.3
    with pytest.raises(Released):
        a.result(timeout=10)
