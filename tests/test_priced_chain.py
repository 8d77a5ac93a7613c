"""The chain priced on arrival selects exactly what the full evaluation (`select_contract`) selects.

Random chains (a seeded generator, hypothesis-style) with missing greeks, crossed, zero and NaN
quotes, spots that moved between the chain's arrival and the selection, and delta bands whose edges
sit within a few 1e-9 of a quote's Black-Scholes delta.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from config import Rules
from contract_selector import SECONDS_PER_YEAR, Selection, bs_call_delta, bs_call_price, select_contract
from events import OptionQuote
from priced_chain import PricedChain, price_chain, select_priced

SESSION = "2025-10-02"
NOW_MS = 1_759_420_800_000  # 12:00 New York
RULES = Rules()
ODD_NUMBERS = (math.nan, math.inf, -math.inf, None, 0.0, -1.0)


def odd_or(rng: random.Random, value: float | None, chance: float = 0.04) -> float | None:
    """`value`, or now and then a NaN, an infinity, None, zero or a negative number."""
    return rng.choice(ODD_NUMBERS) if rng.random() < chance else value


def random_quote(rng: random.Random, n: int, spot: float, now_ms: int, t_years: float) -> OptionQuote:
    strike = round(spot * (1 + rng.uniform(-0.03, 0.03)) * 2) / 2
    sigma = rng.uniform(0.05, 2.5)
    model = bs_call_price(spot, strike, max(t_years, 1e-9), sigma) if strike > 0 else 1.0
    mid = max(model * (1 + rng.uniform(-0.05, 0.05)), rng.choice((0.01, 0.05, 0.05, 0.0)))
    half_spread = mid * rng.choice((0.001, 0.005, 0.01, 0.015, 0.05)) + rng.choice((0.0, 0.0, 0.005))
    bid, ask = mid - half_spread, mid + half_spread
    if rng.random() < 0.05:
        bid, ask = ask, bid  # crossed
    with_greeks = rng.random() < 0.5
    delta = bs_call_delta(spot, strike, max(t_years, 1e-9), sigma) if with_greeks and strike > 0 else None
    if delta is not None and rng.random() < 0.1:
        delta = rng.uniform(0.05, 0.6)  # a vendor's wrong delta: doubted when the call is in the money
    return OptionQuote(
        ticker=f"O:IWM251002C{n:08d}",
        strike=odd_or(rng, strike, 0.02),  # type: ignore[arg-type]
        expiry=SESSION if rng.random() < 0.95 else "2025-10-03",
        right="call" if rng.random() < 0.93 else "put",
        delta=odd_or(rng, delta, 0.05),
        iv=odd_or(rng, sigma if with_greeks else None, 0.05),
        bid=odd_or(rng, round(bid, rng.choice((2, 4, 9)))),
        ask=odd_or(rng, round(ask, rng.choice((2, 4, 9)))),
        bid_size=odd_or(rng, float(rng.choice((5, 50, 500, 500))), 0.02),  # type: ignore[arg-type]
        ask_size=float(rng.choice((50, 500, 500, 5))),
        volume=odd_or(rng, float(rng.randint(0, 5000)), 0.02),  # type: ignore[arg-type]
        open_interest=float(rng.randint(0, 5000)),
        quote_ms=None if rng.random() < 0.03 else now_ms - rng.randint(-1000, 40_000),
    )


def both_ways(
    quotes: list[OptionQuote], rules: Rules, arrival: tuple[float | None, int], now: tuple[float | None, int]
) -> tuple[Selection, Selection, PricedChain]:
    """(select_contract's answer, the priced chain's answer, the priced chain) at the BUY's spot and clock."""
    (arrival_spot, arrival_ms), (spot, now_ms) = arrival, now
    close_ms = NOW_MS + 4 * 3600 * 1000
    full = select_contract(
        quotes, rules=rules, session_date=SESSION, now_ms=now_ms, spot=spot, session_close_ms=close_ms
    )
    priced = price_chain(quotes, rules=rules, session_date=SESSION, spot=arrival_spot, now_ms=arrival_ms)
    return full, select_priced(priced, now_ms=now_ms, spot=spot, session_close_ms=close_ms), priced


def random_case(rng: random.Random) -> tuple[list[OptionQuote], Rules, tuple, tuple]:
    spot = rng.uniform(20.0, 600.0)
    close_ms = NOW_MS + 4 * 3600 * 1000
    # From hours before the close down to a few seconds before it (and now and then after it).
    now_ms = close_ms - rng.choice((4 * 3600_000, 3600_000, 600_000, 20_000, 2_000, -5_000))
    t_years = (close_ms - now_ms) / 1000 / SECONDS_PER_YEAR
    quotes = [random_quote(rng, n, spot, now_ms, t_years) for n in range(rng.randint(1, 60))]
    arrival_spot = rng.choice((spot, spot, spot * (1 + rng.uniform(-0.004, 0.004)), None))
    arrival = (arrival_spot, now_ms - rng.randint(0, 60_000))
    now = (odd_or(rng, spot, 0.03), now_ms)
    low = rng.uniform(0.05, 0.6)
    rules = dataclasses.replace(RULES, delta_min=low, delta_max=low + rng.uniform(0.0, 0.3))
    return quotes, rules, arrival, now


def test_random_chains_select_exactly_what_the_full_evaluation_selects() -> None:
    rng = random.Random(13)
    chosen = bs_deltas = doubted = 0
    for _ in range(600):
        quotes, rules, arrival, now = random_case(rng)
        full, fast, _ = both_ways(quotes, rules, arrival, now)
        assert fast == full
        chosen += full.chosen is not None
        bs_deltas += sum(
            1 for q in quotes if (q.delta is None or not math.isfinite(q.delta)) and q.right == "call"
        )
        spot = now[0]
        doubted += sum(
            1
            for q in quotes
            if spot is not None
            and q.delta is not None
            and q.strike is not None
            and math.isfinite(spot)
            and q.delta < 0.5
            and math.isfinite(q.strike)
            and q.strike < spot * 0.985
        )
    # The cases reach both outcomes and many quotes without greeks (or the comparison proves little).
    assert chosen > 60
    assert bs_deltas > 3000
    assert doubted > 100


def test_band_edges_a_hair_from_a_black_scholes_delta_decide_as_the_full_evaluation() -> None:
    """Band edges within a few 1e-9 of the bisection's delta: the cached path must not guess the side."""
    rng = random.Random(7)
    decided_by_edge = 0
    for _ in range(150):
        quotes, rules, arrival, now = random_case(rng)
        full, _, _ = both_ways(quotes, dataclasses.replace(rules, delta_min=0.0, delta_max=1.0), arrival, now)
        black_scholes = [c for c in [full.chosen] if c and c.delta_source == "black_scholes"]
        if not black_scholes:
            continue
        delta = black_scholes[0].delta
        for offset in (-3e-9, -1e-9, -1e-12, 0.0, 1e-12, 1e-9, 3e-9):
            for band in ((delta + offset, 1.0), (0.0, delta + offset)):
                edged = dataclasses.replace(rules, delta_min=band[0], delta_max=band[1])
                full_edge, fast_edge, _ = both_ways(quotes, edged, arrival, now)
                assert fast_edge == full_edge
                decided_by_edge += 1
    assert decided_by_edge > 100


def test_quotes_without_greeks_get_a_total_volatility_on_arrival_and_the_same_delta_later() -> None:
    spot, close_ms = 240.0, NOW_MS + 4 * 3600 * 1000
    t_years = (close_ms - NOW_MS) / 1000 / SECONDS_PER_YEAR
    quotes = []
    for n, strike in enumerate((239.0, 240.0, 240.5, 241.0, 242.0)):
        mid = bs_call_price(spot, strike, t_years, 0.3)
        quote = OptionQuote(f"O:IWM251002C{n:08d}", strike, SESSION, "call", None, None, mid * 0.995,
                            mid * 1.005, 50.0, 50.0, 1000.0 + n, 1000.0, NOW_MS - 1000)  # fmt: skip
        quotes.append(quote)
    full, fast, priced = both_ways(quotes, RULES, (spot, NOW_MS - 5000), (spot + 0.05, NOW_MS))
    assert all(p.total_vol is not None and p.total_vol > 0 for p in priced.quotes)
    # w = sigma * sqrt(T) of the 0.3 the mids were priced at (the spread is symmetric around them)
    assert priced.quotes[1].total_vol == pytest.approx(0.3 * math.sqrt(t_years), rel=1e-3)
    assert fast == full
    assert fast.chosen is not None and fast.chosen.delta_source == "black_scholes"


def test_rules_and_session_day_are_those_the_chain_was_priced_for() -> None:
    quote = OptionQuote("O:IWM251002C00243000", 243.0, SESSION, "call", 0.375, 0.22, 2.0, 2.04,
                        50.0, 50.0, 500.0, 1000.0, NOW_MS - 1000)  # fmt: skip
    tight = dataclasses.replace(RULES, max_spread_percent=1.0)
    priced = price_chain([quote], rules=tight, session_date=SESSION, spot=243.5, now_ms=NOW_MS)
    selection = select_priced(priced, now_ms=NOW_MS, spot=243.5, session_close_ms=NOW_MS + 3600_000)
    assert selection.rejections == (("O:IWM251002C00243000", "wide_spread"),)
    other_day = price_chain([quote], rules=RULES, session_date="2025-10-03", spot=243.5, now_ms=NOW_MS)
    assert other_day.quotes[0].early_reason == "wrong_expiry"
