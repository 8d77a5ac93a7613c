"""The daemon's recording of its feed (today's tape) on a thread of its own.

Every tape write used to run on the engine thread: a disk that hung (a frozen or lost network volume)
held the engine in the kernel, no BUY or SELL was decided, and the watchdog's exit could not end a
process in disk sleep; a tape path that blocked on open (a FIFO) hung a restart before any thread ran.
Here the engine only queues what it received (`record`, which never waits) and, before a durable
decision, waits for the lines behind it to reach the OS (`hand_over`, so a replay after a kill -9 still
holds them) while the tape thread makes progress, HAND_OVER_MOST_S at most. A tape thread that writes
nothing for HAND_OVER_S while a decision waits (IDLE_STUCK_S while lines wait) is stuck: recording stops
(one TAPE FAILING alert), the engine goes on, and once the disk answers again recording resumes at once,
TAPE RECOVERED naming the gap. A busy thread (a backlog after a hold) is not stuck.

Failures, rests and alerts are as before (`daemon.py` had them): a failing write pauses recording for
`retry_s` (at once after a deleted tape), one TAPE FAILING a day, one TAPE RECOVERED when lines are on
disk again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import structlog

from alert_text import clock_text
from clock import Clock
from config import Settings
from events import Received, raw_size
from market_calendar import ny_date
from supervisor import error_text
from tape import TapeGone, TapeWriter, prune_tapes, tape_path

log = structlog.get_logger("tape_recorder")

FLUSH_SECONDS = 5.0
RETRY_SECONDS = 300.0
# The tape is stuck when its thread has written nothing for this long while a decision waits: a normal
# disk takes a line in microseconds (an fsync in milliseconds), and a busy thread makes progress all along.
HAND_OVER_S = 1.0
# How long a durable decision waits at most for the lines behind it, however busy the tape thread is: past
# it the decision goes on (said in the log), the tape not being stuck.
HAND_OVER_MOST_S = 2.0
# Without a decision waiting, a tape thread silent this long with lines queued is stuck too; and so is one
# this many received bytes behind (REST answers arrive decoded and count as none).
IDLE_STUCK_S = 5.0
QUEUE_BYTES = 64 << 20
WAIT_STEP_S = 0.05
Notify = Callable[[str, str], None]  # (kind, text): a SYSTEM-type notice to the phone


class TapeStuck(OSError):
    """The tape thread did not keep up: its disk does not answer."""


@dataclass(slots=True)
class _HandOver:
    """A mark in the queue: set once every line queued before it has been handed to the OS."""

    done: threading.Event = field(default_factory=threading.Event)


class TapeRecorder:
    """Today's tape, written by the thread running `run`; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        notify: Notify,
        *,
        retry_s: float = RETRY_SECONDS,
        hand_over_s: float = HAND_OVER_S,
        queue_bytes: int = QUEUE_BYTES,
        idle_stuck_s: float = IDLE_STUCK_S,
    ) -> None:
        self._settings, self._clock, self._notify = settings, clock, notify
        self._retry_s, self._hand_over_s, self._queue_bytes = retry_s, hand_over_s, queue_bytes
        self._idle_stuck_s = idle_stuck_s
        self._queue: deque[Received | _HandOver] = deque()
        self._queued_bytes = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._started = False
        self._stuck: str | None = None  # set by the engine thread, taken up by the tape thread
        # When the tape thread last showed it runs: took a batch, wrote an item, or waited idle (it wakes
        # at least every second). Read by the engine thread to tell a busy tape from a stuck one.
        self._alive_at = time.monotonic()
        self.tape: TapeWriter | None = None
        self.tape_day: date | None = None
        self.problem: str | None = None
        self._retry_at = 0.0
        self._flushed_at = time.monotonic()
        self._alerted_day: date | None = None
        self._down_since_ms: int | None = None  # a TAPE FAILING alert awaits its TAPE RECOVERED
        self._gap_said = False  # that alert said recording went on at once (a deleted tape)

    @property
    def recording(self) -> bool:
        """Whether a tape is open and taking lines."""
        return self.tape is not None and self._stuck is None

    def resumed_after_hold(self) -> None:
        """The whole process was held (SIGSTOP, a paused VM): the tape thread was too, so its silence
        counts from now. Counted through the hold, a disk that never failed was said stuck: a TAPE
        FAILING, a TAPE RECOVERED at once, and a gap in the tape (an audit's find)."""
        self._alive_at = time.monotonic()

    def record(self, item: Received) -> None:
        """Queue `item` for today's tape (engine thread). Never waits; dropped while the tape is stuck."""
        if not self._settings.record or self._stuck is not None:
            return
        size = raw_size(item)
        with self._wake:
            waiting = len(self._queue)
            self._queue.append(item)
            self._queued_bytes += size
            behind = self._queued_bytes
            self._wake.notify()
        silent_s = time.monotonic() - self._alive_at
        if waiting and silent_s > self._idle_stuck_s:
            self._say_stuck(f"the tape's disk has taken nothing for {silent_s:.0f} s")
        elif behind > self._queue_bytes:
            self._say_stuck(f"the tape's disk is {behind >> 20} MB behind")

    def hand_over(self) -> None:
        """Before a durable decision (engine thread): wait for the lines queued so far to reach the OS.
        A tape thread that writes nothing for `hand_over_s` is stuck (said; the decision goes on); a busy
        one is waited for HAND_OVER_MOST_S at most."""
        if not self._settings.record or self._stuck is not None:
            return
        mark = _HandOver()
        with self._wake:
            self._queue.append(mark)
            self._wake.notify()
        started = time.monotonic()
        while not mark.done.wait(WAIT_STEP_S):
            now = time.monotonic()
            if now - max(self._alive_at, started) > self._hand_over_s:
                self._say_stuck(f"the tape's disk did not take a write within {self._hand_over_s:g} s")
                return
            if now - started > HAND_OVER_MOST_S:
                log.warning("tape_hand_over_late", waited_s=round(now - started, 2), note="the tape is busy")
                return

    def run(self, beat: Callable[[], None] = lambda: None) -> None:
        """The tape thread: write what is queued, flush every FLUSH_SECONDS, until `close`."""
        self._started = True
        while True:
            beat()
            batch = self._take()
            if batch is None:
                return
            for entry in batch:
                self._alive_at = time.monotonic()
                if isinstance(entry, _HandOver):
                    try:
                        self._hand_over_now()
                    finally:  # whatever happened, the engine must not wait out its time for this mark
                        entry.done.set()
                else:
                    self._record_now(entry)
            if self._stuck is not None:
                self._failed("tape_stuck", TapeStuck(self._stuck))
                self._stuck = None  # the disk answers again: recording rests, then resumes
            if self.tape is not None and time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
                self._flush_now()

    def close(self, timeout_s: float) -> None:
        """At a stop: the tape thread writes what is queued and closes the tape, within `timeout_s` (a
        disk that does not answer must not hold the stop)."""
        if not self._started:  # nothing was ever written: no tape is open
            return
        mark = _HandOver()
        with self._wake:
            self._stopping = True
            self._queue.append(mark)
            self._wake.notify()
        if not mark.done.wait(timeout_s):
            log.error("tape_not_closed", note=f"its disk did not answer within {timeout_s:g} s")

    def _take(self) -> list[Received | _HandOver] | None:
        """What is queued, waiting up to a second for it; None once closed with nothing left. A daemon's
        stop is not the end: `close` comes after the notifier's last sends, and writes what is left."""
        with self._wake:
            if not self._queue and not self._stopping:
                self._wake.wait(1.0)
            self._alive_at = time.monotonic()
            batch = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            stopping = self._stopping
        if stopping and not batch and self.tape is None:
            return None
        if stopping and not batch:
            self._close_tape()
            return None
        return batch

    def _say_stuck(self, why: str) -> None:
        """Recording stops until the tape thread runs again (engine thread); said once, as a failure."""
        if self._stuck is not None:
            return
        self._stuck = why
        self.problem = why
        log.error("tape_stuck", why=why, note="trading unaffected: recording stops until the disk answers")
        day = self.tape_day or ny_date(self._clock.now_ms())  # no tape opened yet: a disk hung from the start
        if self._alerted_day != day:
            text = f"Recording of today's feed stopped ({why}); it resumes once the disk answers."
            self._say_failing(day, f"{text} Alerts and trading are unaffected.")

    def _hand_over_now(self) -> None:
        if self.tape is None:
            if self._stopping:
                self._close_tape()
            return
        try:
            self.tape.hand_over()
        except Exception as exc:
            self._failed("tape_write_failed", exc)
        if self._stopping:
            self._close_tape()

    def _close_tape(self) -> None:
        tape, self.tape = self.tape, None
        if tape is not None:
            with contextlib.suppress(Exception):
                tape.close()

    def _flush_now(self) -> None:
        """A durable point for the recording: a crash loses at most the last few seconds of tape."""
        self._flushed_at = time.monotonic()
        try:
            assert self.tape is not None
            self.tape.flush()
        except Exception as exc:
            self._failed("tape_flush_failed", exc)
            return
        if self._down_since_ms is not None and self.problem is None:
            # Said once lines are on disk again: a write only fills a buffer, which a full disk still refuses.
            self._end_gap(self._down_since_ms, self._clock.now_ms())

    def _record_now(self, item: Received) -> None:
        """Write the item to today's tape; a failure pauses recording (see `_failed`)."""
        if self._resting(item.t):
            return
        try:
            self._write(item)
        except Exception as exc:
            self._failed("tape_write_failed", exc)
            return
        if self.problem is not None:
            log.warning("tape_recovered", after=self.problem, note="the tape has a gap")
            self.problem = None

    def _end_gap(self, since_ms: int, now_ms: int) -> None:
        """The alert closing a TAPE FAILING one: recording is back, and where the tape's gap is (unless
        that alert said already that recording went on at once and nothing failed since)."""
        self._down_since_ms = None
        if self._gap_said:
            return
        since = clock_text(since_ms)
        if ny_date(since_ms) != ny_date(now_ms):
            since = f"{ny_date(since_ms).isoformat()} {since}"
        self._notify(
            "TAPE_RECOVERED",
            f"Recording of the feed resumed; the tape has a gap from {since} to {clock_text(now_ms)}, "
            "which replays and backtests of it will miss.",
        )

    def _resting(self, t: int) -> bool:
        """After a failure, recording rests until `retry_s` has passed (or a new day starts)."""
        if self.problem is None or self.tape_day != ny_date(t):
            return False
        return time.monotonic() < self._retry_at

    def _write(self, item: Received) -> None:
        day = ny_date(item.t)
        if self.tape is None or self.tape_day != day:
            self._rotate(day, item.t)
        assert self.tape is not None
        if item.kind == "ws":
            self.tape.write_ws(item.t, item.payload)  # type: ignore[arg-type]
        elif item.kind == "control":
            self.tape.write_control(item.t, item.payload)  # type: ignore[arg-type]
        else:
            self.tape.write_rest(item.t, item.path, item.status, item.payload)

    def _failed(self, event: str, exc: Exception) -> None:
        """Pause recording, say so once a day (log and alert), retry later; trading goes on."""
        first = self.problem is None and self._alerted_day != self.tape_day
        self._gap_said = False  # failing again after its alert: the recovery is news
        self.problem = error_text(exc)
        # A deleted file or folder can be made again at once; a full or refusing disk needs time.
        # So can a disk that answers again after it hung (the tape thread runs this only then).
        retry_s = 0.0 if isinstance(exc, TapeGone | TapeStuck) else self._retry_s
        self._retry_at = time.monotonic() + retry_s
        log.error(event, error=self.problem, retry_in_s=retry_s, note="trading unaffected")
        self._close_tape()
        if not first:
            return
        text = (
            f"Recording of today's feed stopped ({self.problem}); retried every "
            f"{self._retry_s:.0f} s. Alerts and trading are unaffected."
        )
        if isinstance(exc, TapeGone):  # goes on at once in a new file: no recovery to announce
            text = (
                f"Today's tape was deleted while recording ({self.problem}); recording goes on in a "
                f"new file, with a gap of up to {FLUSH_SECONDS:.0f} s. Alerts and trading are unaffected."
            )
        self._say_failing(self.tape_day, text, gap_said=isinstance(exc, TapeGone))

    def _say_failing(self, day: date | None, text: str, *, gap_said: bool = False) -> None:
        """The day's one TAPE FAILING; its TAPE RECOVERED follows when lines are on disk again (unless
        `gap_said`: the alert said already that recording went on at once)."""
        self._alerted_day, self._down_since_ms, self._gap_said = day, self._clock.now_ms(), gap_said
        self._notify("TAPE_FAILING", text)

    def _rotate(self, day: date, t: int) -> None:
        self._close_tape()
        if self.tape_day != day:
            self.problem = None
        self.tape_day = day
        settings = self._settings
        path = tape_path(settings.data_dir, day)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tape = TapeWriter(
            path,
            underlying=settings.rules.underlying,
            benchmark=settings.rules.benchmark,
            start_ms=t,
            secrets=(settings.polygon_api_key, settings.pushover_token, settings.pushover_user_key),
        )
        removed = prune_tapes(path.parent, settings.record_retention_days, day)
        if removed:
            log.info("tapes_pruned", count=len(removed))
