"""Alert text as the phone shows it (DESIGN section 8). Pure: values in, strings out."""

from __future__ import annotations

from dataclasses import dataclass

from market_calendar import ny_datetime
from risk_manager import Lifetime, Position

PRIORITY_NORMAL = 0
PRIORITY_HIGH = 1


def money(amount: float) -> str:
    """`+$1,234.00` / `-$12.50`: always signed with an ASCII sign, two decimals."""
    sign = "-" if amount < 0 else "+"
    return f"{sign}${abs(amount):,.2f}"


def signed_pct(value: float, places: int = 1) -> str:
    return f"{value:+.{places}f}%"


def clock_text(ms: int) -> str:
    return ny_datetime(ms).strftime("%H:%M:%S ET")


def vwap_distance(close: float, vwap: float) -> str:
    return signed_pct((close / vwap - 1) * 100, 2) if vwap > 0 else "n/a"


@dataclass(frozen=True, slots=True)
class BuyContext:
    """Everything a BUY alert shows besides the position itself."""

    underlying: str
    close: float
    rolling_vwap: float
    day_vwap: float | None
    momentum_pct_per_sec: float
    volume_z: float
    mid: float
    spread_pct: float
    bid_size: float
    ask_size: float
    delta_source: str
    filters: str
    exit_rules: str


def buy_title(underlying: str) -> str:
    return f"{underlying} 0DTE CALL — BUY"


def sell_title(underlying: str) -> str:
    return f"{underlying} 0DTE CALL — SELL"


def buy_message(position: Position, ctx: BuyContext) -> str:
    """The BUY text: underlying vs VWAP, signal strength, the contract and how it will be exited."""
    day_vwap = f" | day VWAP ${ctx.day_vwap:.2f}" if ctx.day_vwap else ""
    iv = f"{position.iv * 100:.1f}%" if position.iv is not None else "n/a"
    greeks = "" if ctx.delta_source == "greeks" else " (BS)"
    return "\n".join(
        (
            f"{ctx.underlying} ${ctx.close:.2f} | VWAP ${ctx.rolling_vwap:.2f} "
            f"({vwap_distance(ctx.close, ctx.rolling_vwap)}){day_vwap}",
            f"Momentum {ctx.momentum_pct_per_sec:+.4f}%/s | Volume Z {ctx.volume_z:.1f}",
            f"{position.ticker}",
            f"Exp {position.expiry} | Strike ${position.strike:g} | Delta {position.delta:.2f}{greeks} | IV {iv}",
            f"Entry ~${position.entry_price:.2f} (ask) | Mid ${ctx.mid:.2f} | Spread {ctx.spread_pct:.1f}%",
            f"Size {ctx.bid_size:g} x {ctx.ask_size:g} | Contracts {position.contracts}",
            f"Filters: {ctx.filters}",
            f"Exits: {ctx.exit_rules}",
            f"{clock_text(position.entry_ms)} | trade {position.trade_id}",
        )
    )


@dataclass(frozen=True, slots=True)
class SellContext:
    underlying: str
    reason: str
    close: float | None
    rolling_vwap: float | None
    exit_price: float
    exit_ms: int
    pnl_dollars: float
    pnl_percent: float
    lifetime: Lifetime


def sell_message(position: Position, ctx: SellContext) -> str:
    """The SELL text: why, where the trade ended and what it did to the lifetime record."""
    if ctx.close is not None and ctx.rolling_vwap is not None:
        vs = f"{ctx.underlying} ${ctx.close:.2f} vs VWAP ${ctx.rolling_vwap:.2f} "
        vs += f"({vwap_distance(ctx.close, ctx.rolling_vwap)})"
    else:
        vs = f"{ctx.underlying}: no bar yet"
    return "\n".join(
        (
            f"Reason: {ctx.reason}",
            vs,
            f"{position.ticker}",
            f"Peak ${position.peak:.2f} → Now ${position.mark:.2f}",
            f"Entry ${position.entry_price:.2f} → Exit ~${ctx.exit_price:.2f} (bid)",
            f"P&L: {signed_pct(ctx.pnl_percent)} ({money(ctx.pnl_dollars)})",
            f"LIFETIME: {money(ctx.lifetime.pnl)} | {ctx.lifetime.record()}",
            f"{clock_text(ctx.exit_ms)} | trade {position.trade_id}",
        )
    )


def exit_rules_text(
    stop_loss: float, giveback: float, tighten: float, persistence_s: int, stop_at: str
) -> str:
    return (
        f"stop -{stop_loss:g}% | giveback {giveback:g}% ({tighten:g}% below VWAP) | "
        f"below VWAP {persistence_s}s | time stop {stop_at}"
    )


FEED_ERROR_TEXT = {
    "auth_failed": "The stream refused the API key (auth_failed). Check POLYGON_API_KEY; retrying slowly.",
    "max_connections": (
        "Polygon closed the stream: another connection uses this key (max_connections). Run one daemon per "
        "key; backing off at least 60 s."
    ),
    "unauthorized": "REST refused the API key (HTTP 401). Check POLYGON_API_KEY; polling once a minute.",
    "not_entitled": (
        "Your Polygon plan does not include this data (HTTP 403), so no chain: entries are blocked. "
        "Polling once a minute."
    ),
}


def feed_error_text(reason: str) -> str:
    """What a FEED ERROR alert says for a feed status reason."""
    return FEED_ERROR_TEXT.get(reason, f"Market data feed: {reason}.")
