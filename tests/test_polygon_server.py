"""The fake Polygon server: WebSocket protocol, REST routes, auth, paging, faults and market sources."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from events import ChainSnapshot
from feed import FeedDecoder
from polygon_client import PolygonRest, parse_ws_frame
from sim.market import SyntheticMarket, demo_script
from sim.polygon_server import FakePolygon, RecordedMarket, SyntheticSource
from tape import TapeWriter

ROOT = Path(__file__).resolve().parents[1]
START_MS = 1_759_411_800_000  # 2025-10-02 09:30 New York
KEY = "testkey"
SPEED = 200.0
RECV_S = 5.0
CHAIN_PATH = "/v3/snapshot/options/IWM"
CONNECTED = '[{"ev":"status","status":"connected","message":"Connected Successfully"}]'
AUTH_SUCCESS = '[{"ev":"status","status":"auth_success","message":"authenticated"}]'
AUTH_FAILED = '[{"ev":"status","status":"auth_failed","message":"authentication failed"}]'


class ManualWall:
    """A wall clock that moves only when told, so REST answers depend on an exact simulated now."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


def a_event(sym: str, start_ms: int, close: float) -> dict:
    return {"ev": "A", "sym": sym, "v": 10, "vw": close, "o": close, "c": close, "h": close, "l": close,
            "a": close, "av": 100, "z": 1, "s": start_ms, "e": start_ms + 1000}  # fmt: skip


def option(strike: float, *, expiry: str = "2025-10-02", kind: str = "call", bid: float = 1.0) -> dict:
    letter = "C" if kind == "call" else "P"
    ticker = f"O:IWM{expiry[2:4]}{expiry[5:7]}{expiry[8:10]}{letter}{round(strike * 1000):08d}"
    details = {"contract_type": kind, "expiration_date": expiry, "strike_price": strike, "ticker": ticker}
    return {"details": details, "last_quote": {"bid": bid, "ask": bid + 0.1}}


DAY_BEFORE_MS = START_MS - 86_400_000
FRAMES = [
    (
        START_MS + i * 1000 + 200,
        [a_event("IWM", START_MS + i * 1000, 240.0), a_event("SPY", START_MS + i * 1000, 600.0)],
    )
    for i in range(1200)
]
FIRST_CHAIN = [option(k) for k in range(230, 251)] + [
    option(240, kind="put"),
    option(240, expiry="2025-10-03"),
]
SECOND_CHAIN = [option(k, bid=2.0) for k in range(230, 251)]
MARKET = RecordedMarket(
    FRAMES,
    chains=[(START_MS, FIRST_CHAIN), (START_MS + 60_000, SECOND_CHAIN)],
    contracts=[(START_MS + 30_000, option(245, bid=9.0))],
    minute_bars=[("IWM", {"t": DAY_BEFORE_MS + m * 60_000, "v": 500 + m, "o": 1, "h": 1, "l": 1, "c": 1})
                 for m in range(390)],
)  # fmt: skip


@pytest.fixture(scope="module")
def demo_market() -> SyntheticMarket:
    return SyntheticMarket(demo_script())


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    """One client for the module: building an SSL context for each request is slow."""
    with httpx.Client(timeout=5.0) as client:
        yield client


@pytest.fixture
def wall() -> ManualWall:
    return ManualWall()


@pytest.fixture
def fake(wall: ManualWall) -> Iterator[FakePolygon]:
    """A fake whose simulated clock stands at START_MS + 10 s until the test moves `wall`."""
    with FakePolygon(MARKET, api_key=KEY, start_ms=START_MS + 10_000, speed=1.0, wall=wall) as server:
        yield server


@pytest.fixture
def live() -> Iterator[FakePolygon]:
    """A fake on the real clock at high speed, for streaming."""
    with FakePolygon(
        MARKET, api_key=KEY, start_ms=START_MS + 100_000, speed=SPEED, auth_timeout_s=0.2
    ) as server:
        yield server


def get(http: httpx.Client, fake: FakePolygon, path: str, *, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return http.get(fake.rest_url + path, headers=headers)


def follow(http: httpx.Client, fake: FakePolygon, path: str) -> list[dict]:
    bodies = []
    next_path: str | None = path
    while next_path is not None and len(bodies) < 50:
        response = get(http, fake, next_path)
        assert response.status_code == 200, response.text
        bodies.append(response.json())
        next_url = bodies[-1].get("next_url")
        next_path = next_url[len(fake.rest_url) :] if next_url else None
    return bodies


def tickers(bodies: list[dict]) -> list[str]:
    return [result["details"]["ticker"] for body in bodies for result in body.get("results", [])]


def test_rest_requires_the_key_by_header_or_query(http: httpx.Client, fake: FakePolygon) -> None:
    missing = get(http, fake, CHAIN_PATH, key=None)
    wrong = get(http, fake, CHAIN_PATH, key="nope")
    by_query = get(http, fake, f"{CHAIN_PATH}?apiKey={KEY}&limit=1", key=None)
    by_header = get(http, fake, f"{CHAIN_PATH}?limit=1")
    assert (missing.status_code, missing.json()["error"]) == (401, "API Key was not provided")
    assert (wrong.status_code, wrong.json()["error"]) == (401, "Unknown API Key")
    assert wrong.json()["status"] == "ERROR"
    assert (by_query.status_code, by_header.status_code) == (200, 200)
    assert fake.rest_requests == [CHAIN_PATH, CHAIN_PATH, f"{CHAIN_PATH}?limit=1", f"{CHAIN_PATH}?limit=1"]


def test_rest_unknown_routes_are_404(http: httpx.Client, fake: FakePolygon) -> None:
    for path in ("/v3/snapshot/options/SPY", "/v2/aggs/ticker/IWM/range/5/minute/1/2", "/v1/nothing"):
        response = get(http, fake, path)
        assert (response.status_code, response.json()["status"]) == (404, "NOT_FOUND"), path


def test_chain_filters_by_expiry_type_and_strike_and_sorts_by_ticker(
    http: httpx.Client, fake: FakePolygon
) -> None:
    query = (
        "expiration_date=2025-10-02&contract_type=call&limit=250&strike_price.gte=235&strike_price.lte=238.5"
    )
    body = get(http, fake, f"{CHAIN_PATH}?{query}").json()
    assert tickers([body]) == [f"O:IWM251002C00{k}000" for k in (235, 236, 237, 238)]
    assert "next_url" not in body
    everything = get(http, fake, f"{CHAIN_PATH}?limit=250").json()
    assert len(everything["results"]) == len(FIRST_CHAIN)
    puts = get(http, fake, f"{CHAIN_PATH}?contract_type=put").json()
    assert tickers([puts]) == ["O:IWM251002P00240000"]
    other_day = get(http, fake, f"{CHAIN_PATH}?expiration_date=2025-10-03").json()
    assert tickers([other_day]) == ["O:IWM251003C00240000"]
    assert get(
        http, fake, f"{CHAIN_PATH}?strike_price=240&contract_type=call&expiration_date=2025-10-02"
    ).json()["results"] == [option(240)]


def test_chain_default_limit_is_10_and_bad_params_are_400(http: httpx.Client, fake: FakePolygon) -> None:
    assert len(get(http, fake, CHAIN_PATH).json()["results"]) == 10
    assert (
        get(http, fake, f"{CHAIN_PATH}?limit=9999").json()["results"]
        == get(http, fake, f"{CHAIN_PATH}?limit=250").json()["results"]
    )
    for query in ("limit=0", "limit=x", "strike_price.gte=abc", "cursor=garbage"):
        response = get(http, fake, f"{CHAIN_PATH}?{query}")
        assert (response.status_code, response.json()["status"]) == (400, "ERROR"), query


def test_chain_pages_through_next_url_at_one_instant(
    http: httpx.Client, fake: FakePolygon, wall: ManualWall
) -> None:
    first = get(http, fake, f"{CHAIN_PATH}?expiration_date=2025-10-02&contract_type=call&limit=8").json()
    assert first["next_url"].startswith(f"{fake.rest_url}{CHAIN_PATH}?cursor=")
    assert "expiration_date" not in first["next_url"]
    wall.value += 120  # the second chain is now out; the pages keep the first request's instant
    rest = follow(http, fake, first["next_url"][len(fake.rest_url) :])
    pages = [first, *rest]
    assert [len(page["results"]) for page in pages] == [8, 8, 5]
    assert tickers(pages) == [f"O:IWM251002C00{k}000" for k in range(230, 251)]
    assert {result["last_quote"]["bid"] for page in pages for result in page["results"]} == {1.0}
    fresh = get(http, fake, f"{CHAIN_PATH}?expiration_date=2025-10-02&limit=250").json()
    assert {result["last_quote"]["bid"] for result in fresh["results"]} == {2.0}


def test_chain_before_any_recorded_chain_is_empty(http: httpx.Client, wall: ManualWall) -> None:
    with FakePolygon(MARKET, api_key=KEY, start_ms=START_MS - 1, wall=wall) as early:
        assert get(http, early, CHAIN_PATH).json()["results"] == []


def test_contract_snapshot_prefers_a_recorded_snapshot_then_the_chain(
    http: httpx.Client, fake: FakePolygon, wall: ManualWall
) -> None:
    path = f"{CHAIN_PATH}/O:IWM251002C00245000"
    assert get(http, fake, path).json()["results"]["last_quote"]["bid"] == 1.0
    wall.value += 25  # now START + 35 s: the recorded single-contract snapshot of START + 30 s applies
    body = get(http, fake, path).json()
    assert (body["status"], body["results"]["last_quote"]["bid"]) == ("OK", 9.0)
    missing = get(http, fake, f"{CHAIN_PATH}/O:IWM251002C00999000")
    assert missing.status_code == 404


def test_second_aggs_only_hold_bars_whose_second_has_ended(http: httpx.Client, fake: FakePolygon) -> None:
    # The simulated now is START + 10 s, so bars starting at START .. START + 9 s are complete.
    body = get(http, fake, f"/v2/aggs/ticker/IWM/range/1/second/{START_MS}/{START_MS + 60_000}").json()
    assert [bar["t"] for bar in body["results"]] == [START_MS + i * 1000 for i in range(10)]
    assert body["results"][0] == {
        "v": 10,
        "vw": 240.0,
        "o": 240.0,
        "c": 240.0,
        "h": 240.0,
        "l": 240.0,
        "t": START_MS,
    }
    assert (body["ticker"], body["resultsCount"], body["status"], body["adjusted"]) == ("IWM", 10, "OK", True)
    by_day = get(
        http, fake, "/v2/aggs/ticker/SPY/range/1/second/2025-10-02/2025-10-02?sort=desc&limit=3"
    ).json()
    assert [bar["t"] for bar in by_day["results"]] == [START_MS + i * 1000 for i in (9, 8, 7)]
    rest = follow(http, fake, by_day["next_url"][len(fake.rest_url) :])
    assert [bar["t"] for body in rest for bar in body["results"]] == [
        START_MS + i * 1000 for i in range(6, -1, -1)
    ]


def test_aggs_without_bars_leave_results_out_and_bad_dates_are_400(
    http: httpx.Client, fake: FakePolygon
) -> None:
    empty = get(http, fake, "/v2/aggs/ticker/IWM/range/1/second/2025-10-01/2025-10-01").json()
    assert "results" not in empty and empty["resultsCount"] == 0
    assert get(http, fake, "/v2/aggs/ticker/IWM/range/1/second/2025-13-01/2025-10-02").status_code == 400


def test_minute_aggs_of_a_past_day_by_date(http: httpx.Client, fake: FakePolygon) -> None:
    body = get(http, fake, "/v2/aggs/ticker/IWM/range/1/minute/2025-10-01/2025-10-01?limit=50000").json()
    assert [bar["v"] for bar in body["results"]] == [500 + m for m in range(390)]
    assert (
        get(http, fake, "/v2/aggs/ticker/SPY/range/1/minute/2025-10-01/2025-10-01").json()["resultsCount"]
        == 0
    )


def test_rest_faults_by_count_prefix_and_time(
    http: httpx.Client, fake: FakePolygon, wall: ManualWall
) -> None:
    fake.fail_rest(429, count=2, retry_after=3, path_prefix="/v2/")
    assert get(http, fake, CHAIN_PATH).status_code == 200
    limited = get(http, fake, "/v2/aggs/ticker/IWM/range/1/second/1/2")
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "3")
    assert limited.json()["status"] == "ERROR"
    assert get(http, fake, "/v2/aggs/ticker/IWM/range/1/second/1/2").status_code == 429
    assert get(http, fake, "/v2/aggs/ticker/IWM/range/1/second/1/2").status_code == 200
    fake.fail_rest(500, seconds=5.0)
    assert get(http, fake, CHAIN_PATH).status_code == 500
    wall.value += 5.0
    assert get(http, fake, CHAIN_PATH).status_code == 200
    fake.fail_rest(403)
    forbidden = get(http, fake, CHAIN_PATH)
    assert (forbidden.status_code, forbidden.json()["status"]) == (403, "NOT_AUTHORIZED")
    fake.heal()
    assert get(http, fake, CHAIN_PATH).status_code == 200


def test_the_demo_day_through_the_real_rest_client(demo_market: SyntheticMarket) -> None:
    market = demo_market
    at_ms = market.session_open_ms + 3600_000
    with (
        FakePolygon(SyntheticSource(market), api_key=KEY, start_ms=at_ms, wall=ManualWall()) as fake,
        PolygonRest(fake.rest_url, KEY, clock_ms=fake.now_ms) as rest,
    ):
        spot = market.spot_at(at_ms)
        answers = rest.chain_pages("IWM", datetime.date(2025, 10, 2), spot=spot, limit=10)
        ticker = answers[0].body["results"][0]["details"]["ticker"]
        contract = rest.contract("IWM", ticker)
        seconds = rest.aggs("IWM", 1, "second", str(at_ms - 60_000), str(at_ms))
        minutes = rest.aggs("IWM", 1, "minute", "2025-10-01", "2025-10-01")
    expected = market.chain_pages(at_ms, strike_gte=int(spot - 15), strike_lte=int(spot + 15) + 1)
    assert all(answer.status == 200 for answer in [*answers, contract, *seconds, *minutes])
    assert len(answers) > 1
    assert sorted(tickers([a.body for a in answers])) == sorted(tickers(expected))
    decoder = FeedDecoder("IWM", "SPY")
    events = [
        event
        for answer in answers
        for event in decoder.rest(answer.received_ms, answer.path, 200, answer.body)
    ]
    assert len(events) == 1 and isinstance(events[0], ChainSnapshot)
    assert len(events[0].quotes) == len(tickers(expected))
    assert contract.body["results"] == market.contract_snapshot(ticker, at_ms)["results"]
    assert seconds[0].body["results"] == market.aggs("IWM", at_ms - 60_000, at_ms - 1000)["results"]
    assert minutes[0].body["results"] == market.minute_aggs("IWM", datetime.date(2025, 10, 1))["results"]


def recv_json(ws: ClientConnection) -> object:
    return json.loads(ws.recv(timeout=RECV_S))


def open_ws(fake: FakePolygon, key: str = KEY) -> ClientConnection:
    # Entered at once (the caller's `with` closes it): websockets 15+ wants the context before any use.
    ws = connect(fake.ws_url, open_timeout=RECV_S).__enter__()
    assert ws.recv(timeout=RECV_S) == CONNECTED
    ws.send(json.dumps({"action": "auth", "params": key}))
    return ws


def subscribe(ws: ClientConnection, params: str) -> list[object]:
    ws.send(json.dumps({"action": "subscribe", "params": params}))
    return [recv_json(ws) for _ in params.split(",")]


def test_ws_wrong_key_gets_auth_failed_then_close(live: FakePolygon) -> None:
    with open_ws(live, key="wrong") as ws:
        assert ws.recv(timeout=RECV_S) == AUTH_FAILED
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=RECV_S)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert (live.auth_attempts, live.ws_connections, live.subscriptions) == (1, 1, [])


def test_ws_without_auth_times_out(live: FakePolygon) -> None:
    with connect(live.ws_url, open_timeout=RECV_S) as ws:
        assert ws.recv(timeout=RECV_S) == CONNECTED
        assert recv_json(ws) == [
            {"ev": "status", "status": "auth_timeout", "message": "No authentication request received."}
        ]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=RECV_S)


def test_ws_other_paths_are_refused(live: FakePolygon) -> None:
    for path in ("/crypto", "/", "/options/x", "/stocksoptions"):
        with pytest.raises(InvalidStatus) as refused:
            connect(live.ws_url.replace("/stocks", path), open_timeout=RECV_S)
        assert refused.value.response.status_code == 404, path
    assert (live.ws_connections, live.options_connections) == (0, 0)


def test_ws_streams_subscribed_symbols_from_now_on(wall: ManualWall) -> None:
    def status(message: str) -> list[dict]:
        return [{"ev": "status", "status": "success", "message": message}]

    fake = FakePolygon(MARKET, api_key=KEY, start_ms=START_MS + 100_000, speed=1000.0, wall=wall)
    with fake, open_ws(fake) as ws:
        assert ws.recv(timeout=RECV_S) == AUTH_SUCCESS
        assert subscribe(ws, "A.IWM") == [status("subscribed to: A.IWM")]
        wall.value += 0.0025  # 2.5 simulated seconds: the frames of 100.2 s, 101.2 s and 102.2 s are due
        first = [recv_json(ws) for _ in range(3)]
        ws.send(json.dumps({"action": "subscribe", "params": "A.SPY"}))
        ws.send(json.dumps({"action": "unsubscribe", "params": "A.IWM"}))
        statuses = [recv_json(ws) for _ in range(2)]
        wall.value += 0.002
        then = [recv_json(ws) for _ in range(2)]
    assert first == [[a_event("IWM", START_MS + s * 1000, 240.0)] for s in (100, 101, 102)]
    assert statuses == [status("subscribed to: A.SPY"), status("unsubscribed to: A.IWM")]
    assert then == [[a_event("SPY", START_MS + s * 1000, 600.0)] for s in (103, 104)]
    assert fake.subscriptions == ["A.IWM", "A.SPY"]


def test_ws_garbage_goes_out_verbatim_before_data(live: FakePolygon) -> None:
    with open_ws(live) as ws:
        ws.recv(timeout=RECV_S)
        subscribe(ws, "A.IWM,A.SPY")
        recv_json(ws)
        live.send_garbage(["{not json", "[1,2"])
        texts = [ws.recv(timeout=RECV_S) for _ in range(3)]
        # Data frames sent before the garbage may still be queued on the client: read on to it.
        for _ in range(2000):
            if texts[-3] == "{not json":
                break
            texts.append(ws.recv(timeout=RECV_S))
    assert texts[-3:-1] == ["{not json", "[1,2"]
    assert json.loads(texts[-1])[0]["ev"] == "A"
    assert all(json.loads(text)[0]["ev"] == "A" for text in texts[:-3])


def test_ws_drop_connections_closes_abnormally(live: FakePolygon) -> None:
    with open_ws(live) as ws:
        ws.recv(timeout=RECV_S)
        subscribe(ws, "A.IWM")
        recv_json(ws)
        live.drop_connections()
        with pytest.raises(ConnectionClosedError) as dropped:
            for _ in range(1000):
                ws.recv(timeout=RECV_S)
    assert dropped.value.rcvd is None


def test_ws_max_connections_after_subscribe_then_close(live: FakePolygon) -> None:
    live.max_connections_next()
    with open_ws(live) as ws:
        assert ws.recv(timeout=RECV_S) == AUTH_SUCCESS
        assert subscribe(ws, "A.IWM,A.SPY") == [
            [{"ev": "status", "status": "success", "message": "subscribed to: A.IWM"}],
            [{"ev": "status", "status": "success", "message": "subscribed to: A.SPY"}],
        ]
        refusal = recv_json(ws)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=RECV_S)
    assert isinstance(refusal, list) and refusal[0]["status"] == "max_connections"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    with open_ws(live) as again:  # only the next connection was refused
        again.recv(timeout=RECV_S)
        subscribe(again, "A.IWM")
        assert recv_json(again)[0]["ev"] == "A"
    assert live.ws_connections == 2


def test_ws_serves_the_demo_day_frames_unchanged(demo_market: SyntheticMarket) -> None:
    market = demo_market
    first_two = []
    for item in market.ws_frames():
        first_two.append(item)
        if len(first_two) == 2:
            break
    wall = ManualWall()
    source = SyntheticSource(market)
    fake = FakePolygon(source, api_key=KEY, start_ms=market.session_open_ms - 2000, speed=1000.0, wall=wall)
    with fake, open_ws(fake) as ws:
        ws.recv(timeout=RECV_S)
        subscribe(ws, "A.IWM,A.SPY")
        wall.value += 0.005  # subscribed while the clock stood still; now let 5 simulated seconds pass
        got = [recv_json(ws) for _ in range(2)]
    assert got == [frame for _, frame in first_two]


def write_tape(path: Path) -> None:
    with TapeWriter(path, underlying="IWM", benchmark="SPY", start_ms=START_MS) as tape:
        tape.write_ws(START_MS + 1200, json.dumps([a_event("IWM", START_MS, 240.0)]))
        tape.write_ws(START_MS + 1300, "{garbage")
        tape.write_rest(
            START_MS + 1500, f"{CHAIN_PATH}?limit=2", 200, {"results": FIRST_CHAIN[:2], "next_url": "x"}
        )
        tape.write_rest(START_MS + 1600, f"{CHAIN_PATH}?cursor=x", 200, {"results": FIRST_CHAIN[2:3]})
        tape.write_ws(START_MS + 2200, [a_event("IWM", START_MS + 1000, 241.0)])
        tape.write_rest(
            START_MS + 3000, f"{CHAIN_PATH}?limit=2", 200, {"results": SECOND_CHAIN[:2], "next_url": "x"}
        )
        tape.write_rest(START_MS + 3100, f"{CHAIN_PATH}?cursor=x", 500, {"error": "boom"})
        tape.write_rest(
            START_MS + 3200, f"{CHAIN_PATH}/O:IWM251002C00230000", 200, {"results": option(230, bid=5.0)}
        )
        minute = {"t": START_MS - 86_400_000, "v": 7, "o": 1, "h": 1, "l": 1, "c": 1}
        tape.write_rest(
            START_MS + 3300,
            "/v2/aggs/ticker/IWM/range/1/minute/2025-10-01/2025-10-01",
            200,
            {"results": [minute]},
        )


def test_recorded_market_from_a_tape(tmp_path: Path) -> None:
    path = tmp_path / "2025-10-02.jsonl.gz"
    write_tape(path)
    recorded = RecordedMarket.from_tape(path)
    assert recorded.first_frame_ms == START_MS + 1200
    assert [t for t, _ in recorded.ws_frames()] == [START_MS + 1200, START_MS + 1300, START_MS + 2200]
    assert list(recorded.ws_frames())[1][1] == "{garbage"
    assert recorded.chain_results(START_MS + 1599) == []
    assert recorded.chain_results(START_MS + 1600) == FIRST_CHAIN[:3]
    assert recorded.chain_results(START_MS + 9999) == FIRST_CHAIN[:3]  # the later chain never completed
    assert recorded.contract_result("O:IWM251002C00230000", START_MS + 2000) == FIRST_CHAIN[0]
    assert recorded.contract_result("O:IWM251002C00230000", START_MS + 3200) == option(230, bid=5.0)
    assert [bar["c"] for bar in recorded.second_bars("IWM", START_MS, START_MS + 1000)] == [240.0, 241.0]
    assert [bar["v"] for bar in recorded.minute_bars("IWM", 0, START_MS)] == [7]
    wall = ManualWall()
    fake = FakePolygon(recorded, api_key=KEY, start_ms=START_MS, speed=1000.0, wall=wall)
    with fake, open_ws(fake) as ws:
        ws.recv(timeout=RECV_S)
        subscribe(ws, "A.IWM")
        wall.value += 0.005
        texts = [ws.recv(timeout=RECV_S) for _ in range(3)]
    assert texts[1] == "{garbage"
    assert [json.loads(texts[i])[0]["c"] for i in (0, 2)] == [240.0, 241.0]


def test_cli_help_and_serving_the_demo_day() -> None:
    help_run = subprocess.run(
        [sys.executable, "-m", "sim.polygon_server", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert help_run.returncode == 0
    assert help_run.stdout.startswith("usage: python -m sim.polygon_server")
    ports = ["--ws-port", "0", "--rest-port", "0"]
    clock = ["--speed", "60", "--start", "2025-10-02T10:00:00-04:00"]
    command = [sys.executable, "-m", "sim.polygon_server", *ports, *clock, "--key", "clikey"]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as server:
        try:
            lines = [server.stdout.readline() for _ in range(5)]  # type: ignore[union-attr]
            assert lines[0].startswith("fake Polygon serving from 2025-10-02T10:00:00-04:00 at speed 60")
            rest_url = lines[2].strip().removeprefix("POLYGON_REST_URL=")
            stocks_url = lines[1].strip().removeprefix("POLYGON_WS_URL=")
            assert (
                lines[3].strip()
                == "POLYGON_OPTIONS_WS_URL=" + stocks_url.removesuffix("/stocks") + "/options"
            )
            response = httpx.get(
                f"{rest_url}{CHAIN_PATH}?limit=3", headers={"Authorization": "Bearer clikey"}
            )
            assert response.status_code == 200 and len(response.json()["results"]) == 3
            assert "clikey" not in "".join(lines)
        finally:
            server.terminate()
            server.wait(timeout=10)


def test_chain_next_url_forces_every_chain_page_to_point_there(http: httpx.Client, fake: FakePolygon) -> None:
    looping = f"{fake.rest_url}{CHAIN_PATH}?cursor=loop"
    fake.chain_next_url(looping)
    first = get(http, fake, f"{CHAIN_PATH}?expiration_date=2025-10-02&limit=250").json()
    again = get(http, fake, looping[len(fake.rest_url) :])
    contract = get(http, fake, f"{CHAIN_PATH}/O:IWM251002C00245000").json()
    fake.chain_next_url("http://x/v3?cursor=a\x00b")
    control = get(http, fake, CHAIN_PATH).json()
    fake.chain_next_url(None)
    normal = get(http, fake, f"{CHAIN_PATH}?expiration_date=2025-10-02&limit=250").json()
    assert first["next_url"] == looping and len(first["results"]) == 22
    assert again.status_code == 200 and again.json()["next_url"] == looping
    assert "next_url" not in contract
    assert control["next_url"] == "http://x/v3?cursor=a\x00b"
    assert "next_url" not in normal and len(normal["results"]) == 22


def test_chain_body_override_sends_raw_bytes_on_chain_routes_only(
    http: httpx.Client, fake: FakePolygon
) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    fake.chain_body_override(nested)
    chain = get(http, fake, f"{CHAIN_PATH}?expiration_date=2025-10-02")
    contract = get(http, fake, f"{CHAIN_PATH}/O:IWM251002C00245000")
    fake.chain_body_override(None)
    healed = get(http, fake, CHAIN_PATH)
    assert (chain.status_code, chain.content) == (200, nested)
    assert chain.headers["Content-Type"] == "application/json"
    assert contract.status_code == 200 and contract.json()["results"]["last_quote"]["bid"] == 1.0
    assert healed.status_code == 200 and healed.json()["status"] == "OK"


def test_heal_clears_the_chain_overrides(http: httpx.Client, fake: FakePolygon) -> None:
    fake.chain_body_override(b"nope")
    fake.chain_next_url(f"{fake.rest_url}{CHAIN_PATH}")
    fake.heal()
    body = get(http, fake, f"{CHAIN_PATH}?limit=250").json()
    assert body["status"] == "OK" and "next_url" not in body


def test_ws_binary_garbage_goes_out_as_binary_frames(live: FakePolygon) -> None:
    with open_ws(live) as ws:
        ws.recv(timeout=RECV_S)
        subscribe(ws, "A.IWM")
        recv_json(ws)
        live.send_garbage([b"\xff\xfe\x00garbage", "[1,2"])
        received = [ws.recv(timeout=RECV_S) for _ in range(2)]
        for _ in range(2000):
            if received[-2] == b"\xff\xfe\x00garbage":
                break
            received.append(ws.recv(timeout=RECV_S))
    assert received[-2:] == [b"\xff\xfe\x00garbage", "[1,2"]
    assert all(isinstance(frame, str) for frame in received[:-2])


def drain(ws: ClientConnection, quiet_s: float) -> list[str | bytes]:
    """Every frame until none arrives for `quiet_s`."""
    frames: list[str | bytes] = []
    while True:
        try:
            frames.append(ws.recv(timeout=quiet_s))
        except TimeoutError:
            return frames


def test_ws_silence_keeps_the_socket_open_and_answering_pings_but_sends_nothing(live: FakePolygon) -> None:
    with open_ws(live) as ws:
        ws.recv(timeout=RECV_S)
        subscribe(ws, "A.IWM")
        recv_json(ws)
        live.silence(True)
        drain(ws, 0.3)  # frames already on their way when the switch flipped
        silent_from = live.now_ms()
        quiet = drain(ws, 1.0)  # 200 simulated seconds of a stalled feed
        pong = ws.ping().wait(RECV_S)
        resumed_at = live.now_ms()
        live.silence(False)
        after = json.loads(ws.recv(timeout=RECV_S))
    assert quiet == [] and pong
    assert resumed_at - silent_from >= 150_000
    # Nothing of what fell due while silent is sent late: streaming resumes from the clock.
    assert after[0]["s"] >= resumed_at - 1000


def test_recorded_market_serves_a_taped_binary_frame_as_binary(tmp_path: Path) -> None:
    path = tmp_path / "2025-10-02.jsonl.gz"
    with TapeWriter(path, underlying="IWM", benchmark="SPY", start_ms=START_MS) as tape:
        tape.write_ws(START_MS + 1200, [a_event("IWM", START_MS, 240.0)])
        tape.write_ws(START_MS + 1300, b"\xff\xfe\x00binary")
    recorded = RecordedMarket.from_tape(path)
    wall = ManualWall()
    fake = FakePolygon(recorded, api_key=KEY, start_ms=START_MS, speed=1000.0, wall=wall)
    with fake, open_ws(fake) as ws:
        ws.recv(timeout=RECV_S)
        subscribe(ws, "A.IWM")
        wall.value += 0.005
        frames = [ws.recv(timeout=RECV_S) for _ in range(2)]
    assert json.loads(frames[0])[0]["c"] == 240.0 and frames[1] == b"\xff\xfe\x00binary"


# The options cluster (polygon.md section 2.7): same port, path /options.

PULLBACK_MS = START_MS + (36 * 60 + 31) * 1000  # 10:06:31, one second into the demo's first pullback
NEAR, FAR = "O:IWM251002C00241000", "O:IWM251002C00242000"


def open_options(fake: FakePolygon, key: str = KEY) -> ClientConnection:
    # Entered at once (the caller's `with` closes it): websockets 15+ wants the context before any use.
    ws = connect(fake.options_ws_url, open_timeout=RECV_S).__enter__()
    assert ws.recv(timeout=RECV_S) == CONNECTED
    ws.send(json.dumps({"action": "auth", "params": key}))
    return ws


def authed_options(fake: FakePolygon) -> ClientConnection:
    ws = open_options(fake)
    assert ws.recv(timeout=RECV_S) == AUTH_SUCCESS
    return ws


def q_events(frames: list[str | bytes]) -> list[dict]:
    return [event for frame in frames for event in json.loads(frame) if event["ev"] == "Q"]


def quotes_for(ws: ClientConnection, wall_s: float) -> list[dict]:
    """The Q events received over `wall_s` wall seconds (status frames are not expected meanwhile)."""
    deadline = time.monotonic() + wall_s
    events: list[dict] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            events += q_events([ws.recv(timeout=left)])
        except TimeoutError:
            break
    return events


def status(state: str, message: str) -> list[dict]:
    return [{"ev": "status", "status": state, "message": message}]


def demo_fake(
    market: SyntheticMarket, *, start_ms: int = PULLBACK_MS, speed: float = 10.0, **kw: Any
) -> FakePolygon:
    return FakePolygon(SyntheticSource(market), api_key=KEY, start_ms=start_ms, speed=speed, **kw)


def test_options_handshake_subscribe_and_first_quotes_are_the_snapshots(
    demo_market: SyntheticMarket, http: httpx.Client
) -> None:
    wall = ManualWall()  # the clock stands at a whole second: streamed and snapshot quotes must agree
    with demo_fake(demo_market, wall=wall) as fake, authed_options(fake) as ws:
        ws.send(json.dumps({"action": "subscribe", "params": f"Q.{NEAR}, Q.{FAR}"}))
        confirmations = [recv_json(ws) for _ in range(2)]
        first = q_events([ws.recv(timeout=RECV_S)])
        snapshots = {
            t: get(http, fake, f"{CHAIN_PATH}/{t}").json()["results"]["last_quote"] for t in (NEAR, FAR)
        }
    assert confirmations == [
        status("success", f"subscribed to: Q.{NEAR}"),
        status("success", f"subscribed to: Q.{FAR}"),
    ]
    assert (
        fake.options_connections,
        fake.ws_connections,
        fake.options_auth_attempts,
        fake.auth_attempts,
    ) == (1, 0, 1, 0)
    assert fake.options_subscriptions == [f"Q.{NEAR}, Q.{FAR}"] and fake.subscriptions == []
    assert [event["sym"] for event in first] == [NEAR, FAR]
    for event in first:
        assert list(event) == ["ev", "sym", "bx", "ax", "bp", "ap", "bs", "as", "c", "i", "t", "q"]
        assert event["t"] == PULLBACK_MS
        assert (event["bp"], event["ap"]) == (snapshots[event["sym"]]["bid"], snapshots[event["sym"]]["ask"])
    assert fake.options_ws_url == fake.ws_url.removesuffix("/stocks") + "/options"


def test_options_quotes_move_between_chain_snapshots_and_only_on_change(demo_market: SyntheticMarket) -> None:
    with demo_fake(demo_market) as fake, authed_options(fake) as ws:
        subscribe(ws, f"Q.{NEAR},Q.{FAR}")
        events = quotes_for(ws, 0.8)  # ~8 simulated seconds of a sharp pullback
    for ticker in (NEAR, FAR):
        mine = [event for event in events if event["sym"] == ticker]
        assert len(mine) >= 5, ticker
        times = [event["t"] for event in mine]
        assert times == sorted(set(times)) and [e["q"] for e in mine] == sorted({e["q"] for e in mine})
        assert all(t % 250 == 0 for t in times[1:])  # after the first, a check every 250 ms of the fake clock
        for earlier, later in zip(mine, mine[1:], strict=False):
            assert (earlier["bp"], earlier["ap"]) != (later["bp"], later["ap"])
        for event in mine:
            model = demo_market.stream_quote(ticker, event["t"])
            assert (event["bp"], event["ap"]) == (model.bid, model.ask)
    chain_quotes = {
        demo_market.stream_quote(NEAR, PULLBACK_MS - 1000 + 10_000 * k)[:2] for k in range(3)
    }  # the snapshots of 10:06:30, :40 and :50
    between = [e for e in events if e["sym"] == NEAR and e["t"] % 10_000 != 0]
    assert len({(e["bp"], e["ap"]) for e in between} - chain_quotes) >= 3


def test_options_unsubscribe_stops_that_contract_only(demo_market: SyntheticMarket) -> None:
    with demo_fake(demo_market) as fake, authed_options(fake) as ws:
        subscribe(ws, f"Q.{NEAR},Q.{FAR}")
        quotes_for(ws, 0.2)
        ws.send(json.dumps({"action": "unsubscribe", "params": f"Q.{FAR}"}))
        frames = []
        while status("success", f"unsubscribed to: Q.{FAR}") != (frame := recv_json(ws)):
            frames.append(frame)
        after = quotes_for(ws, 0.5)
    assert {event["sym"] for event in after} == {NEAR} and len(after) >= 3


def test_options_not_entitled_answers_auth_failed_while_stocks_authenticate(
    demo_market: SyntheticMarket,
) -> None:
    with demo_fake(demo_market, auth_timeout_s=1.0) as fake:
        fake.options_entitled(False)
        with open_options(fake) as ws:
            assert ws.recv(timeout=RECV_S) == AUTH_FAILED
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=RECV_S)
        with open_ws(fake) as stocks:
            assert stocks.recv(timeout=RECV_S) == AUTH_SUCCESS
        fake.options_entitled(True)
        with authed_options(fake):
            pass
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert (fake.options_auth_attempts, fake.options_connections, fake.auth_attempts) == (2, 2, 1)


def test_options_refused_subscription_gets_an_error_status_and_no_quotes(
    demo_market: SyntheticMarket,
) -> None:
    with demo_fake(demo_market) as fake, authed_options(fake) as ws:
        fake.options_refuse_subscriptions(True)
        ws.send(json.dumps({"action": "subscribe", "params": f"Q.{NEAR}"}))
        refusal = ws.recv(timeout=RECV_S)
        quiet = drain(ws, 0.4)
        fake.heal()
        subscribe(ws, f"Q.{FAR}")
        healed = quotes_for(ws, 0.2)
    assert json.loads(refusal) == status("error", f"not authorized: Q.{NEAR}")
    parsed = parse_ws_frame(refusal, 0, frozenset())
    assert [(s.status, s.message) for s in parsed.statuses] == [("error", f"not authorized: Q.{NEAR}")]
    assert quiet == []
    assert {event["sym"] for event in healed} == {FAR}


def test_options_silent_keeps_the_socket_up_without_quotes(demo_market: SyntheticMarket) -> None:
    with demo_fake(demo_market) as fake, authed_options(fake) as ws:
        subscribe(ws, f"Q.{NEAR}")
        assert quotes_for(ws, 0.2)
        fake.options_silent(True)
        drain(ws, 0.1)  # a frame already on its way
        quiet = drain(ws, 0.5)
        pong = ws.ping().wait(RECV_S)
        resumed_at = fake.now_ms()
        fake.options_silent(False)
        after = quotes_for(ws, 0.5)
    assert quiet == [] and pong
    assert after and all(event["t"] >= resumed_at - 250 for event in after)


def test_drop_options_connections_leaves_the_stocks_stream_and_the_reverse(
    demo_market: SyntheticMarket,
) -> None:
    with demo_fake(demo_market) as fake, authed_options(fake) as options, open_ws(fake) as stocks:
        stocks.recv(timeout=RECV_S)
        subscribe(stocks, "A.IWM")
        subscribe(options, f"Q.{NEAR}")
        fake.drop_options_connections()
        with pytest.raises(ConnectionClosedError):
            drain(options, 1.0)
        bars = [recv_json(stocks) for _ in range(3)]
        with authed_options(fake) as again:
            subscribe(again, f"Q.{NEAR}")
            fake.drop_connections()
            with pytest.raises(ConnectionClosedError):
                drain(stocks, 1.0)
            assert quotes_for(again, 0.3)
    assert all(frame[0]["ev"] == "A" for frame in bars)  # type: ignore[index]
    assert fake.options_connections == 2


def test_quote_storm_sends_the_rate_for_the_duration(demo_market: SyntheticMarket) -> None:
    wall = ManualWall()
    with demo_fake(demo_market, wall=wall) as fake, authed_options(fake) as ws:
        subscribe(ws, f"Q.{NEAR},Q.{FAR}")
        quotes_for(ws, 0.1)  # the first quotes, at the standing clock
        fake.quote_storm(200.0, 1.0)
        wall.value += 0.1  # one simulated second at speed 10
        events = quotes_for(ws, 0.5)
    storm = [event for event in events if PULLBACK_MS <= event["t"] < PULLBACK_MS + 1000]
    for ticker in (NEAR, FAR):
        mine = [event for event in storm if event["sym"] == ticker]
        assert len(mine) == 200, ticker
        times = [event["t"] for event in mine]
        assert times == sorted(set(times)) and times[-1] == PULLBACK_MS + 995
        shifts = set()
        for event in mine:
            model = demo_market.stream_quote(ticker, event["t"] - event["t"] % 250)
            shifts.add(round(event["bp"] - model.bid, 2))
            assert event["ap"] > event["bp"] and round(event["ap"] - model.ask, 2) in (-0.01, 0.0, 0.01)
        assert shifts == {-0.01, 0.0, 0.01}
    # After the storm the model's own quote is sent again.
    last = [event for event in events if event["sym"] == NEAR][-1]
    assert last["t"] >= PULLBACK_MS + 1000
    assert (last["bp"], last["ap"]) == demo_market.stream_quote(NEAR, last["t"])[:2]


def test_quote_storm_is_paced_on_the_fake_clock(demo_market: SyntheticMarket) -> None:
    with demo_fake(demo_market, speed=1.0) as fake, authed_options(fake) as ws:
        subscribe(ws, f"Q.{NEAR}")
        quotes_for(ws, 0.1)
        before = fake.now_ms()
        fake.quote_storm(100.0, 1.0)
        after = fake.now_ms()
        received: list[tuple[float, dict]] = []
        deadline = time.monotonic() + 1.5
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = ws.recv(timeout=left)
            except TimeoutError:
                break
            received += [(time.monotonic(), event) for event in q_events([frame])]
    storm = [(at, event) for at, event in received if before <= event["t"] < after + 1000]
    assert 100 <= len(storm) <= 101  # (a change checked in the instant before the storm began)
    assert storm[-1][0] - storm[0][0] >= 0.8  # spread over the second, not sent at once


def test_options_contract_limit_per_connection() -> None:
    tickers = [f"O:IWM251010C{k * 500:08d}" for k in range(1, 1002)]  # none in the chain: no quotes
    with (
        FakePolygon(MARKET, api_key=KEY, start_ms=START_MS, wall=ManualWall()) as fake,
        authed_options(fake) as ws,
    ):
        ws.send(json.dumps({"action": "subscribe", "params": ",".join(f"Q.{t}" for t in tickers[:1000])}))
        confirmed = [recv_json(ws) for _ in range(1000)]
        ws.send(json.dumps({"action": "subscribe", "params": f"Q.{tickers[1000]}"}))
        over = recv_json(ws)
    assert confirmed[-1] == status("success", f"subscribed to: Q.{tickers[999]}")
    assert over == status(
        "error", f"at most 1000 contracts per connection; not subscribed: Q.{tickers[1000]}"
    )


def test_recorded_market_streams_taped_quotes_newer_than_its_snapshots() -> None:
    ticker = "O:IWM251002C00240000"

    def q(t: int, bid: float) -> dict:
        return {"ev": "Q", "sym": ticker, "bx": 302, "ax": 313, "bp": bid, "ap": bid + 0.05, "bs": 5, "as": 7,
                "c": 1, "i": [], "t": t, "q": t}  # fmt: skip

    frames = [(START_MS + 2100, [q(START_MS + 2050, 1.2)]), (START_MS + 4100, [q(START_MS + 4050, 1.3)])]
    chain = [
        option(240, bid=1.0)
        | {"last_quote": {"bid": 1.0, "ask": 1.1, "last_updated": (START_MS + 3000) * 10**6}}
    ]
    recorded = RecordedMarket(frames, chains=[(START_MS + 3000, chain)])
    assert recorded.option_quote(ticker, START_MS + 2500)[:2] == (1.2, 1.25)
    assert recorded.option_quote(ticker, START_MS + 3500)[:2] == (1.0, 1.1)  # the newer snapshot wins
    assert recorded.option_quote(ticker, START_MS + 4500)[:4] == (1.3, 1.35, 5, 7)
    assert recorded.option_quote("O:IWM251002C00999000", START_MS + 4500) is None
    wall = ManualWall()
    fake = FakePolygon(recorded, api_key=KEY, start_ms=START_MS + 2500, speed=1000.0, wall=wall)
    with fake, authed_options(fake) as ws:
        subscribe(ws, f"Q.{ticker}")
        first = q_events([ws.recv(timeout=RECV_S)])
        wall.value += 0.002  # two simulated seconds
        later = quotes_for(ws, 0.3)
    assert [(e["bp"], e["t"]) for e in first] == [(1.2, START_MS + 2500)]
    assert [e["bp"] for e in later] == [1.0, 1.3]
