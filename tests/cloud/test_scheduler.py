"""The scheduler on a recording pool: batched steps, prefills in turn across keys, released
sessions freed only between forwards and their queued work dropped."""

import threading
import time
from collections import deque

import pytest
import torch

from costeer.cloud.scheduler import Job, Released, Scheduler

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


@pytest.fixture
def pool():
    return RecordingPool(delay=0.002)  # a forward takes a little time, as a real one does


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

    def grow(self, rows):
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
        assert [c for c in pool.calls if c[0] == "grow"] == grown and len(levels) == len(grown) + 1
        assert len(grown) < 100 and j.tree.stopped  # cut short, told so
        assert sched.submit("a", job("k1", steps=[8])).result(timeout=10) == ("done", (V,))  # the session is free
        assert sched.stop("b").done()  # nothing streamed there: nothing to wait for
    finally:
        sched.close()
