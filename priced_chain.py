"""A chain snapshot priced once, when it arrives, so that a BUY's contract selection finds no root
by bisection on its critical path (issue 13). `select_priced` returns exactly what `select_contract`
returns for the same quotes, rules, clock and spot: the same chosen contract with the same delta and
IV to the last bit, and the same rejection reasons in the same order.

What is computed when, and why the answer cannot differ:

- At arrival (`price_chain`), per quote: every check that depends on neither the clock nor the spot
  (right, expiry, bid, crossed; spread, volume, open interest, size), the mid and spread, the vendor's
  delta and, for a quote without greeks that passes those checks, its total volatility w = sigma *
  sqrt(T) implied by the mid at the arrival spot. With r = 0 a call's price depends on sigma and T only
  through w, so the cached w stays the root as the clock runs; only a move of the spot changes it.
- At selection (`select_priced`): the quote's age (the clock moved), and for a quote without greeks
  the two bracket checks of `implied_vol` at the BUY's spot and time, evaluated exactly as there (they
  decide "no_delta"). Then Newton's method on w from the cached w (no step when the spot has not moved,
  one or two closed-form steps when it has) replaces the ~32 evaluations of the bisection.
- `select_contract` takes its delta from a bisection to 1e-8 in sigma. The Newton root lies within that
  tolerance, plus what float noise in the price can hide, of the bisection's answer; when the Newton
  delta is outside the band by more than that error can move a delta, "delta_out_of_band" is certain.
  Every other quote without greeks (the few inside the band or at its edges, and any the Newton step
  could not settle) is solved exactly as `select_contract` solves it, so a chosen contract carries the
  bisection's own delta and IV.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from config import Rules
from contract_selector import (
    IV_HIGH,
    IV_LOW,
    IV_TOLERANCE,
    TOLERANCE,
    Candidate,
    Selection,
    best_candidate,
    black_scholes_delta,
    doubt_spot,
    early_rejection,
    finite,
    greeks_delta,
    in_band,
    is_stale,
    late_rejection,
    mid_and_spread,
    norm_cdf,
    unchecked_call_price,
    years_until,
)
from events import OptionQuote

Greeks = tuple[float, str, float | None]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_MAX_NEWTON_STEPS = 40
# Float error in a Black-Scholes price is a few ulps of the spot and strike; this bound is ten times that.
_PRICE_NOISE = 1e-14
# Newton stops when its step moves sigma by less than this: a thousandth of the bisection's tolerance.
_NEWTON_SIGMA_STEP = IV_TOLERANCE * 1e-3


@dataclass(frozen=True, slots=True)
class PricedQuote:
    """One quote with what its selection needs that the clock and the spot cannot change."""

    quote: OptionQuote
    early_reason: str | None
    late_reason: str | None
    mid: float
    strike: float | None  # finite and positive, else None (no Black-Scholes delta then)
    greeks_outcome: Candidate | str | None  # with the vendor's delta: the candidate, or its band reason
    total_vol: float | None  # w = sigma * sqrt(T) implied by the mid at the arrival spot, when solved
    doubt_spot: float = math.inf  # above this spot the vendor's delta is not believed (contract_selector)


@dataclass(frozen=True, slots=True)
class PricedChain:
    """A chain priced for one set of rules and one session day, at the spot it arrived with."""

    rules: Rules
    session_date: str
    spot: float | None
    quotes: tuple[PricedQuote, ...]


def price_chain(
    quotes: Iterable[OptionQuote], *, rules: Rules, session_date: str, spot: float | None, now_ms: int
) -> PricedChain:
    """Price every quote once (see the module docstring); `spot` and `now_ms` are the arrival's.

    Quotes already stale at `now_ms` get no total volatility: the engine's clock never runs backwards,
    so they are still stale at any later selection.
    """
    arrival_spot = finite(spot)
    priced = tuple(_price_quote(q, rules, session_date, arrival_spot, now_ms) for q in quotes)
    return PricedChain(rules, session_date, arrival_spot, priced)


def select_priced(chain: PricedChain, *, now_ms: int, spot: float | None, session_close_ms: int) -> Selection:
    """`select_contract` over the priced chain at the BUY's clock and spot; the same `Selection`."""
    rules, t_years, spot_now = chain.rules, years_until(now_ms, session_close_ms), finite(spot)
    known_spot = spot_now  # the vendor's deltas are judged against it even when T refuses Black-Scholes
    if spot_now is not None and not (spot_now > 0 and math.isfinite(t_years) and t_years > 0):
        spot_now = None  # implied_vol refuses every quote then: "no_delta" for all without greeks
    survivors: list[Candidate] = []
    rejections: list[tuple[str, str]] = []
    for priced in chain.quotes:
        outcome = _outcome(priced, rules, now_ms, spot_now, t_years, known_spot)
        if isinstance(outcome, str):
            rejections.append((priced.quote.ticker, outcome))
        else:
            survivors.append(outcome)
    return Selection(best_candidate(survivors, rules), len(chain.quotes), tuple(rejections))


def _price_quote(
    quote: OptionQuote, rules: Rules, session_date: str, spot: float | None, now_ms: int
) -> PricedQuote:
    early = early_rejection(quote, session_date, rules.underlying)
    if early is not None:
        return PricedQuote(quote, early, None, 0.0, None, None, None)
    mid, spread_pct = mid_and_spread(quote)
    late = late_rejection(quote, rules)
    greeks = greeks_delta(quote)
    strike = finite(quote.strike)
    # implied_vol's input checks on what the quote alone decides (with r = 0 the intrinsic is spot - strike).
    strike = strike if strike is not None and strike > 0 and 0 < mid < math.inf else None
    greeks_outcome: Candidate | str | None = None
    doubted_above = math.inf
    if greeks is not None:
        delta, source, iv = greeks
        in_range = in_band(delta, rules)
        greeks_outcome = (
            Candidate(quote, delta, source, iv, mid, spread_pct) if in_range else "delta_out_of_band"
        )
        doubted_above = doubt_spot(delta, quote)
    total_vol = None
    if (
        late is None
        and (greeks is None or doubted_above < math.inf)
        and not is_stale(quote.quote_ms, now_ms, rules)
    ):
        total_vol = _arrival_total_vol(mid, spot, strike)
    return PricedQuote(quote, None, late, mid, strike, greeks_outcome, total_vol, doubted_above)


def _arrival_total_vol(mid: float, spot: float | None, strike: float | None) -> float | None:
    """w implied by `mid` at the arrival spot (no bracket: w does not depend on T), or None."""
    if spot is None or strike is None or spot <= 0 or strike <= 0 or not max(spot - strike, 0.0) < mid < spot:
        return None
    solved = _newton_total_vol(mid, spot, strike, 0.0, math.inf, None, 0.0)  # to the price's float noise
    return None if solved is None else solved[0]


def _outcome(
    priced: PricedQuote,
    rules: Rules,
    now_ms: int,
    spot: float | None,
    t_years: float,
    known_spot: float | None,
) -> Candidate | str:
    """What `contract_selector._evaluate` answers for this quote, from the cached work (`spot` is None
    when Black-Scholes is refused; `known_spot` is the finite spot all the same)."""
    reason = priced.early_reason
    if reason is None and is_stale(priced.quote.quote_ms, now_ms, rules):
        reason = "stale_quote"
    reason = reason or priced.late_reason
    if reason:
        return reason
    if priced.greeks_outcome is not None and not (known_spot is not None and known_spot > priced.doubt_spot):
        return priced.greeks_outcome
    greeks = _black_scholes(priced, rules, spot, t_years)
    if isinstance(greeks, str):
        return greeks
    delta, source, iv = greeks
    if not in_band(delta, rules):
        return "delta_out_of_band"
    return Candidate(priced.quote, delta, source, iv, priced.mid, mid_and_spread(priced.quote)[1])


def _black_scholes(priced: PricedQuote, rules: Rules, spot: float | None, t_years: float) -> Greeks | str:
    """The Black-Scholes (delta, source, sigma), or the reason the quote is turned away.

    `spot` is None unless it and `t_years` pass implied_vol's checks (finite, positive).
    """
    mid, strike = priced.mid, priced.strike
    if spot is None or strike is None or not max(spot - strike, 0.0) < mid < spot:
        return "no_delta"
    # implied_vol's bracket checks, evaluated as the bisection evaluates them: they decide "no_delta".
    f_low = unchecked_call_price(spot, strike, t_years, IV_LOW, 0.0) - mid
    if f_low > 0:
        return "no_delta"
    f_high = unchecked_call_price(spot, strike, t_years, IV_HIGH, 0.0) - mid
    if f_high < 0:
        return "no_delta"
    if f_low < 0 < f_high and _surely_out_of_band(priced, rules, spot, strike, t_years):
        return "delta_out_of_band"
    exact = black_scholes_delta(strike, mid, spot, t_years)
    return "no_delta" if exact is None else exact


def _surely_out_of_band(
    priced: PricedQuote, rules: Rules, spot: float, strike: float, t_years: float
) -> bool:
    """Whether the bisection's delta is certainly outside the band, judged from the Newton root."""
    sqrt_t = math.sqrt(t_years)
    solved = _newton_total_vol(
        priced.mid, spot, strike, IV_LOW * sqrt_t, IV_HIGH * sqrt_t, priced.total_vol, sqrt_t
    )
    if solved is None:
        return False
    w, last_step = solved
    d1 = math.log(spot / strike) / w + 0.5 * w
    density = math.exp(-0.5 * d1 * d1) * _INV_SQRT_2PI
    vega_sigma = spot * density * sqrt_t
    if vega_sigma <= 0:
        return False
    sigma = w / sqrt_t
    # How far the bisection's sigma can lie from this root: its tolerance, the noise band where the
    # float price's sign is unreliable, and the Newton's last step.
    sigma_error = IV_TOLERANCE + 4 * _PRICE_NOISE * (spot + strike) / vega_sigma + last_step / sqrt_t
    if sigma_error > 1e-3 * sigma:
        return False  # too loose for the linear bound below: let the exact solve decide
    # d(delta)/d(sigma) = -pdf(d1) * d2 / sigma; doubled (and then some) for its change across the error.
    delta_error = 2 * sigma_error * density * abs(d1 - w) / sigma + 1e-12
    delta = norm_cdf(d1)
    return (
        delta + delta_error < rules.delta_min - TOLERANCE or delta - delta_error > rules.delta_max + TOLERANCE
    )


def _newton_total_vol(
    price: float, spot: float, strike: float, low: float, high: float, guess: float | None, sqrt_t: float
) -> tuple[float, float] | None:
    """(w, |last step|) with price(w) = `price` in (low, high), by Newton's method kept inside a bracket
    that shrinks around the root (a bisection step whenever Newton would leave it); None if unsettled.

    The price is increasing in w, so each evaluation tells on which side of the root it lies.
    """
    log_moneyness = math.log(spot / strike)
    w = (
        guess
        if guess is not None and low < guess < high
        else _first_guess(price, spot, log_moneyness, low, high)
    )
    noise = _PRICE_NOISE * (spot + strike)
    for _ in range(_MAX_NEWTON_STEPS):
        d1 = log_moneyness / w + 0.5 * w
        gap = spot * norm_cdf(d1) - strike * norm_cdf(d1 - w) - price
        if gap == 0:
            return w, 0.0
        if gap < 0:
            low = w
        else:
            high = w
        vega = spot * math.exp(-0.5 * d1 * d1) * _INV_SQRT_2PI
        following = w - gap / vega if vega > 0 else math.nan
        if not low < following < high:
            following = 0.5 * (low + high) if math.isfinite(high) else 2.0 * w
        step = abs(following - w)
        # Settled: the step no longer moves sigma, or the price's gap is inside its own float noise.
        if step <= _NEWTON_SIGMA_STEP * sqrt_t or abs(gap) <= noise:
            return following, step + (noise / vega if vega > 0 else math.inf)
        w = following
    return None


def _first_guess(price: float, spot: float, log_moneyness: float, low: float, high: float) -> float:
    """A start for Newton without a cached root: Manaster and Koehler's w = sqrt(2 |ln(S/K)|), from
    which Newton on a call price converges; at the money Brenner and Subrahmanyam's approximation."""
    guess = math.sqrt(2.0 * abs(log_moneyness)) or math.sqrt(2.0 * math.pi) * price / spot
    if low < guess < high:
        return guess
    return 0.5 * (low + high) if math.isfinite(high) else max(2.0 * low, 1e-3)
