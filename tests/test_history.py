"""--fetch with the NBBO method against the fake vendor (sim/) serving /v3/quotes over real sockets."""

from __future__ import annotations

import bisect
import datetime
import gzip
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import short_script

from backtest import Io, main, resolve_settings
from history import CHAIN_LATENCY_MS, QUOTES_PLAN_MESSAGE, STREAM_STRIKE_WINDOW, fetch_history
from polygon_client import parse_ws_frame
from sim.market import SyntheticMarket
from sim.polygon_server import FakePolygon, SyntheticSource
from tape import TapeReader

DAY = datetime.date(2025, 10, 6)
# Distinctive, so a leak into a tape or the cache cannot hide among other text.
API_KEY = "Zq9LeakCanaryKey7731"
PAGE_CAP = 500
WINDOW_MS = 15 * 60_000  # the fake's clock stands at 09:45: nothing after it exists yet
CHAIN_PREFIX = "/v3/snapshot/options/IWM?"


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return SyntheticMarket(short_script(DAY, 21))


def serve(market: SyntheticMarket) -> FakePolygon:
    # A frozen wall: the simulated clock stays at 09:45 whatever the test's speed.
    start_ms = market.session_open_ms + WINDOW_MS
    server = FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start_ms, wall=lambda: 0.0)
    server.quotes_page_cap(PAGE_CAP)
    return server


@pytest.fixture
def fake(market: SyntheticMarket) -> Iterator[FakePolygon]:
    with serve(market) as server:
        yield server


@dataclass(frozen=True, slots=True)
class Fetched:
    """One NBBO fetch of DAY, shared by the tests that only read it (or copy its data folder)."""

    fake: FakePolygon
    data: Path
    tape: Path
    printed: str
    sleeps: list[float]
    requests: int


@pytest.fixture(scope="module")
def fetched(market: SyntheticMarket, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fetched]:
    with serve(market) as server:
        server.fail_rest(429, count=1, path_prefix="/v3/quotes/", retry_after=3)
        data = tmp_path_factory.mktemp("nbbo") / "data"
        sleeps: list[float] = []
        tapes, printed = fetch(server, data, sleeps)
        assert len(tapes) == 1, printed
        yield Fetched(server, data, tapes[0], printed, sleeps, len(server.rest_requests))


def env_for(fake: FakePolygon, data_dir: Path) -> dict[str, str]:
    return {"POLYGON_API_KEY": API_KEY, "POLYGON_REST_URL": fake.rest_url, "DATA_DIR": str(data_dir)}


def fetch(fake: FakePolygon, data_dir: Path, sleeps: list[float] | None = None) -> tuple[list[Path], str]:
    settings = resolve_settings({}, environ=env_for(fake, data_dir), env_file=None)
    out = io.StringIO()
    sleep = sleeps.append if sleeps is not None else (lambda _s: None)
    tapes = fetch_history(settings, DAY, DAY, sleep=sleep, progress_stream=io.StringIO(), out=out)
    return tapes, out.getvalue()


def quote_paths(fake: FakePolygon) -> list[str]:
    return [p for p in fake.rest_requests if urlsplit(p).path.startswith("/v3/quotes/")]


def chain_lines(tape: Path) -> Iterator[tuple[int, list[dict]]]:
    """(snapshot instant, results) of every chain snapshot's first page in the tape."""
    for line in TapeReader(tape):
        if line.kind == "rest" and line.path.startswith(CHAIN_PREFIX) and "cursor=" not in line.path:
            yield line.t - CHAIN_LATENCY_MS, line.payload["results"]


def test_every_snapshot_shows_the_nbbo_in_force_at_its_instant(fetched, market):
    fake, tape = fetched.fake, fetched.tape
    assert tape.name == "2025-10-06.jsonl.gz"
    assert fetched.sleeps == [3.0], "the 429 on /v3/quotes was retried after its Retry-After"
    assert TapeReader(tape).meta["option_quotes"] == "nbbo"
    assert "plan does not include" not in fetched.printed

    first_pages = [p for p in quote_paths(fake)[: fetched.requests] if "cursor=" not in p]
    tickers = sorted({urlsplit(p).path.removeprefix("/v3/quotes/") for p in first_pages})
    assert len(tickers) >= 20, "every call the chain window can reach"
    assert all("limit=50000" in p and "sort=timestamp" in p and "order=asc" in p for p in first_pages)
    later_pages = len(quote_paths(fake)[: fetched.requests]) - len(first_pages)
    assert later_pages >= 2 * len(tickers), "every contract's later pages"

    # The fake's own quote list, asked directly: irregular times, several in some seconds.
    open_ms, close_ms = market.session_open_ms, market.session_close_ms
    history = {t: fake.quote_history(t, (open_ms - 600_000) * 10**6, close_ms * 10**6) for t in tickers}
    history_times = {t: [q["sip_timestamp"] for q in quotes] for t, quotes in history.items()}
    stamps = [q["sip_timestamp"] for q in history[tickers[len(tickers) // 2]]]
    per_second = [s // 10**9 for s in stamps]
    assert len(stamps) > PAGE_CAP, "more quotes than one page holds"
    assert max(per_second.count(s) for s in set(per_second)) >= 3, "several changes within a second"
    assert sum(s % 1_000_000 != 0 for s in stamps) > len(stamps) * 0.9, "ns times, not a ms grid"

    snapshots = quoted = 0
    seen: set[tuple[float, float]] = set()
    for at_ms, results in chain_lines(tape):
        snapshots += 1
        for result in results:
            ticker = result["details"]["ticker"]
            i = bisect.bisect_right(history_times[ticker], at_ms * 10**6) - 1
            if i < 0:
                assert "last_quote" not in result, f"{ticker} quoted before its first quote at {at_ms}"
                continue
            expected, got = history[ticker][i], result["last_quote"]
            assert (got["bid"], got["ask"]) == (expected["bid_price"], expected["ask_price"]), (ticker, at_ms)
            assert (got["bid_size"], got["ask_size"]) == (expected["bid_size"], expected["ask_size"])
            assert got["last_updated"] == expected["sip_timestamp"]
            quoted += 1
            seen.add((got["bid"], got["ask"]))
    assert snapshots == (23_400 + 300) // 10, "a snapshot every 10 s from 09:25 to the close"
    assert quoted > snapshots * 20, "most contracts quoted once the market opened"
    assert len(seen) > 50, "the quotes move"


def test_streamed_q_lines_are_the_last_change_of_each_second_near_the_money(fetched, market):
    fake, frames = fetched.fake, []
    for line in TapeReader(fetched.tape):
        if line.kind == "ws" and any(e.get("ev") == "Q" for e in line.payload):
            assert all(e["ev"] == "Q" for e in line.payload)
            frames.append((line.t, line.payload))
    assert len(frames) > 600, "a Q frame for most seconds from 09:30 to 09:45"
    history: dict[str, list[dict]] = {}
    stamps: dict[str, list[int]] = {}
    events = 0
    for t, frame in frames:
        second = (t - 1000) // 1000
        assert second * 1000 + 1000 <= t, "sent only once its second has ended"
        spot = market.spot_at(second * 1000)  # the engine's: the bar of the second before has arrived
        for event in frame:
            ticker, strike = event["sym"], int(event["sym"][-8:]) / 1000
            assert abs(strike - spot) <= STREAM_STRIKE_WINDOW
            if ticker not in history:
                start_ns = (market.session_open_ms - 600_000) * 10**6
                history[ticker] = fake.quote_history(ticker, start_ns, market.session_close_ms * 10**6)
                stamps[ticker] = [q["sip_timestamp"] for q in history[ticker]]
            i = bisect.bisect_left(stamps[ticker], (second + 1) * 10**9) - 1
            assert i >= 0 and stamps[ticker][i] >= second * 10**9, "a change within the second"
            last = history[ticker][i]
            got = (event["bp"], event["ap"], event["bs"], event["as"], event["t"], event["q"])
            assert got == (
                last["bid_price"],
                last["ask_price"],
                last["bid_size"],
                last["ask_size"],
                last["sip_timestamp"] // 10**6,
                last["sequence_number"],
            )
            assert parse_ws_frame(json.dumps([event]), t, frozenset({"IWM"})).quotes[0].bid == event["bp"]
            events += 1
    assert 5 <= len(history) <= 20, "the calls within $5 of the spot, not all 32 reachable"
    assert events < sum(len(quotes) for quotes in history.values()), "thinned to one per second"


def test_the_api_key_never_lands_in_a_tape_or_the_cache(fetched):
    assert quote_paths(fetched.fake), "quotes were asked, with the key"
    texts = [gzip.decompress(fetched.tape.read_bytes()).decode()]
    cache = sorted((fetched.data / "cache" / DAY.isoformat()).iterdir())
    texts += [gzip.decompress(f.read_bytes()).decode() for f in cache]
    assert any("/v3/quotes/O:IWM" in text for text in texts[1:]), "quotes are cached raw"
    for name in [fetched.tape.name] + [f.name for f in cache]:
        assert API_KEY not in name
    for text in texts:
        assert API_KEY not in text and "apiKey" not in text


def test_a_resumed_fetch_asks_only_what_the_cache_lacks(fetched, tmp_path):
    fake, data = fetched.fake, tmp_path / "data"
    shutil.copytree(fetched.data, data)
    tapes = [data / "history" / fetched.tape.name]
    first_build, asked = tapes[0].read_bytes(), len(fake.rest_requests)

    tapes[0].unlink()
    assert fetch(fake, data)[0] == tapes
    assert len(fake.rest_requests) == asked, "rebuilt from the cache: nothing asked again"
    assert tapes[0].read_bytes() == first_build

    # An interrupted fetch: one contract's quotes never made it to the cache.
    cache = data / "cache" / DAY.isoformat()
    lost = next(
        f for f in sorted(cache.iterdir()) if "/v3/quotes/" in gzip.decompress(f.read_bytes()).decode()
    )
    lost_path = json.loads(gzip.decompress(lost.read_bytes()))["path"]
    lost.unlink()
    tapes[0].unlink()
    assert fetch(fake, data)[0] == tapes
    again = fake.rest_requests[asked:]
    ticker = urlsplit(lost_path).path
    assert again[0] == lost_path and all(urlsplit(p).path == ticker for p in again), again
    assert len(again) >= 2, "all of its pages, and nothing else"
    assert tapes[0].read_bytes() == first_build


def test_a_plan_without_quotes_falls_back_to_minute_bars_and_says_so_once(fake, tmp_path):
    fake.quotes_entitled(False)
    out, err = io.StringIO(), io.StringIO()
    env = env_for(fake, tmp_path / "data")
    args = ["--fetch", DAY.isoformat(), "--out", str(tmp_path / "report"), "--no-charts"]
    assert main(args, Io(out, err, environ=env, env_file=None, sleep=lambda _s: None)) == 0, err.getvalue()
    printed = out.getvalue()
    assert printed.count(QUOTES_PLAN_MESSAGE) == 1
    assert len(quote_paths(fake)) == 1, "one refusal switches the whole fetch to minute bars"
    tape = tmp_path / "data" / "history" / f"{DAY.isoformat()}.jsonl.gz"
    assert TapeReader(tape).meta["option_quotes"] == "minute"
    assert "reconstructed (minute)" in printed and "minute-bar approximation" in printed
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["minute_bar_approximation"] is True
    assert "minute-bar approximation" in summary["data"]
    assert [day["source"] for day in summary["days"]] == ["reconstructed (minute)"]


def test_an_nbbo_day_is_labelled_so_and_not_as_an_approximation(fetched, tmp_path):
    shutil.copytree(fetched.data / "history", tmp_path / "data" / "history")  # the tape is kept, not fetched
    out, err = io.StringIO(), io.StringIO()
    env = env_for(fetched.fake, tmp_path / "data")
    args = ["--fetch", DAY.isoformat(), "--out", str(tmp_path / "report"), "--no-charts"]
    assert main(args, Io(out, err, environ=env, env_file=None, sleep=lambda _s: None)) == 0, err.getvalue()
    printed = out.getvalue()
    assert "reconstructed (nbbo)" in printed and "minute-bar approximation" not in printed
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["minute_bar_approximation"] is False
    assert [day["source"] for day in summary["days"]] == ["reconstructed (nbbo)"]


def test_a_rejected_key_on_quotes_stops_the_fetch(fake, tmp_path):
    fake.fail_rest(401, path_prefix="/v3/quotes/")
    tapes, printed = fetch(fake, tmp_path / "data")
    assert tapes == []
    assert "HTTP 401" in printed and "plan does not include" not in printed
    assert len(quote_paths(fake)) == 1


def test_an_unreachable_server_is_said_at_once_and_stops_the_fetch_after_one_day(tmp_path):
    """Each day waited about two minutes of retries in silence, then the next day did the same."""
    import socket

    from structlog.testing import capture_logs

    from history import FETCH_MAX_ATTEMPTS, STOPPED_MESSAGE

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {
        "POLYGON_API_KEY": API_KEY,
        "POLYGON_REST_URL": f"http://127.0.0.1:{port}",
        "DATA_DIR": str(tmp_path),
    }
    settings = resolve_settings({}, environ=env, env_file=None)
    out, sleeps = io.StringIO(), []
    with capture_logs() as logs:
        tapes = fetch_history(
            settings,
            DAY,
            DAY + datetime.timedelta(days=3),
            sleep=sleeps.append,
            progress_stream=io.StringIO(),
            out=out,
        )
    printed = out.getvalue()
    assert tapes == [] and len(sleeps) == FETCH_MAX_ATTEMPTS - 1  # one request's retries, then no other day
    assert printed.count("not rebuilt") == 1 and "HTTP 599" in printed and STOPPED_MESSAGE in printed
    said = [e for e in logs if e["event"] == "rest_retry" and e["log_level"] == "warning"]
    assert len(said) == 1 and said[0]["status"] == 599 and said[0]["error"], said
    assert API_KEY not in printed + repr(logs)
