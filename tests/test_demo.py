"""`python main.py --demo` as a new user sees it: alerts in full, the blocked signals, the summary."""

from __future__ import annotations

import io
import re

import pytest

from demo import run_demo


@pytest.fixture(scope="module")
def demo_run() -> tuple[int, str]:
    """One demo run (about 15 s) shared by the tests below: its exit status and output."""
    out = io.StringIO()
    status = run_demo(out)
    return status, out.getvalue()


def test_demo_prints_round_trips_blocked_signals_summary_and_guard_rails(demo_run):
    status, text = demo_run
    assert status == 0
    assert text.count("IWM 0DTE CALL — BUY") == 4 and text.count("IWM 0DTE CALL — SELL") == 4
    for reason in ("Stop loss", "VWAP persistence", "VWAP giveback", "Time stop"):
        assert f"Reason: {reason}" in text
    for rule in (
        "the pause switch",
        "relative volume (",
        "entry blackout (",
        "SPY leadership (IWM lags SPY by",
    ):
        assert f"signal blocked by {rule}" in text
    assert "entries paused (python3 main.py --pause)" in text and "entries resumed" in text
    assert "trades 4 | win rate 75.0% (3W-1L) | P&L +$31.00 | lifetime +$31.00" in text
    summary = text[text.index("📊 IWM 0DTE — DAILY SUMMARY") :]
    assert "Day P&L: +$31.00 | 3W-1L (75.0%)" in summary
    assert "4. 239C 15:12→15:55 $0.28→$0.43 +53.6% (+$15.00) Time stop" in summary
    assert "MAX_TRADES_PER_DAY=2: 2 BUY / 2 SELL" in text
    assert "MAX_CONSECUTIVE_LOSSES=1: 1 BUY / 1 SELL" in text
    assert "DAILY_LOSS_LIMIT=10: 1 BUY / 1 SELL" in text
    assert 5 <= text.count("Signal conditions") <= 20  # condensed, not one line a minute


def test_demo_text_has_no_rough_edges_and_the_first_trade_states_its_levels(demo_run):
    _, text = demo_run
    assert not re.search(r"\de[-+]\d", text)  # no scientific notation anywhere
    assert not re.search(r"[-+]\$?0\.0+(?!\d)", text)  # a rounded zero is never signed
    assert "by -" not in text and "by +" not in text  # no double negative in leadership
    for name in ("spy_leadership", "relative_volume", "entry_blackout", "p95 n/a", "=no", "=yes", " x "):
        assert name not in text
    assert (
        "signals blocked: relative volume 34, entry blackout 34, SPY leadership 32, pause switch 20" in text
    )
    first_buy = text[text.index("IWM 0DTE CALL — BUY") : text.index("IWM 0DTE CALL — SELL")]
    for line in (
        "Entry ~$0.63 (ask) | Mid $0.625 | Spread 1.6%",
        "bid 0.62 × ask 0.63 | size 153 × 70 (bid × ask) | Contracts 1",
        "Filters: SPY leadership: IWM leads SPY by 0.04 pts; relative volume: 2.18x",
        "Stop $0.5355 (-15% of entry): sells when the mid is at or below it",
        "Giveback exit 30% off peak (now $0.4375); 20% while IWM is below VWAP (now $0.50)",
    ):
        assert line in first_buy
    first_sell = text[text.index("IWM 0DTE CALL — SELL") :]
    first_sell = first_sell[: first_sell.index("trade 2025-10-02-01")]
    # The streamed quotes catch the stop where it is crossed (before streaming: marked $0.415, -34.9 %).
    assert "Trigger $0.5355 (15% off the $0.63 entry), marked $0.535" in first_sell
    assert "gapped" not in first_sell and "P&L: -15.9% (-$10.00)" in first_sell
    assert "momentum +0.00003%/s" in text and "volume 12,690, no p95 yet (surge: no)" in text
