"""The limits every front end shares: concurrent model calls, the queue before them, upload sizes.

The Gradio page's queue and the HTTP API are two doors to the same model: :data:`SLOTS` admits at most
:data:`~chestxray.serve.runtime.CONCURRENCY` model calls at once from both, first come first served, and
refuses a call at once (:class:`Busy`) when :data:`QUEUE_SIZE` are already waiting, so that a burst is
answered "busy, retry" instead of waiting without end.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TypeVar

from chestxray.serve.runtime import CONCURRENCY

T = TypeVar("T")

#: Requests that may wait for a model slot (Gradio's queue ``max_size`` too); one more is refused.
QUEUE_SIZE = int(os.environ.get("CHESTXRAY_QUEUE", 32))
#: Largest upload, in bytes, through either front end (Gradio's ``max_file_size``, the API's body).
MAX_UPLOAD_BYTES = 25 * 2**20
#: Files per batch request.
MAX_BATCH = int(os.environ.get("CHESTXRAY_MAX_BATCH", 64))
#: Seconds a refused client is told to wait (``Retry-After``): about one request's time under full load.
RETRY_AFTER_S = 1


class Busy(RuntimeError):
    """Every model slot is taken and the queue before them is full."""

    def __init__(self) -> None:
        super().__init__("The server is busy (queue is full): retry in a moment.")


class ModelSlots:
    """At most ``n`` holders at once, handed over in arrival order, to threads and to asyncio tasks alike.

    Threads (the Gradio page's handlers, on its worker threads) block in :meth:`hold`; the HTTP API's handlers
    wait in the event loop (:meth:`run`) without taking a thread, so that waiting requests never occupy the
    work threads. A released slot goes straight to the oldest waiter.
    """

    def __init__(self, n: int, max_waiting: int):
        self.n, self.max_waiting = n, max_waiting
        self._lock = threading.Lock()
        self._free = n
        self._waiters: deque[Callable[[], None]] = deque()  # how to wake each waiter, oldest first

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot now."""
        return len(self._waiters)

    def _take_or_queue(self, wake: Callable[[], None], refuse: bool) -> bool:
        """Takes a free slot (True), or queues ``wake`` (False); raises :class:`Busy` if ``refuse`` and full."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            if refuse and len(self._waiters) >= self.max_waiting:
                raise Busy()
            self._waiters.append(wake)
            return False

    def acquire(self) -> None:
        """Waits for a slot (a thread; never refused: the Gradio queue before it is bounded already)."""
        event = threading.Event()
        if not self._take_or_queue(event.set, refuse=False):
            event.wait()

    def release(self) -> None:
        """Frees a slot, or hands it to the oldest waiter."""
        with self._lock:
            if not self._waiters:
                self._free += 1
                return
            wake = self._waiters.popleft()
        wake()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """A slot for the ``with`` block (threads)."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire_async(self) -> None:
        """Waits for a slot in the event loop; raises :class:`Busy` at once when the queue is full."""
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        def wake() -> None:  # called with the slot already handed over, from any thread
            loop.call_soon_threadsafe(lambda: got.done() or got.set_result(None))

        if self._take_or_queue(wake, refuse=True):
            return
        try:
            await got
        except asyncio.CancelledError:  # the client went away: give up the place, or the slot handed over
            with self._lock:
                queued = wake in self._waiters
                if queued:
                    self._waiters.remove(wake)
            if not queued:
                self.release()
            raise

    async def run(self, submit: Callable[[], Future[T]]) -> T:
        """Waits for a slot, starts the work (``submit()``: e.g. :func:`chestxray.serve.runtime.submit`) and
        returns its result. The slot is freed when the work ends, not when the caller stops waiting for it, so
        a client that disconnects never lets more than ``n`` model calls run."""
        await self.acquire_async()
        try:
            fut = submit()
        except BaseException:
            self.release()
            raise
        fut.add_done_callback(lambda _: self.release())
        return await asyncio.wrap_future(fut)


#: The one limit on model calls in this process.
SLOTS = ModelSlots(CONCURRENCY, QUEUE_SIZE)
