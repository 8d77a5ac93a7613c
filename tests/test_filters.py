"""Entry filters (SPY leadership, relative volume) and protections at their exact boundaries."""

from __future__ import annotations

from dataclasses import replace
from datetime import time

from builders import at, bar, burst_bars, chain, contract, engine, quote

from config import Rules
from events import Alert, Log, OpenPosition, VolumeProfile
from market_calendar import minute_of_day

START = at(10, 0)


def leadership_after(spy_end: float, iwm_end: float, *, spy_first: bool = True):
    """300 s of IWM 200 -> iwm_end and SPY 500 -> spy_end, the two arriving in the given order each second."""
    eng = engine()
    for i in range(302):
        start = START + i * 1000
        iwm = bar(start, 200.0 if i <= 1 else iwm_end)
        spy = bar(start, 500.0 if i <= 1 else spy_end, sym="SPY")
        for b in (spy, iwm) if spy_first else (iwm, spy):
            eng.on_event(b)
    return {r.name: r for r in eng.filter_readings()}["spy_leadership"]


def test_leadership_blocks_just_outside_the_lag_threshold():
    inside = leadership_after(spy_end=501.0, iwm_end=200.002)  # SPY +0.200 %, IWM +0.001 %: lag 0.199
    outside = leadership_after(spy_end=501.0, iwm_end=199.998)  # lag 0.201
    assert (inside.blocks, outside.blocks) == (False, True)
    assert inside.value == "IWM lags SPY by 0.20 pts"


def test_leadership_is_the_same_whichever_symbol_arrives_first_in_a_second():
    a = leadership_after(spy_end=501.5, iwm_end=200.1, spy_first=True)
    b = leadership_after(spy_end=501.5, iwm_end=200.1, spy_first=False)
    assert (a.value, a.blocks) == (b.value, b.blocks)


def test_leadership_without_spy_history_does_not_block():
    eng = engine()
    eng.on_event(bar(START, 200.0))
    reading = {r.name: r for r in eng.filter_readings()}["spy_leadership"]
    assert (reading.blocks, reading.value) == (False, "n/a (no history)")


def relative_volume(window_volume_per_bar: float, average: float | None, required: bool = False):
    eng = engine(replace(Rules(), relative_volume_required=required))
    if average is not None:
        minute = minute_of_day(START + 59_000)
        eng.on_event(VolumeProfile(START - 3_600_000, "2025-10-02", 10, {minute: average}))
    for i in range(60):
        eng.on_event(bar(START + i * 1000, 200.0, volume=window_volume_per_bar))
    return {r.name: r for r in eng.filter_readings()}["relative_volume"]


def test_relative_volume_passes_at_the_minimum_and_blocks_below():
    at_min = relative_volume(150.0, 6000.0)  # 9,000 in 60 s against 6,000 a minute: 1.50x
    below = relative_volume(149.9, 6000.0)  # 8,994: 1.499x
    assert (at_min.value, at_min.blocks) == ("1.50x", False)
    assert below.blocks


def test_relative_volume_unavailable_blocks_only_when_required():
    assert relative_volume(100.0, None).blocks is False
    assert relative_volume(100.0, None, required=True).blocks is True
    assert relative_volume(100.0, None).value == "unavailable"


def test_a_blocked_signal_logs_the_rule_and_value():
    eng = engine(replace(Rules(), entry_blackouts=((time(10, 0), time(10, 5)),)))
    eng.on_event(chain(START + 110_000, quote()))
    actions = [a for b in burst_bars(START) for a in eng.on_event(b)]
    assert not [a for a in actions if isinstance(a, OpenPosition)]
    (blocked,) = [a.fields for a in actions if isinstance(a, Log) and a.event == "entry_blocked"]
    assert (blocked["rule"], blocked["value"], blocked["limit"]) == (
        "entry_blackout",
        "10:02:00",
        "10:00-10:05",
    )


def test_pause_blocks_entries_but_the_sell_still_goes_out():
    eng = engine()
    eng.on_event(chain(START + 110_000, quote()))
    actions = [a for b in burst_bars(START) for a in eng.on_event(b)]
    assert [a for a in actions if isinstance(a, OpenPosition)]
    eng.set_paused(True)
    sell = eng.on_event(contract(START + 125_000, bid=0.80, ask=0.82))
    assert [a.kind for a in sell if isinstance(a, Alert)] == ["SELL"]
    eng.on_event(chain(START + 310_000, quote()))
    again = [a for b in burst_bars(START + 200_000) for a in eng.on_event(b)]
    assert not [a for a in again if isinstance(a, OpenPosition)]
    blocked = [a.fields["rule"] for a in again if isinstance(a, Log) and a.event == "entry_blocked"]
    assert blocked == ["paused"]
    eng.set_paused(False)
    eng.on_event(chain(START + 430_000, quote()))
    resumed = [a for b in burst_bars(START + 320_000) for a in eng.on_event(b)]
    assert [a for a in resumed if isinstance(a, OpenPosition)]
