"""Events that flow into the engine and actions that flow out of it.

Every value here is immutable. Events carry the receive time that becomes the engine's clock
(`received_ms` / `now_ms`); nothing in the core reads the wall clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, Literal, NamedTuple


class Bar(NamedTuple):
    """One per-second aggregate (`A` event) of a stock.

    An immutable NamedTuple rather than a frozen dataclass: ~45,000 are built per session, and a
    tuple is several times cheaper to build.
    """

    sym: str
    start_ms: int
    end_ms: int
    o: float
    h: float
    l: float  # noqa: E741 - Polygon's own field name
    c: float
    v: float
    vw: float | None
    day_vwap: float | None
    day_volume: float | None
    received_ms: int
    # From REST aggregates (a reconnect's gap), not the stream: never opens a position.
    backfilled: bool = False

    def __reduce__(self) -> tuple[object, tuple[type[Bar], tuple[object, ...]]]:
        # Built by tuple.__new__ in C when a decoded day's cache (~47k bars) loads: a fifth faster
        # than the NamedTuple default, which calls Bar.__new__, a Python function.
        return (tuple.__new__, (Bar, tuple(self)))


@dataclass(frozen=True, slots=True)
class OptionQuote:
    """One option contract as seen in a chain or single-contract snapshot.

    Fields the vendor may omit are `None` (greeks, quote); volume and open interest default to 0.
    """

    ticker: str
    strike: float
    expiry: str
    right: str
    delta: float | None
    iv: float | None
    bid: float | None
    ask: float | None
    bid_size: float
    ask_size: float
    volume: float
    open_interest: float
    quote_ms: int | None
    underlying_price: float | None = None

    def __reduce__(self) -> tuple[type[OptionQuote], tuple[Any, ...]]:
        # A constructor call loads ~1.5x faster than the dataclass default, and a decoded day's
        # cache holds ~150k quotes: most of what a sweep spends reading it.
        return (OptionQuote, _quote_values(self))


_quote_values = attrgetter(*(f.name for f in fields(OptionQuote)))


@dataclass(frozen=True, slots=True)
class ChainSnapshot:
    """A complete same-day chain (all pages), stamped with the receive time of its last page.

    `quotes` may be a lazy collection (see `feed.LazyChain`): most snapshots are never looked at,
    so they are only parsed when an entry signal or an open position needs them.
    """

    received_ms: int
    quotes: Iterable[OptionQuote]

    def __reduce__(self) -> tuple[object, ...]:
        # For the decoded-tape cache: a positional rebuild costs a tenth of the dataclass default.
        return (ChainSnapshot, (self.received_ms, self.quotes))

    def quote_for(self, ticker: str) -> OptionQuote | None:
        """The quote of one contract, if the chain has it (a lazy chain parses only that one)."""
        find = getattr(self.quotes, "find", None)
        if find is not None:
            return find(ticker)
        return next((q for q in self.quotes if q.ticker == ticker), None)


@dataclass(frozen=True, slots=True)
class ContractSnapshot:
    """One contract's quote on its own: the single-contract REST snapshot polled while a position is
    open (`source` "rest"), or a `Q` event of the options stream (`source` "stream")."""

    received_ms: int
    quote: OptionQuote
    source: str = "rest"

    def __reduce__(self) -> tuple[type[ContractSnapshot], tuple[int, OptionQuote, str]]:
        # As OptionQuote's: a day with the options stream caches ~80k of these.
        return (ContractSnapshot, (self.received_ms, self.quote, self.source))


@dataclass(frozen=True, slots=True)
class Tick:
    """A clock tick; the engine sees at least one per second even without data."""

    now_ms: int


@dataclass(frozen=True, slots=True)
class FeedStatus:
    """A change in the stream's health (connected, auth failed, max_connections, ...)."""

    received_ms: int
    connected: bool
    reason: str


@dataclass(frozen=True, slots=True)
class VolumeProfile:
    """Average IWM volume per minute of day over recent sessions, for the relative-volume filter.

    `minutes` maps minutes since midnight New York time to average volume. `days` is how many
    sessions it averages; an empty profile means no profile could be had.
    """

    received_ms: int
    session_date: str
    days: int
    minutes: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Received:
    """One raw item as it arrived (ws frame, REST answer, operator control), stamped with its receive time.

    Producers put these on the engine's queue; the engine thread decodes them into the events above.
    """

    t: int
    kind: str  # "ws" | "rest" | "control"
    payload: object
    path: str = ""
    status: int = 200


def raw_size(item: object) -> int:
    """The size of a raw frame's text (a `Received` payload that is str or bytes); 0 for anything else,
    REST answers included (they arrive decoded). What the engine's inbox and the tape's queue bound."""
    payload = getattr(item, "payload", None)
    return len(payload) if isinstance(payload, str | bytes | bytearray) else 0


Event = Bar | ChainSnapshot | ContractSnapshot | Tick | FeedStatus | VolumeProfile


AlertKind = Literal["BUY", "SELL", "START", "STALL", "RECOVERED", "CRITICAL_LOSS", "FEED_ERROR", "SUMMARY"]


@dataclass(frozen=True, slots=True)
class Alert:
    """A message for the phone. `dedupe_key` is unique in the outbox."""

    kind: str
    dedupe_key: str
    title: str
    message: str
    priority: int
    at_ms: int


@dataclass(frozen=True, slots=True)
class OpenPosition:
    """A BUY decision: the position the user is told to open."""

    trade_id: str
    session_date: str
    ticker: str
    strike: float
    expiry: str
    contracts: int
    entry_price: float
    entry_mark: float
    entry_ms: int
    delta: float
    iv: float | None
    bid: float | None = None  # the entry quote's bid: the exit price known until the next quote


@dataclass(frozen=True, slots=True)
class UpdatePosition:
    """The open position's durable follow-up state changed (peak, mark and bid, VWAP-persistence clock).

    `bid` None leaves the stored bid as it is.
    """

    trade_id: str
    peak: float
    mark: float
    below_vwap_since_ms: int | None
    bid: float | None = None


@dataclass(frozen=True, slots=True)
class ClosePosition:
    """A SELL decision with its realised result."""

    trade_id: str
    exit_price: float
    exit_ms: int
    reason: str
    peak: float
    pnl_dollars: float
    pnl_percent: float


@dataclass(frozen=True, slots=True)
class SetMeta:
    """A small durable flag (e.g. the critical-loss latch) the engine needs after a restart."""

    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Log:
    """A structured log line the engine wants written; never durable state."""

    event: str
    fields: dict[str, Any]


Action = Alert | OpenPosition | UpdatePosition | ClosePosition | SetMeta | Log
