"""Hostile input on every path is counted and skipped, never fatal.

The REST client and the feed decoder against the fake Polygon over real sockets, the running daemon
(in-process, against FakePolygon and FakePushover) fed binary frames, deeply nested frames and
bodies, and broken or self-pointing `next_url`s, and `main.py --replay` of a tape holding a line
nested 200k deep and a gzip member that inflates to 200 MB without a newline.
"""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from builders import DAY, at
from structlog.testing import capture_logs
from test_daemon import API_KEY, settings_for

from clock import SimClock
from config import Settings
from daemon import Daemon
from events import ChainSnapshot, ContractSnapshot, Received
from feed import FeedDecoder
from polygon_client import MAX_CHAIN_PAGES, MAX_PAGES, NETWORK_ERROR_STATUS, PolygonRest
from sim.market import SyntheticMarket, demo_script, write_tape
from sim.polygon_server import FakePolygon, SyntheticSource
from sim.pushover_server import FakePushover
from tape import TapeReader, TapeWriter, strip_api_key

ROOT = Path(__file__).resolve().parents[1]
SPEED = 40.0
CHAIN = "/v3/snapshot/options/IWM"
FIRST_PAGE = f"{CHAIN}?expiration_date=2025-10-02&contract_type=call&limit=250"
NESTED_TEXT = "[" * 50_000 + "]" * 50_000
NESTED_BODY = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return SyntheticMarket(demo_script())


@pytest.fixture
def polygon(market: SyntheticMarket):
    with FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 0), speed=1.0) as fake:
        yield fake


@pytest.fixture
def rest(polygon: FakePolygon):
    with PolygonRest(polygon.rest_url, API_KEY, clock_ms=polygon.now_ms, sleep=lambda _s: None) as client:
        yield client


def paging_stops(logs: list[dict]) -> list[str]:
    return [e["reason"] for e in logs if e.get("event") == "rest_paging_stopped"]


# The REST client never raises and never follows a hostile next_url


@pytest.mark.parametrize("bad", ["\x00", "\n", "\r", " ", "\t", "\x7f", "\x85"], ids=repr)
def test_a_next_url_with_a_control_character_or_space_stops_the_paging(
    polygon: FakePolygon, rest: PolygonRest, bad: str
) -> None:
    polygon.chain_next_url(f"{polygon.rest_url}{CHAIN}?cursor=a{bad}b")
    with capture_logs() as logs:
        answers = rest.chain_pages("IWM", DAY, spot=240.0)
    assert [a.status for a in answers] == [200]
    assert len(polygon.rest_requests) == 1
    assert paging_stops(logs) == ["unsafe_next_url"]


def test_a_url_httpx_refuses_is_answered_599_at_once_without_the_key(
    polygon: FakePolygon, rest: PolygonRest
) -> None:
    with capture_logs() as logs:
        refused = rest.get(f"{CHAIN}?cursor=a\x00b")
        odd_scheme = rest.get("ftp://example.invalid/x")
        not_a_path = rest.get(None)  # type: ignore[arg-type]
    assert refused.status == NETWORK_ERROR_STATUS and "InvalidURL" in refused.body["error"]
    assert (
        odd_scheme.status == NETWORK_ERROR_STATUS
        and "not a path of the REST base" in odd_scheme.body["error"]
    )
    assert not_a_path.status == NETWORK_ERROR_STATUS and "unexpected error" in not_a_path.body["error"]
    assert polygon.rest_requests == []
    retried = [e["path"] for e in logs if e.get("event") == "rest_retry"]
    assert retried == []  # a refused URL is never retried
    assert any(e.get("event") == "rest_unexpected" for e in logs)
    assert API_KEY not in repr(logs) and API_KEY not in repr([refused, odd_scheme, not_a_path])


def test_a_body_nested_100k_deep_is_a_failed_answer_not_a_crash(
    polygon: FakePolygon, rest: PolygonRest
) -> None:
    polygon.chain_body_override(NESTED_BODY)
    answers = rest.chain_pages("IWM", DAY, spot=240.0)
    (answer,) = answers
    decoder = FeedDecoder("IWM", "SPY")
    events = decoder.rest(answer.received_ms, answer.path, answer.status, answer.body)
    assert answer.status == 200 and isinstance(answer.body, str) and len(answer.body) <= 2000
    assert rest.last_error is not None and rest.last_error.startswith("HTTP 200 without a JSON object")
    assert events == [] and decoder.counters.rest_errors == 1


def test_a_self_pointing_next_url_stops_at_the_first_repeat(polygon: FakePolygon, rest: PolygonRest) -> None:
    polygon.chain_next_url(f"{polygon.rest_url}{CHAIN}?cursor=self")
    with capture_logs() as logs:
        looping = rest.chain_pages("IWM", DAY, spot=240.0)
    requests_looping = len(polygon.rest_requests)
    first = rest.chain_pages("IWM", DAY, spot=None)[0]
    polygon.chain_next_url(f"{polygon.rest_url}{first.path}")  # the first page pointing at itself
    with capture_logs() as own_logs:
        itself = rest.chain_pages("IWM", DAY, spot=None)
    assert [a.status for a in looping] == [200, 200] and requests_looping == 2
    assert len(itself) == 1
    assert paging_stops(logs) == ["cycle"] and paging_stops(own_logs) == ["cycle"]
    # Said once per route and reason (a looping server is polled every few seconds), and named for /health.
    levels = [e["log_level"] for e in logs + own_logs if e.get("event") == "rest_paging_stopped"]
    assert levels == ["warning", "debug"]
    assert rest.last_error == "paging stopped early (cycle): the answer is incomplete"


def test_a_chain_poll_follows_at_most_max_chain_pages_and_aggregates_more(
    polygon: FakePolygon, rest: PolygonRest
) -> None:
    with capture_logs() as logs:
        chain = rest.chain_pages("IWM", DAY, spot=None, limit=1)
        seconds = rest.aggs("IWM", 1, "second", str(at(9, 30)), str(at(9, 40)), limit=1)
    assert len(chain) == MAX_CHAIN_PAGES and chain[-1].body.get("next_url")
    assert len(seconds) == MAX_PAGES > MAX_CHAIN_PAGES
    assert paging_stops(logs) == ["page_cap", "page_cap"]


def test_aggregates_paging_on_past_the_results_any_request_needs_stop_there(
    polygon: FakePolygon, rest: PolygonRest
) -> None:
    # A server paging on for ever (a new cursor, the same bars) had stored 290 MB of volume profile.
    with capture_logs() as logs:
        seconds = rest.aggs("IWM", 1, "second", str(at(9, 30)), str(at(10, 30)), limit=100, max_results=250)
    assert [len(a.body["results"]) for a in seconds] == [100, 100, 100]
    assert seconds[-1].body.get("next_url") and paging_stops(logs) == ["too_many_results"]


# The feed decoder: abandoned polls leave nothing behind, live and replayed alike


def chain_results(market: SyntheticMarket, count: int) -> list[dict]:
    return market.chain_pages(at(10, 0), page_size=250)[0]["results"][:count]


def replayed(answers: list[tuple[str, int, object]], tmp_path: Path) -> FeedDecoder:
    """The decoder after the tape of these answers is read back as --replay and the warm-up read it."""
    path = tmp_path / "answers.jsonl.gz"
    with TapeWriter(path, underlying="IWM", benchmark="SPY", start_ms=at(10, 0)) as writer:
        for n, (rest_path, status, body) in enumerate(answers):
            writer.write_rest(at(10, 0) + n, rest_path, status, body)
    decoder = FeedDecoder("IWM", "SPY")
    for line in TapeReader(path, lazy_bodies=True):
        if line.kind == "rest":
            decoder.decode(Received(line.t, "rest", line.payload, line.path or "", line.status or 0))
    return decoder


def decode_all(decoder: FeedDecoder, answers: list[tuple[str, int, object]]) -> list[object]:
    events: list[object] = []
    for n, (rest_path, status, body) in enumerate(answers):
        events.extend(decoder.rest(at(10, 0) + n, rest_path, status, body))
    return events


def test_abandoned_chain_polls_are_discarded_by_the_next_first_page(
    market: SyntheticMarket, tmp_path: Path
) -> None:
    results = chain_results(market, 4)
    looping = {"status": "OK", "results": results, "next_url": f"https://api.massive.com{CHAIN}?cursor=self"}
    answers: list[tuple[str, int, object]] = []
    for _ in range(100):  # a self-pointing next_url: each poll stops after two pages
        answers += [(FIRST_PAGE, 200, looping), (f"{CHAIN}?cursor=self", 200, looping)]
    answers.append((FIRST_PAGE, 200, {"status": "OK", "results": results[:3]}))
    live = FeedDecoder("IWM", "SPY")
    events = decode_all(live, answers)
    again = replayed(answers, tmp_path)
    (chain,) = events
    assert isinstance(chain, ChainSnapshot) and len(chain.quotes) == 3
    assert live.counters.abandoned_chains == 100
    assert again.counters == live.counters


def test_pending_chain_pages_never_exceed_the_cap(market: SyntheticMarket, tmp_path: Path) -> None:
    results = chain_results(market, 30)
    page_results = [results[n % len(results)] for n in range(46)]
    answers: list[tuple[str, int, object]] = [
        (
            f"{CHAIN}?cursor=p{n}",
            200,
            {"results": [page_results[n]], "next_url": f"https://x{CHAIN}?cursor=p{n + 1}"},
        )
        for n in range(45)
    ]
    answers.append((f"{CHAIN}?cursor=p45", 200, {"results": [page_results[45]]}))
    answers.append((FIRST_PAGE, 200, {"results": page_results[:2]}))  # the next poll: one page
    live = FeedDecoder("IWM", "SPY")
    (chain,) = decode_all(live, answers)
    assert live.counters.abandoned_chains == 1
    # The 46-page poll is dropped whole: its last pages had passed for a whole chain (a partial chain
    # chose a contract its first page beat). The next poll's chain is whole.
    assert [q.ticker for q in chain.quotes] == [r["details"]["ticker"] for r in page_results[:2]]
    assert replayed(answers, tmp_path).counters == live.counters


@pytest.mark.parametrize("paging", ["cursor", "offset", "page"])
def test_pages_are_joined_by_their_next_url_whatever_its_query_calls_the_position(
    market: SyntheticMarket, tmp_path: Path, paging: str
) -> None:
    results = chain_results(market, 6)
    pages = [results[0:2], results[2:4], results[4:6]]
    paths = [FIRST_PAGE, f"{CHAIN}?{paging}=2&apiKey=SECRET", f"{CHAIN}?{paging}=4"]
    answers: list[tuple[str, int, object]] = []
    for n, page in enumerate(pages):
        body: dict[str, object] = {"status": "OK", "results": page}
        if n + 1 < len(pages):
            body["next_url"] = f"https://api.massive.com{paths[n + 1]}"
        answers.append((strip_api_key(paths[n]), 200, body))
    live = FeedDecoder("IWM", "SPY")
    (chain,) = decode_all(live, answers)
    assert [q.ticker for q in chain.quotes] == [r["details"]["ticker"] for r in results]
    assert live.counters.abandoned_chains == 0
    assert replayed(answers, tmp_path).counters == live.counters


def test_a_200_without_a_json_object_is_a_failed_answer_live_and_replayed(
    market: SyntheticMarket, tmp_path: Path
) -> None:
    results = chain_results(market, 2)
    text = NESTED_BODY.decode()[:2000]  # what the client keeps of a body it cannot decode
    answers: list[tuple[str, int, object]] = [
        (FIRST_PAGE, 200, {"results": results[:1], "next_url": f"https://x{CHAIN}?cursor=p2"}),
        (f"{CHAIN}?cursor=p2", 200, text),
        (f"{CHAIN}/{results[0]['details']['ticker']}", 200, text),
        ("/v2/aggs/ticker/IWM/range/1/second/1/2?adjusted=true", 200, None),
        (FIRST_PAGE, 200, {"results": results}),
    ]
    live = FeedDecoder("IWM", "SPY")
    events = decode_all(live, answers)
    assert live.counters.rest_errors == 3 and live.counters.abandoned_chains == 0
    assert len(events) == 1 and len(events[0].quotes) == 2
    assert replayed(answers, tmp_path).counters == live.counters


def test_a_contract_quote_too_absurd_to_mark_is_counted(market: SyntheticMarket) -> None:
    result = chain_results(market, 1)[0]
    absurd = {**result, "last_quote": {**result["last_quote"], "bid": 1e6, "ask": 1e6 + 1}}
    decoder = FeedDecoder("IWM", "SPY")
    (event,) = decoder.rest(at(10, 0), f"{CHAIN}/{result['details']['ticker']}", 200, {"results": absurd})
    assert isinstance(event, ContractSnapshot) and event.quote.bid is None and event.quote.ask is None
    assert decoder.counters.unusable_quotes == 1


# The running daemon: every hostile input is skipped, the day's BUY and SELL go out once each


def kinds(pushover: FakePushover) -> list[str]:
    return [m.form["title"].rsplit("— ", 1)[-1] for m in pushover.messages]


def run_until_sell(
    settings: Settings,
    clock: SimClock,
    pushover: FakePushover,
    on_poll: Callable[[], None],
    timeout_s: float = 90.0,
) -> tuple[Daemon, bool]:
    """Run the daemon in a thread until the SELL went out; returns it and whether it was still running."""
    stop = threading.Event()
    daemon = Daemon(settings, clock, stop=stop)
    thread = threading.Thread(target=daemon.run, name="daemon-under-test")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive() and "SELL" not in kinds(pushover):
        on_poll()
        time.sleep(0.05)
    time.sleep(0.5)  # a second SELL, if any, would go out now
    alive = thread.is_alive()
    stop.set()
    thread.join(15)
    assert not thread.is_alive(), "daemon did not stop within 15 s"
    return daemon, alive


def healer(clock: SimClock, heal_at_ms: int | None, heal: Callable[[], None]) -> Callable[[], None]:
    healed: list[int] = []

    def poll() -> None:
        if heal_at_ms is not None and not healed and clock.now_ms() >= heal_at_ms:
            heal()
            healed.append(clock.now_ms())

    return poll


def bar_frame(start_ms: int, close: float = 242.0) -> str:
    """One IWM `A` event as the stream sends it."""
    return json.dumps([{"ev": "A", "sym": "IWM", "v": 500, "av": 90_000, "op": close, "vw": close, "o": close,
                        "c": close, "h": close, "l": close, "a": close, "z": 10, "s": start_ms,
                        "e": start_ms + 1000}])  # fmt: skip


def bad_print_frame(now_ms: int) -> str:
    """IWM at ten times its price for the second under way (whose real bar comes after it)."""
    frame = json.loads(bar_frame(now_ms // 1000 * 1000, close=2420.0))
    frame[0]["v"] = 90_000
    return json.dumps(frame)


# A bar stamped a day ahead: were it taken, every real bar after it would be "late" all day.
TOMORROWS_BAR = bar_frame(at(10, 4) + 86_400_000)

FAULTS: dict[str, tuple[Callable[[FakePolygon], None], int | None, Callable[[FakePolygon], None]]] = {
    "binary_frame": (lambda p: p.send_garbage([b"\xff\xfe\x00 a binary frame"]), None, lambda p: None),
    "bar_stamped_tomorrow": (lambda p: p.send_garbage([TOMORROWS_BAR]), None, lambda p: None),
    # 60 s in, before the burst: a print at ten times the price, on heavy volume, for the second under way.
    "bad_print": (lambda p: None, 60, lambda p: p.send_garbage([bad_print_frame(p.now_ms())])),
    "nested_text_frame": (lambda p: p.send_garbage([NESTED_TEXT]), None, lambda p: None),
    "control_char_next_url": (
        lambda p: p.chain_next_url(f"{p.rest_url}{CHAIN}?cursor=a\x00b"),
        30,
        lambda p: p.chain_next_url(None),
    ),
    "nested_chain_body": (
        lambda p: p.chain_body_override(NESTED_BODY),
        60,  # 1.5 s of wall time: on a loaded machine the first chain poll came after 0.75 s
        lambda p: p.chain_body_override(None),
    ),
    "self_pointing_next_url": (
        lambda p: p.chain_next_url(f"{p.rest_url}{CHAIN}?cursor=self"),
        60,
        lambda p: p.chain_next_url(None),
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_daemon_skips_hostile_input_and_sends_buy_then_sell_once(
    market: SyntheticMarket, tmp_path: Path, fault: str
) -> None:
    inject, heal_after_s, heal = FAULTS[fault]
    start = at(10, 4)
    heal_at = None if heal_after_s is None else start + heal_after_s * 1000
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        inject(polygon)
        clock = SimClock(start, SPEED)
        with capture_logs() as logs:
            heal_when_due = healer(clock, heal_at, lambda: heal(polygon))
            settings = settings_for(polygon, pushover, tmp_path)
            daemon, alive = run_until_sell(settings, clock, pushover, heal_when_due)
        requests = list(polygon.rest_requests)
    sent = kinds(pushover)
    counters = daemon.pipeline.decoder.counters
    assert alive, "the daemon stopped by itself"
    assert [k for k in sent if k in ("BUY", "SELL")] == ["BUY", "SELL"], sent
    assert "SYSTEM" not in sent and daemon.engine_errors == 0 and daemon.recorder.problem is None
    assert not [e for e in logs if e.get("log_level") == "critical"]
    chain_requests = [p for p in requests if p.startswith(f"{CHAIN}?")]
    print(f"{fault}: {len(requests)} REST requests, {len(chain_requests)} chain pages")
    tape = TapeReader(tmp_path / "tapes" / "2025-10-02.jsonl.gz")
    payloads = [line.payload for line in tape if line.kind == "ws"]
    assert tape.bad_lines == 0
    if fault == "binary_frame":
        assert b"\xff\xfe\x00 a binary frame" in payloads and counters.bad_frames >= 1
    elif fault == "bar_stamped_tomorrow":
        assert json.loads(TOMORROWS_BAR) in payloads and counters.ahead_bars == 1
        assert daemon.engine.counters.late_bars == 0, "no real bar was taken for late"
    elif fault == "bad_print":
        assert counters.price_jumps == 1 and daemon.engine.counters.late_bars == 0
        assert any(isinstance(p, list) and p and p[0].get("c") == 2420.0 for p in payloads), (
            "taped as received"
        )
        buy = next(m.form["message"] for m in pushover.messages if m.form["title"].endswith("BUY"))
        assert "2420" not in buy and "2,420" not in buy
    elif fault == "nested_text_frame":
        assert NESTED_TEXT in payloads and counters.bad_frames >= 1
    elif fault == "control_char_next_url":
        assert "unsafe_next_url" in paging_stops(logs) and counters.abandoned_chains >= 1
        assert not any("\x00" in p for p in requests)
    elif fault == "nested_chain_body":
        assert counters.rest_errors >= 1
        assert any(e.get("event") == "rest_bad_body" for e in logs)
    else:
        looped = [p for p in requests if "cursor=self" in p]
        # One repeat ends each poll: at most one looping page per poll, polls every 10 s for 60 s.
        assert 1 <= len(looped) <= 10 and counters.abandoned_chains >= 1
        assert len(chain_requests) < 120
    assert daemon.engine.chain is not None
    if heal_at is not None:
        assert daemon.engine.chain.received_ms > heal_at


# --replay of a tape with a line nested 200k deep and a gzip bomb in the middle


def replay_trades(tape: Path, data_dir: Path) -> tuple[subprocess.CompletedProcess, list[tuple]]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))},
        "PYTHON_DOTENV_DISABLED": "1",
        "DATA_DIR": str(data_dir),
        "LOG_FORMAT": "json",
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--replay", str(tape)],
        cwd=data_dir,
        env=env,
        capture_output=True,
        timeout=300,
    )
    db = sqlite3.connect(data_dir / "replay.sqlite3")
    try:
        rows = db.execute("SELECT * FROM trades ORDER BY exit_ms").fetchall()
    finally:
        db.close()
    return done, rows


def test_replay_of_a_tape_with_a_deep_line_and_a_gzip_bomb_makes_the_same_trades(
    market: SyntheticMarket, tmp_path: Path
) -> None:
    clean = write_tape(market, tmp_path / "clean" / "2025-10-02.jsonl.gz", end_ms=at(10, 20))
    with gzip.open(clean, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)
    middle = len(lines) // 2
    hostile = tmp_path / "hostile" / "2025-10-02.jsonl.gz"
    hostile.parent.mkdir()
    with hostile.open("wb") as fh:
        fh.write(gzip.compress(b"".join(lines[:middle]), mtime=0))
        deep = b"[" * 200_000 + b"]" * 200_000
        fh.write(gzip.compress(b'{"t":' + str(at(9, 45)).encode() + b',"ws":' + deep + b"}\n", mtime=0))
        with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=9, mtime=0) as bomb:
            block = b"x" * (1 << 20)
            for _ in range(200):  # 200 MB of one line without a newline
                bomb.write(block)
        fh.write(gzip.compress(b"\n" + b"".join(lines[middle:]), mtime=0))
    assert hostile.stat().st_size < clean.stat().st_size + 1_000_000
    reader = TapeReader(hostile)
    assert sum(1 for _ in reader) == len(lines) and reader.bad_lines == 2
    clean_run, clean_trades = replay_trades(clean, clean.parent)
    hostile_run, hostile_trades = replay_trades(hostile, hostile.parent)
    assert clean_run.returncode == 0, clean_run.stderr.decode()[-2000:]
    assert hostile_run.returncode == 0, hostile_run.stderr.decode()[-2000:]
    assert clean_trades and hostile_trades == clean_trades
    summaries = [line for line in hostile_run.stdout.decode().splitlines() if '"replay_summary"' in line]
    assert summaries and json.loads(summaries[-1])["bad_lines"] == 2


def bars_kept(decoder: FeedDecoder, leads_ms: list[int], first_ms: int = at(10, 4)) -> list[bool]:
    """One frame per second, each holding one IWM bar starting `lead` ms from its receive time."""
    kept = []
    for i, lead in enumerate(leads_ms):
        received = first_ms + i * 1000
        kept.append(bool(decoder.ws(received, bar_frame(received + lead))))
    return kept


def test_a_bar_stamped_far_ahead_of_the_streams_usual_lead_is_dropped_once() -> None:
    decoder = FeedDecoder("IWM", "SPY")
    day = 86_400_000
    leads = [-1300, -1200, day, -1200, -60_000, -1100, 23_000, 40_000, 200_000]
    kept = [True, True, False, True, True, True, True, True, False]  # a late bar does not lower the lead
    assert bars_kept(decoder, leads) == kept
    assert decoder.counters.ahead_bars == 2 and decoder.counters.bad_inputs() == 2
    # One bar 40 s ahead made the next 40 s of real bars late (a STALL for a stream that never stopped).
    assert bars_kept(FeedDecoder("IWM", "SPY"), [-1200, -1200, 40_000, -1200]) == [True, True, False, True]
    # Before any bar the receive clock is the reference: a first bar stamped tomorrow is dropped too.
    assert bars_kept(FeedDecoder("IWM", "SPY"), [day, -1200]) == [False, True]


def test_one_frame_of_five_far_future_bars_cannot_take_over_the_lead() -> None:
    """Suspects were counted per bar: one frame of five bars from the far future became the new lead
    and every real bar after it was late for the rest of the day (with year 33,700 the time formatting
    crashed the engine)."""
    decoder = FeedDecoder("IWM", "SPY")
    assert bars_kept(decoder, [-1200, -1200]) == [True, True]
    received = at(10, 4) + 2000
    ahead = [json.loads(bar_frame(received + 32 * 365 * 86_400_000 + i * 1000))[0] for i in range(5)]
    assert decoder.ws(received, ahead) == []
    assert bars_kept(decoder, [-1200] * 3, first_ms=received + 1000) == [True] * 3
    # Past 2100 a stamp is no bar at all, however many frames in a row bring one.
    kept = [decoder.ws(received + 4000 + i * 1000, bar_frame(10**15 + i * 1000)) for i in range(6)]
    assert kept == [[]] * 6


def test_a_server_replaying_bars_faster_than_its_clock_keeps_every_bar() -> None:
    # A rehearsal at 20x bar time per receive second: the lead grows 19 s a frame, never 60 s at once.
    assert all(bars_kept(FeedDecoder("IWM", "SPY"), [i * 19_000 for i in range(30)]))


@pytest.mark.parametrize("lead_ms", [-15 * 60_000, 3 * 3_600_000])
def test_a_steady_lead_of_any_size_is_the_streams_own_after_a_few_bars(lead_ms: int) -> None:
    # A delayed feed runs 15 minutes behind; a rehearsal server may keep a clock hours ahead of ours.
    kept = bars_kept(FeedDecoder("IWM", "SPY"), [lead_ms] * 12)
    if lead_ms < 0:
        assert all(kept)
    else:
        assert kept == [False] * 4 + [True] * 8


def iwm_bar_kept(decoder: FeedDecoder, second: int, close: float) -> bool:
    received = at(10, 4) + second * 1000
    frame = json.loads(bar_frame(received - 1200, close))
    frame[0].update(h=close, l=close)
    return bool(decoder.ws(received, frame))


def test_a_print_beyond_the_price_band_is_dropped_and_five_in_a_row_are_a_new_level() -> None:
    decoder = FeedDecoder("IWM", "SPY")
    closes = [242.0, 242.1, 2420.0, 242.2, 250.0, 242.3, 249.0]  # 10x, then +3.2 %, then +2.8 %
    kept = [iwm_bar_kept(decoder, i, c) for i, c in enumerate(closes)]
    assert kept == [True, True, False, True, False, True, True]
    assert decoder.counters.price_jumps == 2 and decoder.counters.bad_inputs() == 2
    reopened = [iwm_bar_kept(decoder, 10 + i, 270.0 + i * 0.01) for i in range(7)]  # a reopening 8 % higher
    assert reopened == [False] * 4 + [True] * 3
    assert iwm_bar_kept(decoder, 20, 277.0) and iwm_bar_kept(decoder, 21, 269.0), (
        "within 3 % of the last close"
    )


def test_a_backfilled_second_beyond_the_price_band_is_dropped_like_a_streamed_one() -> None:
    decoder = FeedDecoder("IWM", "SPY")
    start = at(10, 4)
    assert iwm_bar_kept(decoder, 0, 242.0)
    results = [
        {"t": start + i * 1000, "o": c, "h": c, "l": c, "c": c, "v": 300, "vw": c, "n": 3}
        for i, c in enumerate([242.1, 24.2, 242.2], start=1)
    ]  # a tenth of the price in the middle second
    path = f"/v2/aggs/ticker/IWM/range/1/second/{start}/{start + 4000}?adjusted=true&sort=asc&limit=50000"
    body = {"ticker": "IWM", "status": "OK", "resultsCount": 3, "results": results}
    bars = decoder.rest(start + 5000, path, 200, body)
    assert [bar.c for bar in bars] == [242.1, 242.2]
    assert decoder.counters.price_jumps == 1 and decoder.counters.bad_inputs() == 1
