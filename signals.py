"""Incremental features of the underlying's per-second bars (DESIGN section 4, "Features").

Every window is by time, half-open by bar start `s`: (s - W, s]. Seconds without trades produce no
bar, so a window holds however many bars arrived in it. Each feature costs O(1) amortised per bar
(running sums over deques, expired items popped from the front) except the volume percentile,
which keeps a sorted list and costs O(log n) comparisons plus one list insert and delete.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from config import Rules
from events import Bar

# Least-squares slopes at or below this (per second) are float noise from the running sums,
# not a trend: a flat series must never read as "rising".
SLOPE_NOISE = 1e-12


class Features(NamedTuple):
    """The features of one bar, each over its own trailing window ending at that bar.

    An immutable NamedTuple rather than a frozen dataclass: one is built per bar, and a tuple is
    several times cheaper to build.

    `vwap_points` counts the rolling-VWAP values in the slope window, `volume_bars` the previous
    bars in the volume window (the current one excluded), and `window_volume` is the volume of the
    bars in the relative-volume window (the current one included). Slopes and momentum are None
    while their windows hold too few points; `volume_threshold` is None below VOLUME_MIN_BARS.
    """

    start_ms: int
    close: float
    rolling_vwap: float
    above_vwap: bool
    vwap_slope: float | None
    vwap_points: int
    vwap_rising: bool
    volume: float
    volume_threshold: float | None
    volume_bars: int
    volume_surge: bool
    volume_z: float
    momentum_pct_per_sec: float | None
    momentum_ok: bool
    window_volume: float


class _RollingVwap:
    """Σ(price·v)/Σv over bars in (x - span, x], prices taken relative to a fixed reference.

    Σ(price·v) and Σv are set to exactly 0 whenever no bar in the window traded volume, so the
    "no volume: mean close" fallback is decided exactly rather than by float residue.
    """

    __slots__ = ("_span_ms", "_bars", "_sum_pv", "_sum_v", "_sum_close", "_traded")

    def __init__(self, span_ms: int) -> None:
        self._span_ms = span_ms
        self._bars: deque[tuple[int, float, float, float]] = deque()
        self._sum_pv = 0.0
        self._sum_v = 0.0
        self._sum_close = 0.0
        self._traded = 0

    def push(self, x: int, price: float, volume: float, close: float) -> float:
        """Add a bar at x ms; return the window's VWAP (relative to the same reference)."""
        bars = self._bars
        horizon = x - self._span_ms
        while bars and bars[0][0] <= horizon:
            self._drop(*bars.popleft())
        pv = price * volume
        bars.append((x, pv, volume, close))
        self._sum_close += close
        if volume > 0:
            self._traded += 1
            self._sum_pv += pv
            self._sum_v += volume
        elif self._traded == 0:
            return self._sum_close / len(bars)
        return self._sum_pv / self._sum_v

    def _drop(self, _x: int, pv: float, volume: float, close: float) -> None:
        self._sum_close -= close
        if volume > 0:
            self._traded -= 1
            self._sum_pv -= pv
            self._sum_v -= volume
            if self._traded == 0:
                self._sum_pv = 0.0
                self._sum_v = 0.0
        if not self._bars:
            self._sum_close = 0.0


class _TrendWindow:
    """Least-squares slope of y against x over the points in (x - span, x].

    x (ms from a fixed origin) is an int and its sums are exact Python ints, so the spread of x
    is exact however late in the day. y should be relative to a fixed reference so it stays
    small; its mean and the x-y co-moment are kept centred (Welford's update and its inverse),
    which avoids the cancellation of raw sums of products.
    """

    __slots__ = ("_span_ms", "_points", "count", "_sum_x", "_sum_xx", "mean_y", "_co_moment")

    def __init__(self, span_ms: int) -> None:
        self._span_ms = span_ms
        self._points: deque[tuple[int, float]] = deque()
        self.count = 0
        self._sum_x = 0
        self._sum_xx = 0
        self.mean_y = 0.0
        self._co_moment = 0.0

    def push(self, x: int, y: float) -> None:
        """Drop the points that left the window, then add (x, y)."""
        points = self._points
        horizon = x - self._span_ms
        while points and points[0][0] <= horizon:
            self._remove(*points.popleft())
        points.append((x, y))
        n = self.count
        if n == 0:
            self.mean_y = y
            self._co_moment = 0.0
        else:
            mean_x = self._sum_x / n
            self.mean_y += (y - self.mean_y) / (n + 1)
            self._co_moment += (x - mean_x) * (y - self.mean_y)
        self.count = n + 1
        self._sum_x += x
        self._sum_xx += x * x

    def _remove(self, x: int, y: float) -> None:
        n = self.count - 1
        self.count = n
        self._sum_x -= x
        self._sum_xx -= x * x
        if n == 0:
            # Restart from exact zeros rather than carry float residue.
            self.mean_y = 0.0
            self._co_moment = 0.0
            return
        mean_y_before = self.mean_y
        self.mean_y += (mean_y_before - y) / n
        self._co_moment -= (x - self._sum_x / n) * (y - mean_y_before)

    def slope_per_second(self) -> float:
        """dy/dx per second (needs two distinct x); |slope| <= SLOPE_NOISE is returned as 0."""
        n = self.count
        spread = n * self._sum_xx - self._sum_x * self._sum_x
        slope = self._co_moment * n / spread * 1000.0
        return 0.0 if -SLOPE_NOISE <= slope <= SLOPE_NOISE else slope


class _VolumeWindow:
    """Volumes of the bars in (x - span, x): a sorted list for the percentile, Welford for Z."""

    __slots__ = ("_span_ms", "_bars", "_sorted", "_mean", "_m2")

    def __init__(self, span_ms: int) -> None:
        self._span_ms = span_ms
        self._bars: deque[tuple[int, float]] = deque()
        self._sorted: list[float] = []
        self._mean = 0.0
        self._m2 = 0.0

    def expire(self, x: int) -> int:
        """Drop the bars at or before x - span; return how many remain."""
        bars = self._bars
        horizon = x - self._span_ms
        while bars and bars[0][0] <= horizon:
            self._remove(bars.popleft()[1])
        return len(bars)

    def percentile(self, quantile: float) -> float:
        """numpy's default ('linear') quantile of the window, by the same float steps."""
        ordered = self._sorted
        last = len(ordered) - 1
        virtual = last * quantile
        if virtual >= last:
            return ordered[last]
        below = int(virtual)
        gamma = virtual - below
        low = ordered[below]
        high = ordered[below + 1]
        if gamma >= 0.5:
            return high - (high - low) * (1 - gamma)
        return low + (high - low) * gamma

    def z_score(self, volume: float) -> float:
        """(volume - mean) / population std of the window; 0 when the std is 0."""
        ordered = self._sorted
        # All-equal volumes have std exactly 0, whatever residue the running M2 carries.
        if ordered[0] == ordered[-1]:
            return 0.0
        std = math.sqrt(max(self._m2, 0.0) / len(ordered))
        return (volume - self._mean) / std

    def add(self, x: int, volume: float) -> None:
        """Add a bar's volume (after it has been assessed against the window)."""
        self._bars.append((x, volume))
        insort(self._sorted, volume)
        delta = volume - self._mean
        self._mean += delta / len(self._bars)
        self._m2 += delta * (volume - self._mean)

    def _remove(self, volume: float) -> None:
        ordered = self._sorted
        del ordered[bisect_left(ordered, volume)]
        count = len(ordered)
        if count == 0:
            self._mean = 0.0
            self._m2 = 0.0
            return
        mean_before = self._mean
        self._mean += (mean_before - volume) / count
        self._m2 -= (volume - self._mean) * (volume - mean_before)


class _SumWindow:
    """Sum of values over (x - span, x]."""

    __slots__ = ("_span_ms", "_items", "_total")

    def __init__(self, span_ms: int) -> None:
        self._span_ms = span_ms
        self._items: deque[tuple[int, float]] = deque()
        self._total = 0.0

    def push(self, x: int, value: float) -> float:
        """Drop expired items, add (x, value), return the sum."""
        items = self._items
        horizon = x - self._span_ms
        while items and items[0][0] <= horizon:
            self._total -= items.popleft()[1]
        if not items:
            self._total = 0.0
        items.append((x, value))
        self._total += value
        return self._total


class FeatureEngine:
    """Features of one symbol's bars, updated one bar at a time.

    Slopes are per second of bar start. To keep the running sums small and free of cancellation,
    x is measured in ms from the first bar's start and every price (VWAP terms, the VWAP series,
    closes) is taken relative to the first bar's close. A slope with |slope| <= 1e-12 per second
    is reported as exactly 0: it can only be float residue of values that entered and left a
    window, and a flat series must not read as rising.
    """

    def __init__(self, rules: Rules) -> None:
        self._quantile = rules.volume_percentile / 100
        self._min_vwap_points = rules.vwap_rising_min_points
        self._min_volume_bars = rules.volume_min_bars
        self._momentum_min = rules.momentum_min_pct_per_sec
        self._origin_ms = 0
        self._ref = 0.0
        self._last: Features | None = None
        self._vwap = _RollingVwap(rules.vwap_window_seconds * 1000)
        self._vwap_trend = _TrendWindow(rules.vwap_rising_seconds * 1000)
        self._close_trend = _TrendWindow(rules.momentum_window_seconds * 1000)
        self._volumes = _VolumeWindow(rules.volume_window_seconds * 1000)
        self._recent_volume = _SumWindow(rules.relative_volume_window_seconds * 1000)

    @property
    def last(self) -> Features | None:
        """The features of the latest bar, or None before the first."""
        return self._last

    def update(self, bar: Bar) -> Features:
        """Add a bar (start strictly after the previous one's) and return its features."""
        start = bar.start_ms
        last = self._last
        if last is None:
            self._origin_ms = start
            self._ref = bar.c
        elif start <= last.start_ms:
            raise ValueError(f"bar start {start} is not after the previous bar's")
        x = start - self._origin_ms
        ref = self._ref
        close = bar.c
        volume = bar.v
        price = close if bar.vw is None else bar.vw
        vwap_offset = self._vwap.push(x, price - ref, volume, close - ref)
        vwap = ref + vwap_offset
        slope, points = self._vwap_slope(x, vwap_offset)
        momentum = self._momentum(x, close - ref)
        threshold, volume_bars, volume_z = self._assess_volume(x, volume)
        # Positional, in field order: keyword construction of a NamedTuple costs twice as much.
        features = Features(
            start,
            close,
            vwap,
            close > vwap,
            slope,
            points,
            slope is not None and slope > 0.0,
            volume,
            threshold,
            volume_bars,
            threshold is not None and volume > threshold,
            volume_z,
            momentum,
            momentum is not None and momentum > self._momentum_min,
            self._recent_volume.push(x, volume),
        )
        self._last = features
        return features

    def _vwap_slope(self, x: int, vwap_offset: float) -> tuple[float | None, int]:
        trend = self._vwap_trend
        trend.push(x, vwap_offset)
        if trend.count < self._min_vwap_points:
            return None, trend.count
        return trend.slope_per_second(), trend.count

    def _momentum(self, x: int, close_offset: float) -> float | None:
        trend = self._close_trend
        trend.push(x, close_offset)
        if trend.count < 2:
            return None
        mean_close = self._ref + trend.mean_y
        return trend.slope_per_second() / mean_close * 100.0

    def _assess_volume(self, x: int, volume: float) -> tuple[float | None, int, float]:
        """Percentile threshold, count and Z of the previous bars' volume; then add this bar."""
        window = self._volumes
        count = window.expire(x)
        threshold = None
        volume_z = 0.0
        if count >= self._min_volume_bars:
            threshold = window.percentile(self._quantile)
            volume_z = window.z_score(volume)
        window.add(x, volume)
        return threshold, count, volume_z


class RateOfChange:
    """Percent change of one symbol's close over a trailing window, for SPY leadership.

    Queries are answered exactly for any `as_of_ms` no earlier than the newest bar's start minus the
    window; earlier ones see only the bars such a window can need (the latest bar at or before the
    newest start minus two windows, and every later one), as if older bars had been dropped at once.
    They are dropped in batches: a bar costs two appends, not a prune (two bars a second all day).
    """

    def __init__(self, window_seconds: int) -> None:
        self._window_ms = window_seconds * 1000
        self._starts: list[int] = []
        self._closes: list[float] = []
        # Bars before the latest one at or before this time are dropped (in batches, see `update`).
        self._keep_from = -math.inf

    def update(self, start_ms: int, close: float) -> None:
        """Record a bar's close; starts must strictly increase."""
        starts = self._starts
        if starts and start_ms <= starts[-1]:
            raise ValueError(f"bar start {start_ms} is not after the previous bar's")
        starts.append(start_ms)
        self._closes.append(close)
        self._keep_from = keep_from = start_ms - 2 * self._window_ms
        if starts[0] <= keep_from - 2 * self._window_ms:  # two windows of dropped bars: drop them
            first = self._first_kept()
            del starts[:first], self._closes[:first]

    def _first_kept(self) -> int:
        """Index of the latest bar at or before `_keep_from` (0 when there is none)."""
        return max(bisect_right(self._starts, self._keep_from) - 1, 0)

    def percent(self, as_of_ms: int) -> float | None:
        """100 x (close now - close one window earlier) / close one window earlier, or None.

        "Now" is the latest bar with start <= as_of_ms and "earlier" the latest bar with
        start <= as_of_ms - window; None if either is missing.
        """
        first = self._first_kept()
        now = self._close_at(as_of_ms, first)
        then = self._close_at(as_of_ms - self._window_ms, first)
        if now is None or then is None:
            return None
        return (now - then) / then * 100.0

    def _close_at(self, ms: int, first: int) -> float | None:
        index = bisect_right(self._starts, ms) - 1
        return None if index < first else self._closes[index]


class FeatureSource(Protocol):
    """What a market needs of its features: one `Features` per new bar, in order."""

    def update(self, bar: Bar) -> Features: ...


class RecordingFeatures:
    """A features source (a FeatureEngine, planned features) that also appends every result to `into`."""

    def __init__(self, engine: FeatureSource, into: list[Features]) -> None:
        self._engine = engine
        self._into = into

    def update(self, bar: Bar) -> Features:
        """The source's features of the bar, recorded on the way."""
        features = self._engine.update(bar)
        self._into.append(features)
        return features


class RecordedFeatures:
    """Features a FeatureEngine computed from the same bars before, served again in order.

    Each bar must be the one the features were computed for (same start and close); anything else
    means the recording belongs to other bars, and is refused rather than served.
    """

    def __init__(self, recorded: Sequence[Features]) -> None:
        self._recorded = recorded
        self._next = 0

    def update(self, bar: Bar) -> Features:
        index = self._next
        if index >= len(self._recorded):
            raise ValueError(f"no recorded features left for the bar at {bar.start_ms}")
        features = self._recorded[index]
        if features.start_ms != bar.start_ms or features.close != bar.c:
            raise ValueError(
                f"recorded features of the bar at {features.start_ms} offered for {bar.start_ms}"
            )
        self._next = index + 1
        return features
