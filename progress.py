"""A one-line progress display for long runs over days (backtests, history fetches)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """A one-line progress display on stderr: rewritten in place on a terminal, a line per step otherwise."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.done = label, total, 0
        self._stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._started = clock()
        self._live = bool(getattr(self._stream, "isatty", lambda: False)())

    def step(self, note: str = "") -> None:
        """Count one finished unit and redraw."""
        self.done += 1
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = round(20 * self.done / self.total) if self.total else 20
        text = (
            f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {self.done}/{self.total}"
            f" {rate:.2f}/s eta {left:.0f}s {note}"
        )
        if self._live:
            self._stream.write(f"\r{text:<100}")
        else:
            self._stream.write(text.rstrip() + "\n")
        self._stream.flush()

    def close(self) -> None:
        """End the line on a terminal."""
        if self._live and self.done:
            self._stream.write("\n")
            self._stream.flush()
