"""History: rebuild the tape a past session would have produced, from Polygon REST history.

IWM and SPY 1-second aggregates become WebSocket `A` frames; the day's 0DTE calls become chain
snapshot bodies every CHAIN_POLL_SECONDS at the live poller's path. Each snapshot's quotes come from one
of two methods, named in the tape's meta line as `"option_quotes"`:

- `"nbbo"`: every NBBO change of each contract from `GET /v3/quotes/{optionsTicker}` (polygon.md
  section 4.2); a snapshot shows the quote in force at its instant (the last at or before it), with its
  sizes and its SIP time as `last_quote.last_updated`. A contract not quoted yet has no `last_quote`,
  which the live parser reads as no bid: unusable for a choice or a mark, as live. The calls within
  STREAM_STRIKE_WINDOW of the spot also get options-cluster `Q` lines, thinned to the last change of
  each second (a liquid contract changes many times a second; one event per second bounds the tape).
- `"minute"`: a spread modelled around the newest minute bar's close (see `SpreadModel`), for plans
  without option quotes (a 403 on /v3/quotes falls back to it for the whole fetch, saying so once).

Either way IV and greeks are Black-Scholes from the mid, the `day` fields come from minute bars, and
the tape says `"reconstructed": true`. Answers are cached per day, so a fetch resumes.
"""

from __future__ import annotations

import bisect
import datetime
import gzip
import hashlib
import heapq
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlsplit

from config import Rules, Settings
from contract_selector import SECONDS_PER_YEAR, bs_call_delta, implied_vol
from market_calendar import MarketCalendar, Session
from polygon_client import NETWORK_ERROR_STATUS, PolygonRest
from progress import Progress
from tape import TapeWriter

# History reconstruction (see the module doc and README).
HISTORY_DIR = "history"
CACHE_DIR = "cache"
CONNECT_BEFORE_OPEN_MS = 5 * 60_000
BAR_LATENCY_MS = 250
CHAIN_LATENCY_MS = 300
NEXT_PAGE_LATENCY_MS = 60
STRIKE_WINDOW = 15.0
CHAIN_PAGE_LIMIT = 250
QUOTE_LOOKBACK_MS = 5 * 60_000
RECONSTRUCTED_OPEN_INTEREST = 10_000
MAX_PAGES = 200
FETCH_MAX_ATTEMPTS = 8
FETCH_RETRY_CAP_S = 120.0
# A rejected key or plan cannot succeed on a later day; a 429 that outlasted the retries would only repeat,
# and so would a server unreachable through minutes of retries (each later day waited as long in silence).
STOP_STATUSES = frozenset({401, 403, 429, NETWORK_ERROR_STATUS})
STOPPED_MESSAGE = (
    "The fetch stops here: later days would fail the same way. The days built so far are kept; "
    "the same command resumes where this one stopped."
)
# Option quote methods (the tape's meta "option_quotes").
NBBO, MINUTE = "nbbo", "minute"
QUOTES_LIMIT = 50_000
NS_PER_MS = 1_000_000
# Streamed quotes (nbbo method): `Q` lines for calls within this many dollars of the spot, one event per
# contract and second (the last change of it), received this long after the second ends.
STREAM_STRIKE_WINDOW = 5.0
Q_LATENCY_MS = 40
QUOTES_PLAN_MESSAGE = (
    "your Polygon/Massive plan does not include option quotes (HTTP 403 on /v3/quotes): "
    "these days are rebuilt from minute bars, an approximation"
)


class FetchError(RuntimeError):
    """A history request failed for good (after the client's retries)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class QuotesNotEntitled(FetchError):
    """A 403 on /v3/quotes: the plan has no option quotes, so the fetch falls back to minute bars."""


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """One REST answer as fetched (same fields as `polygon_client.RestAnswer`)."""

    path: str
    status: int
    body: object


@dataclass(frozen=True, slots=True)
class SpreadModel:
    """Modelled quote around a minute bar's close: half-spread = max(`min_half`, `percent`% of the close).

    The close is the mid. Options history has trades, not quotes, so this is an assumption; the
    default is at least a penny wide, as IWM 0DTE markets near the money are.
    """

    min_half: float = 0.005
    percent: float = 1.0

    def quote(self, close: float) -> tuple[float, float]:
        """(bid, ask); the bid is 0 when the half-spread would take it to or below zero."""
        half = max(self.min_half, close * self.percent / 100)
        bid = round(close - half, 4)
        return (bid if bid > 0 else 0.0), round(close + half, 4)

    def describe(self) -> str:
        return f"half-spread = max(${self.min_half:g}, {self.percent:g}% of price) around the minute close"


def _next_path(body: object) -> str | None:
    """A page's `next_url` as path and query, to be asked of our own base URL."""
    url = body.get("next_url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url:
        return None
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


class RestGet(Protocol):
    """What the history client needs of `polygon_client.PolygonRest`."""

    def get(self, path_and_query: str) -> Any: ...


class HistoryClient:
    """Paged GETs through `PolygonRest` (which retries 429 honouring Retry-After, and 5xx), cached per path.

    A cached request is never asked again, so an interrupted fetch resumes where it stopped.
    """

    def __init__(self, rest: RestGet, cache_dir: Path, redact: Callable[[str], str] = str) -> None:
        """`redact` takes the secrets out of errors and of the cache files (a peer may echo the key)."""
        self._rest = rest
        self._cache_dir = Path(cache_dir)
        self._redact = redact

    def pages(self, path: str) -> list[CachedAnswer]:
        """Every page of `path` (following next_url); FetchError when any page is not 200."""
        cached = self._load(path)
        if cached is not None:
            return cached
        answers: list[CachedAnswer] = []
        next_path: str | None = path
        while next_path is not None:
            if len(answers) >= MAX_PAGES:
                raise FetchError(f"{path}: more than {MAX_PAGES} pages")
            answer = self._rest.get(next_path)
            if answer.status != 200:
                error = f"{answer.path}: HTTP {answer.status} {_error_of(answer.body)}"
                raise FetchError(self._redact(error), answer.status)
            answers.append(CachedAnswer(answer.path, answer.status, answer.body))
            next_path = _next_path(answer.body)
        self._save(path, answers)
        return answers

    def _file(self, path: str) -> Path:
        return self._cache_dir / f"{hashlib.sha256(path.encode()).hexdigest()[:24]}.json.gz"

    def _load(self, path: str) -> list[CachedAnswer] | None:
        file = self._file(path)
        if not file.is_file():
            return None
        try:
            with gzip.open(file, "rt", encoding="utf-8") as handle:
                stored = json.load(handle)
        except (OSError, ValueError):
            return None  # a damaged cache entry is fetched again
        return [CachedAnswer(a["path"], a["status"], a["body"]) for a in stored["answers"]]

    def _save(self, path: str, answers: list[CachedAnswer]) -> None:
        self._cache_dir.mkdir(parents=True, exist_ok=True)
        file = self._file(path)
        partial = file.with_name(file.name + ".partial")
        # Level 1: a day's second bars are megabytes of JSON; speed matters more than the last few MB.
        # One write: json.dump's many small writes through gzip cost several times the encoding.
        # Not asdict(): it deep-copies every body, which costs more than the encoding.
        stored = [{"path": a.path, "status": a.status, "body": a.body} for a in answers]
        text = self._redact(json.dumps({"path": path, "answers": stored}))
        with gzip.open(partial, "wt", encoding="utf-8", compresslevel=1) as handle:
            handle.write(text)
        os.replace(partial, file)


def _error_of(body: object) -> str:
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or "")[:200]
    return str(body or "")[:200]


def aggs_path(sym: str, multiplier: int, span: str, from_: str, to: str) -> str:
    """The aggregates request exactly as `PolygonRest.aggs` (and so the live daemon) writes it."""
    return f"/v2/aggs/ticker/{sym}/range/{multiplier}/{span}/{from_}/{to}?adjusted=true&sort=asc&limit=50000"


def contracts_path(underlying: str, day: datetime.date) -> str:
    return (
        f"/v3/reference/options/contracts?underlying_ticker={underlying}&expiration_date={day.isoformat()}"
        "&contract_type=call&expired=true&limit=1000"
    )


def quotes_path(ticker: str, gte_ns: int, lt_ns: int) -> str:
    """Every NBBO change of a contract in [gte_ns, lt_ns), oldest first (polygon.md section 4.2)."""
    return (
        f"/v3/quotes/{ticker}?timestamp.gte={gte_ns}&timestamp.lt={lt_ns}"
        f"&limit={QUOTES_LIMIT}&sort=timestamp&order=asc"
    )


def profile_path(underlying: str, day: datetime.date, profile_days: int) -> str:
    """The volume-profile request the daemon makes at the start of `day` (see daemon._fetch_profile)."""
    start = day - datetime.timedelta(days=profile_days * 2 + 5)
    end = day - datetime.timedelta(days=1)
    return aggs_path(underlying, 1, "minute", start.isoformat(), end.isoformat())


def chain_query(day: datetime.date, spot: float | None) -> str:
    """The chain request's query as `PolygonRest.chain_pages` builds it from the last spot."""
    query = f"expiration_date={day.isoformat()}&contract_type=call&limit={CHAIN_PAGE_LIMIT}"
    if spot is not None:
        low = max(0, math.floor(spot - STRIKE_WINDOW))
        query += f"&strike_price.gte={low}&strike_price.lte={math.ceil(spot + STRIKE_WINDOW)}"
    return query


def results_of(answers: Iterable[CachedAnswer]) -> list[dict]:
    """All `results` objects of a paged answer."""
    rows: list[dict] = []
    for answer in answers:
        results = answer.body.get("results") if isinstance(answer.body, dict) else None
        if isinstance(results, list):
            rows.extend(r for r in results if isinstance(r, dict))
    return rows


def _number(x: object) -> bool:
    return type(x) in (int, float) and math.isfinite(x)  # type: ignore[arg-type]


def clean_bars(rows: Iterable[dict]) -> list[dict]:
    """Aggregate rows with usable t/o/h/l/c/v, sorted by start, one per start."""
    by_start = {}
    for row in rows:
        if type(row.get("t")) is int and all(_number(row.get(k)) for k in ("o", "h", "l", "c", "v")):
            by_start[row["t"]] = row
    return [by_start[t] for t in sorted(by_start)]


def a_events(sym: str, bars: Sequence[dict], open_ms: int) -> Iterator[dict]:
    """1-second aggregates as WebSocket `A` events, with `a` (running day VWAP) and `av` (running volume).

    Both run over every bar of the day given (pre-market included, as the vendor's day fields do).
    `op` (official open) is the open of the first bar at or after the open, once there is one.
    """
    official_open = next((b["o"] for b in bars if b["t"] >= open_ms), None)
    pv, volume = 0.0, 0
    for bar in bars:
        vw = bar["vw"] if _number(bar.get("vw")) else bar["c"]
        volume += bar["v"]
        pv += vw * bar["v"]
        event: dict[str, Any] = {"ev": "A", "sym": sym, "v": bar["v"], "av": volume}
        if official_open is not None and bar["t"] >= open_ms:
            event["op"] = official_open
        event |= {"vw": vw, "o": bar["o"], "c": bar["c"], "h": bar["h"], "l": bar["l"]}
        event["a"] = round(pv / volume, 4) if volume > 0 else bar["c"]
        if _number(bar.get("n")) and bar["n"] > 0:
            event["z"] = int(bar["v"] // bar["n"])
        event |= {"s": bar["t"], "e": bar["t"] + 1000}
        yield event


def bar_frames(
    streams: Sequence[tuple[str, Sequence[dict]]], session: Session, connect_ms: int
) -> list[tuple[int, list[dict]]]:
    """(receive ms, frame) per second from `connect_ms` to the close: both symbols' bars in one frame."""
    by_second: dict[int, list[dict]] = {}
    for sym, bars in streams:
        for event in a_events(sym, bars, session.open_ms):
            if connect_ms <= event["s"] < session.close_ms:
                by_second.setdefault(event["s"], []).append(event)
    return [(s + 1000 + BAR_LATENCY_MS, by_second[s]) for s in sorted(by_second)]


class SpotSeries:
    """The underlying's last close as the engine had it at an instant (bars count once received)."""

    def __init__(self, frames: Sequence[tuple[int, list[dict]]], underlying: str) -> None:
        self._times: list[int] = []
        self._closes: list[float] = []
        for t, frame in frames:
            for event in frame:
                if event["sym"] == underlying:
                    self._times.append(t)
                    self._closes.append(event["c"])

    def at(self, ms: int) -> float | None:
        i = bisect.bisect_right(self._times, ms) - 1
        return self._closes[i] if i >= 0 else None


class MinuteSeries:
    """One contract's minute bars with running day totals, looked up by what had completed at an instant."""

    def __init__(self, bars: Sequence[dict]) -> None:
        self.ends = [b["t"] + 60_000 for b in bars]
        self.bars = list(bars)
        self.volume: list[float] = []
        self.pv: list[float] = []
        self.high: list[float] = []
        self.low: list[float] = []
        self._ivs: dict[int, float | None] = {}
        volume = pv = 0.0
        high, low = -math.inf, math.inf
        for bar in bars:
            volume += bar["v"]
            pv += (bar["vw"] if _number(bar.get("vw")) else bar["c"]) * bar["v"]
            high, low = max(high, bar["h"]), min(low, bar["l"])
            self.volume.append(volume)
            self.pv.append(pv)
            self.high.append(high)
            self.low.append(low)

    def completed_at(self, ms: int) -> int | None:
        """Index of the newest bar that had ended by `ms` (no look-ahead), or None."""
        i = bisect.bisect_right(self.ends, ms) - 1
        return i if i >= 0 else None

    def implied_vol(self, i: int, strike: float, ctx: ChainContext) -> float | None:
        """The IV of bar `i`'s close, solved at the first snapshot that sees the bar (its spot, its T).

        The close stays the same until the next bar, so its IV is kept rather than re-solved with every
        snapshot's spot: a stale price should not make the volatility jitter (and it is 6x cheaper).
        """
        if i not in self._ivs:
            spot, years = ctx.spot, _years_left(ctx)
            unsolvable = spot is None or years <= 0
            self._ivs[i] = None if unsolvable else implied_vol(self.bars[i]["c"], spot, strike, years)
        return self._ivs[i]


@dataclass(frozen=True, slots=True)
class Contract:
    ticker: str
    strike: float
    expiry: str


def day_contracts(rows: Iterable[dict], day: datetime.date) -> list[Contract]:
    """Calls from the contracts reference that expire on `day`, sorted by ticker (the vendor's order)."""
    found = {}
    for row in rows:
        ticker, strike = row.get("ticker"), row.get("strike_price")
        if (
            isinstance(ticker, str)
            and _number(strike)
            and row.get("expiration_date") == day.isoformat()
            and str(row.get("contract_type", "call")).lower() == "call"
        ):
            found[ticker] = Contract(ticker, float(strike), day.isoformat())  # type: ignore[arg-type]
    return [found[t] for t in sorted(found)]


def _greeks(spot: float, strike: float, t_years: float, iv: float) -> dict[str, float]:
    """Black-Scholes (r = 0) delta, gamma, theta per calendar day and vega per vol point."""
    root_t = math.sqrt(t_years)
    d1 = (math.log(spot / strike) + 0.5 * iv * iv * t_years) / (iv * root_t)
    pdf = math.exp(-0.5 * d1 * d1) / math.sqrt(2 * math.pi)
    return {
        "delta": round(bs_call_delta(spot, strike, t_years, iv), 5),
        "gamma": round(pdf / (spot * iv * root_t), 5),
        "theta": round(-spot * pdf * iv / (2 * root_t) / 365, 5),
        "vega": round(spot * pdf * root_t / 100, 5),
    }


@dataclass(frozen=True, slots=True)
class ChainContext:
    """What every result of one reconstructed chain snapshot shares."""

    at_ms: int
    spot: float | None
    close_ms: int
    underlying: str


@dataclass(frozen=True, slots=True)
class NbboQuote:
    """One NBBO of a contract as `/v3/quotes` gives it; `ns` is its SIP time."""

    ns: int
    sequence: int
    bid: float
    ask: float
    bid_size: float
    ask_size: float
    bid_exchange: int | None = None
    ask_exchange: int | None = None


def parse_quotes(rows: Iterable[dict]) -> list[NbboQuote]:
    """The usable `/v3/quotes` results (int SIP time, numeric prices) in time order, then sequence order.

    Crossed or zero-bid quotes are kept as given: the live parser keeps them and the selector rejects them.
    """
    quotes = []
    for row in rows:
        ns, bid, ask = row.get("sip_timestamp"), row.get("bid_price"), row.get("ask_price")
        if type(ns) is not int or not _number(bid) or not _number(ask):
            continue
        sequence = row.get("sequence_number")
        quotes.append(
            NbboQuote(
                ns,
                sequence if type(sequence) is int else 0,
                float(bid),  # type: ignore[arg-type]
                float(ask),  # type: ignore[arg-type]
                _size(row.get("bid_size")),
                _size(row.get("ask_size")),
                _exchange(row.get("bid_exchange")),
                _exchange(row.get("ask_exchange")),
            )
        )
    quotes.sort(key=lambda q: (q.ns, q.sequence))
    return quotes


def _size(x: object) -> float:
    return x if _number(x) and x >= 0 else 0  # type: ignore[return-value,operator]


def _exchange(x: object) -> int | None:
    return x if type(x) is int else None


def in_force(quotes: Sequence[NbboQuote], times_ms: Iterable[int]) -> dict[int, NbboQuote]:
    """The quote in force at each instant: the last with SIP time at or before it (none before the first)."""
    stamps = [q.ns for q in quotes]
    found = {}
    for t in times_ms:
        i = bisect.bisect_right(stamps, t * NS_PER_MS) - 1
        if i >= 0:
            found[t] = quotes[i]
    return found


class QuoteSource(Protocol):
    """Where a reconstructed snapshot's quote fields come from (one per method)."""

    method: str

    def fields(self, contract: Contract, series: MinuteSeries, ctx: ChainContext) -> dict[str, Any] | None:
        """`last_quote`, IV, greeks and break-even of one result, or None when it has no quote."""
        ...


class MinuteQuotes:
    """The minute method: a quote modelled around the newest completed minute bar, if at most 5 min old."""

    method = MINUTE

    def __init__(self, spread: SpreadModel) -> None:
        self.spread = spread

    def fields(self, contract: Contract, series: MinuteSeries, ctx: ChainContext) -> dict[str, Any] | None:
        i = series.completed_at(ctx.at_ms)
        if i is None or ctx.at_ms - series.ends[i] >= QUOTE_LOOKBACK_MS:
            return None
        return _quote_fields(contract, series, i, ctx, self.spread)


class NbboQuotes:
    """The nbbo method: the NBBO in force at each snapshot's instant, from `in_force` per contract.

    IV is solved from the quote's mid at the first snapshot that sees the quote and kept while the quote
    stands (as the minute method keeps a bar's), so an unchanged quote's volatility does not jitter.
    """

    method = NBBO

    def __init__(self, book: Mapping[str, Mapping[int, NbboQuote]]) -> None:
        self._book = book
        self._ivs: dict[tuple[str, int, int], float | None] = {}

    def fields(self, contract: Contract, series: MinuteSeries, ctx: ChainContext) -> dict[str, Any] | None:
        quote = self._book.get(contract.ticker, {}).get(ctx.at_ms)
        if quote is None:
            return None  # not quoted yet: no last_quote, which the live parser reads as no bid
        mid = round((quote.bid + quote.ask) / 2, 4)
        fields: dict[str, Any] = {"break_even_price": round(contract.strike + mid, 4)}
        fields |= _iv_fields(self._iv(contract, quote, mid, ctx), contract.strike, ctx)
        last_quote: dict[str, Any] = {"ask": quote.ask}
        if quote.ask_exchange is not None:
            last_quote["ask_exchange"] = quote.ask_exchange
        last_quote["ask_size"] = quote.ask_size
        last_quote["bid"] = quote.bid
        if quote.bid_exchange is not None:
            last_quote["bid_exchange"] = quote.bid_exchange
        last_quote |= {
            "bid_size": quote.bid_size,
            "last_updated": quote.ns,
            "midpoint": mid,
            "timeframe": "REAL-TIME",
        }
        fields["last_quote"] = last_quote
        return fields

    def _iv(self, contract: Contract, quote: NbboQuote, mid: float, ctx: ChainContext) -> float | None:
        key = (contract.ticker, quote.ns, quote.sequence)
        if key not in self._ivs:
            spot, years = ctx.spot, _years_left(ctx)
            unsolvable = spot is None or years <= 0 or mid <= 0
            self._ivs[key] = None if unsolvable else implied_vol(mid, spot, contract.strike, years)
        return self._ivs[key]


def _iv_fields(iv: float | None, strike: float, ctx: ChainContext) -> dict[str, Any]:
    """Greeks and IV when the IV was solvable and the session still runs, else nothing."""
    if iv is None or ctx.spot is None or _years_left(ctx) <= 0:
        return {}
    return {
        "greeks": _greeks(ctx.spot, strike, _years_left(ctx), iv),
        "implied_volatility": round(iv, 5),
    }


def option_result(
    contract: Contract, series: MinuteSeries, ctx: ChainContext, quotes: QuoteSource
) -> dict[str, Any]:
    """One `/v3/snapshot/options/{underlying}` result: the day from minute bars, the quote from `quotes`."""
    details = {
        "contract_type": "call",
        "exercise_style": "american",
        "expiration_date": contract.expiry,
        "shares_per_contract": 100,
        "strike_price": contract.strike,
        "ticker": contract.ticker,
    }
    i = series.completed_at(ctx.at_ms)
    result: dict[str, Any] = {"day": _day_bar(series, i), "details": details, "greeks": {}}
    result |= quotes.fields(contract, series, ctx) or {}
    result["open_interest"] = RECONSTRUCTED_OPEN_INTEREST
    if ctx.spot is not None:
        result["underlying_asset"] = {
            "last_updated": ctx.at_ms * 1_000_000,
            "price": ctx.spot,
            "ticker": ctx.underlying,
            "timeframe": "REAL-TIME",
        }
    return dict(sorted(result.items()))  # the vendor's (alphabetical) key order


def _quote_fields(
    contract: Contract, series: MinuteSeries, i: int, ctx: ChainContext, spread: SpreadModel
) -> dict[str, Any]:
    """The modelled quote around bar `i`'s close (the mid), its size and, when solvable, IV and greeks."""
    close = series.bars[i]["c"]
    bid, ask = spread.quote(close)
    fields: dict[str, Any] = {"break_even_price": round(contract.strike + close, 4)}
    fields |= _iv_fields(series.implied_vol(i, contract.strike, ctx), contract.strike, ctx)
    fields["last_quote"] = {
        "ask": ask,
        "ask_size": series.bars[i]["v"],
        "bid": bid,
        "bid_size": series.bars[i]["v"],
        "last_updated": ctx.at_ms * 1_000_000,
        "midpoint": close,
        "timeframe": "REAL-TIME",
    }
    return fields


def _years_left(ctx: ChainContext) -> float:
    return (ctx.close_ms - ctx.at_ms) / 1000 / SECONDS_PER_YEAR


def _day_bar(series: MinuteSeries, i: int | None) -> dict[str, Any]:
    """The contract's day so far; `{}` until it has traded, as the vendor sends."""
    if i is None or series.volume[i] <= 0:
        return {}
    return {
        "close": series.bars[i]["c"],
        "high": series.high[i],
        "last_updated": series.ends[i] * 1_000_000,
        "low": series.low[i],
        "open": series.bars[0]["o"],
        "volume": series.volume[i],
        "vwap": round(series.pv[i] / series.volume[i], 4),
    }


def chain_lines(
    ctx: ChainContext,
    day: datetime.date,
    contracts: Sequence[Contract],
    minutes: Mapping[str, MinuteSeries],
    base_url: str,
    quotes: QuoteSource,
) -> list[tuple[int, str, Any]]:
    """The chain poll at `ctx.at_ms` as tape lines: page 1 at the live path, then each next_url's path."""
    query = chain_query(day, ctx.spot)
    first = f"/v3/snapshot/options/{ctx.underlying}?{query}"
    if ctx.spot is not None:
        low, high = max(0, math.floor(ctx.spot - STRIKE_WINDOW)), math.ceil(ctx.spot + STRIKE_WINDOW)
        contracts = [c for c in contracts if low <= c.strike <= high]
    results = [option_result(c, minutes[c.ticker], ctx, quotes) for c in contracts if c.ticker in minutes]
    chunks = [results[i : i + CHAIN_PAGE_LIMIT] for i in range(0, len(results), CHAIN_PAGE_LIMIT)] or [[]]
    lines, path, t = [], first, ctx.at_ms + CHAIN_LATENCY_MS
    for number, chunk in enumerate(chunks, start=1):
        body: dict[str, Any] = {"request_id": f"reconstructed-{ctx.at_ms}-{number}", "results": chunk}
        body["status"] = "OK"
        if number < len(chunks):
            body["next_url"] = f"{base_url.rstrip('/')}{first}&cursor=p{number + 1}"
        lines.append((t, "rest", (path, body)))
        path, t = f"{first}&cursor=p{number + 1}", t + NEXT_PAGE_LATENCY_MS
    return lines


@dataclass(frozen=True, slots=True)
class DayHistory:
    """The raw history of one session day, as fetched."""

    iwm: list[dict]
    spy: list[dict]
    profile: list[CachedAnswer]
    contracts: list[Contract]
    minutes: dict[str, list[dict]]
    # nbbo method: per contract, the quote in force at each snapshot instant (None: the minute method),
    # and the last quote of each second with a change, for the streamed `Q` lines.
    nbbo: dict[str, dict[int, NbboQuote]] | None = None
    streamed: dict[str, list[NbboQuote]] | None = None


def snapshot_times(session: Session, poll_ms: int) -> range:
    """The chain snapshot instants (ms): the daemon polls from the moment it connects, five minutes before
    the open, to the close."""
    return range(session.open_ms - CONNECT_BEFORE_OPEN_MS, session.close_ms, poll_ms)


def fetch_day(
    client: HistoryClient,
    day: datetime.date,
    rules: Rules,
    *,
    strike_margin: float = STRIKE_WINDOW + 1,
    snapshots: range | None = None,
) -> DayHistory:
    """Every request one reconstructed day needs (each cached).

    Only calls whose strike the chain window can reach (the day's IWM range ± the window) have their
    minute bars fetched and, given the snapshot instants (the nbbo method), their quotes from the first
    snapshot to the close; QuotesNotEntitled when the plan has none.
    """
    iso = day.isoformat()
    iwm = clean_bars(results_of(client.pages(aggs_path(rules.underlying, 1, "second", iso, iso))))
    if not iwm:
        raise FetchError(f"no {rules.underlying} 1-second bars for {iso}")
    spy = clean_bars(results_of(client.pages(aggs_path(rules.benchmark, 1, "second", iso, iso))))
    profile = client.pages(profile_path(rules.underlying, day, rules.volume_profile_days))
    contracts = day_contracts(results_of(client.pages(contracts_path(rules.underlying, day))), day)
    low, high = min(b["l"] for b in iwm) - strike_margin, max(b["h"] for b in iwm) + strike_margin
    reachable = [c for c in contracts if low <= c.strike <= high]
    minutes = {
        c.ticker: clean_bars(results_of(client.pages(aggs_path(c.ticker, 1, "minute", iso, iso))))
        for c in reachable
    }
    if snapshots is None:
        return DayHistory(iwm, spy, profile, reachable, minutes)
    nbbo, streamed = {}, {}
    for contract in reachable:
        nbbo[contract.ticker], streamed[contract.ticker] = fetch_nbbo(client, contract.ticker, snapshots)
    return DayHistory(iwm, spy, profile, reachable, minutes, nbbo, streamed)


def fetch_nbbo(
    client: HistoryClient, ticker: str, snapshots: range
) -> tuple[dict[int, NbboQuote], list[NbboQuote]]:
    """One contract's quotes over the snapshots' span: the quote in force at each snapshot, and the last
    quote of each second (`thin_to_seconds`).

    Reduced as soon as read: a liquid contract changes its NBBO tens of thousands of times a day.
    """
    path = quotes_path(ticker, snapshots.start * NS_PER_MS, snapshots.stop * NS_PER_MS)
    try:
        answers = client.pages(path)
    except FetchError as exc:
        if exc.status == 403:
            raise QuotesNotEntitled(str(exc), exc.status) from exc
        raise
    quotes = parse_quotes(results_of(answers))
    return in_force(quotes, snapshots), thin_to_seconds(quotes)


def thin_to_seconds(quotes: Sequence[NbboQuote]) -> list[NbboQuote]:
    """The last quote of each second that has one, in time order (the stream's size bound: at most one
    event per contract and second, the one in force when the second ends)."""
    last: dict[int, NbboQuote] = {}
    for quote in quotes:
        last[quote.ns // 1_000_000_000] = quote
    return [last[second] for second in sorted(last)]


def q_lines(
    streamed: Mapping[str, Sequence[NbboQuote]], contracts: Sequence[Contract], spot: SpotSeries
) -> list[tuple[int, str, Any]]:
    """Options-cluster `Q` lines: per second, the last change of each call within STREAM_STRIKE_WINDOW of
    the spot (as the engine had it when the second ended), received Q_LATENCY_MS after the second ends.

    A live daemon streams only contracts near its delta band and the one it holds; calls near the money
    stand in for those, and the rest are left to the chain snapshots.
    """
    strikes = {c.ticker: c.strike for c in contracts}
    by_second: dict[int, list[dict[str, Any]]] = {}
    for ticker, quotes in streamed.items():
        for quote in quotes:
            second = quote.ns // 1_000_000_000
            price = spot.at(second * 1000 + 1000)
            if price is None or abs(strikes[ticker] - price) > STREAM_STRIKE_WINDOW:
                continue
            by_second.setdefault(second, []).append(_q_event(ticker, quote))
    return [
        ((second + 1) * 1000 + Q_LATENCY_MS, "ws", sorted(events, key=lambda e: (e["t"], e["sym"])))
        for second, events in sorted(by_second.items())
    ]


def _q_event(ticker: str, quote: NbboQuote) -> dict[str, Any]:
    """A `Q` event of the options cluster (polygon.md section 2.7) from one NBBO, in the vendor's key order."""
    event: dict[str, Any] = {"ev": "Q", "sym": ticker}
    if quote.bid_exchange is not None:
        event["bx"] = quote.bid_exchange
    if quote.ask_exchange is not None:
        event["ax"] = quote.ask_exchange
    event |= {"bp": quote.bid, "ap": quote.ask, "bs": quote.bid_size, "as": quote.ask_size}
    return event | {"t": quote.ns // NS_PER_MS, "q": quote.sequence}


def reconstructed_lines(
    history: DayHistory,
    session: Session,
    rules: Rules,
    *,
    poll_ms: int,
    base_url: str,
    spread: SpreadModel,
) -> Iterator[tuple[int, str, Any]]:
    """Every line of the reconstructed tape, in receive-time order (quotes by the history's method)."""
    connect_ms = session.open_ms - CONNECT_BEFORE_OPEN_MS
    streams = ((rules.underlying, history.iwm), (rules.benchmark, history.spy))
    frames = bar_frames(streams, session, connect_ms)
    spot = SpotSeries(frames, rules.underlying)
    minutes = {ticker: MinuteSeries(bars) for ticker, bars in history.minutes.items()}
    profile = [(connect_ms, "rest", (a.path, a.body)) for a in history.profile]
    quotes = MinuteQuotes(spread) if history.nbbo is None else NbboQuotes(history.nbbo)

    def chains() -> Iterator[tuple[int, str, Any]]:
        for at_ms in snapshot_times(session, poll_ms):
            ctx = ChainContext(at_ms, spot.at(at_ms), session.close_ms, rules.underlying)
            yield from chain_lines(ctx, session.date, history.contracts, minutes, base_url, quotes)

    ws = ((t, "ws", frame) for t, frame in frames)
    streams = [iter(profile), ws, chains()]
    if history.streamed is not None:
        streams.append(iter(q_lines(history.streamed, history.contracts, spot)))
    return heapq.merge(*streams, key=lambda line: line[0])


def write_reconstructed_tape(
    path: Path,
    lines: Iterable[tuple[int, str, Any]],
    *,
    start_ms: int,
    rules: Rules,
    spread: SpreadModel,
    option_quotes: str = MINUTE,
) -> Path:
    """Write the lines as a tape labelled `"reconstructed": true` and its quote method; atomic, so a tape
    that exists is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    meta = {
        "reconstructed": True,
        "source": "polygon-rest",
        "option_quotes": option_quotes,
        "quotes": _quotes_note(option_quotes, spread),
    }
    with TapeWriter(
        partial, underlying=rules.underlying, benchmark=rules.benchmark, start_ms=start_ms, extra_meta=meta
    ) as writer:
        for t, kind, item in lines:
            if kind == "ws":
                writer.write_ws(t, item)
            else:
                rest_path, body = item
                writer.write_rest(t, rest_path, 200, body)
    os.replace(partial, path)
    return path


def _quotes_note(option_quotes: str, spread: SpreadModel) -> str:
    unknown = f"open interest = {RECONSTRUCTED_OPEN_INTEREST} (unknown)"
    if option_quotes == NBBO:
        return (
            "NBBO from /v3/quotes: each snapshot shows the last quote at or before its instant "
            "(last_updated = that quote's SIP time; a contract not quoted yet has no last_quote); "
            f"IV and greeks Black-Scholes from the mid; day fields from minute bars; {unknown}; "
            f"Q lines for calls within ${STREAM_STRIKE_WINDOW:g} of the spot, the last change of each second"
        )
    return f"modelled: {spread.describe()}; sizes = the minute's volume; {unknown}"


def option_quotes_of(meta: Mapping[str, Any] | None) -> str | None:
    """A tape's quote method: "nbbo" or "minute" for a reconstructed tape (older ones are "minute"), else None."""
    if not meta or not meta.get("reconstructed"):
        return None
    return NBBO if meta.get("option_quotes") == NBBO else MINUTE


def history_tape_path(data_dir: Path, day: datetime.date) -> Path:
    """Reconstructed tapes live apart from live recordings, so retention pruning never deletes them."""
    return Path(data_dir) / HISTORY_DIR / f"{day.isoformat()}.jsonl.gz"


def session_days(calendar: MarketCalendar, first: datetime.date, last: datetime.date) -> list[Session]:
    """The sessions from `first` to `last` inclusive."""
    sessions, day = [], first
    while day <= last:
        session = calendar.session(day)
        if session is not None:
            sessions.append(session)
        day += datetime.timedelta(days=1)
    return sessions


def fetch_history(
    settings: Settings,
    first: datetime.date,
    last: datetime.date,
    *,
    sleep: Callable[[float], None] = time.sleep,
    transport: Any = None,
    spread: SpreadModel = SpreadModel(),  # noqa: B008 - frozen value
    progress_stream: TextIO | None = None,
    out: TextIO = sys.stdout,
    option_quotes: str = NBBO,
) -> list[Path]:
    """Reconstructed tapes of every session in [first, last]: existing tapes are kept, the rest built.

    Quotes by `option_quotes`; a 403 on /v3/quotes (a plan without option quotes) says so once and
    rebuilds that day and the rest from minute bars. Returns the tapes that exist afterwards, in date
    order. Any other 401/403, a 429 that outlasted the retries, or a server unreachable through them,
    stops the fetch; other failures skip the day. Cached answers are kept for the next attempt.
    """
    rules = settings.rules
    sessions = session_days(MarketCalendar(rules, settings.market_closed_dates), first, last)
    progress = Progress("fetch", len(sessions), stream=progress_stream)
    tapes = []
    with PolygonRest(
        settings.polygon_rest_url,
        settings.polygon_api_key,
        clock_ms=lambda: int(time.time() * 1000),
        transport=transport,
        sleep=sleep,
        max_attempts=FETCH_MAX_ATTEMPTS,
        retry_cap_s=FETCH_RETRY_CAP_S,
    ) as rest:
        method = option_quotes
        for session in sessions:
            path = history_tape_path(settings.data_dir, session.date)
            failure = None if path.is_file() else _try_build(rest, settings, session, path, spread, method)
            if isinstance(failure, QuotesNotEntitled):
                print(QUOTES_PLAN_MESSAGE, file=out)
                method = MINUTE  # for the whole fetch: the plan will not change between days
                failure = _try_build(rest, settings, session, path, spread, method)
            if failure is not None:
                print(f"{session.date}: not rebuilt: {failure}", file=out)
            if path.is_file():
                tapes.append(path)
            progress.step(f"{session.date} {'failed' if failure else 'ok'}")
            if failure is not None and failure.status in STOP_STATUSES:
                print(STOPPED_MESSAGE, file=out)
                break
    progress.close()
    return tapes


def _try_build(
    rest: RestGet, settings: Settings, session: Session, path: Path, spread: SpreadModel, method: str
) -> FetchError | None:
    try:
        build_history_day(rest, settings, session, path, spread, option_quotes=method)
    except FetchError as exc:
        return exc
    return None


def build_history_day(
    rest: RestGet,
    settings: Settings,
    session: Session,
    path: Path,
    spread: SpreadModel,
    *,
    option_quotes: str = MINUTE,
) -> Path:
    """Fetch (or read from the cache) one day's history and write its reconstructed tape.

    `option_quotes` is NBBO or MINUTE; QuotesNotEntitled when NBBO meets a plan without quotes.
    """
    if option_quotes not in (NBBO, MINUTE):
        raise ValueError(f"unknown option quote method {option_quotes!r}")
    folder = Path(settings.data_dir) / CACHE_DIR / session.date.isoformat()
    client = HistoryClient(rest, folder, settings.redactor())
    poll_ms = int(settings.chain_poll_seconds * 1000)
    snapshots = snapshot_times(session, poll_ms) if option_quotes == NBBO else None
    history = fetch_day(client, session.date, settings.rules, snapshots=snapshots)
    lines = reconstructed_lines(
        history,
        session,
        settings.rules,
        poll_ms=poll_ms,
        base_url=settings.polygon_rest_url,
        spread=spread,
    )
    start_ms = session.open_ms - CONNECT_BEFORE_OPEN_MS
    return write_reconstructed_tape(
        path, lines, start_ms=start_ms, rules=settings.rules, spread=spread, option_quotes=option_quotes
    )
