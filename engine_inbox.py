"""The engine thread's inbox: one FIFO queue, with back-pressure on the data producers.

The stream, the option stream and the pollers put what they receive with `put_data`; when the engine
is `limit` items or `byte_limit` bytes of raw frames behind (a frame flood, a slow disk under the tape)
they wait, so memory stays bounded and the socket's own flow control slows the sender. Bytes count as
well as items: 10,000 frames of a megabyte each (a compressed flood inflates to that) were 10 GB.
Nothing is dropped: a held producer resumes where it was. Notices about the daemon itself (journal
failing, a thread crashed) use `put`, which never waits: they are few, and some are raised on the engine
thread, which must not wait on itself.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from events import raw_size

DEFAULT_LIMIT = 10_000
DEFAULT_BYTE_LIMIT = 64 << 20
WAIT_STEP_S = 0.005


class EngineInbox:
    """A FIFO of received items and notices for the engine thread; see the module docstring."""

    def __init__(
        self,
        stop: threading.Event,
        *,
        limit: int = DEFAULT_LIMIT,
        byte_limit: int = DEFAULT_BYTE_LIMIT,
        on_held: Callable[[int], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self._stop = stop
        self.limit = limit
        self.byte_limit = byte_limit
        self._bytes = 0  # raw frame bytes waiting (REST answers arrive decoded and count as 0)
        self._on_held = on_held
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self.holds = 0  # how many times a producer had to wait
        self.held_s = 0.0  # wall seconds producers spent waiting, all together
        self.depth_max = 0

    def put(self, item: object) -> None:
        """Enqueue at once, whatever the depth (notices about the daemon itself)."""
        self._count_in(item)
        self._queue.put(item)

    def put_data(self, item: object) -> None:
        """Enqueue a received item, first waiting while the engine is `limit` items or `byte_limit` bytes behind.

        Returns without enqueueing only when the daemon is stopping (the item would never be handled).
        """
        if self._full() and not self._wait_for_room():
            return
        self._count_in(item)
        self._queue.put(item)

    def _count_in(self, item: object) -> None:
        size = raw_size(item)
        if size:
            with self._lock:
                self._bytes += size

    def get(self, timeout: float) -> object | None:
        """The next item, or None after `timeout` seconds without one."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        size = raw_size(item)
        if size:
            with self._lock:
                self._bytes -= size
        depth = self._queue.qsize()
        if depth > self.depth_max:
            self.depth_max = depth
        return item

    def qsize(self) -> int:
        """Items waiting (approximate while producers run, as for `queue.Queue`)."""
        return self._queue.qsize()

    def _full(self) -> bool:
        # One frame larger than byte_limit still goes in alone: the limit must not hold a producer for good.
        depth = self._queue.qsize()
        return depth >= self.limit or (depth > 0 and self._bytes >= self.byte_limit)

    def _wait_for_room(self) -> bool:
        started = self._monotonic()
        with self._lock:
            self.holds += 1
            first = self.holds == 1
        if first and self._on_held is not None:
            self._on_held(self._queue.qsize())
        while self._full():
            if self._stop.wait(WAIT_STEP_S):
                return False
        with self._lock:
            self.held_s += self._monotonic() - started
        return True
