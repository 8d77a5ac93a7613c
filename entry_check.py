"""How a backtest's entry fills compare with the contract's newest quote before each BUY.

A BUY fills at the ask of the chain its selection used, as the live BUY alert quotes it (DESIGN: the
contract's ask at the signal). A chain is polled every few seconds, so that ask can be seconds old,
and entries come in momentum bursts, when calls get dearer: an audit found half of a synthetic run's
fills below the contract's newest streamed bid, and the run's P&L a quarter to three quarters above
what buying at the newest ask would have made. The decisions stay as they are (they are the alerts');
this check puts the newest quote beside each fill, so a report can say how much of the P&L rests on
the chain's older price.

Pure: decoded tape lines and the day's trades in, one `EntryCheck` per trade whose contract quoted
(streamed, or a REST snapshot) before its BUY.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from events import ContractSnapshot, OptionQuote
from feed import quote_is_usable
from pnl_tracker import TradeRow
from replay import DecodedLine
from tape_cache import unpack_quotes


@dataclass(frozen=True, slots=True)
class EntryCheck:
    """One BUY's fill beside the newest valid quote of its contract received before it."""

    trade_id: str
    fill: float
    newest_bid: float
    newest_ask: float
    newest_ms: int
    pnl_at_newest_ask: float  # the trade's P&L had it bought at that ask

    @property
    def above_fill(self) -> bool:
        """Whether the newest ask was dearer than the fill (the fill is then the optimistic one)."""
        return self.newest_ask > self.fill


def entry_checks(lines: Sequence[DecodedLine], trades: Iterable[TradeRow]) -> tuple[EntryCheck, ...]:
    """One check per trade whose contract had a valid quote before its entry, in entry order."""
    pending = sorted(trades, key=lambda t: t.entry_ms)
    if not pending:
        return ()
    wanted = {t.ticker for t in pending}
    newest: dict[str, tuple[int, OptionQuote]] = {}
    checks: list[EntryCheck | None] = []
    for t, quote in _quotes_before(lines, wanted, pending[-1].entry_ms):
        while pending and pending[0].entry_ms <= t:
            checks.append(_check(pending.pop(0), newest))
        newest[quote.ticker] = (t, quote)
    checks += [_check(trade, newest) for trade in pending]
    return tuple(check for check in checks if check is not None)


def _quotes_before(
    lines: Sequence[DecodedLine], wanted: set[str], end_ms: int
) -> Iterator[tuple[int, OptionQuote]]:
    """(receive stamp, quote) of every usable quote of a `wanted` contract received before `end_ms`."""
    for t, kind, body in lines:
        if t >= end_ms:
            return
        if kind == "quotes":
            events: Iterable[object] = unpack_quotes(body)
        elif kind == "events":
            events = body  # type: ignore[assignment]
        else:
            continue
        for event in events:
            if (
                type(event) is ContractSnapshot
                and event.quote.ticker in wanted
                and quote_is_usable(event.quote)
            ):
                yield event.received_ms, event.quote


def _check(trade: TradeRow, newest: dict[str, tuple[int, OptionQuote]]) -> EntryCheck | None:
    """The trade's fill beside the newest quote of its contract so far (None when it has none)."""
    found = newest.get(trade.ticker)
    if found is None:
        return None
    t, quote = found
    assert quote.bid is not None and quote.ask is not None  # usable quotes have both
    pnl = round((trade.exit_price - quote.ask) * 100 * trade.contracts, 2)
    return EntryCheck(trade.trade_id, trade.entry_price, quote.bid, quote.ask, t, pnl)
