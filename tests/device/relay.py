"""A TCP relay on 127.0.0.1 that delays every chunk by RTT/2 in each direction: a network with a
round trip of RTT for the split's tests and bench/split_network.py, without root (no `tc netem`).

    with DelayRelay(target_port=8765, rtt_s=0.05) as relay:
        llm = connect_cloud(relay.url("ws"), ...)     # every exchange now pays 50 ms

Each direction of each connection is its own pump: a reader stamps every chunk with the time it
may leave (arrival + RTT/2) and queues it, a writer sends it at that time. Chunks keep their order
and are never merged or split by the relay beyond what TCP does anyway; a burst is delayed, not
spaced out (a link with latency, not a narrow one). Half-closes travel the same way, delayed.
The relay runs its own asyncio loop in a daemon thread, so the process that owns it can block.
"""

from __future__ import annotations

import asyncio
import threading

CHUNK = 1 << 16


class DelayRelay:
    """127.0.0.1:<free port> -> target_host:target_port, each chunk held rtt_s / 2 each way."""

    def __init__(self, target_port: int, rtt_s: float, target_host: str = "127.0.0.1"):
        if not rtt_s >= 0:
            raise ValueError(f"rtt_s must be >= 0, got {rtt_s!r}")
        self.target = (target_host, int(target_port))
        self.rtt_s, self.delay_s = float(rtt_s), float(rtt_s) / 2
        self.bytes_up = self.bytes_down = 0  # client -> target, target -> client (what was relayed)
        self.connections = 0
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None

    # -- owner's side ------------------------------------------------------------------

    def start(self) -> DelayRelay:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"relay-{self.rtt_s * 1000:g}ms", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the relay did not start")
        return self

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return

        async def shut() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> DelayRelay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the relay's loop --------------------------------------------------------------

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                t_reader, t_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the target is down: the client sees its connection closed
            try:
                await asyncio.gather(self._pump(c_reader, t_writer, "up"), self._pump(t_reader, c_writer, "down"))
            finally:
                t_writer.close()
        except asyncio.CancelledError:
            pass  # stop(): the connection ends with the relay (asyncio would log a cancelled handler)
        finally:
            c_writer.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        """One direction: every chunk leaves delay_s after it arrived; b"" (end of stream) too."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""  # reset by the peer: passed on as the end of the stream
                queue.put_nowait((loop.time() + self.delay_s, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    if not data:
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    return  # the other side is gone; the reader ends at its own end of stream
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)

        await asyncio.gather(read(), write())
