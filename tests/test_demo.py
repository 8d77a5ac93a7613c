"""`python main.py --demo` as a new user sees it: alerts in full, the blocked signals, the summary."""

from __future__ import annotations

import io

from demo import run_demo


def test_demo_prints_round_trips_blocked_signals_summary_and_guard_rails():
    out = io.StringIO()
    assert run_demo(out) == 0
    text = out.getvalue()
    assert text.count("IWM 0DTE CALL — BUY") == 4 and text.count("IWM 0DTE CALL — SELL") == 4
    for reason in ("Stop loss", "VWAP persistence", "Hard giveback", "Time stop"):
        assert f"Reason: {reason}" in text
    for rule in ("paused", "relative_volume", "entry_blackout", "spy_leadership"):
        assert f"signal blocked by {rule}" in text
    assert "entries paused (python main.py --pause)" in text and "entries resumed" in text
    assert "trades 4 | win rate 75.0% (3W-1L) | P&L +$6.00 | lifetime +$6.00" in text
    assert "MAX_TRADES_PER_DAY=2: 2 BUY / 2 SELL" in text
    assert "MAX_CONSECUTIVE_LOSSES=1: 1 BUY / 1 SELL" in text
    assert "DAILY_LOSS_LIMIT=20: 1 BUY / 1 SELL" in text
    assert 5 <= text.count("Signal conditions") <= 20  # condensed, not one line a minute
