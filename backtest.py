"""Backtests: many session tapes through the live decision path, then statistics, a report and charts.

    python backtest.py TAPES...                  recorded (or reconstructed) tapes, files or folders
    python backtest.py --synthetic N [--seed S]  N seeded synthetic sessions
    python backtest.py --fetch FROM [--to TO]    rebuild past sessions from Polygon REST, then test them

Each day gets a fresh `Engine` fed by the same `Pipeline` and `FeedDecoder` as the live daemon and
`--replay`; one in-memory journal spans the run, so the lifetime P&L accumulates from day to day.
Fills are the live alerts' prices: entry at the ask, exit at the bid.

`--sweep NAME=V1,V2` (repeatable) runs the grid of rule variants over every day in a process pool.
A cell runs exactly what a single run with those settings runs, so its trades are identical.

`--fetch` reconstructs what the daemon would have recorded: IWM and SPY 1-second aggregates become
WebSocket `A` frames, and the day's 0DTE calls' minute aggregates become chain snapshot bodies
every CHAIN_POLL_SECONDS. Options history has no quotes, so quotes are modelled (see `SpreadModel`);
such tapes say `"reconstructed": true` in their meta line and every report built on them says so.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import datetime
import gzip
import hashlib
import heapq
import itertools
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlsplit

from alert_text import money
from config import ConfigError, Rules, Settings, load_settings
from contract_selector import SECONDS_PER_YEAR, bs_call_delta, implied_vol
from engine import Engine, SessionSource
from events import Alert, Log
from feed import FeedDecoder
from market_calendar import MarketCalendar, Session, ny_date, ny_datetime
from pipeline import Pipeline
from pnl_tracker import Journal, TradeRow
from polygon_client import PolygonRest
from replay import received_from
from tape import TapeReader, TapeWriter

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FILLS_NOTE = (
    "Fills as live: entry at the ask, exit at the bid (the prices the alerts quote); "
    "P&L = (exit - entry) x 100 x CONTRACTS, rounded to cents."
)
RECONSTRUCTED_NOTE = (
    "reconstructed from Polygon REST history: 1-second stock bars, option MINUTE bars with modelled quotes "
    "(approximate)"
)
SAMPLE_EVERY_MS = 10_000
RULE_NAMES = tuple(f.name.upper() for f in fields(Rules))

SYNTHETIC_FIRST_DAY = datetime.date(2025, 1, 2)

# Chart sizes in pixels (width, height) at CHART_DPI; the PNGs come out exactly this size.
CHART_DPI = 100
EQUITY_PX = (1000, 400)
DAY_PX = (1200, 700)

# History reconstruction (see the module doc and README).
HISTORY_DIR = "history"
CACHE_DIR = "cache"
CONNECT_BEFORE_OPEN_MS = 5 * 60_000
BAR_LATENCY_MS = 250
CHAIN_LATENCY_MS = 300
NEXT_PAGE_LATENCY_MS = 60
STRIKE_WINDOW = 15.0
CHAIN_PAGE_LIMIT = 250
QUOTE_LOOKBACK_MS = 5 * 60_000
RECONSTRUCTED_OPEN_INTEREST = 10_000
MAX_PAGES = 200
FETCH_MAX_ATTEMPTS = 8
FETCH_RETRY_CAP_S = 120.0
# A rejected key or plan cannot succeed on a later day; a 429 that outlasted the retries would only repeat.
STOP_STATUSES = frozenset({401, 403, 429})


@dataclass(frozen=True, slots=True)
class PricePoint:
    """IWM's close and rolling VWAP as the engine saw them after a bar (downsampled)."""

    t_ms: int
    close: float
    vwap: float


@dataclass(frozen=True, slots=True)
class MarkPoint:
    """The held option's mark whenever it changed."""

    t_ms: int
    trade_id: str
    mark: float


@dataclass(frozen=True, slots=True)
class Level:
    """IWM's last close at the moment a trade opened or closed, for chart markers."""

    trade_id: str
    kind: str  # "entry" | "exit"
    t_ms: int
    close: float


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
    params: tuple[tuple[str, str], ...]
    trades: tuple[TradeRow, ...]
    stats: Stats


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
) -> DayResult:
    """Replay one tape through a fresh engine, as `replay_tape` does, writing decisions to `journal`.

    The journal's state (lifetime, an open position of an earlier day) is adopted at the first line, as
    a replay adopts it. With `sample_every_ms` the chart series are recorded as well.
    """
    engine = Engine(rules, calendar)
    alerts: list[Alert] = []
    blocked: Counter[str] = Counter()
    pipeline = Pipeline(
        engine,
        journal,
        FeedDecoder.for_rules(rules),
        on_alerts=alerts.extend,
        on_log=lambda log: _count_blocked(blocked, log),
    )
    recorder = SeriesRecorder(sample_every_ms) if sample_every_ms else None
    reader = TapeReader(tape, lazy_bodies=True)
    known = {t.trade_id for t in journal.trades()}
    first_t: int | None = None
    for line in reader:
        if first_t is None:
            first_t = line.t
            session_date = ny_date(line.t).isoformat()
            engine.restore(journal.restored_state(session_date), session_date)
        item = received_from(line)
        if item is None:
            continue
        pipeline.handle(item)
        if recorder is not None:
            recorder.observe(engine)
    return DayResult(
        tape=str(tape),
        session_date=ny_date(first_t).isoformat() if first_t is not None else "",
        reconstructed=bool((reader.meta or {}).get("reconstructed")),
        trades=tuple(t for t in journal.trades() if t.trade_id not in known),
        alerts=tuple(alerts),
        blocked=tuple(sorted(blocked.items())),
        bars=engine.counters.bars,
        chains=engine.counters.chains,
        bad_lines=reader.bad_lines,
        open_at_end=engine.position.trade_id if engine.position is not None else None,
        prices=tuple(recorder.prices) if recorder else (),
        marks=tuple(recorder.marks) if recorder else (),
        levels=tuple(recorder.levels) if recorder else (),
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
) -> BacktestResult:
    """Run the days in order, one fresh engine each, one journal for the run."""
    calendar = calendar or MarketCalendar(rules, closed_dates)
    journal = Journal(Path(":memory:"))
    try:
        days = []
        for tape in tapes:
            day = run_day(Path(tape), rules, calendar, journal, sample_every_ms=sample_every_ms)
            days.append(day)
            if progress is not None:
                progress.step(f"{day.session_date} {len(day.trades)} trades {money(day.pnl)}")
        trades = tuple(journal.trades())
    finally:
        journal.close()
    return BacktestResult(rules, tuple(days), trades)


def equity_curve(trades: Sequence[TradeRow]) -> list[float]:
    """Cumulative closed-trade P&L after each trade (in the order given)."""
    equity, total = [], 0.0
    for trade in trades:
        total = round(total + trade.pnl_dollars, 2)
        equity.append(total)
    return equity


def max_drawdown(equity: Sequence[float]) -> float:
    """Largest fall from a running peak of the equity curve, which starts at 0 before the first trade."""
    peak, worst = 0.0, 0.0
    for value in equity:
        peak = max(peak, value)
        worst = max(worst, peak - value)
    return round(worst, 2)


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


def run_cell(tapes: Sequence[Path], cell: Cell, closed_dates: tuple[datetime.date, ...] = ()) -> CellResult:
    """One sweep cell: exactly a single run with the cell's rules, without the chart series."""
    result = run_backtest(tapes, cell.rules, closed_dates=closed_dates, sample_every_ms=None)
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
) -> list[CellResult]:
    """Every cell over every day in a process pool; results ranked by `rank_key` (stable for ties)."""
    order = {cell.params: i for i, cell in enumerate(cells)}
    results: list[CellResult] = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(run_cell, list(tapes), cell, closed_dates) for cell in cells]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            if progress is not None:
                progress.step(" ".join(f"{n}={v}" for n, v in result.params))
    return sorted(results, key=lambda r: (*rank_key(r), order[r.params]))


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


def build_synthetic_tape(day: datetime.date, seed: int, folder: Path) -> Path:
    """The tape of one synthetic day (`random_script`), built once: an existing tape is reused."""
    from sim.market import SyntheticMarket, random_script, write_tape  # only synthetic runs need the model

    path = Path(folder) / f"{day.isoformat()}.jsonl.gz"
    if path.is_file():
        return path
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    write_tape(SyntheticMarket(random_script(day, day_seed(seed, day))), partial)
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
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(build_synthetic_tape, d, seed, Path(folder)): d for d in missing}
            for future in as_completed(futures):
                future.result()
                if progress is not None:
                    progress.step(futures[future].isoformat())
    return [Path(folder) / f"{d.isoformat()}.jsonl.gz" for d in days]


class FetchError(RuntimeError):
    """A history request failed for good (after the client's retries)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """One REST answer as fetched (same fields as `polygon_client.RestAnswer`)."""

    path: str
    status: int
    body: object


@dataclass(frozen=True, slots=True)
class SpreadModel:
    """Modelled quote around a minute bar's close: half-spread = max(`min_half`, `percent`% of the close).

    The close is the mid. Options history has trades, not quotes, so this is an assumption; the
    default is at least a penny wide, as IWM 0DTE markets near the money are.
    """

    min_half: float = 0.005
    percent: float = 1.0

    def quote(self, close: float) -> tuple[float, float]:
        """(bid, ask); the bid is 0 when the half-spread would take it to or below zero."""
        half = max(self.min_half, close * self.percent / 100)
        bid = round(close - half, 4)
        return (bid if bid > 0 else 0.0), round(close + half, 4)

    def describe(self) -> str:
        return f"half-spread = max(${self.min_half:g}, {self.percent:g}% of price) around the minute close"


def _next_path(body: object) -> str | None:
    """A page's `next_url` as path and query, to be asked of our own base URL."""
    url = body.get("next_url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url:
        return None
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


class RestGet(Protocol):
    """What the history client needs of `polygon_client.PolygonRest`."""

    def get(self, path_and_query: str) -> Any: ...


class HistoryClient:
    """Paged GETs through `PolygonRest` (which retries 429 honouring Retry-After, and 5xx), cached per path.

    A cached request is never asked again, so an interrupted fetch resumes where it stopped.
    """

    def __init__(self, rest: RestGet, cache_dir: Path) -> None:
        self._rest = rest
        self._cache_dir = Path(cache_dir)

    def pages(self, path: str) -> list[CachedAnswer]:
        """Every page of `path` (following next_url); FetchError when any page is not 200."""
        cached = self._load(path)
        if cached is not None:
            return cached
        answers: list[CachedAnswer] = []
        next_path: str | None = path
        while next_path is not None:
            if len(answers) >= MAX_PAGES:
                raise FetchError(f"{path}: more than {MAX_PAGES} pages")
            answer = self._rest.get(next_path)
            if answer.status != 200:
                raise FetchError(
                    f"{answer.path}: HTTP {answer.status} {_error_of(answer.body)}", answer.status
                )
            answers.append(CachedAnswer(answer.path, answer.status, answer.body))
            next_path = _next_path(answer.body)
        self._save(path, answers)
        return answers

    def _file(self, path: str) -> Path:
        return self._cache_dir / f"{hashlib.sha256(path.encode()).hexdigest()[:24]}.json.gz"

    def _load(self, path: str) -> list[CachedAnswer] | None:
        file = self._file(path)
        if not file.is_file():
            return None
        try:
            with gzip.open(file, "rt", encoding="utf-8") as handle:
                stored = json.load(handle)
        except (OSError, ValueError):
            return None  # a damaged cache entry is fetched again
        return [CachedAnswer(a["path"], a["status"], a["body"]) for a in stored["answers"]]

    def _save(self, path: str, answers: list[CachedAnswer]) -> None:
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        file = self._file(path)
        partial = file.with_name(file.name + ".partial")
        # Level 1: a day's second bars are megabytes of JSON; speed matters more than the last few MB.
        with gzip.open(partial, "wt", encoding="utf-8", compresslevel=1) as handle:
            json.dump({"path": path, "answers": [asdict(a) for a in answers]}, handle)
        os.replace(partial, file)


def _error_of(body: object) -> str:
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or "")[:200]
    return str(body or "")[:200]


def aggs_path(sym: str, multiplier: int, span: str, from_: str, to: str) -> str:
    """The aggregates request exactly as `PolygonRest.aggs` (and so the live daemon) writes it."""
    return f"/v2/aggs/ticker/{sym}/range/{multiplier}/{span}/{from_}/{to}?adjusted=true&sort=asc&limit=50000"


def contracts_path(underlying: str, day: datetime.date) -> str:
    return (
        f"/v3/reference/options/contracts?underlying_ticker={underlying}&expiration_date={day.isoformat()}"
        "&contract_type=call&expired=true&limit=1000"
    )


def profile_path(underlying: str, day: datetime.date, profile_days: int) -> str:
    """The volume-profile request the daemon makes at the start of `day` (see daemon._fetch_profile)."""
    start = day - datetime.timedelta(days=profile_days * 2 + 5)
    end = day - datetime.timedelta(days=1)
    return aggs_path(underlying, 1, "minute", start.isoformat(), end.isoformat())


def chain_query(day: datetime.date, spot: float | None) -> str:
    """The chain request's query as `PolygonRest.chain_pages` builds it from the last spot."""
    query = f"expiration_date={day.isoformat()}&contract_type=call&limit={CHAIN_PAGE_LIMIT}"
    if spot is not None:
        low = max(0, math.floor(spot - STRIKE_WINDOW))
        query += f"&strike_price.gte={low}&strike_price.lte={math.ceil(spot + STRIKE_WINDOW)}"
    return query


def results_of(answers: Iterable[CachedAnswer]) -> list[dict]:
    """All `results` objects of a paged answer."""
    rows: list[dict] = []
    for answer in answers:
        results = answer.body.get("results") if isinstance(answer.body, dict) else None
        if isinstance(results, list):
            rows.extend(r for r in results if isinstance(r, dict))
    return rows


def _number(x: object) -> bool:
    return type(x) in (int, float) and math.isfinite(x)  # type: ignore[arg-type]


def clean_bars(rows: Iterable[dict]) -> list[dict]:
    """Aggregate rows with usable t/o/h/l/c/v, sorted by start, one per start."""
    by_start = {}
    for row in rows:
        if type(row.get("t")) is int and all(_number(row.get(k)) for k in ("o", "h", "l", "c", "v")):
            by_start[row["t"]] = row
    return [by_start[t] for t in sorted(by_start)]


def a_events(sym: str, bars: Sequence[dict], open_ms: int) -> Iterator[dict]:
    """1-second aggregates as WebSocket `A` events, with `a` (running day VWAP) and `av` (running volume).

    Both run over every bar of the day given (pre-market included, as the vendor's day fields do).
    `op` (official open) is the open of the first bar at or after the open, once there is one.
    """
    official_open = next((b["o"] for b in bars if b["t"] >= open_ms), None)
    pv, volume = 0.0, 0
    for bar in bars:
        vw = bar["vw"] if _number(bar.get("vw")) else bar["c"]
        volume += bar["v"]
        pv += vw * bar["v"]
        event: dict[str, Any] = {"ev": "A", "sym": sym, "v": bar["v"], "av": volume}
        if official_open is not None and bar["t"] >= open_ms:
            event["op"] = official_open
        event |= {"vw": vw, "o": bar["o"], "c": bar["c"], "h": bar["h"], "l": bar["l"]}
        event["a"] = round(pv / volume, 4) if volume > 0 else bar["c"]
        if _number(bar.get("n")) and bar["n"] > 0:
            event["z"] = int(bar["v"] // bar["n"])
        event |= {"s": bar["t"], "e": bar["t"] + 1000}
        yield event


def bar_frames(
    streams: Sequence[tuple[str, Sequence[dict]]], session: Session, connect_ms: int
) -> list[tuple[int, list[dict]]]:
    """(receive ms, frame) per second from `connect_ms` to the close: both symbols' bars in one frame."""
    by_second: dict[int, list[dict]] = {}
    for sym, bars in streams:
        for event in a_events(sym, bars, session.open_ms):
            if connect_ms <= event["s"] < session.close_ms:
                by_second.setdefault(event["s"], []).append(event)
    return [(s + 1000 + BAR_LATENCY_MS, by_second[s]) for s in sorted(by_second)]


class SpotSeries:
    """The underlying's last close as the engine had it at an instant (bars count once received)."""

    def __init__(self, frames: Sequence[tuple[int, list[dict]]], underlying: str) -> None:
        self._times: list[int] = []
        self._closes: list[float] = []
        for t, frame in frames:
            for event in frame:
                if event["sym"] == underlying:
                    self._times.append(t)
                    self._closes.append(event["c"])

    def at(self, ms: int) -> float | None:
        i = bisect.bisect_right(self._times, ms) - 1
        return self._closes[i] if i >= 0 else None


class MinuteSeries:
    """One contract's minute bars with running day totals, looked up by what had completed at an instant."""

    def __init__(self, bars: Sequence[dict]) -> None:
        self.ends = [b["t"] + 60_000 for b in bars]
        self.bars = list(bars)
        self.volume: list[float] = []
        self.pv: list[float] = []
        self.high: list[float] = []
        self.low: list[float] = []
        self._ivs: dict[int, float | None] = {}
        volume = pv = 0.0
        high, low = -math.inf, math.inf
        for bar in bars:
            volume += bar["v"]
            pv += (bar["vw"] if _number(bar.get("vw")) else bar["c"]) * bar["v"]
            high, low = max(high, bar["h"]), min(low, bar["l"])
            self.volume.append(volume)
            self.pv.append(pv)
            self.high.append(high)
            self.low.append(low)

    def completed_at(self, ms: int) -> int | None:
        """Index of the newest bar that had ended by `ms` (no look-ahead), or None."""
        i = bisect.bisect_right(self.ends, ms) - 1
        return i if i >= 0 else None

    def implied_vol(self, i: int, strike: float, ctx: ChainContext) -> float | None:
        """The IV of bar `i`'s close, solved at the first snapshot that sees the bar (its spot, its T).

        The close stays the same until the next bar, so its IV is kept rather than re-solved with every
        snapshot's spot: a stale price should not make the volatility jitter (and it is 6x cheaper).
        """
        if i not in self._ivs:
            spot, years = ctx.spot, _years_left(ctx)
            unsolvable = spot is None or years <= 0
            self._ivs[i] = None if unsolvable else implied_vol(self.bars[i]["c"], spot, strike, years)
        return self._ivs[i]


@dataclass(frozen=True, slots=True)
class Contract:
    ticker: str
    strike: float
    expiry: str


def day_contracts(rows: Iterable[dict], day: datetime.date) -> list[Contract]:
    """Calls from the contracts reference that expire on `day`, sorted by ticker (the vendor's order)."""
    found = {}
    for row in rows:
        ticker, strike = row.get("ticker"), row.get("strike_price")
        if (
            isinstance(ticker, str)
            and _number(strike)
            and row.get("expiration_date") == day.isoformat()
            and str(row.get("contract_type", "call")).lower() == "call"
        ):
            found[ticker] = Contract(ticker, float(strike), day.isoformat())  # type: ignore[arg-type]
    return [found[t] for t in sorted(found)]


def _greeks(spot: float, strike: float, t_years: float, iv: float) -> dict[str, float]:
    """Black-Scholes (r = 0) delta, gamma, theta per calendar day and vega per vol point."""
    root_t = math.sqrt(t_years)
    d1 = (math.log(spot / strike) + 0.5 * iv * iv * t_years) / (iv * root_t)
    pdf = math.exp(-0.5 * d1 * d1) / math.sqrt(2 * math.pi)
    return {
        "delta": round(bs_call_delta(spot, strike, t_years, iv), 5),
        "gamma": round(pdf / (spot * iv * root_t), 5),
        "theta": round(-spot * pdf * iv / (2 * root_t) / 365, 5),
        "vega": round(spot * pdf * root_t / 100, 5),
    }


@dataclass(frozen=True, slots=True)
class ChainContext:
    """What every result of one reconstructed chain snapshot shares."""

    at_ms: int
    spot: float | None
    close_ms: int
    underlying: str
    spread: SpreadModel


def option_result(contract: Contract, series: MinuteSeries, ctx: ChainContext) -> dict[str, Any]:
    """One `/v3/snapshot/options/{underlying}` result from the newest completed minute bar (≤ 5 min old)."""
    details = {
        "contract_type": "call",
        "exercise_style": "american",
        "expiration_date": contract.expiry,
        "shares_per_contract": 100,
        "strike_price": contract.strike,
        "ticker": contract.ticker,
    }
    i = series.completed_at(ctx.at_ms)
    result: dict[str, Any] = {"day": _day_bar(series, i), "details": details, "greeks": {}}
    if i is not None and ctx.at_ms - series.ends[i] < QUOTE_LOOKBACK_MS:
        result |= _quote_fields(contract, series, i, ctx)
    result["open_interest"] = RECONSTRUCTED_OPEN_INTEREST
    if ctx.spot is not None:
        result["underlying_asset"] = {
            "last_updated": ctx.at_ms * 1_000_000,
            "price": ctx.spot,
            "ticker": ctx.underlying,
            "timeframe": "REAL-TIME",
        }
    return dict(sorted(result.items()))  # the vendor's (alphabetical) key order


def _quote_fields(contract: Contract, series: MinuteSeries, i: int, ctx: ChainContext) -> dict[str, Any]:
    """The modelled quote around bar `i`'s close (the mid), its size and, when solvable, IV and greeks."""
    close = series.bars[i]["c"]
    bid, ask = ctx.spread.quote(close)
    fields: dict[str, Any] = {"break_even_price": round(contract.strike + close, 4)}
    iv = series.implied_vol(i, contract.strike, ctx)
    if iv is not None and ctx.spot is not None and _years_left(ctx) > 0:
        fields["greeks"] = _greeks(ctx.spot, contract.strike, _years_left(ctx), iv)
        fields["implied_volatility"] = round(iv, 5)
    fields["last_quote"] = {
        "ask": ask,
        "ask_size": series.bars[i]["v"],
        "bid": bid,
        "bid_size": series.bars[i]["v"],
        "last_updated": ctx.at_ms * 1_000_000,
        "midpoint": close,
        "timeframe": "REAL-TIME",
    }
    return fields


def _years_left(ctx: ChainContext) -> float:
    return (ctx.close_ms - ctx.at_ms) / 1000 / SECONDS_PER_YEAR


def _day_bar(series: MinuteSeries, i: int | None) -> dict[str, Any]:
    """The contract's day so far; `{}` until it has traded, as the vendor sends."""
    if i is None or series.volume[i] <= 0:
        return {}
    return {
        "close": series.bars[i]["c"],
        "high": series.high[i],
        "last_updated": series.ends[i] * 1_000_000,
        "low": series.low[i],
        "open": series.bars[0]["o"],
        "volume": series.volume[i],
        "vwap": round(series.pv[i] / series.volume[i], 4),
    }


def chain_lines(
    ctx: ChainContext,
    day: datetime.date,
    contracts: Sequence[Contract],
    minutes: Mapping[str, MinuteSeries],
    base_url: str,
) -> list[tuple[int, str, Any]]:
    """The chain poll at `ctx.at_ms` as tape lines: page 1 at the live path, then each next_url's path."""
    query = chain_query(day, ctx.spot)
    first = f"/v3/snapshot/options/{ctx.underlying}?{query}"
    if ctx.spot is not None:
        low, high = max(0, math.floor(ctx.spot - STRIKE_WINDOW)), math.ceil(ctx.spot + STRIKE_WINDOW)
        contracts = [c for c in contracts if low <= c.strike <= high]
    results = [option_result(c, minutes[c.ticker], ctx) for c in contracts if c.ticker in minutes]
    chunks = [results[i : i + CHAIN_PAGE_LIMIT] for i in range(0, len(results), CHAIN_PAGE_LIMIT)] or [[]]
    lines, path, t = [], first, ctx.at_ms + CHAIN_LATENCY_MS
    for number, chunk in enumerate(chunks, start=1):
        body: dict[str, Any] = {"request_id": f"reconstructed-{ctx.at_ms}-{number}", "results": chunk}
        body["status"] = "OK"
        if number < len(chunks):
            body["next_url"] = f"{base_url.rstrip('/')}{first}&cursor=p{number + 1}"
        lines.append((t, "rest", (path, body)))
        path, t = f"{first}&cursor=p{number + 1}", t + NEXT_PAGE_LATENCY_MS
    return lines


@dataclass(frozen=True, slots=True)
class DayHistory:
    """The raw history of one session day, as fetched."""

    iwm: list[dict]
    spy: list[dict]
    profile: list[CachedAnswer]
    contracts: list[Contract]
    minutes: dict[str, list[dict]]


def fetch_day(
    client: HistoryClient, day: datetime.date, rules: Rules, *, strike_margin: float = STRIKE_WINDOW + 1
) -> DayHistory:
    """Every request one reconstructed day needs (each cached).

    Only calls whose strike the chain window can reach (the day's IWM range ± the window) have their
    minute bars fetched.
    """
    iso = day.isoformat()
    iwm = clean_bars(results_of(client.pages(aggs_path(rules.underlying, 1, "second", iso, iso))))
    if not iwm:
        raise FetchError(f"no {rules.underlying} 1-second bars for {iso}")
    spy = clean_bars(results_of(client.pages(aggs_path(rules.benchmark, 1, "second", iso, iso))))
    profile = client.pages(profile_path(rules.underlying, day, rules.volume_profile_days))
    contracts = day_contracts(results_of(client.pages(contracts_path(rules.underlying, day))), day)
    low, high = min(b["l"] for b in iwm) - strike_margin, max(b["h"] for b in iwm) + strike_margin
    reachable = [c for c in contracts if low <= c.strike <= high]
    minutes = {
        c.ticker: clean_bars(results_of(client.pages(aggs_path(c.ticker, 1, "minute", iso, iso))))
        for c in reachable
    }
    return DayHistory(iwm, spy, profile, reachable, minutes)


def reconstructed_lines(
    history: DayHistory,
    session: Session,
    rules: Rules,
    *,
    poll_ms: int,
    base_url: str,
    spread: SpreadModel,
) -> Iterator[tuple[int, str, Any]]:
    """Every line of the reconstructed tape, in receive-time order."""
    connect_ms = session.open_ms - CONNECT_BEFORE_OPEN_MS
    streams = ((rules.underlying, history.iwm), (rules.benchmark, history.spy))
    frames = bar_frames(streams, session, connect_ms)
    spot = SpotSeries(frames, rules.underlying)
    minutes = {ticker: MinuteSeries(bars) for ticker, bars in history.minutes.items()}
    profile = [(connect_ms, "rest", (a.path, a.body)) for a in history.profile]

    def chains() -> Iterator[tuple[int, str, Any]]:
        # The daemon polls from the moment it connects, five minutes before the open.
        for at_ms in range(connect_ms, session.close_ms, poll_ms):
            ctx = ChainContext(at_ms, spot.at(at_ms), session.close_ms, rules.underlying, spread)
            yield from chain_lines(ctx, session.date, history.contracts, minutes, base_url)

    ws = ((t, "ws", frame) for t, frame in frames)
    return heapq.merge(iter(profile), ws, chains(), key=lambda line: line[0])


def write_reconstructed_tape(
    path: Path,
    lines: Iterable[tuple[int, str, Any]],
    *,
    start_ms: int,
    rules: Rules,
    spread: SpreadModel,
) -> Path:
    """Write the lines as a tape labelled `"reconstructed": true`; atomic, so a tape that exists is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    meta = {
        "reconstructed": True,
        "source": "polygon-rest",
        "quotes": f"modelled: {spread.describe()}; sizes = the minute's volume; "
        f"open interest = {RECONSTRUCTED_OPEN_INTEREST} (unknown)",
    }
    with TapeWriter(
        partial, underlying=rules.underlying, benchmark=rules.benchmark, start_ms=start_ms, extra_meta=meta
    ) as writer:
        for t, kind, item in lines:
            if kind == "ws":
                writer.write_ws(t, item)
            else:
                rest_path, body = item
                writer.write_rest(t, rest_path, 200, body)
    os.replace(partial, path)
    return path


def history_tape_path(data_dir: Path, day: datetime.date) -> Path:
    """Reconstructed tapes live apart from live recordings, so retention pruning never deletes them."""
    return Path(data_dir) / HISTORY_DIR / f"{day.isoformat()}.jsonl.gz"


def session_days(calendar: MarketCalendar, first: datetime.date, last: datetime.date) -> list[Session]:
    """The sessions from `first` to `last` inclusive."""
    sessions, day = [], first
    while day <= last:
        session = calendar.session(day)
        if session is not None:
            sessions.append(session)
        day += datetime.timedelta(days=1)
    return sessions


def fetch_history(
    settings: Settings,
    first: datetime.date,
    last: datetime.date,
    *,
    sleep: Callable[[float], None] = time.sleep,
    transport: Any = None,
    spread: SpreadModel = SpreadModel(),  # noqa: B008 - frozen value
    progress_stream: TextIO | None = None,
    out: TextIO = sys.stdout,
) -> list[Path]:
    """Reconstructed tapes of every session in [first, last]: existing tapes are kept, the rest built.

    Returns the tapes that exist afterwards, in date order. A 401/403, or a 429 that outlasted the
    retries, stops the fetch; other failures skip the day. Cached answers are kept for the next attempt.
    """
    rules = settings.rules
    sessions = session_days(MarketCalendar(rules, settings.market_closed_dates), first, last)
    progress = Progress("fetch", len(sessions), stream=progress_stream)
    tapes = []
    with PolygonRest(
        settings.polygon_rest_url,
        settings.polygon_api_key,
        clock_ms=lambda: int(time.time() * 1000),
        transport=transport,
        sleep=sleep,
        max_attempts=FETCH_MAX_ATTEMPTS,
        retry_cap_s=FETCH_RETRY_CAP_S,
    ) as rest:
        for session in sessions:
            path = history_tape_path(settings.data_dir, session.date)
            failure = None if path.is_file() else _try_build(rest, settings, session, path, spread)
            if failure is not None:
                print(f"{session.date}: not rebuilt: {failure}", file=out)
            if path.is_file():
                tapes.append(path)
            progress.step(f"{session.date} {'failed' if failure else 'ok'}")
            if failure is not None and failure.status in STOP_STATUSES:
                break
    progress.close()
    return tapes


def _try_build(
    rest: RestGet, settings: Settings, session: Session, path: Path, spread: SpreadModel
) -> FetchError | None:
    try:
        build_history_day(rest, settings, session, path, spread)
    except FetchError as exc:
        return exc
    return None


def build_history_day(
    rest: RestGet, settings: Settings, session: Session, path: Path, spread: SpreadModel
) -> Path:
    """Fetch (or read from the cache) one day's history and write its reconstructed tape."""
    client = HistoryClient(rest, Path(settings.data_dir) / CACHE_DIR / session.date.isoformat())
    history = fetch_day(client, session.date, settings.rules)
    lines = reconstructed_lines(
        history,
        session,
        settings.rules,
        poll_ms=int(settings.chain_poll_seconds * 1000),
        base_url=settings.polygon_rest_url,
        spread=spread,
    )
    start_ms = session.open_ms - CONNECT_BEFORE_OPEN_MS
    return write_reconstructed_tape(path, lines, start_ms=start_ms, rules=settings.rules, spread=spread)


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
    return f"{label}; {rebuilt} {RECONSTRUCTED_NOTE}" if rebuilt else label


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
    for row in day_rows(result.days):
        source = "reconstructed" if row.reconstructed else "tape"
        print(
            f"{row.session_date:<12}{row.trades:>7}{f'{row.wins}-{row.losses}':>7}"
            f"{money(row.pnl):>12}{money(row.cumulative):>13}  {source}",
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
        "overrides": dict(overrides),
        "rules": {name.upper(): _plain(value) for name, value in asdict(result.rules).items()},
        "stats": stats_json(stats),
        "blocked_signal_bars": blocked_totals(result.days),
        "days": [
            asdict(row) | _day_extra(day) for row, day in zip(day_rows(result.days), result.days, strict=True)
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


def _figure(size_px: tuple[int, int]) -> Any:
    """A matplotlib Figure of exactly `size_px` at CHART_DPI, without pyplot's global state (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size_px[0] / CHART_DPI, size_px[1] / CHART_DPI), dpi=CHART_DPI)
    FigureCanvasAgg(figure)
    return figure


def equity_chart(path: Path, trades: Sequence[TradeRow], *, reconstructed: bool = False) -> Path:
    """The closed-trade equity curve (step per trade) with its drawdown shaded."""
    figure = _figure(EQUITY_PX)
    ax = figure.add_subplot(1, 1, 1)
    equity = [0.0, *equity_curve(trades)]
    x = list(range(len(equity)))
    peaks = list(itertools.accumulate(equity, max))
    ax.plot(x, equity, color="tab:blue", marker="o", markersize=3, linewidth=1.2, label="equity")
    ax.fill_between(x, equity, peaks, color="tab:red", alpha=0.25, label="drawdown")
    ax.axhline(0, color="grey", linewidth=0.8)
    note = " (reconstructed data)" if reconstructed else ""
    stats = compute_stats(trades)
    ax.set_title(
        _plain_text(
            f"Closed-trade equity{note}: {len(trades)} trades, total {money(stats.total_pnl)},"
            f" max drawdown {money(-stats.max_drawdown)}"
        )
    )
    ax.set_xlabel("trade #")
    ax.set_ylabel("P&L ($)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=CHART_DPI)
    return path


def _plain_text(text: str) -> str:
    """Escape dollar signs, which matplotlib would otherwise read as maths."""
    return text.replace("$", r"\$")


def _clock(ms: int) -> datetime.datetime:
    return ny_datetime(ms).replace(tzinfo=None)


def day_chart(path: Path, day: DayResult) -> Path:
    """IWM with its rolling VWAP and the entries/exits (top); each trade's option mark (bottom)."""
    from matplotlib.dates import DateFormatter

    figure = _figure(DAY_PX)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    times = [_clock(p.t_ms) for p in day.prices]
    top.plot(times, [p.close for p in day.prices], color="black", linewidth=0.8, label="IWM close")
    top.plot(times, [p.vwap for p in day.prices], color="tab:orange", linewidth=0.8, label="rolling VWAP")
    for kind, marker, color in (("entry", "^", "tab:green"), ("exit", "v", "tab:red")):
        levels = [lv for lv in day.levels if lv.kind == kind and math.isfinite(lv.close)]
        x, y = [_clock(lv.t_ms) for lv in levels], [lv.close for lv in levels]
        top.scatter(x, y, marker=marker, s=60, color=color, zorder=3, label=kind)
    _option_axis(bottom, day)
    label = " — reconstructed data" if day.reconstructed else ""
    top.set_title(_plain_text(f"{day.session_date}: {len(day.trades)} trade(s), P&L {money(day.pnl)}{label}"))
    top.set_ylabel("IWM ($)")
    top.legend(loc="upper left", fontsize="small")
    top.grid(alpha=0.3)
    bottom.xaxis.set_major_formatter(DateFormatter("%H:%M"))
    figure.tight_layout()
    figure.savefig(path, dpi=CHART_DPI)
    return path


def _option_axis(ax: Any, day: DayResult) -> None:
    for trade in day.trades:
        points = [m for m in day.marks if m.trade_id == trade.trade_id]
        if points:
            x, y = [_clock(m.t_ms) for m in points], [m.mark for m in points]
            ax.step(x, y, where="post", linewidth=1, label=f"{trade.trade_id} {trade.ticker} mark")
        ax.scatter([_clock(trade.entry_ms)], [trade.entry_price], marker="^", color="tab:green", zorder=3)
        ax.scatter([_clock(trade.exit_ms)], [trade.exit_price], marker="v", color="tab:red", zorder=3)
    if not day.trades:
        ax.text(0.5, 0.5, "no trades", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_ylabel("option mark ($)\n▲ ask in, ▼ bid out")
    ax.grid(alpha=0.3)
    if day.trades:
        ax.legend(loc="upper left", fontsize="small")


def write_report(
    out_dir: Path,
    result: BacktestResult,
    overrides: Mapping[str, str],
    *,
    charts: bool = True,
    source: str = "tapes",
    progress_stream: TextIO | None = None,
) -> Stats:
    """trades.csv, summary.json, equity.png and day-YYYY-MM-DD.png per day in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = compute_stats(result.trades)
    write_trades_csv(out_dir / "trades.csv", result)
    summary = summary_json(result, stats, overrides, source)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if charts:
        equity_chart(out_dir / "equity.png", result.trades, reconstructed=bool(result.reconstructed_days))
        progress = Progress("charts", len(result.days), stream=progress_stream)
        used: set[str] = set()
        for day in result.days:
            name = _unique(f"day-{day.session_date or 'unknown'}", used)
            day_chart(out_dir / f"{name}.png", day)
            progress.step(day.session_date)
        progress.close()
    return stats


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


def print_sweep(results: Sequence[CellResult], out: TextIO) -> None:
    """The ranked grid: best total P&L first, then profit factor."""
    if not results:
        return
    names = [name for name, _ in results[0].params]
    head = "".join(f"{n:>{max(len(n), 8) + 2}}" for n in names)
    print(f"\n{'rank':>4}{head}{'trades':>8}{'win%':>8}{'PF':>7}{'max DD':>12}{'total P&L':>13}", file=out)
    for rank, r in enumerate(results, start=1):
        cells = "".join(f"{v:>{max(len(n), 8) + 2}}" for n, v in r.params)
        s = r.stats
        print(
            f"{rank:>4}{cells}{s.trades:>8}{_pct(s.win_rate_pct):>8}{_factor(s.profit_factor):>7}"
            f"{money(-s.max_drawdown):>12}{money(s.total_pnl):>13}",
            file=out,
        )


def write_sweep(
    out_dir: Path, results: Sequence[CellResult], days: int, overrides: Mapping[str, str]
) -> None:
    """sweep.csv (one row per cell, ranked) and sweep.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [name for name, _ in results[0].params] if results else []
    columns = ["rank", *names, "trades", "wins", "win_rate_pct", "profit_factor", "max_drawdown", "total_pnl"]
    with open(out_dir / "sweep.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for rank, r in enumerate(results, start=1):
            s = r.stats
            params = [v for _, v in r.params]
            factor = _json_factor(s.profit_factor)
            writer.writerow(
                [rank, *params, s.trades, s.wins, s.win_rate_pct, factor, s.max_drawdown, s.total_pnl]
            )
    summary = {
        "fills": FILLS_NOTE,
        "days": days,
        "overrides": dict(overrides),
        "cells": [
            {"rank": i, "params": dict(r.params), "stats": stats_json(r.stats)}
            for i, r in enumerate(results, start=1)
        ],
    }
    (out_dir / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


EXAMPLES = """examples:
  python backtest.py data/tapes/
  python backtest.py --synthetic 20 --seed 3 --set STOP_LOSS_PERCENT=10
  python backtest.py data/tapes/ --sweep MAX_GIVEBACK_PERCENT=20,30,40 --sweep STOP_LOSS_PERCENT=10,15,20
  python backtest.py --fetch 2025-10-02 --to 2025-10-31

Synthetic tapes are kept under DATA_DIR/synthetic/seed-S/, reconstructed ones under DATA_DIR/history/
(raw REST answers under DATA_DIR/cache/DATE/, so an interrupted --fetch resumes)."""


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
    parser.add_argument("--out", type=Path, default=Path("report"), help="report folder (default ./report)")
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
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
    if cells:
        return run_sweep_command(tapes, cells, settings, overrides, args, io)
    return run_single_command(tapes, settings, overrides, args, io)


def _print_problems(title: str, problems: Sequence[str], err: TextIO) -> None:
    print(title, file=err)
    for problem in problems:
        print(f"  - {problem}", file=err)


def collect_tapes(args: argparse.Namespace, settings: Settings, io: Io) -> list[Path] | None:
    """The tapes the command runs over, building synthetic or reconstructed ones first."""
    if args.synthetic is not None:
        calendar = MarketCalendar(settings.rules, settings.market_closed_dates)
        days = synthetic_dates(args.synthetic, calendar)
        folder = Path(settings.data_dir) / "synthetic" / f"seed-{args.seed}"
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
    tapes: Sequence[Path], settings: Settings, overrides: Mapping[str, str], args: argparse.Namespace, io: Io
) -> int:
    progress = Progress("days", len(tapes), stream=io.err)
    result = run_backtest(tapes, settings.rules, closed_dates=settings.market_closed_dates, progress=progress)
    progress.close()
    source = source_of(args)
    charts = not args.no_charts
    stats = write_report(args.out, result, overrides, charts=charts, source=source, progress_stream=io.err)
    print_report(result, stats, io.out, source)
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
) -> int:
    progress = Progress("sweep cells", len(cells), stream=io.err)
    results = run_sweep(
        tapes, cells, workers=args.workers, closed_dates=settings.market_closed_dates, progress=progress
    )
    progress.close()
    print(f"Sweep: {len(cells)} cells x {len(tapes)} day(s). {FILLS_NOTE}", file=io.out)
    print_sweep(results, io.out)
    write_sweep(args.out, results, len(tapes), overrides)
    print(f"\nReport: {args.out}/ (sweep.csv, sweep.json)", file=io.out)
    return EXIT_OK


if __name__ == "__main__":
    from logs import configure_logging

    configure_logging("WARNING", "console")
    sys.exit(main())
