"""Single backtest runs: each tape through a fresh engine, one journal carried over the days.

The engine side of `backtest.py`, kept apart from the CLI so that pool and Dask workers (and the sweep's
re-runs of dependent cells) import only what a run needs: no argparse, no reports, no history client.
"""

from __future__ import annotations

import datetime
import gc
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from alert_text import money
from cli_exit import end_quietly_on_interrupt
from config import Rules
from day_runner import (
    CellDay,
    TapeFacts,
    day_is_independent,
    day_market,
    engine_pipeline,
    feed_day,
    tape_facts,
)
from engine import Engine, SessionSource
from entry_check import EntryCheck, entry_checks
from events import Alert, Log
from history import MINUTE, option_quotes_of
from market_calendar import MarketCalendar
from pnl_tracker import Journal, TradeRow
from progress import Progress
from report_charts import Level, MarkPoint, PricePoint
from tape import TapeReader
from tape_cache import load_decoded

if TYPE_CHECKING:
    from executors import DayExecutor

SAMPLE_EVERY_MS = 10_000
OldExit = tuple[str, int]  # (trade id, seconds since a quote last renewed the bid the exit was booked at)
TRADE_ALERTS = frozenset({"BUY", "SELL"})
BATCH_GC_THRESHOLDS = (100_000, 20, 100)


@dataclass(frozen=True, slots=True)
class DayResult:
    """One tape's outcome: its trades and alerts, and the series the charts need."""

    tape: str
    session_date: str
    reconstructed: bool
    trades: tuple[TradeRow, ...]
    alerts: tuple[Alert, ...]
    blocked: tuple[tuple[str, int], ...]
    bars: int
    chains: int
    bad_lines: int
    open_at_end: str | None = None
    prices: tuple[PricePoint, ...] = ()
    marks: tuple[MarkPoint, ...] = ()
    levels: tuple[Level, ...] = ()
    option_quotes: str | None = None  # a reconstructed day's quote method: "nbbo" or "minute"
    lines: int = 0  # readable lines of the tape (its meta line aside): with `bad_lines`, says a tape is whole
    last_ms: int = 0  # the receive stamp of its last readable line
    entry_checks: tuple[EntryCheck, ...] = ()  # each fill beside its contract's newest quote before the BUY
    trading_day: bool = True  # False: its date has no session (a weekend, a holiday, a closed date)
    old_exits: tuple[OldExit, ...] = ()  # exits booked at a bid no quote had renewed for long
    silences: tuple[tuple[int, int], ...] = ()  # (from, to) ms: no line at all for SILENCE_MS in session

    @property
    def facts(self) -> TapeFacts:
        """What the tape held, as a sweep's day keeps it (what the warnings of damaged and part days read)."""
        return TapeFacts(**{f.name: getattr(self, f.name) for f in fields(TapeFacts)})

    @property
    def pnl(self) -> float:
        return round(sum(t.pnl_dollars for t in self.trades), 2)


@dataclass(frozen=True, slots=True)
class DayRun:
    """A day's result with its first receive stamp and the engine's latest exit (for the independence test)."""

    result: DayResult
    first_ms: int
    last_exit_ms: int | None

    def as_cell_day(self) -> CellDay:
        """The day as `day_runner.day_is_independent` reads it."""
        return CellDay(self.result.trades, self.result.open_at_end is not None, self.last_exit_ms)


@dataclass(frozen=True, slots=True)
class BacktestResult:
    """A whole run: every day in order and every closed trade in exit order."""

    rules: Rules
    days: tuple[DayResult, ...]
    trades: tuple[TradeRow, ...]

    @property
    def reconstructed_days(self) -> tuple[str, ...]:
        return tuple(d.session_date for d in self.days if d.reconstructed)

    @property
    def minute_days(self) -> tuple[str, ...]:
        """Reconstructed days whose option quotes were modelled from minute bars (an approximation)."""
        return tuple(d.session_date for d in self.days if d.reconstructed and d.option_quotes == MINUTE)


def use_batch_gc() -> None:
    """Collect cyclic garbage less often in backtest processes (the CLI and pool workers).

    A run holds a day's ~200k decoded objects and builds tens of thousands of feature tuples; with
    CPython's default thresholds the collector re-scans them over and over, though the engine makes
    almost no reference cycles. Measured: about a fifth of a day's run time.
    """
    gc.set_threshold(*BATCH_GC_THRESHOLDS)


def init_pool_worker() -> None:
    """A backtest pool worker: batch GC, and Ctrl-C ends it quietly (the parent says "Interrupted")."""
    use_batch_gc()
    end_quietly_on_interrupt()


class SeriesRecorder:
    """Reads the engine after each received item: IWM close/VWAP every `every_ms`, the held mark on change."""

    def __init__(self, every_ms: int) -> None:
        self.every_ms = every_ms
        self.prices: list[PricePoint] = []
        self.marks: list[MarkPoint] = []
        self.levels: list[Level] = []
        self._next_ms = 0
        self._held: str | None = None

    def observe(self, engine: Engine) -> None:
        last = engine.last
        if last is not None and last.start_ms >= self._next_ms:
            self.prices.append(PricePoint(last.start_ms, last.close, last.rolling_vwap))
            self._next_ms = last.start_ms - last.start_ms % self.every_ms + self.every_ms
        self._follow_position(engine)

    def _follow_position(self, engine: Engine) -> None:
        position = engine.position
        held = position.trade_id if position is not None else None
        close = engine.last.close if engine.last is not None else math.nan
        if held != self._held:
            if self._held is not None:
                exit_ms = engine.last_exit_ms if engine.last_exit_ms is not None else engine.now_ms
                self.levels.append(Level(self._held, "exit", exit_ms, close))
            if position is not None:
                self.levels.append(Level(position.trade_id, "entry", position.entry_ms, close))
            self._held = held
        if position is None:
            return
        last_mark = self.marks[-1] if self.marks else None
        if last_mark is None or last_mark.trade_id != held or last_mark.mark != position.mark:
            self.marks.append(MarkPoint(engine.now_ms, position.trade_id, position.mark))


def _count_blocked(blocked: Counter[str], old_exits: list[OldExit], log: Log) -> None:
    """What a day's log lines tell the report: blocked entries by rule, and exits booked on old quotes."""
    if log.event == "entry_blocked":
        blocked[str(log.fields.get("rule"))] += 1
    elif log.event == "no_contract":
        blocked["no_contract"] += 1
    elif log.event == "exit_on_old_quote":
        old_exits.append((str(log.fields["trade_id"]), int(log.fields["quote_age_s"])))


def run_day(
    tape: Path,
    rules: Rules,
    calendar: SessionSource,
    journal: Journal,
    *,
    sample_every_ms: int | None = SAMPLE_EVERY_MS,
    cache_dir: Path | None = None,
) -> DayResult:
    """Run one tape through a fresh engine (see `day_runner`), writing its decisions to `journal`.

    The journal's state (lifetime, an open position of an earlier day) is adopted first, as a replay
    adopts it. With `sample_every_ms` the chart series are recorded as well; with `cache_dir` the
    decoded tape is cached there (`tape_cache`).
    """
    return run_day_detail(
        tape, rules, calendar, journal, sample_every_ms=sample_every_ms, cache_dir=cache_dir
    ).result


def run_day_detail(
    tape: Path,
    rules: Rules,
    calendar: SessionSource,
    journal: Journal,
    *,
    sample_every_ms: int | None = SAMPLE_EVERY_MS,
    cache_dir: Path | None = None,
) -> DayRun:
    """`run_day`, with what says whether the next day depends on this one (`day_runner.day_is_independent`)."""
    alerts: list[Alert] = []
    blocked: Counter[str] = Counter()
    old_exits: list[OldExit] = []
    market, save_features = day_market(tape, rules, cache_dir)
    pipeline = engine_pipeline(
        rules,
        calendar,
        market,
        journal,
        on_alerts=alerts.extend,
        on_log=lambda log: _count_blocked(blocked, old_exits, log),
    )
    engine = pipeline.engine
    recorder = SeriesRecorder(sample_every_ms) if sample_every_ms else None
    decoded = load_decoded(tape, rules, cache_dir)
    known = {t.trade_id for t in journal.trades()}
    feed_day(decoded, market, [pipeline], (lambda: recorder.observe(engine)) if recorder else None)
    save_features()
    trades = tuple(t for t in journal.trades() if t.trade_id not in known)
    result = DayResult(
        **asdict(tape_facts(tape, decoded, market, calendar)),
        reconstructed=decoded.reconstructed,
        trades=trades,
        alerts=tuple(a for a in alerts if a.kind in TRADE_ALERTS),
        blocked=tuple(sorted(blocked.items())),
        open_at_end=engine.position.trade_id if engine.position is not None else None,
        prices=tuple(recorder.prices) if recorder else (),
        marks=tuple(recorder.marks) if recorder else (),
        levels=tuple(recorder.levels) if recorder else (),
        option_quotes=option_quotes_of(TapeReader(tape).meta) if decoded.reconstructed else None,
        entry_checks=entry_checks(decoded.lines, trades),
        old_exits=tuple(old_exits),
    )
    first_ms = decoded.lines[0][0] if decoded.lines else 0
    return DayRun(result, first_ms, engine.last_exit_ms)


def run_backtest(
    tapes: Sequence[Path],
    rules: Rules,
    *,
    calendar: SessionSource | None = None,
    closed_dates: Iterable[datetime.date] = (),
    sample_every_ms: int | None = SAMPLE_EVERY_MS,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> BacktestResult:
    """Run the days in order, one fresh engine each, one journal for the run."""
    calendar = calendar or MarketCalendar(rules, closed_dates)
    journal = Journal(Path(":memory:"), synchronous="NORMAL")
    try:
        days = []
        for tape in tapes:
            day = run_day(
                Path(tape), rules, calendar, journal, sample_every_ms=sample_every_ms, cache_dir=cache_dir
            )
            days.append(day)
            if progress is not None:
                progress.step(f"{day.session_date} {len(day.trades)} trades {money(day.pnl)}")
        trades = tuple(journal.trades())
    finally:
        journal.close()
    return BacktestResult(rules, tuple(days), trades)


def day_alone(
    tape: Path,
    cache_dir: Path | None,
    rules: Rules,
    closed_dates: tuple[datetime.date, ...],
    sample_every_ms: int | None,
) -> DayRun:
    """One day of a single run from an empty journal: a `DayExecutor` task (tape and cache folder first)."""
    journal = Journal(Path(":memory:"), synchronous="NORMAL")
    try:
        calendar = MarketCalendar(rules, closed_dates)
        return run_day_detail(
            tape, rules, calendar, journal, sample_every_ms=sample_every_ms, cache_dir=cache_dir
        )
    finally:
        journal.close()


def backtest_task(
    tapes: Sequence[Path],
    cache_dir: Path | None,
    rules: Rules,
    closed_dates: tuple[datetime.date, ...],
    sample_every_ms: int | None,
) -> BacktestResult:
    """`run_backtest` as a `DayExecutor` task over all its tapes in order."""
    return run_backtest(
        tapes, rules, closed_dates=closed_dates, sample_every_ms=sample_every_ms, cache_dir=cache_dir
    )


def run_part(
    executor: DayExecutor, indices: Sequence[int], rules: Rules, closed_dates: Iterable[datetime.date] = ()
) -> BacktestResult:
    """The executor's days at `indices` run alone, in order, from an empty journal, without chart series.

    A `--holdout` part of a single run, made as a sweep makes it (`sweep._cells_over`): the held-out
    days never see a position or a cooldown the in-sample days left.
    """
    [part] = executor.over_days(backtest_task, indices, [(rules, tuple(closed_dates), None)])
    return part


def run_single(
    executor: DayExecutor,
    tapes: Sequence[Path | str],
    rules: Rules,
    *,
    closed_dates: Iterable[datetime.date] = (),
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> BacktestResult:
    """A single run: in order in this process beside a local pool, or day by day on a remote executor.

    On a remote executor (Dask) every day runs at once from an empty journal, as a sweep's days do; when
    the days prove independent (no position left open, no cooldown reaching into the next day) they are
    joined, which gives the trades, series and report of a run in order. Otherwise the whole run goes in
    order as one task. Only the lifetime line of the in-memory BUY/SELL alert texts differs (each day's
    own), and no report prints those.
    """
    closed = tuple(closed_dates)
    if not executor.remote:
        return run_backtest(tapes, rules, closed_dates=closed, progress=progress, cache_dir=cache_dir)  # type: ignore[arg-type]
    runs: list[DayRun | None] = [None] * len(tapes)
    for index, run in executor.each_day(day_alone, range(len(tapes)), rules, closed, SAMPLE_EVERY_MS):
        runs[index] = run
        if progress is not None:
            day = run.result
            progress.step(f"{day.session_date} {len(day.trades)} trades {money(day.pnl)}")
    done = [run for run in runs if run is not None]
    if _independent(done, rules):
        days = tuple(replace(run.result, tape=str(tape)) for run, tape in zip(done, tapes, strict=True))
        trades = sorted((t for day in days for t in day.trades), key=lambda t: (t.exit_ms, t.trade_id))
        return BacktestResult(rules, days, tuple(trades))
    [whole] = executor.over_days(backtest_task, range(len(tapes)), [(rules, closed, SAMPLE_EVERY_MS)])
    days = tuple(replace(day, tape=str(tape)) for day, tape in zip(whole.days, tapes, strict=True))
    return replace(whole, days=days)


def _independent(runs: Sequence[DayRun], rules: Rules) -> bool:
    """Whether every day, run alone, equals running it after the days before it."""
    cell_days = [run.as_cell_day() for run in runs]
    return all(day_is_independent(cell_days[:i], runs[i].first_ms, rules) for i in range(1, len(runs)))
