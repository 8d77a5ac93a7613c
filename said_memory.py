"""What the phone has already been told once, kept in the journal so that a restart does not tell it again.

Some alerts go out once a day (a delayed plan, a clock behind the feed's, a blocked log output) or once
per held position (the options stream's fallback and its end, a stale mark and its end). Held only in
the daemon's memory, every restart (each deploy, each crash) told the phone again. The memory is one
small JSON object in the journal's meta table: a fixed set of names, each mapped to the day or the
trade (and what was said for it). It is written like a decision, through the write-behind journal; a
journal that refuses the write costs a repeat after the next restart, never an alert.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import structlog

SAID_META = "said_once"
log = structlog.get_logger("said_memory")


def decoded(raw: str | None) -> dict[str, str]:
    """The stored object, or an empty one for anything else (a damaged or hand-edited value only costs
    a repeated alert)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        log.warning("said_memory_unreadable", length=len(raw))
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


class SaidMemory:
    """Name -> what was said for it (a day, a trade); read at start, written on each change.

    Thread-safe: one lock around the map and its write, so changes reach the journal in their order."""

    def __init__(self, raw: str | None = None, write: Callable[[str, str], None] | None = None) -> None:
        self._said = decoded(raw)
        self._write = write
        self._lock = threading.Lock()

    def get(self, name: str) -> str | None:
        """What was last said for `name` (None: nothing remembered)."""
        with self._lock:
            return self._said.get(name)

    def put(self, name: str, value: str) -> None:
        """Remember that `value` was said for `name`, here and in the journal."""
        with self._lock:
            if self._said.get(name) == value:
                return
            self._said[name] = value
            if self._write is not None:  # under the lock: two changes reach the journal in their order
                self._write(SAID_META, json.dumps(self._said, sort_keys=True))

    def for_position(self, name: str, trade_id: str) -> str | None:
        """What was said under `name` about the position `trade_id` (None: nothing, or another's)."""
        position, _, said = (self.get(name) or "").rpartition(" ")
        return said if position == trade_id else None

    def put_for_position(self, name: str, trade_id: str, said: str) -> None:
        """Remember that `said` went out under `name` about the position `trade_id`."""
        self.put(name, f"{trade_id} {said}")
