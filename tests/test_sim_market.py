"""The synthetic market: wire shapes, realism, traps, and that the demo day trades as scripted.

The entry check and the small reference trader here are written from DESIGN §4 on purpose, without
importing signals.py or engine.py, so they cross-check the generator rather than share its bugs.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sim.market import (
    DayScript,
    Episode,
    SyntheticMarket,
    demo_script,
    random_script,
    write_tape,
)
from tape import TapeReader

DAY = datetime.date(2025, 10, 2)
OPEN_MS = 1759411800000  # 2025-10-02 09:30 EDT
CHAIN_PATH = "/v3/snapshot/options/IWM?expiration_date=2025-10-02&contract_type=call&limit=250"


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return SyntheticMarket(demo_script())


@pytest.fixture(scope="module")
def demo_tape(market: SyntheticMarket, tmp_path_factory: pytest.TempPathFactory) -> Path:
    started = time.perf_counter()
    path = write_tape(market, tmp_path_factory.mktemp("tape") / "2025-10-02.jsonl.gz")
    print(f"demo tape built in {time.perf_counter() - started:.2f} s ({path.stat().st_size / 1e6:.1f} MB)")
    return path


def _ms(at: datetime.time) -> int:
    return OPEN_MS + ((at.hour - 9) * 3600 + (at.minute - 30) * 60 + at.second) * 1000


# ---------------------------------------------------------------------------------------------------
# Scripts and session


def test_demo_script_is_a_thursday_with_four_bursts_after_0940() -> None:
    script = demo_script()
    assert script.session_date == DAY and DAY.weekday() == 3
    bursts = [e.start for e in script.episodes if e.kind == "burst"]
    assert bursts == [
        datetime.time(10, 6, 12),
        datetime.time(11, 12, 5),
        datetime.time(13, 12),
        datetime.time(15, 12),
    ]


def test_session_bounds_are_0930_to_1600_new_york(market: SyntheticMarket) -> None:
    assert market.session_open_ms == OPEN_MS
    assert market.session_close_ms == OPEN_MS + 23_400_000


def test_unknown_episode_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown episode kind"):
        Episode(datetime.time(10), "moon", 10, 1.0)


def test_random_scripts_are_reproducible_and_varied() -> None:
    first = random_script(datetime.date(2025, 10, 6), 7)
    assert first == random_script(datetime.date(2025, 10, 6), 7)
    assert first != random_script(datetime.date(2025, 10, 6), 8)
    assert sum(e.kind == "burst" for e in first.episodes) >= 3
    starts = [e.start for e in first.episodes]
    assert starts == sorted(starts)


# ---------------------------------------------------------------------------------------------------
# Bars and frames


def test_bars_have_the_wire_shape_and_never_zero_volume(market: SyntheticMarket) -> None:
    bars = market.bars("IWM")
    keys = ["ev", "sym", "v", "av", "op", "vw", "o", "c", "h", "l", "a", "z", "s", "e"]
    assert all(list(b) == keys for b in bars)
    assert bars[0]["s"] == OPEN_MS and bars[-1]["s"] <= OPEN_MS + 23_399_000
    assert all(b["e"] == b["s"] + 1000 and b["s"] % 1000 == 0 for b in bars)
    assert all(isinstance(b["v"], int) and b["v"] > 0 for b in bars)
    assert all(b["l"] <= min(b["o"], b["c"]) <= max(b["o"], b["c"]) <= b["h"] for b in bars)
    assert all(round(b[k], 2) == b[k] for b in bars for k in ("o", "c", "h", "l"))
    assert all(b["l"] - 0.005 <= b["vw"] <= b["h"] + 0.005 and round(b["vw"], 4) == b["vw"] for b in bars)
    assert all(b["op"] == bars[0]["o"] for b in bars)
    av = [b["av"] for b in bars]
    assert av[0] > 100_000 and all(later > earlier for earlier, later in zip(av, av[1:], strict=False))


def test_prices_look_like_iwm_and_spy_on_a_real_day(market: SyntheticMarket) -> None:
    iwm = np.array([b["c"] for b in market.bars("IWM")])
    spy = np.array([b["c"] for b in market.bars("SPY")])
    assert 235 < iwm.min() < iwm.max() < 245 and 0.4 < (iwm.max() - iwm.min()) / iwm.mean() * 100 < 2.5
    assert 650 < spy.min() < spy.max() < 680
    assert 15e6 < market.bars("IWM")[-1]["av"] < 60e6
    day_vwap = market.bars("IWM")[-1]["a"]
    assert iwm.min() < day_vwap < iwm.max()


def test_spy_moves_with_iwm(market: SyntheticMarket) -> None:
    iwm = {b["s"]: b["c"] for b in market.bars("IWM")}
    spy = {b["s"]: b["c"] for b in market.bars("SPY")}
    minutes = [OPEN_MS + m * 60_000 for m in range(390)]
    iwm_m = np.log([iwm.get(t) or iwm[max(k for k in iwm if k <= t)] for t in minutes])
    spy_m = np.log([spy[t] for t in minutes])
    corr = np.corrcoef(np.diff(iwm_m), np.diff(spy_m))[0, 1]
    assert corr > 0.6


def test_volume_is_u_shaped(market: SyntheticMarket) -> None:
    per_minute = np.zeros(390)
    for b in market.bars("IWM"):
        per_minute[(b["s"] - OPEN_MS) // 60_000] += b["v"]
    first, middle, last = per_minute[:15].mean(), per_minute[150:240].mean(), per_minute[-15:].mean()
    assert first > 2.5 * middle and last > 1.5 * middle


def test_quiet_stretches_have_seconds_without_bars_and_busy_ones_do_not(market: SyntheticMarket) -> None:
    starts = {b["s"] for b in market.bars("IWM")}
    quiet = range(_ms(datetime.time(11, 40)), _ms(datetime.time(12, 20)), 1000)
    missing = [s for s in quiet if s not in starts]
    assert 0.15 * len(quiet) < len(missing) < 0.45 * len(quiet)
    busy = range(OPEN_MS, _ms(datetime.time(9, 48)), 1000)
    assert all(s in starts for s in busy)
    ordered = sorted(starts)
    assert max(b - a for a, b in zip(ordered, ordered[1:], strict=False)) <= 4000
    assert len(market.bars("SPY")) == 23_400


def test_ws_frames_arrive_after_the_second_in_both_framings_and_orders(market: SyntheticMarket) -> None:
    frames = list(market.ws_frames())
    times = [t for t, _ in frames]
    assert times == sorted(times)
    assert all(150 <= t - event["e"] <= 401 for t, frame in frames for event in frame)
    shapes = {tuple(event["sym"] for event in frame) for _, frame in frames}
    assert shapes == {("IWM", "SPY"), ("SPY", "IWM"), ("IWM",), ("SPY",)}
    separate = [
        (a[1][0]["sym"], b[1][0]["sym"])
        for a, b in zip(frames, frames[1:], strict=False)
        if a[1][0]["s"] == b[1][0]["s"]
    ]
    assert ("IWM", "SPY") in separate and ("SPY", "IWM") in separate
    assert sum(len(frame) for _, frame in frames) == len(market.bars("IWM")) + len(market.bars("SPY"))


def test_spot_is_the_last_close(market: SyntheticMarket) -> None:
    bars = market.bars("IWM")
    assert market.spot_at(OPEN_MS - 5000) == bars[0]["o"]
    assert market.spot_at(OPEN_MS + 1000) == bars[0]["c"]
    assert market.spot_at(OPEN_MS + 1999) == bars[0]["c"]
    quiet = _ms(datetime.time(11, 45))
    last = max((b for b in bars if b["e"] <= quiet), key=lambda b: b["s"])
    assert market.spot_at(quiet) == last["c"]


def test_rest_aggs_match_the_stream(market: SyntheticMarket) -> None:
    body = market.aggs("IWM", OPEN_MS, OPEN_MS + 59_000)
    bars = market.bars("IWM")[:60]
    assert body["resultsCount"] == 60 and body["status"] == "OK" and body["ticker"] == "IWM"
    first = body["results"][0]
    assert set(first) == {"v", "vw", "o", "c", "h", "l", "t", "n"}
    assert [(r["t"], r["c"], r["v"]) for r in body["results"]] == [(b["s"], b["c"], b["v"]) for b in bars]


def test_minute_aggs_give_a_profile_for_past_weekdays_only(market: SyntheticMarket) -> None:
    past = market.minute_aggs("IWM", datetime.date(2025, 10, 1))
    minutes = past["results"]
    rth = [m for m in minutes if 570 <= _minute_of_day(m["t"]) < 960]
    assert len(rth) == 390 and len(minutes) > 390
    assert all(m["v"] > 0 for m in minutes)
    assert 0.5 < sum(m["v"] for m in rth) / 30e6 < 2.0
    assert "results" not in market.minute_aggs("IWM", datetime.date(2025, 9, 28))
    assert market.minute_aggs("IWM", datetime.date(2025, 10, 3))["resultsCount"] == 0
    today = market.minute_aggs("IWM", DAY)["results"]
    assert today[0]["t"] == OPEN_MS and sum(m["v"] for m in today) == sum(b["v"] for b in market.bars("IWM"))
    assert past == market.minute_aggs("IWM", datetime.date(2025, 10, 1))


def _minute_of_day(ms: int) -> int:
    at = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone(datetime.timedelta(hours=-4)))
    return at.hour * 60 + at.minute


# ---------------------------------------------------------------------------------------------------
# Chain snapshots


def _results(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for page in pages for r in page["results"]]


def test_chain_pages_follow_next_url(market: SyntheticMarket) -> None:
    at = _ms(datetime.time(10, 30))
    pages = market.chain_pages(at, page_size=20)
    assert len(pages) == 2 and len(pages[0]["results"]) == 20 and 5 < len(pages[1]["results"]) <= 20
    assert pages[0]["next_url"] == f"https://api.massive.com{CHAIN_PATH}&cursor=p2"
    assert "next_url" not in pages[1]
    assert all(page["status"] == "OK" and len(page["request_id"]) == 32 for page in pages)
    assert _results(pages) == _results(market.chain_pages(at))
    tickers = [r["details"]["ticker"] for r in _results(pages)]
    assert tickers == sorted(tickers)
    filtered = _results(market.chain_pages(at, strike_gte=238, strike_lte=241.5))
    assert {r["details"]["strike_price"] for r in filtered} <= {
        238,
        238.5,
        239,
        239.5,
        240,
        240.5,
        241,
        241.5,
    }


def test_chain_result_has_the_vendor_shape(market: SyntheticMarket) -> None:
    at = _ms(datetime.time(10, 30))
    result = next(r for r in _results(market.chain_pages(at)) if r["details"]["strike_price"] == 240)
    assert list(result) == [
        "break_even_price",
        "day",
        "details",
        "greeks",
        "implied_volatility",
        "last_quote",
        "open_interest",
        "underlying_asset",
    ]
    assert result["details"] == {
        "contract_type": "call",
        "exercise_style": "american",
        "expiration_date": "2025-10-02",
        "shares_per_contract": 100,
        "strike_price": 240,
        "ticker": "O:IWM251002C00240000",
    }
    quote = result["last_quote"]
    assert quote["ask"] == round(quote["bid"] + 0.01, 2) and 10 <= quote["bid_size"] <= 300
    assert quote["midpoint"] == round((quote["bid"] + quote["ask"]) / 2, 4)
    assert 0 <= at - quote["last_updated"] // 1_000_000 <= 2500
    assert result["break_even_price"] == round(240 + quote["midpoint"], 4)
    assert result["underlying_asset"]["price"] == market.spot_at(at)
    assert result["day"]["volume"] > 1000 and 100 <= result["open_interest"] <= 10_000
    assert set(result["greeks"]) == {"delta", "gamma", "theta", "vega"}


def test_quotes_are_black_scholes_with_a_smile(market: SyntheticMarket) -> None:
    at = _ms(datetime.time(11, 0))
    spot = market.spot_at(at)
    t_years = (market.session_close_ms - at) / 1000 / (365 * 86400)
    whole = [r for r in _results(market.chain_pages(at)) if float(r["details"]["strike_price"]).is_integer()]
    for r in whole:
        strike, iv = r["details"]["strike_price"], r["implied_volatility"]
        d1 = (math.log(spot / strike) + 0.5 * iv * iv * t_years) / (iv * math.sqrt(t_years))
        theo = spot * _ncdf(d1) - strike * _ncdf(d1 - iv * math.sqrt(t_years))
        assert abs(r["greeks"]["delta"] - _ncdf(d1)) < 1e-4
        q = r["last_quote"]
        assert q["bid"] - 0.01 <= theo <= q["ask"] + 0.01
    ivs = {r["details"]["strike_price"]: r["implied_volatility"] for r in whole}
    atm = min(ivs, key=lambda k: abs(k - spot))
    assert 0.3 < ivs[atm] < 0.5 and ivs[atm + 5] > ivs[atm] and ivs[atm - 5] > ivs[atm]
    band = [r for r in whole if 0.30 <= r["greeks"]["delta"] <= 0.45]
    assert band and all(spot < r["details"]["strike_price"] <= spot + 3 for r in band)


def _ncdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_strikes_span_twelve_dollars_each_side_all_day(market: SyntheticMarket) -> None:
    for at in (_ms(datetime.time(9, 30)), _ms(datetime.time(12, 0)), _ms(datetime.time(15, 59))):
        spot = market.spot_at(at)
        strikes = {r["details"]["strike_price"] for r in _results(market.chain_pages(at))}
        assert set(range(math.ceil(spot - 12), math.floor(spot + 12) + 1)) <= strikes


def test_every_snapshot_has_the_traps(market: SyntheticMarket) -> None:
    for at in range(_ms(datetime.time(9, 31)), market.session_close_ms, 1_800_000):
        results = _results(market.chain_pages(at))
        quotes = [(r, r["last_quote"]) for r in results]
        wide = [r for r, q in quotes if q["bid"] > 0 and (q["ask"] - q["bid"]) / q["midpoint"] > 0.04]
        # The half-dollar strike nearest 0.40 delta; late in the day strikes are far apart in delta.
        assert any(
            r["details"]["strike_price"] % 1 == 0.5 and 0.2 <= r["greeks"]["delta"] <= 0.6 for r in wide
        )
        assert any(q["bid"] == 0 and q["ask"] > 0 for _, q in quotes)
        no_greeks = [r for r in results if r["greeks"] == {}]
        assert len(no_greeks) == 1 and "implied_volatility" not in no_greeks[0]
        assert 0 < no_greeks[0]["last_quote"]["bid"] < no_greeks[0]["last_quote"]["ask"]
        stale = [q for _, q in quotes if at - q["last_updated"] // 1_000_000 >= 300_000]
        assert len(stale) == 1
        assert len([q for _, q in quotes if q["ask"] < q["bid"]]) == 1


def test_one_snapshot_carries_one_contract_of_another_expiry(market: SyntheticMarket) -> None:
    def other(at: int) -> list[str]:
        return [
            r["details"]["ticker"]
            for r in _results(market.chain_pages(at))
            if r["details"]["expiration_date"] != "2025-10-02"
        ]

    assert other(_ms(datetime.time(9, 59, 50))) == [] and other(_ms(datetime.time(10, 0, 10))) == []
    [ticker] = other(_ms(datetime.time(10, 0)))
    assert ticker.startswith("O:IWM251003C")


def test_option_volume_grows_and_day_is_empty_before_the_first_trade(market: SyntheticMarket) -> None:
    def atm_volume(at: int) -> int:
        result = next(r for r in _results(market.chain_pages(at)) if r["details"]["strike_price"] == 240)
        return result["day"].get("volume", 0)

    assert market.chain_pages(OPEN_MS)[0]["results"][0]["day"] == {}
    volumes = [atm_volume(_ms(datetime.time(h, m))) for h, m in ((9, 45), (11, 0), (13, 0), (15, 50))]
    assert volumes == sorted(volumes) and volumes[0] > 100 and volumes[-1] > 5000


def test_contract_snapshot_matches_the_chain(market: SyntheticMarket) -> None:
    at = _ms(datetime.time(11, 0))
    body = market.contract_snapshot("O:IWM251002C00240000", at)
    assert body["status"] == "OK" and isinstance(body["results"], dict)
    from_chain = next(r for r in _results(market.chain_pages(at)) if r["details"]["strike_price"] == 240)
    for key in ("details", "greeks", "implied_volatility", "open_interest"):
        assert body["results"][key] == from_chain[key]
    assert body["results"]["last_quote"]["bid"] == from_chain["last_quote"]["bid"]
    with pytest.raises(KeyError):
        market.contract_snapshot("O:SPY251002C00240000", at)


# ---------------------------------------------------------------------------------------------------
# Determinism and the tape


def test_same_seed_gives_the_same_market_and_another_seed_does_not(market: SyntheticMarket) -> None:
    again = SyntheticMarket(demo_script())
    assert again.bars("IWM") == market.bars("IWM") and again.bars("SPY") == market.bars("SPY")
    assert list(again.ws_frames())[:500] == list(market.ws_frames())[:500]
    at = _ms(datetime.time(12, 0))
    assert again.chain_pages(at, page_size=20) == market.chain_pages(at, page_size=20)
    other = SyntheticMarket(DayScript(DAY, 1, 240.12, demo_script().episodes))
    assert other.bars("IWM") != market.bars("IWM")


def test_same_script_writes_the_same_tape_bytes(tmp_path: Path) -> None:
    script = DayScript(DAY, 5, 231.5, ())
    first = write_tape(SyntheticMarket(script), tmp_path / "a.jsonl.gz", chain_every_s=600)
    second = write_tape(SyntheticMarket(script), tmp_path / "b.jsonl.gz", chain_every_s=600)
    assert first.read_bytes() == second.read_bytes()


def test_demo_tape_reads_back_in_the_documented_format(demo_tape: Path) -> None:
    reader = TapeReader(demo_tape)
    assert reader.meta == {"format": "tape/1", "underlying": "IWM", "benchmark": "SPY"}
    lines = list(reader)
    assert reader.bad_lines == 0
    assert [line.t for line in lines] == sorted(line.t for line in lines)
    statuses = [line.payload[0]["status"] for line in lines[1:4]]
    assert statuses == ["connected", "auth_success", "success"]
    rest = [line for line in lines if line.kind == "rest"]
    assert len(rest) == 2 * 2340 and all(line.status == 200 for line in rest)
    assert rest[0].path == CHAIN_PATH and rest[1].path == f"{CHAIN_PATH}&cursor=p2"
    assert rest[0].payload["next_url"].endswith(rest[1].path) and "next_url" not in rest[1].payload
    assert rest[0].t < rest[1].t < rest[0].t + 1000
    bars = sum(len(line.payload) for line in lines if line.kind == "ws" and line.payload[0]["ev"] == "A")
    assert bars == 22235 + 23400


# ---------------------------------------------------------------------------------------------------
# §4 by brute force: entry conditions, and a small reference trader over the demo tape


@dataclass(frozen=True, slots=True)
class _Series:
    s: np.ndarray
    c: np.ndarray
    v: np.ndarray
    vwap: np.ndarray


def _series(bars: list[dict[str, Any]]) -> _Series:
    s = np.array([b["s"] for b in bars], dtype=np.int64) // 1000
    c = np.array([b["c"] for b in bars])
    v = np.array([b["v"] for b in bars], dtype=float)
    pv = np.concatenate(([0.0], np.cumsum(np.array([b["vw"] for b in bars]) * v)))
    cv = np.concatenate(([0.0], np.cumsum(v)))
    first = np.searchsorted(s, s - 60, side="right")
    last = np.arange(len(s)) + 1
    return _Series(s, c, v, (pv[last] - pv[first]) / (cv[last] - cv[first]))


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _entry(series: _Series, j: int) -> bool:
    """Close > 60-s VWAP, VWAP rising over 30 s (>= 10 points), volume > p95 of 1200 s, momentum > 0."""
    s, c = series.s, series.c
    if not c[j] > series.vwap[j]:
        return False
    lo = np.searchsorted(s, s[j] - 30, side="right")
    if j + 1 - lo < 10 or not _slope(s[lo : j + 1], series.vwap[lo : j + 1]) > 0:
        return False
    if not _slope(s[lo : j + 1], c[lo : j + 1]) / c[lo : j + 1].mean() * 100 > 0:
        return False
    previous = series.v[np.searchsorted(s, s[j] - 1200, side="right") : j]
    return len(previous) >= 60 and series.v[j] > np.percentile(previous, 95)


def _burst_spans(script: DayScript) -> list[tuple[int, int]]:
    return [
        (_ms(e.start) // 1000, _ms(e.start) // 1000 + e.seconds) for e in script.episodes if e.kind == "burst"
    ]


def test_entry_conditions_all_hold_inside_every_demo_burst(market: SyntheticMarket) -> None:
    series = _series(market.bars("IWM"))
    for start, stop in _burst_spans(demo_script()):
        inside = np.flatnonzero((series.s >= start) & (series.s < stop))
        firing = [j for j in inside if _entry(series, j)]
        assert len(firing) >= 10, f"burst at {start} fires on {len(firing)} bars"


def test_entry_conditions_never_hold_outside_the_bursts(market: SyntheticMarket) -> None:
    series = _series(market.bars("IWM"))
    spans = _burst_spans(demo_script())
    window = (_ms(datetime.time(9, 35)) // 1000, _ms(datetime.time(15, 30)) // 1000)
    candidates = np.flatnonzero((series.s >= window[0]) & (series.s < window[1]) & (series.c > series.vwap))
    outside = [j for j in candidates if not any(a <= series.s[j] < b for a, b in spans)]
    assert [series.s[j] for j in outside if _entry(series, j)] == []


@dataclass(slots=True)
class _Position:
    ticker: str
    entry: float
    entry_ms: int
    mark: float
    bid: float
    peak: float
    below_since: int | None = None
    last_bar: int | None = None


@dataclass(slots=True)
class _Trader:
    """DESIGN §4 with default Rules, reduced to what the demo needs (greeks deltas, one contract)."""

    series: _Series
    trades: list[tuple[str, str, float, float]] = field(default_factory=list)
    chain: list[dict[str, Any]] | None = None
    chain_ms: int = 0
    position: _Position | None = None
    last_exit_ms: int = -(10**15)
    losses_in_a_row: int = 0

    def on_bar(self, t: int, j: int) -> None:
        if self.position is not None:
            below = self.series.c[j] < self.series.vwap[j]
            if not below:
                self.position.below_since = None
            elif self.position.below_since is None:
                self.position.below_since = t
            self.position.last_bar = j
            self.check_exit(t)
        elif self.may_enter(t) and _entry(self.series, j):
            self.enter(t)

    def on_chain(self, t: int, results: list[dict[str, Any]]) -> None:
        self.chain, self.chain_ms = results, t
        if self.position is None:
            return
        for r in results:
            q = r["last_quote"]
            if r["details"]["ticker"] == self.position.ticker and q["bid"] > 0 and q["ask"] >= q["bid"]:
                self.position.mark, self.position.bid = (q["bid"] + q["ask"]) / 2, q["bid"]
                self.position.peak = max(self.position.peak, self.position.mark)
        self.check_exit(t)

    def may_enter(self, t: int) -> bool:
        in_window = _ms(datetime.time(9, 35)) <= t < _ms(datetime.time(15, 30))
        fresh = self.chain is not None and t - self.chain_ms <= 60_000
        allowed = len(self.trades) < 4 and self.losses_in_a_row < 2 and t - self.last_exit_ms >= 60_000
        return in_window and fresh and allowed

    def enter(self, t: int) -> None:
        choice = _select(self.chain or [], t)
        if choice is not None:
            q = choice["last_quote"]
            mid = (q["bid"] + q["ask"]) / 2
            self.position = _Position(choice["details"]["ticker"], q["ask"], t, mid, q["bid"], mid)

    def check_exit(self, t: int) -> None:
        p = self.position
        if p is None:
            return
        giveback = (p.peak - p.mark) / p.peak
        under = p.last_bar is not None and self.series.c[p.last_bar] < self.series.vwap[p.last_bar]
        reasons = [
            (t >= _ms(datetime.time(15, 55)), "Time stop"),
            (p.mark <= p.entry * 0.85, "Stop loss"),
            (giveback >= 0.30, "Hard giveback"),
            (under and giveback >= 0.20, "VWAP giveback"),
            (p.below_since is not None and t - p.below_since >= 60_000, "VWAP persistence"),
        ]
        reason = next((name for hit, name in reasons if hit), None)
        if reason is not None:
            pnl = round((p.bid - p.entry) * 100, 2)
            self.trades.append((_clock(p.entry_ms), reason, pnl, round(p.peak / p.entry - 1, 3)))
            self.losses_in_a_row = self.losses_in_a_row + 1 if pnl <= 0 else 0
            self.position, self.last_exit_ms = None, t


def _select(results: list[dict[str, Any]], t: int) -> dict[str, Any] | None:
    ranked = []
    for r in results:
        q, delta = r["last_quote"], r["greeks"].get("delta")
        if r["details"]["expiration_date"] != "2025-10-02" or delta is None or not 0.30 <= delta <= 0.45:
            continue
        if not (q["bid"] > 0 and q["ask"] >= q["bid"] and min(q["bid_size"], q["ask_size"]) >= 10):
            continue
        mid = (q["bid"] + q["ask"]) / 2
        spread = (q["ask"] - q["bid"]) / mid * 100
        volume = r["day"].get("volume", 0)
        fresh = t - q["last_updated"] / 1e6 <= 30_000
        if spread <= 4 and volume >= 100 and r["open_interest"] >= 100 and fresh:
            ranked.append((-volume * mid, spread, abs(delta - 0.375), r["details"]["ticker"], r))
    return min(ranked, key=lambda row: row[:4])[4] if ranked else None


def _clock(ms: int) -> str:
    return datetime.datetime.fromtimestamp(
        ms / 1000, datetime.timezone(datetime.timedelta(hours=-4))
    ).strftime("%H:%M:%S")


def _replay(path: Path, series: _Series) -> Iterator[tuple[int, str, Any]]:
    """Tape lines as engine events, with a tick at every whole second that passes."""
    index = {int(s) * 1000: j for j, s in enumerate(series.s)}
    pages: list[dict[str, Any]] = []
    last_tick = None
    for line in TapeReader(path):
        if last_tick is not None:
            for tick in range(last_tick + 1000, line.t - line.t % 1000 + 1, 1000):
                yield tick, "tick", None
        last_tick = line.t - line.t % 1000
        if line.kind == "ws":
            for event in line.payload:
                if event.get("ev") == "A" and event["sym"] == "IWM":
                    yield line.t, "bar", index[event["s"]]
        elif line.kind == "rest":
            pages.append(line.payload)
            if "next_url" not in line.payload:
                yield line.t, "chain", [r for page in pages for r in page["results"]]
                pages = []


def test_demo_tape_trades_once_per_exit_rule(market: SyntheticMarket, demo_tape: Path) -> None:
    trader = _Trader(_series(market.bars("IWM")))
    for t, kind, item in _replay(demo_tape, trader.series):
        if kind == "bar":
            trader.on_bar(t, item)
        elif kind == "chain":
            trader.on_chain(t, item)
        else:
            trader.check_exit(t)
    print(trader.trades)
    assert [(entry[:5], reason) for entry, reason, _, _ in trader.trades] == [
        ("10:06", "Stop loss"),
        ("11:12", "VWAP persistence"),
        ("13:12", "Hard giveback"),
        ("15:12", "Time stop"),
    ]
    peaks = [peak for _, _, _, peak in trader.trades]
    assert peaks[0] < 0.15 and all(0.2 <= peak <= 0.75 for peak in peaks[1:])
    assert [pnl > 0 for _, _, pnl, _ in trader.trades] == [False, True, True, True]
