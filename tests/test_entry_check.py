"""The backtest's entry check: each fill beside its contract's newest quote received before the BUY."""

from __future__ import annotations

import csv
import io
import json

from builders import TICKER, contract
from test_backtest import Io, main

from entry_check import entry_checks
from pnl_tracker import TradeRow
from tape_cache import pack_quotes

OTHER = "O:IWM251002C00245000"


def trade(trade_id: str, entry_ms: int, entry: float, exit_: float, ticker: str = TICKER) -> TradeRow:
    pnl = round((exit_ - entry) * 100, 2)
    return TradeRow(trade_id, "2025-10-02", ticker, 1, entry, exit_, entry_ms, entry_ms + 60_000, "VWAP giveback",
                    exit_, pnl, 0.0)  # fmt: skip


def test_each_fill_is_set_beside_the_newest_usable_quote_received_before_its_buy() -> None:
    lines = [
        (1_000, "events", (contract(1_000, 0.50, 0.52),)),
        (2_000, "events", (contract(2_000, 0.55, 0.57), contract(2_000, 0.90, 0.92, ticker=OTHER))),
        pack_quotes((3_000, "events", (contract(3_000, 0.0, 0.60),))),  # zero bid: unusable, never the newest
        (4_000, "events", (contract(4_000, 0.59, 0.61),)),  # the BUY's own instant: not before it
        (9_000, "events", (contract(9_000, 0.70, 0.72),)),
    ]
    first, second = trade("T1", 4_000, 0.52, 0.80), trade("T2", 10_000, 0.72, 0.60)
    checks = entry_checks(lines, [second, first])
    assert [(c.trade_id, c.fill, c.newest_bid, c.newest_ask, c.newest_ms) for c in checks] == [
        ("T1", 0.52, 0.55, 0.57, 2_000),
        ("T2", 0.72, 0.70, 0.72, 9_000),
    ]
    assert [c.pnl_at_newest_ask for c in checks] == [23.0, -12.0] and [c.above_fill for c in checks] == [
        True,
        False,
    ]
    assert entry_checks(lines, [trade("T3", 500, 0.5, 0.6)]) == ()  # nothing quoted before it: no check


def test_the_report_says_how_the_fills_compare_with_the_newest_quotes(short_stream_tapes, tmp_path) -> None:
    out, stdout = tmp_path / "report", io.StringIO()
    args = [*map(str, short_stream_tapes), "--out", str(out), "--no-cache", "--no-charts", "--workers", "1"]
    assert main(args, Io(stdout, io.StringIO(), environ={}, env_file=None)) == 0
    check = json.loads((out / "summary.json").read_text())["entry_check"]
    with (out / "trades.csv").open() as rows:
        trades = list(csv.DictReader(rows))
    assert check["entries_checked"] == len(check["trades"]) > 0
    at_newest = {c["trade_id"]: c for c in check["trades"]}
    for row in trades:  # the check's figures from trades.csv's own fills and exits
        if row["trade_id"] in at_newest:
            c = at_newest[row["trade_id"]]
            assert c["fill"] == float(row["entry_price"])
            assert c["pnl_at_newest_ask"] == round((float(row["exit_price"]) - c["newest_ask"]) * 100, 2)
    total = sum(at_newest[r["trade_id"]]["pnl_at_newest_ask"] if r["trade_id"] in at_newest else float(r["pnl_dollars"])
                for r in trades)  # fmt: skip
    assert check["total_pnl_at_newest_ask"] == round(total, 2)
    assert check["fill_below_newest_ask"] == sum(c["newest_ask"] > c["fill"] for c in check["trades"])
    line = next(line for line in stdout.getvalue().splitlines() if line.startswith("Entry check:"))
    assert line.startswith(
        f"Entry check: {check['fill_below_newest_ask']} of {check['entries_checked']} BUYs"
    )
