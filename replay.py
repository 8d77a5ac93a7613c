"""Replay a tape through the full engine, resuming where a previous replay into the same journal stopped.

Engine time is each line's receive stamp `t`; a Tick fills each whole second between lines. When
the journal already holds this tape up to some line (its cursor points into it, or an earlier replay
of a tape of this name finished), the lines up to it are replayed only to rebuild the features (their
decisions are already in the journal), then the journal's state is adopted.

Days replay in any order into one journal: the lifetime adds up, while what belongs to a day (the
cooldown, the day record, an open position) never reaches into another day's replay.

At full speed (no pacing) the whole tape is decoded first, so the market can plan the day's
features at once (`MarketState.precompute_features`, as backtests do); the decoded lines then go
through the very same pipeline calls as a paced replay, which decodes line by line as it goes.
Decoding is a function of the tape alone (the decoder never sees the engine), so the two orders
give the same events, decisions and alerts. A replay's journal commits with synchronous=NORMAL:
it can always be rebuilt from the tape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from alert_text import money
from config import Rules
from engine import Engine, RestoredState, SessionSource
from events import Event, Received
from feed import FeedCounters, FeedDecoder
from market_calendar import ny_date
from pipeline import AlertSink, LogSink, Pipeline, structlog_sink
from pnl_tracker import Journal, Synchronous, TradeRow
from tape import TapeLine, TapeReader

# The `status` column in `Journal.table_rows("outbox")` (id, dedupe_key, kind, title, message,
# priority, at_ms, status, ...): the journal has no count of failed rows of its own.
OUTBOX_STATUS_COLUMN = 7

# Meta key prefix: the last line of a tape (by file name) that a finished replay went through.
REPLAYED_PREFIX = "replayed:"

# Cyclic GC thresholds while a whole tape is decoded and run at once: it holds a day of decoded
# events and the engine makes almost no reference cycles, yet CPython's default thresholds re-scan
# them over and over (measured: about a tenth of a full-day replay). The backtests' figure.
REPLAY_GC_THRESHOLDS = (100_000, 20, 100)

# One decoded tape line: (receive stamp, "events", tuple of events), (receive stamp, "control",
# payload) or, for the meta line, (its stamp, "meta", its dict).
DecodedLine = tuple[int, str, object]


class NotATape(ValueError):
    """The file yields no valid tape line (not JSON lines, empty, or a gzip of something else)."""

    def __init__(self, path: Path, bad_lines: int) -> None:
        super().__init__(f"{path} is not a tape: no valid tape line in it ({bad_lines} unreadable)")
        self.path = path
        self.bad_lines = bad_lines


@dataclass(frozen=True, slots=True)
class ReplayResult:
    lines: int
    bad_lines: int
    resumed_after: int
    feed: FeedCounters
    late_bars: int
    bars: int
    last_line: int = 0  # the tape's last valid line number
    new_lines: int = 0  # valid lines after `resumed_after`: 0 when the journal already held them all
    journal_failures: int = 0  # decisions the journal refused (logged as journal_write_failed)


def received_from(line: TapeLine) -> Received | None:
    """The live-path item a tape line stands for (None for the meta line)."""
    if line.kind == "ws":
        return Received(line.t, "ws", line.payload)
    if line.kind == "rest":
        return Received(line.t, "rest", line.payload, line.path or "", line.status or 0)
    if line.kind == "control":
        return Received(line.t, "control", line.payload)
    return None


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the body with REPLAY_GC_THRESHOLDS, then put the process's own thresholds back."""
    previous = gc.get_threshold()
    gc.set_threshold(*REPLAY_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def decoded_lines(reader: TapeReader, decoder: FeedDecoder) -> Iterator[tuple[int, DecodedLine]]:
    """Every valid line of a tape as (line number, decoded line), decoded in order as the live engine
    thread decodes received items (the one decoding that replays, backtests and caches share)."""
    ws = decoder.ws
    for fields in reader.records():
        line_no, t, kind, payload = fields[:4]
        if kind == "ws":
            # What `decoder.decode(received_from(line))` does with a frame, without the two
            # objects per line in between (a full day has one frame a second).
            yield line_no, (t, "events", tuple(ws(t, payload)))
        elif kind == "rest":
            item = received_from(TapeLine(*fields))
            assert item is not None
            yield line_no, (t, "events", tuple(decoder.decode(item)))
        else:  # "control" and "meta": nothing to decode
            yield line_no, (t, kind, payload)


def events_of(lines: Iterable[DecodedLine]) -> Iterator[Event]:
    """Every event of decoded lines in order (control and meta lines carry none)."""
    for _t, kind, body in lines:
        if kind == "events":
            yield from body  # type: ignore[misc]


def saved_line(journal: Journal | None, tape_name: str) -> int:
    """The last tape line whose decisions the journal already holds (0 if none).

    The cursor names the tape of the latest decision; the `replayed:` mark remembers every tape a
    replay went through to its end, so going back to an earlier day's tape is not replayed twice.
    """
    if journal is None:
        return 0
    cursor = journal.meta("cursor") or ""
    name, _, line_no = cursor.rpartition(":")
    at_cursor = int(line_no) if name == tape_name and line_no.isdigit() else 0
    finished = journal.meta(REPLAYED_PREFIX + tape_name) or ""
    return max(at_cursor, int(finished) if finished.isdigit() else 0)


def check_tape(path: Path) -> None:
    """Raise NotATape unless the file at `path` holds at least one valid tape line."""
    reader = TapeReader(path)
    if reader.meta is not None:
        return  # the usual case, known from the first line alone
    for _line in reader:
        return
    raise NotATape(Path(path), reader.bad_lines)


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
    fast: bool | None = None,
    synchronous: Synchronous = "NORMAL",
) -> ReplayResult:
    """Run every line of the tape at `path`; see the module docstring for resuming.

    `fast` decodes the whole tape first and plans its features (default: exactly when `speed` is
    None, i.e. no pacing), holding the decoded day in memory as backtests do (chain pages stay raw
    JSON text); False streams line by line. Both make the same decisions. The journal
    commits with `synchronous` from here on (NORMAL: a replay's journal can be rebuilt from its
    tape). Raises NotATape when the file holds no valid tape line.
    """
    check_tape(path)
    engine = engine or Engine(rules, calendar)
    if journal is not None:
        journal.set_synchronous(synchronous)
    pipeline = Pipeline(
        engine,
        journal,
        FeedDecoder.for_rules(rules),
        on_alerts=on_alerts,
        on_log=on_log,
    )
    reader = TapeReader(path, lazy_bodies=True)
    lines: Iterable[tuple[int, DecodedLine]] = decoded_lines(reader, pipeline.decoder)
    tape_name = Path(path).name
    resume_after = saved_line(journal, tape_name)
    pacer = Pacer(speed, sleep, clock)
    whole_tape_first = fast if fast is not None else speed is None
    if whole_tape_first:
        with fewer_collections():
            lines = list(lines)
            engine.market.precompute_features(events_of(line for _no, line in lines))
            counts = _run_lines(lines, pipeline, journal, tape_name, resume_after, pacer)
    else:
        counts = _run_lines(lines, pipeline, journal, tape_name, resume_after, pacer)
    if journal is not None and counts.last_line > resume_after:
        journal.set_meta(REPLAYED_PREFIX + tape_name, str(counts.last_line))
    return ReplayResult(
        lines=counts.lines,
        bad_lines=reader.bad_lines,
        resumed_after=resume_after,
        feed=pipeline.decoder.counters,
        late_bars=engine.counters.late_bars,
        bars=engine.counters.bars,
        last_line=counts.last_line,
        new_lines=counts.new_lines,
        journal_failures=pipeline.journal_failures,
    )


@dataclass(frozen=True, slots=True)
class _LineCounts:
    """The valid lines a run went through, those after the journal's cursor, and the last one's number."""

    lines: int
    new_lines: int
    last_line: int


def _run_lines(
    lines: Iterable[tuple[int, DecodedLine]],
    pipeline: Pipeline,
    journal: Journal | None,
    tape_name: str,
    resume_after: int,
    pacer: Pacer,
) -> _LineCounts:
    """Decoded lines through the pipeline as `Pipeline.handle` takes received items: the ticks of the
    seconds before each line first, then its events (or its control). Lines up to `resume_after` only
    warm the features; the journal's state is adopted at the first line after it."""
    engine = pipeline.engine
    pipeline.warming = resume_after > 0
    advance_to, run = pipeline.advance_to, pipeline.run
    count = new_lines = last_line = 0
    adopted = False
    for line_no, (t, kind, body) in lines:
        count += 1
        last_line = line_no
        if line_no > resume_after:
            new_lines += 1
            if not adopted:
                _adopt_journal(engine, journal, t)
                pipeline.warming, adopted = False, True
        if kind == "meta":
            continue
        if not pipeline.warming:
            pacer.wait_for(t)
        if kind == "control":
            pipeline.control_line(t, body)
            continue
        advance_to(t)
        if body:
            cursor = f"{tape_name}:{line_no}"
            for event in body:  # type: ignore[attr-defined]
                run(event, cursor)
    return _LineCounts(count, new_lines, last_line)


def _adopt_journal(engine: Engine, journal: Journal | None, t: int) -> None:
    if journal is None:
        return
    session_date = ny_date(t).isoformat()
    engine.restore(state_for_day(journal, session_date), session_date, replayed=True)


def state_for_day(journal: Journal, session_date: str) -> RestoredState:
    """The journal's trading state for a day replayed (or backtested) in any order.

    A position left open by a LATER day is not this day's to follow or close (closing it now would put
    its exit before its entry): it stays open in the journal for that day.
    """
    state = journal.restored_state(session_date)
    if state.position is not None and state.position.session_date > session_date:
        state = dataclasses.replace(state, position=None)
    return state


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What ONE replay run did (not the whole journal), plus the journal's lifetime after it."""

    tape: str
    journal: str
    lines: int
    bad_lines: int
    resumed_after: int
    new_lines: int
    trades: int
    wins: int
    losses: int
    pnl: float
    lifetime_pnl: float
    lifetime_wins: int
    lifetime_losses: int
    open_position: str | None
    pending_alerts: int
    moved_aside: str | None = None
    journal_write_failures: int = 0
    undelivered_alerts: int = 0  # with --notify: pending after the wait, or given up on in this run

    def as_dict(self) -> dict[str, object]:
        """JSON-ready fields, `event: replay_summary` first so a script can pick the line out."""
        return {
            "event": "replay_summary",
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "note": self.note(),
            "problems": self.problems(),
            "warnings": self.warnings(),
        }

    def warnings(self) -> list[str]:
        """What makes this run's figures less than a whole day's, though nothing failed (exit 0)."""
        if not self.bad_lines:
            return []
        return [
            f"the tape has {self.bad_lines} unreadable line(s) (a gzip cut short, a torn member): the lines "
            "after the damage are lost, so this run's trades and P&L may not be the whole day's"
        ]

    def problems(self) -> list[str]:
        """What went wrong in this run, in plain words (empty when nothing did): a non-zero exit."""
        found = []
        if self.journal_write_failures:
            found.append(
                f"the replay journal refused {self.journal_write_failures} write(s) (journal_write_failed in "
                f"the log): this run's decisions are not all in {self.journal}, so its trades and P&L above "
                "are incomplete and their alerts were not sent"
            )
        if self.undelivered_alerts:
            kept = (
                f" ({self.pending_alerts} pending stay in {self.journal} and go out with the next replay into it)"
                if self.pending_alerts
                else " (each was given up on: none is left to send)"
            )
            found.append(f"{self.undelivered_alerts} alert(s) were not delivered to Pushover{kept}")
        return found

    def note(self) -> str | None:
        """The plain words when the journal already held (part of) this tape, else None."""
        return resume_note(Path(self.tape), self.resumed_after, self.new_lines)


def is_win(pnl_dollars: float) -> bool:
    """A trade that made money; a flat trade counts as a loss, as in the journal's lifetime record."""
    return pnl_dollars > 0


def summarize_run(
    result: ReplayResult,
    *,
    tape: Path,
    journal: Journal,
    known_before: Iterable[str],
    moved_aside: Path | None = None,
    failed_before: int | None = None,
) -> RunSummary:
    """This run's trades are those the journal holds now and did not hold before it (`known_before`).

    `failed_before` (the journal's `failed_alerts` before the run) is given when alerts went to
    Pushover: then the alerts still pending, and those given up on during the run, were not delivered.
    """
    known = set(known_before)
    every = journal.trades()
    mine = [t for t in every if t.trade_id not in known]
    position = journal.restored_state("").position
    return RunSummary(
        tape=str(tape),
        journal=str(journal.path),
        lines=result.lines,
        bad_lines=result.bad_lines,
        resumed_after=result.resumed_after,
        new_lines=result.new_lines,
        trades=len(mine),
        wins=sum(is_win(t.pnl_dollars) for t in mine),
        losses=sum(not is_win(t.pnl_dollars) for t in mine),
        pnl=_total(mine),
        lifetime_pnl=_total(every),
        lifetime_wins=sum(is_win(t.pnl_dollars) for t in every),
        lifetime_losses=sum(not is_win(t.pnl_dollars) for t in every),
        open_position=None if position is None else position.trade_id,
        pending_alerts=journal.pending_count(),
        moved_aside=None if moved_aside is None else str(moved_aside),
        journal_write_failures=result.journal_failures,
        undelivered_alerts=_undelivered(journal, failed_before),
    )


def failed_alerts(journal: Journal) -> int:
    """Outbox rows given up on for good (status 'failed': Pushover rejected them, or timed out twice)."""
    return sum(1 for row in journal.table_rows("outbox") if row[OUTBOX_STATUS_COLUMN] == "failed")


def _undelivered(journal: Journal, failed_before: int | None) -> int:
    if failed_before is None:  # alerts went to the log: every one was "delivered"
        return 0
    return journal.pending_count() + max(0, failed_alerts(journal) - failed_before)


def _total(trades: list[TradeRow]) -> float:
    return round(sum(t.pnl_dollars for t in trades), 2)


def resume_note(tape: Path, resumed_after: int, new_lines: int | None = None) -> str | None:
    """The plain words for a tape the journal already holds (None when it held none of it)."""
    if resumed_after <= 0:
        return None
    held = f"The replay journal already holds this tape ({Path(tape).name}) up to line {resumed_after}"
    if new_lines is None:
        done = "replaying only the lines after it, if any"
    elif new_lines == 0:
        done = "nothing left to do, no line after it"
    else:
        done = f"resumed after it and replayed the {new_lines} lines that followed"
    return (
        f"{held}: {done}. To replay it from the start on a new journal: "
        f"python3 main.py --replay {tape} --fresh"
    )


def render_summary(summary: RunSummary) -> str:
    """The readable block printed at the end of a replay on a terminal."""
    record = f"{summary.wins}W-{summary.losses}L"
    lifetime = f"{summary.lifetime_wins}W-{summary.lifetime_losses}L"
    lines = [
        f"Replay of {summary.tape}",
        f"  lines read        {summary.lines} ({summary.bad_lines} unreadable)",
        f"  this run          {summary.trades} trades, {record}, P&L {money(summary.pnl)}",
        f"  lifetime          {money(summary.lifetime_pnl)}, {lifetime}",
        f"  open position     {summary.open_position or 'none'}",
        f"  alerts pending    {summary.pending_alerts}",
        f"  journal           {summary.journal}",
    ]
    note = summary.note()
    if note:
        lines.append(f"  note              {note}")
    if summary.moved_aside:
        lines.append(f"  --fresh           the previous journal was moved to {summary.moved_aside}")
    lines += [f"  WARNING           {warning}" for warning in summary.warnings()]
    lines += [f"  PROBLEM           {problem}" for problem in summary.problems()]
    return "\n".join(lines)


def move_aside(journal_path: Path, *, now: Callable[[], float] = time.time) -> Path | None:
    """Rename the journal (and its -wal/-shm files) to `<name>.<UTC timestamp>.bak`; None if there was none.

    Kept rather than deleted: a replay journal may hold weeks of replays someone wants to compare.
    """
    journal_path = Path(journal_path)
    if not journal_path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now()))
    target = journal_path.with_name(f"{journal_path.name}.{stamp}.bak")
    serial = 1
    while target.exists():
        serial += 1
        target = journal_path.with_name(f"{journal_path.name}.{stamp}-{serial}.bak")
    # The WAL first: a journal renamed without its WAL would be read without its latest commits.
    for suffix in ("-wal", "-shm"):
        side = journal_path.with_name(journal_path.name + suffix)
        if side.exists():
            side.rename(target.with_name(target.name + suffix))
    journal_path.rename(target)
    return target
