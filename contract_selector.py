"""Choose the same-day call to alert on (DESIGN section 4, "Contract").

Pure: quotes, rules and the engine's clock in, a `Selection` out. Cheap checks run first so that
Black-Scholes (for quotes without greeks) runs only for contracts that survive every other filter.
Every rejected contract records the first reason it failed, in the order of `REASONS`.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from config import Rules
from events import OptionQuote

REASONS: tuple[str, ...] = (
    "not_call",
    "wrong_expiry",
    "other_underlying",
    "no_bid",
    "crossed",
    "stale_quote",
    "wide_spread",
    "low_volume",
    "low_open_interest",
    "thin_size",
    "no_delta",
    "delta_out_of_band",
)

SECONDS_PER_YEAR = 365 * 86400

# Prices arrive as decimals that binary floats cannot hold exactly (1.96/2.04 is 4.000000000000004 %),
# so inclusive limits and ranking ties are judged to this tolerance, far below any real difference.
TOLERANCE = 1e-9
_RANK_DECIMALS = 9

# The implied-volatility bracket and the bisection's tolerance, both in sigma (priced_chain relies on them).
IV_LOW = 1e-4
IV_HIGH = 10.0
IV_TOLERANCE = 1e-8

# A quote of the held contract is no mark when its spread is wider than both this many dollars and its
# own mid (ask above three times the bid): a momentary glitch (an offer of $999.99, a 0.05 x 1.50 flicker
# on a $1 option) whose mid would fire a false stop or set a peak no market ever paid.
MARK_GLITCH_SPREAD_DOLLARS = 0.50


# Under Black-Scholes with r = 0 a call whose strike is below the spot has a delta above 0.5, whatever its
# volatility and time: a vendor delta under 0.5 on a call in the money by more than this fraction of the
# spot (room for the spot to have moved since the snapshot) is a wrong greek, not a market, and the quote
# is treated as one without greeks. An audit's chain said 0.40 for a call $12 in the money (its true delta
# about 0.97): it was bought as the pick at $12.00 instead of a $0.38 contract.
ITM_DOUBT_FRACTION = 0.01


@dataclass(frozen=True, slots=True)
class Candidate:
    """A contract that passed every filter, with the numbers the ranking and the alert use."""

    quote: OptionQuote
    delta: float
    delta_source: str
    iv: float | None
    mid: float
    spread_pct: float


@dataclass(frozen=True, slots=True)
class Selection:
    """The outcome of one selection: the winner (if any) and why the others were turned away."""

    chosen: Candidate | None
    considered: int
    rejections: tuple[tuple[str, str], ...]

    def reason_counts(self) -> dict[str, int]:
        """Rejections per reason, most frequent first (ties in check order)."""
        counts = Counter(reason for _, reason in self.rejections)
        ordered = sorted(counts, key=lambda reason: (-counts[reason], _reason_rank(reason)))
        return {reason: counts[reason] for reason in ordered}

    def summary(self) -> str:
        """One log line, e.g. `no contract: 12 considered; delta_out_of_band=7, wide_spread=3`."""
        counts = ", ".join(f"{reason}={count}" for reason, count in self.reason_counts().items())
        tail = f"; {counts}" if counts else ""
        if self.chosen is None:
            return f"no contract: {self.considered} considered{tail}"
        c = self.chosen
        return (
            f"chose {c.quote.ticker} (delta {c.delta:.3f} {c.delta_source}, mid {c.mid:.2f}, "
            f"spread {c.spread_pct:.2f}%): {self.considered} considered{tail}"
        )


@dataclass(frozen=True, slots=True)
class _Context:
    rules: Rules
    session_date: str
    now_ms: int
    spot: float | None
    t_years: float


def select_contract(
    quotes: Iterable[OptionQuote],
    *,
    rules: Rules,
    session_date: str,
    now_ms: int,
    spot: float | None,
    session_close_ms: int,
) -> Selection:
    """Filter `quotes` by the contract rules and return the best-ranked survivor, if any.

    `spot` is the underlying's last close and `session_close_ms` the session close; both are used
    only to derive a Black-Scholes delta for quotes without greeks.
    """
    context = _Context(rules, session_date, now_ms, finite(spot), years_until(now_ms, session_close_ms))
    survivors: list[Candidate] = []
    rejections: list[tuple[str, str]] = []
    considered = 0
    for quote in quotes:
        considered += 1
        outcome = _evaluate(quote, context)
        if isinstance(outcome, str):
            rejections.append((quote.ticker, outcome))
        else:
            survivors.append(outcome)
    return Selection(
        chosen=best_candidate(survivors, rules), considered=considered, rejections=tuple(rejections)
    )


def best_candidate(survivors: list[Candidate], rules: Rules) -> Candidate | None:
    """The best-ranked survivor (the first of equals, in chain order), or None."""
    return min(survivors, key=lambda c: _rank_key(c, rules), default=None)


def quote_mid(quote: OptionQuote) -> float | None:
    """The mid of a valid quote (finite bid > 0 and finite ask >= bid), else None."""
    bid, ask = finite(quote.bid), finite(quote.ask)
    if bid is None or bid <= 0 or ask is None or ask < bid:
        return None
    return (bid + ask) / 2


def mark_mid(quote: OptionQuote) -> float | None:
    """The mid a quote of the held contract marks it at: a valid quote's mid, None for a glitch."""
    mid = quote_mid(quote)
    if mid is None:
        return None
    assert quote.bid is not None and quote.ask is not None
    spread = quote.ask - quote.bid
    return None if spread > MARK_GLITCH_SPREAD_DOLLARS + TOLERANCE and spread > mid else mid


@functools.cache
def _own_ticker(underlying: str) -> re.Pattern[str]:
    # Polygon's OCC form: the root is the underlying itself (an adjusted `IWM1` contract or another
    # underlying's is not a contract on it, whatever its `details` say).
    return re.compile(r"O:" + re.escape(underlying) + r"\d{6}[CP]\d{8}")


def years_until(now_ms: int, close_ms: int) -> float:
    """Time from `now_ms` to `close_ms` in years of 365 days; zero or negative once the close has passed."""
    return (close_ms - now_ms) / 1000 / SECONDS_PER_YEAR


def bs_call_price(spot: float, strike: float, t_years: float, sigma: float, r: float = 0.0) -> float:
    """Black-Scholes price of a European call; at T <= 0 or sigma == 0 the discounted intrinsic value."""
    _check_bs_inputs(spot, strike, t_years, sigma, r)
    if t_years <= 0 or sigma == 0:
        return max(spot - strike * math.exp(-r * max(t_years, 0.0)), 0.0)
    return unchecked_call_price(spot, strike, t_years, sigma, r)


def bs_call_delta(spot: float, strike: float, t_years: float, sigma: float, r: float = 0.0) -> float:
    """Black-Scholes delta N(d1) of a European call; at T <= 0 or sigma == 0 a step (0.5 at the money)."""
    _check_bs_inputs(spot, strike, t_years, sigma, r)
    if t_years <= 0 or sigma == 0:
        discounted_strike = strike * math.exp(-r * max(t_years, 0.0))
        if spot == discounted_strike:
            return 0.5
        return 1.0 if spot > discounted_strike else 0.0
    d1, _ = _d1_d2(spot, strike, t_years, sigma, r)
    return norm_cdf(d1)


def implied_vol(price: float, spot: float, strike: float, t_years: float, r: float = 0.0) -> float | None:
    """The volatility at which the Black-Scholes call price equals `price`, or None when none exists.

    Solved by bisection over sigma in [1e-4, 10] to 1e-8. None when an input is not finite or not
    positive, T <= 0, the price is at or below the discounted intrinsic value, at or above the spot,
    or outside what the bracket can reach.
    """
    if not iv_inputs_ok(price, spot, strike, t_years, r):
        return None
    return _bisect_increasing(
        lambda sigma: unchecked_call_price(spot, strike, t_years, sigma, r) - price,
        IV_LOW,
        IV_HIGH,
        IV_TOLERANCE,
    )


def iv_inputs_ok(price: float, spot: float, strike: float, t_years: float, r: float = 0.0) -> bool:
    """Whether `implied_vol` gets past its input checks (finite, positive, intrinsic < price < spot)."""
    inputs = (price, spot, strike, t_years, r)
    if any(finite(x) is None for x in inputs) or min(price, spot, strike, t_years) <= 0:
        return False
    intrinsic = max(spot - strike * math.exp(-r * t_years), 0.0)
    return intrinsic < price < spot


def _evaluate(quote: OptionQuote, context: _Context) -> Candidate | str:
    """A `Candidate`, or the first reason (in check order) the quote fails."""
    reason = early_rejection(quote, context.session_date, context.rules.underlying)
    if reason is None and is_stale(quote.quote_ms, context.now_ms, context.rules):
        reason = "stale_quote"
    reason = reason or late_rejection(quote, context.rules)
    if reason:
        return reason
    mid, spread_pct = mid_and_spread(quote)
    greeks = greeks_delta(quote)
    if greeks is not None and context.spot is not None and context.spot > doubt_spot(greeks[0], quote):
        greeks = None  # a vendor delta no call at this strike can have: Black-Scholes from the mid instead
    greeks = greeks or _delta_from_black_scholes(quote, mid, context)
    if greeks is None:
        return "no_delta"
    delta, source, iv = greeks
    if not in_band(delta, context.rules):
        return "delta_out_of_band"
    return Candidate(quote, delta, source, iv, mid, spread_pct)


def mid_and_spread(quote: OptionQuote) -> tuple[float, float]:
    """The mid and the spread in % of it, for a quote that passed `early_rejection` (finite bid > 0, ask >= bid)."""
    bid, ask = _finite_or_zero(quote.bid), _finite_or_zero(quote.ask)
    return (bid + ask) / 2, _spread_percent(bid, ask)


def early_rejection(quote: OptionQuote, session_date: str, underlying: str) -> str | None:
    """The first of not_call, wrong_expiry, other_underlying, no_bid and crossed the quote fails: the
    checks that come before the quote's age and depend on neither the clock nor the rules."""
    if quote.right != "call":
        return "not_call"
    if quote.expiry != session_date:
        return "wrong_expiry"
    if _own_ticker(underlying).fullmatch(quote.ticker) is None:
        return "other_underlying"
    bid, ask = finite(quote.bid), finite(quote.ask)
    if bid is None or bid <= 0:
        return "no_bid"
    # A missing ask cannot satisfy ask >= bid, so it is reported the same way as a crossed one.
    if ask is None or ask < bid:
        return "crossed"
    return None


def is_stale(quote_ms: int | None, now_ms: int, rules: Rules) -> bool:
    """Whether a quote stamped `quote_ms` (None: unknown) is too old at `now_ms` (stays so as time runs).

    A stamp ahead of the clock counts as fresh, however far: the feed's clock is the reference of its
    stamps, and a rehearsal server runs minutes ahead of a daemon started after it (a rule that took
    stamps over 60 s ahead for stale left such a rehearsal without a BUY all day)."""
    return quote_ms is None or _quote_age_seconds(quote_ms, now_ms) > rules.max_quote_age_seconds + TOLERANCE


def late_rejection(quote: OptionQuote, rules: Rules) -> str | None:
    """The first of wide_spread, low_volume, low_open_interest and thin_size a quote that passed
    `early_rejection` fails: the checks after the quote's age, which depend on the rules only."""
    bid, ask = _finite_or_zero(quote.bid), _finite_or_zero(quote.ask)
    if _spread_percent(bid, ask) > rules.max_spread_percent + TOLERANCE:
        return "wide_spread"
    return _liquidity_rejection(quote, rules)


def in_band(delta: float, rules: Rules) -> bool:
    """Whether `delta` lies in the rules' delta band (inclusive, to `TOLERANCE`)."""
    return _within(delta, rules.delta_min, rules.delta_max)


def _liquidity_rejection(quote: OptionQuote, rules: Rules) -> str | None:
    if not _at_least(_finite_or_zero(quote.volume), rules.min_option_volume):
        return "low_volume"
    if not _at_least(_finite_or_zero(quote.open_interest), rules.min_open_interest):
        return "low_open_interest"
    smaller_size = min(_finite_or_zero(quote.bid_size), _finite_or_zero(quote.ask_size))
    if not _at_least(smaller_size, rules.min_nbbo_size):
        return "thin_size"
    return None


def greeks_delta(quote: OptionQuote) -> tuple[float, str, float | None] | None:
    """(delta, "greeks", iv) from the vendor's greeks, or None when the quote has no finite delta."""
    delta = finite(quote.delta)
    if delta is None:
        return None
    return delta, "greeks", finite(quote.iv)


def doubt_spot(vendor_delta: float, quote: OptionQuote) -> float:
    """The spot above which the vendor's delta is not believed; inf if none.

    Above the strike by ITM_DOUBT_FRACTION no call has a delta under 0.5; above the strike plus the mid,
    the quote is below its intrinsic value, which no market quotes (a stale quote, or a wrong one): an
    audit's 219 call quoted 1.00 x 1.01 with the spot at 220.33 was bought on its vendor delta of 0.40.
    Black-Scholes from such a mid has no solution, so the quote is turned away as `no_delta`.
    """
    strike, mid = finite(quote.strike), quote_mid(quote)
    if strike is None:
        return math.inf
    below_intrinsic = strike + mid if mid is not None else math.inf
    if vendor_delta >= 0.5:
        return below_intrinsic
    return min(strike / (1 - ITM_DOUBT_FRACTION), below_intrinsic)


def _delta_from_black_scholes(
    quote: OptionQuote, mid: float, context: _Context
) -> tuple[float, str, float | None] | None:
    return black_scholes_delta(finite(quote.strike), mid, context.spot, context.t_years)


def black_scholes_delta(
    strike: float | None, mid: float, spot: float | None, t_years: float
) -> tuple[float, str, float | None] | None:
    """(delta, "black_scholes", sigma) with sigma implied by `mid`, or None when there is no such sigma."""
    if spot is None or strike is None:
        return None
    # implied_vol also answers None for T <= 0, a mid at or below intrinsic and a mid at or above spot.
    sigma = implied_vol(mid, spot, strike, t_years)
    if sigma is None:
        return None
    return bs_call_delta(spot, strike, t_years, sigma), "black_scholes", sigma


def _rank_key(candidate: Candidate, rules: Rules) -> tuple[float, float, float, str]:
    # Rounded so that decimal-equal values tie exactly; the ticker makes the order total.
    band_middle = (rules.delta_min + rules.delta_max) / 2
    notional = _finite_or_zero(candidate.quote.volume) * candidate.mid
    return (
        -round(notional, _RANK_DECIMALS),
        round(candidate.spread_pct, _RANK_DECIMALS),
        round(abs(candidate.delta - band_middle), _RANK_DECIMALS),
        candidate.quote.ticker,
    )


def _reason_rank(reason: str) -> int:
    return REASONS.index(reason) if reason in REASONS else len(REASONS)


def _quote_age_seconds(quote_ms: int, now_ms: int) -> float:
    # A quote stamped after the engine's clock (vendor clock skew) is as fresh as it gets.
    return max(now_ms - quote_ms, 0) / 1000


def _spread_percent(bid: float, ask: float) -> float:
    return (ask - bid) / ((bid + ask) / 2) * 100


def _within(value: float, low: float, high: float) -> bool:
    return low - TOLERANCE <= value <= high + TOLERANCE


def _at_least(value: float, limit: float) -> bool:
    return value >= limit - TOLERANCE


def finite(value: object) -> float | None:
    """`value` as a float when it is a finite real number; None for None, NaN, inf and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _finite_or_zero(value: object) -> float:
    value_or_none = finite(value)
    return 0.0 if value_or_none is None else value_or_none


def norm_cdf(x: float) -> float:
    """The standard normal CDF."""
    # erfc keeps relative precision in the lower tail, where 1 + erf(x) would cancel.
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def unchecked_call_price(spot: float, strike: float, t_years: float, sigma: float, r: float) -> float:
    """`bs_call_price` without its checks, for T > 0 and sigma > 0: exactly what `implied_vol` evaluates."""
    # Unchecked: the root finder calls this some 30 times per contract.
    d1, d2 = _d1_d2(spot, strike, t_years, sigma, r)
    return spot * norm_cdf(d1) - strike * math.exp(-r * t_years) * norm_cdf(d2)


def _d1_d2(spot: float, strike: float, t_years: float, sigma: float, r: float) -> tuple[float, float]:
    vol_sqrt_t = sigma * math.sqrt(t_years)
    d1 = (math.log(spot / strike) + (r + 0.5 * sigma * sigma) * t_years) / vol_sqrt_t
    return d1, d1 - vol_sqrt_t


def _check_bs_inputs(spot: float, strike: float, t_years: float, sigma: float, r: float) -> None:
    if any(finite(x) is None for x in (spot, strike, t_years, sigma, r)):
        raise ValueError("Black-Scholes inputs must be finite numbers")
    if spot <= 0 or strike <= 0 or sigma < 0:
        raise ValueError("Black-Scholes needs spot > 0, strike > 0 and sigma >= 0")


def _bisect_increasing(
    f: Callable[[float], float], low: float, high: float, tolerance: float
) -> float | None:
    """The root of an increasing `f` in [low, high] to within `tolerance`, or None if not bracketed."""
    f_low, f_high = f(low), f(high)
    if f_low > 0 or f_high < 0:
        return None
    if f_low == 0:
        return low
    if f_high == 0:
        return high
    while high - low > tolerance:
        middle = (low + high) / 2
        if f(middle) < 0:
            low = middle
        else:
            high = middle
    return (low + high) / 2
