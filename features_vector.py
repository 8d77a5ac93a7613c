"""A whole day's features at once, equal bit for bit to `FeatureEngine.update` bar by bar.

Used where the whole feed is known in advance (replays at full speed, backtests): the bars a
`MarketState` will feed its features source are found first (`market_state.feature_days`), their
features computed here, and served as each bar arrives, checked bar by bar (`PlannedFeatures`).

Bit for bit, not merely close: every decision and alert text must be the per-bar path's. The running
sums (rolling VWAP, relative volume) are the per-bar engine's own float additions and subtractions
in the same order, done by numpy's strictly sequential `cumsum` over the interleaved stream of bars
entering and leaving each window. The trend slopes and the volume statistics follow recurrences
(Welford's update and its inverse, a sorted window) that no array operation reproduces exactly, so
they run as one tight loop each over plain lists, with the per-bar engine's arithmetic step for step.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np
import structlog

from config import Rules
from events import Bar
from signals import SLOPE_NOISE, FeatureEngine, Features, FeatureSource

# What a bar's features depend on (besides the bars before it in its day): a served bar must match.
BarKey = tuple[int, float, float, float | None]


def bar_key(bar: Bar) -> BarKey:
    """The fields of a bar that FeatureEngine reads: start, close, volume and VWAP."""
    return (bar.start_ms, bar.c, bar.v, bar.vw)


def day_features(bars: Sequence[Bar], rules: Rules) -> list[Features]:
    """The features FeatureEngine(rules) returns for `bars` fed in order (starts strictly increasing)."""
    if not bars:
        return []
    starts = [bar.start_ms for bar in bars]
    if any(later <= earlier for earlier, later in zip(starts, starts[1:], strict=False)):
        raise ValueError("bar starts must strictly increase")
    origin = starts[0]
    ref = bars[0].c
    xs = [start - origin for start in starts]
    x = np.array(xs, dtype=np.int64)
    closes = [bar.c for bar in bars]
    volumes = [bar.v for bar in bars]
    vwap_offsets, vwaps = _rolling_vwap(bars, x, ref, rules.vwap_window_seconds * 1000)
    slopes, points, _ = _trend(
        xs, vwap_offsets, rules.vwap_rising_seconds * 1000, rules.vwap_rising_min_points
    )
    close_offsets = [close - ref for close in closes]
    close_slopes, _, close_means = _trend(xs, close_offsets, rules.momentum_window_seconds * 1000, 2)
    momentum = [
        None if slope is None else slope / (ref + mean) * 100.0
        for slope, mean in zip(close_slopes, close_means, strict=True)
    ]
    thresholds, volume_bars, volume_zs = _volume_stats(
        x, volumes, rules.volume_window_seconds * 1000, rules.volume_percentile / 100, rules.volume_min_bars
    )
    window_volumes = _window_sums(
        x, np.array(volumes, dtype=np.float64), rules.relative_volume_window_seconds * 1000
    )
    above = [close > vwap for close, vwap in zip(closes, vwaps, strict=True)]
    rising = [slope is not None and slope > 0.0 for slope in slopes]
    surge = [t is not None and v > t for v, t in zip(volumes, thresholds, strict=True)]
    least = rules.momentum_min_pct_per_sec
    momentum_ok = [m is not None and m > least for m in momentum]
    columns = (
        starts, closes, vwaps, above, slopes, points, rising, volumes, thresholds, volume_bars, surge,
        volume_zs, momentum, momentum_ok, window_volumes,
    )  # fmt: skip
    # In Features' field order; tuple.__new__ skips the NamedTuple's keyword handling.
    new = tuple.__new__
    return [new(Features, row) for row in zip(*columns, strict=True)]


def _window_bounds(x: np.ndarray, span_ms: int) -> np.ndarray:
    """For each bar, the index of the oldest bar still in its window (x - span, x]."""
    return np.searchsorted(x, x - span_ms, side="right")


def _running_sums(
    x: np.ndarray, span_ms: int, member: np.ndarray, columns: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Each column's running window sum after each bar, as a deque of the window's members keeps it.

    Per bar the engine first subtracts the members that left the window (oldest first), then adds
    the bar if it is a member; when the window holds no member any more the sum restarts from an
    exact 0.0. Returns the sums after each bar and the count of members in its window.
    """
    n = len(x)
    lows = _window_bounds(x, span_ms)
    members = np.flatnonzero(member)
    # A member j leaves at the first bar whose window starts after it.
    leaves = np.searchsorted(lows, members, side="right")
    dropped = leaves < n
    drop_steps, drop_items = leaves[dropped], members[dropped]
    steps = np.concatenate((drop_steps * 2, members * 2 + 1))
    items = np.concatenate((drop_items, members))
    signs = np.concatenate((np.full(len(drop_items), -1), np.ones(len(members), dtype=np.int64)))
    order = np.argsort(steps, kind="stable")  # drops (oldest first) before the add of the same bar
    steps, items, signs = steps[order], items[order], signs[order]
    counts = np.cumsum(signs)
    # After a drop that empties the window the sum is reset to 0.0: later sums restart from there.
    resets = np.flatnonzero((signs < 0) & (counts == 0))
    sums = []
    for column in columns:
        values = np.where(signs > 0, column[items], -column[items])
        sums.append(_restarting_cumsum(values, resets))
    # The state after bar k is the one after its last event (none yet: an empty window).
    last = np.searchsorted(steps, np.arange(n) * 2 + 1, side="right") - 1
    after = [np.where(last >= 0, total[np.maximum(last, 0)], 0.0) for total in sums]
    window_counts = np.where(last >= 0, counts[np.maximum(last, 0)], 0)
    return after, window_counts


def _restarting_cumsum(values: np.ndarray, resets: np.ndarray) -> np.ndarray:
    """Sequential sums from 0.0 (numpy's cumsum adds left to right), restarting at 0.0 after each reset."""
    out = np.empty(len(values), dtype=np.float64)
    begin = 0
    for reset in (*resets.tolist(), len(values) - 1):
        if reset < begin:
            continue
        # A leading 0.0 makes the first sum 0.0 + value, the engine's very first operation.
        out[begin : reset + 1] = np.cumsum(np.concatenate(((0.0,), values[begin : reset + 1])))[1:]
        begin = reset + 1
    out[resets] = 0.0
    return out


def _rolling_vwap(
    bars: Sequence[Bar], x: np.ndarray, ref: float, span_ms: int
) -> tuple[list[float], list[float]]:
    """The rolling VWAP's offset from `ref` and its value at each bar (`_RollingVwap` step for step)."""
    price = np.array([bar.c if bar.vw is None else bar.vw for bar in bars], dtype=np.float64)
    volume = np.array([bar.v for bar in bars], dtype=np.float64)
    close = np.array([bar.c for bar in bars], dtype=np.float64)
    ref_f = np.float64(ref)
    traded = volume > 0
    (sum_pv, sum_v), traded_count = _running_sums(x, span_ms, traded, ((price - ref_f) * volume, volume))
    (sum_close,), count = _running_sums(x, span_ms, np.ones(len(x), dtype=bool), (close - ref_f,))
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.where(traded_count > 0, sum_pv / sum_v, sum_close / count)
    return offset.tolist(), (ref_f + offset).tolist()


def _window_sums(x: np.ndarray, values: np.ndarray, span_ms: int) -> list[float]:
    """`_SumWindow`'s total after each bar: the sum of the values in (x - span, x]."""
    (total,), _ = _running_sums(x, span_ms, np.ones(len(x), dtype=bool), (values,))
    return total.tolist()


def _trend(
    xs: list[int], ys: list[float], span_ms: int, min_points: int
) -> tuple[list[float | None], list[int], list[float]]:
    """`_TrendWindow` over the bars by the engine's own recurrences: per bar the slope per second
    (None under `min_points` points), the point count and the running mean of y."""
    slopes: list[float | None] = []
    counts: list[int] = []
    means: list[float] = []
    low = n = sum_x = sum_xx = 0
    mean_y = co_moment = 0.0
    noise = SLOPE_NOISE
    for i, x in enumerate(xs):
        horizon = x - span_ms
        while low < i and xs[low] <= horizon:
            # `_TrendWindow._remove`, inlined.
            old_x, old_y = xs[low], ys[low]
            low += 1
            n -= 1
            sum_x -= old_x
            sum_xx -= old_x * old_x
            if n == 0:
                mean_y = 0.0
                co_moment = 0.0
                continue
            mean_y_before = mean_y
            mean_y += (mean_y_before - old_y) / n
            co_moment -= (old_x - sum_x / n) * (old_y - mean_y_before)
        y = ys[i]
        # `_TrendWindow.push`, inlined.
        if n == 0:
            mean_y = y
            co_moment = 0.0
        else:
            mean_y += (y - mean_y) / (n + 1)
            co_moment += (x - sum_x / n) * (y - mean_y)
        n += 1
        sum_x += x
        sum_xx += x * x
        slope = None
        if n >= min_points:
            # `_TrendWindow.slope_per_second`, inlined.
            slope = co_moment * n / (n * sum_xx - sum_x * sum_x) * 1000.0
            if -noise <= slope <= noise:
                slope = 0.0
        slopes.append(slope)
        counts.append(n)
        means.append(mean_y)
    return slopes, counts, means


def _volume_stats(
    x: np.ndarray, volumes: list[float], span_ms: int, quantile: float, min_bars: int
) -> tuple[list[float | None], list[int], list[float]]:
    """`_VolumeWindow` over the bars: the percentile threshold, the count and the Z of each bar's
    volume against the previous bars in (x - span, x), by the engine's own steps."""
    lows = _window_bounds(x, span_ms).tolist()
    counts = (np.arange(len(lows)) - np.array(lows, dtype=np.int64)).tolist()
    steps = _percentile_steps(max(counts, default=0), quantile)
    thresholds: list[float | None] = []
    zs: list[float] = []
    add_threshold, add_z = thresholds.append, zs.append
    ordered: list[float] = []
    sqrt = math.sqrt
    low = 0
    mean = m2 = 0.0
    for i, volume in enumerate(volumes):
        new_low = lows[i]
        while low < new_low:
            old = volumes[low]
            low += 1
            del ordered[bisect_left(ordered, old)]
            count = i - low  # len(ordered)
            if count == 0:
                mean = m2 = 0.0
                continue
            mean_before = mean
            mean += (mean_before - old) / count
            m2 -= (old - mean) * (old - mean_before)
        count = i - low
        if count >= min_bars:
            add_threshold(_percentile(ordered, steps[count]))
            # `max(m2, 0.0)`, keeping its answer for -0.0 and NaN.
            add_z(
                (volume - mean) / sqrt((0.0 if m2 < 0.0 else m2) / count)
                if ordered[0] != ordered[-1]
                else 0.0
            )
        else:
            add_threshold(None)
            add_z(0.0)
        insort(ordered, volume)
        delta = volume - mean
        mean += delta / (count + 1)
        m2 += delta * (volume - mean)
    return thresholds, counts, zs


# Where numpy's linear quantile of `count` sorted values falls: (index below, gamma, 1 - gamma),
# gamma -1.0 when it is the last value itself. A function of the count alone, so made once per count.
PercentileStep = tuple[int, float, float]


def _percentile_steps(most: int, quantile: float) -> list[PercentileStep]:
    """The step of every count from 0 to `most` (count 0 has none: its entry is never read)."""
    steps: list[PercentileStep] = [(0, -1.0, 0.0)]
    for count in range(1, most + 1):
        last = count - 1
        virtual = last * quantile
        if virtual >= last:
            steps.append((last, -1.0, 0.0))
        else:
            below = int(virtual)
            gamma = virtual - below
            steps.append((below, gamma, 1 - gamma))
    return steps


def _percentile(ordered: list[float], step: PercentileStep) -> float:
    """`_VolumeWindow.percentile`: numpy's linear quantile by the same float steps."""
    below, gamma, rest = step
    low = ordered[below]
    if gamma < 0.0:
        return low
    high = ordered[below + 1]
    if gamma >= 0.5:
        return high - (high - low) * rest
    return low + (high - low) * gamma


class PlannedFeatures:
    """Features of bars known in advance, one plan per day, served to a `MarketState` bar by bar.

    `plan` takes the days' bars as the market will feed them; `source` is the market's features
    factory (one source per day). A source finds its day by its first bar and serves the
    precomputed features while each bar is the planned one; at the first bar that is not (or with
    no plan at all) it becomes a `FeatureEngine` fed the day's bars so far, so it returns exactly
    what the per-bar path returns, for the rest of its day.
    """

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self._days: dict[BarKey, Sequence[Bar]] = {}
        self.fallbacks = 0  # sources that had to switch to per-bar computing

    def plan(self, days: Sequence[Sequence[Bar]]) -> None:
        """Plan these days' bars (each day's bars in the order the market feeds them)."""
        self._days = {bar_key(bars[0]): bars for bars in days if bars}

    @property
    def planned_days(self) -> int:
        """How many days the latest `plan` holds."""
        return len(self._days)

    def source(self) -> FeatureSource:
        """A features source for one day (MarketState's `feature_source` factory)."""
        return _PlannedDay(self)

    def day_for(self, first: Bar) -> Sequence[Bar] | None:
        """The planned bars of the day that starts with `first`, or None."""
        return self._days.get(bar_key(first))


class _PlannedDay:
    """One day's source: planned features while the bars match, then a FeatureEngine."""

    __slots__ = ("_planner", "_bars", "_features", "_next", "_engine")

    def __init__(self, planner: PlannedFeatures) -> None:
        self._planner = planner
        self._bars: Sequence[Bar] = ()
        self._features: list[Features] = []
        self._next = 0
        self._engine: FeatureEngine | None = None

    def update(self, bar: Bar) -> Features:
        """The bar's features: the planned ones when it is the planned bar, else the engine's."""
        if self._engine is not None:
            return self._engine.update(bar)
        index = self._next
        if index == 0:
            self._start(bar)
        bars = self._bars
        if index < len(bars):
            planned = bars[index]
            if planned is bar or bar_key(planned) == bar_key(bar):
                self._next = index + 1
                return self._features[index]
        return self._fall_back().update(bar)

    def _start(self, first: Bar) -> None:
        bars = self._planner.day_for(first)
        if bars is None:
            return
        try:
            self._features = day_features(bars, self._planner.rules)
        except (ValueError, ArithmeticError, IndexError) as exc:
            # The fast path must never stop a replay: the per-bar engine takes the whole day.
            structlog.get_logger("features").warning("vector_features_failed", error=str(exc))
            return
        self._bars = bars

    def _fall_back(self) -> FeatureEngine:
        """A FeatureEngine that has seen the bars served so far (they equal the planned ones)."""
        engine = FeatureEngine(self._planner.rules)
        for bar in self._bars[: self._next]:
            engine.update(bar)
        self._engine = engine
        if self._bars:
            self._planner.fallbacks += 1
        return engine
