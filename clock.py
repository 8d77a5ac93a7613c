"""The daemon's one clock: wall time live, a shifted and scaled clock for rehearsals (SIM_CLOCK_*)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class WallClock:
    """Unix milliseconds from the system clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def sleep_scale(self) -> float:
        """Wall seconds per clock second."""
        return 1.0


@dataclass(frozen=True, slots=True)
class SimClock:
    """Starts at `start_ms` when created and runs `speed` times faster than the wall clock."""

    start_ms: int
    speed: float = 1.0
    wall: Callable[[], float] = time.monotonic
    _origin: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_origin", self.wall())

    def now_ms(self) -> int:
        return self.start_ms + int((self.wall() - self._origin) * 1000 * self.speed)

    def sleep_scale(self) -> float:
        return 1.0 / self.speed


Clock = WallClock | SimClock


def parse_instant(raw: str) -> int:
    """ISO-8601 instant with an offset (e.g. 2025-10-02T09:25:00-04:00) to Unix ms."""
    moment = datetime.fromisoformat(raw)
    if moment.tzinfo is None:
        raise ValueError("SIM_CLOCK_START needs a UTC offset, e.g. 2025-10-02T09:25:00-04:00")
    return int(moment.timestamp() * 1000)
