"""A fake Polygon/Massive on 127.0.0.1: the stocks and options WebSockets and the REST endpoints the daemon uses.

It serves a `MarketSource` (the synthetic demo day, a recorded tape, or hand-made data) paced by a
simulated clock that starts at `start_ms` and runs `speed` times as fast as the wall. The WebSocket
speaks the real handshake (connected, auth, subscribe) and streams each frame when its receive time
has come; REST answers are computed from the source at the simulated now. Fault switches drop
sockets, inject garbage frames (text or binary), fail or hold REST answers, provoke `max_connections`,
silence the stream on an open socket, and make chain answers hostile (a forced `next_url`, a raw body).

The options cluster (polygon.md section 2.7) is served on the same port at `/options`: the same
handshake, `Q.<contract>` subscriptions, and a `Q` event whenever a subscribed contract's bid or ask
changes (checked every `QUOTE_CHECK_MS` of simulated time, from the source's `option_quote`). Its own
switches refuse auth or subscriptions, silence it, drop it, or storm it with quotes.

Run it alone with `python -m sim.polygon_server --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import datetime
import json
import math
import operator
import random
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from sim.jsonhttp import JsonHandler, Reply
from tape import TapeReader, strip_api_key

NY = ZoneInfo("America/New_York")
WS_PATH = "/stocks"
OPTIONS_PATH = "/options"
QUOTE_CHECK_MS = 250
MAX_QUOTE_CONTRACTS = 1000  # per options connection (polygon.md section 2.7)
MAX_EVENTS_PER_FRAME = 500
# Waits on the simulated clock are re-checked at least this often, so a moved wall is noticed.
MAX_QUOTE_WAIT_S = 0.05
# Checks more than this far behind the simulated clock are skipped, not replayed in a burst.
CATCH_UP_MS = 10_000
MAX_STORM_BATCH = 5000
AUTH_TIMEOUT_S = 10.0
CHAIN_DEFAULT_LIMIT, CHAIN_MAX_LIMIT = 10, 250
AGGS_DEFAULT_LIMIT, AGGS_MAX_LIMIT = 5000, 50000
SPAN_MS = {"second": 1000, "minute": 60_000}
QUOTES_ROUTE = "/v3/quotes/"
QUOTES_DEFAULT_LIMIT, QUOTES_MAX_LIMIT = 1000, 50000
CONTRACTS_ROUTE = "/v3/reference/options/contracts"
CONTRACTS_DEFAULT_LIMIT, CONTRACTS_MAX_LIMIT = 10, 1000
# Quote history (/v3/quotes): NBBO changes of a contract are a Poisson process of this mean rate per
# second (so some seconds have several, many none), at ns times, during the regular session only.
QUOTE_HISTORY_RATE_PER_S = 1.5
QUOTE_HISTORY_MAX_PER_S = 16
REGULAR_OPEN, REGULAR_CLOSE = datetime.time(9, 30), datetime.time(16, 0)
NS_PER_MS, NS_PER_S = 1_000_000, 1_000_000_000
MAX_RANGE_DAYS = 400
SHUTDOWN_POLL_S = 0.05
MAX_CONNECTIONS_MESSAGE = (
    "Maximum number of websocket connections exceeded. You have reached the connection limit for "
    "your account. Please contact support at https://massive.com/contact to increase your limit."
)
FAILURE_BODIES: dict[int, dict[str, str]] = {
    401: {"status": "ERROR", "error": "Unknown API Key"},
    403: {
        "status": "NOT_AUTHORIZED",
        "message": "You are not entitled to this data. Please upgrade your plan at https://massive.com/pricing",
    },
    429: {
        "status": "ERROR",
        "error": "You've exceeded the maximum requests per minute, please wait or upgrade your "
        "subscription to continue. https://massive.com/pricing",
    },
    500: {"status": "ERROR", "error": "Internal Server Error"},
}
_AGGS_ROUTE = re.compile(
    r"/v2/aggs/ticker/(?P<sym>[^/]+)/range/(?P<mult>\d+)/(?P<span>[a-z]+)/(?P<from>[^/]+)/(?P<to>[^/]+)"
)

# A str frame is sent verbatim as text, bytes (a taped binary frame) as a binary frame.
Frame = list[Any] | str | bytes


class BookQuote(NamedTuple):
    """A contract's quote at an instant, as the options stream sends it."""

    bid: float
    ask: float
    bid_size: int
    ask_size: int
    bid_exchange: int = 313
    ask_exchange: int = 313


class MarketSource(Protocol):
    """What the fake serves. Times are Unix ms; bars are REST-shaped dicts with `t` = window start."""

    underlying: str

    def ws_frames(self) -> Iterable[tuple[int, Frame]]:
        """(receive ms, frame) in time order; a str frame is sent verbatim."""
        ...

    def chain_results(self, at_ms: int) -> list[dict]:
        """Every chain snapshot result as of `at_ms` (the server filters and pages)."""
        ...

    def contract_result(self, ticker: str, at_ms: int) -> dict | None:
        """One contract's snapshot result as of `at_ms`, None when unknown."""
        ...

    def option_quote(self, ticker: str, at_ms: int) -> BookQuote | None:
        """The contract's quote on the options stream at `at_ms` (the same model as its snapshot), or None."""
        ...

    def second_bars(self, sym: str, from_ms: int, to_ms: int) -> list[dict]:
        """1-second REST bars with `t` in [from_ms, to_ms] (the server hides those not yet complete)."""
        ...

    def minute_bars(self, sym: str, from_ms: int, to_ms: int) -> list[dict]:
        """1-minute REST bars with `t` in [from_ms, to_ms]."""
        ...


class SyntheticSource:
    """A MarketSource over `sim.market.SyntheticMarket` (anything with its methods)."""

    def __init__(self, market: Any) -> None:
        self.market = market
        self.underlying: str = market.underlying

    def ws_frames(self) -> Iterable[tuple[int, Frame]]:
        return self.market.ws_frames()

    def chain_results(self, at_ms: int) -> list[dict]:
        pages = self.market.chain_pages(at_ms, page_size=CHAIN_MAX_LIMIT)
        return [result for page in pages for result in page.get("results", [])]

    def contract_result(self, ticker: str, at_ms: int) -> dict | None:
        try:
            return self.market.contract_snapshot(ticker, at_ms).get("results")
        except KeyError:
            return None

    def option_quote(self, ticker: str, at_ms: int) -> BookQuote | None:
        """`SyntheticMarket.stream_quote`: the snapshot's quote at whole seconds, moving with the spot between."""
        try:
            return BookQuote(*self.market.stream_quote(ticker, at_ms))
        except KeyError:
            return None

    def second_bars(self, sym: str, from_ms: int, to_ms: int) -> list[dict]:
        try:
            return self.market.aggs(sym, from_ms, to_ms).get("results", [])
        except KeyError:
            return []

    def minute_bars(self, sym: str, from_ms: int, to_ms: int) -> list[dict]:
        bars: list[dict] = []
        for day in _ny_days(from_ms, to_ms):
            try:
                results = self.market.minute_aggs(sym, day).get("results", [])
            except KeyError:
                return []
            bars.extend(bar for bar in results if from_ms <= bar["t"] <= to_ms)
        return bars


class RecordedMarket:
    """A MarketSource from recorded or hand-made data.

    Frames are served at their receive times. A chain request is answered with the latest chain
    recorded at or before now, a contract request with the latest snapshot of that contract (else
    its entry in that chain). Second bars come from the frames' `A` events (a re-sent second
    replaces the earlier one) and from `second_bars`; minute bars from `minute_bars`.
    """

    def __init__(
        self,
        frames: Iterable[tuple[int, Frame]],
        *,
        underlying: str = "IWM",
        chains: Iterable[tuple[int, list[dict]]] = (),
        contracts: Iterable[tuple[int, dict]] = (),
        second_bars: Iterable[tuple[str, dict]] = (),
        minute_bars: Iterable[tuple[str, dict]] = (),
    ) -> None:
        self.underlying = underlying
        self._frames = sorted(frames, key=lambda item: item[0])
        self._chains = sorted(chains, key=lambda item: item[0])
        self._chain_times = [t for t, _ in self._chains]
        self._contracts: dict[str, list[tuple[int, dict]]] = {}
        for t, result in sorted(contracts, key=lambda item: item[0]):
            self._contracts.setdefault(_result_ticker(result), []).append((t, result))
        self._seconds: dict[str, dict[int, dict]] = {}
        for _, frame in self._frames:
            for sym, bar in _rest_bars_of_frame(frame):
                self._seconds.setdefault(sym, {})[bar["t"]] = bar
        for sym, bar in second_bars:
            self._seconds.setdefault(sym, {})[bar["t"]] = bar
        self._minutes: dict[str, dict[int, dict]] = {}
        for sym, bar in minute_bars:
            self._minutes.setdefault(sym, {})[bar["t"]] = bar
        self._quotes: dict[str, list[tuple[int, BookQuote]]] = {}
        for _, frame in self._frames:
            for sym, t, quote in _quotes_of_frame(frame):
                self._quotes.setdefault(sym, []).append((t, quote))
        for series in self._quotes.values():
            series.sort(key=lambda item: item[0])

    @classmethod
    def from_tape(cls, path: Path, *, underlying: str | None = None) -> RecordedMarket:
        """Read a tape (section 6 of the design): ws lines, complete chains, contracts and aggs."""
        reader = TapeReader(path)
        meta = reader.meta or {}
        underlying = underlying or str(meta.get("underlying") or "IWM")
        recording = _TapeRecording(f"/v3/snapshot/options/{underlying}")
        for line in reader:
            recording.add(line.t, line.kind, line.payload, line.path, line.status)
        return cls(
            recording.frames,
            underlying=underlying,
            chains=recording.chains,
            contracts=recording.contracts,
            second_bars=recording.second_bars,
            minute_bars=recording.minute_bars,
        )

    @property
    def first_frame_ms(self) -> int | None:
        """The receive time of the first frame, a natural start for the simulated clock."""
        return self._frames[0][0] if self._frames else None

    def ws_frames(self) -> Iterable[tuple[int, Frame]]:
        return iter(self._frames)

    def chain_results(self, at_ms: int) -> list[dict]:
        index = bisect.bisect_right(self._chain_times, at_ms) - 1
        return list(self._chains[index][1]) if index >= 0 else []

    def contract_result(self, ticker: str, at_ms: int) -> dict | None:
        recorded = [result for t, result in self._contracts.get(ticker, []) if t <= at_ms]
        if recorded:
            return recorded[-1]
        return next((r for r in self.chain_results(at_ms) if _result_ticker(r) == ticker), None)

    def option_quote(self, ticker: str, at_ms: int) -> BookQuote | None:
        """The newest of the contract's taped `Q` events and its snapshot's `last_quote`, by quote time."""
        series = self._quotes.get(ticker, [])
        index = bisect.bisect_right(series, at_ms, key=operator.itemgetter(0)) - 1
        streamed = series[index] if index >= 0 else None
        snapshot = _snapshot_quote(self.contract_result(ticker, at_ms))
        if streamed is None or (snapshot is not None and snapshot[0] > streamed[0]):
            return snapshot[1] if snapshot is not None else None
        return streamed[1]

    def second_bars(self, sym: str, from_ms: int, to_ms: int) -> list[dict]:
        return _bars_between(self._seconds.get(sym, {}), from_ms, to_ms)

    def minute_bars(self, sym: str, from_ms: int, to_ms: int) -> list[dict]:
        return _bars_between(self._minutes.get(sym, {}), from_ms, to_ms)


@dataclass(slots=True)
class _TapeRecording:
    """Collects a tape's lines into what RecordedMarket needs; pages of one chain are joined."""

    chain_route: str
    frames: list[tuple[int, Frame]] = field(default_factory=list)
    chains: list[tuple[int, list[dict]]] = field(default_factory=list)
    contracts: list[tuple[int, dict]] = field(default_factory=list)
    second_bars: list[tuple[str, dict]] = field(default_factory=list)
    minute_bars: list[tuple[str, dict]] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)

    def add(self, t: int, kind: str, payload: object, path: str | None, status: int | None) -> None:
        if kind == "ws" and isinstance(payload, list | str | bytes):
            self.frames.append((t, payload))
        elif kind == "rest" and path is not None:
            self._add_rest(t, urlsplit(path).path, payload if status == 200 else None)

    def _add_rest(self, t: int, route: str, body: object) -> None:
        if route == self.chain_route:
            self._add_chain_page(t, body)
            return
        if not isinstance(body, dict):
            return
        if route.startswith(self.chain_route + "/") and isinstance(body.get("results"), dict):
            self.contracts.append((t, body["results"]))
            return
        match = _AGGS_ROUTE.fullmatch(route)
        if match is None or match["mult"] != "1" or not isinstance(body.get("results"), list):
            return
        target = self.second_bars if match["span"] == "second" else self.minute_bars
        if match["span"] in SPAN_MS:
            target.extend((match["sym"], bar) for bar in body["results"] if _is_rest_bar(bar))

    def _add_chain_page(self, t: int, body: object) -> None:
        if not isinstance(body, dict):
            self.pending = []  # a failed page voids the chain, as in the live decoder
            return
        results = body.get("results")
        if isinstance(results, list):
            self.pending.extend(result for result in results if isinstance(result, dict))
        if not body.get("next_url"):
            self.chains.append((t, self.pending))
            self.pending = []


def _is_rest_bar(bar: object) -> bool:
    return isinstance(bar, dict) and type(bar.get("t")) is int


def _result_ticker(result: dict) -> str:
    details = result.get("details")
    return str(details.get("ticker", "")) if isinstance(details, dict) else ""


def _rest_bars_of_frame(frame: Frame) -> Iterable[tuple[str, dict]]:
    """The `A` events of a frame as (sym, REST-shaped 1-second bar)."""
    if not isinstance(frame, list):
        return
    for event in frame:
        if isinstance(event, dict) and event.get("ev") == "A" and type(event.get("s")) is int:
            bar = {key: event[key] for key in ("v", "vw", "o", "c", "h", "l") if key in event}
            yield str(event.get("sym")), {**bar, "t": event["s"]}


def _quotes_of_frame(frame: Frame) -> Iterable[tuple[str, int, BookQuote]]:
    """The valid option `Q` events of a frame as (contract, quote ms, quote)."""
    if not isinstance(frame, list):
        return
    for event in frame:
        if not isinstance(event, dict) or event.get("ev") != "Q" or type(event.get("t")) is not int:
            continue
        fields = [event.get(key) for key in ("bp", "ap", "bs", "as")]
        if str(event.get("sym", "")).startswith("O:") and all(_is_number(x) for x in fields):
            bid, ask, bid_size, ask_size = fields
            yield event["sym"], event["t"], BookQuote(bid, ask, int(bid_size), int(ask_size))


def _snapshot_quote(result: dict | None) -> tuple[int, BookQuote] | None:
    """(quote ms, quote) of a snapshot result's `last_quote`, None when it has no usable one."""
    quote = result.get("last_quote") if isinstance(result, dict) else None
    if not isinstance(quote, dict):
        return None
    bid, ask = quote.get("bid"), quote.get("ask")
    if not (_is_number(bid) and _is_number(ask)):
        return None
    # Hand-made results may leave out sizes and time: one lot each, older than any streamed quote.
    sizes = [quote.get(key) for key in ("bid_size", "ask_size")]
    bid_size, ask_size = (int(x) if _is_number(x) else 1 for x in sizes)
    updated = quote.get("last_updated")
    quote_ms = int(updated) // 1_000_000 if _is_number(updated) else -1
    return quote_ms, BookQuote(bid, ask, bid_size, ask_size)


def _is_number(x: object) -> bool:
    return type(x) in (int, float) and x == x  # noqa: PLR0124 - NaN is the one value unequal to itself


def _bars_between(bars: Mapping[int, dict], from_ms: int, to_ms: int) -> list[dict]:
    return [bars[t] for t in sorted(bars) if from_ms <= t <= to_ms]


def _ny_days(from_ms: int, to_ms: int) -> list[datetime.date]:
    """The New York calendar days from `from_ms` to `to_ms`, at most MAX_RANGE_DAYS of them."""
    first = datetime.datetime.fromtimestamp(from_ms / 1000, NY).date()
    last = datetime.datetime.fromtimestamp(to_ms / 1000, NY).date()
    count = min((last - first).days + 1, MAX_RANGE_DAYS)
    return [first + datetime.timedelta(days=n) for n in range(max(0, count))]


@dataclass(slots=True)
class _RestFault:
    status: int
    remaining: int | None
    until: float | None
    path_prefix: str
    retry_after: int | str | None


@dataclass(slots=True)
class _RestHold:
    seconds: float
    remaining: int | None
    path_prefix: str


@dataclass(slots=True, eq=False)
class _Client:
    """One WebSocket client: its cluster, its topics and the event that wakes its streamer early."""

    ws: ServerConnection
    poke: asyncio.Event
    topics: set[str] = field(default_factory=set)
    cluster: str = WS_PATH
    quotes: dict[str, _QuoteState] = field(default_factory=dict)
    storm: _QuoteStorm | None = None
    storm_index: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))


@dataclass(slots=True)
class _QuoteState:
    """What an options client last got for one contract: (bid, ask), sequence number, quote time."""

    sequence: int
    last: tuple[float, float] | None = None
    last_t: int = 0


@dataclass(frozen=True, slots=True)
class _QuoteStorm:
    """`rate_per_s` quotes per contract per simulated second in [start_ms, end_ms)."""

    rate_per_s: float
    start_ms: int
    end_ms: int

    def at(self, index: int) -> float:
        """The simulated instant of the storm's `index`-th quote of each contract."""
        return self.start_ms + index * 1000.0 / self.rate_per_s


class FakePolygon:
    """The fake vendor. Sockets are bound on construction (so the URLs are known); served from start()."""

    def __init__(
        self,
        source: MarketSource,
        *,
        api_key: str = "testkey",
        start_ms: int,
        speed: float = 1.0,
        host: str = "127.0.0.1",
        ws_port: int = 0,
        rest_port: int = 0,
        wall: Callable[[], float] = time.monotonic,
        auth_timeout_s: float = AUTH_TIMEOUT_S,
    ) -> None:
        if not speed > 0:
            raise ValueError("speed must be positive")
        self.source = source
        self.rest_requests: list[str] = []
        self.rest_request_times_ms: list[int] = []  # the fake's own clock at each request, same order
        self.ws_connections = 0
        self.ws_extensions_offered: list[
            str | None
        ] = []  # each upgrade's Sec-WebSocket-Extensions, both clusters
        self.auth_attempts = 0
        self.subscriptions: list[str] = []
        self.options_connections = 0
        self.options_auth_attempts = 0
        self.options_subscriptions: list[str] = []
        self._api_key = api_key
        self._start_ms = start_ms
        self._speed = speed
        self._wall = wall
        self._wall0 = wall()
        self._auth_timeout_s = auth_timeout_s
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._garbage: list[str | bytes] = []
        self._chain_next_url: str | None = None
        self._chain_body: bytes | None = None
        self._silent = False
        self._options_entitled = True
        self._options_refuse = False
        self._options_silent = False
        self._storm: _QuoteStorm | None = None
        self._quotes_entitled = True
        self._quotes_page_cap = QUOTES_MAX_LIMIT
        # The last quote list served, so the later pages of one request do not build it again.
        self._quote_list: tuple[tuple[str, int, int, int], list[dict[str, Any]]] | None = None
        self._max_connections_pending = 0
        self._fault: _RestFault | None = None
        self._hold: _RestHold | None = None
        self._frames: list[tuple[int, Frame]] = []
        self._frame_times: list[int] = []
        self._clients: set[_Client] = set()
        self._ws_sock = socket.create_server((host, ws_port))
        self._ws_loop: asyncio.AbstractEventLoop | None = None
        self._ws_done: asyncio.Event | None = None
        self._ws_ready = threading.Event()
        self._ws_thread: threading.Thread | None = None
        self._rest_server = _RestServer((host, rest_port), self)
        self._rest_thread: threading.Thread | None = None
        self.ws_url = f"ws://{host}:{self._ws_sock.getsockname()[1]}{WS_PATH}"
        self.options_ws_url = f"ws://{host}:{self._ws_sock.getsockname()[1]}{OPTIONS_PATH}"
        self.rest_url = f"http://{host}:{self._rest_server.server_address[1]}"

    def __enter__(self) -> FakePolygon:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> FakePolygon:
        """Load the source's frames and serve both protocols on daemon threads; returns self."""
        self._frames = sorted(self.source.ws_frames(), key=lambda item: item[0])
        self._frame_times = [t for t, _ in self._frames]
        self._ws_thread = threading.Thread(target=self._run_ws, name="fake-polygon-ws", daemon=True)
        self._ws_thread.start()
        if not self._ws_ready.wait(5.0):
            raise RuntimeError("the fake Polygon WebSocket server did not start")
        self._rest_thread = threading.Thread(
            target=self._rest_server.serve_forever,
            args=(SHUTDOWN_POLL_S,),
            name="fake-polygon-rest",
            daemon=True,
        )
        self._rest_thread.start()
        # The simulated clock starts now, after loading, so no simulated time is lost to it.
        self._wall0 = self._wall()
        return self

    def stop(self) -> None:
        """Close every connection and stop both servers."""
        self._stopping.set()
        loop, done = self._ws_loop, self._ws_done
        if loop is not None and done is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(done.set)
        if self._ws_thread is not None:
            self._ws_thread.join(5.0)
        else:
            self._ws_sock.close()
        if self._rest_thread is not None:
            self._rest_server.shutdown()
            self._rest_thread.join(5.0)
        self._rest_server.server_close()
        self._rest_server.close_connections()

    def now_ms(self) -> int:
        """The simulated clock: start_ms + (wall() - wall0) * 1000 * speed."""
        return self._start_ms + int((self._wall() - self._wall0) * 1000 * self._speed)

    def drop_connections(self) -> None:
        """Close every stocks WebSocket connection now, abnormally (no close frame).

        The options cluster's connections stay up: `drop_options_connections` drops those.
        """
        self._drop(WS_PATH)

    def drop_options_connections(self) -> None:
        """Close every options-cluster connection now, abnormally (no close frame)."""
        self._drop(OPTIONS_PATH)

    def options_entitled(self, on: bool) -> None:
        """Off: the options cluster answers every auth with `auth_failed` and closes (a plan without it)."""
        with self._lock:
            self._options_entitled = on

    def options_refuse_subscriptions(self, on: bool) -> None:
        """On: a `Q.` subscribe gets `{"ev":"status","status":"error","message":"not authorized: Q.O:..."}`
        and no quotes (a plan whose options data has no quotes). Subscriptions made before stay."""
        with self._lock:
            self._options_refuse = on

    def options_silent(self, on: bool) -> None:
        """On: options sockets stay up and answer pings but get no `Q` events (quotes due meanwhile are
        lost; turned off, each contract's next quote is its current one if it changed meanwhile)."""
        with self._lock:
            self._options_silent = on
        self._poke_clients()

    def quote_storm(self, rate_per_s: float, seconds: float) -> None:
        """For `seconds` of simulated time from now, every subscribed contract gets `rate_per_s` `Q` events
        per simulated second: the model's quote jittered by a cent either way, quote times increasing.

        Simulated time: at speed 1 that is per wall second; a faster clock storms faster in wall time.
        The change-driven quotes pause meanwhile and resume after it with the model's quote.
        """
        if not rate_per_s > 0 or not seconds > 0:
            raise ValueError("a quote storm needs a positive rate and duration")
        now = self.now_ms()
        with self._lock:
            self._storm = _QuoteStorm(rate_per_s, now, now + round(seconds * 1000))
        self._poke_clients()

    def _drop(self, cluster: str) -> None:
        loop = self._ws_loop
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._abort_clients(cluster), loop).result(timeout=5.0)

    def send_garbage(self, frames: list[str | bytes]) -> None:
        """Send these frames verbatim before the next data frame (to the first client to stream).

        A str goes as a text frame, bytes as a binary frame.
        """
        with self._lock:
            self._garbage.extend(frames)
        self._poke_clients()

    def fail_rest(
        self,
        status: int,
        *,
        count: int | None = None,
        seconds: float | None = None,
        path_prefix: str = "/",
        retry_after: int | str | None = None,
    ) -> None:
        """Answer `status` to the next `count` requests, or to all for `seconds`, else until heal().

        Only requests whose path starts with `path_prefix` fail; `retry_after` adds that header.
        """
        until = None if seconds is None else self._wall() + seconds
        with self._lock:
            self._fault = _RestFault(status, count, until, path_prefix, retry_after)

    def delay_rest(self, seconds: float, *, count: int | None = None, path_prefix: str = "/") -> None:
        """Hold the next `count` matching requests `seconds` before answering (all until heal() if None)."""
        with self._lock:
            self._hold = _RestHold(seconds, count, path_prefix)

    def max_connections_next(self) -> None:
        """The next connection gets a `max_connections` status after its subscribe, then is closed."""
        with self._lock:
            self._max_connections_pending += 1

    def chain_next_url(self, url: str | None) -> None:
        """While set, every chain snapshot page carries this `next_url` (None: normal paging again).

        For a self-pointing `next_url`, or one with control characters.
        """
        with self._lock:
            self._chain_next_url = url

    def quotes_entitled(self, on: bool) -> None:
        """Off: `/v3/quotes/...` answers 403 NOT_AUTHORIZED (a plan without option quotes)."""
        with self._lock:
            self._quotes_entitled = on

    def quotes_page_cap(self, limit: int) -> None:
        """Cap every `/v3/quotes` page at `limit` results (the real cap is 50000), so paging shows in tests."""
        if limit < 1:
            raise ValueError("a page holds at least one quote")
        with self._lock:
            self._quotes_page_cap = limit

    def quote_history(
        self, ticker: str, gte_ns: int, lt_ns: int, *, as_of_ms: int | None = None
    ) -> list[dict[str, Any]]:
        """The `/v3/quotes` results of `ticker` with gte_ns <= sip_timestamp < lt_ns, oldest first.

        Only quotes that have happened by `as_of_ms` (default: the simulated now) exist. Their times are a
        seeded Poisson process per contract and second (`QUOTE_HISTORY_RATE_PER_S`), in the regular
        session only; each quote is the source's `option_quote` at that instant, so the same question
        always gets the same answer.
        """
        as_of = self.now_ms() if as_of_ms is None else as_of_ms
        end_ns = min(lt_ns, as_of * NS_PER_MS + 1)
        results: list[dict[str, Any]] = []
        if end_ns <= gte_ns:
            return results
        for open_s, close_s in _regular_seconds(gte_ns // NS_PER_MS, (end_ns - 1) // NS_PER_MS):
            first_s, last_s = max(open_s, gte_ns // NS_PER_S), min(close_s, (end_ns - 1) // NS_PER_S + 1)
            for second in range(first_s, last_s):
                for k, ns in enumerate(_quote_times(ticker, second)):
                    if not gte_ns <= ns < end_ns:
                        continue
                    quote = self.source.option_quote(ticker, ns // NS_PER_MS)
                    if quote is not None:
                        sequence = _first_sequence(ticker) + (second - open_s) * QUOTE_HISTORY_MAX_PER_S + k
                        results.append(_quote_result(quote, ns, sequence))
        return results

    def chain_body_override(self, raw: bytes | None) -> None:
        """While set, chain snapshot requests are answered 200 with these raw bytes (None: normal)."""
        with self._lock:
            self._chain_body = raw

    def silence(self, on: bool) -> None:
        """A stalled feed: while on, open sockets stay up and answer pings but get no data frames.

        The frames due meanwhile are skipped; turned off, streaming resumes from the current clock.
        """
        with self._lock:
            self._silent = on
        self._poke_clients()

    def heal(self) -> None:
        """Clear every REST fault and hold, pending garbage and max_connections, chain overrides, silence,
        and the options cluster's switches (entitled again, subscriptions allowed, not silent, no storm)."""
        with self._lock:
            self._fault = self._hold = None
            self._garbage.clear()
            self._max_connections_pending = 0
            self._chain_next_url = self._chain_body = None
            silent, self._silent = self._silent or self._options_silent, False
            self._options_entitled, self._options_refuse, self._options_silent = True, False, False
            self._storm = None
            self._quotes_entitled, self._quotes_page_cap = True, QUOTES_MAX_LIMIT
        if silent:
            self._poke_clients()

    def _run_ws(self) -> None:
        asyncio.run(self._serve_ws())

    async def _serve_ws(self) -> None:
        self._ws_loop = asyncio.get_running_loop()
        self._ws_done = asyncio.Event()
        async with serve(
            self._handle_ws, sock=self._ws_sock, process_request=_only_cluster_paths, close_timeout=1.0
        ):
            self._ws_ready.set()
            await self._ws_done.wait()

    async def _handle_ws(self, ws: ServerConnection) -> None:
        cluster = OPTIONS_PATH if ws.request is not None and _path_of(ws.request) == OPTIONS_PATH else WS_PATH
        client = _Client(ws, asyncio.Event(), cluster=cluster)
        offered = ws.request.headers.get("Sec-WebSocket-Extensions") if ws.request is not None else None
        with self._lock:
            self.ws_extensions_offered.append(offered)
            if cluster == OPTIONS_PATH:
                self.options_connections += 1
            else:
                self.ws_connections += 1
            self._clients.add(client)
        try:
            if cluster == OPTIONS_PATH:
                if await self._authenticate_options(ws):
                    await self._serve_options_client(client)
            elif await self._authenticate(ws):
                await self._serve_client(client)
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self._clients.discard(client)

    async def _authenticate_options(self, ws: ServerConnection) -> bool:
        with self._lock:
            entitled = self._options_entitled
        return await self._authenticate(ws, entitled=entitled, options=True)

    async def _authenticate(
        self, ws: ServerConnection, *, entitled: bool = True, options: bool = False
    ) -> bool:
        await ws.send(_status_frame("connected", "Connected Successfully"))
        try:
            async with asyncio.timeout(self._auth_timeout_s):
                message = await ws.recv()
        except TimeoutError:
            await ws.send(_status_frame("auth_timeout", "No authentication request received."))
            await ws.close(1008, "authentication timeout")
            return False
        request = _decode_action(message)
        if request.get("action") == "auth":
            with self._lock:
                if options:
                    self.options_auth_attempts += 1
                else:
                    self.auth_attempts += 1
        if not entitled or request.get("action") != "auth" or request.get("params") != self._api_key:
            await ws.send(_status_frame("auth_failed", "authentication failed"))
            await ws.close(1008, "authentication failed")
            return False
        await ws.send(_status_frame("auth_success", "authenticated"))
        return True

    async def _serve_client(self, client: _Client) -> None:
        """Read the client's requests; stream data on a task from its first subscribe."""
        streamer: asyncio.Task[None] | None = None
        try:
            async for message in client.ws:
                request = _decode_action(message)
                params = request.get("params")
                if not isinstance(params, str):
                    continue
                if request.get("action") == "subscribe":
                    since_ms = self.now_ms()
                    if not await self._subscribe(client, params):
                        return
                    streamer = streamer or asyncio.create_task(self._stream(client, since_ms))
                elif request.get("action") == "unsubscribe":
                    await self._unsubscribe(client, params)
        finally:
            if streamer is not None:
                streamer.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await streamer

    async def _subscribe(self, client: _Client, params: str) -> bool:
        """Confirm each topic; False when this connection is to be refused with max_connections."""
        topics = [topic.strip() for topic in params.split(",") if topic.strip()]
        with self._lock:
            self.subscriptions.append(params)
            refuse = self._max_connections_pending > 0
            self._max_connections_pending -= refuse
        for topic in topics:
            await client.ws.send(_status_frame("success", f"subscribed to: {topic}"))
        if refuse:
            await client.ws.send(_status_frame("max_connections", MAX_CONNECTIONS_MESSAGE))
            await client.ws.close(1008, "max_connections")
            return False
        client.topics.update(topics)
        client.poke.set()
        return True

    async def _unsubscribe(self, client: _Client, params: str) -> None:
        for topic in (topic.strip() for topic in params.split(",") if topic.strip()):
            client.topics.discard(topic)
            await client.ws.send(_status_frame("success", f"unsubscribed to: {topic}"))

    async def _stream(self, client: _Client, since_ms: int) -> None:
        """Send each frame received from `since_ms` on when its receive time comes; garbage goes first."""
        index = bisect.bisect_left(self._frame_times, since_ms)
        while True:
            client.poke.clear()
            if self._silent:
                await client.poke.wait()
                # What fell due while silent is lost, as from a feed that stalled.
                index = max(index, bisect.bisect_left(self._frame_times, self.now_ms()))
                continue
            for text in self._take_garbage():
                await client.ws.send(text)
            if index >= len(self._frames):
                await client.poke.wait()
                continue
            t, frame = self._frames[index]
            wait_s = (t - self.now_ms()) / 1000 / self._speed
            if wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await client.poke.wait()
                continue
            text = _frame_text(frame, client.topics)
            if text is not None:
                await client.ws.send(text)
            index += 1

    async def _serve_options_client(self, client: _Client) -> None:
        """Read the options client's requests; stream quotes on a task from its first subscribe."""
        streamer: asyncio.Task[None] | None = None
        try:
            async for message in client.ws:
                request = _decode_action(message)
                params = request.get("params")
                if not isinstance(params, str):
                    continue
                if request.get("action") == "subscribe":
                    await self._subscribe_quotes(client, params)
                    streamer = streamer or asyncio.create_task(self._stream_quotes(client))
                elif request.get("action") == "unsubscribe":
                    await self._unsubscribe_quotes(client, params)
        finally:
            if streamer is not None:
                streamer.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await streamer

    async def _subscribe_quotes(self, client: _Client, params: str) -> None:
        """Confirm each topic, or refuse it (not authorized, or past the contract limit)."""
        with self._lock:
            self.options_subscriptions.append(params)
            refuse = self._options_refuse
        for topic in _split_topics(params):
            quoted = topic.startswith("Q.")
            if quoted and refuse and topic not in client.topics:
                await client.ws.send(_status_frame("error", f"not authorized: {topic}"))
                continue
            if quoted and topic not in client.topics and _quote_topics(client) >= MAX_QUOTE_CONTRACTS:
                limit = f"at most {MAX_QUOTE_CONTRACTS} contracts per connection"
                await client.ws.send(_status_frame("error", f"{limit}; not subscribed: {topic}"))
                continue
            # Other channels (A., T., AM.) are confirmed but this fake streams only quotes.
            client.topics.add(topic)
            await client.ws.send(_status_frame("success", f"subscribed to: {topic}"))
        client.poke.set()

    async def _unsubscribe_quotes(self, client: _Client, params: str) -> None:
        for topic in _split_topics(params):
            client.topics.discard(topic)
            state = client.quotes.get(topic[2:])
            if state is not None:
                state.last = None  # subscribed again, it starts with its current quote
            await client.ws.send(_status_frame("success", f"unsubscribed to: {topic}"))

    async def _stream_quotes(self, client: _Client) -> None:
        """Send each subscribed contract's quote whenever it changes, checked at the first subscription
        and then at every multiple of QUOTE_CHECK_MS of simulated time (a new subscription's current
        quote first); during a storm, the storm's quotes instead. Checks that fall due while silent or
        while the loop lags are skipped."""
        next_check = self.now_ms()
        while True:
            client.poke.clear()
            now = self.now_ms()
            with self._lock:
                silent, storm = self._options_silent, self._storm
            if silent:
                await self._wait_quotes(client, MAX_QUOTE_WAIT_S)
                next_check = self.now_ms()
                continue
            if storm is not client.storm:
                client.storm, client.storm_index = storm, 0
            if now - next_check > CATCH_UP_MS:
                next_check = now
            tickers = sorted(topic[2:] for topic in client.topics if topic.startswith("Q."))
            moments: list[tuple[float, bool]] = []
            while next_check <= now:
                if storm is None or not storm.start_ms <= next_check < storm.end_ms:
                    moments.append((next_check, False))
                # After the first check (at the subscription) the checks keep to the clock's 250 ms grid.
                next_check += QUOTE_CHECK_MS - next_check % QUOTE_CHECK_MS
            moments += self._storm_moments(client, now)
            moments.sort(key=operator.itemgetter(0))
            events = [
                event for at, stormy in moments for event in self._quotes_at(client, tickers, at, stormy)
            ]
            for start in range(0, len(events), MAX_EVENTS_PER_FRAME):
                await client.ws.send(
                    json.dumps(events[start : start + MAX_EVENTS_PER_FRAME], separators=(",", ":"))
                )
            due = float(next_check)
            if storm is not None and storm.at(client.storm_index) < storm.end_ms:
                due = min(due, storm.at(client.storm_index))
            await self._wait_quotes(client, (due - self.now_ms()) / 1000 / self._speed)

    def _storm_moments(self, client: _Client, now: int) -> list[tuple[float, bool]]:
        """The storm's instants due by `now` not yet sent to this client (a bounded batch)."""
        storm = client.storm
        moments: list[tuple[float, bool]] = []
        while storm is not None and len(moments) < MAX_STORM_BATCH:
            at = storm.at(client.storm_index)
            if at > now or at >= storm.end_ms:
                break
            moments.append((at, True))
            client.storm_index += 1
        return moments

    def _quotes_at(
        self, client: _Client, tickers: list[str], at: float, stormy: bool
    ) -> list[dict[str, Any]]:
        """The Q events of one instant: each contract's changed quote, or in a storm a jittered one."""
        events = []
        check_ms = int(at)
        for ticker in tickers:
            quote = self.source.option_quote(
                ticker, check_ms - check_ms % QUOTE_CHECK_MS if stormy else check_ms
            )
            if quote is None:
                continue
            state = client.quotes.setdefault(ticker, _QuoteState(_first_sequence(ticker)))
            if stormy:
                quote = _jittered(quote, client.rng.choice((-0.01, 0.0, 0.01)))
            elif (quote.bid, quote.ask) == state.last:
                continue
            events.append(_q_event(ticker, quote, check_ms, state))
        return events

    async def _wait_quotes(self, client: _Client, seconds: float) -> None:
        """Sleep up to `seconds` (at most MAX_QUOTE_WAIT_S, so a moved wall is seen), woken by a poke."""
        seconds = min(seconds, MAX_QUOTE_WAIT_S)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await client.poke.wait()

    def _take_garbage(self) -> list[str]:
        with self._lock:
            taken, self._garbage = self._garbage, []
        return taken

    def _poke_clients(self) -> None:
        loop = self._ws_loop
        if loop is None:
            return

        def poke_all() -> None:
            for client in list(self._clients):
                client.poke.set()

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(poke_all)

    async def _abort_clients(self, cluster: str) -> None:
        with self._lock:
            clients = [client for client in self._clients if client.cluster == cluster]
        for client in clients:
            client.ws.transport.abort()

    def answer_rest(self, raw_path: str, authorization: str | None) -> Reply:
        """The answer to one GET: authentication, injected faults, then the route."""
        path = strip_api_key(raw_path)
        with self._lock:
            self.rest_requests.append(path)
            self.rest_request_times_ms.append(self.now_ms())
        self._hold_if_asked(path)
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query, keep_blank_values=True)
        denied = self._check_key(authorization, query)
        if denied is not None:
            return denied
        forced = self._forced_failure(path)
        if forced is not None:
            return forced
        try:
            return self._route(parts.path, query, self.now_ms())
        except ValueError as exc:
            return Reply(400, {"status": "ERROR", "request_id": _request_id(), "error": str(exc)})

    def _check_key(self, authorization: str | None, query: dict[str, list[str]]) -> Reply | None:
        scheme, _, token = (authorization or "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
        key = key or (query.get("apiKey") or [None])[-1]
        if not key:
            return Reply(
                401, {"status": "ERROR", "request_id": _request_id(), "error": "API Key was not provided"}
            )
        if key != self._api_key:
            return Reply(401, {"status": "ERROR", "request_id": _request_id(), "error": "Unknown API Key"})
        return None

    def _hold_if_asked(self, path: str) -> None:
        with self._lock:
            hold = self._hold
            if hold is None or not path.startswith(hold.path_prefix):
                return
            if hold.remaining is not None:
                hold.remaining -= 1
                if hold.remaining <= 0:
                    self._hold = None
        self._stopping.wait(hold.seconds)

    def _forced_failure(self, path: str) -> Reply | None:
        with self._lock:
            fault = self._fault
            if fault is None or not path.startswith(fault.path_prefix):
                return None
            if fault.until is not None and self._wall() >= fault.until:
                self._fault = None
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._fault = None
        body = {
            **FAILURE_BODIES.get(fault.status, {"status": "ERROR", "error": f"simulated HTTP {fault.status}"})
        }
        body["request_id"] = _request_id()
        headers = (("Retry-After", str(fault.retry_after)),) if fault.retry_after is not None else ()
        return Reply(fault.status, body, headers)

    def _route(self, route: str, query: dict[str, list[str]], now_ms: int) -> Reply:
        chain_route = f"/v3/snapshot/options/{self.source.underlying}"
        if route == chain_route:
            return self._chain(route, query, now_ms)
        if route.startswith(chain_route + "/"):
            return self._contract(unquote(route[len(chain_route) + 1 :]), now_ms)
        match = _AGGS_ROUTE.fullmatch(route)
        if match is not None and match["mult"] == "1" and match["span"] in SPAN_MS:
            return self._aggs(route, match, query, now_ms)
        if route.startswith(QUOTES_ROUTE) and len(route) > len(QUOTES_ROUTE):
            return self._quotes(route, unquote(route[len(QUOTES_ROUTE) :]), query, now_ms)
        if route == CONTRACTS_ROUTE:
            return self._contracts(route, query, now_ms)
        return _not_found("Not found")

    def _quotes(self, route: str, ticker: str, query: dict[str, list[str]], now_ms: int) -> Reply:
        """`GET /v3/quotes/{optionsTicker}` (polygon.md section 4.2): ns time bounds, sort/order, cursor paging."""
        with self._lock:
            entitled, cap = self._quotes_entitled, self._quotes_page_cap
        if not entitled:
            return Reply(403, {**FAILURE_BODIES[403], "request_id": _request_id()})
        params, at_ms, offset = self._paging_state(query, now_ms)
        limit = min(_limit(params.get("limit"), QUOTES_DEFAULT_LIMIT, QUOTES_MAX_LIMIT), cap)
        if params.get("sort", "timestamp") != "timestamp":
            raise ValueError(f"invalid sort {params['sort']!r}")
        order = params.get("order", "desc")  # the real default is newest first
        if order not in ("asc", "desc"):
            raise ValueError(f"invalid order {order!r}")
        gte_ns, lt_ns = _ns_bounds(params, at_ms)
        key = (ticker, gte_ns, lt_ns, at_ms)
        with self._lock:
            last = self._quote_list
        if last is not None and last[0] == key:
            quotes = last[1]
        else:
            quotes = self.quote_history(ticker, gte_ns, lt_ns, as_of_ms=at_ms)
            with self._lock:
                self._quote_list = (key, quotes)
        if order == "desc":
            quotes = quotes[::-1]
        body: dict[str, Any] = {
            "status": "OK",
            "request_id": _request_id(),
            "results": quotes[offset : offset + limit],
        }
        if offset + limit < len(quotes):
            body["next_url"] = self._next_url(route, params, at_ms, offset + limit)
        return Reply(200, body)

    def _contracts(self, route: str, query: dict[str, list[str]], now_ms: int) -> Reply:
        """`GET /v3/reference/options/contracts`: the contracts of the chain as of now, filtered and paged."""
        params, at_ms, offset = self._paging_state(query, now_ms)
        limit = _limit(params.get("limit"), CONTRACTS_DEFAULT_LIMIT, CONTRACTS_MAX_LIMIT)
        wanted = params.get("underlying_ticker", self.source.underlying)
        results = self.source.chain_results(at_ms) if wanted == self.source.underlying else []
        chosen = _filter_chain(results, params)
        rows = list({row["ticker"]: row for row in (_reference_row(r, wanted) for r in chosen)}.values())
        body: dict[str, Any] = {
            "status": "OK",
            "request_id": _request_id(),
            "results": rows[offset : offset + limit],
        }
        if offset + limit < len(rows):
            body["next_url"] = self._next_url(route, params, at_ms, offset + limit)
        return Reply(200, body)

    def _chain(self, route: str, query: dict[str, list[str]], now_ms: int) -> Reply:
        with self._lock:
            raw_body, forced_next = self._chain_body, self._chain_next_url
        if raw_body is not None:
            return Reply(200, raw_body)
        if forced_next is not None and "cursor" in query:
            query = {key: value for key, value in query.items() if key != "cursor"}  # a page not ours
        params, at_ms, offset = self._paging_state(query, now_ms)
        limit = _limit(params.get("limit"), CHAIN_DEFAULT_LIMIT, CHAIN_MAX_LIMIT)
        chosen = _filter_chain(self.source.chain_results(at_ms), params)
        body: dict[str, Any] = {
            "status": "OK",
            "request_id": _request_id(),
            "results": chosen[offset : offset + limit],
        }
        if offset + limit < len(chosen):
            body["next_url"] = self._next_url(route, params, at_ms, offset + limit)
        if forced_next is not None:
            body["next_url"] = forced_next
        return Reply(200, body)

    def _contract(self, ticker: str, now_ms: int) -> Reply:
        result = self.source.contract_result(ticker, now_ms)
        if result is None:
            return _not_found(f"Contract {ticker} not found")
        return Reply(200, {"status": "OK", "request_id": _request_id(), "results": result})

    def _aggs(self, route: str, match: re.Match[str], query: dict[str, list[str]], now_ms: int) -> Reply:
        params, at_ms, offset = self._paging_state(query, now_ms)
        limit = _limit(params.get("limit"), AGGS_DEFAULT_LIMIT, AGGS_MAX_LIMIT)
        sym, span = match["sym"], match["span"]
        from_ms, to_ms = _range_start_ms(match["from"]), _range_end_ms(match["to"])
        fetch = self.source.second_bars if span == "second" else self.source.minute_bars
        # Only bars whose window has closed on the simulated clock exist yet.
        bars = [bar for bar in fetch(sym, from_ms, to_ms) if bar["t"] + SPAN_MS[span] <= at_ms]
        bars.sort(key=lambda bar: bar["t"], reverse=params.get("sort") == "desc")
        page = bars[offset : offset + limit]
        body: dict[str, Any] = {
            "ticker": sym,
            "queryCount": len(page),
            "resultsCount": len(page),
            "adjusted": params.get("adjusted", "true") != "false",
            "status": "OK",
            "request_id": _request_id(),
            "count": len(page),
        }
        if page:
            body["results"] = page  # the real API leaves `results` out when there are none
        if offset + limit < len(bars):
            body["next_url"] = self._next_url(route, params, at_ms, offset + limit)
        return Reply(200, body)

    def _paging_state(self, query: dict[str, list[str]], now_ms: int) -> tuple[dict[str, str], int, int]:
        """(filters, as-of ms, offset): from the cursor on later pages, else from the query at now."""
        cursor = (query.get("cursor") or [None])[-1]
        if cursor is None:
            params = {key: values[-1] for key, values in query.items() if key != "apiKey"}
            return params, now_ms, 0
        state = _decode_cursor(cursor)
        return state["q"], state["at"], state["offset"]

    def _next_url(self, route: str, params: dict[str, str], at_ms: int, offset: int) -> str:
        # Like the real API: the cursor carries every filter, so next_url needs nothing else.
        return f"{self.rest_url}{route}?cursor={_encode_cursor({'q': params, 'at': at_ms, 'offset': offset})}"


class _RestServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakePolygon) -> None:
        super().__init__(address, _RestHandler)
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def track(self, connection: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            if alive:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """Drop keep-alive connections so no client waits on a stopped server."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _RestHandler(JsonHandler):
    server: _RestServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        reply = self.server.fake.answer_rest(self.path, self.headers.get("Authorization"))
        if isinstance(reply.body, bytes):
            self._send_raw(reply)
        else:
            self.send_reply(reply)

    def _send_raw(self, reply: Reply) -> None:
        """A body sent byte for byte (a hostile one), labelled JSON like every other answer."""
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", self.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            self.close_connection = True


def _only_cluster_paths(connection: ServerConnection, request: Request) -> Response | None:
    """Refuse the WebSocket upgrade on any path but /stocks and /options, as the real cluster URLs would."""
    if _path_of(request) in (WS_PATH, OPTIONS_PATH):
        return None
    return connection.respond(404, "Not Found\n")


def _path_of(request: Request) -> str:
    return urlsplit(request.path).path


def _status_frame(status: str, message: str) -> str:
    return json.dumps([{"ev": "status", "status": status, "message": message}], separators=(",", ":"))


def _split_topics(params: str) -> list[str]:
    return [topic.strip() for topic in params.split(",") if topic.strip()]


def _quote_topics(client: _Client) -> int:
    return sum(topic.startswith("Q.") for topic in client.topics)


def _first_sequence(ticker: str) -> int:
    """Where a contract's sequence numbers start: any stable number will do, the same for every client."""
    return 100_000 + zlib.crc32(ticker.encode()) % 900_000


def _jittered(quote: BookQuote, shift: float) -> BookQuote:
    """The quote moved by `shift` (a cent either way or none), kept uncrossed and never below zero."""
    bid = round(max(0.0, quote.bid + shift), 2)
    ask = round(max(bid + 0.01, quote.ask + shift), 2)
    return quote._replace(bid=bid, ask=ask)


def _q_event(ticker: str, quote: BookQuote, at_ms: int, state: _QuoteState) -> dict[str, Any]:
    """A `Q` event of the options cluster (polygon.md section 2.7); quote times never go back."""
    state.sequence += 1
    state.last = (quote.bid, quote.ask)
    state.last_t = max(at_ms, state.last_t + 1)
    return {
        "ev": "Q",
        "sym": ticker,
        "bx": quote.bid_exchange,
        "ax": quote.ask_exchange,
        "bp": quote.bid,
        "ap": quote.ask,
        "bs": quote.bid_size,
        "as": quote.ask_size,
        "c": 1,
        "i": [],
        "t": state.last_t,
        "q": state.sequence,
    }


def _decode_action(message: str | bytes) -> dict[str, Any]:
    try:
        decoded = json.loads(message)
    except (ValueError, RecursionError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _wanted(event: object, topics: set[str]) -> bool:
    if not isinstance(event, dict):
        return True
    ev = event.get("ev")
    return f"{ev}.*" in topics or f"{ev}.{event.get('sym')}" in topics


def _frame_text(frame: Frame, topics: set[str]) -> str | bytes | None:
    """The frame as sent to a client with these topics; None when nothing in it is wanted."""
    if isinstance(frame, str | bytes):
        return frame
    events = [event for event in frame if _wanted(event, topics)]
    return json.dumps(events, separators=(",", ":")) if events else None


def _request_id() -> str:
    return uuid.uuid4().hex


def _not_found(message: str) -> Reply:
    return Reply(404, {"status": "NOT_FOUND", "request_id": _request_id(), "message": message})


def _limit(raw: str | None, default: int, maximum: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"invalid limit {raw!r}") from None
    if value < 1:
        raise ValueError(f"invalid limit {raw!r}")
    return min(value, maximum)


def _number(params: Mapping[str, str], key: str) -> float | None:
    raw = params.get(key)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"invalid {key} {raw!r}") from None


_STRIKE_FILTERS: dict[str, Callable[[float, float], bool]] = {
    "strike_price": operator.eq,
    "strike_price.gte": operator.ge,
    "strike_price.gt": operator.gt,
    "strike_price.lte": operator.le,
    "strike_price.lt": operator.lt,
}


def _filter_chain(results: list[dict], params: Mapping[str, str]) -> list[dict]:
    """The chain results that match the query's filters, sorted by ticker like the real default."""
    expiry = params.get("expiration_date")
    contract_type = params.get("contract_type")
    bounds = [
        (test, bound) for key, test in _STRIKE_FILTERS.items() if (bound := _number(params, key)) is not None
    ]
    chosen = []
    for result in results:
        details = result.get("details") if isinstance(result.get("details"), dict) else {}
        strike = details.get("strike_price")
        if expiry is not None and details.get("expiration_date") != expiry:
            continue
        if contract_type is not None and details.get("contract_type") != contract_type:
            continue
        if bounds and not (isinstance(strike, int | float) and all(test(strike, b) for test, b in bounds)):
            continue
        chosen.append(result)
    chosen.sort(key=_result_ticker)
    return chosen


def _regular_seconds(from_ms: int, to_ms: int) -> list[tuple[int, int]]:
    """(open, close) Unix seconds of the regular session of each New York day from `from_ms` to `to_ms`."""
    sessions = []
    for day in _ny_days(from_ms, to_ms):
        if day.weekday() < 5:
            open_at = datetime.datetime.combine(day, REGULAR_OPEN, NY)
            close_at = datetime.datetime.combine(day, REGULAR_CLOSE, NY)
            sessions.append((int(open_at.timestamp()), int(close_at.timestamp())))
    return sessions


def _quote_times(ticker: str, second: int) -> list[int]:
    """The ns instants of a contract's NBBO changes within one Unix second: Poisson many, uniform in it.

    Seeded by (ticker, second) alone, so any time range or page asks for the same instants.
    """
    rng = random.Random(f"nbbo:{ticker}:{second}")
    count, product, floor = 0, rng.random(), math.exp(-QUOTE_HISTORY_RATE_PER_S)
    while product > floor and count < QUOTE_HISTORY_MAX_PER_S:
        count += 1
        product *= rng.random()
    return [second * NS_PER_S + offset for offset in sorted(rng.sample(range(NS_PER_S), count))]


def _quote_result(quote: BookQuote, ns: int, sequence: int) -> dict[str, Any]:
    """One `/v3/quotes` result (polygon.md section 4.2), keys in the vendor's order."""
    return {
        "ask_exchange": quote.ask_exchange,
        "ask_price": quote.ask,
        "ask_size": quote.ask_size,
        "bid_exchange": quote.bid_exchange,
        "bid_price": quote.bid,
        "bid_size": quote.bid_size,
        "sequence_number": sequence,
        "sip_timestamp": ns,
    }


def _ns_bounds(params: Mapping[str, str], at_ms: int) -> tuple[int, int]:
    """[gte, lt) in ns from `timestamp` (ns or YYYY-MM-DD) and its .gte/.gt/.lte/.lt forms; open ends: 0, as-of."""
    low, high = 0, at_ms * NS_PER_MS + 1
    day = params.get("timestamp")
    if day is not None and not day.isdigit():
        low = _ny_midnight_ms(_parse_day(day)) * NS_PER_MS
        high = _ny_midnight_ms(_parse_day(day) + datetime.timedelta(days=1)) * NS_PER_MS
    elif day is not None:
        low, high = int(day), int(day) + 1
    for key, shift, is_low in (("gte", 0, True), ("gt", 1, True), ("lt", 0, False), ("lte", 1, False)):
        raw = params.get(f"timestamp.{key}")
        if raw is None:
            continue
        if not raw.isdigit():
            raise ValueError(f"invalid timestamp.{key} {raw!r}: use Unix ns")
        if is_low:
            low = max(low, int(raw) + shift)
        else:
            high = min(high, int(raw) + shift)
    return low, high


def _reference_row(result: dict, underlying: str) -> dict[str, Any]:
    """A `/v3/reference/options/contracts` row from a chain result's details."""
    details = result.get("details") if isinstance(result.get("details"), dict) else {}
    return {
        "cfi": "OCASPS",
        "contract_type": details.get("contract_type"),
        "exercise_style": details.get("exercise_style"),
        "expiration_date": details.get("expiration_date"),
        "primary_exchange": "BATO",
        "shares_per_contract": details.get("shares_per_contract"),
        "strike_price": details.get("strike_price"),
        "ticker": _result_ticker(result),
        "underlying_ticker": underlying,
    }


def _encode_cursor(state: dict[str, Any]) -> str:
    raw = json.dumps(state, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> dict[str, Any]:
    """The paging state in a cursor; ValueError when it is not one of ours."""
    try:
        state = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(state["q"], dict) and type(state["at"]) is int and type(state["offset"]) is int:
            return state
    except (ValueError, KeyError, TypeError):
        pass
    raise ValueError("invalid cursor")


def _range_start_ms(text: str) -> int:
    """An aggs `from`: Unix ms, or a YYYY-MM-DD day taken from its New York midnight."""
    if text.isdigit():
        return int(text)
    return _ny_midnight_ms(_parse_day(text))


def _range_end_ms(text: str) -> int:
    """An aggs `to` (inclusive): Unix ms, or the last ms of a YYYY-MM-DD New York day."""
    if text.isdigit():
        return int(text)
    return _ny_midnight_ms(_parse_day(text) + datetime.timedelta(days=1)) - 1


def _parse_day(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid date {text!r}: use YYYY-MM-DD or Unix ms") from None


def _ny_midnight_ms(day: datetime.date) -> int:
    return int(datetime.datetime.combine(day, datetime.time(0), NY).timestamp() * 1000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sim.polygon_server",
        description="A fake Polygon/Massive (stocks and options WebSockets + REST): the demo day or a tape.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--ws-port", type=int, default=8765, help="WebSocket port, 0 for any (default 8765)")
    parser.add_argument("--rest-port", type=int, default=8766, help="REST port, 0 for any (default 8766)")
    parser.add_argument("--key", default="testkey", help="the API key clients must present (default testkey)")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="simulated seconds per wall second (default 1)"
    )
    parser.add_argument(
        "--start",
        help="ISO-8601 instant the simulated clock starts at (default: session open or first tape frame)",
    )
    parser.add_argument(
        "--tape", type=Path, help="serve this recorded tape instead of the synthetic demo day"
    )
    return parser.parse_args(argv)


def _source_and_start(args: argparse.Namespace) -> tuple[MarketSource, int]:
    start_ms = None if args.start is None else _iso_ms(args.start)
    if args.tape is not None:
        recorded = RecordedMarket.from_tape(args.tape)
        return recorded, start_ms if start_ms is not None else (recorded.first_frame_ms or 0)
    from sim.market import SyntheticMarket, demo_script

    market = SyntheticMarket(demo_script())
    return SyntheticSource(market), start_ms if start_ms is not None else market.session_open_ms


def _iso_ms(text: str) -> int:
    instant = datetime.datetime.fromisoformat(text)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=NY)
    return int(instant.timestamp() * 1000)


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted; prints the settings that point the daemon here (never the key)."""
    args = parse_args(argv)
    source, start_ms = _source_and_start(args)
    fake = FakePolygon(
        source,
        api_key=args.key,
        start_ms=start_ms,
        speed=args.speed,
        host=args.host,
        ws_port=args.ws_port,
        rest_port=args.rest_port,
    )
    start_iso = datetime.datetime.fromtimestamp(start_ms / 1000, NY).isoformat()
    with fake:
        print(f"fake Polygon serving from {start_iso} at speed {args.speed:g}", flush=True)
        print(f"  POLYGON_WS_URL={fake.ws_url}", flush=True)
        print(f"  POLYGON_REST_URL={fake.rest_url}", flush=True)
        print(f"  POLYGON_OPTIONS_WS_URL={fake.options_ws_url}", flush=True)
        print(f"  SIM_CLOCK_START={start_iso} SIM_CLOCK_SPEED={args.speed:g}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
