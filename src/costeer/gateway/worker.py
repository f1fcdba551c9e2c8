"""One generation at a time, off the event loop.

The models are not thread-safe, so a single lock serialises generations; each runs in a worker
thread and hands its pieces (the gateway's text pieces, the playground's events) to the event loop
through a queue. Up to `max_waiting` requests
may wait behind the running one; more are turned away at once (HTTP 429) instead of piling up.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


class Busy(Exception):
    """Too many requests are already waiting."""


@dataclass
class Event:
    kind: str  # "piece" | "end" | "error"
    value: object = None


class Job:
    """A running generation as a stream of Events; `cancel()` stops it at the next piece."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    async def next(self) -> Event:
        return await self.events.get()

    def _put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Worker:
    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.lock = threading.Lock()  # held while a generation runs
        self._admitted = 0
        self._count = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max_waiting + 1, thread_name_prefix="costeer-gen")

    def submit(self, start: Callable[[], Iterable[str]]) -> Job:
        """Run `start()` and iterate what it returns (pieces) in a worker thread, under the lock.
        `start` runs in the thread too: building a generation touches the models. Raises Busy."""
        with self._count:
            if self._admitted > self.max_waiting:
                raise Busy()
            self._admitted += 1
        job = Job(asyncio.get_running_loop())
        self._pool.submit(self._run, job, start)
        return job

    def _run(self, job: Job, start: Callable[[], Iterable[str]]) -> None:
        try:
            with self.lock:
                if job.cancelled.is_set():
                    return
                source = start()
                pieces = iter(source)
                try:
                    for piece in pieces:
                        if job.cancelled.is_set():
                            break
                        job._put(Event("piece", piece))
                finally:
                    getattr(pieces, "close", lambda: None)()  # ends a cloud session at once
                job._put(Event("end", source))
        except BaseException as e:  # noqa: BLE001 - handed to the request that owns the job
            job._put(Event("error", e))
        finally:
            with self._count:
                self._admitted -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
