"""Tests for contract_selector: filters, reasons, Black-Scholes delta and ranking."""

from __future__ import annotations

import dataclasses
import math

import pytest

from config import Rules
from contract_selector import (
    Candidate,
    Selection,
    bs_call_delta,
    bs_call_price,
    implied_vol,
    quote_mid,
    select_contract,
    years_until,
)
from events import OptionQuote

SESSION = "2025-10-02"
NOW_MS = 1_759_420_800_000  # 2025-10-02 12:00 New York
CLOSE_MS = NOW_MS + 4 * 3600 * 1000
RULES = Rules()


def make_quote(**overrides: object) -> OptionQuote:
    """A quote that passes every default rule (delta 0.375 from greeks, spread 1.98 %)."""
    fields: dict[str, object] = {
        "ticker": "O:IWM251002C00243000",
        "strike": 243.0,
        "expiry": SESSION,
        "right": "call",
        "delta": 0.375,
        "iv": 0.22,
        "bid": 2.00,
        "ask": 2.04,
        "bid_size": 50.0,
        "ask_size": 50.0,
        "volume": 500.0,
        "open_interest": 1000.0,
        "quote_ms": NOW_MS - 1000,
    }
    fields.update(overrides)
    return OptionQuote(**fields)  # type: ignore[arg-type]


def select(
    *quotes: OptionQuote,
    rules: Rules = RULES,
    spot: float | None = 243.5,
    close_ms: int = CLOSE_MS,
) -> Selection:
    return select_contract(
        quotes, rules=rules, session_date=SESSION, now_ms=NOW_MS, spot=spot, session_close_ms=close_ms
    )


def reason_for(quote: OptionQuote, **kwargs: object) -> str | None:
    """The single rejection reason for `quote`, or None when it is chosen."""
    selection = select(quote, **kwargs)  # type: ignore[arg-type]
    if selection.chosen is not None:
        assert selection.rejections == ()
        return None
    assert len(selection.rejections) == 1
    return selection.rejections[0][1]


# Independent reference for Black-Scholes: the normal CDF by Marsaglia's Taylor series (no erf)
# and delta by a central difference of the price.


def series_norm_cdf(x: float) -> float:
    term, total, n = x, x, 1
    while abs(term) > 1e-17 * abs(total):
        term *= x * x / (2 * n + 1)
        total += term
        n += 1
    return 0.5 + total * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def reference_call_price(spot: float, strike: float, t: float, sigma: float) -> float:
    d1 = (math.log(spot / strike) + sigma * sigma * t / 2) / (sigma * math.sqrt(t))
    d2 = d1 - sigma * math.sqrt(t)
    return spot * series_norm_cdf(d1) - strike * series_norm_cdf(d2)


def reference_call_delta(spot: float, strike: float, t: float, sigma: float) -> float:
    h = spot * 1e-5
    up = reference_call_price(spot + h, strike, t, sigma)
    down = reference_call_price(spot - h, strike, t, sigma)
    return (up - down) / (2 * h)


ZERO_DTE_SPOT = 220.0
ZERO_DTE_STRIKE = 220.5
ZERO_DTE_SIGMA = 0.30
ZERO_DTE_CLOSE_MS = NOW_MS + 3 * 3600 * 1000
ZERO_DTE_T = 3 * 3600 / (365 * 86400)


def test_black_scholes_matches_hull_textbook_example() -> None:
    assert bs_call_price(42, 40, 0.5, 0.20, r=0.10) == pytest.approx(4.76, abs=0.005)
    assert bs_call_delta(42, 40, 0.5, 0.20, r=0.10) == pytest.approx(0.7791, abs=0.00005)
    assert implied_vol(4.759422392871535, 42, 40, 0.5, r=0.10) == pytest.approx(0.20, abs=1e-6)


def test_black_scholes_matches_independent_series_reference_on_a_zero_dte_call() -> None:
    args = (ZERO_DTE_SPOT, ZERO_DTE_STRIKE, ZERO_DTE_T, ZERO_DTE_SIGMA)
    price = reference_call_price(*args)
    assert price == pytest.approx(0.278039, abs=1e-6)
    assert bs_call_price(*args) == pytest.approx(price, abs=1e-10)
    assert bs_call_delta(*args) == pytest.approx(reference_call_delta(*args), abs=1e-6)
    assert implied_vol(price, ZERO_DTE_SPOT, ZERO_DTE_STRIKE, ZERO_DTE_T) == pytest.approx(
        ZERO_DTE_SIGMA, abs=1e-6
    )


def test_contract_without_greeks_gets_black_scholes_delta_from_its_mid() -> None:
    price = reference_call_price(ZERO_DTE_SPOT, ZERO_DTE_STRIKE, ZERO_DTE_T, ZERO_DTE_SIGMA)
    quote = make_quote(strike=ZERO_DTE_STRIKE, delta=None, iv=None, bid=price - 0.004, ask=price + 0.004)
    selection = select(quote, spot=ZERO_DTE_SPOT, close_ms=ZERO_DTE_CLOSE_MS)
    chosen = selection.chosen
    assert chosen is not None
    assert chosen.delta_source == "black_scholes"
    expected_delta = reference_call_delta(ZERO_DTE_SPOT, ZERO_DTE_STRIKE, ZERO_DTE_T, ZERO_DTE_SIGMA)
    assert expected_delta == pytest.approx(0.3423, abs=0.0001)
    assert abs(chosen.delta - expected_delta) < 0.005
    assert chosen.iv == pytest.approx(ZERO_DTE_SIGMA, abs=1e-6)


def test_non_finite_delta_falls_back_to_black_scholes() -> None:
    price = reference_call_price(ZERO_DTE_SPOT, ZERO_DTE_STRIKE, ZERO_DTE_T, ZERO_DTE_SIGMA)
    quote = make_quote(strike=ZERO_DTE_STRIKE, delta=math.nan, bid=price - 0.004, ask=price + 0.004)
    chosen = select(quote, spot=ZERO_DTE_SPOT, close_ms=ZERO_DTE_CLOSE_MS).chosen
    assert chosen is not None
    assert chosen.delta_source == "black_scholes"
    assert chosen.iv == pytest.approx(ZERO_DTE_SIGMA, abs=1e-6)


def test_greeks_delta_is_used_as_given_and_missing_iv_stays_none() -> None:
    chosen = select(make_quote(delta=0.41, iv=None)).chosen
    assert isinstance(chosen, Candidate)
    assert chosen.quote == make_quote(delta=0.41, iv=None)
    assert (chosen.delta, chosen.delta_source, chosen.iv, chosen.mid) == (0.41, "greeks", None, 2.02)
    assert chosen.spread_pct == pytest.approx(1.9801980198, abs=1e-9)
    assert select(make_quote(iv=math.inf)).chosen.iv is None  # type: ignore[union-attr]
    assert select(make_quote(iv=0.31)).chosen.iv == 0.31  # type: ignore[union-attr]


def test_a_vendor_delta_no_call_in_the_money_can_have_is_not_believed() -> None:
    """An audit's chain said delta 0.40 for the 228 call with IWM at 240: ranked first by volume x mid,
    it was bought at $12.00. Any call whose strike is below the spot has a delta above 0.5, so that
    delta is doubted and the quote is judged as one without greeks (here: at intrinsic, no delta)."""
    spot = 240.0
    in_the_money = make_quote(ticker="O:IWM251002C00228000", strike=228.0, delta=0.40, bid=11.95, ask=12.05)
    price = bs_call_price(spot, 241.0, years_until(NOW_MS, CLOSE_MS), 0.25)
    honest = make_quote(
        ticker="O:IWM251002C00241000", strike=241.0, delta=0.38, bid=price - 0.002, ask=price + 0.002
    )
    selection = select(in_the_money, honest, spot=spot)
    assert selection.chosen is not None and selection.chosen.quote == honest
    assert selection.rejections == (("O:IWM251002C00228000", "no_delta"),)


def test_a_doubted_vendor_delta_gives_way_to_black_scholes_from_the_mid() -> None:
    t_years, moved = years_until(NOW_MS, CLOSE_MS), 243.0 / 0.985  # the strike 1.5 % under the spot
    price = bs_call_price(moved, 243.0, t_years, 0.25)
    quote = make_quote(strike=243.0, delta=0.40, bid=price - 0.01, ask=price + 0.01)
    far_above = select(quote, spot=moved)
    assert far_above.chosen is None and far_above.rejections == ((quote.ticker, "delta_out_of_band"),)
    # Within 1 % of the spot the vendor's delta stands: the spot may have moved since the snapshot.
    near = select(quote, spot=243.0 / 0.995).chosen
    assert near is not None and (near.delta, near.delta_source) == (0.40, "greeks")
    above_intrinsic = make_quote(strike=243.0, delta=0.62, bid=7.50, ask=7.60)
    assert select(above_intrinsic, spot=250.0).rejections[0][1] == "delta_out_of_band"


def test_a_quote_below_its_intrinsic_value_is_not_bought_on_its_vendor_delta() -> None:
    """An audit's 219 call quoted 1.00 x 1.01 with the spot at 220.33 (intrinsic 1.33, only 0.6 % in the
    money) ranked first on its vendor delta 0.40 and was bought: no market quotes a call below intrinsic.
    At a spot where the quote is above intrinsic, the vendor's delta stands."""
    below = make_quote(ticker="O:IWM251002C00219000", strike=219.0, delta=0.40, bid=1.00, ask=1.01)
    price = bs_call_price(220.33, 221.0, years_until(NOW_MS, CLOSE_MS), 0.25)
    honest = make_quote(
        ticker="O:IWM251002C00221000", strike=221.0, delta=0.37, bid=price - 0.002, ask=price + 0.002
    )
    at_220 = select(below, honest, spot=220.33)
    assert at_220.chosen is not None and at_220.chosen.quote == honest
    assert at_220.rejections == (("O:IWM251002C00219000", "no_delta"),)
    believed = select(below, spot=219.9).chosen
    assert believed is not None and (believed.delta, believed.delta_source) == (0.40, "greeks")
    deep = make_quote(
        strike=200.0, delta=0.44, bid=5.0, ask=5.1
    )  # a band delta on a deep one, below intrinsic
    assert select(deep, spot=220.33).rejections[0][1] == "no_delta"


def test_not_call() -> None:
    assert reason_for(make_quote(right="put")) == "not_call"


@pytest.mark.parametrize(
    "ticker",
    ["O:IWM1251002C00243000", "O:SPY251002C00243000", "IWM251002C00243000", "o:iwm251002c00243000"],
)
def test_a_contract_on_another_root_is_not_the_underlyings(ticker: str) -> None:
    """An adjusted `IWM1` contract or another underlying's carrying today's expiry was chosen."""
    assert reason_for(make_quote(ticker=ticker)) == "other_underlying"
    assert reason_for(make_quote(ticker=ticker, right="put")) == "not_call"


def test_wrong_expiry() -> None:
    assert reason_for(make_quote(expiry="2025-10-03")) == "wrong_expiry"


@pytest.mark.parametrize("bid", [None, 0.0, -0.05, math.nan, math.inf])
def test_no_bid(bid: float | None) -> None:
    assert reason_for(make_quote(bid=bid)) == "no_bid"


def test_smallest_bid_is_accepted() -> None:
    assert reason_for(make_quote(strike=244.0, bid=0.01, ask=0.01)) is None


@pytest.mark.parametrize("ask", [1.99, None, math.nan, math.inf])
def test_crossed_or_missing_ask(ask: float | None) -> None:
    assert reason_for(make_quote(bid=2.00, ask=ask)) == "crossed"


def test_locked_quote_is_not_crossed() -> None:
    assert reason_for(make_quote(bid=2.00, ask=2.00)) is None


def test_stale_quote_at_and_past_the_age_limit() -> None:
    assert reason_for(make_quote(quote_ms=NOW_MS - 30_000)) is None
    assert reason_for(make_quote(quote_ms=NOW_MS - 30_001)) == "stale_quote"
    assert reason_for(make_quote(quote_ms=None)) == "stale_quote"


def test_quote_from_the_future_counts_as_fresh() -> None:
    """A rehearsal server runs minutes ahead of a daemon started after it: its chain's stamps are ahead."""
    assert reason_for(make_quote(quote_ms=NOW_MS + 120_000)) is None


def test_wide_spread_at_and_past_the_limit() -> None:
    assert reason_for(make_quote(bid=1.96, ask=2.04)) is None  # exactly 4.00 %
    assert reason_for(make_quote(bid=1.9599, ask=2.0401)) == "wide_spread"  # 4.01 %


def test_low_volume_at_and_below_the_limit() -> None:
    assert reason_for(make_quote(volume=100.0)) is None
    assert reason_for(make_quote(volume=99.0)) == "low_volume"
    assert reason_for(make_quote(volume=math.nan)) == "low_volume"


def test_low_open_interest_at_and_below_the_limit() -> None:
    assert reason_for(make_quote(open_interest=100.0)) is None
    assert reason_for(make_quote(open_interest=99.0)) == "low_open_interest"


def test_thin_size_on_either_side() -> None:
    assert reason_for(make_quote(bid_size=10.0, ask_size=10.0)) is None
    assert reason_for(make_quote(bid_size=9.0)) == "thin_size"
    assert reason_for(make_quote(ask_size=9.0)) == "thin_size"


def test_delta_band_edges_are_inclusive() -> None:
    assert reason_for(make_quote(delta=0.30)) is None
    assert reason_for(make_quote(delta=0.45)) is None
    assert reason_for(make_quote(delta=0.2999)) == "delta_out_of_band"
    assert reason_for(make_quote(delta=0.4501)) == "delta_out_of_band"


def test_black_scholes_delta_outside_the_band_is_rejected() -> None:
    price = reference_call_price(ZERO_DTE_SPOT, 221.0, ZERO_DTE_T, ZERO_DTE_SIGMA)  # delta 0.208
    quote = make_quote(strike=221.0, delta=None, bid=price - 0.001, ask=price + 0.001)
    assert reason_for(quote, spot=ZERO_DTE_SPOT, close_ms=ZERO_DTE_CLOSE_MS) == "delta_out_of_band"


def test_no_delta_without_greeks_and_without_spot() -> None:
    assert reason_for(make_quote(delta=None), spot=None) == "no_delta"
    assert reason_for(make_quote(delta=None), spot=math.nan) == "no_delta"


def test_no_delta_at_or_after_the_close() -> None:
    assert reason_for(make_quote(delta=None), close_ms=NOW_MS) == "no_delta"
    assert reason_for(make_quote(delta=None), close_ms=NOW_MS - 60_000) == "no_delta"


def test_no_delta_when_mid_is_below_intrinsic() -> None:
    quote = make_quote(strike=215.0, delta=None, bid=4.90, ask=4.98)
    assert reason_for(quote, spot=220.0) == "no_delta"


def test_no_delta_when_strike_is_not_a_number() -> None:
    assert reason_for(make_quote(strike=math.nan, delta=None)) == "no_delta"


def test_implied_vol_is_none_when_unsolvable() -> None:
    assert implied_vol(5.0, 220.0, 215.0, ZERO_DTE_T) is None  # exactly intrinsic
    assert implied_vol(220.0, 220.0, 220.5, ZERO_DTE_T) is None  # at the spot
    assert implied_vol(100.0, 220.0, 220.5, ZERO_DTE_T) is None  # beyond sigma = 10
    assert implied_vol(0.2, 220.0, 220.5, 0.0) is None
    assert implied_vol(math.nan, 220.0, 220.5, ZERO_DTE_T) is None


def test_black_scholes_at_expiry_is_intrinsic_and_a_step() -> None:
    assert bs_call_price(220.0, 215.0, 0.0, 0.3) == 5.0
    assert bs_call_price(220.0, 225.0, -1.0, 0.3) == 0.0
    assert bs_call_delta(220.0, 215.0, 0.0, 0.3) == 1.0
    assert bs_call_delta(220.0, 225.0, 0.0, 0.3) == 0.0
    assert bs_call_delta(220.0, 220.0, 0.0, 0.3) == 0.5
    with pytest.raises(ValueError):
        bs_call_price(0.0, 220.0, 0.1, 0.3)


def test_checks_run_in_order_and_cheap_checks_precede_black_scholes() -> None:
    assert reason_for(make_quote(right="put", expiry="2025-10-03", bid=None)) == "not_call"
    assert reason_for(make_quote(expiry="2025-10-03", bid=None)) == "wrong_expiry"
    assert reason_for(make_quote(bid=None, quote_ms=None)) == "no_bid"
    assert reason_for(make_quote(ask=1.0, quote_ms=None)) == "crossed"
    assert reason_for(make_quote(quote_ms=None, bid=1.0)) == "stale_quote"
    assert reason_for(make_quote(bid=1.0, volume=0.0)) == "wide_spread"
    assert reason_for(make_quote(volume=0.0, open_interest=0.0)) == "low_volume"
    assert reason_for(make_quote(open_interest=0.0, bid_size=0.0)) == "low_open_interest"
    # Without spot Black-Scholes cannot run, so no_delta would show if it ran before thin_size.
    assert reason_for(make_quote(bid_size=0.0, delta=None), spot=None) == "thin_size"


def test_quote_mid_only_for_valid_quotes() -> None:
    assert quote_mid(make_quote(bid=2.00, ask=2.04)) == 2.02
    assert quote_mid(make_quote(bid=2.00, ask=2.00)) == 2.00
    assert quote_mid(make_quote(bid=0.0, ask=0.05)) is None
    assert quote_mid(make_quote(bid=2.00, ask=1.99)) is None
    assert quote_mid(make_quote(bid=2.00, ask=math.inf)) is None
    assert quote_mid(make_quote(bid=None, ask=2.00)) is None


def test_years_until() -> None:
    assert years_until(0, 365 * 86400 * 1000) == 1.0
    assert years_until(NOW_MS, NOW_MS + 3 * 3600 * 1000) == ZERO_DTE_T
    assert years_until(NOW_MS, NOW_MS) == 0.0
    assert years_until(NOW_MS + 86_400_000, NOW_MS) == -1 / 365


def ticker(n: int) -> str:
    return f"O:IWM251002C00{240 + n}000"


def chosen_ticker(*quotes: OptionQuote, rules: Rules = RULES) -> str | None:
    forward = select(*quotes, rules=rules).chosen
    backward = select(*reversed(quotes), rules=rules).chosen
    assert forward == backward  # input order never matters
    return None if forward is None else forward.quote.ticker


def test_rank_by_volume_times_mid_first() -> None:
    busy_cheap = make_quote(ticker=ticker(1), volume=1000.0, bid=1.00, ask=1.03)  # 1015, 2.96 %
    quiet_dear = make_quote(ticker=ticker(2), volume=400.0, bid=2.00, ask=2.01)  # 802, 0.50 %
    assert chosen_ticker(busy_cheap, quiet_dear) == ticker(1)


def test_volume_times_mid_tie_broken_by_smaller_spread() -> None:
    wider = make_quote(ticker=ticker(1), volume=200.0, bid=0.99, ask=1.01)  # 200, 2.0 %
    tighter = make_quote(ticker=ticker(2), volume=100.0, bid=1.99, ask=2.01)  # 200, 1.0 %
    assert chosen_ticker(wider, tighter) == ticker(2)


def test_decimal_equal_volume_times_mid_is_a_tie_despite_float_noise() -> None:
    # 100 x 1.05 and 700 x 0.15 are both 105; in floats the second is 105.00000000000001.
    tight = make_quote(ticker=ticker(1), volume=100.0, bid=1.03, ask=1.07)
    wide = make_quote(ticker=ticker(2), volume=700.0, bid=0.13, ask=0.17)
    assert chosen_ticker(tight, wide, rules=Rules(max_spread_percent=30.0)) == ticker(1)


def test_then_delta_nearest_the_band_middle() -> None:
    far = make_quote(ticker=ticker(1), delta=0.43)
    near = make_quote(ticker=ticker(2), delta=0.36)
    assert chosen_ticker(far, near) == ticker(2)


def test_then_ticker_ascending() -> None:
    # 0.35 and 0.40 are equally far (0.025) from the middle 0.375.
    second = make_quote(ticker=ticker(2), delta=0.35)
    first = make_quote(ticker=ticker(1), delta=0.40)
    assert chosen_ticker(second, first) == ticker(1)


def twelve_rejected_quotes() -> list[OptionQuote]:
    out_of_band = [make_quote(ticker=ticker(n), delta=0.2) for n in range(7)]
    wide = [make_quote(ticker=ticker(n), bid=1.00, ask=1.10) for n in range(7, 10)]
    stale = [make_quote(ticker=ticker(n), quote_ms=None) for n in range(10, 12)]
    return [stale[0], *out_of_band[:3], *wide, *out_of_band[3:], stale[1]]


def test_summary_and_reason_counts_when_nothing_qualifies() -> None:
    selection = select(*twelve_rejected_quotes())
    assert selection.chosen is None
    assert selection.considered == 12
    assert selection.rejections[:2] == ((ticker(10), "stale_quote"), (ticker(0), "delta_out_of_band"))
    assert selection.reason_counts() == {"delta_out_of_band": 7, "wide_spread": 3, "stale_quote": 2}
    assert list(selection.reason_counts()) == ["delta_out_of_band", "wide_spread", "stale_quote"]
    assert selection.summary() == (
        "no contract: 12 considered; delta_out_of_band=7, wide_spread=3, stale_quote=2"
    )


def test_summary_ties_in_check_order_and_empty_chain() -> None:
    selection = select(make_quote(ticker=ticker(1), ask=1.0), make_quote(ticker=ticker(2), bid=None))
    assert selection.summary() == "no contract: 2 considered; no_bid=1, crossed=1"
    empty = select()
    assert empty == Selection(chosen=None, considered=0, rejections=())
    assert empty.reason_counts() == {}
    assert empty.summary() == "no contract: 0 considered"


def test_summary_when_a_contract_is_chosen() -> None:
    selection = select(make_quote(), make_quote(ticker=ticker(9), right="put"))
    assert selection.considered == 2
    assert selection.summary() == (
        "chose O:IWM251002C00243000 (delta 0.375 greeks, mid 2.02, spread 1.98%): 2 considered; not_call=1"
    )


def test_values_are_frozen() -> None:
    selection = select(make_quote())
    with pytest.raises(dataclasses.FrozenInstanceError):
        selection.considered = 3  # type: ignore[misc]
