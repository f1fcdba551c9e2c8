"""One scheduler thread that owns the model state of every session.

Sessions never touch the model: they submit a Job (tokens to feed, then what to do with the
log-probabilities after the last one) and await its future. Every tick the scheduler thread

  1. frees the sequences of released sessions (ended, deleted, evicted): between forwards, so a
     sequence is never freed while a forward uses it;
  2. prefills: pieces of pending prompts, one owner (API key) after another in round-robin
     order, until `prefill_budget` tokens are spent (at least one piece per tick), each piece
     in its own forward (what the prompt computes alone);
  3. steps: the next single token of every other session with work (a client's TOKEN, or one
     token of a resumed session's replay) in ONE batched forward;
  4. look-ahead: the next level of every session's round tree (cloud/lookahead.py), all of them
     (`pool.grow`: llama.cpp decodes the main chains' nodes of all sessions in one forward and each
     branch leaf alone; the transformers pool feeds every node alone; both for exactness). A streamed
     round whose device has left it (`stop`) grows no further from the next forward on: the pool
     skips its rows still to compute, and the level is not sent.

A job with a look-ahead tree first keeps the path its device took through the previous round
(`pool.commit`, before any forward of the tick; what the pool did not keep of it is stepped again),
then steps its token, then grows its tree one level per tick; its result is made when the tree is
done. A streamed job (`level` set) makes its result at the root instead, and `level` sends a frame
after the root and after each level; `stop` ends its growth before the next forward (its device left
the round: the next round's root must not wait for a level nobody needs), and `done` settles when it
leaves the scheduler. Each tick's steps run before its levels,
so a session's next token waits for at most one level of the others' trees.

A tick whose only work is steps first gathers (`Gather`): where the pool says a batched step pays
(`pool.batch_pays_at`), it waits a little for the steps of the sessions mid-generation that have
not sent theirs yet, so that they share this forward instead of each starting a tick of its own.

A long prompt therefore costs everyone at most one piece per tick, a replay advances one token
per tick beside everyone else's tokens, and releasing a session drops whatever it still had
queued. Results (frames) are made in this thread too: the model's threads then never compete
with another busy thread on a small machine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

log = logging.getLogger("costeer.cloud")

FLUSH_S = 0.01  # the longest a tick waits for its streamed frames to be handed to their sockets


class Released(Exception):
    """The job's session was released before its work was done."""


@dataclass(eq=False)
class Job:
    """Tokens for one session's sequence: `prompt` fed in pieces, each alone; then `steps` fed one
    per tick, batched with the other sessions; then `finish(logp [V])` -> the job's result."""

    owner: str
    prompt: list[int]
    steps: deque[int]
    finish: Callable[[Tensor], object]
    future: Future = field(default_factory=Future)
    fed: int = 0  # prompt tokens fed so far
    commit: int | None = None  # keep the path to this node of the last round's tree first
    tree: object | None = None  # a RoundPlanner: begin(logp) / extend(logps, seconds) -> next rows
    rows: list[tuple[int, int]] = field(default_factory=list)  # the tree's next level (parent, token)
    root: Tensor | None = None  # the distribution after the steps, kept while the tree grows
    step_s: float = 0.0  # seconds of the forward that gave `root`
    level: Callable[[list[tuple[int, int]]], None] | None = None  # streamed: a frame at the root and each level
    done: Future = field(default_factory=Future)  # settled when the job leaves the scheduler
    stopping: bool = False  # streamed: grow no further (set by Scheduler.stop)
    flush: Callable[[float], object] | None = None  # streamed: wait, until a monotonic deadline, for `level`'s frames to leave

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    @property
    def backlog(self) -> int:
        """Tokens still to feed."""
        return len(self.prompt) - self.fed + len(self.steps)


@dataclass(frozen=True)
class Gather:
    """How long a tick of steps waits for the steps still to come. Only a tick whose work is all
    steps waits (never a prefill piece, a release, a look-ahead level, a closing scheduler), only on
    a pool whose batched step pays (`pool.batch_pays_at`: the fewest rows that cost much less
    together than apart; None, as llama.cpp's pool, where a row in a batch costs nearly a lone step),
    and only for awaited sessions: those holding a sequence whose last result left the scheduler less
    than `quiet_s` ago (their device answers each token at once; one gone quiet is not waited for), and
    whose last step came within `cap_s` of the result before it (a device that answers later than any
    window, a slow link or a client pacing its steps to hold the others' ticks, is not waited for: such
    a client of another key added the whole cap to every token of a lone session).
    It waits until every awaited session has sent its step, or `share` of the last step's time
    has passed, at most `cap_s`. A session alone is never held: nobody else is awaited.

    Why it pays: a step that misses a tick waits for that whole tick and then pays a tick of its
    own, fixed cost included (transformers on CPU: 49 ms fixed + 7.5 ms a row, docs/reliability.md),
    so waiting a fraction of a step to add it to this one saves the others time as well."""

    share: float = 0.5  # of the last step's measured time
    cap_s: float = 0.04
    quiet_s: float = 0.25

    def __post_init__(self):
        if self.share < 0 or self.cap_s < 0 or self.quiet_s < 0:
            raise ValueError("the gather window's share, cap and quiet time must not be negative")

    def window(self, last_step_s: float) -> float:
        """Seconds a tick may wait, after a batched step that took `last_step_s`."""
        return min(self.cap_s, self.share * last_step_s)


def _settle(fut: Future, result: object = None, error: BaseException | None = None) -> None:
    """Complete a future once (its waiter may have cancelled it meanwhile)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass


class Scheduler:
    """Runs every session's forwards on `pool` (LM.open_pool) in one thread; sessions are
    named by any hashable key (the server's session ids)."""

    def __init__(self, pool, n_seq: int, prefill_budget: int, gather: Gather = Gather()):
        self.pool, self.prefill_budget, self.gather = pool, prefill_budget, gather
        self._batch_pays_at: int | None = getattr(pool, "batch_pays_at", None)  # None: never gather
        self._last_step_s = 0.0  # the last step's time (the gather window follows it)
        self._left: dict[object, float] = {}  # session -> when its last result left (monotonic)
        self._late: set = set()  # sessions whose last step came more than gather.cap_s after their result
        self._cv = threading.Condition()
        self._jobs: dict[object, Job] = {}  # at most one job per session, in submission order
        self._seqs: dict[object, int] = {}  # session -> its sequence in the pool
        self._free = list(range(n_seq - 1, -1, -1))
        self._released: set[object] = set()
        self._turns: deque[str] = deque()  # owners in round-robin order for prefills
        self._closed = False
        self._posted: list[Job] = []  # streamed jobs that posted a frame in this stage (_flush)
        self.ticks = 0
        self._thread = threading.Thread(target=self._run, name="costeer-scheduler", daemon=True)
        self._thread.start()

    # -- called from other threads -------------------------------------------------------

    def submit(self, key: object, job: Job) -> Future:
        with self._cv:
            if self._closed or key in self._released:
                _settle(job.future, error=Released("the session has ended"))
                _settle(job.done, error=Released("the session has ended"))
            elif key in self._jobs:
                raise RuntimeError("a session has one job at a time")
            else:
                self._jobs[key] = job
                left = self._left.get(key)
                if left is not None:  # how promptly it answered its last result (Gather)
                    (self._late.add if time.monotonic() - left > self.gather.cap_s else self._late.discard)(key)
                if job.owner not in self._turns:  # a key with nothing queued goes first
                    self._turns.appendleft(job.owner)
                self._cv.notify()
        return job.future

    def release(self, key: object) -> None:
        """Drop the session's queued work and free its sequence before the next forward."""
        with self._cv:
            self._released.add(key)
            self._cv.notify()

    def stop(self, key: object) -> Future:
        """A streamed job grows no further: it leaves after the forward under way (a level's rows not
        computed yet are skipped, and the level is not sent).
        -> its `done` future (already settled when the session has no streamed job)."""
        with self._cv:
            job = self._jobs.get(key)
            if job is None or job.level is None:
                fut: Future = Future()
                fut.set_result(None)
                return fut
            job.stopping = True
            self._cv.notify()
            return job.done

    def holds(self, key: object) -> bool:
        """Does the session still have a sequence (model state) in the pool?"""
        with self._cv:
            return key in self._seqs

    def backlog(self, keys) -> int:
        """Tokens still to feed for these sessions."""
        with self._cv:
            return sum(j.backlog for k, j in self._jobs.items() if k in keys)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=60)
        for job in self._jobs.values():
            _settle(job.future, error=Released("the server is shutting down"))
            _settle(job.done, error=Released("the server is shutting down"))
        self.pool.close()

    # -- the scheduler thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._released or self._jobs):
                    self._cv.wait()
                self._gather()
                if self._closed:
                    return
                freed = self._take_released()
                self._take_stopped()
                commits = self._take_commits()
            for seq in freed:
                self.pool.drop(seq)
            self._commit(commits)  # before planning: a commit may give a job tokens to step first
            with self._cv:
                prefills, steps = self._plan()
                levels = [(k, j, self._seq(k)) for k, j in self._jobs.items() if j.rows]
            self._prefill(prefills)
            self._step(steps)
            self._flush()
            self._grow(levels)
            self._flush()
            self.ticks += 1

    def _gather(self) -> None:
        """(holding the lock) Wait for the awaited sessions' steps, within the window (see Gather)."""
        if self._batch_pays_at is None:
            return
        deadline = time.monotonic() + self.gather.window(self._last_step_s)
        while not self._closed and not self._released and self._steps_only():
            ready, awaited = len(self._jobs), self._awaited(time.monotonic())
            left = deadline - time.monotonic()
            if not awaited or ready + awaited < self._batch_pays_at or left <= 0:
                return
            self._cv.wait(left)

    def _steps_only(self) -> bool:
        """Is every queued job a step to feed (no prefill piece, no tree growing)?"""
        return all(j.steps and not j.prefilling and j.root is None for j in self._jobs.values())

    def _awaited(self, now: float) -> int:
        """Sessions mid-generation whose next step has not come yet."""
        return sum(1 for k, t in self._left.items()
                   if k not in self._jobs and k not in self._late and now - t < self.gather.quiet_s)  # fmt: skip

    def _take_released(self) -> list[int]:
        freed = []
        for key in self._released:
            job = self._jobs.pop(key, None)
            if job is not None:
                _settle(job.future, error=Released("the session has ended"))
                _settle(job.done, error=Released("the session has ended"))
            self._left.pop(key, None)
            self._late.discard(key)
            seq = self._seqs.pop(key, None)
            if seq is not None:
                freed.append(seq)
                self._free.append(seq)
        self._released.clear()
        return freed

    def _take_stopped(self) -> None:
        """Streamed jobs whose device left the round, past their root: they leave now."""
        for key in [k for k, j in self._jobs.items() if j.stopping and j.root is not None]:
            job = self._jobs.pop(key)
            self._left[key] = time.monotonic()
            job.tree.stop()
            job.rows = []
            _settle(job.done)

    def _take_commits(self) -> list[tuple[object, Job, int, int]]:
        out = []
        for key, job in self._jobs.items():
            if job.commit is not None:
                out.append((key, job, self._seq(key), job.commit))
                job.commit = None
        return out

    def _commit(self, commits) -> None:
        for key, job, seq, node in commits:
            try:
                again = self.pool.commit(seq, node)  # path tokens the pool did not keep (llama.cpp: a branch leaf)
            except Exception as e:  # the sequence is in an unknown state: its session must end
                self._fail([(key, job)], e)
                continue
            job.steps.extendleft(reversed(again))

    def _seq(self, key: object) -> int:
        if key not in self._seqs:
            self._seqs[key] = self._free.pop()  # the registry admits no more sessions than sequences
        return self._seqs[key]

    def _plan(self) -> tuple[list[tuple[object, Job, int, list[int]]], list[tuple[object, Job, int, int]]]:
        """-> prefill pieces [(key, job, seq, tokens)] and steps [(key, job, seq, token)]."""
        prefills, budget, served = [], self.prefill_budget, []
        for owner in self._turns:
            key, job = next(((k, j) for k, j in self._jobs.items() if j.owner == owner and j.prefilling), (None, None))
            if job is None:
                continue
            piece = job.prompt[job.fed : job.fed + (self.pool.chunk or len(job.prompt))]
            if prefills and len(piece) > budget:
                break
            prefills.append((key, job, self._seq(key), piece))
            budget -= len(piece)
            served.append(owner)
        # owners served go to the back of the line; owners with nothing queued leave it
        owners = {j.owner for j in self._jobs.values()}
        waiting = [o for o in self._turns if o in owners and o not in served]
        self._turns = deque(waiting + [o for o in served if o in owners])
        steps = [(k, j, self._seq(k), j.steps[0]) for k, j in self._jobs.items()
                 if not j.prefilling and j.steps and j.commit is None]  # fmt: skip
        return prefills, steps

    def _prefill(self, pieces) -> None:
        for key, job, seq, tokens in pieces:
            try:
                logp = self.pool.prefill(seq, tokens)
            except Exception as e:  # the sequence is now in an unknown state: its session must end
                self._fail([(key, job)], e)
                continue
            job.fed += len(tokens)
            if not job.prefilling and not job.steps:
                self._stepped(key, job, logp, 0.0)

    def _step(self, steps) -> None:
        if not steps:
            return
        t = time.perf_counter()
        try:
            logps = self.pool.step([(seq, tok) for _, _, seq, tok in steps])  # [n, V]
        except Exception as e:
            self._fail([(key, job) for key, job, _, _ in steps], e)
            return
        took = self._last_step_s = time.perf_counter() - t
        for row, (key, job, _, _) in enumerate(steps):
            job.steps.popleft()
            if not job.steps:
                self._stepped(key, job, logps[row], took)

    def _stepped(self, key: object, job: Job, logp: Tensor, took: float) -> None:
        """The job's tokens are fed: finish, or start its look-ahead tree."""
        job.step_s = took
        job.rows = job.tree.begin(logp) if job.tree is not None else []
        job.root = logp
        if job.level is not None:  # streamed: the result now, the root's frame at once
            if job.stopping:
                job.tree.stop()
                job.rows = []
            try:  # the root's frame out before the waiter wakes: on one core it would only slow the encoding
                result = job.finish(logp)
                job.level(job.rows)
                self._posted.append(job)
                _settle(job.future, result)
            except Exception as e:
                self._fail([(key, job)], e)
                return
        if not job.rows:
            self._finish(key, job)

    def _grow(self, levels) -> None:
        if not levels:
            return
        rows = [(seq, parent, token) for _, job, seq in levels for parent, token in job.rows]
        jobs = {seq: job for _, job, seq in levels}
        t = time.perf_counter()
        try:
            logps = self.pool.grow(rows, stop=lambda seq: jobs[seq].stopping)  # [n, V]
        except Exception as e:
            self._fail([(key, job) for key, job, _ in levels], e)
            return
        took, at = time.perf_counter() - t, 0
        for key, job, _ in levels:
            n = len(job.rows)
            at += n
            if job.stopping:  # its device left the round: the level (perhaps cut short) is not sent
                job.tree.stop()
                job.rows = []
                self._finish(key, job)
                continue
            job.rows = job.tree.extend(logps[at - n : at], took)
            if job.level is not None:
                try:
                    job.level(job.rows)
                    self._posted.append(job)
                except Exception as e:
                    self._fail([(key, job)], e)
                    continue
            if not job.rows:
                self._finish(key, job)

    def _flush(self) -> None:
        """Before the next forward, the frames this stage posted leave (each streamed job's `flush`,
        all within FLUSH_S): a forward started at once held them back on a busy core."""
        posted, self._posted = self._posted, []
        deadline = time.monotonic() + FLUSH_S
        for job in posted:
            if job.flush is not None:
                job.flush(deadline)

    def _finish(self, key: object, job: Job) -> None:
        with self._cv:
            if self._jobs.get(key) is not job or key in self._released:  # released: the next tick settles it
                return
            del self._jobs[key]
            self._left[key] = time.monotonic()
        if job.level is None:  # a streamed job's result was made at its root
            try:
                _settle(job.future, job.finish(job.root))
            except Exception as e:
                _settle(job.future, error=e)
        _settle(job.done)

    def _fail(self, jobs: list[tuple[object, Job]], error: Exception) -> None:
        log.error("forward failed: %s", error)
        with self._cv:
            for key, job in jobs:
                if self._jobs.get(key) is job:
                    del self._jobs[key]
                self._left.pop(key, None)  # its session ends: not awaited
                self._late.discard(key)
                _settle(job.future, error=error)
                _settle(job.done, error=error)
