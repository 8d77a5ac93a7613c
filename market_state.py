"""What the feed says, whatever the trading state: features, leadership rates, the latest chain.

One `MarketState` per engine live and in replays. A backtest sweep shares one between all the cells
whose market rules are equal (`market_key`), so the features of a day are computed once however
many exit or gate variants are tried; each cell's `Engine` keeps only its own trading state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import time, timedelta

from config import Rules
from events import Bar, ChainSnapshot, Event, Tick, VolumeProfile
from market_calendar import ny_datetime, ny_ms
from signals import FeatureEngine, Features, FeatureSource, RateOfChange

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

    def __init__(self, rules: Rules, feature_source: Callable[[], FeatureSource] | None = None) -> None:
        """`feature_source` makes the features source of each day (default: a fresh `FeatureEngine`)."""
        self.rules = rules
        self._new_features = feature_source or (lambda: FeatureEngine(rules))
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

    def _roll_day(self) -> None:
        day = ny_datetime(self.now_ms).date()
        first = self._day_end_ms == 0
        self._day_end_ms = ny_ms(day + timedelta(days=1), time(0))
        if not first:
            self._reset_day()
            self.counters.bars_today = 0

    def _on_bar(self, bar: Bar) -> Features | None:
        newest = self._newest.get(bar.sym)
        if newest is not None and bar.start_ms <= newest:
            self.counters.late_bars += 1
            return None
        self._newest[bar.sym] = bar.start_ms
        if bar.sym == self._benchmark:
            self.spy_roc.update(bar.start_ms, bar.c)
            return None
        if bar.sym != self._underlying:
            return None
        self.counters.bars += 1
        self.counters.bars_today += 1
        features = self.features.update(bar)
        self.iwm_roc.update(bar.start_ms, bar.c)
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
