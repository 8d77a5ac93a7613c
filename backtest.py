"""Backtests: many session tapes through the live decision path, then statistics, a report and charts.

    python backtest.py TAPES...                  recorded (or reconstructed) tapes, files or folders
    python backtest.py --synthetic N [--seed S]  N seeded synthetic sessions
    python backtest.py --fetch FROM [--to TO]    rebuild past sessions from Polygon REST, then test them

Each day gets a fresh `Engine` behind the same `Pipeline` and journal code as the live daemon and
`--replay`, fed by `day_runner` from the tape decoded once by the live `FeedDecoder` (`tape_cache`);
one in-memory journal spans the run, so the lifetime P&L accumulates from day to day. Fills are the
live alerts' prices: entry at the ask, exit at the bid.

`--sweep NAME=V1,V2` (repeatable) runs the grid of rule variants over every day in a process pool,
one task per day with all cells in one pass. A cell's trades are those of a single run with its settings.

`--fetch` reconstructs what the daemon would have recorded (see `history.py`); such tapes say
`"reconstructed": true` in their meta line and every report built on them says so.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TextIO

from alert_text import money
from config import ConfigError, Rules, Settings, load_settings
from day_runner import SweepDay, day_is_independent, day_market, engine_pipeline, feed_day, run_cells_on_day
from engine import Engine, SessionSource
from events import Alert, Log
from history import MINUTE, fetch_history, option_quotes_of
from holdout import Holdout, Split, parse_holdout, print_held_out, print_side_by_side, split_dates
from market_calendar import MarketCalendar, ny_date, ny_datetime
from pnl_tracker import Journal, TradeRow
from progress import Progress
from report_charts import (
    Level,
    MarkPoint,
    PricePoint,
    day_chart,
    equity_chart,
    equity_curve,
    max_drawdown,
)
from tape import TapeReader
from tape_cache import cache_path, ensure_decoded, load_decoded

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FILLS_NOTE = (
    "Fills as live: entry at the ask, exit at the bid (the prices the alerts quote); "
    "P&L = (exit - entry) x 100 x CONTRACTS, rounded to cents."
)
RECONSTRUCTED_NOTE = (
    "reconstructed from Polygon REST history: 1-second stock bars, option quotes from the /v3/quotes NBBO "
    "(nbbo) or modelled around minute bars (minute)"
)
MINUTE_NOTE = "minute-bar approximation: option quotes modelled around minute closes, not real bids and asks"
SAMPLE_EVERY_MS = 10_000
TRADE_ALERTS = frozenset({"BUY", "SELL"})
BATCH_GC_THRESHOLDS = (100_000, 20, 100)
RULE_NAMES = tuple(f.name.upper() for f in fields(Rules))

SYNTHETIC_FIRST_DAY = datetime.date(2025, 1, 2)


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

    @property
    def pnl(self) -> float:
        return round(sum(t.pnl_dollars for t in self.trades), 2)


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


@dataclass(frozen=True, slots=True)
class Stats:
    """Statistics of a trade list. `profit_factor` is inf when nothing was lost, None without trades."""

    trades: int
    wins: int
    losses: int
    win_rate_pct: float | None
    avg_win: float | None
    avg_loss: float | None
    expectancy: float | None
    profit_factor: float | None
    max_drawdown: float
    total_pnl: float
    exits_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DayRow:
    """One line of the per-day table."""

    session_date: str
    trades: int
    wins: int
    losses: int
    pnl: float
    cumulative: float
    reconstructed: bool


@dataclass(frozen=True, slots=True)
class Cell:
    """One point of a sweep grid: the swept values (environment names) and the rules they make."""

    params: tuple[tuple[str, str], ...]
    rules: Rules


@dataclass(frozen=True, slots=True)
class CellResult:
    """A cell's trades and statistics on the days it is ranked on (the in-sample days with --holdout).

    With --holdout, `out_trades`/`out_stats` are a run of the cell over the held-out days alone.
    """

    params: tuple[tuple[str, str], ...]
    trades: tuple[TradeRow, ...]
    stats: Stats
    out_trades: tuple[TradeRow, ...] = ()
    out_stats: Stats | None = None


def use_batch_gc() -> None:
    """Collect cyclic garbage less often in backtest processes (the CLI and pool workers).

    A run holds a day's ~200k decoded objects and builds tens of thousands of feature tuples; with
    CPython's default thresholds the collector re-scans them over and over, though the engine makes
    almost no reference cycles. Measured: about a fifth of a day's run time.
    """
    gc.set_threshold(*BATCH_GC_THRESHOLDS)


def parse_assignments(raw: Iterable[str]) -> dict[str, str]:
    """`NAME=VALUE` strings to a dict; raise ConfigError naming each malformed one or unknown rule."""
    values: dict[str, str] = {}
    problems = []
    for item in raw:
        name, sep, value = item.partition("=")
        name = name.strip().upper()
        if not sep:
            problems.append(f"{item!r}: expected NAME=VALUE")
        elif name not in RULE_NAMES:
            problems.append(f"{name}: not a rule; rules are {', '.join(RULE_NAMES)}")
        else:
            values[name] = value.strip()
    if problems:
        raise ConfigError(problems)
    return values


def parse_sweep(raw: Iterable[str]) -> list[tuple[str, tuple[str, ...]]]:
    """`NAME=V1,V2,...` strings to axes (name, values), in the order given."""
    axes = []
    for name, values in parse_assignments(raw).items():
        choices = tuple(v.strip() for v in values.split(",") if v.strip())
        if not choices:
            raise ConfigError([f"--sweep {name}: no values"])
        axes.append((name, choices))
    return axes


def resolve_settings(
    overrides: Mapping[str, str],
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = ".env",
) -> Settings:
    """The configured settings (`.env` and environment, as the daemon reads them) with rule overrides."""
    base = dict(os.environ if environ is None else environ)
    return load_settings(env_file, environ={**base, **overrides})


def sweep_cells(
    axes: Sequence[tuple[str, tuple[str, ...]]],
    overrides: Mapping[str, str],
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = ".env",
) -> list[Cell]:
    """Every combination of the axes, each validated like a start-up; ConfigError lists every bad cell."""
    names = [name for name, _ in axes]
    cells, problems = [], []
    for combo in itertools.product(*(values for _, values in axes)):
        params = tuple(zip(names, combo, strict=True))
        try:
            settings = resolve_settings({**overrides, **dict(params)}, environ=environ, env_file=env_file)
        except ConfigError as exc:
            label = " ".join(f"{n}={v}" for n, v in params)
            problems += [f"cell {label}: {p}" for p in exc.problems]
            continue
        cells.append(Cell(params, settings.rules))
    if problems:
        raise ConfigError(problems)
    return cells


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


def _count_blocked(blocked: Counter[str], log: Log) -> None:
    if log.event == "entry_blocked":
        blocked[str(log.fields.get("rule"))] += 1
    elif log.event == "no_contract":
        blocked["no_contract"] += 1


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
    alerts: list[Alert] = []
    blocked: Counter[str] = Counter()
    market, save_features = day_market(tape, rules, cache_dir)
    pipeline = engine_pipeline(
        rules,
        calendar,
        market,
        journal,
        on_alerts=alerts.extend,
        on_log=lambda log: _count_blocked(blocked, log),
    )
    engine = pipeline.engine
    recorder = SeriesRecorder(sample_every_ms) if sample_every_ms else None
    decoded = load_decoded(tape, rules, cache_dir)
    known = {t.trade_id for t in journal.trades()}
    feed_day(decoded, market, [pipeline], (lambda: recorder.observe(engine)) if recorder else None)
    save_features()
    return DayResult(
        tape=str(tape),
        session_date=decoded.session_date,
        reconstructed=decoded.reconstructed,
        trades=tuple(t for t in journal.trades() if t.trade_id not in known),
        alerts=tuple(a for a in alerts if a.kind in TRADE_ALERTS),
        blocked=tuple(sorted(blocked.items())),
        bars=market.counters.bars,
        chains=market.counters.chains,
        bad_lines=decoded.bad_lines,
        open_at_end=engine.position.trade_id if engine.position is not None else None,
        prices=tuple(recorder.prices) if recorder else (),
        marks=tuple(recorder.marks) if recorder else (),
        levels=tuple(recorder.levels) if recorder else (),
        option_quotes=option_quotes_of(TapeReader(tape).meta) if decoded.reconstructed else None,
    )


def tape_date(path: Path) -> datetime.date | None:
    """The New York date of a tape's first line (None for an empty tape)."""
    first = next(iter(TapeReader(path)), None)
    return None if first is None else ny_date(first.t)


def check_distinct_days(tapes: Sequence[Path]) -> list[str]:
    """Problems with a tape list: unreadable files and two tapes of one day (trade ids would collide)."""
    seen: dict[datetime.date, Path] = {}
    problems = []
    for path in tapes:
        if not Path(path).is_file():
            problems.append(f"{path}: no such tape")
            continue
        day = tape_date(path)
        if day is None:
            problems.append(f"{path}: empty tape")
        elif day in seen:
            problems.append(f"{path} and {seen[day]} are both {day}; one run takes one tape per day")
        else:
            seen[day] = path
    return problems


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
    journal = Journal(Path(":memory:"))
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


def compute_stats(trades: Sequence[TradeRow]) -> Stats:
    """Statistics of closed trades in exit order. A win is P&L > 0; a $0.00 trade is a loss (DESIGN 4)."""
    pnls = [t.pnl_dollars for t in trades]
    wins = [p for p in pnls if p > 0]
    losses = [p for p in pnls if p <= 0]
    gross_win, gross_loss = sum(wins), -sum(losses)
    if not pnls:
        factor = None
    elif gross_loss > 0:
        factor = gross_win / gross_loss
    else:
        factor = math.inf if gross_win > 0 else None
    reasons = Counter(t.reason for t in trades)
    return Stats(
        trades=len(pnls),
        wins=len(wins),
        losses=len(losses),
        win_rate_pct=100.0 * len(wins) / len(pnls) if pnls else None,
        avg_win=round(gross_win / len(wins), 2) if wins else None,
        avg_loss=round(-gross_loss / len(losses), 2) if losses else None,
        expectancy=round(sum(pnls) / len(pnls), 2) if pnls else None,
        profit_factor=factor,
        max_drawdown=max_drawdown(equity_curve(trades)),
        total_pnl=round(sum(pnls), 2),
        exits_by_reason=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


def day_rows(days: Sequence[DayResult]) -> list[DayRow]:
    """The per-day table with a running total."""
    rows, cumulative = [], 0.0
    for day in days:
        wins = sum(1 for t in day.trades if t.pnl_dollars > 0)
        cumulative = round(cumulative + day.pnl, 2)
        rows.append(
            DayRow(
                day.session_date,
                len(day.trades),
                wins,
                len(day.trades) - wins,
                day.pnl,
                cumulative,
                day.reconstructed,
            )
        )
    return rows


def blocked_totals(days: Sequence[DayResult]) -> dict[str, int]:
    """Bars whose entry signal was blocked, by rule, over all days."""
    totals: Counter[str] = Counter()
    for day in days:
        totals.update(dict(day.blocked))
    return dict(totals.most_common())


def run_cell(
    tapes: Sequence[Path],
    cell: Cell,
    closed_dates: tuple[datetime.date, ...] = (),
    cache_dir: Path | None = None,
) -> CellResult:
    """One sweep cell run alone: exactly a single run with the cell's rules, without the chart series."""
    result = run_backtest(
        tapes, cell.rules, closed_dates=closed_dates, sample_every_ms=None, cache_dir=cache_dir
    )
    return CellResult(cell.params, result.trades, compute_stats(result.trades))


def rank_key(result: CellResult) -> tuple[float, float]:
    """Best first: total P&L, then profit factor (no trades ranks last)."""
    factor = result.stats.profit_factor
    return (-result.stats.total_pnl, -(factor if factor is not None else -1.0))


def run_sweep(
    tapes: Sequence[Path],
    cells: Sequence[Cell],
    *,
    workers: int,
    closed_dates: tuple[datetime.date, ...] = (),
    progress: Progress | None = None,
    cache_dir: Path | None = None,
    held_out: int = 0,
) -> list[CellResult]:
    """Every cell over every day; results ranked by `rank_key` (stable for ties).

    One pool task per day runs all the cells over it in one pass (`day_runner.run_cells_on_day`). A cell
    whose days turn out not to be independent (a position left open overnight, a cooldown reaching
    into the next day) is re-run over all days in order, exactly as a single run.

    With `held_out` = K > 0 the last K tapes are out of sample: each cell is ranked on a run over the
    other days alone (its `trades`, `stats`), and gets a run over the held-out days alone (`out_trades`,
    `out_stats`), so nothing of a held-out day reaches the ranking.
    """
    rules = [cell.rules for cell in cells]
    cut = len(tapes) - held_out
    with ProcessPoolExecutor(max_workers=max(1, workers), initializer=use_batch_gc) as pool:
        futures = {
            pool.submit(run_cells_on_day, Path(tape), rules, closed_dates, cache_dir): i
            for i, tape in enumerate(tapes)
        }
        days: list[SweepDay] = [SweepDay("", 0, ())] * len(tapes)
        for future in as_completed(futures):
            days[futures[future]] = day = future.result()
            if progress is not None:
                progress.step(day.session_date)
        inside = _cells_over(pool, days[:cut], tapes[:cut], cells, closed_dates, cache_dir)
        outside = (
            _cells_over(pool, days[cut:], tapes[cut:], cells, closed_dates, cache_dir) if held_out else []
        )
    if outside:
        inside = [
            replace(r, out_trades=o.trades, out_stats=o.stats) for r, o in zip(inside, outside, strict=True)
        ]
    order = {cell.params: i for i, cell in enumerate(cells)}
    return sorted(inside, key=lambda r: (*rank_key(r), order[r.params]))


def _cells_over(
    pool: ProcessPoolExecutor,
    days: Sequence[SweepDay],
    tapes: Sequence[Path],
    cells: Sequence[Cell],
    closed_dates: tuple[datetime.date, ...],
    cache_dir: Path | None,
) -> list[CellResult]:
    """Each cell over `days` as one run of those days alone, in cell order (dependent cells re-run)."""
    joined = [_joined_cell(days, index, cell) for index, cell in enumerate(cells)]
    reruns = {
        index: pool.submit(run_cell, list(tapes), cell, closed_dates, cache_dir)
        for index, (cell, result) in enumerate(zip(cells, joined, strict=True))
        if result is None
    }
    return [result if result is not None else reruns[index].result() for index, result in enumerate(joined)]


def _joined_cell(days: Sequence[SweepDay], index: int, cell: Cell) -> CellResult | None:
    """A cell's days put together, or None when a day depended on the ones before it."""
    cell_days = [day.cells[index] for day in days]
    for i in range(1, len(days)):
        if not day_is_independent(cell_days[:i], days[i].first_ms, cell.rules):
            return None
    trades = tuple(
        sorted((t for day in cell_days for t in day.trades), key=lambda t: (t.exit_ms, t.trade_id))
    )
    return CellResult(cell.params, trades, compute_stats(trades))


def synthetic_dates(
    count: int, calendar: MarketCalendar, first: datetime.date = SYNTHETIC_FIRST_DAY
) -> list[datetime.date]:
    """`count` consecutive regular (not early-close) sessions from `first`: the synthetic day is 6.5 h."""
    days: list[datetime.date] = []
    day = first - datetime.timedelta(days=1)
    while len(days) < count:
        session = calendar.next_session(day)
        day = session.date
        if not session.early_close:
            days.append(day)
    return days


def day_seed(seed: int, day: datetime.date) -> int:
    """A per-day seed: the synthetic market seeds its noise with it, so days must not share one."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{day.isoformat()}".encode()).digest()[:4], "big")


def synthetic_folder(data_dir: Path, seed: int) -> Path:
    """Where the synthetic days of `seed` are kept: one folder per version of the market model."""
    from sim.market import MODEL_VERSION  # only synthetic runs need the model

    return data_dir / "synthetic" / f"v{MODEL_VERSION}" / f"seed-{seed}"


def build_synthetic_tape(day: datetime.date, seed: int, folder: Path) -> Path:
    """The tape of one synthetic day (`random_script`), built once: an existing tape is reused.

    It streams the options cluster's quotes of the contracts nearest the delta band, as a daemon with
    the options stream records them, so marks and exits move within a second as they do live.
    """
    from sim import market as model  # only synthetic runs need the model

    path = Path(folder) / f"{day.isoformat()}.jsonl.gz"
    if path.is_file():
        return path
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    market = model.SyntheticMarket(model.random_script(day, day_seed(seed, day)))
    model.write_tape(market, partial, stream_quotes=model.DEMO_STREAM_QUOTES)
    os.replace(partial, path)
    return path


def build_synthetic_tapes(
    days: Sequence[datetime.date],
    seed: int,
    folder: Path,
    *,
    workers: int,
    progress: Progress | None = None,
) -> list[Path]:
    """Build (or reuse) the tapes of `days` in a process pool; returns them in date order."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    missing = [d for d in days if not (Path(folder) / f"{d.isoformat()}.jsonl.gz").is_file()]
    if missing:
        with ProcessPoolExecutor(max_workers=max(1, workers), initializer=use_batch_gc) as pool:
            futures = {pool.submit(build_synthetic_tape, d, seed, Path(folder)): d for d in missing}
            for future in as_completed(futures):
                future.result()
                if progress is not None:
                    progress.step(futures[future].isoformat())
    return [Path(folder) / f"{d.isoformat()}.jsonl.gz" for d in days]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _money_or_na(value: float | None) -> str:
    return "n/a" if value is None else money(value)


def _factor(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _json_factor(value: float | None) -> float | str | None:
    return "inf" if value is not None and math.isinf(value) else value


def data_label(result: BacktestResult, source: str = "tapes") -> str:
    """What the days are, saying "reconstructed" when any is."""
    label = f"{len(result.days)} day(s) of {source}"
    rebuilt = len(result.reconstructed_days)
    label = f"{label}; {rebuilt} {RECONSTRUCTED_NOTE}" if rebuilt else label
    minute = result.minute_days
    return f"{label}; {MINUTE_NOTE} on {len(minute)} day(s): {', '.join(minute)}" if minute else label


def day_source(day: DayResult, run_source: str = "tapes") -> str:
    """The per-day table's source: `reconstructed (nbbo|minute)`, `synthetic` or `tape`."""
    if day.reconstructed:
        return f"reconstructed ({day.option_quotes or MINUTE})"
    return "synthetic" if run_source.startswith("synthetic") else "tape"


def print_report(result: BacktestResult, stats: Stats, out: TextIO, source: str = "tapes") -> None:
    """The header, statistics, exits by reason and the per-day table."""
    print(f"Backtest: {data_label(result, source)}", file=out)
    print(FILLS_NOTE, file=out)
    print(
        f"Trades {stats.trades} | win rate {_pct(stats.win_rate_pct)} ({stats.wins}W-{stats.losses}L)"
        f" | avg win {_money_or_na(stats.avg_win)} | avg loss {_money_or_na(stats.avg_loss)}"
        f" | expectancy {_money_or_na(stats.expectancy)}/trade",
        file=out,
    )
    print(
        f"Profit factor {_factor(stats.profit_factor)} | max drawdown {money(-stats.max_drawdown)}"
        f" | total P&L {money(stats.total_pnl)}",
        file=out,
    )
    exits = ", ".join(f"{reason} {n}" for reason, n in stats.exits_by_reason.items()) or "none"
    print(f"Exits: {exits}", file=out)
    for day in result.days:
        if day.open_at_end:
            print(
                f"Note: {day.session_date} ends with {day.open_at_end} still open (the tape stops before the"
                " time stop); the journal carries it into the next day.",
                file=out,
            )
    print(f"\n{'date':<12}{'trades':>7}{'W-L':>7}{'P&L':>12}{'cumulative':>13}  source", file=out)
    for row, day in zip(day_rows(result.days), result.days, strict=True):
        print(
            f"{row.session_date:<12}{row.trades:>7}{f'{row.wins}-{row.losses}':>7}"
            f"{money(row.pnl):>12}{money(row.cumulative):>13}  {day_source(day, source)}",
            file=out,
        )


def stats_json(stats: Stats) -> dict[str, Any]:
    values = asdict(stats)
    values["profit_factor"] = _json_factor(stats.profit_factor)
    return values


def summary_json(
    result: BacktestResult, stats: Stats, overrides: Mapping[str, str], source: str = "tapes"
) -> dict[str, Any]:
    """Everything `summary.json` holds."""
    return {
        "fills": FILLS_NOTE,
        "entry_fill": "ask",
        "exit_fill": "bid",
        "data": data_label(result, source),
        "reconstructed": bool(result.reconstructed_days),
        "reconstructed_days": list(result.reconstructed_days),
        "minute_bar_approximation": bool(result.minute_days),
        "overrides": dict(overrides),
        "rules": {name.upper(): _plain(value) for name, value in asdict(result.rules).items()},
        "stats": stats_json(stats),
        "blocked_signal_bars": blocked_totals(result.days),
        "days": [
            asdict(row) | _day_extra(day) | {"source": day_source(day, source)}
            for row, day in zip(day_rows(result.days), result.days, strict=True)
        ],
    }


def _day_extra(day: DayResult) -> dict[str, Any]:
    return {
        "tape": day.tape,
        "bars": day.bars,
        "chains": day.chains,
        "bad_lines": day.bad_lines,
        "open_at_end": day.open_at_end,
    }


def _plain(value: object) -> object:
    """Rule values as JSON: times as HH:MM:SS, tuples as lists."""
    if isinstance(value, datetime.time):
        return value.isoformat()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


TRADE_COLUMNS = (
    "trade_id",
    "session_date",
    "ticker",
    "contracts",
    "entry_time",
    "exit_time",
    "entry_price",
    "exit_price",
    "peak",
    "reason",
    "pnl_dollars",
    "pnl_percent",
    "entry_ms",
    "exit_ms",
    "reconstructed",
)


def write_trades_csv(path: Path, result: BacktestResult) -> None:
    """Every trade with New York entry and exit times; entry is the ask, exit the bid."""
    rebuilt = set(result.reconstructed_days)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(TRADE_COLUMNS)
        for t in result.trades:
            writer.writerow(
                [
                    t.trade_id,
                    t.session_date,
                    t.ticker,
                    t.contracts,
                    ny_datetime(t.entry_ms).isoformat(timespec="seconds"),
                    ny_datetime(t.exit_ms).isoformat(timespec="seconds"),
                    f"{t.entry_price:.2f}",
                    f"{t.exit_price:.2f}",
                    f"{t.peak:.4f}",
                    t.reason,
                    f"{t.pnl_dollars:.2f}",
                    f"{t.pnl_percent:.2f}",
                    t.entry_ms,
                    t.exit_ms,
                    int(t.session_date in rebuilt),
                ]
            )


def write_report(
    out_dir: Path,
    result: BacktestResult,
    overrides: Mapping[str, str],
    *,
    charts: bool = True,
    source: str = "tapes",
    progress_stream: TextIO | None = None,
    split: Split | None = None,
) -> Stats:
    """trades.csv, summary.json, equity.png and day-YYYY-MM-DD.png per day in `out_dir`.

    With a holdout `split`, summary.json also holds the in-sample and out-of-sample statistics.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = compute_stats(result.trades)
    write_trades_csv(out_dir / "trades.csv", result)
    summary = summary_json(result, stats, overrides, source)
    if split is not None:
        inside, outside = split_stats(result, split)
        summary["holdout"] = {
            "in_sample_days": list(split.in_sample),
            "held_out_days": list(split.held_out),
            "in_sample": stats_json(inside),
            "out_of_sample": stats_json(outside),
        }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if charts:
        equity_chart(out_dir / "equity.png", result.trades, reconstructed=bool(result.reconstructed_days))
        progress = Progress("charts", len(result.days), stream=progress_stream)
        used: set[str] = set()
        for day in result.days:
            name = _unique(f"day-{day.session_date or 'unknown'}", used)
            day_chart(out_dir / f"{name}.png", day, result.rules)
            progress.step(day.session_date)
        progress.close()
    return stats


def split_stats(result: BacktestResult, split: Split) -> tuple[Stats, Stats]:
    """A single run's statistics on its in-sample and held-out days (a trade belongs to its entry day)."""
    held = set(split.held_out)
    inside = [t for t in result.trades if t.session_date not in held]
    return compute_stats(inside), compute_stats([t for t in result.trades if t.session_date in held])


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


def print_sweep(results: Sequence[CellResult], out: TextIO, split: Split | None = None) -> None:
    """The ranked grid: best total P&L first, then profit factor.

    With a holdout `split` the grid is ranked on the in-sample days; two more columns give each cell's
    held-out trades and P&L, and the chosen cell (rank 1) follows with both parts side by side.
    """
    if not results:
        return
    names = [name for name, _ in results[0].params]
    head = "".join(f"{n:>{max(len(n), 8) + 2}}" for n in names)
    extra = f"  |{'OOS trades':>11}{'OOS P&L':>11}" if split else ""
    print(
        f"\n{'rank':>4}{head}{'trades':>8}{'win%':>8}{'PF':>7}{'max DD':>12}{'total P&L':>13}{extra}",
        file=out,
    )
    for rank, r in enumerate(results, start=1):
        cells = "".join(f"{v:>{max(len(n), 8) + 2}}" for n, v in r.params)
        s = r.stats
        held = ""
        if split and r.out_stats is not None:
            held = f"  |{r.out_stats.trades:>11}{money(r.out_stats.total_pnl):>11}"
        print(
            f"{rank:>4}{cells}{s.trades:>8}{_pct(s.win_rate_pct):>8}{_factor(s.profit_factor):>7}"
            f"{money(-s.max_drawdown):>12}{money(s.total_pnl):>13}{held}",
            file=out,
        )
    if split and results[0].out_stats is not None:
        print(file=out)
        print_held_out(split, out)
        chosen = " ".join(f"{n}={v}" for n, v in results[0].params)
        print(f"Chosen on the in-sample days only (rank 1): {chosen}", file=out)
        print_side_by_side(results[0].stats, results[0].out_stats, split, out)


SWEEP_STATS = ("trades", "wins", "win_rate_pct", "profit_factor", "max_drawdown", "total_pnl")


def _stats_columns(stats: Stats | None) -> list[object]:
    if stats is None:
        return [None] * len(SWEEP_STATS)
    return [
        _json_factor(stats.profit_factor) if n == "profit_factor" else getattr(stats, n) for n in SWEEP_STATS
    ]


def write_sweep(
    out_dir: Path,
    results: Sequence[CellResult],
    days: int,
    overrides: Mapping[str, str],
    split: Split | None = None,
) -> None:
    """sweep.csv (one row per cell, ranked) and sweep.json.

    With a holdout `split`, every statistic comes twice, `in_sample_*` (what the ranking used) and
    `out_of_sample_*`, and sweep.json names the held-out days and the chosen cell.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in results[0].params] if results else []
    stats_names = list(SWEEP_STATS)
    if split:
        stats_names = [f"in_sample_{n}" for n in SWEEP_STATS] + [f"out_of_sample_{n}" for n in SWEEP_STATS]
    with open(out_dir / "sweep.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", *names, *stats_names])
        for rank, r in enumerate(results, start=1):
            held = _stats_columns(r.out_stats) if split else []
            writer.writerow([rank, *(v for _, v in r.params), *_stats_columns(r.stats), *held])
    summary: dict[str, Any] = {"fills": FILLS_NOTE, "days": days, "overrides": dict(overrides)}
    if split:
        summary["holdout"] = {
            "in_sample_days": list(split.in_sample),
            "held_out_days": list(split.held_out),
            "ranked_on": "in_sample",
            "chosen": dict(results[0].params) if results else None,
        }
        summary["cells"] = [
            {
                "rank": i,
                "params": dict(r.params),
                "in_sample": stats_json(r.stats),
                "out_of_sample": stats_json(r.out_stats) if r.out_stats is not None else None,
            }
            for i, r in enumerate(results, start=1)
        ]
    else:
        summary["cells"] = [
            {"rank": i, "params": dict(r.params), "stats": stats_json(r.stats)}
            for i, r in enumerate(results, start=1)
        ]
    (out_dir / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


EXAMPLES = """examples:
  python backtest.py data/tapes/
  python backtest.py --synthetic 20 --seed 3 --set STOP_LOSS_PERCENT=10
  python backtest.py data/tapes/ --sweep MAX_GIVEBACK_PERCENT=20,30,40 --sweep STOP_LOSS_PERCENT=10,15,20
  python backtest.py --fetch 2025-10-02 --to 2025-10-31

Synthetic tapes are kept under DATA_DIR/synthetic/vM/seed-S/ (M: the market model's version),
reconstructed ones under DATA_DIR/history/ (raw REST answers under DATA_DIR/cache/DATE/, so an
interrupted --fetch resumes). Every tape run is decoded once into DATA_DIR/decoded/ (about 15 MB per
full day), which re-runs and sweeps read instead."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python backtest.py",
        description="Run the live decision path over many session days; print statistics and write a report. "
        + FILLS_NOTE,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("tapes", nargs="*", type=Path, help="tapes (.jsonl.gz) or folders of tapes")
    parser.add_argument("--synthetic", type=int, metavar="N", help="N seeded synthetic sessions (6.5 h each)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic days (default 1)")
    parser.add_argument(
        "--fetch",
        type=datetime.date.fromisoformat,
        metavar="DATE",
        help="rebuild past sessions from Polygon REST (needs POLYGON_API_KEY), then run them",
    )
    parser.add_argument("--to", type=datetime.date.fromisoformat, metavar="DATE", help="last day of --fetch")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a rule by its environment name (repeatable), e.g. STOP_LOSS_PERCENT=10",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="run every combination of the swept rules (repeatable); ranked by total P&L",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes for sweeps and for building synthetic days (default: every core)",
    )
    parser.add_argument(
        "--holdout",
        type=parse_holdout,
        metavar="K",
        help="keep the last K days (or a fraction of them, e.g. 0.25) out of sample: a sweep ranks its cells"
        " on the other days only and reports the chosen cell on both; a single run reports both parts",
    )
    parser.add_argument("--out", type=Path, default=Path("report"), help="report folder (default ./report)")
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="decode every tape afresh; read and write nothing in DATA_DIR/decoded",
    )
    args = parser.parse_args(list(argv))
    sources = sum([bool(args.tapes), args.synthetic is not None, args.fetch is not None])
    if sources != 1:
        parser.error("give exactly one of: TAPES..., --synthetic N, --fetch DATE")
    if args.synthetic is not None and args.synthetic < 1:
        parser.error("--synthetic needs N >= 1")
    if args.to is not None and args.fetch is None:
        parser.error("--to goes with --fetch")
    return args


@dataclass(frozen=True, slots=True)
class Io:
    """Where the CLI reads its environment and writes; injected so tests need no patching."""

    out: TextIO
    err: TextIO
    environ: Mapping[str, str] | None = None
    env_file: str | Path | None = ".env"
    sleep: Callable[[float], None] = time.sleep
    transport: Any = None


def main(argv: Sequence[str] | None = None, io: Io | None = None) -> int:
    """The CLI; returns the exit status (2 for bad arguments or settings)."""
    io = io or Io(sys.stdout, sys.stderr)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = parse_assignments(args.set)
        axes = parse_sweep(args.sweep)
        settings = resolve_settings(overrides, environ=io.environ, env_file=io.env_file)
        cells = sweep_cells(axes, overrides, environ=io.environ, env_file=io.env_file) if axes else []
    except ConfigError as exc:
        _print_problems("Settings problems (nothing run):", exc.problems, io.err)
        return EXIT_USAGE
    if args.synthetic is not None and holdout_problem(args.holdout, args.synthetic, io.err):
        return EXIT_USAGE
    tapes = collect_tapes(args, settings, io)
    if tapes is None:
        return EXIT_USAGE
    if not tapes and args.fetch is not None:
        print("No session could be rebuilt; see the messages above.", file=io.err)
        return EXIT_FAILED
    problems = check_distinct_days(tapes)
    if problems or not tapes:
        _print_problems("Tape problems (nothing run):", problems or ["no tapes to run"], io.err)
        return EXIT_USAGE
    if holdout_problem(args.holdout, len(tapes), io.err):
        return EXIT_USAGE
    split = holdout_split(args.holdout, tapes)
    if cells:
        return run_sweep_command(tapes, cells, settings, overrides, args, io, split)
    return run_single_command(tapes, settings, overrides, args, io, split)


def holdout_problem(holdout: Holdout | None, days: int, err: TextIO) -> bool:
    """Say so (and return True) when `--holdout` would leave no day in sample."""
    if holdout is None:
        return False
    try:
        holdout.days(days)
    except ValueError as exc:
        print(f"Holdout problem (nothing run): {exc}", file=err)
        return True
    return False


def holdout_split(holdout: Holdout | None, tapes: Sequence[Path]) -> Split | None:
    """The in-sample and held-out session dates of the tapes (None without --holdout)."""
    if holdout is None:
        return None
    dates = [str(tape_date(Path(tape))) for tape in tapes]
    return split_dates(dates, holdout.days(len(tapes)))


def decode_in_pool(tapes: Sequence[Path], rules: Rules, cache_dir: Path, workers: int, err: TextIO) -> None:
    """Decode the tapes not yet cached on every core, so the (sequential) run only reads the cache."""
    missing = [t for t in tapes if not cache_path(Path(t), rules, cache_dir).is_file()]
    if len(missing) < 2:
        return
    progress = Progress("decoding tapes", len(missing), stream=err)
    with ProcessPoolExecutor(max_workers=workers, initializer=use_batch_gc) as pool:
        futures = {pool.submit(ensure_decoded, Path(t), rules, cache_dir): t for t in missing}
        for future in as_completed(futures):
            future.result()
            progress.step(Path(futures[future]).name)
    progress.close()


def decoded_dir(settings: Settings, args: argparse.Namespace) -> Path | None:
    """Where decoded tapes are cached (None with --no-cache)."""
    return None if args.no_cache else Path(settings.data_dir) / "decoded"


def _print_problems(title: str, problems: Sequence[str], err: TextIO) -> None:
    print(title, file=err)
    for problem in problems:
        print(f"  - {problem}", file=err)


def collect_tapes(args: argparse.Namespace, settings: Settings, io: Io) -> list[Path] | None:
    """The tapes the command runs over, building synthetic or reconstructed ones first."""
    if args.synthetic is not None:
        calendar = MarketCalendar(settings.rules, settings.market_closed_dates)
        days = synthetic_dates(args.synthetic, calendar)
        folder = synthetic_folder(Path(settings.data_dir), args.seed)
        progress = Progress("synthetic days", args.synthetic, stream=io.err)
        tapes = build_synthetic_tapes(days, args.seed, folder, workers=args.workers, progress=progress)
        progress.close()
        return tapes
    if args.fetch is not None:
        if not settings.polygon_api_key:
            print(
                "--fetch needs POLYGON_API_KEY (or MASSIVE_API_KEY) in the environment or .env", file=io.err
            )
            return None
        last = args.to or args.fetch
        return fetch_history(
            settings,
            args.fetch,
            last,
            sleep=io.sleep,
            transport=io.transport,
            progress_stream=io.err,
            out=io.out,
        )
    return expand_tapes(args.tapes)


def source_of(args: argparse.Namespace) -> str:
    """The kind of days the command runs over, for the report header."""
    if args.synthetic is not None:
        return f"synthetic sessions (seed {args.seed})"
    if args.fetch is not None:
        return "Polygon history"
    return "tapes"


def expand_tapes(paths: Iterable[Path]) -> list[Path]:
    """Files as given; folders as their `*.jsonl.gz` in name (date) order."""
    tapes: list[Path] = []
    for path in paths:
        tapes += sorted(Path(path).glob("*.jsonl.gz")) if Path(path).is_dir() else [Path(path)]
    return tapes


def run_single_command(
    tapes: Sequence[Path],
    settings: Settings,
    overrides: Mapping[str, str],
    args: argparse.Namespace,
    io: Io,
    split: Split | None = None,
) -> int:
    cache_dir = decoded_dir(settings, args)
    if cache_dir is not None and args.workers > 1:
        decode_in_pool(tapes, settings.rules, cache_dir, args.workers, io.err)
    progress = Progress("days", len(tapes), stream=io.err)
    result = run_backtest(
        tapes,
        settings.rules,
        closed_dates=settings.market_closed_dates,
        progress=progress,
        cache_dir=cache_dir,
    )
    progress.close()
    source = source_of(args)
    charts = not args.no_charts
    stats = write_report(
        args.out, result, overrides, charts=charts, source=source, progress_stream=io.err, split=split
    )
    print_report(result, stats, io.out, source)
    if split is not None:
        inside, outside = split_stats(result, split)
        print(file=io.out)
        print_held_out(split, io.out)
        print_side_by_side(inside, outside, split, io.out)
    print(
        f"\nReport: {args.out}/ (trades.csv, summary.json{', charts' if not args.no_charts else ''})",
        file=io.out,
    )
    return EXIT_OK


def run_sweep_command(
    tapes: Sequence[Path],
    cells: Sequence[Cell],
    settings: Settings,
    overrides: Mapping[str, str],
    args: argparse.Namespace,
    io: Io,
    split: Split | None = None,
) -> int:
    progress = Progress("sweep days", len(tapes), stream=io.err)
    results = run_sweep(
        tapes,
        cells,
        workers=args.workers,
        closed_dates=settings.market_closed_dates,
        progress=progress,
        cache_dir=decoded_dir(settings, args),
        held_out=len(split.held_out) if split else 0,
    )
    progress.close()
    print(f"Sweep: {len(cells)} cells x {len(tapes)} day(s). {FILLS_NOTE}", file=io.out)
    if split:
        print(
            f"Ranked on the {len(split.in_sample)} in-sample day(s) only; OOS = the {len(split.held_out)}"
            " held-out day(s), each cell run over them alone.",
            file=io.out,
        )
    print_sweep(results, io.out, split)
    write_sweep(args.out, results, len(tapes), overrides, split)
    print(f"\nReport: {args.out}/ (sweep.csv, sweep.json)", file=io.out)
    return EXIT_OK


if __name__ == "__main__":
    from logs import configure_logging

    configure_logging("WARNING", "console")
    use_batch_gc()
    sys.exit(main())
