"""Polygon/Massive market data: pure parsers from wire JSON to events, and the live clients.

The `parse_*` functions do no I/O. Live and replay feed them the same inputs (a WebSocket frame's
text or its decoded array, a REST body), so a tape reproduces the live day. Bad input is counted
and dropped, never raised: a parser only says how much it could not use. Numbers are passed on as
JSON gave them (int or float), after checking that they are finite and in range. Absurd values
count as invalid: a stock price above MAX_STOCK_PRICE or a volume above MAX_VOLUME makes a bar
bad; an option bid or ask above MAX_OPTION_PRICE, an implied volatility above MAX_IV, or a size,
volume or open interest above MAX_VOLUME is treated like a missing value.

The live half speaks the wire protocol itself (websockets, httpx; not the vendor SDK):
`PolygonStream` reads the stocks WebSocket on its own thread, stamps every frame and hands it on
unparsed, and reconnects forever; `PolygonRest` fetches chain and contract snapshots and aggregates
with timeouts, retries of transient failures and `next_url` paging. The API key travels only in the
auth message and the `Authorization` header; it never appears in a path, a log line or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import random
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from events import Bar, FeedStatus, OptionQuote, Received
from http_deadline import DeadlineTransport, read_capped
from redaction import Redactor
from retry_after import retry_after_seconds
from tape import MAX_STAMP_MS, is_local_path, request_path, strip_api_key

_FLOAT_MAX = sys.float_info.max
# The latest bar window bound taken: the tapes' own bound on stamps (2100-01-01 UTC in ms).
MAX_WINDOW_MS = MAX_STAMP_MS
# Bounds past which a number is a vendor bug, not a market: the dearest US stock trades near 1e6,
# an option premium is below its underlying, IWM trades ~3e7 shares a day, an IV of 100 is 10,000%.
MAX_STOCK_PRICE = 1e7
MAX_OPTION_PRICE = 1e5
MAX_VOLUME = 1e12
MAX_IV = 100.0
_NUMBER_TYPES = frozenset({int, float})
_ERROR_TEXT_LIMIT = 200
_OCC_PATTERN = re.compile(r"O:(?P<root>[A-Z0-9.]+?)(?P<yymmdd>\d{6})(?P<cp>[CP])(?P<strike>\d{8})")
_ISO_DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")
_RIGHT_LETTERS = {"call": "C", "put": "P", "c": "C", "p": "P"}
_RIGHT_NAMES = {"C": "call", "P": "put"}


@dataclass(frozen=True, slots=True)
class StatusMessage:
    """A WebSocket `ev: "status"` event (connected, auth_success, max_connections, ...)."""

    status: str
    message: str


@dataclass(frozen=True, slots=True)
class ParsedFrame:
    """What one WebSocket frame held: bars of the wanted symbols, status events and the counts of the rest."""

    bars: tuple[Bar, ...]
    statuses: tuple[StatusMessage, ...]
    bad: int
    ignored: int
    quotes: tuple[OptionQuote, ...] = ()


@dataclass(frozen=True, slots=True)
class ChainPage:
    """One page of an options-chain snapshot."""

    quotes: tuple[OptionQuote, ...]
    next_url: str | None
    bad: int


@dataclass(frozen=True, slots=True)
class AggsPage:
    """One page of REST aggregates turned into bars."""

    bars: tuple[Bar, ...]
    next_url: str | None
    bad: int


_BAD_FRAME = ParsedFrame((), (), 1, 0)
A_EVENT_SPAN_MS = 1000  # an `A` event is a per-second aggregate


def _price(x: Any) -> float | None:
    """A finite number > 0 as given (int or float), else None.

    The chained comparison rejects NaN, infinities and ints too big for a float at once; type() rather
    than isinstance() because bool is an int subclass and JSON `true` is not a number here. Values are
    not converted to float: on the bar hot path that costs more than it is worth, and int is a float
    as far as every consumer is concerned.
    """
    if type(x) in _NUMBER_TYPES and 0 < x <= _FLOAT_MAX:
        return x
    return None


def _stock_price(x: Any) -> float | None:
    """A stock price: a number in (0, MAX_STOCK_PRICE] as given, else None (NaN fails every comparison)."""
    if type(x) in _NUMBER_TYPES and 0 < x <= MAX_STOCK_PRICE:
        return x
    return None


def _volume(x: Any) -> float | None:
    """A share or contract count in [0, MAX_VOLUME] as given, else None."""
    if type(x) in _NUMBER_TYPES and 0 <= x <= MAX_VOLUME:
        return x
    return None


def _option_price(x: Any) -> float | None:
    """An option bid or ask in [0, MAX_OPTION_PRICE] as given, else None (a zero bid is a real quote)."""
    if type(x) in _NUMBER_TYPES and 0 <= x <= MAX_OPTION_PRICE:
        return x
    return None


def _iv(x: Any) -> float | None:
    """An implied volatility in [0, MAX_IV] as given, else None."""
    if type(x) in _NUMBER_TYPES and 0 <= x <= MAX_IV:
        return x
    return None


def _bar_from_fields(
    d: dict, sym: str, start_ms: int, end_ms: int, received_ms: int, with_day: bool
) -> Bar | None:
    """Validate the OHLCV fields shared by WS `A` events and REST aggs; None when the bar is unusable."""
    if not (start_ms <= end_ms <= MAX_WINDOW_MS):
        # A stamp past 2100 (no clock means it; year 33,700 crashed the time formatting), or a window
        # that ends before it starts: its second is unknowable, and an entry needs the bar's age.
        return None
    o = _stock_price(d.get("o"))
    h = _stock_price(d.get("h"))
    lo = _stock_price(d.get("l"))
    c = _stock_price(d.get("c"))
    v = _volume(d.get("v"))
    if o is None or h is None or lo is None or c is None or v is None or h < lo:
        return None  # a high below the low is not a bar but a mangled message
    vw = d.get("vw")
    if vw is not None and _stock_price(vw) is None:
        return None
    day_vwap = _stock_price(d.get("a")) if with_day else None
    day_volume = _volume(d.get("av")) if with_day else None
    return Bar(sym, start_ms, end_ms, o, h, lo, c, v, vw, day_vwap, day_volume, received_ms)


def _bar_from_a_event(d: dict, sym: str, received_ms: int) -> Bar | None:
    """A WS per-second aggregate (`ev: "A"`) as a Bar, or None when invalid.

    `s`/`e` are window start and end in ms: ints >= 0, or floats with integral values (made ints).
    A missing `e` is `s + 1000`, the end of the per-second window.
    """
    s = d.get("s")
    e = d.get("e")
    # The vendor's own shape (two non-negative ints) costs two type tests and two comparisons;
    # anything else takes the slower path below.
    if type(s) is not int or type(e) is not int or s < 0 or e < 0:
        s = _window_ms(s)
        if s is None:
            return None
        e = s + A_EVENT_SPAN_MS if e is None else _window_ms(e)
        if e is None:
            return None
    return _bar_from_fields(d, sym, s, e, received_ms, True)


def _window_ms(x: object) -> int | None:
    """A window bound in ms: an int >= 0, or a finite integral float >= 0 as int; else None.

    Ints stay ints so that a bar's start is the same key (features_vector.bar_key, the dedup by
    (sym, s)) whichever way JSON wrote it. bool is refused (type(), not isinstance()); NaN and
    infinities are not integral.
    """
    if type(x) is int:
        return x if x >= 0 else None
    if type(x) is float and x >= 0 and x.is_integer():
        return int(x)
    return None


def _decode_frame(payload: str | bytes | list) -> list | None:
    """The frame's JSON array, or None when it is not valid JSON or not an array."""
    if isinstance(payload, list):
        return payload
    if not isinstance(payload, (str, bytes, bytearray)):
        return None
    try:
        decoded = json.loads(payload)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and UnicodeDecodeError (bytes that are not UTF-8).
        return None
    return decoded if isinstance(decoded, list) else None


def _status_from_event(d: dict) -> StatusMessage | None:
    """A status event as a StatusMessage; None when `status` is not a string."""
    status = d.get("status")
    if type(status) is not str:
        return None
    message = d.get("message")
    return StatusMessage(status, message if type(message) is str else "")


def parse_ws_frame(payload: str | bytes | list, received_ms: int, symbols: frozenset[str]) -> ParsedFrame:
    """Parse one WebSocket frame (raw text, or the decoded array as stored in tapes).

    `A` events of `symbols` become bars, `Q` events of option contracts (the options cluster) become
    quotes, status events become `StatusMessage`s. `A` events of other symbols, stock `Q` events and
    other event types are counted in `ignored`. Invalid events are counted in `bad` and dropped without
    affecting their neighbours; a frame that is not a JSON array is `bad=1` alone.
    """
    events = _decode_frame(payload)
    if events is None:
        return _BAD_FRAME
    bars: list[Bar] = []
    statuses: list[StatusMessage] = []
    quotes: list[OptionQuote] = []
    bad = 0
    ignored = 0
    for d in events:
        ev = d.get("ev") if type(d) is dict else None
        if ev == "A":
            item: object = _a_event_item(d, symbols, received_ms)
            target: list = bars
        elif ev == "Q":
            item, target = _quote_from_q_event(d), quotes
        elif ev == "status":
            item, target = _status_from_event(d), statuses
        else:
            item, target = (_IGNORED if type(ev) is str else None), bars
        if item is None:
            bad += 1
        elif item is _IGNORED or item is _STOCK_QUOTE:
            ignored += 1
        else:
            target.append(item)
    return ParsedFrame(tuple(bars), tuple(statuses), bad, ignored, tuple(quotes))


_STOCK_QUOTE = OptionQuote("", 0.0, "", "", None, None, None, None, 0.0, 0.0, 0.0, 0.0, None)
_IGNORED = object()


def _a_event_item(d: dict, symbols: frozenset[str], received_ms: int) -> object:
    """An `A` event as a Bar; `_IGNORED` for a symbol nobody asked for; None when invalid."""
    sym = d.get("sym")
    if type(sym) is not str:
        return None
    if sym not in symbols:
        return _IGNORED
    return _bar_from_a_event(d, sym, received_ms)


def _quote_from_q_event(d: dict) -> OptionQuote | None:
    """An options-cluster `Q` event as an OptionQuote (no greeks); `_STOCK_QUOTE` for a stock's quote.

    None when the event is unusable: a malformed contract or a SIP time `t` that is there but unreadable.
    A quote without `t` (absent or null; rare) is taken with `quote_ms` None, not the receive time: the
    engine's mark rule then takes it without letting it displace a timed quote's order (README, "Marks
    in real time"), where a receive time would be a stamp the vendor never gave. Prices are kept as given
    within their bounds (a crossed or zero-bid quote is a real message); the engine ignores invalid ones.
    """
    sym = d.get("sym")
    if type(sym) is not str:
        return None
    if not sym.startswith("O:"):
        return _STOCK_QUOTE
    identity = parse_occ_ticker(sym)
    t = d.get("t")
    quote_ms = None if t is None else to_ms(t)
    # A garbled stamp is refused rather than treated as absent: taken untimed, it would slip past
    # the order check that a real stamp would have failed.
    if identity is None or (quote_ms is None and t is not None):
        return None
    _root, expiry, right, strike = identity
    return OptionQuote(
        ticker=sym,
        strike=strike,
        expiry=expiry.isoformat(),
        right=right,
        delta=None,
        iv=None,
        bid=_option_price(d.get("bp")),
        ask=_option_price(d.get("ap")),
        bid_size=_volume(d.get("bs")) or 0.0,
        ask_size=_volume(d.get("as")) or 0.0,
        volume=0.0,
        open_interest=0.0,
        quote_ms=quote_ms,
    )


def _sub(obj: dict, key: str) -> dict:
    """The nested object under `key`, or {} when it is missing or not an object."""
    value = obj.get(key)
    return value if type(value) is dict else {}


def _delta(x: Any) -> float | None:
    """A delta in [-1, 1] (puts are negative), else None."""
    if type(x) in _NUMBER_TYPES and -1 <= x <= 1:
        return x
    return None


def _iso_date(x: object) -> str | None:
    """`x` when it is a real calendar date written YYYY-MM-DD, else None."""
    if type(x) is not str or _ISO_DATE_PATTERN.fullmatch(x) is None:
        return None
    try:
        datetime.date.fromisoformat(x)
    except ValueError:
        return None
    return x


def _contract_identity(details: dict) -> tuple[str, float, str, str] | None:
    """(ticker, strike, expiry, right) from `details`, or None when any of them is unusable.

    A strike, expiration date or contract type that `details` lacks (absent or null) is read from
    the OCC ticker, which encodes all three. A value that is there wins over the ticker, even when
    they disagree, as before the ticker was read at all: the vendor documents `details.*` as the
    contract's terms (polygon.md section 5: after corporate actions the ticker can differ), and a
    value that is there but unusable still makes the result bad rather than being papered over.
    A ticker whose expiry or right contradicts `details` makes the result bad too (see
    `_ticker_contradicts`): corporate actions change the strike and the root, never those.
    """
    ticker = details.get("ticker")
    if type(ticker) is not str or not ticker:
        return None
    raw_strike = details.get("strike_price")
    raw_expiry = details.get("expiration_date")
    contract_type = details.get("contract_type")
    if raw_strike is None or raw_expiry is None or contract_type is None:
        occ = parse_occ_ticker(ticker)
        if occ is None:
            return None
        _root, occ_expiry, occ_right, occ_strike = occ
        raw_strike = occ_strike if raw_strike is None else raw_strike
        raw_expiry = occ_expiry.isoformat() if raw_expiry is None else raw_expiry
        contract_type = occ_right if contract_type is None else contract_type
    strike = _stock_price(raw_strike)
    expiry = _iso_date(raw_expiry)
    right = contract_type.lower() if type(contract_type) is str else None
    if strike is None or expiry is None or right not in ("call", "put"):
        return None
    if _ticker_contradicts(ticker, expiry, right):
        return None
    return ticker, strike, expiry, right


def _ticker_contradicts(ticker: str, expiry: str, right: str) -> bool:
    """Whether an OCC ticker names another expiry or right than `details`: no corporate action changes
    those (only the strike and the root), and the BUY names the ticker, which is what the user trades.
    A put's ticker under a call's details had been named in a CALL alert."""
    occ = parse_occ_ticker(ticker)
    if occ is None:
        return False
    _root, occ_expiry, occ_right, _strike = occ
    return occ_expiry.isoformat() != expiry or occ_right != right


def parse_option_result(result: object) -> OptionQuote | None:
    """One options snapshot result (chain element or single-contract `results`) as an OptionQuote.

    None when the contract cannot be identified. Market fields may be missing or `{}`: missing,
    invalid or absurd numbers (see the module doc) become None (sizes, volume and open interest 0).
    Crossed or zero-bid quotes are kept as given; the contract selector rejects them with a reason,
    and a position is never marked with them.
    """
    if type(result) is not dict:
        return None
    identity = _contract_identity(_sub(result, "details"))
    if identity is None:
        return None
    ticker, strike, expiry, right = identity
    quote = _sub(result, "last_quote")
    return OptionQuote(
        ticker=ticker,
        strike=strike,
        expiry=expiry,
        right=right,
        delta=_delta(_sub(result, "greeks").get("delta")),
        iv=_iv(result.get("implied_volatility")),
        bid=_option_price(quote.get("bid")),
        ask=_option_price(quote.get("ask")),
        bid_size=_volume(quote.get("bid_size")) or 0.0,
        ask_size=_volume(quote.get("ask_size")) or 0.0,
        volume=_volume(_sub(result, "day").get("volume")) or 0.0,
        open_interest=_volume(result.get("open_interest")) or 0.0,
        quote_ms=to_ms(quote.get("last_updated")),
        underlying_price=_stock_price(_sub(result, "underlying_asset").get("price")),
    )


def _next_url(body: dict) -> str | None:
    """The page's `next_url` when it is a non-empty string."""
    url = body.get("next_url")
    return url if type(url) is str and url else None


def _results_list(body: object) -> tuple[list, str | None, int]:
    """(results, next_url, bad) of a paged body; a non-object body is one bad item, missing results none."""
    if type(body) is not dict:
        return [], None, 1
    results = body.get("results")
    return (results if type(results) is list else []), _next_url(body), 0


def parse_chain_page(body: object) -> ChainPage:
    """One page of `GET /v3/snapshot/options/{underlying}`; unusable results are counted in `bad`."""
    results, next_url, bad = _results_list(body)
    quotes = []
    for result in results:
        quote = parse_option_result(result)
        if quote is None:
            bad += 1
        else:
            quotes.append(quote)
    return ChainPage(tuple(quotes), next_url, bad)


def parse_contract_snapshot(body: object) -> OptionQuote | None:
    """The body of `GET /v3/snapshot/options/{underlying}/{contract}`, whose `results` is an object."""
    if type(body) is not dict:
        return None
    return parse_option_result(body.get("results"))


def _bar_from_agg(d: object, sym: str, span_ms: int, received_ms: int) -> Bar | None:
    """One REST aggregate (`t` = window start ms) as a Bar spanning `span_ms`, or None when invalid."""
    if type(d) is not dict:
        return None
    t = d.get("t")
    if type(t) is not int:
        return None
    return _bar_from_fields(d, sym, t, t + span_ms, received_ms, False)


def parse_aggs_page(body: object, sym: str, span_ms: int, received_ms: int) -> AggsPage:
    """One page of `GET /v2/aggs/ticker/{sym}/range/...` as bars of `span_ms` from each `t`.

    REST aggregates carry no session VWAP or volume, so those are None. Invalid results are counted in `bad`.
    """
    results, next_url, bad = _results_list(body)
    bars = []
    for d in results:
        bar = _bar_from_agg(d, sym, span_ms, received_ms)
        if bar is None:
            bad += 1
        else:
            bars.append(bar)
    return AggsPage(tuple(bars), next_url, bad)


def to_ms(ts: object) -> int | None:
    """A Unix timestamp in ns, µs, ms or s (told apart by magnitude) as int ms; None when unusable.

    Scaling down truncates to the millisecond that contains the instant; float seconds are rounded
    to the nearest ms so that binary fractions such as 1.717e9 + 0.713 do not lose a millisecond.
    """
    ts = _price(ts)
    if ts is None:
        return None
    if ts >= 1e17:
        return int(ts // 1_000_000)
    if ts >= 1e14:
        return int(ts // 1_000)
    if ts >= 1e11:
        return int(ts // 1)
    return round(ts * 1000)


def occ_ticker(root: str, expiry: datetime.date, right: str, strike: float) -> str:
    """The Polygon option ticker, e.g. ("IWM", 2025-10-02, "call", 242.5) -> "O:IWM251002C00242500".

    `right` is "call"/"put" or "C"/"P" in any case. Raises ValueError for an empty root, an unknown
    right or a strike that does not fit the 8-digit field.
    """
    letter = _RIGHT_LETTERS.get(right.lower())
    if not root or letter is None:
        raise ValueError(f"cannot build an option ticker from root={root!r} right={right!r}")
    thousandths = round(strike * 1000)
    if not 0 < thousandths < 100_000_000:
        raise ValueError(f"strike {strike!r} does not fit an option ticker")
    return f"O:{root.upper()}{expiry:%y%m%d}{letter}{thousandths:08d}"


def parse_occ_ticker(ticker: str) -> tuple[str, datetime.date, str, float] | None:
    """(root, expiry, "call"|"put", strike) of a ticker such as "O:IWM251002C00242500"; None if malformed."""
    if type(ticker) is not str:
        return None
    match = _OCC_PATTERN.fullmatch(ticker)
    if match is None:
        return None
    yymmdd = match["yymmdd"]
    try:
        expiry = datetime.date(2000 + int(yymmdd[:2]), int(yymmdd[2:4]), int(yymmdd[4:]))
    except ValueError:
        return None
    return match["root"], expiry, _RIGHT_NAMES[match["cp"]], int(match["strike"]) / 1000


def _short(text: str) -> str:
    """`text` cut to a length that fits a log line or an alert."""
    return text if len(text) <= _ERROR_TEXT_LIMIT else text[: _ERROR_TEXT_LIMIT - 3] + "..."


def error_text(body: object) -> str:
    """A REST error body's human message: its `error` or `message` field, else a short repr; '' for None."""
    if body is None:
        return ""
    if type(body) is dict:
        for key in ("error", "message"):
            value = body.get(key)
            if type(value) is str and value.strip():
                return _short(value.strip())
    if isinstance(body, (bytes, bytearray)):
        return _short(bytes(body).decode("utf-8", errors="replace").strip())
    if type(body) is str:
        return _short(body.strip())
    return _short(repr(body))


STREAM_OPEN_TIMEOUT_S = 5.0
STREAM_CLOSE_TIMEOUT_S = 2.0
# One frame's most (websockets' own default is 1 MiB): a burst of 10,000 option quotes in one frame (1.4 MB)
# closed the socket with 1009 and its quotes, the peak and the fall of a giveback among them, were lost.
# Frames come uncompressed, so this is also what the wire must carry; the engine inbox bounds the rest.
STREAM_MAX_FRAME_BYTES = 16 << 20
# A silence wait that ends this much later than asked means the process was held, not the feed silent.
HELD_OVERSLEEP_S = 1.0
AUTH_REPLY_TIMEOUT_S = 10.0
# The vendor greets at once; a server that does not (some fakes) is sent the auth after this many
# market seconds anyway, rather than never.
GREETING_WAIT_S = 2.0
HEALTHY_AFTER_S = 30.0
# Wall seconds a reconnect waits for the gap's backfill before it subscribes anyway.
BACKFILL_WAIT_S = 10.0
# Frames in a row without the required symbol before their silence counts (see _check_wanted).
STARVED_FRAMES = 5
# Wall seconds between two looks at the silence limit while there is none (outside the session).
SILENCE_RECHECK_S = 1.0
NETWORK_ERROR_STATUS = 599
# 413/429/499/5xx are what the official SDK retries; 413 makes no sense for a GET, so it is left out.
RETRYABLE_STATUSES = frozenset({429, 499, *range(500, 600)})
# Aggregates may take many pages; a chain within the strike window is one page of 250, so a chain
# poll that needs more than MAX_CHAIN_PAGES is following a broken or hostile next_url.
MAX_PAGES = 200
# Bars one aggregates request may bring over all its pages: a whole extended-hours day of seconds (57,600)
# or a month of minutes fits twice over. A server that pages on for ever (a new cursor, the same 13,000
# bars each time) had filled 290 MB of journal and 1.5 GB of memory with one volume profile.
MAX_AGGS_RESULTS = 120_000
MAX_CHAIN_PAGES = 20
# The status a stream reports when the cluster refuses its subscription (connected, reason).
REFUSED_SUBSCRIPTION = (True, "subscription_refused")
# Longest wait a Retry-After holds requests for: a server asking for a day must not silence the chain
# and the held contract's marks for a day; asked again after this, it can say so again.
RETRY_AFTER_HOLD_CAP_S = 120.0
_ROUTE_NUMBER = re.compile(r"/[0-9][0-9-]*(?=/|$)")
_UNSAFE_URL_CHAR = re.compile(r"[\x00-\x20\x7f-\x9f\s]")
_BODY_TEXT_LIMIT = 2000
# Decoded bytes one REST answer may hold: a full aggregates page (50,000 bars) is about 5 MB, a chain
# page of 250 contracts well under 1 MB. Past it the answer is refused (a decompression bomb).
MAX_BODY_BYTES = 32 << 20
_STATUS_MARK = '"status"'
_STATUS_MARK_BYTES = b'"status"'


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential back-off with full jitter and an immediate first retry."""

    initial_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0

    def ceiling(self, attempt: int) -> float:
        """The longest wait before attempt `attempt` (0 for the first)."""
        if attempt <= 0:
            return 0.0
        try:
            grown = self.initial_s * self.factor ** (attempt - 1)
        except OverflowError:
            return self.max_s
        return min(self.max_s, grown)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before attempt `attempt`: 0.0 for attempt 0, else uniform in [0, ceiling]."""
        ceiling = self.ceiling(attempt)
        return rng.uniform(0.0, ceiling) if ceiling > 0 else 0.0


DEFAULT_BACKOFF = Backoff()


def _frame_statuses(frame: str | bytes) -> tuple[StatusMessage, ...]:
    """The status events of a frame; data frames are recognised by a substring test and not parsed."""
    marker = _STATUS_MARK if isinstance(frame, str) else _STATUS_MARK_BYTES
    if marker not in frame:
        return ()
    return parse_ws_frame(frame, 0, frozenset()).statuses


def _auth_outcome(statuses: tuple[StatusMessage, ...]) -> str | None:
    """The auth result the frame carries (auth_success, auth_failed, auth_timeout), else None."""
    for status in statuses:
        if status.status in ("auth_success", "auth_failed", "auth_timeout"):
            return status.status
        # Older servers said {"status": "error", "message": "authentication failed"}.
        if status.status == "error" and "auth" in status.message.lower():
            return "auth_failed"
    return None


def _close_text(exc: ConnectionClosed) -> str:
    """Why a socket closed, e.g. "closed 1008 max_connections" or "connection lost"."""
    close = exc.rcvd or exc.sent
    if close is None:
        return "connection lost"
    reason = f" {close.reason[:80]}" if close.reason else ""
    return f"closed {close.code}{reason}"


def _exception_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__


def _raised_at(exc: BaseException) -> str:
    """Where an exception was raised, e.g. "feed.py:42 in ws".

    Unexpected errors are logged with this instead of a traceback: rendered tracebacks carry frame
    locals, and a frame that sent the auth message holds the API key.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


# Words of a refused subscription. The vendor's exact wording is not documented (reference/polygon.md),
# so an `error` status naming access, the plan or a channel counts; a false match costs one FEED alert.
_REFUSAL_WORDS = ("not authorized", "not entitled", "entitle", "plan", "permission", "access", "upgrade",
                  "not include", "doesn't include", "does not include", "subscri")  # fmt: skip
# A channel named in a status message (Q.O:IWM251002C00243000, A.IWM), lower-cased.
_CHANNEL = re.compile(r"\b(?:q|a|am|t)\.[a-z0-9:*]+")


def _refuses_subscription(status: StatusMessage, topics: Iterable[str]) -> bool:
    """A status frame saying one of `topics` was not allowed (the plan lacks that data). A message that
    names channels refuses ours only if it names one of them: an error about another topic had been
    read as the held contract's quotes refused, and spent the position's one FEED notice."""
    if status.status not in ("error", "auth_failed"):
        return False
    text = status.message.lower()
    named = {channel.rstrip(".:") for channel in _CHANNEL.findall(text)}
    if named:
        return not named.isdisjoint(topic.lower() for topic in topics)
    return any(words in text for words in _REFUSAL_WORDS)


def _sym_patterns(sym: str) -> tuple[re.Pattern[str], re.Pattern[bytes]]:
    """(str, bytes) patterns of `"sym": "<sym>"` with any spacing JSON allows."""
    text = r'"sym"\s*:\s*"' + re.escape(sym) + '"'
    return re.compile(text), re.compile(text.encode())


# Why the stream is down when the server refused it, for /health (never the key itself).
AUTH_FAILED_ERROR = "stream refused the key (auth_failed)"
MAX_CONNECTIONS_ERROR = "max_connections: another connection uses this key"


class StreamSilent(Exception):
    """An open socket delivered nothing for too long during the session."""


class PolygonStream:
    """Reads the stocks WebSocket on its own thread and hands every frame, stamped, to `put`.

    Every frame but the `connected` greeting is put unparsed as `Received(t, "ws", text)`, status
    frames included, so the decoder and the tape see what arrived. The greeting is awaited briefly
    (GREETING_WAIT_S, scaled); without one the auth is sent anyway. The stream also puts a `FeedStatus` on
    auth_success, auth_failed, max_connections and when an authenticated socket goes down (never the
    same status twice in a row). It reconnects forever, clean closes included, with `backoff`; the
    attempt counter is reset only once a socket has stayed up and delivered data for 30 s, so a
    `max_connections` flap between two daemons on one key cannot become a hot loop. After a drop it
    calls `backfill(last frame ms, now ms)` on a worker thread before subscribing again (waiting
    `backfill_wait_s` at most: the live bars must not wait on a slow REST server). With `required_sym`,
    frames that carry no event of that symbol (status frames only, another symbol alone) count as
    silence too: none for `silence_s()` and the socket is replaced as a silent one is.

    The same class reads the options cluster: give it `topics` (e.g. `Q.O:IWM...`) instead of stock
    symbols and change them at any time with `set_topics`; a refused subscription is reported as a
    `FeedStatus` with reason "subscription_refused".
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        symbols: Sequence[str],
        put: Callable[[object], None],
        *,
        clock_ms: Callable[[], int],
        backfill: Callable[[int, int], None] | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        rng: random.Random | None = None,
        max_connections_wait_s: float = 60.0,
        auth_failed_wait_s: float = 60.0,
        healthy_after_s: float = HEALTHY_AFTER_S,
        open_timeout_s: float = STREAM_OPEN_TIMEOUT_S,
        silence_s: Callable[[], float | None] = lambda: None,
        backfill_wait_s: float = BACKFILL_WAIT_S,
        required_sym: str | None = None,
        topics: Sequence[str] | None = None,
        wait_scale: float = 1.0,
        gap_from_ms: int | None = None,
        name: str | None = None,
    ) -> None:
        """`gap_from_ms`: where the caller's data stops before this stream starts (a start mid-session);
        the first connection backfills from there, as every reconnect backfills from its last frame.
        `name` is bound to every log line ("stocks", or "options" when given `topics`): both clusters
        log the same events, and an unnamed `stream_down` could not say which one was down."""
        if not symbols and topics is None:
            raise ValueError("PolygonStream needs at least one symbol")
        self.url = url
        self.connected = False
        self.reconnects = 0
        self.last_frame_ms: int | None = None
        self._api_key = api_key
        self._redact = Redactor.of([api_key])
        self._topics: tuple[str, ...] = (
            tuple(topics) if topics is not None else tuple(f"A.{s}" for s in symbols)
        )
        self._subscribed: frozenset[str] = frozenset()
        self._ws: ClientConnection | None = None
        self._put = put
        self._clock_ms = clock_ms
        self._backfill = backfill
        self._backoff = backoff
        self._rng = rng if rng is not None else random.Random()
        self._max_connections_wait_s = max_connections_wait_s
        self._auth_failed_wait_s = auth_failed_wait_s
        self._healthy_after_ms = round(healthy_after_s * 1000)
        self._open_timeout_s = open_timeout_s
        self._silence_s = silence_s
        self._backfill_wait_s = backfill_wait_s
        # The wanted symbol's events, as any JSON spelling of the frame writes them (str or bytes).
        self._required_sym = required_sym
        self._wanted = None if required_sym is None else _sym_patterns(required_sym)
        # Waits are market seconds: a simulated clock running 40x waits 40x less wall time.
        self._wait_scale = wait_scale
        self.silent_reconnects = 0
        self.last_error: str | None = None
        # "auth_failed" from the server's refusal of the key until an auth succeeds: no redial can help.
        self.refused: str | None = None
        self.thread_restarts = 0
        self._attempt = 0
        self._gap_from_ms = gap_from_ms
        self._last_status: tuple[bool, str] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self.name = name or ("options" if topics is not None else "stocks")
        self._log = structlog.get_logger("polygon_stream").bind(stream=self.name)

    def start(self) -> None:
        """Connect on a daemon thread and stay connected until stop()."""
        if self._thread is not None:
            raise RuntimeError("PolygonStream.start() was already called")
        thread = threading.Thread(target=self._run, name="polygon-stream", daemon=True)
        thread.start()  # kept only once started: a thread the system refused is no thread to stop
        self._thread = thread

    def stop(self, timeout: float = 5.0) -> None:
        """Close the socket and end the thread, waiting up to `timeout` seconds for it."""
        self._stopping.set()
        with self._lock:
            loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already finished
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout)
        self.connected = False

    @property
    def alive(self) -> bool:
        """True while the stream's thread runs (it ends only after stop())."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        # The event loop itself failing (a bug, a library surprise) must not end the day's stream:
        # start a fresh loop after a pause, as after a dropped socket. So must a loop that ends without
        # stop() (its task cancelled) or a SystemExit raised inside it: only stop() ends this thread.
        while not self._stopping.is_set():
            try:
                asyncio.run(self._main())
                ended: BaseException = RuntimeError("the stream's event loop ended without stop()")
            except BaseException as exc:  # noqa: BLE001 - see above
                ended = exc
            if self._stopping.is_set():
                return
            self._log_unexpected("stream_thread_failed", ended)
            self.connected = False
            self.thread_restarts += 1
            self._stopping.wait(self._backoff.delay(min(self.thread_restarts, 10), self._rng))

    async def _main(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
        try:
            await self._reconnect_forever()
        except asyncio.CancelledError:
            self._log.info("stream_stopped")

    async def _reconnect_forever(self) -> None:
        floor_s = 0.0
        first = True
        while not self._stopping.is_set():
            wait_s = max(self._backoff.delay(self._attempt, self._rng), floor_s) * self._wait_scale
            if wait_s > 0:
                self._log.info("stream_reconnect_wait", wait_s=round(wait_s, 3), attempt=self._attempt)
                await asyncio.sleep(wait_s)
            if not first:
                self.reconnects += 1
            first = False
            self._attempt += 1
            floor_s = await self._connection()

    async def _connection(self) -> float:
        """One socket from dial to close; returns the least wait before the next dial."""
        ws: ClientConnection | None = None
        try:
            # No permessage-deflate: a few KB on the wire inflated to a megabyte a frame (a flood took
            # 2.5 GB in 70 s); the feed's frames are small, and the server must send them plain.
            async with connect(
                self.url,
                open_timeout=self._open_timeout_s,
                close_timeout=STREAM_CLOSE_TIMEOUT_S,
                compression=None,
                max_size=STREAM_MAX_FRAME_BYTES,
            ) as ws:
                return await self._converse(ws)
        except asyncio.CancelledError:
            if ws is not None:
                # stop() may land inside the close handshake; the loop is about to end, so drop the socket.
                ws.transport.abort()
            raise
        except ConnectionClosed as exc:
            why = _close_text(exc)
        except StreamSilent as exc:
            why = str(exc)
        except TimeoutError:
            why = "timed out"
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            why = f"connect failed: {_exception_text(exc)}"
        except Exception as exc:
            # A bug in one connection must not end the stream for the day: log it and dial again.
            self._log_unexpected("stream_connection_failed", exc)
            why = f"error: {type(exc).__name__}"
        self._went_down(why)
        return 0.0

    async def _converse(self, ws: ClientConnection) -> float:
        """Greeting, auth, gap backfill, subscribe, then read until the socket ends."""
        first = await self._first_frame(ws)
        statuses = () if first is None else _frame_statuses(first)
        if any(status.status == "max_connections" for status in statuses):
            return self._max_connections()
        # A server that authenticated us unasked has answered already; asking again could go unanswered.
        outcome = _auth_outcome(statuses)
        if outcome is None:
            async with asyncio.timeout(AUTH_REPLY_TIMEOUT_S):
                await ws.send(json.dumps({"action": "auth", "params": self._api_key}))
                outcome = await self._auth_reply(ws)
        if outcome == "auth_failed":
            return self._auth_failed()
        if outcome != "auth_success":
            self._log.warning("stream_auth_not_confirmed", status=outcome)
            return 0.0
        self.connected, self.refused = True, None
        self._report(True, "auth_success")
        await self._fill_gap()
        self._ws, self._subscribed = ws, frozenset()
        await self._sync_topics()
        self._gap_from_ms = None
        return await self._read(ws)

    def set_topics(self, topics: Sequence[str]) -> None:
        """Subscribe to exactly `topics` from now on (thread-safe; applied at once when connected)."""
        with self._lock:
            if tuple(topics) != self._topics and self._last_status == REFUSED_SUBSCRIPTION:
                # A refusal was of the topics of then: one of the new topics is news (and is reported).
                self._last_status = None
            self._topics = tuple(topics)
            loop = self._loop
        if loop is not None and self.connected:
            with contextlib.suppress(RuntimeError):  # the loop has just ended: the next dial subscribes
                asyncio.run_coroutine_threadsafe(self._sync_topics(), loop)

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics the stream wants (subscribed once connected)."""
        return self._topics

    async def _sync_topics(self) -> None:
        """Send the subscribe and unsubscribe messages that make the socket's topics the wanted ones."""
        ws = self._ws
        if ws is None:
            return
        wanted = frozenset(self._topics)
        dropped, added = self._subscribed - wanted, wanted - self._subscribed
        try:
            if dropped:
                await ws.send(json.dumps({"action": "unsubscribe", "params": ",".join(sorted(dropped))}))
            if added:
                await ws.send(json.dumps({"action": "subscribe", "params": ",".join(sorted(added))}))
        except ConnectionClosed:
            return  # the reconnect subscribes afresh
        self._subscribed = wanted
        if added or dropped:
            self._log.info("stream_subscribed", topics=",".join(sorted(wanted)), reconnects=self.reconnects)

    async def _first_frame(self, ws: ClientConnection) -> str | bytes | None:
        """The server's first frame when it is not the `connected` greeting, already put; else None.

        The greeting is awaited GREETING_WAIT_S market seconds at most: a server that never greets
        is sent the auth all the same. The greeting itself is not put (it never was); any other first
        frame (data, a status) is put at once, stamped like every frame, so nothing that arrives is lost.
        A greeting that comes late is read with the auth reply and put like any status frame.
        """
        try:
            async with asyncio.timeout(GREETING_WAIT_S * self._wait_scale):
                frame = await ws.recv()  # cancelling recv() loses no message (websockets guarantees it)
        except TimeoutError:
            self._log.info("stream_no_greeting", waited_s=round(GREETING_WAIT_S * self._wait_scale, 3))
            return None
        if any(status.status == "connected" for status in _frame_statuses(frame)):
            return None
        self._put_frame(frame)
        return frame

    async def _auth_reply(self, ws: ClientConnection) -> str:
        while True:
            frame = await ws.recv()
            self._put_frame(frame)
            outcome = _auth_outcome(_frame_statuses(frame))
            if outcome is not None:
                return outcome

    async def _fill_gap(self) -> None:
        """Let the caller fetch the seconds missed while down, before live data resumes."""
        gap_from = self._gap_from_ms
        if gap_from is None or self._backfill is None:
            return
        gap_to = self._clock_ms()
        if gap_to <= gap_from:
            return
        self._log.info("stream_backfill", gap_from_ms=gap_from, gap_to_ms=gap_to)
        try:
            # Bounded: a slow aggregates endpoint held the socket unsubscribed for minutes (no bars at
            # all). Past the wait the backfill goes on in its thread and the live bars come first.
            await asyncio.wait_for(asyncio.to_thread(self._backfill, gap_from, gap_to), self._backfill_wait_s)
        except TimeoutError:
            self._log.warning(
                "stream_backfill_slow", waited_s=self._backfill_wait_s, action="subscribing anyway"
            )
        except Exception as exc:
            self._log_unexpected("stream_backfill_failed", exc)

    async def _read(self, ws: ClientConnection) -> float:
        """The hot loop: stamp, put, and watch only for `max_connections` and silence."""
        up_since = self._clock_ms()
        healthy = False
        wanted = (time.monotonic(), 0)  # (wall time the required symbol last came, frames since)
        try:
            while True:
                frame = await self._next_frame(ws)
                t = self._put_frame(frame)
                if self._wanted is not None:
                    wanted = self._check_wanted(frame, *wanted)
                statuses = _frame_statuses(frame)
                if any(status.status == "max_connections" for status in statuses):
                    return self._max_connections()
                if any(_refuses_subscription(status, self._topics) for status in statuses):
                    self._log.error("stream_subscription_refused", topics=",".join(self._topics))
                    self._report(*REFUSED_SUBSCRIPTION)
                if not healthy and not statuses and t - up_since >= self._healthy_after_ms:
                    healthy = True
                    self._attempt = 0
        finally:
            self._gap_from_ms = self.last_frame_ms

    def _check_wanted(self, frame: str | bytes, wanted_at: float, missing: int) -> tuple[float, int]:
        """(when the required symbol last came, wall time; frames since); StreamSilent when frames flow
        without it for `silence_s()`: as good as silent, and a new socket is what fixes a stuck
        subscription. STARVED_FRAMES frames in a row must lack it too: after this process was held
        (a loaded machine), the frames buffered meanwhile hold the symbol's bars among them."""
        assert self._wanted is not None
        now = time.monotonic()
        limit = self._silence_s()  # None outside the session: nothing is owed then, the count restarts
        if limit is None or self._wanted[isinstance(frame, bytes)].search(frame):  # type: ignore[arg-type]
            return now, 0
        missing += 1
        if missing >= STARVED_FRAMES and now - wanted_at > limit:
            self.silent_reconnects += 1
            self._log.warning("stream_starved", without_s=round(now - wanted_at, 3), action="reconnecting")
            raise StreamSilent(f"frames but no {self._required_sym} event for {limit:.1f} s")
        return wanted_at, missing

    async def _next_frame(self, ws: ClientConnection) -> str | bytes:
        """The next frame; a socket that stays open but silent past `silence_s()` is given up on.

        Pings keep a dead feed's socket open for ever, so silence, not the socket, says the feed is gone.
        Silence counts only while `silence_s()` gives a limit (in session); outside, the limit is asked
        again every SILENCE_RECHECK_S, so a socket that went quiet before the open is redialled once the
        session has been silent that long (an audit's waited for its next frame, minutes into the session).
        """
        quiet_since: float | None = None
        while True:
            limit = self._silence_s()
            now = time.monotonic()
            if limit is None:
                quiet_since, wait = None, SILENCE_RECHECK_S
            else:
                quiet_since = now if quiet_since is None else quiet_since
                wait = limit - (now - quiet_since)
                if wait <= 0:
                    self.silent_reconnects += 1
                    self._log.warning("stream_silent", silent_s=round(limit, 3), action="reconnecting")
                    raise StreamSilent(f"silent for {limit:.1f} s")
            try:
                async with asyncio.timeout(wait):
                    return await ws.recv()
            except TimeoutError:
                if time.monotonic() - (now + wait) > HELD_OVERSLEEP_S:
                    # The wait overslept: this process was held (SIGSTOP, a paused VM) and the frames of
                    # meanwhile sit unread in the socket. Redialling dropped them all (and sent a STALL).
                    quiet_since = None
                continue

    def _auth_failed(self) -> float:
        # Said in last_error too: the socket closes without an error, and /health names only that.
        self.last_error, self.refused = AUTH_FAILED_ERROR, "auth_failed"
        self._log.error("stream_auth_failed", retry_in_s=self._auth_failed_wait_s)
        self._report(False, "auth_failed")
        return self._auth_failed_wait_s

    def _max_connections(self) -> float:
        self.last_error = MAX_CONNECTIONS_ERROR
        self._log.error("stream_max_connections", retry_in_s=self._max_connections_wait_s)
        self.connected = False
        self._report(False, "max_connections")
        return self._max_connections_wait_s

    def _put_frame(self, frame: str | bytes) -> int:
        t = self._clock_ms()
        self.last_frame_ms = t
        self._put(Received(t, "ws", frame))
        return t

    def _went_down(self, why: str) -> None:
        why = self._redact(why)  # a close reason can echo the key (a proxy's, a fake's)
        self.last_error = why
        self._log.warning("stream_down", why=why, attempt=self._attempt)
        if self.connected:
            self.connected = False
            self._report(False, f"disconnected: {why}")

    def _log_unexpected(self, event: str, exc: BaseException) -> None:
        error = self._redact(_exception_text(exc))
        self._log.error(event, error=error, at=_raised_at(exc))

    def _report(self, connected: bool, reason: str) -> None:
        status = (connected, reason)
        if status == self._last_status:
            return
        self._last_status = status
        self._put(FeedStatus(self._clock_ms(), connected, reason))


@dataclass(frozen=True, slots=True)
class RestAnswer:
    """One REST answer as received. `path` is path and query without any API key."""

    path: str
    status: int
    body: object
    received_ms: int


def _route(path: str) -> str:
    """A request path without its query and with its numbers and dates as `N`: what one kind of request
    shares over its pages and polls (each backfill asks its own millisecond range: one route for all)."""
    return _ROUTE_NUMBER.sub("/N", path.split("?", 1)[0])


def _first_time(said: dict[str, object], route: str, what: object) -> str:
    """The log level for `what` happening on `route`: "warning" when it is news (the route last said
    something else, or nothing), "debug" when it goes on; remembers it."""
    level = "debug" if said.get(route) == what else "warning"
    said[route] = what
    return level


@dataclass(slots=True)
class Paged:
    """The pages of one paged request so far, the paths asked, and why the whole is incomplete (None
    while it is whole): a failed last page, or paging stopped early with a `next_url` left."""

    answers: list[RestAnswer]
    asked: set[str]
    incomplete_why: str | None = None


def failure_text(answer: RestAnswer, redact: Callable[[str], str]) -> str | None:
    """What a REST answer's failure was, in words for /health and the log; None for a 200 JSON object."""
    if answer.status == 200 and type(answer.body) is dict:
        return None
    if answer.status == 200:
        return redact(f"HTTP 200 without a JSON object: {error_text(answer.body)}")
    return redact(f"HTTP {answer.status}: {error_text(answer.body)}")


def _result_count(body: object) -> int:
    """How many results a page holds (0 for anything but a list of them)."""
    results = body.get("results") if type(body) is dict else None
    return len(results) if type(results) is list else 0


def _next_path(body: object) -> str | None:
    """The path and query of a page's `next_url`, to be asked of our own base URL like the SDK does.

    None when there is none, and when it is not a URL we would send (see `unsafe_next_url`). The same
    `request_path` the feed decoder uses to join the pages, so a followed page is always recognised.
    """
    if type(body) is not dict:
        return None
    url = _next_url(body)
    if url is None or unsafe_next_url(body):
        return None
    return request_path(url)


def _decode_body(content: bytes) -> object:
    """JSON when the body is JSON, else its text (cut short); None when empty.

    A body nested too deep to decode (RecursionError) is not JSON as far as we are concerned.
    """
    if not content.strip():
        return None
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return content.decode("utf-8", errors="replace")[:_BODY_TEXT_LIMIT]


def unsafe_next_url(body: object) -> bool:
    """True when a page's `next_url` holds a control character or whitespace: never a URL to follow."""
    url = _next_url(body) if type(body) is dict else None
    return url is not None and _UNSAFE_URL_CHAR.search(url) is not None


class PolygonRest:
    """Polygon REST over httpx: chain and contract snapshots, aggregates, `next_url` paging.

    Every request has a timeout. 429 (honouring Retry-After), 5xx, timeouts and network errors are
    retried with capped exponential back-off; other answers (401, 403, 404, ...) come back at once.
    Nothing is ever raised: a network failure, an invalid URL (a control character in a `next_url`)
    or any unexpected error is answered as status 599 with `{"error": ...}`. Paging follows at most
    MAX_CHAIN_PAGES pages of a chain (MAX_PAGES of aggregates), never a next_url with a control
    character or whitespace, and never a path already asked in the same paging (a cycle). Safe to
    share between threads.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        clock_ms: Callable[[], int],
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 10.0,
        deadline_s: float = 15.0,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 4,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 30.0,
    ) -> None:
        self.requests = 0
        self.last_error: str | None = None
        # Why the latest chain poll brought no whole chain (None when it did): the chain's own, which
        # `last_error` is not (every request sets that, and the next good page of anything clears it).
        self.chain_error: str | None = None
        self._paging_said: dict[str, object] = {}  # route -> the reason its paging last stopped early
        self._failing: dict[str, object] = {}  # route -> the status its last failure was logged with
        self._retrying: dict[str, object] = {}  # route -> the status its last retry was logged with
        # Route -> the time (clock ms) before which the server asked (Retry-After) that it not be asked again.
        self._hold_until_ms: dict[str, int] = {}
        self._api_key = api_key
        self._redact = Redactor.of([api_key])
        self._clock_ms = clock_ms
        self._sleep = sleep
        self._max_attempts = max(1, max_attempts)
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._lock = threading.Lock()
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
            timeout=timeout_s,
            # Each attempt ends within deadline_s even when the answer trickles in (http_deadline.py).
            transport=transport or DeadlineTransport(deadline_s),
        )
        self._log = structlog.get_logger("polygon_rest")

    def __enter__(self) -> PolygonRest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def get(self, path_and_query: str) -> RestAnswer:
        """GET one path, retrying transient failures; returns the last answer when attempts run out.

        Never raises: anything unexpected is a 599 answer with `{"error": ...}` and a log line.
        """
        try:
            return self._get(path_and_query)
        except Exception as exc:
            path = path_and_query if isinstance(path_and_query, str) else repr(path_and_query)
            failure = self._network_failure(strip_api_key(path), "unexpected error", exc)
            self._log.error("rest_unexpected", path=failure.path, error=failure.body, at=_raised_at(exc))
            return self._settle(failure)

    def _get(self, path_and_query: str) -> RestAnswer:
        path = strip_api_key(path_and_query)
        held = self._held(path)
        if held is not None:
            return held
        attempt = 1
        while True:
            answer, retry_after = self._fetch(path)
            wait_s = self._retry_wait(answer.status, retry_after, attempt)
            if wait_s is None:
                self._hold_for(answer, retry_after)
                return self._settle(answer)
            self._say_retry(answer, attempt, wait_s)
            self._sleep(wait_s)
            attempt += 1

    def _say_retry(self, answer: RestAnswer, attempt: int, wait_s: float) -> None:
        """A warning the first time a route is retried for a status, DEBUG while it goes on (a fetch waited
        minutes on an unreachable server with nothing said)."""
        level = _first_time(self._retrying, _route(answer.path), answer.status)
        getattr(self._log, level)(
            "rest_retry",
            path=answer.path,
            status=answer.status,
            error=self._redact(error_text(answer.body)),
            attempt=attempt,
            retries_left=self._max_attempts - attempt,
            wait_s=round(wait_s, 3),
        )

    def _held(self, path: str) -> RestAnswer | None:
        """A 429 answered here, without a request, while the Retry-After its route was given lasts: a
        poller asking again at its own cadence only earns more 429s. Held by route, not for every
        request: a chain poll's 429 held the held contract's mark poll too, and froze its exits for two
        minutes (a server that limits the whole key answers the mark's own request 429, then that waits)."""
        now = self._clock_ms()
        until = self._hold_until_ms.get(_route(path), 0)
        if now >= until:
            return None
        left_s = (until - now) / 1000
        error = f"rate limited: waiting {left_s:.0f} s more, as the server's Retry-After asked"
        self.last_error = error
        return RestAnswer(path, 429, {"error": error}, now)

    def _hold_for(self, answer: RestAnswer, retry_after: float | None) -> None:
        """Hold later requests of the answer's route for a 429's or 503's Retry-After, at most
        RETRY_AFTER_HOLD_CAP_S."""
        if answer.status in (429, 503) and retry_after is not None:
            hold_ms = round(min(retry_after, RETRY_AFTER_HOLD_CAP_S) * 1000)
            route, now = _route(answer.path), answer.received_ms
            holds = {r: until for r, until in self._hold_until_ms.items() if until > now}  # the ended go
            holds[route] = max(holds.get(route, 0), now + hold_ms)
            self._hold_until_ms = holds

    def chain_pages(
        self,
        underlying: str,
        session_date: datetime.date,
        *,
        spot: float | None,
        strike_window: float = 15.0,
        limit: int = 250,
    ) -> list[RestAnswer]:
        """Every page of today's call chain, within `strike_window` of `spot` when it is known.

        Stops at the first non-200 page and returns what was fetched; the last answer tells which.
        """
        query = f"expiration_date={session_date.isoformat()}&contract_type=call&limit={limit}"
        if spot is not None:
            low = max(0, math.floor(spot - strike_window))
            query += f"&strike_price.gte={low}&strike_price.lte={math.ceil(spot + strike_window)}"
        paged = self._pages(f"/v3/snapshot/options/{underlying}?{query}", MAX_CHAIN_PAGES)
        self.chain_error = paged.incomplete_why
        return paged.answers

    def contract(self, underlying: str, ticker: str) -> RestAnswer:
        """The snapshot of one option contract, e.g. ("IWM", "O:IWM251002C00242000")."""
        return self.get(f"/v3/snapshot/options/{underlying}/{ticker}")

    def aggs(
        self,
        sym: str,
        multiplier: int,
        span: str,
        from_: str,
        to: str,
        *,
        limit: int = 50000,
        max_results: int = MAX_AGGS_RESULTS,
    ) -> list[RestAnswer]:
        """Aggregates of `sym` from `from_` to `to` (YYYY-MM-DD or Unix ms), every page up to MAX_PAGES
        pages or `max_results` bars."""
        path = f"/v2/aggs/ticker/{sym}/range/{multiplier}/{span}/{from_}/{to}"
        return self._pages(f"{path}?adjusted=true&sort=asc&limit={limit}", MAX_PAGES, max_results).answers

    def _pages(self, path: str, max_pages: int, max_results: int | None = None) -> Paged:
        """Follow `next_url` from `path`; stops at a failure, the page cap, a bad URL, a cycle or (with
        `max_results`) once the pages so far hold that many results."""
        paging = Paged([], {strip_api_key(path)})
        next_path: str | None = path
        results = 0
        while next_path is not None:
            answer = self.get(next_path)
            paging.answers.append(answer)
            next_path = self._follow(answer, paging, max_pages)
            results += _result_count(answer.body)
            if next_path is not None and max_results is not None and results >= max_results:
                self._stop_paging(answer, paging, "too_many_results", results=results)
                next_path = None
        if paging.incomplete_why is None:
            paging.incomplete_why = failure_text(paging.answers[-1], self._redact)
        return paging

    def _stop_paging(self, answer: RestAnswer, paging: Paged, reason: str, **fields: object) -> None:
        """Paging ends early: the answer is incomplete (said in `last_error`, so /health names it), and
        the log says so once per route and reason, not at every poll of a server that keeps looping."""
        self.last_error = paging.incomplete_why = f"paging stopped early ({reason}): the answer is incomplete"
        level = _first_time(self._paging_said, _route(answer.path), reason)
        getattr(self._log, level)("rest_paging_stopped", path=answer.path, reason=reason, **fields)

    def _follow(self, answer: RestAnswer, paging: Paged, max_pages: int) -> str | None:
        """The next path to ask, or None with one warning when paging must stop early."""
        asked, pages = paging.asked, len(paging.answers)
        if answer.status != 200 or type(answer.body) is not dict:
            return None
        if _next_url(answer.body) is None:
            self._paging_said.pop(_route(answer.path), None)  # a whole answer: a new stop is news
            return None
        if unsafe_next_url(answer.body):
            self._stop_paging(answer, paging, "unsafe_next_url")
            return None
        next_path = _next_path(answer.body)
        if next_path is None:
            self._stop_paging(answer, paging, "unusable_next_url")
            return None
        if next_path in asked:
            self._stop_paging(answer, paging, "cycle", pages=pages)
            return None
        if pages >= max_pages:
            self._stop_paging(answer, paging, "page_cap", pages=pages)
            return None
        asked.add(next_path)
        return next_path

    def _fetch(self, path: str) -> tuple[RestAnswer, float | None]:
        if not is_local_path(path):
            # Never sent: an absolute URL here would take the key's header to another host.
            error = "invalid request: not a path of the REST base URL"
            return RestAnswer(path, NETWORK_ERROR_STATUS, {"error": error}, self._clock_ms()), math.inf
        with self._lock:
            self.requests += 1
        try:
            with self._client.stream("GET", path) as response:
                body = read_capped(response, MAX_BODY_BYTES)
        except httpx.TimeoutException as exc:
            return self._network_failure(path, "timeout", exc), None
        except httpx.RequestError as exc:
            return self._network_failure(path, "network error", exc), None
        except (httpx.InvalidURL, httpx.HTTPError) as exc:
            # A URL httpx refuses (control characters) fails the same way every time: no retry.
            return self._network_failure(path, "invalid request", exc), math.inf
        if not body.complete:
            # Not retried: the same request would bring the same flood.
            error = (
                f"HTTP {response.status_code} answer larger than {MAX_BODY_BYTES >> 20} MiB decoded: refused"
            )
            return RestAnswer(path, NETWORK_ERROR_STATUS, {"error": error}, self._clock_ms()), math.inf
        now = self._clock_ms()
        answer = RestAnswer(path, response.status_code, _decode_body(body.content), now)
        return answer, retry_after_seconds(response.headers.get("retry-after"), now)

    def _network_failure(self, path: str, kind: str, exc: Exception) -> RestAnswer:
        error = self._redact(f"{kind}: {_exception_text(exc)}")
        return RestAnswer(path, NETWORK_ERROR_STATUS, {"error": error}, self._clock_ms())

    def _retry_wait(self, status: int, retry_after: float | None, attempt: int) -> float | None:
        """Seconds before the next attempt, or None to return this answer."""
        if status not in RETRYABLE_STATUSES or attempt >= self._max_attempts:
            return None
        if retry_after is not None:
            # Retrying sooner than asked only earns more 429s; a longer ask is left to the caller's cadence.
            # (An infinite wait is how _fetch says a failure can never heal by retrying.)
            return retry_after if retry_after <= self._retry_cap_s else None
        return min(self._retry_cap_s, self._retry_base_s * 2 ** (attempt - 1))

    def _settle(self, answer: RestAnswer) -> RestAnswer:
        if answer.status == 200 and type(answer.body) is dict:
            self.last_error = None
            self._retrying.pop(_route(answer.path), None)
            if self._failing.pop(_route(answer.path), None) is not None:
                self._log.info("rest_recovered", path=answer.path)
            return answer
        self.last_error = failure_text(answer, self._redact)
        # A 200 that is not JSON (or nested too deep to decode): the feed decoder counts it as failed.
        self._say_failure("rest_bad_body" if answer.status == 200 else "rest_failed", answer)
        return answer

    def _say_failure(self, event: str, answer: RestAnswer) -> None:
        """A warning the first time a route fails with a status, DEBUG while it goes on failing so (a poll
        every 2 s through an hour's outage wrote thousands of lines), and one line once it recovers."""
        level = _first_time(self._failing, _route(answer.path), answer.status)
        getattr(self._log, level)(event, path=answer.path, status=answer.status, error=self.last_error)
