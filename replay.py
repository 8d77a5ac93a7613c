"""Replay a tape through the full engine, resuming where a previous replay into the same journal stopped.

Engine time is each line's receive stamp `t`; a Tick fills each whole second between lines. When
the journal's cursor points into this tape, the lines up to it are replayed only to rebuild the
features (their decisions are already in the journal), then the journal's state is adopted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from config import Rules
from engine import Engine, SessionSource
from events import Received
from feed import FeedCounters, FeedDecoder
from market_calendar import ny_date
from pipeline import AlertSink, LogSink, Pipeline, structlog_sink
from pnl_tracker import Journal
from tape import TapeLine, TapeReader


@dataclass(frozen=True, slots=True)
class ReplayResult:
    lines: int
    bad_lines: int
    resumed_after: int
    feed: FeedCounters
    late_bars: int
    bars: int


def received_from(line: TapeLine) -> Received | None:
    """The live-path item a tape line stands for (None for the meta line)."""
    if line.kind == "ws":
        return Received(line.t, "ws", line.payload)
    if line.kind == "rest":
        return Received(line.t, "rest", line.payload, line.path or "", line.status or 0)
    if line.kind == "control":
        return Received(line.t, "control", line.payload)
    return None


def saved_line(journal: Journal | None, tape_name: str) -> int:
    """The last tape line whose decisions the journal already holds (0 if none)."""
    cursor = journal.meta("cursor") if journal is not None else None
    if not cursor:
        return 0
    name, _, line_no = cursor.rpartition(":")
    return int(line_no) if name == tape_name and line_no.isdigit() else 0


class Pacer:
    """Sleeps so that tape time passes `speed` times faster than wall time (None: as fast as possible)."""

    def __init__(
        self, speed: float | None, sleep: Callable[[float], None], clock: Callable[[], float]
    ) -> None:
        self.speed, self.sleep, self.clock = speed, sleep, clock
        self._origin: tuple[int, float] | None = None

    def wait_for(self, t: int) -> None:
        if self.speed is None:
            return
        if self._origin is None:
            self._origin = (t, self.clock())
            return
        due = self._origin[1] + (t - self._origin[0]) / 1000 / self.speed
        delay = due - self.clock()
        if delay > 0:
            self.sleep(delay)


def replay_tape(
    path: Path,
    *,
    rules: Rules,
    calendar: SessionSource,
    journal: Journal | None,
    on_alerts: AlertSink,
    on_log: LogSink = structlog_sink,
    speed: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    engine: Engine | None = None,
) -> ReplayResult:
    """Run every line of the tape at `path`; see the module docstring for resuming."""
    engine = engine or Engine(rules, calendar)
    pipeline = Pipeline(
        engine,
        journal,
        FeedDecoder.for_rules(rules),
        on_alerts=on_alerts,
        on_log=on_log,
    )
    reader = TapeReader(path, lazy_bodies=True)
    tape_name = Path(path).name
    resume_after = saved_line(journal, tape_name)
    pipeline.warming = resume_after > 0
    pacer = Pacer(speed, sleep, clock)
    lines = 0
    adopted = False
    for line in reader:
        lines += 1
        if not adopted and line.line_no > resume_after:
            _adopt_journal(engine, journal, line.t)
            pipeline.warming, adopted = False, True
        item = received_from(line)
        if item is None:
            continue
        if not pipeline.warming:
            pacer.wait_for(item.t)
        pipeline.handle(item, cursor=f"{tape_name}:{line.line_no}")
    return ReplayResult(
        lines=lines,
        bad_lines=reader.bad_lines,
        resumed_after=resume_after,
        feed=pipeline.decoder.counters,
        late_bars=engine.counters.late_bars,
        bars=engine.counters.bars,
    )


def _adopt_journal(engine: Engine, journal: Journal | None, t: int) -> None:
    if journal is None:
        return
    session_date = ny_date(t).isoformat()
    engine.restore(journal.restored_state(session_date), session_date)
