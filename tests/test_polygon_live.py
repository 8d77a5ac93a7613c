"""The live Polygon clients (stream and REST) against the fake Polygon server over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from structlog.testing import capture_logs
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from events import FeedStatus, Received
from feed import FeedDecoder
from polygon_client import (
    GREETING_WAIT_S,
    MAX_CHAIN_PAGES,
    RETRY_AFTER_HOLD_CAP_S,
    Backoff,
    PolygonRest,
    PolygonStream,
    RestAnswer,
)
from sim.polygon_server import FakePolygon, RecordedMarket

START_MS = 1_759_411_800_000  # 2025-10-02 09:30 New York
SESSION_DATE = datetime.date(2025, 10, 2)
KEY = "testkey"
SECRET = "sekret-KEY-0123456789"
SPEED = 200.0
SECONDS = 3600
STRIKES = range(220, 261)
WAIT_S = 5.0
TINY_BACKOFF = Backoff(initial_s=0.01, max_s=0.02)


def a_event(sym: str, start_ms: int, close: float) -> dict:
    return {
        "ev": "A",
        "sym": sym,
        "v": 100,
        "av": 1000,
        "vw": close,
        "o": close,
        "c": close,
        "h": close,
        "l": close,
        "a": close,
        "z": 1,
        "s": start_ms,
        "e": start_ms + 1000,
    }


def option_result(strike: int) -> dict:
    ticker = f"O:IWM251002C{strike * 1000:08d}"
    return {
        "details": {
            "contract_type": "call",
            "expiration_date": "2025-10-02",
            "strike_price": strike,
            "ticker": ticker,
        },
        "last_quote": {"bid": 1.0, "ask": 1.1, "bid_size": 20, "ask_size": 20},
    }


def tiny_market() -> RecordedMarket:
    """One bar per second for IWM and SPY (one frame each second) and one chain of 41 strikes."""
    frames = [
        (
            START_MS + i * 1000 + 200,
            [a_event("IWM", START_MS + i * 1000, 240.0), a_event("SPY", START_MS + i * 1000, 600.0)],
        )
        for i in range(SECONDS)
    ]
    return RecordedMarket(frames, chains=[(START_MS - 60_000, [option_result(k) for k in STRIKES])])


MARKET = tiny_market()
BAR_STARTS = [START_MS + i * 1000 for i in range(SECONDS)]


class Inbox:
    """What the stream put, collected on the test thread; waits are bounded."""

    def __init__(self) -> None:
        self.queue: queue.Queue[object] = queue.Queue()
        self.items: list[object] = []

    def put(self, item: object) -> None:
        self.queue.put(item)

    def wait_for(self, predicate: Callable[[list[object]], bool], timeout: float = WAIT_S) -> list[object]:
        deadline = time.monotonic() + timeout
        while not predicate(self.items):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met; last items: {self.items[-6:]!r}")
            with contextlib.suppress(queue.Empty):
                self.items.append(self.queue.get(timeout=min(remaining, 0.05)))
        return self.items


class MaxRng(random.Random):
    """Always the longest jittered wait, so a test's gap has a known lower bound."""

    def uniform(self, a: float, b: float) -> float:
        return b


def statuses(items: list[object]) -> list[FeedStatus]:
    return [item for item in items if isinstance(item, FeedStatus)]


def reasons(items: list[object]) -> list[str]:
    return [status.reason for status in statuses(items)]


def after_last_status(items: list[object]) -> list[object]:
    last = max(i for i, item in enumerate(items) if isinstance(item, FeedStatus))
    return items[last + 1 :]


def frames(items: list[object]) -> list[Received]:
    return [item for item in items if isinstance(item, Received)]


def data_frames(items: list[object]) -> list[Received]:
    return [item for item in frames(items) if '"ev":"A"' in item.payload]


@pytest.fixture
def fake() -> Iterator[FakePolygon]:
    with FakePolygon(MARKET, api_key=KEY, start_ms=START_MS, speed=SPEED) as server:
        yield server


@pytest.fixture
def streams() -> Iterator[list[PolygonStream]]:
    started: list[PolygonStream] = []
    yield started
    for stream in started:
        stream.stop(timeout=5.0)


def start_stream(streams: list[PolygonStream], url: str, inbox: Inbox, **kwargs: object) -> PolygonStream:
    kwargs.setdefault("clock_ms", lambda: 42_000)
    kwargs.setdefault("backoff", TINY_BACKOFF)
    kwargs.setdefault("rng", random.Random(7))
    api_key = str(kwargs.pop("api_key", KEY))
    stream = PolygonStream(url, api_key, ["IWM", "SPY"], inbox.put, **kwargs)  # type: ignore[arg-type]
    streams.append(stream)
    stream.start()
    return stream


def test_backoff_is_immediate_first_then_capped_exponential_with_full_jitter() -> None:
    backoff = Backoff(initial_s=1.0, max_s=60.0, factor=2.0)
    assert backoff.delay(0, random.Random(1)) == 0.0
    assert [backoff.ceiling(n) for n in range(1, 9)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert backoff.ceiling(100_000) == 60.0
    rng = random.Random(5)
    delays = [backoff.delay(n, rng) for n in range(1, 200)]
    assert all(0.0 <= d <= backoff.ceiling(n) for n, d in zip(range(1, 200), delays, strict=True))
    assert delays == [backoff.delay(n, r) for r in [random.Random(5)] for n in range(1, 200)]
    assert len(set(delays)) == len(delays)


def test_stream_authenticates_subscribes_and_stamps_every_frame(fake: FakePolygon, streams: list) -> None:
    inbox = Inbox()
    stream = start_stream(streams, fake.ws_url, inbox)
    items = inbox.wait_for(lambda items: len(data_frames(items)) >= 3)

    assert fake.auth_attempts == 1
    assert fake.subscriptions == ["A.IWM,A.SPY"]
    assert items[:4] == [
        Received(42_000, "ws", '[{"ev":"status","status":"auth_success","message":"authenticated"}]'),
        FeedStatus(42_000, True, "auth_success"),
        Received(42_000, "ws", '[{"ev":"status","status":"success","message":"subscribed to: A.IWM"}]'),
        Received(42_000, "ws", '[{"ev":"status","status":"success","message":"subscribed to: A.SPY"}]'),
    ]
    assert all(item.t == 42_000 and item.kind == "ws" for item in frames(items))
    first = json.loads(data_frames(items)[0].payload)
    assert [(event["ev"], event["sym"]) for event in first] == [("A", "IWM"), ("A", "SPY")]
    assert first[0]["s"] in BAR_STARTS
    assert stream.connected is True
    assert stream.last_frame_ms == 42_000
    assert stream.reconnects == 0
    stream.stop()
    assert stream.connected is False


def test_stream_with_a_wrong_key_reports_auth_failed_once_and_retries_slowly(
    fake: FakePolygon, streams: list
) -> None:
    inbox = Inbox()
    failed = '[{"ev":"status","status":"auth_failed","message":"authentication failed"}]'
    with capture_logs() as logs:
        stream = start_stream(streams, fake.ws_url, inbox, api_key=SECRET, auth_failed_wait_s=0.3)
        items = inbox.wait_for(lambda items: [f.payload for f in frames(items)].count(failed) >= 2)
        stream.stop()

    assert statuses(items) == [FeedStatus(42_000, False, "auth_failed")]
    assert all(item.payload == failed for item in frames(items))
    waits = [entry for entry in logs if entry["event"] == "stream_reconnect_wait"]
    assert waits and all(entry["wait_s"] >= 0.3 for entry in waits)
    assert fake.subscriptions == []
    assert fake.auth_attempts >= 2
    assert stream.connected is False
    assert SECRET not in repr(logs) and SECRET not in repr(items)


def test_stream_waits_are_market_seconds_scaled_by_the_clock(fake: FakePolygon, streams: list) -> None:
    # A simulated day at 100x must not sit out 30 wall seconds (50 market minutes) after one refusal.
    inbox = Inbox()
    failed = '[{"ev":"status","status":"auth_failed","message":"authentication failed"}]'
    with capture_logs() as logs:
        stream = start_stream(
            streams, fake.ws_url, inbox, api_key=SECRET, auth_failed_wait_s=30.0, wait_scale=0.01
        )
        inbox.wait_for(lambda items: [f.payload for f in frames(items)].count(failed) >= 3)
        stream.stop()

    waits = [entry["wait_s"] for entry in logs if entry["event"] == "stream_reconnect_wait"]
    assert len(waits) >= 2 and all(0.3 <= wait <= 0.3 + TINY_BACKOFF.max_s for wait in waits)


def test_stream_reconnects_after_a_drop_resubscribes_and_backfills_the_gap(
    fake: FakePolygon, streams: list
) -> None:
    inbox = Inbox()
    calls: list[tuple[int, int]] = []
    backfilled: list[RestAnswer] = []
    rest = PolygonRest(fake.rest_url, KEY, clock_ms=fake.now_ms)

    def backfill(gap_from: int, gap_to: int) -> None:
        calls.append((gap_from, gap_to))
        inbox.put("backfill")
        # Bars arrive after their second ends, so the caller reaches back a little before the last frame.
        backfilled.extend(rest.aggs("IWM", 1, "second", str(gap_from - 5000), str(gap_to)))

    stream = start_stream(
        streams,
        fake.ws_url,
        inbox,
        clock_ms=fake.now_ms,
        backfill=backfill,
        backoff=Backoff(initial_s=0.1, max_s=0.1, factor=1.0),
        rng=MaxRng(),
        healthy_after_s=3600.0,
    )
    inbox.wait_for(lambda items: len(data_frames(items)) >= 5)
    fake.drop_connections()
    items = inbox.wait_for(
        lambda items: len(data_frames(items[items.index("backfill") :] if "backfill" in items else [])) >= 2
    )
    rest.close()

    down = next(i for i, item in enumerate(items) if isinstance(item, FeedStatus) and not item.connected)
    assert items[down].reason == "disconnected: connection lost"
    last_before = frames(items[:down])[-1]
    ((gap_from, gap_to),) = calls
    assert gap_from == last_before.t
    assert gap_to > gap_from
    after = items[down + 1 :]
    assert isinstance(after[0], Received) and "auth_success" in after[0].payload
    assert isinstance(after[1], FeedStatus) and after[1].reason == "auth_success"
    assert after[2] == "backfill"
    assert isinstance(after[3], Received) and after[3].payload.endswith('"subscribed to: A.IWM"}]')
    assert after[3].t >= gap_to
    assert fake.subscriptions == ["A.IWM,A.SPY", "A.IWM,A.SPY"]
    assert stream.reconnects == 1
    assert [answer.status for answer in backfilled] == [200]
    got = [bar["t"] for bar in backfilled[0].body["results"]]
    assert got == sorted(got)
    assert set(s for s in BAR_STARTS if gap_from - 5000 <= s <= gap_to - 1000) <= set(got)
    assert all(gap_from - 5000 <= s <= gap_to for s in got)


def test_stream_max_connections_waits_and_keeps_the_backoff_counter(fake: FakePolygon, streams: list) -> None:
    fake.max_connections_next()
    fake.max_connections_next()
    inbox = Inbox()
    with capture_logs() as logs:
        stream = start_stream(streams, fake.ws_url, inbox, clock_ms=fake.now_ms, max_connections_wait_s=0.3)
        items = inbox.wait_for(lambda items: reasons(items).count("auth_success") >= 3)
        stream.stop()

    assert reasons(items) == [
        "auth_success",
        "max_connections",
        "auth_success",
        "max_connections",
        "auth_success",
    ]
    payloads = [item.payload for item in frames(items)]
    assert sum('"status":"max_connections"' in payload for payload in payloads) == 2
    waits = [entry for entry in logs if entry["event"] == "stream_reconnect_wait"]
    # The auth_success in between did not reset the attempt counter: 1, then 2.
    assert [entry["attempt"] for entry in waits] == [1, 2]
    assert all(entry["wait_s"] >= 0.3 for entry in waits)
    assert fake.ws_connections == 3
    assert stream.reconnects == 2


def test_stream_passes_garbage_frames_through_unchanged(fake: FakePolygon, streams: list) -> None:
    garbage = ["not json at all", '{"ev":"A","sym":"IWM"}', '[{"ev":"A","sym":"IWM","s":"x"}]', "[1,2"]
    inbox = Inbox()
    stream = start_stream(streams, fake.ws_url, inbox, clock_ms=fake.now_ms)
    inbox.wait_for(lambda items: len(data_frames(items)) >= 2)
    fake.send_garbage(garbage)

    def garbage_then_data(items: list[object]) -> bool:
        payloads = [item.payload for item in frames(items)]
        return garbage[-1] in payloads and '"ev":"A","sym":"IWM","v"' in payloads[-1]

    items = inbox.wait_for(garbage_then_data)
    payloads = [item.payload for item in frames(items)]
    first = payloads.index(garbage[0])
    assert payloads[first : first + len(garbage)] == garbage
    assert reasons(items) == ["auth_success"]
    assert stream.connected is True
    decoder = FeedDecoder("IWM", "SPY")
    assert [decoder.ws(0, payload) for payload in garbage] == [[], [], [], []]
    assert decoder.counters.bad_frames == len(garbage)
    assert decoder.counters.bad_inputs() == len(garbage), "each garbage frame counts once in /health"
    good = '{"ev":"A","sym":"IWM","v":10,"av":10,"op":1,"vw":1,"o":1,"c":1,"h":1,"l":1,"a":1,"s":0,"e":1000}'
    decoder.ws(2000, f'[{good}, {{"ev":"A","sym":"IWM","s":"x"}}, {{"ev":"A","sym":"IWM"}}]')
    assert decoder.counters.bad_inputs() == len(garbage) + 2, "a kept frame's bad events count one by one"


def test_stream_reconnects_after_a_clean_close_once_the_server_is_back(streams: list) -> None:
    inbox = Inbox()
    first = FakePolygon(MARKET, api_key=KEY, start_ms=START_MS, speed=SPEED).start()
    port = urlsplit(first.ws_url).port
    try:
        start_stream(streams, first.ws_url, inbox, backoff=Backoff(initial_s=0.02, max_s=0.05))
        inbox.wait_for(lambda items: reasons(items) == ["auth_success"])
    finally:
        first.stop()
    inbox.wait_for(lambda items: len(reasons(items)) == 2)
    with FakePolygon(MARKET, api_key=KEY, start_ms=START_MS, speed=SPEED, ws_port=port) as second:
        items = inbox.wait_for(
            lambda items: len(reasons(items)) == 3 and bool(data_frames(after_last_status(items)))
        )
        assert second.subscriptions == ["A.IWM,A.SPY"]
    found = reasons(items)
    assert found[0] == "auth_success" and found[2] == "auth_success"
    assert found[1].startswith("disconnected: closed 1001")


def test_stream_stop_before_any_server_answers_returns_promptly() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inbox = Inbox()
    stream = PolygonStream(f"ws://127.0.0.1:{port}/stocks", KEY, ["IWM"], inbox.put, clock_ms=lambda: 1)
    stream.start()
    stream.stop(timeout=5.0)
    assert stream.connected is False
    assert statuses(list(inbox.queue.queue)) == []


AUTH_SUCCESS = '[{"ev":"status","status":"auth_success","message":"authenticated"}]'
GREETLESS_A = json.dumps([a_event("IWM", START_MS, 240.0)], separators=(",", ":"))
EARLY_A = json.dumps([a_event("IWM", START_MS - 1000, 239.0)], separators=(",", ":"))


class GreetlessServer:
    """A tiny WebSocket server that never says "connected": it sends `opening` on connect (nothing by
    default), answers the auth action with auth_success and a subscribe with one `A` frame."""

    def __init__(self, opening: tuple[str, ...] = ()) -> None:
        self.opening = opening
        self.actions: list[tuple[float, dict]] = []  # (seconds after the connection opened, message)
        self.connections = 0
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> GreetlessServer:
        self._thread.start()
        assert self._ready.wait(5.0), "the greetless server did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5.0)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._handler, "127.0.0.1", 0) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"ws://127.0.0.1:{port}/stocks"
            self._ready.set()
            await self._stop.wait()

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        opened = time.monotonic()
        for frame in self.opening:
            await ws.send(frame)
        with contextlib.suppress(ConnectionClosed):  # stop() aborts the client's socket
            async for message in ws:
                action = json.loads(message)
                self.actions.append((time.monotonic() - opened, action))
                if action.get("action") == "auth":
                    await ws.send(AUTH_SUCCESS)
                elif action.get("action") == "subscribe":
                    await ws.send(GREETLESS_A)


def test_stream_without_a_greeting_authenticates_subscribes_and_delivers(streams: list) -> None:
    # The greeting is awaited GREETING_WAIT_S market seconds: 0.1 wall seconds at wait_scale 0.05.
    inbox = Inbox()
    with GreetlessServer() as server, capture_logs() as logs:
        stream = start_stream(streams, server.url, inbox, wait_scale=0.05)
        items = inbox.wait_for(lambda items: len(data_frames(items)) >= 1)
        stream.stop()

    assert items == [
        Received(42_000, "ws", AUTH_SUCCESS),
        FeedStatus(42_000, True, "auth_success"),
        Received(42_000, "ws", GREETLESS_A),
    ]
    assert [action for _, action in server.actions] == [
        {"action": "auth", "params": KEY},
        {"action": "subscribe", "params": "A.IWM,A.SPY"},
    ]
    auth_after_s = server.actions[0][0]
    assert GREETING_WAIT_S * 0.05 * 0.9 <= auth_after_s < GREETING_WAIT_S, "scaled wait, then auth anyway"
    assert server.connections == 1 and stream.reconnects == 0
    assert [entry["waited_s"] for entry in logs if entry["event"] == "stream_no_greeting"] == [0.1]
    (bar,) = FeedDecoder("IWM", "SPY").ws(START_MS + 1500, items[2].payload)
    assert bar.start_ms == START_MS


def test_stream_keeps_a_data_frame_sent_before_the_auth(streams: list) -> None:
    # A server that streams before any greeting or auth: the frame is put, stamped, like any other.
    inbox = Inbox()
    with GreetlessServer(opening=(EARLY_A,)) as server:
        stream = start_stream(streams, server.url, inbox)
        items = inbox.wait_for(lambda items: len(data_frames(items)) >= 2)
        stream.stop()

    assert items == [
        Received(42_000, "ws", EARLY_A),
        Received(42_000, "ws", AUTH_SUCCESS),
        FeedStatus(42_000, True, "auth_success"),
        Received(42_000, "ws", GREETLESS_A),
    ]
    assert [action["action"] for _, action in server.actions] == ["auth", "subscribe"]
    assert server.actions[0][0] < GREETING_WAIT_S, "a first frame ends the wait for a greeting"
    decoder = FeedDecoder("IWM", "SPY")
    assert [
        bar.start_ms for frame in data_frames(items) for bar in decoder.ws(START_MS + 1500, frame.payload)
    ] == [
        START_MS - 1000,
        START_MS,
    ]


def test_stream_honours_max_connections_and_auth_success_sent_first(streams: list) -> None:
    max_connections = (
        '[{"ev":"status","status":"max_connections","message":"Maximum number of connections exceeded."}]'
    )
    inbox = Inbox()
    with GreetlessServer(opening=(max_connections,)) as refusing:
        stream = start_stream(streams, refusing.url, inbox, max_connections_wait_s=30.0)
        items = inbox.wait_for(lambda items: reasons(items) == ["max_connections"])
        stream.stop()
    assert items == [Received(42_000, "ws", max_connections), FeedStatus(42_000, False, "max_connections")]
    assert refusing.actions == [], "no auth on a socket the server has refused"

    inbox = Inbox()
    with GreetlessServer(opening=(AUTH_SUCCESS,)) as eager:
        stream = start_stream(streams, eager.url, inbox)
        items = inbox.wait_for(lambda items: len(data_frames(items)) >= 1)
        stream.stop()
    assert reasons(items) == ["auth_success"]
    assert [action["action"] for _, action in eager.actions] == ["subscribe"], "authenticated unasked"


def test_stream_needs_a_symbol() -> None:
    with pytest.raises(ValueError, match="at least one symbol"):
        PolygonStream("ws://127.0.0.1:1/stocks", KEY, [], lambda item: None, clock_ms=lambda: 0)


def rest_client(fake: FakePolygon, sleeps: list[float], **kwargs: object) -> PolygonRest:
    kwargs.setdefault("clock_ms", lambda: 7)
    return PolygonRest(fake.rest_url, str(kwargs.pop("api_key", KEY)), sleep=sleeps.append, **kwargs)  # type: ignore[arg-type]


def test_rest_chain_pages_follow_next_url_until_the_last_page(fake: FakePolygon) -> None:
    sleeps: list[float] = []
    with rest_client(fake, sleeps) as rest:
        answers = rest.chain_pages("IWM", SESSION_DATE, spot=240.4, strike_window=15.0, limit=10)

    first = "/v3/snapshot/options/IWM?expiration_date=2025-10-02&contract_type=call&limit=10"
    assert answers[0].path == f"{first}&strike_price.gte=225&strike_price.lte=256"
    assert [answer.status for answer in answers] == [200, 200, 200, 200]
    assert all(answer.path.startswith("/v3/snapshot/options/IWM?cursor=") for answer in answers[1:])
    assert [answer.path for answer in answers] == fake.rest_requests
    assert [len(answer.body["results"]) for answer in answers] == [10, 10, 10, 2]
    assert ["next_url" in answer.body for answer in answers] == [True, True, True, False]
    tickers = [result["details"]["ticker"] for answer in answers for result in answer.body["results"]]
    assert tickers == [f"O:IWM251002C{k * 1000:08d}" for k in range(225, 257)]
    assert all(answer.received_ms == 7 for answer in answers)
    assert sleeps == []


def test_rest_chain_without_spot_has_no_strike_filter(fake: FakePolygon) -> None:
    with rest_client(fake, []) as rest:
        answers = rest.chain_pages("IWM", SESSION_DATE, spot=None)
    assert [answer.path for answer in answers] == [
        "/v3/snapshot/options/IWM?expiration_date=2025-10-02&contract_type=call&limit=250"
    ]
    assert len(answers[0].body["results"]) == len(STRIKES)


def test_rest_paging_uses_only_the_path_and_query_of_next_url() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if b"cursor" in request.url.query:
            return httpx.Response(200, json={"status": "OK", "results": []})
        next_url = f"https://api.massive.com/v3/snapshot/options/IWM?cursor=abc&apiKey={SECRET}"
        return httpx.Response(200, json={"status": "OK", "results": [], "next_url": next_url})

    rest = PolygonRest("http://fake.test", SECRET, clock_ms=lambda: 1, transport=httpx.MockTransport(handler))
    answers = rest.chain_pages("IWM", SESSION_DATE, spot=None)
    assert [str(request.url) for request in seen] == [
        "http://fake.test/v3/snapshot/options/IWM?expiration_date=2025-10-02&contract_type=call&limit=250",
        "http://fake.test/v3/snapshot/options/IWM?cursor=abc",
    ]
    assert all(request.headers["Authorization"] == f"Bearer {SECRET}" for request in seen)
    assert [answer.path for answer in answers] == [
        "/v3/snapshot/options/IWM?expiration_date=2025-10-02&contract_type=call&limit=250",
        "/v3/snapshot/options/IWM?cursor=abc",
    ]


@pytest.mark.parametrize(
    "next_url",
    [
        "a:http://elsewhere.test/v3/snapshot/options/IWM?cursor=abc",
        "urn:https://elsewhere.test/v3/snapshot/options/IWM?cursor=abc",
        "mailto:http://elsewhere.test/v3/snapshot/options/IWM?cursor=abc",
        "//elsewhere.test/v3/snapshot/options/IWM?cursor=abc",
        "x:%2F%2Felsewhere.test/v3/snapshot/options/IWM?cursor=abc",
    ],
)
def test_a_next_url_whose_path_is_itself_a_url_is_not_followed_and_the_key_stays_home(next_url: str) -> None:
    """`a:http://elsewhere/x` has the path `http://elsewhere/x`: asked of the client as a path, httpx took
    it for an absolute URL and sent the key's Authorization header to that host (an audit's find)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "OK", "results": [], "next_url": next_url})

    rest = PolygonRest("http://fake.test", SECRET, clock_ms=lambda: 1, transport=httpx.MockTransport(handler))
    rest.chain_pages("IWM", SESSION_DATE, spot=None)
    assert seen and {request.url.host for request in seen} == {"fake.test"}


def test_rest_chain_paging_stops_at_a_failed_page(fake: FakePolygon) -> None:
    sleeps: list[float] = []
    with rest_client(fake, sleeps) as rest:
        fake.fail_rest(403, path_prefix="/v3/snapshot/options/IWM?cursor=")
        answers = rest.chain_pages("IWM", SESSION_DATE, spot=None, limit=10)
    assert [answer.status for answer in answers] == [200, 403]
    assert sleeps == []


def test_the_chain_keeps_its_own_failure_which_a_later_good_request_does_not_clear(fake: FakePolygon) -> None:
    """/health said "no option chain (REST: no answer)" while every poll failed at page 3 with a 500: the
    one `last_error` of every request was cleared by the next good page or contract snapshot."""
    sleeps: list[float] = []
    with rest_client(fake, sleeps, max_attempts=1) as rest:
        fake.fail_rest(500, path_prefix="/v3/snapshot/options/IWM?cursor=")
        failed = rest.chain_pages("IWM", SESSION_DATE, spot=None, limit=10)
        contract = rest.contract("IWM", "O:IWM251002C00240000")
        assert [failed[-1].status, contract.status] == [500, 200]
        assert rest.last_error is None and rest.chain_error is not None and "HTTP 500" in rest.chain_error
        fake.heal()
        assert rest.chain_pages("IWM", SESSION_DATE, spot=None, limit=10)[-1].status == 200
        assert rest.chain_error is None
        capped = rest.chain_pages("IWM", SESSION_DATE, spot=None, limit=1)
        assert len(capped) == MAX_CHAIN_PAGES and "paging stopped early (page_cap)" in str(rest.chain_error)


def test_rest_429_is_retried_after_retry_after(fake: FakePolygon) -> None:
    sleeps: list[float] = []
    fake.fail_rest(429, count=2, retry_after=7)
    with rest_client(fake, sleeps) as rest:
        answer = rest.contract("IWM", "O:IWM251002C00240000")
        assert rest.requests == 3
        assert rest.last_error is None
    assert answer.status == 200
    assert answer.path == "/v3/snapshot/options/IWM/O:IWM251002C00240000"
    assert answer.body["results"]["details"]["strike_price"] == 240
    assert sleeps == [7.0, 7.0]
    assert fake.rest_requests == [answer.path] * 3


def test_rest_retry_after_longer_than_the_cap_returns_the_429(fake: FakePolygon) -> None:
    sleeps: list[float] = []
    fake.fail_rest(429, retry_after=120)
    with rest_client(fake, sleeps, retry_cap_s=30.0) as rest:
        answer = rest.get("/v3/snapshot/options/IWM")
    assert answer.status == 429
    assert sleeps == []


def test_a_long_retry_after_holds_later_requests_of_its_route_until_it_ends(fake: FakePolygon) -> None:
    """The next poll 2 s later asked again (15 requests in 30 s against "wait 999999999 s"). Requests
    of that route are held for the Retry-After, at most RETRY_AFTER_HOLD_CAP_S, and answered 429 here
    meanwhile; every page of the chain is one route."""
    now = [1_000_000]
    fake.fail_rest(429, retry_after=999_999_999)
    with rest_client(fake, [], retry_cap_s=30.0, clock_ms=lambda: now[0]) as rest:
        assert rest.get("/v3/snapshot/options/IWM").status == 429
        now[0] += 60_000
        held = rest.get("/v3/snapshot/options/IWM?cursor=abc")
        assert held.status == 429 and "Retry-After" in held.body["error"] and "Retry-After" in rest.last_error
        assert len(fake.rest_requests) == 1
        fake.heal()
        now[0] += round(RETRY_AFTER_HOLD_CAP_S * 1000) - 60_000
        assert rest.get("/v3/snapshot/options/IWM").status == 200
    assert len(fake.rest_requests) == 2


def test_a_chain_polls_retry_after_does_not_hold_the_held_contracts_mark(fake: FakePolygon) -> None:
    """A 429 with Retry-After on the chain held every request for up to two minutes, the held contract's
    own snapshot (its mark, every 2 s) included: its stop and giveback fired a minute late, at a stale
    price. Another route goes on; the contract's own 429 then holds the contract's route alone."""
    now = [1_000_000]
    ticker = "O:IWM251002C00240000"
    fake.fail_rest(429, retry_after=3600, path_prefix="/v3/snapshot/options/IWM?")
    with rest_client(fake, [], retry_cap_s=30.0, clock_ms=lambda: now[0]) as rest:
        assert rest.get("/v3/snapshot/options/IWM?contract_type=call").status == 429
        now[0] += 2_000
        mark = rest.contract("IWM", ticker)
        assert mark.status == 200 and mark.body["results"]["details"]["strike_price"] == 240
        fake.fail_rest(429, retry_after=3600, path_prefix=f"/v3/snapshot/options/IWM/{ticker}")
        assert rest.contract("IWM", ticker).status == 429
        asked = len(fake.rest_requests)
        now[0] += 2_000
        assert rest.contract("IWM", ticker).status == 429
        assert rest.get("/v3/snapshot/options/IWM?contract_type=call").status == 429
        assert len(fake.rest_requests) == asked, "both routes are held: neither is asked again"
    assert fake.rest_requests[:2] == [
        "/v3/snapshot/options/IWM?contract_type=call",
        f"/v3/snapshot/options/IWM/{ticker}",
    ]


def test_a_retry_after_given_as_an_http_date_is_honoured(fake: FakePolygon) -> None:
    """An HTTP date was ignored: the call retried after 1, 2 and 4 s instead of the date asked."""
    now_ms = 1_759_413_600_000  # 2025-10-02 14:00:00 UTC
    sleeps: list[float] = []
    fake.fail_rest(429, count=1, retry_after="Thu, 02 Oct 2025 14:00:07 GMT")
    with rest_client(fake, sleeps, clock_ms=lambda: now_ms) as rest:
        assert rest.get("/v3/snapshot/options/IWM").status == 200
    assert sleeps == [7.0]


def test_a_route_failing_on_is_a_warning_once_and_a_line_when_it_recovers(fake: FakePolygon) -> None:
    """Each failed poll was a WARNING: thousands of lines in an hour's outage."""
    from structlog.testing import capture_logs

    fake.fail_rest(500)
    with rest_client(fake, [], max_attempts=1) as rest, capture_logs() as logs:
        for _ in range(5):
            rest.get("/v3/snapshot/options/IWM?limit=5")
        fake.heal()
        rest.get("/v3/snapshot/options/IWM?limit=5")
    failed = [e["log_level"] for e in logs if e["event"] == "rest_failed"]
    assert failed == ["warning"] + ["debug"] * 4
    assert [e["event"] for e in logs][-1] == "rest_recovered"


def test_rest_500_storm_backs_off_and_returns_the_last_answer(fake: FakePolygon) -> None:
    sleeps: list[float] = []
    fake.fail_rest(500)
    with rest_client(fake, sleeps, max_attempts=4, retry_base_s=1.0) as rest:
        answer = rest.get("/v3/snapshot/options/IWM?limit=5")
        assert rest.requests == 4
        assert rest.last_error == "HTTP 500: Internal Server Error"
    assert answer.status == 500
    assert answer.body["error"] == "Internal Server Error"
    assert sleeps == [1.0, 2.0, 4.0]


def test_rest_back_off_is_capped(fake: FakePolygon) -> None:
    sleeps: list[float] = []
    fake.fail_rest(503)
    with rest_client(fake, sleeps, max_attempts=5, retry_base_s=10.0, retry_cap_s=15.0) as rest:
        assert rest.get("/v3/snapshot/options/IWM").status == 503
    assert sleeps == [10.0, 15.0, 15.0, 15.0]


@pytest.mark.parametrize("status", [401, 403])
def test_rest_auth_and_plan_errors_are_returned_at_once(fake: FakePolygon, status: int) -> None:
    sleeps: list[float] = []
    fake.fail_rest(status)
    with rest_client(fake, sleeps) as rest:
        answer = rest.get("/v3/snapshot/options/IWM")
        assert rest.requests == 1
    assert answer.status == status
    assert sleeps == []


def test_rest_wrong_key_and_unknown_route_are_not_retried(fake: FakePolygon) -> None:
    sleeps: list[float] = []
    with rest_client(fake, sleeps, api_key="not-the-key") as rest:
        denied = rest.get("/v3/snapshot/options/IWM")
        assert rest.last_error == "HTTP 401: Unknown API Key"
    with rest_client(fake, sleeps) as rest:
        missing = rest.get("/v9/nothing/here")
    assert (denied.status, denied.body["error"]) == (401, "Unknown API Key")
    assert missing.status == 404
    assert sleeps == []
    assert len(fake.rest_requests) == 2


def test_rest_timeouts_are_retried(fake: FakePolygon) -> None:
    sleeps: list[float] = []
    fake.delay_rest(1.0, count=2)
    with rest_client(fake, sleeps, timeout_s=0.2) as rest:
        answer = rest.get("/v3/snapshot/options/IWM")
    assert answer.status == 200
    assert sleeps == [1.0, 2.0]
    assert len(fake.rest_requests) == 3


def test_rest_timeouts_to_the_end_give_a_599_answer(fake: FakePolygon) -> None:
    sleeps: list[float] = []
    fake.delay_rest(1.0)
    with rest_client(fake, sleeps, timeout_s=0.1, max_attempts=2) as rest:
        answer = rest.get("/v3/snapshot/options/IWM")
        assert rest.last_error is not None and rest.last_error.startswith("HTTP 599: timeout: ReadTimeout")
    assert answer.status == 599
    assert answer.body["error"].startswith("timeout: ReadTimeout")
    assert answer.received_ms == 7
    assert sleeps == [1.0]


def test_rest_network_errors_are_retried_then_answered_599() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps: list[float] = []
    with PolygonRest(f"http://127.0.0.1:{port}", KEY, clock_ms=lambda: 3, sleep=sleeps.append) as rest:
        answer = rest.get("/v3/snapshot/options/IWM")
    assert answer.status == 599
    assert answer.body["error"].startswith("network error: ConnectError")
    assert sleeps == [1.0, 2.0, 4.0]


def test_rest_aggs_path_and_paging() -> None:
    frm, to = START_MS, START_MS + 99_000
    later = FakePolygon(MARKET, api_key=KEY, start_ms=START_MS + 600_000, speed=SPEED)
    with later, rest_client(later, []) as rest:
        answers = rest.aggs("SPY", 1, "second", str(frm), str(to), limit=40)
    assert answers[0].path == f"/v2/aggs/ticker/SPY/range/1/second/{frm}/{to}?adjusted=true&sort=asc&limit=40"
    assert [answer.body["resultsCount"] for answer in answers] == [40, 40, 20]
    starts = [bar["t"] for answer in answers for bar in answer.body["results"]]
    assert starts == BAR_STARTS[:100]


def test_the_key_never_appears_in_paths_logs_or_errors() -> None:
    sleeps: list[float] = []
    with FakePolygon(MARKET, api_key=SECRET, start_ms=START_MS, speed=SPEED) as keyed, capture_logs() as logs:
        with PolygonRest(keyed.rest_url, SECRET, clock_ms=lambda: 1, sleep=sleeps.append) as rest:
            ok = rest.get(f"/v3/snapshot/options/IWM?apiKey={SECRET}&limit=5")
            keyed.fail_rest(500)
            failed = rest.get(f"/v3/snapshot/options/IWM?limit=5&apiKey={SECRET}")
            last_error = rest.last_error
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with PolygonRest(f"http://127.0.0.1:{port}", SECRET, clock_ms=lambda: 1, sleep=sleeps.append) as rest:
            unreachable = rest.get(f"/x?apiKey={SECRET}")
    assert ok.status == 200 and ok.path == "/v3/snapshot/options/IWM?limit=5"
    assert failed.status == 500 and failed.path == "/v3/snapshot/options/IWM?limit=5"
    assert unreachable.status == 599 and unreachable.path == "/x"
    assert keyed.rest_requests[0] == "/v3/snapshot/options/IWM?limit=5"
    evidence = repr((ok, failed, unreachable, last_error, logs, keyed.rest_requests))
    assert SECRET not in evidence
    assert any(entry["event"] == "rest_retry" for entry in logs)


def test_a_failing_backfill_is_logged_without_the_key_and_streaming_resumes(streams: list) -> None:
    inbox = Inbox()

    def backfill(gap_from: int, gap_to: int) -> None:
        inbox.put("backfill")
        raise RuntimeError(f"REST down, key {SECRET}")

    with FakePolygon(MARKET, api_key=SECRET, start_ms=START_MS, speed=SPEED) as fake, capture_logs() as logs:
        stream = start_stream(
            streams, fake.ws_url, inbox, api_key=SECRET, clock_ms=fake.now_ms, backfill=backfill
        )
        inbox.wait_for(lambda items: len(data_frames(items)) >= 2)
        fake.drop_connections()
        inbox.wait_for(
            lambda items: "backfill" in items and bool(data_frames(items[items.index("backfill") :]))
        )
        stream.stop()
        assert fake.subscriptions == ["A.IWM,A.SPY", "A.IWM,A.SPY"]
    failures = [entry for entry in logs if entry["event"] == "stream_backfill_failed"]
    assert [entry["error"] for entry in failures] == ["RuntimeError: REST down, key ***"]
    assert failures[0]["at"].startswith("test_polygon_live.py:") and failures[0]["at"].endswith(
        " in backfill"
    )
    assert SECRET not in repr(logs)


class EchoingCloseServer(GreetlessServer):
    """Closes the socket at the auth with a reason that echoes the key (a proxy's, a hostile fake's)."""

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                action = json.loads(message)
                self.actions.append((0.0, action))
                await ws.close(1008, f"policy: key {action.get('params')} refused")


def test_a_close_reason_that_echoes_the_key_is_redacted_before_it_is_kept_or_reported(streams: list) -> None:
    """The reason went into `last_error`, and from there into /health, the pulse log and a FEED alert."""
    inbox = Inbox()
    with EchoingCloseServer() as server, capture_logs() as logs:
        stream = start_stream(streams, server.url, inbox, wait_scale=0.05)
        deadline = time.monotonic() + WAIT_S
        while "closed 1008" not in (stream.last_error or "") and time.monotonic() < deadline:
            time.sleep(0.01)
        kept = stream.last_error or ""
        stream.stop()
    assert kept == "closed 1008 policy: key *** refused"
    said = [kept, *reasons(inbox.items), *(json.dumps(entry) for entry in logs)]
    assert server.actions and not any(KEY in text for text in said)


def test_a_slow_backfill_does_not_hold_the_reconnected_stream_unsubscribed(
    fake: FakePolygon, streams: list
) -> None:
    """A trickling aggregates endpoint held the socket unsubscribed for minutes after every reconnect."""
    inbox = Inbox()
    release = threading.Event()

    def backfill(_gap_from: int, _gap_to: int) -> None:
        inbox.put("backfill")
        release.wait(10.0)  # a REST backfill that takes its time

    start_stream(
        streams,
        fake.ws_url,
        inbox,
        clock_ms=fake.now_ms,
        backfill=backfill,
        backfill_wait_s=0.3,
        backoff=Backoff(initial_s=0.1, max_s=0.1, factor=1.0),
        rng=MaxRng(),
        healthy_after_s=3600.0,
    )
    try:
        inbox.wait_for(lambda items: len(data_frames(items)) >= 3)
        fake.drop_connections()
        items = inbox.wait_for(
            lambda items: "backfill" in items and len(data_frames(items[items.index("backfill") :])) >= 2
        )
        assert not release.is_set(), "live frames came while the backfill was still under way"
    finally:
        release.set()
    assert fake.subscriptions == ["A.IWM,A.SPY", "A.IWM,A.SPY"], "subscribed while the backfill still ran"
    assert items.index("backfill") < len(items) - 2


class BenchmarkOnlyServer(GreetlessServer):
    """Authenticates eagerly, then sends SPY bars every 20 ms and never an IWM one."""

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        spy_only = '[{"ev": "A", "sym": "SPY", "s": 1, "e": 2, "c": 570.0}]'
        with contextlib.suppress(ConnectionClosed):
            await ws.send(AUTH_SUCCESS)
            while True:
                await ws.send(spy_only)
                await asyncio.sleep(0.02)


def test_a_socket_with_frames_but_none_of_the_symbol_required_is_redialled(streams: list) -> None:
    """Status frames, or the benchmark alone, kept the silence timer at bay: the socket was never
    redialled while the underlying's bars were missing."""
    inbox = Inbox()
    with BenchmarkOnlyServer() as server, capture_logs() as logs:
        stream = start_stream(
            streams,
            server.url,
            inbox,
            required_sym="IWM",
            silence_s=lambda: 0.3,
            backoff=Backoff(initial_s=0.05, max_s=0.05, factor=1.0),
            rng=MaxRng(),
        )
        inbox.wait_for(lambda items: stream.silent_reconnects >= 2 and server.connections >= 2)
        stream.stop()
    starved = [e for e in logs if e["event"] == "stream_starved"]
    assert len(starved) >= 2 and not [e for e in logs if e["event"] == "stream_silent"]
    assert all(e["without_s"] > 0.3 for e in starved)


def test_the_required_symbol_is_recognised_in_any_json_spelling_of_a_frame() -> None:
    from polygon_client import _sym_patterns

    text, raw = _sym_patterns("IWM")
    for frame in ('[{"ev":"A","sym":"IWM"}]', '[{"ev": "A", "sym" : "IWM"}]', '[{"sym":\n"IWM"}]'):
        assert text.search(frame) and raw.search(frame.encode())
    for frame in ('[{"ev":"A","sym":"SPY"}]', '[{"sym":"IWM1"}]', '[{"message":"subscribed to: A.IWM"}]'):
        assert not text.search(frame) and not raw.search(frame.encode())


def test_a_socket_quiet_since_before_the_open_is_redialled_once_the_session_is_silent_that_long(
    streams: list,
) -> None:
    """Before the open there is no silence limit; the wait for the next frame used none even after the
    open, so a socket that went quiet at 09:25 was never redialled while the session had no bars."""
    in_session = threading.Event()
    inbox = Inbox()
    with GreetlessServer() as server:  # one bar after the subscribe, then nothing but pings
        stream = start_stream(
            streams,
            server.url,
            inbox,
            silence_s=lambda: 0.3 if in_session.is_set() else None,
            backoff=Backoff(initial_s=0.05, max_s=0.05, factor=1.0),
            rng=MaxRng(),
        )
        inbox.wait_for(lambda items: len(data_frames(items)) >= 1)
        time.sleep(0.5)
        quiet_before_the_open = stream.silent_reconnects
        in_session.set()  # the open: the quiet socket owes its silence from now on
        inbox.wait_for(lambda items: stream.silent_reconnects >= 1 and server.connections >= 2)
        stream.stop()
    assert quiet_before_the_open == 0


def test_frames_buffered_while_the_process_was_held_are_no_starvation() -> None:
    """After a stall of this process (a loaded machine) the frames read at once are old, and a first one
    without the underlying counted the whole stall as starvation: a redial, and backfilled bars too old to
    trade. Five frames in a row must lack it."""
    from polygon_client import STARVED_FRAMES, StreamSilent

    stream = PolygonStream("ws://127.0.0.1:9", KEY, ["IWM", "SPY"], lambda _item: None,
                           clock_ms=lambda: 42_000, silence_s=lambda: 0.3, required_sym="IWM")  # fmt: skip
    spy, iwm = '[{"ev":"A","sym":"SPY"}]', '[{"ev":"A","sym":"IWM"}]'
    held_since = time.monotonic() - 5.0  # the last IWM bar came before a 5 s stall
    wanted = (held_since, 0)
    for frame in (spy, spy, iwm):  # the buffered second: SPY's bars first, then IWM's
        wanted = stream._check_wanted(frame, *wanted)
    assert wanted[1] == 0 and wanted[0] > held_since
    wanted = (held_since, 0)
    with pytest.raises(StreamSilent):
        for _ in range(STARVED_FRAMES):
            wanted = stream._check_wanted(spy, *wanted)


def start_options_stream(streams: list, fake: FakePolygon, inbox: Inbox, topic: str) -> PolygonStream:
    """An options-cluster stream of one topic, retrying a refused key after 0.2 s."""
    stream = PolygonStream(
        fake.options_ws_url, KEY, (), inbox.put, clock_ms=lambda: 42_000, topics=(topic,),
        backoff=TINY_BACKOFF, rng=random.Random(7), auth_failed_wait_s=0.2,
    )  # fmt: skip
    streams.append(stream)
    stream.start()
    return stream


def test_a_refused_key_is_named_in_last_error_until_an_auth_succeeds(
    fake: FakePolygon, streams: list
) -> None:
    """auth_failed closed the socket without an error, so /health had only "stream not connected" to say."""
    fake.options_entitled(False)
    inbox = Inbox()
    stream = start_options_stream(streams, fake, inbox, "Q.O:IWM251002C00240000")
    inbox.wait_for(lambda items: reasons(items) == ["auth_failed"])
    refused = (stream.refused, stream.last_error)
    fake.options_entitled(True)
    inbox.wait_for(lambda items: "auth_success" in reasons(items))
    assert refused == ("auth_failed", "stream refused the key (auth_failed)")
    assert stream.refused is None
    assert KEY not in repr(refused)


def test_max_connections_is_named_in_last_error(fake: FakePolygon, streams: list) -> None:
    fake.max_connections_next()
    inbox = Inbox()
    stream = start_stream(streams, fake.ws_url, inbox, clock_ms=fake.now_ms, max_connections_wait_s=30.0)
    inbox.wait_for(lambda items: "max_connections" in reasons(items))
    assert stream.last_error == "max_connections: another connection uses this key"
    assert stream.refused is None, "another connection on the key is no refusal of the key"


def test_each_cluster_names_itself_in_its_log_lines(fake: FakePolygon, streams: list) -> None:
    """The stocks and options streams logged identical stream_down lines: which cluster was down?"""
    fake.options_entitled(False)
    inbox = Inbox()
    with capture_logs() as logs:
        start_stream(streams, fake.ws_url, inbox, api_key=SECRET, auth_failed_wait_s=0.2)
        start_options_stream(streams, fake, inbox, "Q.O:IWM")
        inbox.wait_for(lambda items: reasons(items).count("auth_failed") >= 2)
        for stream in streams:
            stream.stop()
    failed = {entry.get("stream") for entry in logs if entry["event"] == "stream_auth_failed"}
    waits = {entry.get("stream") for entry in logs if entry["event"] == "stream_reconnect_wait"}
    assert failed == {"stocks", "options"}
    assert waits <= {"stocks", "options"} and None not in waits
