import math
import random
from dataclasses import replace

import numpy as np
import pytest

from config import Rules
from events import Bar
from signals import FeatureEngine, Features, RateOfChange

BASE_MS = 1_759_411_800_000  # 2025-10-02 09:30:00 ET
RULES = Rules()


def bar(second: float, c: float, v: float = 100.0, vw: float | None = -1.0) -> Bar:
    """A bar starting `second` seconds after BASE_MS; vw defaults to the close, None means missing."""
    start = BASE_MS + int(second * 1000)
    price = c if vw == -1.0 else vw
    return Bar("IWM", start, start + 1000, c, c, c, c, v, price, None, None, start + 500)


def feed(engine: FeatureEngine, bars: list[Bar]) -> list[Features]:
    return [engine.update(b) for b in bars]


def slope(seconds: list[float] | np.ndarray, values: list[float] | np.ndarray) -> float:
    """Least-squares slope by the two-pass centred formula (not the engine's running sums)."""
    dx = np.asarray(seconds, dtype=float)
    dx = dx - dx.mean()
    dy = np.asarray(values, dtype=float)
    dy = dy - dy.mean()
    return float((dx * dy).sum() / (dx * dx).sum())


# Rolling VWAP


def test_vwap_window_boundary_exactly_w_old_is_out() -> None:
    engine = FeatureEngine(RULES)
    f = feed(engine, [bar(0, 100.0, 1), bar(1, 102.0, 3), bar(60, 104.0, 1), bar(61, 106.0, 2)])
    assert f[1].rolling_vwap == pytest.approx((100 * 1 + 102 * 3) / 4, abs=1e-12)
    # At 60 s the bar at 0 s is exactly 60 s old (out); the bar at 1 s is 59 s old (in).
    assert f[2].rolling_vwap == pytest.approx((102 * 3 + 104 * 1) / 4, abs=1e-12)
    assert f[3].rolling_vwap == pytest.approx((104 * 1 + 106 * 2) / 3, abs=1e-12)
    assert f[3].above_vwap is True


def test_vwap_uses_close_when_vw_missing() -> None:
    engine = FeatureEngine(RULES)
    f = feed(engine, [bar(0, 100.0, 2, vw=99.0), bar(1, 101.0, 2, vw=None)])
    assert f[0].rolling_vwap == pytest.approx(99.0, abs=1e-12)
    assert f[1].rolling_vwap == pytest.approx((99.0 * 2 + 101.0 * 2) / 4, abs=1e-12)


def test_vwap_falls_back_to_mean_close_without_volume() -> None:
    engine = FeatureEngine(RULES)
    f = feed(
        engine,
        [bar(0, 100.0, 0, vw=50.0), bar(1, 101.0, 0), bar(2, 105.0, 10, vw=104.0), bar(63, 110.0, 0)],
    )
    assert f[0].rolling_vwap == pytest.approx(100.0, abs=1e-12)
    assert f[1].rolling_vwap == pytest.approx(100.5, abs=1e-12)
    assert f[0].above_vwap is False
    # Any traded volume in the window makes it a plain VWAP again.
    assert f[2].rolling_vwap == pytest.approx(104.0, abs=1e-12)
    # The traded bar left the window (61 s old): only zero-volume bars again.
    assert f[3].rolling_vwap == pytest.approx(110.0, abs=1e-12)


# VWAP slope


def test_vwap_rising_needs_ten_points() -> None:
    engine = FeatureEngine(RULES)
    prices = [100.0 + 0.01 * i * i for i in range(10)]
    f = feed(engine, [bar(i, p) for i, p in enumerate(prices)])
    assert (f[8].vwap_points, f[8].vwap_slope, f[8].vwap_rising) == (9, None, False)
    vwaps = [x.rolling_vwap for x in f]
    assert f[9].vwap_points == 10
    assert f[9].vwap_slope == pytest.approx(slope(list(range(10)), vwaps), rel=1e-9)
    assert f[9].vwap_slope > 0 and f[9].vwap_rising is True


def test_vwap_slope_window_is_thirty_seconds_and_min_points_configurable() -> None:
    engine = FeatureEngine(replace(RULES, vwap_rising_min_points=3))
    f = feed(engine, [bar(i, 100.0 - 0.02 * i, 50 + i) for i in range(45)])
    assert [x.vwap_points for x in f[:3]] == [1, 2, 3]
    assert f[1].vwap_slope is None and f[2].vwap_slope is not None
    assert f[44].vwap_points == 30
    window = [x.rolling_vwap for x in f[15:45]]
    assert f[44].vwap_slope == pytest.approx(slope(list(range(15, 45)), window), rel=1e-9)
    assert f[44].vwap_rising is False


def test_flat_series_is_exactly_zero_slope_not_rising() -> None:
    engine = FeatureEngine(RULES)
    rng = random.Random(3)
    rising = [bar(i, round(200 + 0.013 * i, 2), rng.randint(1, 9000)) for i in range(300)]
    flat = [bar(300 + i, 205.55, rng.randint(1, 9000)) for i in range(200)]
    f = feed(engine, rising + flat)
    assert f[299].vwap_rising is True and f[299].momentum_ok is True
    last = f[-1]
    assert last.rolling_vwap == pytest.approx(205.55, abs=1e-9)
    assert last.vwap_slope == 0.0
    assert last.vwap_rising is False
    assert last.momentum_pct_per_sec == 0.0
    assert last.momentum_ok is False


# Volume


def test_volume_needs_sixty_previous_bars() -> None:
    engine = FeatureEngine(RULES)
    volumes = [float(10 + (i * 37) % 50) for i in range(60)]
    f = feed(engine, [bar(i, 100.0, v) for i, v in enumerate(volumes)] + [bar(60, 100.0, 1e6)])
    assert (f[59].volume_bars, f[59].volume_threshold, f[59].volume_surge, f[59].volume_z) == (
        59,
        None,
        False,
        0.0,
    )
    assert f[60].volume_bars == 60
    assert f[60].volume_threshold == float(np.percentile(volumes, 95))
    assert f[60].volume_surge is True
    expected_z = (1e6 - np.mean(volumes)) / np.std(volumes)
    assert f[60].volume_z == pytest.approx(expected_z, rel=1e-12)


# Interpolation weight 0.05 (from below) and 0.8 (numpy then interpolates down from the upper
# neighbour, which gives a different last bit than interpolating up from the lower one).
SURGE_CASES = [
    [float((i * 7919) % 1000) for i in range(80)],
    [float(97000 + 1000 * i) for i in range(5)]
    + [96025.0, 94519.0]
    + [float(900 * i) for i in range(98, 0, -1)],
]


@pytest.mark.parametrize("volumes", SURGE_CASES)
def test_volume_equal_to_percentile_is_not_a_surge(volumes: list[float]) -> None:
    threshold = float(np.percentile(volumes, 95))
    assert threshold != int(threshold)  # an interpolated value, not a sample
    for v, surge in ((threshold, False), (math.nextafter(threshold, math.inf), True)):
        engine = FeatureEngine(RULES)
        f = feed(engine, [bar(i, 100.0, x) for i, x in enumerate(volumes)] + [bar(len(volumes), 100.0, v)])
        assert f[-1].volume_threshold == threshold
        assert f[-1].volume_surge is surge


def test_volume_z_is_zero_when_previous_volumes_are_all_equal() -> None:
    engine = FeatureEngine(RULES)
    # Varied volumes first, so the running moments carry float residue when they leave.
    early = [bar(i, 100.0, 1000.0 + 333.3 * (i % 7)) for i in range(100)]
    equal = [bar(1300 + i, 100.0, 100.0) for i in range(70)]
    f = feed(engine, early + equal + [bar(1370, 100.0, 100.0), bar(1371, 100.0, 250.0)])
    assert f[-2].volume_bars == 70
    assert (f[-2].volume_threshold, f[-2].volume_surge, f[-2].volume_z) == (100.0, False, 0.0)
    assert (f[-1].volume_surge, f[-1].volume_z) == (True, 0.0)


def test_volume_window_excludes_current_and_bars_1200_seconds_old() -> None:
    engine = FeatureEngine(replace(RULES, volume_min_bars=1))
    f = feed(engine, [bar(0, 100.0, 5), bar(1, 100.0, 7), bar(1200, 100.0, 9), bar(1201, 100.0, 11)])
    assert f[0].volume_bars == 0 and f[0].volume_threshold is None
    assert (f[1].volume_bars, f[1].volume_threshold) == (1, 5.0)
    # At 1200 s the bar at 0 s is out and the bar at 1 s (1199 s old) is in; the current bar never is.
    assert (f[2].volume_bars, f[2].volume_threshold) == (1, 7.0)
    assert (f[3].volume_bars, f[3].volume_threshold) == (1, 9.0)


def test_window_volume_is_sum_over_last_sixty_seconds_including_current() -> None:
    engine = FeatureEngine(RULES)
    f = feed(engine, [bar(0, 100.0, 5), bar(1, 100.0, 7), bar(60, 100.0, 9), bar(200, 100.0, 11)])
    assert [x.window_volume for x in f] == [5.0, 12.0, 16.0, 11.0]
    # Fractional volumes: the sum restarts from exactly 0 once the window empties.
    f = feed(engine, [bar(300, 100.0, 0.1), bar(301, 100.0, 0.2), bar(400, 100.0, 0.3)])
    assert [x.window_volume for x in f] == [0.1, 0.1 + 0.2, 0.3]


# Momentum


def test_momentum_is_percent_of_mean_close_per_second() -> None:
    engine = FeatureEngine(RULES)
    f = feed(engine, [bar(0, 100.0), bar(1, 101.0)])
    assert f[0].momentum_pct_per_sec is None and f[0].momentum_ok is False
    assert f[1].momentum_pct_per_sec == pytest.approx(1.0 / 100.5 * 100, rel=1e-12)
    assert f[1].momentum_ok is True


def test_momentum_threshold_is_strict() -> None:
    bars = [bar(0, 100.0), bar(2, 100.3), bar(3, 100.2)]
    exact = feed(FeatureEngine(RULES), bars)[-1].momentum_pct_per_sec
    assert exact == pytest.approx(slope([0, 2, 3], [100.0, 100.3, 100.2]) / (300.5 / 3) * 100, rel=1e-9)
    assert feed(FeatureEngine(replace(RULES, momentum_min_pct_per_sec=exact)), bars)[-1].momentum_ok is False
    below = math.nextafter(exact, -math.inf)
    assert feed(FeatureEngine(replace(RULES, momentum_min_pct_per_sec=below)), bars)[-1].momentum_ok is True


def test_gaps_windows_are_by_time_not_count() -> None:
    engine = FeatureEngine(RULES)
    f = feed(engine, [bar(0, 100.0), bar(1, 100.5), bar(2, 101.0), bar(40, 99.0), bar(42, 99.5)])
    # (10 s, 40 s] holds only the bar at 40 s.
    assert f[3].momentum_pct_per_sec is None
    assert f[4].momentum_pct_per_sec == pytest.approx(0.25 / 99.25 * 100, rel=1e-12)
    assert f[3].rolling_vwap == pytest.approx((100 + 100.5 + 101 + 99) / 4, abs=1e-12)


def test_bars_must_strictly_increase() -> None:
    engine = FeatureEngine(RULES)
    assert engine.last is None
    first = engine.update(bar(5, 100.0))
    with pytest.raises(ValueError):
        engine.update(bar(5, 101.0))
    with pytest.raises(ValueError):
        engine.update(bar(4, 101.0))
    assert engine.last is first


# Brute force


def random_bars(count: int, seed: int) -> list[Bar]:
    rng = random.Random(seed)
    bars = []
    second = 0
    price = 220.0
    for _ in range(count):
        r = rng.random()
        second += 1 if r < 0.7 else rng.randint(2, 9) if r < 0.985 else rng.randint(30, 1500)
        if rng.random() < 0.85:
            price = round(price + rng.gauss(0, 0.03), 2)
        r = rng.random()
        volume = (
            0.0
            if r < 0.05
            else float(rng.choice((100, 200, 500)))
            if r < 0.2
            else float(rng.randint(1, 60000))
        )
        vw = None if rng.random() < 0.1 else round(price + rng.uniform(-0.02, 0.02), 4)
        bars.append(bar(second, price, volume, vw))
    return bars


def brute_force(bars: list[Bar], rules: Rules) -> list[dict]:
    """Every feature recomputed from scratch over its explicit window."""
    starts = np.array([b.start_ms for b in bars])
    seconds = (starts - starts[0]) / 1000.0
    closes = np.array([b.c for b in bars])
    volumes = np.array([b.v for b in bars])
    prices = np.array([b.c if b.vw is None else b.vw for b in bars])

    def first_in(i: int, window_s: int) -> int:
        return int(np.searchsorted(starts, starts[i] - window_s * 1000, side="right"))

    vwaps = np.empty(len(bars))
    out = []
    for i in range(len(bars)):
        lo = first_in(i, rules.vwap_window_seconds)
        v = volumes[lo : i + 1]
        total = v.sum()
        vwaps[i] = closes[lo : i + 1].mean() if total == 0 else (prices[lo : i + 1] * v).sum() / total
        lo = first_in(i, rules.vwap_rising_seconds)
        points = i + 1 - lo
        vwap_slope = None
        if points >= rules.vwap_rising_min_points:
            vwap_slope = slope(seconds[lo : i + 1], vwaps[lo : i + 1])
        lo = first_in(i, rules.volume_window_seconds)
        previous = volumes[lo:i]
        threshold, z = None, 0.0
        if len(previous) >= rules.volume_min_bars:
            threshold = float(np.percentile(previous, rules.volume_percentile))
            std = float(np.std(previous))
            z = 0.0 if std == 0 else (volumes[i] - previous.mean()) / std
        lo = first_in(i, rules.momentum_window_seconds)
        momentum = None
        if i + 1 - lo >= 2:
            c = closes[lo : i + 1]
            momentum = slope(seconds[lo : i + 1], c) / c.mean() * 100
        lo = first_in(i, rules.relative_volume_window_seconds)
        out.append(
            {
                "rolling_vwap": vwaps[i],
                "vwap_slope": vwap_slope,
                "vwap_points": points,
                "volume_threshold": threshold,
                "volume_bars": len(previous),
                "volume_z": z,
                "momentum_pct_per_sec": momentum,
                "window_volume": volumes[lo : i + 1].sum(),
            }
        )
    return out


def assert_matches_brute_force(bars: list[Bar], rules: Rules) -> None:
    engine = FeatureEngine(rules)
    expected = brute_force(bars, rules)
    for b, want in zip(bars, expected, strict=True):
        got = engine.update(b)
        for name, value in want.items():
            have = getattr(got, name)
            assert (have is None) == (value is None), (b.start_ms, name, have, value)
            if value is not None:
                assert math.isclose(have, value, rel_tol=1e-9, abs_tol=1e-9), (b.start_ms, name, have, value)
        assert got.volume_surge == (want["volume_threshold"] is not None and b.v > want["volume_threshold"])
        if abs(b.c - want["rolling_vwap"]) > 1e-9:
            assert got.above_vwap == (b.c > want["rolling_vwap"])
        if want["vwap_slope"] is not None and abs(want["vwap_slope"]) > 1e-9:
            assert got.vwap_rising == (want["vwap_slope"] > 0)
        momentum = want["momentum_pct_per_sec"]
        if momentum is not None and abs(momentum - rules.momentum_min_pct_per_sec) > 1e-9:
            assert got.momentum_ok == (momentum > rules.momentum_min_pct_per_sec)


def test_long_random_sequence_matches_brute_force() -> None:
    bars = random_bars(5000, seed=11)
    assert_matches_brute_force(bars, RULES)


def test_random_sequence_with_short_windows_matches_brute_force() -> None:
    rules = replace(
        RULES,
        vwap_window_seconds=7,
        vwap_rising_seconds=5,
        vwap_rising_min_points=2,
        volume_window_seconds=40,
        volume_min_bars=3,
        volume_percentile=80.0,
        momentum_window_seconds=4,
        relative_volume_window_seconds=3,
    )
    assert_matches_brute_force(random_bars(1500, seed=5), rules)


# RateOfChange


def test_rate_of_change_boundaries() -> None:
    roc = RateOfChange(300)
    assert roc.percent(BASE_MS) is None
    roc.update(BASE_MS, 100.0)
    roc.update(BASE_MS + 1000, 101.0)
    roc.update(BASE_MS + 300_000, 110.0)
    # Base = latest bar with start <= as_of - 300 s.
    assert roc.percent(BASE_MS + 300_000) == pytest.approx(10.0, rel=1e-12)
    assert roc.percent(BASE_MS + 300_999) == pytest.approx(10.0, rel=1e-12)
    assert roc.percent(BASE_MS + 301_000) == pytest.approx((110 - 101) / 101 * 100, rel=1e-12)
    # "Now" = latest bar with start <= as_of: the bar at 300 s is not yet visible at 299.999 s.
    assert roc.percent(BASE_MS + 299_999) is None
    assert roc.percent(BASE_MS + 400_000) == pytest.approx((110 - 101) / 101 * 100, rel=1e-12)
    # No bar within the last window: both sides are the same bar.
    assert roc.percent(BASE_MS + 900_000) == 0.0


def test_rate_of_change_prunes_but_answers_one_window_back() -> None:
    roc = RateOfChange(60)
    for second in range(2000):
        roc.update(BASE_MS + second * 1000, 100.0 + second * 0.01)
    last = BASE_MS + 1999 * 1000
    assert roc.percent(last) == pytest.approx((119.99 - 119.39) / 119.39 * 100, rel=1e-12)
    assert roc.percent(last - 60_000) == pytest.approx((119.39 - 118.79) / 118.79 * 100, rel=1e-12)
    # Far enough back, the base bar has been pruned.
    assert roc.percent(BASE_MS + 500_000) is None


def test_rate_of_change_requires_increasing_starts() -> None:
    roc = RateOfChange(60)
    roc.update(BASE_MS, 100.0)
    with pytest.raises(ValueError):
        roc.update(BASE_MS, 100.0)


class PrunedAtOnce:
    """The rate of change with every unneeded bar dropped at each update: the semantics to keep."""

    def __init__(self, window_seconds: int) -> None:
        self.window_ms = window_seconds * 1000
        self.bars: list[tuple[int, float]] = []

    def update(self, start_ms: int, close: float) -> None:
        self.bars.append((start_ms, close))
        keep_from = start_ms - 2 * self.window_ms
        while len(self.bars) > 1 and self.bars[1][0] <= keep_from:
            del self.bars[0]

    def percent(self, as_of_ms: int) -> float | None:
        now, then = self.close_at(as_of_ms), self.close_at(as_of_ms - self.window_ms)
        return None if now is None or then is None else (now - then) / then * 100.0

    def close_at(self, ms: int) -> float | None:
        seen = [close for start, close in self.bars if start <= ms]
        return seen[-1] if seen else None


@pytest.mark.parametrize("seed", range(6))
def test_rate_of_change_dropping_in_batches_answers_as_dropping_at_once(seed: int) -> None:
    rng = random.Random(seed)
    window = rng.choice((1, 5, 30, 60))
    batched, model = RateOfChange(window), PrunedAtOnce(window)
    start = BASE_MS
    for _ in range(3000):
        start += rng.choice((1000, 1000, 1000, 2000, 7000, rng.randint(1, 400) * 1000))
        close = round(100 + rng.gauss(0, 1), 2)
        batched.update(start, close)
        model.update(start, close)
        for back in (0, 1, 999, window * 1000, window * 2000 + 1, window * 4000, 10 * window * 1000):
            assert batched.percent(start - back) == model.percent(start - back)
    # Batches keep memory bounded: at most about four windows of bars (one bar a second at most here).
    assert len(batched._starts) <= 4 * window + 2
