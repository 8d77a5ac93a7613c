"""The vectorized features (features_vector) against FeatureEngine, the planned source's fallback, and
the fast replay (whole tape first, features planned) against the per-bar, line-by-line replay."""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import random
from pathlib import Path

import pytest
from builders import calendar
from conftest import T, short_script

from config import Rules
from engine import Engine
from events import Alert, Bar, Log
from features_vector import PlannedFeatures, day_features
from market_calendar import ny_ms
from market_state import MarketState, feature_days
from pnl_tracker import Journal
from replay import replay_tape
from signals import FeatureEngine, Features
from sim.market import SyntheticMarket, random_script, write_tape

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


# The fast replay (`--speed max`: whole tape decoded first, features planned) against the per-bar,
# line-by-line replay, over several seeded synthetic days.

REPLAY_SEEDS = (31, 32, 33)


@pytest.fixture(scope="module")
def seeded_tapes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three short synthetic days with scripted bursts, and a random day whose held contracts'
    quotes stream, each from its own seed; each makes round trips."""
    folder = tmp_path_factory.mktemp("seeded")
    tapes = []
    for offset, seed in enumerate(REPLAY_SEEDS):
        day = datetime.date(2025, 10, 6) + datetime.timedelta(days=offset)
        path = folder / f"{day.isoformat()}.jsonl.gz"
        tapes.append(write_tape(SyntheticMarket(short_script(day, seed)), path, end_ms=ny_ms(day, T(10, 25))))
    day = datetime.date(2025, 10, 10)
    path = folder / f"{day.isoformat()}.jsonl.gz"
    market = SyntheticMarket(random_script(day, 35))
    tapes.append(write_tape(market, path, end_ms=ny_ms(day, T(12, 0)), stream_quotes=4))
    return tapes


@dataclasses.dataclass(frozen=True, slots=True)
class Replayed:
    """What one replay produced: alerts and log lines as handed on, every journal table, the engine."""

    alerts: list[Alert]
    logs: list[Log]
    tables: dict[str, list[tuple[object, ...]]]
    engine: Engine


def replayed(tapes: list[Path], journal_path: Path, **options: object) -> Replayed:
    """The tapes replayed in order into one journal, with `replay_tape`'s `options`."""
    journal = Journal(journal_path)
    alerts: list[Alert] = []
    logs: list[Log] = []
    engine = Engine(RULES, calendar(RULES))
    for tape in tapes:
        engine = Engine(RULES, calendar(RULES))
        replay_tape(
            tape,
            rules=RULES,
            calendar=calendar(RULES),
            journal=journal,
            on_alerts=alerts.extend,
            on_log=logs.append,
            engine=engine,
            **options,  # type: ignore[arg-type]
        )
    tables = {table: journal.table_rows(table) for table in ("positions", "trades", "outbox", "meta")}
    journal.close()
    return Replayed(alerts, logs, tables, engine)


def assert_same_replay(fast: Replayed, slow: Replayed) -> None:
    """Identical alerts (texts included), log lines and journal rows."""
    assert fast.alerts == slow.alerts
    assert [(a.kind, a.title, a.message) for a in fast.alerts] == [
        (a.kind, a.title, a.message) for a in slow.alerts
    ]
    assert fast.logs == slow.logs
    assert fast.tables == slow.tables


@pytest.mark.parametrize("index", range(len(REPLAY_SEEDS) + 1))
def test_the_fast_replay_makes_the_per_bar_replays_decisions(seeded_tapes, tmp_path, index):
    tape = seeded_tapes[index]
    fast = replayed([tape], tmp_path / "fast.sqlite3")
    slow = replayed([tape], tmp_path / "slow.sqlite3", fast=False)
    assert_same_replay(fast, slow)
    assert fast.engine.market.planner.planned_days == 1 and fast.engine.market.planner.fallbacks == 0
    assert slow.engine.market.planner.planned_days == 0
    assert len(fast.tables["trades"]) >= 2, "every one of these days makes round trips"
    kinds = [a.kind for a in fast.alerts]
    assert kinds.count("BUY") >= 2 and kinds.count("SELL") >= 2


def test_a_paced_replay_streams_and_decides_as_the_fast_one(seeded_tapes, tmp_path):
    waits: list[float] = []
    paced = replayed(
        seeded_tapes[:1], tmp_path / "paced.sqlite3", speed=1e6, sleep=waits.append, clock=lambda: 0.0
    )
    fast = replayed(seeded_tapes[:1], tmp_path / "fast.sqlite3")
    assert_same_replay(fast, paced)
    assert paced.engine.market.planner.planned_days == 0 and waits


def test_days_replayed_in_turn_into_one_journal_agree(seeded_tapes, tmp_path):
    fast = replayed(seeded_tapes, tmp_path / "fast.sqlite3")
    slow = replayed(seeded_tapes, tmp_path / "slow.sqlite3", fast=False)
    assert_same_replay(fast, slow)
    assert len(fast.tables["trades"]) >= 6


def test_a_fast_replay_resumed_after_a_stop_agrees_with_one_pass(seeded_tapes, tmp_path):
    tape = seeded_tapes[0]
    whole = replayed([tape], tmp_path / "whole.sqlite3", fast=False)
    with gzip.open(tape, "rt") as handle:
        lines = handle.read().splitlines()
    half = tmp_path / "half" / tape.name
    half.parent.mkdir()
    with gzip.open(half, "wt") as handle:
        handle.write("\n".join(lines[: len(lines) // 2]) + "\n")
    first = replayed([half], tmp_path / "split.sqlite3")
    rest = replayed([tape], tmp_path / "split.sqlite3")
    assert [a.message for a in first.alerts + rest.alerts] == [a.message for a in whole.alerts]
    for table in ("positions", "trades", "outbox"):
        assert rest.tables[table] == whole.tables[table]
