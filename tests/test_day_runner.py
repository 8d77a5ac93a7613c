"""The backtest path (shared market, engines fed only what can matter) against the full replay path."""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections import Counter
from pathlib import Path

from builders import calendar

from backtest import Cell, compute_stats, run_backtest, run_day, run_sweep
from config import Rules
from day_runner import CellDay, day_is_independent, run_cells_on_day
from events import Alert
from market_calendar import ny_datetime
from pnl_tracker import Journal
from replay import replay_tape
from tape_cache import load_decoded

RULES = Rules()


def replayed(tapes: list[Path], rules: Rules) -> tuple[tuple, list[Alert]]:
    """The tapes through `replay_tape`: every event to one full engine per tape, one journal for all."""
    journal = Journal(Path(":memory:"))
    alerts: list[Alert] = []
    for tape in tapes:
        replay_tape(
            tape,
            rules=rules,
            calendar=calendar(rules),
            journal=journal,
            on_alerts=alerts.extend,
            on_log=lambda _log: None,
        )
    return tuple(journal.trades()), [a for a in alerts if a.kind in ("BUY", "SELL")]


def test_a_backtest_makes_the_trades_and_alerts_of_a_full_replay(short_tapes):
    for rules in (RULES, dataclasses.replace(RULES, max_giveback_percent=40.0, stop_loss_percent=10.0)):
        trades, alerts = replayed(short_tapes, rules)
        result = run_backtest(short_tapes, rules, calendar=calendar(rules))
        assert result.trades == trades and len(trades) >= 4
        assert [a for day in result.days for a in day.alerts] == alerts
        sells = [a for a in alerts if a.kind == "SELL"]
        assert len(sells) >= 4 and all("LIFETIME: " in a.message for a in sells)


def test_packed_quote_lines_give_every_cell_the_trades_of_a_full_replay(short_stream_tapes, tmp_path):
    # Flat engines skip the options stream's lines (kept packed in the cache); a holding engine
    # unpacks them. Both, with and without the cache, against every event to one full engine.
    decoded = load_decoded(short_stream_tapes[0], RULES, tmp_path)
    kinds = Counter(kind for _t, kind, _body in decoded.lines)
    assert kinds["quotes"] > 1000 and kinds["events"] > 1000
    variants = [
        dataclasses.replace(RULES, stop_loss_percent=stop, max_giveback_percent=giveback)
        for stop in (5.0, 15.0)
        for giveback in (20.0, 35.0)
    ]
    for tape in short_stream_tapes:
        expected = [replayed([tape], rules)[0] for rules in variants]
        assert sum(len(trades) for trades in expected) >= 8
        for cache_dir in (None, tmp_path):
            day = run_cells_on_day(tape, variants, cache_dir=cache_dir)
            assert [cell.trades for cell in day.cells] == expected
    quote_times = [t for t, kind, _body in decoded.lines if kind == "quotes"]
    held = [(trade.entry_ms, trade.exit_ms) for trade in replayed(short_stream_tapes[:1], RULES)[0]]
    inside = [t for t in quote_times if any(entry < t < exit for entry, exit in held)]
    assert len(inside) > 100, "holding engines unpack quote lines, not only flat ones skip them"


def test_cells_with_different_signal_rules_get_their_own_market(short_tapes):
    variants = [
        dataclasses.replace(RULES, vwap_window_seconds=window, max_giveback_percent=giveback)
        for window in (60, 120)
        for giveback in (30.0, 40.0)
    ]
    day = run_cells_on_day(short_tapes[0], variants)
    singles = [run_day(short_tapes[0], r, calendar(r), Journal(Path(":memory:"))).trades for r in variants]
    assert [cell.trades for cell in day.cells] == singles
    assert singles[0] != singles[2], "the VWAP window changes the signals on this day"


def test_a_day_long_cooldown_stays_within_its_day_in_sweeps_and_backtests(short_tapes):
    slow = dataclasses.replace(RULES, cooldown_seconds=86_400.0)
    cells = [Cell((("COOLDOWN_SECONDS", "86400"),), slow), Cell((("COOLDOWN_SECONDS", "60"),), RULES)]
    ranked = {r.params: r for r in run_sweep(short_tapes, cells, workers=2)}
    for cell in cells:
        single = run_backtest(short_tapes, cell.rules, calendar=calendar(cell.rules))
        assert ranked[cell.params].trades == single.trades
        assert ranked[cell.params].stats == compute_stats(single.trades)
    day_two_alone = run_cells_on_day(short_tapes[1], [slow]).cells[0].trades
    day_two_after_day_one = [t for t in ranked[cells[0].params].trades if t.session_date == "2025-10-07"]
    # The cooldown belongs to a day (issue 10): day one's last exit never blocks day two.
    assert day_two_alone and list(day_two_alone) == day_two_after_day_one


def test_when_a_day_is_independent_of_the_days_before_it():
    flat = CellDay((), open_at_end=False, last_exit_ms=1_000_000)
    assert day_is_independent([], 0, RULES)
    assert day_is_independent([flat], 1_000_000 + 60_000, RULES)
    assert not day_is_independent([flat], 1_000_000 + 59_999, RULES), "still cooling down"
    assert not day_is_independent([CellDay((), open_at_end=True, last_exit_ms=None), flat], 10**12, RULES)


def tape_cut_mid_trade(tape: Path, out: Path) -> Path:
    """A copy of `tape` that stops halfway through its first trade: a position is open at its end."""
    first = replayed([tape], RULES)[0][0]
    cut = (first.entry_ms + first.exit_ms) // 2
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(tape, "rt") as source, gzip.open(out, "wt") as target:
        for line in source:
            record = json.loads(line)
            if "meta" in record or record["t"] < cut:
                target.write(line)
    return out


def test_tapes_out_of_date_order_run_as_their_replay_does(short_tapes, tmp_path):
    # A later day's tape first leaves its position open; the earlier day must not close it (its exit
    # would come before its entry): the replay path leaves it open, and so does the backtest.
    later = tape_cut_mid_trade(short_tapes[1], tmp_path / "cut" / "2025-10-07.jsonl.gz")
    tapes = [later, short_tapes[0]]
    trades, alerts = replayed(tapes, RULES)
    result = run_backtest(tapes, RULES, calendar=calendar(RULES))
    assert result.days[0].open_at_end is not None
    assert result.trades == trades and len(trades) >= 2
    assert [a for day in result.days for a in day.alerts] == alerts
    assert all(t.entry_ms < t.exit_ms and t.session_date == "2025-10-06" for t in result.days[1].trades)


def with_downtime(tape: Path, out: Path, down_from_ms: int, back_ms: int) -> Path:
    """`tape` as a daemon down in (down_from_ms, back_ms) recorded it: no line then, a start at `back_ms`."""
    lines = gzip.decompress(tape.read_bytes()).decode().splitlines()
    kept = [line for line in lines if not down_from_ms < json.loads(line)["t"] < back_ms]
    at = next(i for i, line in enumerate(kept) if json.loads(line)["t"] >= back_ms)
    kept.insert(at, json.dumps({"t": back_ms, "control": {"started": True}}))
    out.write_bytes(gzip.compress(("\n".join(kept) + "\n").encode()))
    return out


def test_a_backtest_decides_nothing_in_a_restarts_downtime_as_its_replay(short_tapes, tmp_path):
    """Backtests ticked through the downtime before a start line: a time stop due while the daemon was
    down sold inside the downtime, at the bid of before; a replay sells at the start, at its prices."""
    tried = 0
    for tape in short_tapes:
        for trade in replayed([tape], RULES)[0]:
            stop_at = ny_datetime(trade.entry_ms + 60_000).time().replace(microsecond=0)
            rules = dataclasses.replace(RULES, hard_time_stop=stop_at)
            down_from, back = trade.entry_ms + 2_000, trade.entry_ms + 150_000
            restarted = with_downtime(tape, tmp_path / f"{tried}-{tape.name}", down_from, back)
            trades = replayed([restarted], rules)[0]
            assert run_backtest([restarted], rules, calendar=calendar(rules)).trades == trades
            assert [t.exit_ms >= back for t in trades if t.trade_id == trade.trade_id] == [True]
            tried += 1
    assert tried >= 4
