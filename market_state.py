"""What the feed says, whatever the trading state: features, leadership rates, the latest chain.

One `MarketState` per engine live and in replays. A backtest sweep shares one between all the cells
whose market rules are equal (`market_key`), so the features of a day are computed once however
many exit or gate variants are tried; each cell's `Engine` keeps only its own trading state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from datetime import time, timedelta

from config import Rules
from events import Bar, ChainSnapshot, Event, Tick, VolumeProfile
from features_vector import PlannedFeatures
from market_calendar import ny_datetime, ny_ms
from signals import Features, FeatureSource, RateOfChange

# The rules a MarketState reads (directly, through FeatureEngine, or through the feed decoder the
# same rules build). Everything else is trading or gate logic and may differ between cells that
# share one market; tests/test_market_state.py checks that nothing else is read.
MARKET_FIELDS = (
    "underlying",
    "benchmark",
    "leadership_window_seconds",
    "volume_profile_days",
    "vwap_window_seconds",
    "vwap_rising_seconds",
    "vwap_rising_min_points",
    "volume_window_seconds",
    "volume_percentile",
    "volume_min_bars",
    "momentum_window_seconds",
    "momentum_min_pct_per_sec",
    "relative_volume_window_seconds",
)


def market_key(rules: Rules) -> tuple[object, ...]:
    """Equal for two rule sets exactly when they build identical market states from one feed."""
    return tuple(getattr(rules, name) for name in MARKET_FIELDS)


def market_rules(rules: Rules) -> Rules:
    """`rules` with every non-market field at its default: the rules a shared market is built from."""
    return dataclasses.replace(Rules(), **{name: getattr(rules, name) for name in MARKET_FIELDS})


@dataclasses.dataclass(slots=True)
class MarketCounters:
    late_bars: int = 0
    bars: int = 0
    chains: int = 0
    bars_today: int = 0  # underlying bars since the New York date last changed (the 5-minute pulse)


class MarketState:
    """Absorbs every event once, in order; resets its per-day state when the New York date changes.

    `fresh` holds the features of the event just applied when it was a new bar of the underlying,
    else None: an engine sharing this state reads it instead of applying the event again.
    """

    def __init__(
        self,
        rules: Rules,
        feature_source: Callable[[], FeatureSource] | None = None,
        *,
        planner: PlannedFeatures | None = None,
    ) -> None:
        """`feature_source` makes the features source of each day (default: `planner`'s sources).

        `planner` is what `precompute_features` plans; without one, a planner of these rules whose
        sources are the default. Until something is planned its sources compute every bar with a
        `FeatureEngine`, exactly as a plain one would.
        """
        self.rules = rules
        self.planner = planner or PlannedFeatures(rules)
        self._new_features = feature_source or self.planner.source
        # A source of the caller's own (features read from a cache) leaves nothing to plan.
        self._plans = feature_source is None or planner is not None
        self._underlying = rules.underlying
        self._benchmark = rules.benchmark
        self.now_ms = 0
        self._day_end_ms = 0
        self.counters = MarketCounters()
        self.fresh: Features | None = None
        self._reset_day()

    def _reset_day(self) -> None:
        self.features = self._new_features()
        self.iwm_roc = RateOfChange(self.rules.leadership_window_seconds)
        self.spy_roc = RateOfChange(self.rules.leadership_window_seconds)
        self._newest: dict[str, int] = {}
        self.last: Features | None = None
        self.last_bar: Bar | None = None
        self.last_iwm_ms: int | None = None
        self.chain: ChainSnapshot | None = None
        self.profile: VolumeProfile | None = None

    def apply(self, event: Event) -> Features | None:
        """Absorb one event; return (and keep in `fresh`) the features of a new underlying bar."""
        kind = type(event)
        t = event.now_ms if kind is Tick else event.received_ms  # type: ignore[union-attr]
        if t > self.now_ms:
            self.now_ms = t
        if self.now_ms >= self._day_end_ms:
            self._roll_day()
        fresh = None
        if kind is Bar:
            fresh = self._on_bar(event)  # type: ignore[arg-type]
        elif kind is ChainSnapshot:
            self.chain = event  # type: ignore[assignment]
            self.counters.chains += 1
        elif kind is VolumeProfile:
            self.profile = event  # type: ignore[assignment]
        self.fresh = fresh
        return fresh

    def note_time(self, t_ms: int) -> None:
        """An event that changes nothing in the market but its clock (an option quote), absorbed
        without `apply`: the day rolls at the next applied event, as it would have here."""
        if t_ms > self.now_ms:
            self.now_ms = t_ms

    def _roll_day(self) -> None:
        first = self._day_end_ms == 0
        self._day_end_ms = day_end_ms(self.now_ms)
        if not first:
            self._reset_day()
            self.counters.bars_today = 0

    def precompute_features(self, events: Iterable[Event]) -> None:
        """The events this market will absorb next are known (a whole tape): plan their bars' features.

        The planner computes each day's features at once at the day's first bar and serves them as
        the bars arrive, each checked against the planned one; any other bar switches that day to
        per-bar computing, so the features are the per-bar path's whatever the events turn out to be.
        A day already under way keeps its source: only days starting after now are planned.
        """
        if not self._plans:
            return
        days = feature_days(events, self.rules, self._day_end_ms, self.now_ms, self._newest)
        if days and self.last is not None and self._day_end_ms > 0:
            days = [bars for bars in days if bars[0].received_ms >= self._day_end_ms]
        self.planner.plan(days)

    def _on_bar(self, bar: Bar) -> Features | None:
        # Two bars a second all day: each field is read once (locals are cheaper than attributes).
        sym, start = bar.sym, bar.start_ms
        newest = self._newest.get(sym)
        if newest is not None and start <= newest:
            self.counters.late_bars += 1
            return None
        self._newest[sym] = start
        if sym == self._benchmark:
            self.spy_roc.update(start, bar.c)
            return None
        if sym != self._underlying:
            return None
        counters = self.counters
        counters.bars += 1
        counters.bars_today += 1
        features = self.features.update(bar)
        self.iwm_roc.update(start, bar.c)
        self.last, self.last_bar, self.last_iwm_ms = features, bar, bar.received_ms
        return features

    def leadership_percents(self) -> tuple[float | None, float | None]:
        """IWM's and SPY's percent change over the leadership window at the latest IWM bar.

        SPY is read as of the previous second, so the order of same-second IWM and SPY bars cannot matter.
        """
        if self.last is None:
            return None, None
        start = self.last.start_ms
        return self.iwm_roc.percent(start), self.spy_roc.percent(start - 1000)


def day_end_ms(now_ms: int) -> int:
    """The next New York midnight after `now_ms`: where the market's day rolls."""
    return ny_ms(ny_datetime(now_ms).date() + timedelta(days=1), time(0))


def feature_days(
    events: Iterable[Event],
    rules: Rules,
    day_end: int = 0,
    now_ms: int = 0,
    newest: dict[str, int] | None = None,
) -> list[Sequence[Bar]]:
    """The bars a MarketState would feed its features source, per day, for `events` in order.

    `MarketState.apply` and `_on_bar` in one pass, without the features: the day rolls when the time
    reaches the next New York midnight (ticks between lines never reach past the next line's stamp,
    so only their empty days are missed, and empty days feed nothing), and a bar at or before its
    symbol's newest start that day, the benchmark's and other symbols' bars never reach it.
    `day_end`, `now_ms` and `newest` are the market's state before the events (a fresh market's
    by default).
    """
    underlying, benchmark = rules.underlying, rules.benchmark
    latest = dict(newest or {})
    days: list[Sequence[Bar]] = []
    today: list[Bar] = []
    for event in events:
        t = event.now_ms if type(event) is Tick else event.received_ms  # type: ignore[union-attr]
        if t > now_ms:
            now_ms = t
        if now_ms >= day_end:
            if day_end:
                days.append(today)
                today, latest = [], {}
            day_end = day_end_ms(now_ms)
        if type(event) is not Bar:
            continue
        sym = event.sym  # type: ignore[union-attr]
        start = event.start_ms  # type: ignore[union-attr]
        previous = latest.get(sym)
        if previous is not None and start <= previous:
            continue
        latest[sym] = start
        if sym != benchmark and sym == underlying:
            today.append(event)  # type: ignore[arg-type]
    days.append(today)
    return [bars for bars in days if bars]
