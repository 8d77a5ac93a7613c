"""The shared market: what it reads from the rules, when two rule sets may share one, day rolls."""

from __future__ import annotations

import dataclasses
import datetime

from builders import DAY, at, bar, burst_bars, chain, quote

from config import Rules
from events import Tick, VolumeProfile
from market_state import MARKET_FIELDS, MarketState, market_key, market_rules
from signals import FeatureEngine


class ReadRecorder:
    """Stands in for Rules and remembers every field read through it."""

    def __init__(self, rules: Rules) -> None:
        self._rules = rules
        self.read: set[str] = set()

    def __getattr__(self, name: str) -> object:
        self.read.add(name)
        return getattr(self._rules, name)


def test_a_market_reads_only_the_market_fields():
    recorder = ReadRecorder(Rules())
    market = MarketState(recorder)  # type: ignore[arg-type]
    start = at(10, 0)
    for b in burst_bars(start):
        market.apply(b)
        market.apply(bar(b.start_ms, b.c * 2, sym="SPY"))
    market.apply(chain(at(10, 3), quote()))
    market.apply(VolumeProfile(at(10, 3), DAY.isoformat(), 10, {600: 1000.0}))
    market.apply(Tick(at(10, 4)))
    assert market.last is not None and market.profile is not None and market.chain is not None
    assert recorder.read and recorder.read <= set(MARKET_FIELDS)


def test_exit_and_gate_rules_share_a_market_and_signal_rules_do_not():
    base = Rules()
    exits = dataclasses.replace(base, max_giveback_percent=40.0, stop_loss_percent=10.0, cooldown_seconds=5.0)
    gates = dataclasses.replace(base, spy_iwm_lag_threshold=0.5, relative_volume_min=2.0)
    assert market_key(exits) == market_key(gates) == market_key(base)
    assert market_key(dataclasses.replace(base, vwap_window_seconds=90)) != market_key(base)
    shared = market_rules(exits)
    assert (
        market_key(shared) == market_key(exits) and shared.max_giveback_percent == base.max_giveback_percent
    )


def test_the_shared_market_computes_the_features_a_lone_feature_engine_does():
    rules = Rules()
    market, alone = MarketState(rules), FeatureEngine(rules)
    for b in burst_bars(at(10, 0)):
        assert market.apply(b) == alone.update(b) == market.fresh
    assert market.apply(bar(at(10, 0), 240.0)) is None and market.counters.late_bars == 1
    assert market.apply(Tick(at(10, 5))) is None and market.fresh is None


def test_a_new_new_york_day_starts_the_market_afresh():
    market = MarketState(Rules())
    for b in burst_bars(at(15, 0)):
        market.apply(b)
    market.apply(chain(at(15, 5), quote()))
    assert market.last is not None and market.chain is not None
    next_day = DAY + datetime.timedelta(days=1)
    market.apply(Tick(at(9, 0, day=next_day)))
    assert market.last is None and market.chain is None and market.counters.bars > 0
