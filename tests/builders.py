"""Hand-made market data for the core's tests."""

from __future__ import annotations

import functools
from datetime import date, time

from config import Rules
from engine import Engine
from events import Bar, ChainSnapshot, ContractSnapshot, OptionQuote
from market_calendar import MarketCalendar, ny_ms

DAY = date(2025, 10, 2)
EXPIRY = DAY.isoformat()
TICKER = "O:IWM251002C00242000"


def at(hh: int, mm: int, ss: int = 0, day: date = DAY) -> int:
    """Unix ms of a New York wall-clock time."""
    return ny_ms(day, time(hh, mm, ss))


@functools.lru_cache(maxsize=16)
def calendar(rules: Rules) -> MarketCalendar:
    """One calendar per rule set: building exchange_calendars' XNYS takes a moment."""
    return MarketCalendar(rules)


def bar(start_ms: int, close: float, volume: float = 100.0, sym: str = "IWM", lag_ms: int = 200) -> Bar:
    return Bar(
        sym,
        start_ms,
        start_ms + 1000,
        close,
        close,
        close,
        close,
        volume,
        close,
        close,
        None,
        start_ms + 1000 + lag_ms,
    )


def wire_event(b: Bar) -> dict:
    """A Bar as the stream's `A` event (what a tape's `ws` line holds)."""
    return {"ev": "A", "sym": b.sym, "v": b.v, "av": 1_000_000, "op": b.c, "vw": b.c, "o": b.c, "c": b.c,
            "h": b.c, "l": b.c, "a": b.c, "z": 10, "s": b.start_ms, "e": b.start_ms + 1000}  # fmt: skip


def quote(
    ticker: str = TICKER,
    *,
    strike: float = 242.0,
    bid: float | None = 1.00,
    ask: float | None = 1.02,
    delta: float | None = 0.38,
    iv: float | None = 0.2,
    volume: float = 5000,
    oi: float = 1000,
    size: float = 50,
    quote_ms: int | None = None,
    expiry: str = EXPIRY,
    right: str = "call",
) -> OptionQuote:
    return OptionQuote(ticker, strike, expiry, right, delta, iv, bid, ask, size, size, volume, oi, quote_ms)


def chain(received_ms: int, *quotes: OptionQuote) -> ChainSnapshot:
    stamped = tuple(q if q.quote_ms is not None else _stamp(q, received_ms) for q in quotes)
    return ChainSnapshot(received_ms, stamped)


def contract(received_ms: int, bid: float, ask: float, ticker: str = TICKER) -> ContractSnapshot:
    return ContractSnapshot(received_ms, quote(ticker, bid=bid, ask=ask, quote_ms=received_ms))


def _stamp(q: OptionQuote, ms: int) -> OptionQuote:
    return OptionQuote(
        q.ticker,
        q.strike,
        q.expiry,
        q.right,
        q.delta,
        q.iv,
        q.bid,
        q.ask,
        q.bid_size,
        q.ask_size,
        q.volume,
        q.open_interest,
        ms,
        q.underlying_price,
    )


def engine(rules: Rules | None = None) -> Engine:
    rules = rules or Rules()
    return Engine(rules, calendar(rules))


def burst_bars(first_start_ms: int, *, flat: int = 100, ramp: int = 20, surge_volume: float = 500.0):
    """`flat` bars at 240.00 with volume 100, then a ramp of +1 cent a bar; the last ramp bar surges.

    With the default rules every entry condition but the volume surge holds from well inside the
    ramp, and the surge arrives on the final bar: the entry must happen on exactly that bar.
    """
    bars = [bar(first_start_ms + i * 1000, 240.0) for i in range(flat)]
    for j in range(1, ramp + 1):
        start = first_start_ms + (flat + j - 1) * 1000
        bars.append(bar(start, round(240.0 + 0.01 * j, 2), surge_volume if j == ramp else 100.0))
    return bars
