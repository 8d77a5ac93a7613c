"""Backtest statistics and reports: the printed tables, trades.csv, summary.json, charts, sweep.csv/json."""

from __future__ import annotations

import csv
import datetime
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from alert_text import money, quote_age_text
from backtest_run import BacktestResult, DayResult
from config import Rules
from history import MINUTE
from holdout import Split, print_held_out, print_side_by_side
from market_calendar import MarketCalendar, ny_datetime
from pnl_tracker import TradeRow
from progress import Progress
from report_charts import day_chart, equity_chart, equity_curve, max_drawdown

if TYPE_CHECKING:
    from day_runner import SweepDay, TapeFacts
    from sweep import CellResult

FILLS_NOTE = (
    "Fills as live: entry at the ask, exit at the bid (the prices the alerts quote); "
    "P&L = (exit - entry) x 100 x CONTRACTS, rounded to cents. No commission, fee or slippage is counted "
    "(at a typical $0.65 per contract a side, subtract $1.30 per contract per trade)."
)
RECONSTRUCTED_NOTE = (
    "reconstructed from Polygon REST history: 1-second stock bars, option quotes from the /v3/quotes NBBO "
    "(nbbo) or modelled around minute bars (minute)"
)
HOLDOUT_RULE = (
    "each part is a run of its days alone: a trade counts on the day it closed; a position open when the"
    " in-sample days end counts in neither part"
)
MINUTE_NOTE = "minute-bar approximation: option quotes modelled around minute closes, not real bids and asks"


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
        f" | expectancy {_money_or_na(stats.expectancy)}{'/trade' if stats.expectancy is not None else ''}",
        file=out,
    )
    print(
        f"Profit factor {_factor(stats.profit_factor)} | max drawdown {money(-stats.max_drawdown)}"
        f" | total P&L {money(stats.total_pnl)}",
        file=out,
    )
    exits = ", ".join(f"{reason} {n}" for reason, n in stats.exits_by_reason.items()) or "none"
    print(f"Exits: {exits}", file=out)
    check = entry_check_line(result, stats.total_pnl)
    if check:
        print(check, file=out)
    warnings = [*damaged_tape_warnings([day.facts for day in result.days]), *incomplete_day_warnings(result)]
    for warning in [*warnings, *old_quote_warnings(result.days)]:
        print(warning, file=out)
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


def entry_check_totals(result: BacktestResult) -> tuple[int, int, float]:
    """(entries checked, of those the ones whose contract's newest ask was dearer than the fill, the run's
    total P&L with each checked trade bought at that ask): see `entry_check`."""
    checks = {c.trade_id: c for day in result.days for c in day.entry_checks}
    total = sum(
        checks[t.trade_id].pnl_at_newest_ask if t.trade_id in checks else t.pnl_dollars for t in result.trades
    )
    return len(checks), sum(c.above_fill for c in checks.values()), round(total, 2)


def entry_check_line(result: BacktestResult, actual: float) -> str | None:
    """The report's line on how far the fills rest on the chain's older ask, beside the run's `actual` total
    P&L (None when nothing was compared)."""
    checked, dearer, total = entry_check_totals(result)
    if not checked:
        return None
    return (
        f"Entry check: {dearer} of {checked} BUYs fill below their contract's newest ask before the BUY (the "
        f"fill is the ask of the chain the selection used, as the alert quotes it); bought at those newest "
        f"asks, the total P&L would be {money(total)} instead of {money(actual)}."
    )


def damaged_tape_warnings(days: Sequence[TapeFacts]) -> list[str]:
    """One line per tape with unreadable lines (a gzip cut short, a torn member): such a day may end early.

    The run still counts it (exit status 0): its readable lines are real data, but its figures are
    not a whole day's, so the report says so where the numbers are read.
    """
    return [
        f"Warning: {Path(day.tape).name} ({day.session_date or 'no date'}) is damaged: {day.lines} line(s)"
        f" read, {day.bad_lines} unreadable; its last line is at {_ny_time(day.last_ms)}, so this day may"
        " be cut short."
        for day in days
        if day.bad_lines
    ]


# A whole tape records to the close; one whose last line is earlier than this before it lost the rest.
WHOLE_DAY_SLACK_MS = 5 * 60_000


def incomplete_day_warnings(result: BacktestResult) -> list[str]:
    """`part_day_warnings` of a backtest's days."""
    return part_day_warnings([day.facts for day in result.days], result.rules)


def part_day_warnings(days: Sequence[TapeFacts], rules: Rules) -> list[str]:
    """One line per readable tape that is not a whole trading day: it holds no option chain (no entry
    was possible, so its $0.00 is no result of the rules), or it stops well before the close (a
    recorder that died at noon leaves a tape that reads cleanly). Damaged tapes are said apart."""
    calendar = MarketCalendar(rules)
    warnings = []
    for day in days:
        name = f"{Path(day.tape).name} ({day.session_date or 'no date'})"
        if not day.trading_day:
            warnings.append(
                f"Warning: {name} is of a day with no session (a weekend, a holiday or a date in "
                "MARKET_CLOSED_DATES): no entry was possible, so its $0.00 is no result of the rules."
            )
            continue
        if day.bars and not day.chains:
            warnings.append(f"Warning: {name} holds no option chain: no entry was possible on this day.")
        session = calendar.session_at(day.last_ms) if day.last_ms else None
        if not day.bad_lines and session is not None and day.last_ms < session.close_ms - WHOLE_DAY_SLACK_MS:
            warnings.append(
                f"Warning: {name} stops at {_ny_time(day.last_ms)}, before the {_ny_time(session.close_ms)}"
                " close: this day's figures cover only what was recorded."
            )
        warnings += [
            f"Warning: {name} has no line from {_ny_time(start)} to {_ny_time(end)} ({(end - start) // 60_000}"
            " min) in session: what was decided after it rests on the prices from before it."
            for start, end in day.silences
        ]
    return warnings


def old_quote_warnings(days: Sequence[DayResult]) -> list[str]:
    """One line per exit booked at a bid no quote had renewed for long (the SELL alert's "Old price"):
    the tape lost the contract's quotes, so the exit price and the P&L are estimates."""
    return [
        f"Warning: trade {trade_id} ({day.session_date}) exited at a bid no quote had renewed for"
        f" {quote_age_text(age_s)}: its exit price and P&L are estimates."
        for day in days
        for trade_id, age_s in day.old_exits
    ]


def sweep_notes(days: Sequence[SweepDay], rules: Rules) -> dict[str, list[str]]:
    """What a sweep's figures rest on, as the single run says it: damaged tapes, part days, and the days
    some cells end with a position open (sweep.json keeps each list under its key)."""
    facts = [day.facts for day in days if day.facts is not None]
    open_at_end = []
    for day in days:
        held = sum(cell.open_at_end for cell in day.cells)
        if held:
            open_at_end.append(
                f"Note: {day.session_date}: {held} of {len(day.cells)} cell(s) end with a position still open"
                " (the tape stops before the time stop); those cells run their days in order, carrying it"
                " into the next day."
            )
    return {
        "damaged_tapes": damaged_tape_warnings(facts),
        "incomplete_days": part_day_warnings(facts, rules),
        "open_at_end": open_at_end,
    }


def _ny_time(t_ms: int) -> str:
    return ny_datetime(t_ms).strftime("%H:%M:%S") if t_ms else "n/a"


def stats_json(stats: Stats) -> dict[str, Any]:
    values = asdict(stats)
    values["profit_factor"] = _json_factor(stats.profit_factor)
    return values


# What a run writes into its report folder: a run clears them first, so the folder is that run's alone.
REPORT_FILES = ("trades.csv", "summary.json", "equity.png", "day-*.png", "sweep.csv", "sweep.json")


def clear_report(out_dir: Path) -> None:
    """Create `out_dir`, or remove the files an earlier run wrote there (and nothing else): a 2-day run
    after a 20-day one left 18 old day charts and an old sweep.csv beside its own report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in REPORT_FILES:
        for old in out_dir.glob(pattern):
            old.unlink(missing_ok=True)


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
        "entry_check": entry_check_json(result),
        "damaged_tapes": damaged_tape_warnings([day.facts for day in result.days]),
        "incomplete_days": incomplete_day_warnings(result),
        "old_exit_quotes": old_quote_warnings(result.days),
        "days": [
            asdict(row) | _day_extra(day) | {"source": day_source(day, source)}
            for row, day in zip(day_rows(result.days), result.days, strict=True)
        ],
    }


def entry_check_json(result: BacktestResult) -> dict[str, Any]:
    """`summary.json`'s entry check: the totals and each checked BUY."""
    checked, dearer, total = entry_check_totals(result)
    return {
        "entries_checked": checked,
        "fill_below_newest_ask": dearer,
        "total_pnl_at_newest_ask": total,
        "trades": [asdict(c) for day in result.days for c in day.entry_checks],
    }


def _day_extra(day: DayResult) -> dict[str, Any]:
    return {
        "tape": day.tape,
        "bars": day.bars,
        "chains": day.chains,
        "lines": day.lines,
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
    "exit_quote_age_s",  # empty, or how long no quote had renewed the bid the exit was booked at
)


def price_text(price: float) -> str:
    """A fill or mark as it was, never rounded: cents when that is exact, else every digit.

    Quotes can be sub-penny (the `minute` reconstruction's, for one), and the CSV's own prices must
    give its P&L columns; money columns stay at cents, as the P&L is rounded.
    """
    cents = f"{price:.2f}"
    return cents if float(cents) == price else repr(price)


def write_trades_csv(path: Path, result: BacktestResult) -> None:
    """Every trade with New York entry and exit times; entry is the ask, exit the bid (fills unrounded)."""
    rebuilt = set(result.reconstructed_days)
    old_exits = dict(old for day in result.days for old in day.old_exits)
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
                    price_text(t.entry_price),
                    price_text(t.exit_price),
                    price_text(t.peak),
                    t.reason,
                    f"{t.pnl_dollars:.2f}",
                    f"{t.pnl_percent:.2f}",
                    t.entry_ms,
                    t.exit_ms,
                    int(t.session_date in rebuilt),
                    old_exits.get(t.trade_id, ""),
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
    held_out: BacktestResult | None = None,
) -> Stats:
    """trades.csv, summary.json, equity.png and day-YYYY-MM-DD.png per day in `out_dir`.

    With a holdout `split`, summary.json also holds the in-sample and out-of-sample statistics
    (`split_stats`; `held_out` is the run of the held-out days alone).
    """
    clear_report(out_dir)
    stats = compute_stats(result.trades)
    write_trades_csv(out_dir / "trades.csv", result)
    summary = summary_json(result, stats, overrides, source)
    if split is not None:
        inside, outside = split_stats(result, split, held_out)
        summary["holdout"] = {
            "in_sample_days": list(split.in_sample),
            "held_out_days": list(split.held_out),
            "rule": HOLDOUT_RULE,
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


def split_stats(
    result: BacktestResult, split: Split, held_out: BacktestResult | None = None
) -> tuple[Stats, Stats]:
    """A single run's statistics on its in-sample and held-out days, by the sweep's rule.

    Each part is a run of its days alone (as `sweep.run_sweep` ranks and judges a cell): a trade
    counts on the day it closed, as in the per-day table, and a position still open when the
    in-sample days end counts in neither part, so no held-out price reaches the in-sample figures.
    In sample: the trades closed on the in-sample days (the run's first days, so a run of them
    alone). Held out: `held_out`, a run of the held-out days alone (`backtest_run.run_part`);
    without it, the trades closed on those days (the same unless they depend on the days before).
    """
    inside = _closed_on(result, set(split.in_sample))
    outside = held_out.trades if held_out is not None else _closed_on(result, set(split.held_out))
    return compute_stats(inside), compute_stats(outside)


def _closed_on(result: BacktestResult, dates: set[str]) -> list[TradeRow]:
    """The run's trades (in exit order) that closed while one of the days of `dates` ran."""
    ids = {t.trade_id for day in result.days if day.session_date in dates for t in day.trades}
    return [t for t in result.trades if t.trade_id in ids]


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
        print(_chosen_line(results), file=out)
        print_side_by_side(results[0].stats, results[0].out_stats, split, out)


def _chosen_line(results: Sequence[CellResult]) -> str:
    """Which cell the in-sample days chose, and when they could not tell cells apart, that they did not."""
    first = results[0]
    chosen = " ".join(f"{n}={v}" for n, v in first.params)
    if first.stats.trades == 0:
        return f"No cell traded on the in-sample days: nothing to choose on (rank 1 is the grid's first: {chosen})"
    tied = len(results) > 1 and _ranked_on(results[1]) == _ranked_on(first)
    how = "rank 1, tied with rank 2 on P&L and profit factor: the grid's order decides" if tied else "rank 1"
    return f"Chosen on the in-sample days only ({how}): {chosen}"


def _ranked_on(result: CellResult) -> tuple[float, float | None]:
    return (result.stats.total_pnl, result.stats.profit_factor)


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
    notes: Mapping[str, list[str]] | None = None,
) -> None:
    """sweep.csv (one row per cell, ranked) and sweep.json (with `notes`: see `sweep_notes`).

    With a holdout `split`, every statistic comes twice, `in_sample_*` (what the ranking used) and
    `out_of_sample_*`, and sweep.json names the held-out days and the chosen cell.
    """
    clear_report(out_dir)
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
    summary: dict[str, Any] = {
        "fills": FILLS_NOTE,
        "days": days,
        "overrides": dict(overrides),
        **(notes or {}),
    }
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
