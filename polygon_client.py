"""Polygon/Massive market data: pure parsers from wire JSON to events.

The `parse_*` functions do no I/O. Live and replay feed them the same inputs (a WebSocket frame's
text or its decoded array, a REST body), so a tape reproduces the live day. Bad input is counted
and dropped, never raised: a parser only says how much it could not use. Numbers are passed on as
JSON gave them (int or float), after checking that they are finite and in range.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from events import Bar, OptionQuote

_FLOAT_MAX = sys.float_info.max
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


def _amount(x: Any) -> float | None:
    """A finite number >= 0 as given (int or float), else None."""
    if type(x) in _NUMBER_TYPES and 0 <= x <= _FLOAT_MAX:
        return x
    return None


def _bar_from_fields(
    d: dict, sym: str, start_ms: int, end_ms: int, received_ms: int, with_day: bool
) -> Bar | None:
    """Validate the OHLCV fields shared by WS `A` events and REST aggs; None when the bar is unusable."""
    o = _price(d.get("o"))
    h = _price(d.get("h"))
    lo = _price(d.get("l"))
    c = _price(d.get("c"))
    v = _amount(d.get("v"))
    if o is None or h is None or lo is None or c is None or v is None:
        return None
    vw = d.get("vw")
    if vw is not None and _price(vw) is None:
        return None
    day_vwap = _price(d.get("a")) if with_day else None
    day_volume = _amount(d.get("av")) if with_day else None
    return Bar(sym, start_ms, end_ms, o, h, lo, c, v, vw, day_vwap, day_volume, received_ms)


def _bar_from_a_event(d: dict, sym: str, received_ms: int) -> Bar | None:
    """A WS per-second aggregate (`ev: "A"`) as a Bar, or None when invalid."""
    s = d.get("s")
    e = d.get("e")
    if type(s) is not int or type(e) is not int:
        return None
    return _bar_from_fields(d, sym, s, e, received_ms, True)


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

    `A` events of `symbols` become bars, status events become `StatusMessage`s. `A` events of other
    symbols and other event types are counted in `ignored`. Invalid events are counted in `bad` and
    dropped without affecting their neighbours; a frame that is not a JSON array is `bad=1` alone.
    """
    events = _decode_frame(payload)
    if events is None:
        return _BAD_FRAME
    bars: list[Bar] = []
    statuses: list[StatusMessage] = []
    bad = 0
    ignored = 0
    for d in events:
        if type(d) is not dict:
            bad += 1
            continue
        ev = d.get("ev")
        if ev == "A":
            sym = d.get("sym")
            if type(sym) is not str:
                bad += 1
            elif sym not in symbols:
                ignored += 1
            else:
                bar = _bar_from_a_event(d, sym, received_ms)
                if bar is None:
                    bad += 1
                else:
                    bars.append(bar)
        elif ev == "status":
            status = _status_from_event(d)
            if status is None:
                bad += 1
            else:
                statuses.append(status)
        elif type(ev) is str:
            ignored += 1
        else:
            bad += 1
    return ParsedFrame(tuple(bars), tuple(statuses), bad, ignored)


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
    """(ticker, strike, expiry, right) from `details`, or None when any of them is unusable."""
    ticker = details.get("ticker")
    strike = _price(details.get("strike_price"))
    expiry = _iso_date(details.get("expiration_date"))
    contract_type = details.get("contract_type")
    right = contract_type.lower() if type(contract_type) is str else None
    if type(ticker) is not str or not ticker or strike is None or expiry is None:
        return None
    if right not in ("call", "put"):
        return None
    return ticker, strike, expiry, right


def parse_option_result(result: object) -> OptionQuote | None:
    """One options snapshot result (chain element or single-contract `results`) as an OptionQuote.

    None when the contract cannot be identified. Market fields may be missing or `{}`: missing or
    invalid numbers become None (sizes, volume and open interest 0). Crossed or zero-bid quotes are
    kept as given; the contract selector rejects them with a reason.
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
        iv=_amount(result.get("implied_volatility")),
        bid=_amount(quote.get("bid")),
        ask=_amount(quote.get("ask")),
        bid_size=_amount(quote.get("bid_size")) or 0.0,
        ask_size=_amount(quote.get("ask_size")) or 0.0,
        volume=_amount(_sub(result, "day").get("volume")) or 0.0,
        open_interest=_amount(result.get("open_interest")) or 0.0,
        quote_ms=to_ms(quote.get("last_updated")),
        underlying_price=_price(_sub(result, "underlying_asset").get("price")),
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
