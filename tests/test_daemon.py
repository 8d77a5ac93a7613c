"""The live daemon end to end over real sockets: fake Polygon (WS + REST) and fake Pushover on 127.0.0.1."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from builders import DAY, at
from structlog.testing import capture_logs

from alert_text import price
from clock import SimClock, WallClock
from config import PAUSE_FILE, Rules, Settings
from daemon import Daemon
from events import Alert, Tick
from market_calendar import MarketCalendar
from pnl_tracker import Journal
from replay import replay_tape
from sim.market import SyntheticMarket, demo_script
from sim.polygon_server import FakePolygon, SyntheticSource
from sim.pushover_server import FakePushover

API_KEY = "testkey1234"
TOKEN = "a" * 30
USER = "u" * 30
SPEED = 40.0


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return SyntheticMarket(demo_script())


def settings_for(polygon: FakePolygon, pushover: FakePushover, data_dir: Path, **changes: object) -> Settings:
    """The daemon's settings against the fakes. At SPEED, the 15 s silence that redials the stream is 0.4 s
    of wall time, which a loaded test machine can take from the fake's own thread: 45 s unless a test says.
    """
    changes = {"stream_silence_seconds": 45.0, **changes}
    return Settings(
        rules=Rules(),
        polygon_api_key=API_KEY,
        polygon_ws_url=polygon.ws_url,
        polygon_rest_url=polygon.rest_url,
        pushover_token=TOKEN,
        pushover_user_key=USER,
        pushover_api_url=pushover.url,
        data_dir=data_dir,
        **changes,
    )


def start_daemon(
    settings: Settings, clock: SimClock | WallClock, **options: Any
) -> tuple[Daemon, threading.Event, threading.Thread]:
    stop = threading.Event()
    daemon = Daemon(settings, clock, stop=stop, **options)
    thread = threading.Thread(target=daemon.run, name="daemon-under-test")
    thread.start()
    return daemon, stop, thread


def stop_daemon(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(15)
    assert not thread.is_alive(), "daemon did not stop within 15 s"


@contextmanager
def daemon_running(
    settings: Settings, clock: SimClock | WallClock, **options: Any
) -> Iterator[tuple[Daemon, threading.Thread]]:
    daemon, stop, thread = start_daemon(settings, clock, **options)
    try:
        yield daemon, thread
    finally:
        stop_daemon(stop, thread)


# Exits so wide that a position stays held while a test works on its marks.
WIDE_EXITS = Rules(
    stop_loss_percent=90, max_giveback_percent=95, tighten_giveback_percent=95, vwap_exit_blocks=50
)


def wide_exits(settings: Settings) -> Settings:
    return dataclasses.replace(settings, rules=WIDE_EXITS)


def run_daemon(settings: Settings, clock: SimClock, until, timeout_s: float = 60.0) -> Daemon:
    """Run the daemon in a thread until `until()` holds (or the timeout), then stop it cleanly."""
    daemon, stop, thread = start_daemon(settings, clock)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until():
        time.sleep(0.05)
    stop_daemon(stop, thread)
    return daemon


@contextmanager
def fakes(market: SyntheticMarket, start: int, speed: float = SPEED) -> Iterator[tuple]:
    """The fake Pushover and Polygon (both clusters) on 127.0.0.1, with a rehearsal clock started at `start`."""
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=speed) as polygon,
    ):
        yield pushover, polygon, SimClock(start, speed)


def kinds(pushover: FakePushover) -> list[str]:
    return [m.form["title"].rsplit("— ", 1)[-1] for m in pushover.messages]


def replayed_alerts(tape: Path, journal_path: Path) -> list[Alert]:
    """Every alert the replay of `tape` decides, with the default rules, into a new journal."""
    replayed: list[Alert] = []
    rules = Rules()
    replay_tape(
        tape,
        rules=rules,
        calendar=MarketCalendar(rules),
        journal=Journal(journal_path),
        on_alerts=replayed.extend,
        on_log=lambda _l: None,
    )
    return replayed


def test_live_rehearsal_sends_buy_then_sell_as_the_replay_of_its_own_tape(market, tmp_path):
    start = at(10, 4)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        clock = SimClock(start, SPEED)
        settings = settings_for(polygon, pushover, tmp_path)
        run_daemon(settings, clock, until=lambda: "SELL" in kinds(pushover))
    sent = kinds(pushover)
    assert sent[0] == "START" and [k for k in sent if k in ("BUY", "SELL")] == ["BUY", "SELL"]
    # Every alert the daemon sent, START aside, must come out of the replay of its own tape identically.
    live = [m for m in pushover.messages if m.form["title"].endswith(("BUY", "SELL"))]

    replayed = replayed_alerts(tmp_path / "tapes" / "2025-10-02.jsonl.gz", tmp_path / "r.sqlite3")
    mirrored = [a for a in replayed if a.kind in ("BUY", "SELL")][: len(live)]
    assert [(a.title, a.message) for a in mirrored] == [(m.form["title"], m.form["message"]) for m in live]
    assert [a.at_ms // 1000 for a in mirrored] == [int(m.form["timestamp"]) for m in live]


def test_a_restart_after_a_minute_down_sends_no_stall_for_the_downtime_and_its_tape_replays_the_same(
    market, tmp_path
):
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        settings = settings_for(polygon, pushover, tmp_path)
        with daemon_running(settings, SimClock(start, SPEED)) as (daemon, _thread):
            assert wait_for(lambda: daemon.engine.counters.bars > 20, 30)
        stopped_ms = polygon.now_ms()
        time.sleep(75 / SPEED)  # 75 market seconds down: more than STALL_ALERT_SECONDS
        restarted_ms = polygon.now_ms()
        with daemon_running(settings, SimClock(restarted_ms, SPEED)) as (daemon, _thread):
            bars = daemon.engine.counters.bars
            assert wait_for(lambda: daemon.engine.counters.bars > bars + 60, 30)
    system = [(k, int(m.form["timestamp"])) for k, m in zip(kinds(pushover), pushover.messages, strict=True)
              if k in ("STALL", "RECOVERED")]  # fmt: skip
    assert kinds(pushover).count("START") == 2
    assert not [t for k, t in system if stopped_ms // 1000 - 1 <= t <= restarted_ms // 1000 + 1], system
    replayed = replayed_alerts(tmp_path / "tapes" / "2025-10-02.jsonl.gz", tmp_path / "r.sqlite3")
    assert [(a.kind, a.at_ms // 1000) for a in replayed if a.kind in ("STALL", "RECOVERED")] == system


def test_a_tape_folder_deleted_while_recording_is_said_once_and_recording_goes_on(market, tmp_path):
    import shutil

    start = at(10, 2)
    tape = tmp_path / "tapes" / "2025-10-02.jsonl.gz"
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
        daemon_running(settings_for(polygon, pushover, tmp_path), SimClock(start, SPEED)) as (
            daemon,
            _thread,
        ),
    ):
        assert wait_for(lambda: tape.is_file() and daemon.engine.counters.bars > 10, 30)
        shutil.rmtree(tmp_path / "tapes")
        assert wait_for(lambda: "TAPE FAILING" in kinds(pushover), 30), "the deleted tape was not said"
        assert wait_for(lambda: tape.is_file() and daemon.recorder.problem is None, 30), (
            "recording not resumed"
        )
        bars = daemon.engine.counters.bars
        assert wait_for(lambda: daemon.engine.counters.bars > bars + 80, 30)
    assert kinds(pushover).count("TAPE FAILING") == 1
    said = next(m.form["message"] for m in pushover.messages if m.form["title"].endswith("TAPE FAILING"))
    assert "deleted" in said and "new file" in said
    with gzip.open(tape, "rt") as lines:
        assert sum(1 for line in lines if '"ws"' in line) > 40, "the new file holds the frames since"


def test_a_tape_that_cannot_be_written_for_a_while_says_when_recording_resumes(market, tmp_path):
    """TAPE FAILING had no matching alert: the user never learnt that recording was back, nor the gap."""
    import shutil

    start = at(10, 2)
    folder = tmp_path / "tapes"
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
        daemon_running(
            settings_for(polygon, pushover, tmp_path), SimClock(start, SPEED), tape_retry_s=0.5
        ) as (
            daemon,
            _thread,
        ),
    ):
        assert wait_for(lambda: (folder / "2025-10-02.jsonl.gz").is_file(), 30)
        while not folder.is_file():  # a file where the folder was: no new tape can be made
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                folder.open("x").close()
        assert wait_for(lambda: "TAPE FAILING" in kinds(pushover), 30), "the failure was not said"
        time.sleep(1.0)
        folder.unlink()
        assert wait_for(lambda: "TAPE RECOVERED" in kinds(pushover), 30), "the recovery was not said"
        assert daemon.recorder.problem is None
    assert kinds(pushover).count("TAPE FAILING") == 1 and kinds(pushover).count("TAPE RECOVERED") == 1
    said = next(m.form["message"] for m in pushover.messages if m.form["title"].endswith("TAPE RECOVERED"))
    assert said.startswith("Recording of the feed resumed; the tape has a gap from 10:0"), said


class WallClockAt(WallClock):
    """The live daemon's clock as it sees it (checked against the feed's), running as `sim` runs."""

    __slots__ = ("_sim",)

    def __init__(self, sim: SimClock) -> None:
        object.__setattr__(self, "_sim", sim)

    def now_ms(self) -> int:
        return self._sim.now_ms()

    def sleep_scale(self) -> float:
        return self._sim.sleep_scale()


def test_a_live_clock_behind_the_feeds_is_said_once_and_degrades_health(market, tmp_path):
    """Bars stamped two minutes ahead of this machine's clock were taken without a word: the entry
    cut-off and the 15:55 time stop ran two minutes late, and /health said ok."""
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
        daemon_running(
            settings_for(polygon, pushover, tmp_path), WallClockAt(SimClock(start - 120_000, SPEED))
        ) as (daemon, _thread),
    ):
        said = "clock is at least 1"
        assert wait_for(lambda: any(said in p for p in daemon.health.get("problems") or ()), 30)
        assert daemon.health["status"] == "degraded"
        assert wait_for(lambda: "SYSTEM" in kinds(pushover), 10)
        bars = daemon.engine.counters.bars
        assert wait_for(lambda: daemon.engine.counters.bars > bars + 40, 30), "trading goes on"
    alerts = [m.form["message"] for m in pushover.messages if m.form["title"].endswith("SYSTEM")]
    assert len(alerts) == 1 and alerts[0].startswith("This machine's clock is at least 1"), alerts
    assert "NTP" in alerts[0]


def test_holiday_idles_without_connecting(market, tmp_path):
    christmas_morning = at(9, 0, 0, day=date(2025, 12, 25))
    with (
        FakePushover() as pushover,
        FakePolygon(
            SyntheticSource(market), api_key=API_KEY, start_ms=christmas_morning, speed=SPEED
        ) as polygon,
    ):
        clock = SimClock(christmas_morning, SPEED)
        settings = settings_for(polygon, pushover, tmp_path)
        started = time.monotonic()
        run_daemon(settings, clock, until=lambda: time.monotonic() - started > 3.0)
        # No stream, no polls: only the start-up key check (its 200 says nothing more than a log line).
        assert polygon.ws_connections == 0 and polygon.rest_requests == [KEY_CHECK]
    assert kinds(pushover) == ["START"]
    assert "PAUSED" not in pushover.messages[0].form["message"]


def test_a_start_while_paused_says_so(market, tmp_path):
    """A PAUSE left from an earlier --pause outlives restarts; the START said nothing of it, so a quiet
    day looked like a day without a signal."""
    christmas_morning = at(9, 0, 0, day=date(2025, 12, 25))
    (tmp_path / PAUSE_FILE).write_text("paused")
    with (
        FakePushover() as pushover,
        FakePolygon(
            SyntheticSource(market), api_key=API_KEY, start_ms=christmas_morning, speed=SPEED
        ) as polygon,
    ):
        started = time.monotonic()
        run_daemon(settings_for(polygon, pushover, tmp_path), SimClock(christmas_morning, SPEED),
                   until=lambda: time.monotonic() - started > 2.0)  # fmt: skip
    (start,) = pushover.messages
    assert "Entries PAUSED (python3 main.py --resume allows them)" in start.form["message"]


def test_a_restart_within_the_same_minute_still_sends_its_own_start(market, tmp_path):
    start = at(10, 30)
    with FakePushover() as pushover:
        for offset_s in (0, 20):  # both starts fall in minute 10:30
            polygon_start = start + offset_s * 1000
            with FakePolygon(
                SyntheticSource(market), api_key=API_KEY, start_ms=polygon_start, speed=1.0
            ) as polygon:
                settings = settings_for(polygon, pushover, tmp_path)
                wanted = offset_s // 20 + 1
                run_daemon(
                    settings,
                    SimClock(polygon_start, 1.0),
                    until=lambda n=wanted: kinds(pushover).count("START") >= n,
                )
    assert kinds(pushover).count("START") == 2


def test_socket_dropped_mid_position_reconnects_backfills_and_still_sells(market, tmp_path):
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        clock = SimClock(start, SPEED)
        dropped = []

        def drop_once_holding() -> bool:
            if "BUY" in kinds(pushover) and not dropped:
                polygon.drop_connections()
                dropped.append(polygon.now_ms())
            return "SELL" in kinds(pushover)

        daemon = run_daemon(settings_for(polygon, pushover, tmp_path), clock, until=drop_once_holding)
        backfills = [p for p in polygon.rest_requests if "/range/1/second/" in p]
        assert dropped and polygon.ws_connections >= 2
        assert polygon.subscriptions.count("A.IWM,A.SPY") >= 2 or len(polygon.subscriptions) >= 2
        assert backfills, "no REST backfill after the reconnect"
    assert kinds(pushover).count("BUY") == 1 and kinds(pushover).count("SELL") == 1
    assert daemon.engine.counters.late_bars >= 0


def test_a_start_mid_session_backfills_from_the_open_and_a_restart_from_its_last_taped_bar(market, tmp_path):
    """The first connection backfilled nothing, so a start at 10:02 had VWAP and slopes from 10:02 on,
    and a restart after a kill -9 (the tape a few seconds short) had a hole where the entries were."""
    start = at(10, 2)
    with fakes(market, start) as (pushover, polygon, clock):
        settings = settings_for(polygon, pushover, tmp_path)
        with daemon_running(settings, clock) as (daemon, _thread):
            # 32 minutes of seconds since the open: only a backfill brings them.
            assert wait_until(lambda: daemon.engine.market.counters.bars_today > 1_800)
        assert first_backfill(polygon) == (at(9, 30) - 5_000, "IWM")
        last_bar = daemon.engine.last_bar
        assert last_bar is not None
        polygon.rest_requests.clear()
        with daemon_running(settings, clock):
            assert wait_until(lambda: first_backfill(polygon) is not None)
        since, _sym = first_backfill(polygon)
        assert last_bar.end_ms - 5_000 <= since <= polygon.now_ms(), "from the last taped bar, not the open"


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def first_backfill(polygon: FakePolygon) -> tuple[int, str] | None:
    """(from ms, symbol) of the first per-second aggregates request the fake Polygon got, if any."""
    for path in polygon.rest_requests:
        if "/range/1/second/" in path:
            parts = path.split("?")[0].split("/")
            return int(parts[parts.index("second") + 1]), parts[parts.index("ticker") + 1]
    return None


def test_a_daemon_started_behind_the_servers_clock_still_buys(market, tmp_path):
    """The README's rehearsal: a daemon started 8 s after a speed-20 server runs 160 market seconds behind
    it, and every chain quote is stamped that far ahead. A rule that took stamps over 60 s ahead for stale
    sent no BUY all day (a new user's audit)."""
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        behind = SimClock(start - 160_000, SPEED)
        run_daemon(settings_for(polygon, pushover, tmp_path), behind, until=lambda: "BUY" in kinds(pushover))
    assert "BUY" in kinds(pushover), kinds(pushover)


def test_garbage_frames_are_counted_and_the_daemon_goes_on(market, tmp_path):
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        polygon.send_garbage(["not json at all", '{"ev": "A"}', '[{"ev": "XQ", "sym": "IWM"}]', "[1, 2]"])
        clock = SimClock(start, SPEED)
        with capture_logs() as logs:
            daemon = run_daemon(
                settings_for(polygon, pushover, tmp_path), clock, until=lambda: "BUY" in kinds(pushover)
            )
    counters = daemon.pipeline.decoder.counters
    assert counters.bad_frames >= 2 and counters.ignored_events >= 1 and counters.bad_events >= 2
    assert "BUY" in kinds(pushover)
    # Said in the log (counts, never the bytes), at most once a minute: before, only /health counted them.
    said = [e for e in logs if e["event"] == "bad_inputs_dropped"]
    assert len(said) == 1 and said[0]["bad_frames"] >= 1 and "not json" not in str(said)


def test_chain_storm_blocks_entries_until_the_chain_recovers(market, tmp_path):
    from structlog.testing import capture_logs

    start, storm_end = at(10, 2), at(10, 6, 40)  # the storm covers the first burst (10:06:25)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        polygon.fail_rest(500, seconds=(storm_end - start) / 1000 / SPEED, path_prefix="/v3/snapshot/options")
        clock = SimClock(start, SPEED)
        with capture_logs() as logs:
            daemon = run_daemon(
                settings_for(polygon, pushover, tmp_path), clock, until=lambda: clock.now_ms() > at(10, 7, 30)
            )
    blocked = [e for e in logs if e.get("event") == "entry_blocked"]
    assert blocked and {e["rule"] for e in blocked} <= {"chain_missing", "chain_stale"}
    retries = [
        e for e in logs if e.get("event") == "rest_retry" and "/v3/snapshot/options" in e.get("path", "")
    ]
    assert [e["wait_s"] for e in retries[:3]] == [1.0, 2.0, 4.0]
    assert "BUY" not in kinds(pushover)
    assert daemon.engine.chain is not None and daemon.engine.chain.received_ms > storm_end


ROOT = Path(__file__).resolve().parents[1]


def launch(polygon: FakePolygon, pushover: FakePushover, data_dir: Path, log_path: Path) -> subprocess.Popen:
    """`python main.py` in rehearsal mode against the fakes, its clock started at the fake's now."""
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py")],
        cwd=data_dir,
        env=launch_env(polygon, pushover, data_dir),
        stdout=log,
        stderr=log,
    )


def launch_env(polygon: FakePolygon, pushover: FakePushover, data_dir: Path) -> dict[str, str]:
    """The environment of `launch`: the fakes' addresses and a rehearsal clock at the fake's now."""
    started = datetime.fromtimestamp(polygon.now_ms() / 1000, tz=UTC).isoformat()
    return {
        **{k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))},
        "PYTHON_DOTENV_DISABLED": "1",
        "POLYGON_API_KEY": API_KEY,
        "POLYGON_WS_URL": polygon.ws_url,
        "POLYGON_REST_URL": polygon.rest_url,
        "PUSHOVER_TOKEN": TOKEN,
        "PUSHOVER_USER_KEY": USER,
        "PUSHOVER_API_URL": pushover.url,
        "DATA_DIR": str(data_dir),
        "SIM_CLOCK_START": started,
        "SIM_CLOCK_SPEED": str(SLOW),
        "LOG_FORMAT": "json",
    }


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


SLOW = 20.0


def run_until(
    process: subprocess.Popen,
    until: Callable[[], bool],
    what: str,
    *,
    kill: bool = False,
    linger_s: float = 0.0,
) -> None:
    """Let a launched daemon run until `until()` holds (60 s at most), `linger_s` more, then end it:
    SIGKILL when `kill` (a crash), else SIGTERM (a clean stop)."""
    try:
        assert wait_for(until, 60), f"no {what}"
        time.sleep(linger_s)
    finally:
        if kill:
            process.kill()
            process.wait(10)
        else:
            process.send_signal(signal.SIGTERM)
            process.wait(15)


def open_position_peak(journal_path: Path) -> float | None:
    db = sqlite3.connect(journal_path)
    try:
        row = db.execute("SELECT peak FROM positions WHERE open=1").fetchone()
    finally:
        db.close()
    return None if row is None else row[0]


def test_kill_9_mid_position_then_restart_sells_once_and_never_buys_twice(market, tmp_path):
    log_path = tmp_path / "daemon.log"
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 3), speed=SLOW) as polygon,
    ):
        first = launch(polygon, pushover, tmp_path, log_path)
        run_until(first, lambda: "BUY" in kinds(pushover), "a BUY from the first process", kill=True)
        peak_at_kill = open_position_peak(tmp_path / "journal.sqlite3")
        assert peak_at_kill is not None, "the BUY's position is not in the journal"
        second = launch(polygon, pushover, tmp_path, log_path)
        run_until(second, lambda: "SELL" in kinds(pushover), "a SELL after the restart", linger_s=1.0)
    sent = kinds(pushover)
    assert sent.count("BUY") == 1 and sent.count("SELL") == 1 and sent.count("START") == 2
    start_texts = [m.form["message"] for m in pushover.messages if m.form["title"].endswith("START")]
    assert "Holding O:IWM" in start_texts[1]
    # The peak as the SELL and the journal state it (a half cent is not rounded away).
    assert f"(peak {price(peak_at_kill)})" in start_texts[1]
    db = sqlite3.connect(tmp_path / "journal.sqlite3")
    (peak,) = db.execute("SELECT peak FROM trades").fetchone()
    assert peak >= peak_at_kill
    output = log_path.read_text()
    for secret in (API_KEY, TOKEN, USER):
        assert secret not in output


def test_kill_9_while_pushover_holds_the_buy_resends_it_once_marked_as_a_possible_repeat(market, tmp_path):
    # Pushover has the BUY (it is on the phone) but its answer never reaches the killed process.
    log_path = tmp_path / "daemon.log"
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 3), speed=SLOW) as polygon,
    ):
        first = launch(polygon, pushover, tmp_path, log_path)
        try:
            assert wait_for(lambda: "START" in kinds(pushover), 60), "no START from the first process"
            pushover.slow(30.0)
            assert wait_for(lambda: any("BUY" in m.form["title"] for m in pushover.history), 60), "no BUY"
        finally:
            first.kill()
            first.wait(10)
        pushover.slow(0.0)
        second = launch(polygon, pushover, tmp_path, log_path)
        run_until(second, lambda: "SELL" in kinds(pushover), "a SELL after the restart")
    sent = kinds(pushover)
    assert sent.count("BUY") == 1 and sent.count("BUY (possible repeat)") == 1, sent
    assert sent.count("SELL") == 1 and sent.index("BUY (possible repeat)") < sent.index("SELL")
    repeat = next(m.form for m in pushover.messages if m.form["title"].endswith("(possible repeat)"))
    original = next(m.form for m in pushover.messages if m.form["title"].endswith("— BUY"))
    assert repeat["message"].startswith("Possible repeat:") and original["message"] in repeat["message"]
    assert repeat["timestamp"] == original["timestamp"], "the repeat shows when the BUY was decided"


def test_sigterm_exits_0_within_10_seconds(market, tmp_path):
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 3), speed=SLOW) as polygon,
    ):
        process = launch(polygon, pushover, tmp_path, tmp_path / "daemon.log")
        try:
            assert wait_for(lambda: "START" in kinds(pushover) and polygon.ws_connections >= 1, 60)
            asked = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(10)
            took = time.monotonic() - asked
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 0 and took < 10


def test_volume_profile_is_fetched_once_a_day_and_reused_after_a_restart(market, tmp_path):
    start = at(9, 40)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        settings = settings_for(polygon, pushover, tmp_path)
        profiles = []
        for clock_start in (start, None):
            clock = SimClock(clock_start or polygon.now_ms(), SPEED)
            daemon, stop, thread = start_daemon(settings, clock)
            assert wait_for(lambda d=daemon: d.engine.profile is not None, 30), "no volume profile"
            profiles.append(daemon.engine.profile)
            stop_daemon(stop, thread)
        minute_requests = [p for p in polygon.rest_requests if "/range/1/minute/" in p]
    assert len(minute_requests) == 1
    assert profiles[0].minutes and profiles[1].minutes == profiles[0].minutes
    assert profiles[0].days == 10


def test_health_endpoint_of_the_running_daemon(market, tmp_path):
    import json
    import urllib.request

    start, speed = at(10, 2), 4.0  # slow enough that a loaded machine does not look like a 5 s stall
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=speed) as polygon,
    ):
        settings = settings_for(polygon, pushover, tmp_path, health_port=0)
        daemon, stop, thread = start_daemon(settings, SimClock(start, speed))
        try:
            ready = ("conditions", "ws_connected")
            assert wait_for(
                lambda: daemon.health_server is not None and all(daemon.health.get(k) for k in ready), 30
            )
            url = f"http://127.0.0.1:{daemon.health_server.port}/health"
            with urllib.request.urlopen(url, timeout=5) as answer:
                status, body = answer.status, json.loads(answer.read())
        finally:
            stop_daemon(stop, thread)
    assert status == 200 and body["status"] == "ok" and body["market_open"] is True
    for key in (
        "last_bar_age_s",
        "chain_age_s",
        "position",
        "outbox_pending",
        "late_bars",
        "bad_frames",
        "version",
    ):
        assert key in body
    assert "volume_surge" in body["conditions"] and "spy_leadership" in body["conditions"]
    assert API_KEY not in json.dumps(body)


def test_chain_age_is_a_number_before_the_first_chain_as_designs_health_contract_says(market, tmp_path):
    start = at(10, 2)
    with fakes(market, start) as (pushover, polygon, clock):
        daemon = Daemon(settings_for(polygon, pushover, tmp_path), clock)
        try:
            time.sleep(0.1)
            body = daemon._snapshot()
        finally:
            daemon.instance_lock.release()
            daemon.journal.close()
    assert isinstance(body["chain_age_s"], float) and body["chain_age_s"] >= 0.0
    assert body["chain_received"] is False


def test_a_stalled_health_names_its_cause_in_its_problems(market, tmp_path):
    """/health said "stalled" (a 503) with an empty problems list: the operator was told nothing."""
    start = at(10, 2)
    with fakes(market, start) as (pushover, polygon, _clock):
        clock = SimClock(start, 100.0)
        daemon = Daemon(settings_for(polygon, pushover, tmp_path), clock)
        try:
            daemon.engine.on_event(Tick(clock.now_ms()))  # the engine watches from here; no bar comes
            time.sleep(0.2)  # 20 market seconds
            body = daemon._snapshot()
        finally:
            daemon.instance_lock.release()
            daemon.journal.close()
    assert body["status"] == "stalled", body
    assert body["problems"][0].startswith("no IWM bar for ") and "entries paused" in body["problems"][0]


def test_chain_age_before_the_days_first_chain_counts_from_midnight_not_from_a_start_days_ago(
    market, tmp_path
):
    """A daemon started the day before said after midnight that its chain was as old as the process."""
    start = at(23, 50)
    with fakes(market, start) as (pushover, polygon, _clock):
        clock = SimClock(start, 3000.0)  # 50 market minutes a second
        daemon = Daemon(settings_for(polygon, pushover, tmp_path), clock)
        try:
            time.sleep(0.4)  # past midnight: 00:10 or so
            now = clock.now_ms()
            body = daemon._snapshot()
        finally:
            daemon.instance_lock.release()
            daemon.journal.close()
    since_midnight_s = (now - at(0, 0, day=DAY + timedelta(days=1))) / 1000
    assert since_midnight_s > 0 and body["chain_received"] is False
    assert since_midnight_s - 5 <= body["chain_age_s"] <= since_midnight_s + 60


def test_a_health_port_already_taken_is_said_once_and_served_once_it_is_free(market, tmp_path):
    import json
    import socket
    import urllib.error
    import urllib.request

    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        settings = settings_for(polygon, pushover, tmp_path, health_port=port)
        with daemon_running(settings, SimClock(start, SPEED)) as (daemon, _thread):

            def said() -> list[str]:
                return [m.form["message"] for m in pushover.messages if "/health" in m.form["message"]]

            assert wait_for(lambda: said() and daemon.health.get("ws_connected"), 30), (
                "health failure not said"
            )
            # The snapshot behind /health is taken once a second: it may follow the alert by that much.
            assert wait_for(lambda: any("/health" in p for p in daemon.health["problems"]), 5)
            problems = daemon.health["problems"]
            blocker.close()
            assert wait_for(lambda: daemon.health_server is not None, 10), "the freed port was never bound"

            def served_problems() -> list[str]:
                # A 503 (failing or stalled, as the first seconds of a 40x rehearsal can be) has the body too.
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                        return json.loads(answer.read())["problems"]
                except urllib.error.HTTPError as refused:
                    return json.loads(refused.read())["problems"]

            assert wait_for(lambda: not any("/health" in p for p in served_problems()), 10)
            bars_then = daemon.engine.counters.bars
            assert wait_for(lambda: daemon.engine.counters.bars > bars_then, 10), "the engine stopped"
    assert len(said()) == 1 and f"127.0.0.1:{port}" in said()[0]
    assert any("/health" in p for p in problems) and daemon.health["status"] != "failing"


def test_a_stream_that_cannot_connect_is_on_health_from_the_first_seconds(market, tmp_path):
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        closed = socket.create_server(("127.0.0.1", 0))
        dead_url = f"ws://127.0.0.1:{closed.getsockname()[1]}/stocks"
        closed.close()  # nothing listens there now: every dial is refused
        settings = dataclasses.replace(settings_for(polygon, pushover, tmp_path), polygon_ws_url=dead_url)
        with daemon_running(settings, SimClock(start, SPEED)) as (daemon, _thread):
            first = dict(daemon.health)

            def down() -> list[str]:
                problems = daemon.health.get("problems", [])
                return [p for p in problems if p.startswith("stream not connected")]

            assert wait_for(down, 20), f"no stream problem on /health: {daemon.health.get('problems')}"
            problem = down()[0]
    assert first.get("last_bar_age_s", 0) < 3600, "an age counted from 1970 before the first event"
    assert "refused" in problem.lower() or "connect" in problem.lower()
    assert API_KEY not in problem


def test_a_delayed_feed_is_said_once_and_on_health_since_no_entry_can_fire(market, tmp_path):
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        clock = SimClock(start + 15 * 60_000, SPEED)  # our clock 15 minutes ahead: every bar 900 s old
        with daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread):

            def delayed() -> list[str]:
                return [p for p in daemon.health.get("problems", []) if p.startswith("bars arrive")]

            assert wait_for(delayed, 30), daemon.health.get("problems")
            bars = daemon.engine.counters.bars
            assert wait_for(lambda: daemon.engine.counters.bars > bars + 40, 30)
            problem = delayed()[0]
    said = [m.form["message"] for m in pushover.messages if "delayed plan" in m.form["message"]]
    assert len(said) == 1 and "FEED ERROR" in kinds(pushover)
    assert "900 s" in problem or "899 s" in problem or "901 s" in problem
    assert "BUY" not in kinds(pushover)


def test_a_once_a_day_alert_is_not_said_again_by_a_restart_the_same_day(market, tmp_path):
    """Each restart (a deploy, a crash) told the phone of the delayed plan again: "once a day" lived in
    the daemon's memory."""
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        settings = settings_for(polygon, pushover, tmp_path)
        for run in range(2):
            clock = SimClock(polygon.now_ms() + 15 * 60_000, SPEED)  # every bar 900 s old
            with daemon_running(settings, clock) as (daemon, _thread):

                def delayed(daemon: Daemon = daemon) -> list[str]:
                    return [p for p in daemon.health.get("problems", []) if p.startswith("bars arrive")]

                assert wait_for(delayed, 30), (run, daemon.health.get("problems"))
                assert wait_for(lambda daemon=daemon: daemon.outbox.pending_count() == 0, 10)
    said = [m.form["message"] for m in pushover.messages if "delayed plan" in m.form["message"]]
    assert len(said) == 1 and kinds(pushover).count("START") == 2


def test_bars_late_for_half_a_minute_are_a_hiccup_not_a_delayed_plan(market, tmp_path):
    """A busy machine or a slow network minute made one late bar look like a delayed plan: the phone got a
    FEED ERROR "(a delayed plan?)" of a feed that was on time a second later."""
    speed, start = SLOW / 2, at(10, 2)
    shift = [0.0]
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=speed) as polygon,
    ):
        # Our clock 20 market seconds ahead of the feed's: each bar 20 s late ...
        clock = SimClock(start + 20_000, speed, wall=lambda: time.monotonic() + shift[0])
        with daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread):
            assert wait_for(lambda: daemon.engine.last_bar is not None, 20)
            late_from = clock.now_ms()
            assert wait_for(lambda: clock.now_ms() >= late_from + 30_000, 20)
            shift[0] = -20 / speed  # ... for 30 s, then on time again
            on_time_from = clock.now_ms()
            assert wait_for(lambda: clock.now_ms() >= on_time_from + 90_000, 30)
            late_said = [p for p in daemon.health.get("problems", []) if p.startswith("bars arrive")]
    assert "FEED ERROR" not in kinds(pushover) and late_said == []
    assert daemon.engine.counters.bars > 60


def test_rest_refusing_the_key_sends_one_feed_error_and_retries_slowly(market, tmp_path):
    start = at(10, 2)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        polygon.fail_rest(401, seconds=300 / SPEED, path_prefix="/v3/snapshot/options")
        clock = SimClock(start, SPEED)
        seen: list[tuple[int, str, list[str]]] = []
        with daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread):
            while clock.now_ms() <= at(10, 6):
                seen.append(
                    (clock.now_ms(), daemon.health.get("status", ""), daemon.health.get("problems", []))
                )
                time.sleep(0.05)
        chain_calls = [p for p in polygon.rest_requests if p.startswith("/v3/snapshot/options/IWM?")]
    feed_errors = [m for m in pushover.messages if "FEED ERROR" in m.form["title"]]
    assert len(feed_errors) == 1 and "HTTP 401" in feed_errors[0].form["message"]
    # /health fails within the first minute of the refusal, not after the slow retries stretched its limit
    # (counted from the daemon's first snapshot: its start-up is wall time, 40 market seconds a second).
    up = next(t for t, status, _problems in seen if status != "closed")
    refused = [
        t for t, status, problems in seen if status == "failing" and any("HTTP 401" in p for p in problems)
    ]
    assert refused and refused[0] < up + 60_000
    assert 2 <= len(chain_calls) <= 6  # every 60 s while refused, not every 10 s (no retries of a 401)
    assert daemon.engine.chain is None or daemon.engine.chain.received_ms >= start + 300_000


def test_a_chain_missing_for_minutes_in_session_is_said_once_and_when_it_comes_again(market, tmp_path):
    """Every chain poll failing (5xx, a page cycle, a proxy's garbage) blocked every entry for the whole
    day, and only /health said so: nothing reached the phone."""
    start = at(10, 2)
    with fakes(market, start) as (pushover, polygon, clock):
        polygon.fail_rest(503, seconds=360 / SPEED, path_prefix="/v3/snapshot/options/IWM")
        with daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread):
            assert wait_for(lambda: "FEED RECOVERED" in kinds(pushover), 30), kinds(pushover)
            recovered_at = clock.now_ms()
    missing = [m for m in pushover.messages if "FEED ERROR" in m.form["title"]]
    assert len(missing) == 1 and "Option chain missing" in missing[0].form["message"]
    assert "HTTP 503" in missing[0].form["message"]
    said_at = int(missing[0].form["timestamp"]) * 1000
    assert start + 180_000 <= said_at <= start + 300_000  # after 3 minutes without one, not at a hiccup
    assert recovered_at <= start + 480_000
    came_again = [m for m in pushover.messages if "FEED RECOVERED" in m.form["title"]]
    assert len(came_again) == 1 and "option chain came again" in came_again[0].form["message"]


def test_a_refusal_followed_by_other_errors_is_no_longer_said_and_alerted_once_until_a_200(market, tmp_path):
    """After one 401, /health said "refuses the API key" for minutes while REST answered 5xx, and chain
    polls stayed at once a minute; a 401 again after the 5xx must not be a second FEED ERROR."""
    start = at(10, 2)
    chain = "/v3/snapshot/options/IWM?"
    # 10x: the refused key's next poll (60 s) comes 6 s after the FEED ERROR, time to change the fault.
    with fakes(market, start, speed=10.0) as (pushover, polygon, clock):
        polygon.fail_rest(401, count=1, path_prefix=chain)
        with daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread):
            assert wait_until(lambda: "FEED ERROR" in kinds(pushover))
            polygon.fail_rest(503, path_prefix=chain)
            assert wait_until(lambda: not refusal_said(daemon) and problems_of(daemon) != [])
            assert any("HTTP 503" in p for p in problems_of(daemon)), problems_of(daemon)
            polygon.fail_rest(401, path_prefix=chain)
            assert wait_until(refusal_said_of(daemon))
            time.sleep(1.0)
    assert [k for k in kinds(pushover) if k.startswith("FEED")].count("FEED ERROR") == 1


def test_the_chain_poll_after_a_refusal_ends_comes_at_the_normal_interval(market, tmp_path):
    """The next poll's time was computed before the poll, from the state before its answer: the 200 that
    ended a refusal waited the refused state's minute (entries blocked as chain_stale meanwhile)."""
    start = at(10, 2)
    chain = "/v3/snapshot/options/IWM?"
    with fakes(market, start) as (pushover, polygon, clock):
        polygon.fail_rest(401, count=1, path_prefix=chain)

        def chain_polls() -> list[int]:
            # Stamped by the fake when asked: a test thread late to look on a loaded machine cannot skew them.
            asked = zip(polygon.rest_requests, polygon.rest_request_times_ms, strict=False)  # one may lead
            return [at_ms for path, at_ms in asked if path.startswith(chain)]

        with daemon_running(settings_for(polygon, pushover, tmp_path), clock):
            assert wait_until(lambda: len(chain_polls()) >= 3, 10), chain_polls()
    polls = chain_polls()[:3]
    # The fake stamps a request when it comes: a request late by a fifth of a wall second on a loaded
    # machine is 8 market seconds at SPEED (a CI run failed at 51 s). 60 s and 10 s stay far apart.
    assert polls[1] - polls[0] >= 40_000, "after the 401: the refusal's slow retry (60 s)"
    assert polls[2] - polls[1] <= 30_000, "after the 200: CHAIN_POLL_SECONDS (10 s) again"


def test_a_stream_refusing_the_key_fails_health_at_once_and_names_it(market, tmp_path):
    """auth_failed left /health ok for STREAM_SILENCE_SECONDS, then "stream not connected" with no reason."""
    start = at(10, 2)
    with (
        fakes(market, start) as (pushover, polygon, clock),
        FakePolygon(SyntheticSource(market), api_key="another-key", start_ms=start, speed=SPEED) as other,
    ):
        # REST takes the key; only the stream (another server, another key) refuses it.
        settings = dataclasses.replace(settings_for(polygon, pushover, tmp_path), polygon_ws_url=other.ws_url)
        with daemon_running(settings, clock) as (daemon, _thread):

            def refused() -> list[str]:
                return [p for p in problems_of(daemon) if "auth_failed" in p]

            assert wait_until(refused, 10), problems_of(daemon)
            health = dict(daemon.health)
            stream_error = daemon.stream.last_error if daemon.stream else None
    assert health["status"] == "failing"
    # Named at once (failing); "stream not connected for N s" may follow with the same reason.
    assert "Polygon stream refuses the API key (auth_failed): no bars, no entries" in health["problems"]
    assert stream_error == "stream refused the key (auth_failed)"
    assert kinds(pushover).count("FEED ERROR") == 1
    assert API_KEY not in repr(health)


KEY_CHECK = "/v3/snapshot/options/IWM?limit=1"
DAWN = at(6, 0)  # hours before the open, as a deploy outside market hours is


def test_a_wrong_key_deployed_before_dawn_is_said_at_once_not_at_0925(market, tmp_path):
    """No REST or stream call came before 09:25, so a wrong key deployed off-hours went unnoticed."""
    with fakes(market, DAWN) as (pushover, polygon, clock):
        settings = dataclasses.replace(settings_for(polygon, pushover, tmp_path), polygon_api_key="wrong-key")
        with daemon_running(settings, clock) as (daemon, _thread):
            assert wait_until(lambda: "FEED ERROR" in kinds(pushover), 10)
            assert wait_until(lambda: daemon.health.get("status") == "failing", 5), daemon.health
            problems = problems_of(daemon)
            time.sleep(1.0)  # 40 market seconds: no second request, no second alert
        requests = list(polygon.rest_requests)
    assert problems == ["Polygon REST refuses the API key (HTTP 401): no option chain, no entries"]
    assert requests == [KEY_CHECK] and polygon.ws_connections == 0
    assert kinds(pushover) == ["START", "FEED ERROR"]
    assert "HTTP 401" in pushover.messages[-1].form["message"]


@pytest.mark.parametrize("status", [200, 404, 503])
def test_an_off_hours_key_check_answered_otherwise_says_nothing_but_a_log_line(market, tmp_path, status):
    with fakes(market, DAWN) as (pushover, polygon, clock):
        if status != 200:
            polygon.fail_rest(status, path_prefix="/v3/snapshot/options")
        settings = settings_for(polygon, pushover, tmp_path)
        with capture_logs() as logs, daemon_running(settings, clock) as (daemon, _thread):
            assert wait_until(lambda: KEY_CHECK in polygon.rest_requests, 10)
            time.sleep(1.5)  # the 503's retries, then a health snapshot after them
            health = dict(daemon.health)
        requests = set(polygon.rest_requests)
    said = [e["event"] for e in logs if e["event"].startswith("polygon_key")]
    assert said == ["polygon_key_accepted" if status == 200 else "polygon_key_not_checked"]
    assert health["status"] == "closed" and health["problems"] == []
    assert requests == {KEY_CHECK} and kinds(pushover) == ["START"]


def problems_of(daemon: Daemon) -> list[str]:
    return list(daemon.health.get("problems", []))


def refusal_said(daemon: Daemon) -> bool:
    return any("refuses the API key" in p for p in problems_of(daemon))


def refusal_said_of(daemon: Daemon) -> Callable[[], bool]:
    return lambda: refusal_said(daemon)


def test_a_refused_volume_profile_is_no_feed_error_and_the_day_trades(market, tmp_path):
    start = at(10, 3)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        polygon.fail_rest(403, seconds=3600, path_prefix="/v2/aggs/ticker/IWM/range/1/minute")
        clock = SimClock(start, SPEED)
        run_daemon(settings_for(polygon, pushover, tmp_path), clock, until=lambda: "BUY" in kinds(pushover))
    assert "BUY" in kinds(pushover) and "FEED ERROR" not in kinds(pushover)


def test_the_pause_file_stops_entries_in_the_running_daemon_and_is_taped(market, tmp_path):
    from structlog.testing import capture_logs

    start = at(10, 2)
    (tmp_path / "PAUSE").write_text("paused\n")
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        clock = SimClock(start, SPEED)
        with capture_logs() as logs:
            run_daemon(
                settings_for(polygon, pushover, tmp_path), clock, until=lambda: clock.now_ms() > at(10, 7)
            )
    assert "BUY" not in kinds(pushover)
    assert "paused" in {e.get("rule") for e in logs if e.get("event") == "entry_blocked"}
    with gzip.open(tmp_path / "tapes" / "2025-10-02.jsonl.gz", "rt") as tape:
        tape_lines = tape.read()
    assert '"control":{"paused":true}' in tape_lines


def test_watchdog_exits_3_when_the_engine_thread_stops_turning(market, tmp_path):
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 2), speed=SPEED) as polygon,
    ):
        exits: list[int] = []
        settings = settings_for(polygon, pushover, tmp_path, watchdog_seconds=5.0)
        daemon = Daemon(settings, SimClock(at(10, 2), SPEED), exit_process=exits.append)
        daemon.last_turn = time.monotonic() - 6.0  # as if the engine loop had hung six seconds ago
        watchdog = threading.Thread(target=daemon._watchdog_loop)
        watchdog.start()
        watchdog.join(10)
        daemon.journal.close()
    assert exits == [3]


def test_an_info_pulse_every_five_minutes_of_session_says_what_the_daemon_sees(market, tmp_path):
    from structlog.testing import capture_logs

    start = at(10, 3)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        clock = SimClock(start, SPEED)
        with capture_logs() as logs:
            run_daemon(
                settings_for(polygon, pushover, tmp_path), clock, until=lambda: clock.now_ms() > at(10, 10, 5)
            )
    pulses = [e for e in logs if e.get("event") == "session_pulse"]
    assert [e["time"][:5] for e in pulses] == ["10:03", "10:05", "10:10"]
    last = pulses[-1]
    assert last["log_level"] == "info" and last["bars_today"] > 300
    assert last["last_close"] is not None and last["chain_age_s"] is not None and last["status"] == "ok"


class JumpingClock:
    """A monotonic clock a test moves by hand (time.monotonic plus the jumps so far)."""

    def __init__(self) -> None:
        self.jumped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.jumped


def test_a_process_held_for_two_minutes_is_not_taken_for_a_stuck_engine(market, tmp_path):
    """SIGSTOP (or a paused VM) for 120 s: the engine could not turn either, and the watchdog used to
    exit at the instant the process ran again, leaving a position unsold until the restart."""
    clock = JumpingClock()
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 2), speed=SPEED) as polygon,
    ):
        exits: list[int] = []
        settings = settings_for(polygon, pushover, tmp_path, watchdog_seconds=5.0)
        daemon = Daemon(settings, SimClock(at(10, 2), SPEED), exit_process=exits.append, monotonic=clock)
        watchdog = threading.Thread(target=daemon._watchdog_loop)
        watchdog.start()
        time.sleep(1.5)
        clock.jumped += 120.0  # every thread was held, the watchdog's own wait included
        time.sleep(2.5)
        held = list(exits)
        daemon.last_turn = clock() - 6.0  # now the engine alone stops turning
        watchdog.join(10)
        daemon.journal.close()
    assert held == [] and exits == [3]


def test_a_process_held_by_sigstop_treats_the_hold_as_downtime_and_says_no_stall(market, tmp_path):
    """Ticked through, a hold's seconds sent a STALL and a RECOVERED for a feed that never failed (and could
    decide an exit inside the hold at the bid of before it). They are downtime now, as a restart's, and the
    tape says so for replays."""
    import gzip

    log_path = tmp_path / "daemon.log"
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 2), speed=SLOW) as polygon,
    ):
        process = launch(polygon, pushover, tmp_path, log_path)
        try:
            assert wait_for(lambda: "START" in kinds(pushover), 60), "no START"
            time.sleep(2.0)
            process.send_signal(signal.SIGSTOP)
            time.sleep(7.0)  # 140 market seconds at SLOW: far past STALL_ALERT_SECONDS
            process.send_signal(signal.SIGCONT)
            time.sleep(3.0)
        finally:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
            process.wait(15)
    assert "STALL" not in kinds(pushover) and "RECOVERED" not in kinds(pushover), kinds(pushover)
    assert b'"process_was_held"' in log_path.read_bytes()
    (tape,) = (tmp_path / "tapes").glob("*.jsonl.gz")
    assert b'"resumed_after_hold":true' in gzip.decompress(tape.read_bytes())


def test_health_says_failing_while_the_engine_thread_is_stuck(market, tmp_path):
    """The engine thread makes the snapshot, so a stuck engine froze /health at `ok` and fed the
    heartbeat until the watchdog's exit."""
    clock = JumpingClock()
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 2), speed=SPEED) as polygon,
    ):
        daemon = Daemon(
            settings_for(polygon, pushover, tmp_path), SimClock(at(10, 2), SPEED), monotonic=clock
        )
        daemon.health = {"status": "ok", "problems": []}
        daemon.last_turn = clock()
        assert daemon.served_health() == {"status": "ok", "problems": []}
        clock.jumped += 20.0
        served = daemon.served_health()
        daemon.journal.close()
    assert served["status"] == "failing" and daemon.health["status"] == "ok"
    assert served["problems"] == ["the engine thread has not turned for 20 s (the watchdog exits at 60 s)"]


def handles_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (Linux: the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def test_a_sigterm_at_the_first_moment_it_is_handled_stops_start_up_cleanly(market, tmp_path):
    """Handlers used to be installed after the settings, the clock and the tape check: a SIGTERM in
    start-up killed the process (status 143). They come first now, and a stop asked before the daemon
    exists ends it cleanly, as any SIGTERM does."""
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 3), speed=SLOW) as polygon,
    ):
        process = launch(polygon, pushover, tmp_path, tmp_path / "daemon.log")
        try:
            assert wait_for(lambda: handles_sigterm(process.pid), 30)
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 0, (tmp_path / "daemon.log").read_text()[-2000:]
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def test_a_crash_loop_sends_a_few_starts_then_one_restarting_alert_an_hour():
    """A daemon restarted every few seconds sent a START each time: hundreds an hour, the month's Pushover
    quota gone in a day, and BUY and SELL held behind the 429s after that."""
    from daemon import HOUR_MS, LOOP_STARTS, start_announcement

    starts: list[int] = []
    said = []
    for n in range(720):  # an hour of restarts every 5 s
        what, starts = start_announcement(starts, n * 5_000)
        said.append(what)
    assert said[: LOOP_STARTS - 1] == ["start"] * (LOOP_STARTS - 1) and set(said[LOOP_STARTS - 1 :]) == {
        "loop"
    }
    assert len(starts) == 720 and all(t >= 720 * 5_000 - HOUR_MS - 5_000 for t in starts)
    # Deploys an hour apart are ordinary starts again, and the kept list forgets what is older than an hour.
    assert start_announcement(starts, 5 * HOUR_MS) == ("start", [5 * HOUR_MS])
    assert start_announcement([1_000, 2_000], 3_000)[0] == "start"


def test_the_fifth_start_in_half_an_hour_says_restarting_once_instead_of_start(market, tmp_path):
    import json

    from pnl_tracker import Journal

    with fakes(market, at(10, 2)) as (pushover, polygon, _clock):
        for n in range(6):
            clock = SimClock(at(10, 2) + n * 60_000, SPEED)  # a start a minute, as a crash loop's
            with daemon_running(settings_for(polygon, pushover, tmp_path), clock):
                if n < 5:
                    assert wait_for(lambda n=n: len(pushover.messages) > n, 20), kinds(pushover)
                else:
                    time.sleep(1.0)  # the sixth says nothing: RESTARTING goes once an hour
        sent = kinds(pushover)
    assert sent == ["START"] * 4 + ["RESTARTING"], sent
    journal = Journal(tmp_path / "journal.sqlite3")
    assert len(json.loads(journal.meta("recent_starts") or "[]")) == 6
