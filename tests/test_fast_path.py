"""The vectorized features (features_vector) against FeatureEngine, and the planned source's fallback."""

from __future__ import annotations

import dataclasses
import random

import pytest

from config import Rules
from events import Bar
from features_vector import PlannedFeatures, day_features
from market_state import MarketState, feature_days
from signals import FeatureEngine, Features

START_MS = 1_759_411_800_000  # 2025-10-02 09:30 New York
RULES = Rules()
SMALL = dataclasses.replace(
    RULES,
    vwap_window_seconds=5,
    volume_window_seconds=30,
    volume_min_bars=3,
    relative_volume_window_seconds=2,
)


def random_bars(count: int, seed: int, sym: str = "IWM", gap_every: int = 0) -> list[Bar]:
    """Bars one to three seconds apart (a long gap every `gap_every` bars), some without volume or VWAP."""
    rng = random.Random(seed)
    bars, start, price = [], START_MS, 220.0
    for i in range(count):
        start += 1000 * rng.choice((1, 1, 1, 2, 3)) + (600_000 if gap_every and i % gap_every == 0 else 0)
        price = round(price + rng.gauss(0.0, 0.02), 2)
        volume = 0 if rng.random() < 0.05 else int(rng.paretovariate(1.5) * 100)
        vw = None if rng.random() < 0.1 else price + 0.001
        bars.append(
            Bar(sym, start, start + 1000, price, price, price, price, volume, vw, None, None, start + 1200)
        )
    return bars


def per_bar(bars: list[Bar], rules: Rules) -> list[Features]:
    engine = FeatureEngine(rules)
    return [engine.update(bar) for bar in bars]


def assert_same(expected: list[Features], actual: list[Features]) -> None:
    """Equal bit for bit, field types included (an int volume stays an int, None stays None)."""
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual, strict=True):
        assert tuple(got) == tuple(want)
        assert [type(v) for v in got] == [type(v) for v in want]


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("rules", [RULES, SMALL], ids=["default", "small-windows"])
def test_day_features_equal_the_per_bar_engine(seed, rules):
    bars = random_bars(3000, seed, gap_every=700)
    vector = day_features(bars, rules)
    assert_same(per_bar(bars, rules), vector)
    assert any(f.vwap_rising for f in vector) and any(f.volume_surge for f in vector)


def test_an_empty_day_and_a_single_bar():
    assert day_features([], RULES) == []
    one = random_bars(1, 4)
    assert_same(per_bar(one, RULES), day_features(one, RULES))


def test_bars_out_of_order_are_refused():
    bars = random_bars(10, 5)
    with pytest.raises(ValueError):
        day_features([bars[1], bars[0]], RULES)


def planned_market(planned: list[Bar], rules: Rules = RULES) -> MarketState:
    market = MarketState(rules)
    market.precompute_features(planned)
    return market


def test_a_planned_market_serves_the_per_bar_features():
    bars = random_bars(500, 6)
    market = planned_market(bars)
    assert_same(per_bar(bars, RULES), [market.apply(bar) for bar in bars])
    assert market.planner.fallbacks == 0


def test_a_mismatched_bar_falls_back_to_per_bar_for_the_rest_of_the_day():
    bars = random_bars(400, 7)
    altered = list(bars)
    altered[200] = bars[200]._replace(v=bars[200].v + 5000)
    market = planned_market(bars)
    served = [market.apply(bar) for bar in altered]
    assert_same(per_bar(altered, RULES), served)
    assert market.planner.fallbacks == 1


def test_late_duplicate_and_other_symbol_bars_are_planned_as_the_market_filters_them():
    iwm = random_bars(300, 8)
    spy = random_bars(300, 9, sym="SPY")
    events: list[Bar] = []
    for a, b in zip(iwm, spy, strict=True):
        events += [a, b]
    events.insert(101, iwm[40])  # late
    events.insert(151, iwm[70])  # duplicate start of an earlier bar
    events.append(iwm[-1]._replace(sym="QQQ", start_ms=iwm[-1].start_ms + 5000))
    (day,) = feature_days(events, RULES)
    assert list(day) == iwm
    market = planned_market(events)
    served = [f for f in (market.apply(e) for e in events) if f is not None]
    assert_same(per_bar(iwm, RULES), served)
    assert market.planner.fallbacks == 0


def test_a_day_boundary_starts_a_new_plan():
    first = random_bars(200, 10)
    second = [
        b._replace(start_ms=b.start_ms + 86_400_000, received_ms=b.received_ms + 86_400_000)
        for b in random_bars(200, 11)
    ]
    assert [list(d) for d in feature_days(first + second, RULES)] == [first, second]
    market = planned_market(first + second)
    served = [market.apply(bar) for bar in first + second]
    assert_same(per_bar(first, RULES) + per_bar(second, RULES), served)
    assert market.planner.fallbacks == 0


def test_an_unplanned_day_is_computed_per_bar():
    bars = random_bars(100, 12)
    source = PlannedFeatures(RULES).source()
    assert_same(per_bar(bars, RULES), [source.update(bar) for bar in bars])
