"""Sweeps: a grid of rule variants (cells) over every day, one task per day with all cells in one pass.

A cell's trades are those of a single run with its settings: the per-day results are joined when the days
are independent (`day_runner.day_is_independent`), and a cell whose days are not is re-run over all days in
order. With a holdout, each cell is ranked on the in-sample days alone.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

from backtest_report import Stats, compute_stats
from backtest_run import run_backtest
from config import ConfigError, Rules, Settings, load_settings
from day_runner import SweepDay, day_is_independent, run_cells_on_day
from dotenv_file import DotenvFile
from executors import DayExecutor, PoolDays
from pnl_tracker import TradeRow
from progress import Progress

RULE_NAMES = tuple(f.name.upper() for f in fields(Rules))


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


def parse_assignments(raw: Iterable[str], flag: str = "--set", form: str = "NAME=VALUE") -> dict[str, str]:
    """`NAME=VALUE` strings to a dict; raise ConfigError naming each malformed one, unknown rule or rule
    given twice (`--set X=1 --set X=2`: which was meant is the caller's to say, not the last one's)."""
    items = list(raw)
    repeated = _repeated_names(items)
    if repeated:
        raise ConfigError(
            [f"{flag} {name}: given {n} times; give each rule once ({form})" for name, n in repeated.items()]
        )
    values: dict[str, str] = {}
    problems = []
    for item in items:
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
    """`NAME=V1,V2,...` strings to axes (name, values), in the order given.

    A rule swept twice (`--sweep X=a,b --sweep X=c`) is refused, not merged: which list was meant is
    the caller's to say, and keeping either silently would run a grid other than the one asked for.
    """
    axes = []
    assigned = parse_assignments(raw, "--sweep", "with all its values: NAME=V1,V2,...")
    problems = []
    for name, values in assigned.items():
        choices = tuple(v.strip() for v in values.split(",") if v.strip())
        twice = sorted({v for v in choices if choices.count(v) > 1})
        if not choices:
            problems.append(f"--sweep {name}: no values")
        elif twice:
            # Each repeat ran the same cell again, and the report ranked it twice.
            problems.append(f"--sweep {name}: {', '.join(twice)} given more than once; give each value once")
        axes.append((name, choices))
    if problems:
        raise ConfigError(problems)
    return axes


def _repeated_names(items: Sequence[str]) -> dict[str, int]:
    """Rule names that more than one `NAME=...` item assigns, with how often (case as the parser folds it)."""
    counts = Counter(item.partition("=")[0].strip().upper() for item in items if "=" in item)
    return {name: n for name, n in counts.items() if n > 1}


def resolve_settings(
    overrides: Mapping[str, str],
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | DotenvFile | None = ".env",
) -> Settings:
    """The configured settings (`.env` and environment, as the daemon reads them) with rule overrides."""
    base = dict(os.environ if environ is None else environ)
    return load_settings(env_file, environ={**base, **overrides})


# The most cells one sweep runs: 400 cells over one tape took 85 s on 2 cores, and every cell builds its
# engine and journal for each day; an audit's 4 x 20 values (160,000 cells) sat silent for hours.
MAX_SWEEP_CELLS = 5_000


def sweep_cells(
    axes: Sequence[tuple[str, tuple[str, ...]]],
    overrides: Mapping[str, str],
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | DotenvFile | None = ".env",
) -> list[Cell]:
    """Every combination of the axes, each validated like a start-up; ConfigError lists every bad cell, or
    a rule both set and swept (the sweep's values replaced the --set one in every cell, without a word)."""
    names = [name for name, _ in axes]
    both = [name for name in names if name in overrides]
    if both:
        raise ConfigError(
            [f"{name}: both --set and --sweep give it; give it in one of them" for name in both]
        )
    size = math.prod(len(values) for _, values in axes)
    if size > MAX_SWEEP_CELLS:
        raise ConfigError(
            [
                f"--sweep makes {size:,} cells, over the {MAX_SWEEP_CELLS:,} one run takes (each cell runs every"
                " day; a grid this size would run for hours before its first line): sweep fewer values, or"
                " split the grid into several runs"
            ]
        )
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


def run_cell(
    tapes: Sequence[Path],
    cache_dir: Path | None,
    cell: Cell,
    closed_dates: tuple[datetime.date, ...] = (),
) -> CellResult:
    """One sweep cell run alone: exactly a single run with the cell's rules, without the chart series.

    A `DayExecutor` task: the tapes and the cache folder come first.
    """
    result = run_backtest(
        tapes, cell.rules, closed_dates=closed_dates, sample_every_ms=None, cache_dir=cache_dir
    )
    return CellResult(cell.params, result.trades, compute_stats(result.trades))


def cells_on_day(
    tape: Path, cache_dir: Path | None, rules: Sequence[Rules], closed_dates: tuple[datetime.date, ...]
) -> SweepDay:
    """`day_runner.run_cells_on_day` as a `DayExecutor` task (the tape and the cache folder first)."""
    return run_cells_on_day(tape, rules, closed_dates, cache_dir)


def rank_key(result: CellResult) -> tuple[float, float]:
    """Best first: total P&L, then profit factor (no trades ranks last)."""
    factor = result.stats.profit_factor
    return (-result.stats.total_pnl, -(factor if factor is not None else -1.0))


def run_sweep(
    tapes: Sequence[Path],
    cells: Sequence[Cell],
    *,
    workers: int = 1,
    closed_dates: tuple[datetime.date, ...] = (),
    progress: Progress | None = None,
    cache_dir: Path | None = None,
    held_out: int = 0,
    executor: DayExecutor | None = None,
    on_day: Callable[[SweepDay], None] | None = None,
) -> list[CellResult]:
    """Every cell over every day; results ranked by `rank_key` (stable for ties).

    One task per day runs all the cells over it in one pass (`day_runner.run_cells_on_day`). A cell
    whose days turn out not to be independent (a position left open overnight, a cooldown reaching
    into the next day) is re-run over all days in order, exactly as a single run.

    The tasks run on `executor` (which holds the same tapes, in order, and its own cache folder); without
    one, on a local pool of `workers` processes reading `cache_dir`, closed at the end.

    With `held_out` = K > 0 the last K tapes are out of sample: each cell is ranked on a run over the
    other days alone (its `trades`, `stats`), and gets a run over the held-out days alone (`out_trades`,
    `out_stats`), so nothing of a held-out day reaches the ranking. `on_day` is given each day's outcome,
    in tape order, once all are in (what its tape held: the report's warnings of damaged and part days).
    """
    if executor is None:
        with PoolDays(tapes, workers, cache_dir) as pool:
            return run_sweep(
                tapes,
                cells,
                closed_dates=closed_dates,
                progress=progress,
                held_out=held_out,
                executor=pool,
                on_day=on_day,
            )
    rules = [cell.rules for cell in cells]
    cut = len(tapes) - held_out
    days: list[SweepDay] = [SweepDay("", 0, ())] * len(tapes)
    for index, day in executor.each_day(cells_on_day, range(len(tapes)), rules, closed_dates):
        days[index] = day
        if progress is not None:
            progress.step(day.session_date)
    if on_day is not None:
        for day in days:
            on_day(day)
    inside = _cells_over(executor, days, range(cut), cells, closed_dates)
    outside = _cells_over(executor, days, range(cut, len(tapes)), cells, closed_dates) if held_out else []
    if outside:
        inside = [
            replace(r, out_trades=o.trades, out_stats=o.stats) for r, o in zip(inside, outside, strict=True)
        ]
    order = {cell.params: i for i, cell in enumerate(cells)}
    return sorted(inside, key=lambda r: (*rank_key(r), order[r.params]))


def _cells_over(
    executor: DayExecutor,
    days: Sequence[SweepDay],
    indices: range,
    cells: Sequence[Cell],
    closed_dates: tuple[datetime.date, ...],
) -> list[CellResult]:
    """Each cell over the days at `indices` as one run of those days alone, in cell order.

    Cells whose days depend on each other are re-run over those days, all at once on the executor.
    """
    chosen = [days[i] for i in indices]
    joined = [_joined_cell(chosen, index, cell) for index, cell in enumerate(cells)]
    dependent = [index for index, result in enumerate(joined) if result is None]
    reruns = executor.over_days(run_cell, indices, [(cells[i], closed_dates) for i in dependent])
    done = dict(zip(dependent, reruns, strict=True))
    return [result if result is not None else done[index] for index, result in enumerate(joined)]


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
