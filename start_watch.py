"""The start-up's watchdog: a start that stops making progress is said, and the process ends.

The engine's watchdog runs once the daemon has started. A start that hangs before it (a journal or a
file on a disk that stopped answering, a lock that is never released) left a process that Render counts
as running, with no alert and no log line after the last one: a held position never sold. Each step of
the start tells this watch what it is doing and that it moves; a step that makes no progress for the
limit is reported by name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

POLL_S = 1.0
HELD_S = 5.0  # a poll that overslept this much: the whole process was held (SIGSTOP), not the start


class StartWatch:
    """Calls `on_stuck(step, limit_s)` once if `limit_s` pass without `step` or `beat` before `done`."""

    def __init__(
        self,
        limit_s: float,
        on_stuck: Callable[[str, float], None],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit_s = limit_s
        self.step_name = "starting"
        self._on_stuck = on_stuck
        self._monotonic = monotonic
        self._moved_at = monotonic()
        self._done = threading.Event()

    def step(self, name: str) -> None:
        """The start goes on to `name` (said if it hangs there)."""
        self.step_name, self._moved_at = name, self._monotonic()

    def beat(self) -> None:
        """The current step makes progress (a long warm-up beats as it reads)."""
        self._moved_at = self._monotonic()

    def done(self) -> None:
        """The start is over: the engine's own watchdog takes over."""
        self._done.set()

    @property
    def is_done(self) -> bool:
        """Whether `done` was called."""
        return self._done.is_set()

    def start(self) -> StartWatch:
        """Watch on a daemon thread of its own."""
        threading.Thread(target=self.watch, name="start-watch", daemon=True).start()
        return self

    def watch(self, poll_s: float = POLL_S) -> None:
        """Until `done`: report a step that stood still for `limit_s`, then stop watching."""
        woke = self._monotonic()
        while not self._done.wait(poll_s):
            now = self._monotonic()
            if now - woke > HELD_S:
                self._moved_at = now  # the process was held: the step gets its full time again
            woke = now
            if now - self._moved_at > self.limit_s:
                self._on_stuck(self.step_name, self.limit_s)
                return
