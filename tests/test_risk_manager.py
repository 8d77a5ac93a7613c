"""Exit rules, their precedence, and the protections, on hand-made positions."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import time

import pytest

from config import Rules
from risk_manager import (
    DayRecord,
    Lifetime,
    Position,
    check_exit,
    exit_quiet_until,
    pnl_of,
    protection_block,
    track_vwap,
    with_mark,
)

RULES = Rules()
NOW = 1_000_000_000
STOP = NOW + 3_600_000


def position(**changes: object) -> Position:
    base = Position(
        "2025-10-02-01",
        "2025-10-02",
        "O:IWM251002C00242000",
        242.0,
        "2025-10-02",
        1,
        entry_price=1.00,
        entry_mark=0.99,
        entry_ms=NOW - 60_000,
        delta=0.38,
        iv=0.2,
        peak=1.00,
        mark=1.00,
        bid=0.99,
    )
    return replace(base, **changes)


def decide(pos: Position, now: int = NOW, close: float | None = 240.0, vwap: float | None = 239.0):
    decision = check_exit(pos, now_ms=now, time_stop_ms=STOP, last_close=close, last_vwap=vwap, rules=RULES)
    return None if decision is None else decision.reason


def test_no_exit_when_nothing_holds():
    assert decide(position(peak=1.20, mark=1.10)) is None


def test_time_stop_at_the_cut_off_even_with_a_winner():
    assert decide(position(peak=1.5, mark=1.5), now=STOP - 1) is None
    assert decide(position(peak=1.5, mark=1.5), now=STOP) == "Time stop"


def test_stop_loss_is_inclusive_at_fifteen_percent():
    assert decide(position(mark=0.86, peak=1.0)) is None
    assert decide(position(mark=0.85, peak=1.0)) == "Stop loss"


def test_hard_giveback_at_thirty_percent_of_peak():
    assert decide(position(peak=2.00, mark=1.41)) is None
    assert decide(position(peak=2.00, mark=1.40)) == "Hard giveback"


def test_vwap_giveback_needs_close_below_vwap():
    above = decide(position(peak=2.00, mark=1.60), close=240.0, vwap=239.0)
    below = decide(position(peak=2.00, mark=1.60), close=238.99, vwap=239.0)
    assert (above, below) == (None, "VWAP giveback")
    assert decide(position(peak=2.00, mark=1.61), close=238.0, vwap=239.0) is None


def test_vwap_persistence_fires_at_sixty_seconds():
    pos = position(peak=1.2, mark=1.2, below_vwap_since_ms=NOW - 59_999)
    assert decide(pos, close=238.0) is None
    assert decide(replace(pos, below_vwap_since_ms=NOW - 60_000), close=238.0) == "VWAP persistence"


def test_precedence_time_stop_then_stop_loss_then_hard_then_vwap_rules():
    everything = position(mark=0.50, peak=2.0, below_vwap_since_ms=NOW - 600_000)
    assert decide(everything, now=STOP, close=238.0) == "Time stop"
    assert decide(everything, close=238.0) == "Stop loss"
    assert decide(replace(everything, entry_price=0.40), close=238.0) == "Hard giveback"
    soft = position(entry_price=1.0, mark=1.55, peak=2.0, below_vwap_since_ms=NOW - 600_000)
    assert decide(soft, close=238.0) == "VWAP giveback"
    assert decide(replace(soft, mark=1.7), close=238.0) == "VWAP persistence"


def test_vwap_clock_starts_on_first_close_below_and_resets_at_or_above():
    pos = track_vwap(position(), close=238.0, vwap=239.0, now_ms=NOW)
    assert pos.below_vwap_since_ms == NOW
    still = track_vwap(pos, close=237.0, vwap=239.0, now_ms=NOW + 5000)
    assert still.below_vwap_since_ms == NOW
    reset = track_vwap(still, close=239.0, vwap=239.0, now_ms=NOW + 6000)
    assert reset.below_vwap_since_ms is None


def test_mark_moves_peak_only_upwards():
    pos = with_mark(position(), 1.30, 1.29)
    assert (pos.mark, pos.peak, pos.bid) == (1.30, 1.30, 1.29)
    pos = with_mark(pos, 1.10, 1.09)
    assert (pos.mark, pos.peak, pos.bid) == (1.10, 1.30, 1.09)


def test_a_quote_that_moves_nothing_leaves_the_very_same_position():
    pos = position(peak=1.20, mark=1.10, bid=1.08)
    assert with_mark(pos, 1.10, 1.08) is pos
    assert with_mark(pos, 1.10, 1.07) is not pos and with_mark(pos, 1.10, 1.07).bid == 1.07


@pytest.mark.parametrize("seed", range(4))
def test_no_exit_before_the_quiet_time_and_a_time_based_one_at_it(seed: int) -> None:
    # The engine skips check_exit while nothing it reads has changed and the time is before
    # exit_quiet_until: that must never skip an exit, nor wait past one.
    rng = random.Random(seed)
    for _ in range(300):
        since = rng.choice((None, NOW - rng.randint(0, 400_000)))
        pos = position(peak=1.2, mark=round(rng.uniform(0.9, 1.2), 2), below_vwap_since_ms=since)
        close, vwap = rng.choice(((240.0, 239.0), (238.0, 239.0), (None, None)))
        stop = NOW + rng.randint(0, 600_000)

        def decided(now: int, pos: Position = pos, close=close, vwap=vwap, stop=stop) -> str | None:
            found = check_exit(
                pos, now_ms=now, time_stop_ms=stop, last_close=close, last_vwap=vwap, rules=RULES
            )
            return None if found is None else found.reason

        if decided(NOW) is not None:
            continue
        quiet = exit_quiet_until(pos, time_stop_ms=stop, rules=RULES)
        assert quiet > NOW
        assert all(decided(now) is None for now in (NOW + 1, (NOW + quiet) // 2, quiet - 1))
        assert decided(quiet) in ("Time stop", "VWAP persistence")


def test_pnl_rounds_to_cents_and_percent_of_entry():
    assert pnl_of(1.45, 1.72, 1) == (27.0, 18.62)
    assert pnl_of(1.45, 1.20, 3) == (-75.0, -17.24)


def test_day_record_counts_zero_as_loss_and_resets_streak_on_win():
    day = DayRecord().after_trade(-10).after_trade(0.0)
    assert (day.trades, day.consecutive_losses, day.pnl) == (2, 2, -10.0)
    assert day.after_trade(5).consecutive_losses == 0


def test_lifetime_record_text():
    life = Lifetime().after_trade(20).after_trade(-5).after_trade(0)
    assert life.record() == "1W-2L (33.3%)"
    assert life.pnl == 15.0


@pytest.mark.parametrize(
    ("day", "opened", "clock", "paused", "rule"),
    [
        (DayRecord(), 3, time(10), False, None),
        (DayRecord(), 4, time(10), False, "max_trades_per_day"),
        (DayRecord(2, 1, -20), 2, time(10), False, None),
        (DayRecord(2, 2, -20), 2, time(10), False, "max_consecutive_losses"),
        (DayRecord(1, 1, -299.99), 1, time(10), False, None),
        (DayRecord(1, 1, -300.0), 1, time(10), False, "daily_loss_limit"),
        (DayRecord(), 0, time(10), True, "paused"),
    ],
)
def test_protections_at_their_boundaries(day, opened, clock, paused, rule):
    block = protection_block(day, opened_today=opened, clock=clock, paused=paused, rules=RULES)
    assert (block.rule if block else None) == rule


def test_blackout_window_is_half_open_and_zero_limits_disable():
    rules = replace(RULES, entry_blackouts=((time(11, 30), time(13, 30)),), max_trades_per_day=0)

    def rule_at(clock: time):
        block = protection_block(DayRecord(), opened_today=99, clock=clock, paused=False, rules=rules)
        return block.rule if block else None

    assert rule_at(time(11, 29, 59)) is None
    assert rule_at(time(11, 30)) == "entry_blackout"
    assert rule_at(time(13, 29, 59)) == "entry_blackout"
    assert rule_at(time(13, 30)) is None
