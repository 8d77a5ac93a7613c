"""Raw feed items (as received, as taped) to engine events.

The live daemon and the replay both hand every received item to one `FeedDecoder` on the engine
thread, so the tape's order is the engine's order and a replay walks exactly the live code path.
Parsing itself lives in `polygon_client` (pure `parse_*` functions); this module only routes by
REST path and assembles paged chains.

Hostile input is counted, never raised: a 200 answer whose body is not a JSON object counts as a
failed answer; the pages of a chain poll that stopped before its last page (page cap, a cyclic or
unusable `next_url`, a failure) are discarded when the next poll's first page (a path without a
`cursor` parameter) arrives, counted in `abandoned_chains`, and pending pages never exceed
MAX_CHAIN_PAGES: a poll with more pages is dropped whole, its later pages included. A contract snapshot
whose bid/ask cannot mark a position is counted in `unusable_quotes` (the engine already refuses to mark
or select with it).

A streamed bar stamped far ahead of the stream's usual lead over the receive clock is dropped and
counted in `ahead_bars` (see `AheadGuard`): one bar stamped tomorrow would otherwise make every real
bar after it "late" for the rest of the day. A streamed bar priced more than MAX_PRICE_JUMP away from
its symbol's last kept close is dropped and counted in `price_jumps` (see `PriceGuard`): one bad print
at ten times the price made a BUY.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from config import Rules
from events import Bar, ChainSnapshot, ContractSnapshot, Event, OptionQuote, Received, VolumeProfile
from market_calendar import minute_of_day, ny_date
from polygon_client import (
    MAX_CHAIN_PAGES,
    StatusMessage,
    parse_aggs_page,
    parse_chain_page,
    parse_contract_snapshot,
    parse_option_result,
    parse_ws_frame,
)
from tape import RawJson, request_path


@dataclass(slots=True)
class FeedCounters:
    """What the decoder had to drop or ignore; shown in health and the replay summary."""

    frames: int = 0
    bad_frames: int = 0
    bad_events: int = 0
    ignored_events: int = 0
    rest_errors: int = 0
    bad_quotes: int = 0
    stream_quotes: int = 0
    unusable_quotes: int = 0
    abandoned_chains: int = 0
    bad_frame_events: int = 0  # the part of bad_events that lay in frames counted whole in bad_frames
    ahead_bars: int = 0  # streamed bars dropped by the AheadGuard (also counted in bad_events)
    price_jumps: int = 0  # streamed bars dropped by the PriceGuard (also counted in bad_events)
    statuses: list[StatusMessage] = field(default_factory=list)

    def bad_inputs(self) -> int:
        """Frames dropped whole plus events dropped from frames otherwise kept: each bad input once."""
        return self.bad_frames + self.bad_events - self.bad_frame_events


# How far a streamed bar's start may run ahead of the stream's usual lead over the receive clock. A bar this
# far ahead costs at most this long of real bars (each then at or before the newest start, dropped as late):
# at a minute, one bar 40 s ahead blinded the VWAP exits for 40 s and sent a STALL for a stream that never
# stopped (an audit's find). 25 s stays under STALL_ALERT_SECONDS (30), and a server that fast-forwards (a
# rehearsal replaying bars faster than its clock) moves the lead by less than that from one frame to the next.
MAX_LEAD_JUMP_MS = 25_000
# This many frames in a row with such bars are a new lead (the vendor's or this machine's clock was reset).
NEW_LEAD_FRAMES = 5


class AheadGuard:
    """Drops streamed bars stamped far ahead of where the stream's bars usually are.

    The lead of a bar is its start minus its receive time: about -1 s live, -15 min on a delayed feed,
    anything on a rehearsal whose server keeps its own clock; steady either way, and one clock for every
    symbol of the stream. A late bar only lowers it, so the guard keeps the highest lead so far (0, the
    receive clock, before the first bar) and drops a bar more than MAX_LEAD_JUMP_MS above it.
    Frames with such bars NEW_LEAD_FRAMES times in a row set the new lead, so a reset clock, or a server on
    a clock of its own, costs a few seconds of bars.
    """

    __slots__ = ("_top", "_suspects")

    def __init__(self) -> None:
        self._top: int | None = None
        self._suspects = 0

    def keep(self, bars: tuple[Bar, ...], received_ms: int) -> tuple[Bar, ...]:
        """The bars of one frame that are within reach of the stream's lead (which they then move)."""
        limit = self._limit()
        highest = self._top
        for bar in bars:
            lead = bar.start_ms - received_ms
            if lead > limit:
                return self._suspect_frame(bars, received_ms)
            if highest is None or lead > highest:
                highest = lead
        self._top, self._suspects = highest, 0
        return bars

    def _limit(self) -> int:
        """The highest lead a bar may have: MAX_LEAD_JUMP_MS above the stream's (0 before any bar)."""
        return (self._top or 0) + MAX_LEAD_JUMP_MS

    def _suspect_frame(self, bars: tuple[Bar, ...], received_ms: int) -> tuple[Bar, ...]:
        """A frame with bars beyond reach: those are dropped, unless this is the NEW_LEAD_FRAMES-th such
        frame in a row, which sets the new lead. Frames are counted, not bars: one frame of five bars
        from the far future took over the lead and made every real bar after it late."""
        self._suspects += 1
        if self._suspects >= NEW_LEAD_FRAMES:
            self._top, self._suspects = max(bar.start_ms - received_ms for bar in bars), 0
            return bars
        limit, top = self._limit(), self._top
        kept = tuple(bar for bar in bars if bar.start_ms - received_ms <= limit)
        for bar in kept:
            lead = bar.start_ms - received_ms
            top = lead if top is None or lead > top else top
        self._top = top
        return kept


# A streamed bar whose high or low lies further than this fraction from its symbol's last kept close is a
# bad print. Limit-up/limit-down bands (5 % of a 5-minute average for IWM and SPY, 10 % near the open and
# the close) pause trading before a 5 % move; 3 % within one second is far beyond any real second of
# either (the synthetic days' largest is 0.16 %), and a +5 % print made a BUY in an audit.
MAX_PRICE_JUMP = 0.03
# This many such bars in a row are a new price level (a reopening after a pause), not bad prints.
NEW_LEVEL_BARS = 5
_BAND_LOW, _BAND_HIGH = 1 - MAX_PRICE_JUMP, 1 + MAX_PRICE_JUMP


class PriceGuard:
    """Drops streamed bars priced beyond MAX_PRICE_JUMP of their symbol's last kept close.

    NEW_LEVEL_BARS such bars of a symbol in a row are taken as its new level, so a reopening after a
    trading pause, or a first bar that was itself the bad print, costs a few bars.
    """

    __slots__ = ("_close", "_suspects")

    def __init__(self) -> None:
        self._close: dict[str, float] = {}
        self._suspects: dict[str, int] = {}

    def keep(self, bars: tuple[Bar, ...]) -> tuple[Bar, ...]:
        """The bars of one frame that are within reach of their symbol's price (which they then move)."""
        # Two bars a second all day: the usual frame passes in this loop, without a call per bar.
        closes, suspects = self._close, self._suspects
        for i, bar in enumerate(bars):
            reference = closes.get(bar.sym)
            if reference is not None and not (
                _BAND_LOW * reference <= bar.l and bar.h <= _BAND_HIGH * reference
            ):
                return bars[:i] + tuple(bar for bar in bars[i:] if self._admits(bar))
            closes[bar.sym] = bar.c
            if suspects:
                suspects.pop(bar.sym, None)
        return bars

    def _admits(self, bar: Bar) -> bool:
        sym = bar.sym
        reference = self._close.get(sym)
        if reference is None or (_BAND_LOW * reference <= bar.l and bar.h <= _BAND_HIGH * reference):
            self._close[sym] = bar.c
            if self._suspects:
                self._suspects.pop(sym, None)
            return True
        suspects = self._suspects.get(sym, 0) + 1
        if suspects < NEW_LEVEL_BARS:
            self._suspects[sym] = suspects
            return False
        self._close[sym] = bar.c
        del self._suspects[sym]
        return True


class FeedDecoder:
    """Turns ws frames and REST answers into events; keeps the pages of a chain until its last one."""

    def __init__(self, underlying: str, benchmark: str, *, profile_days: int = 10) -> None:
        self.underlying = underlying
        self.profile_days = profile_days
        self._profile_bars: list[Bar] = []
        self._profile_next: str | None = None  # the path the pending profile page's next_url asks for
        self.symbols = frozenset({underlying, benchmark})
        self.counters = FeedCounters()
        self._pages: list[object] = []
        # The last page of a poll past MAX_CHAIN_PAGES (empty: none): the rest of that poll is dropped too.
        self._dropping: list[object] = []
        self._chain_prefix = f"/v3/snapshot/options/{underlying}"
        self._profile_days: dict[str, dict[int, float]] = {}
        self._ahead = AheadGuard()
        self._prices = PriceGuard()

    @classmethod
    def for_rules(cls, rules: Rules) -> FeedDecoder:
        """The decoder the engine with these rules needs (symbols, profile length)."""
        return cls(rules.underlying, rules.benchmark, profile_days=rules.volume_profile_days)

    def decode(self, item: Received) -> list[Event]:
        """One received data item (a ws frame or a REST answer; not a control line) → its events."""
        if item.kind == "ws":
            return self.ws(item.t, item.payload)  # type: ignore[arg-type]
        return self.rest(item.t, item.path, item.status, item.payload)

    def ws(self, received_ms: int, payload: str | bytes | list) -> list[Event]:
        """One WebSocket frame → its bars (status messages are kept in the counters)."""
        parsed = parse_ws_frame(payload, received_ms, self.symbols)
        counters = self.counters
        counters.frames += 1
        if parsed.bad > 0 and not parsed.bars and not parsed.statuses:
            counters.bad_frames += 1
            counters.bad_frame_events += parsed.bad
        counters.bad_events += parsed.bad
        counters.ignored_events += parsed.ignored
        if parsed.statuses:
            counters.statuses.extend(parsed.statuses)
            del counters.statuses[:-20]
        bars = parsed.bars
        if bars:
            bars = self._guarded(bars, received_ms)
        if parsed.quotes:
            counters.stream_quotes += len(parsed.quotes)
            return [*bars, *(ContractSnapshot(received_ms, q, "stream") for q in parsed.quotes)]
        return list(bars)

    def _guarded(self, bars: tuple[Bar, ...], received_ms: int) -> tuple[Bar, ...]:
        """The bars (streamed or backfilled) the AheadGuard and then the PriceGuard keep; the others counted."""
        counters = self.counters
        timely = self._ahead.keep(bars, received_ms)
        priced = self._prices.keep(timely)
        if len(priced) < len(bars):
            counters.ahead_bars += len(bars) - len(timely)
            counters.price_jumps += len(timely) - len(priced)
            counters.bad_events += len(bars) - len(priced)
        return priced

    def rest(self, received_ms: int, path: str, status: int, body: object) -> list[Event]:
        """One REST answer → events. A failed answer drops any partial chain: the previous chain stays.

        Failed means a status other than 200, or a 200 whose body is not a JSON object. An answer that
        cannot be decoded at all (a path that is not a URL, a page link with a broken escape: a peer's
        `next_url` is followed as given) is counted as a REST error and dropped, never raised: the
        replay, backtest or restart warm-up reading it goes on with the next line.
        """
        try:
            return self._rest(received_ms, path, status, body)
        except (ValueError, TypeError, OverflowError, RecursionError):
            return self._failed_answer()

    def _failed_answer(self) -> list[Event]:
        """An answer that cannot be read: counted, and any partial chain dropped (the previous one stays)."""
        self.counters.rest_errors += 1
        self._pages.clear()
        self._dropping = []
        return []

    def _rest(self, received_ms: int, path: str, status: int, body: object) -> list[Event]:
        parts = urlsplit(path)
        route = parts.path
        if route == self._chain_prefix and not _continues(self._pages or self._dropping, path):
            self._abandon_pending()
        if status != 200 or not is_json_object(body):
            self.counters.rest_errors += 1
            if route == self._chain_prefix:
                self._pages.clear()
            return []
        if route == self._chain_prefix:
            return self._chain_page(received_ms, body)
        if route.startswith(self._chain_prefix + "/"):
            return self._contract(received_ms, body)
        if route.startswith("/v2/aggs/ticker/"):
            return self._aggs(received_ms, route, body, path != self._profile_next)
        return []

    def _abandon_pending(self) -> None:
        """A new chain poll begins: pages an earlier poll left unfinished can never complete."""
        self._dropping = []
        if self._pages:
            self._pages.clear()
            self.counters.abandoned_chains += 1

    def _contract(self, received_ms: int, body: object) -> list[Event]:
        quote = parse_contract_snapshot(body_of(body))
        if quote is None:
            self.counters.bad_quotes += 1
            return []
        if not quote_is_usable(quote):
            self.counters.unusable_quotes += 1
        return [ContractSnapshot(received_ms, quote)]

    def _chain_page(self, received_ms: int, body: object) -> list[Event]:
        if self._dropping or len(self._pages) >= MAX_CHAIN_PAGES:
            return self._drop_overflow(body)
        next_url = next_url_of(body)
        if not is_json_object(body):
            # Reading the link decoded a tape's page and found no JSON (a broken escape): a failed
            # answer, as the live decoder found it.
            return self._failed_answer()
        self._pages.append(body)
        if next_url:
            return []
        pages, self._pages = tuple(self._pages), []
        return [ChainSnapshot(received_ms, LazyChain(pages))]

    def _drop_overflow(self, body: object) -> list[Event]:
        """More pages than any poll asks for cannot be one chain: the pages so far and the rest of that
        poll are dropped (its last pages had passed for a whole chain, and chosen a wrong contract)."""
        if self._pages:
            self._pages.clear()
            self.counters.abandoned_chains += 1
        self._dropping = [body] if next_url_of(body) else []
        return []

    def _aggs(self, received_ms: int, route: str, body: object, first_page: bool) -> list[Event]:
        # /v2/aggs/ticker/{sym}/range/{mult}/{span}/{from}/{to}
        parts = route.split("/")
        if len(parts) < 10:
            return []
        sym, multiplier, span = parts[4], parts[6], parts[7]
        if span == "second" and sym in self.symbols:
            page = parse_aggs_page(body_of(body), sym, int(multiplier) * 1000, received_ms)
            self.counters.bad_events += page.bad
            # Backfilled seconds pass the same guards as streamed ones: a bad print is bad either way.
            kept = self._guarded(page.bars, received_ms) if page.bars else ()
            return [bar._replace(backfilled=True) for bar in kept]
        if span == "minute" and sym == self.underlying:
            if first_page:
                self._profile_bars = []  # an earlier fetch that stopped early never completes
            return self._profile_page(received_ms, body)
        return []

    def _profile_page(self, received_ms: int, body: object) -> list[Event]:
        """Minute aggregates of past sessions → the average volume per minute of day of the last N sessions."""
        page = parse_aggs_page(body_of(body), self.underlying, 60_000, received_ms)
        self._profile_bars.extend(page.bars)
        self._profile_next = request_path(page.next_url) if page.next_url else None
        if page.next_url:
            return []
        bars, self._profile_bars = self._profile_bars, []
        today = ny_date(received_ms)
        by_day: dict[str, list[Bar]] = {}
        for bar in bars:
            day = ny_date(bar.start_ms)
            if day < today:
                by_day.setdefault(day.isoformat(), []).append(bar)
        recent = sorted(by_day)[-self.profile_days :]
        totals: dict[int, float] = {}
        for day in recent:
            for bar in by_day[day]:
                minute = minute_of_day(bar.start_ms)
                totals[minute] = totals.get(minute, 0.0) + bar.v
        minutes = {minute: total / len(recent) for minute, total in totals.items()}
        return [VolumeProfile(received_ms, today.isoformat(), len(recent), minutes)]


def _continues(pages: list[object], path: str) -> bool:
    """Whether `path` is the page the last pending page's `next_url` asked for.

    Judged by the link itself, not by its query's names: Polygon pages with `cursor`, but a server that
    pages with `offset` or `page` is followed just as well.
    """
    if not pages:
        return False
    url = next_url_of(pages[-1])
    return url is not None and request_path(url) == path


def is_json_object(body: object) -> bool:
    """Whether a REST body is a JSON object, without decoding a tape's still-encoded body."""
    if isinstance(body, RawJson):
        return body.is_object()
    return isinstance(body, dict)


def quote_is_usable(quote: OptionQuote) -> bool:
    """Whether a contract's quote can mark a position: bid > 0 and ask >= bid (the parser bounds both)."""
    return quote.bid is not None and quote.ask is not None and 0 < quote.bid <= quote.ask


def body_of(body: object) -> object:
    """A REST body as Python values, decoding a tape's still-encoded body on first use."""
    return body.value() if isinstance(body, RawJson) else body


def next_url_of(body: object) -> str | None:
    """A chain page's `next_url` without decoding the whole page when it is still raw text."""
    if isinstance(body, RawJson):
        return body.top_level_string("next_url")
    value = body.get("next_url") if isinstance(body, dict) else None
    return value if isinstance(value, str) and value else None


def newest_per_ticker(quotes: list[OptionQuote]) -> tuple[OptionQuote, ...]:
    """One quote per contract, the newest by its quote time (the first of equals), in first-seen order.

    A contract can come twice in one chain: pages are fetched one after another while the chain moves,
    so a contract can slide from one page onto the next. Its older quote must neither win the ranking
    nor mark a position.
    """
    kept: dict[str, OptionQuote] = {}
    for quote in quotes:
        seen = kept.get(quote.ticker)
        if seen is None or (quote.quote_ms or 0) > (seen.quote_ms or 0):
            kept[quote.ticker] = quote
    if len(kept) == len(quotes):
        return tuple(quotes)
    return tuple(kept.values())


class LazyChain:
    """The quotes of a paged chain, parsed on first use and then kept."""

    __slots__ = ("_pages", "_quotes", "bad")

    def __init__(self, pages: tuple[object, ...]) -> None:
        self._pages = pages
        self._quotes: tuple[OptionQuote, ...] | None = None
        self.bad = 0

    def _parsed(self) -> tuple[OptionQuote, ...]:
        if self._quotes is None:
            quotes: list[OptionQuote] = []
            for body in self._pages:
                page = parse_chain_page(body_of(body))
                quotes.extend(page.quotes)
                self.bad += page.bad
            self._quotes, self._pages = newest_per_ticker(quotes), ()
        return self._quotes

    def __iter__(self) -> Iterator[OptionQuote]:
        return iter(self._parsed())

    def find(self, ticker: str) -> OptionQuote | None:
        """One contract's quote, parsing only that contract when the pages are still raw."""
        if self._quotes is not None:
            return next((q for q in self._quotes if q.ticker == ticker), None)
        found: list[OptionQuote] = []
        for body in self._pages:
            page = body_of(body)
            results = page.get("results") if isinstance(page, dict) else None
            for result in results if isinstance(results, list) else ():
                details = result.get("details") if isinstance(result, dict) else None
                if isinstance(details, dict) and details.get("ticker") == ticker:
                    quote = parse_option_result(result)
                    if quote is not None:
                        found.append(quote)
        return newest_per_ticker(found)[0] if found else None

    def __len__(self) -> int:
        return len(self._parsed())
