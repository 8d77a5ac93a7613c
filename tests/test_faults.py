"""The alert path under faults (issue 9): the real daemon against the fakes on 127.0.0.1.

Each test asserts what reached the fake Pushover (or the fallback webhook): every BUY and SELL of the
day exactly once, in order, and the daemon still running; or, for a second daemon or a bad journal,
a refusal with exit status 2.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import pytest
from builders import at
from test_daemon import (
    API_KEY,
    SLOW,
    SPEED,
    daemon_running,
    fakes,
    kinds,
    launch,
    launch_env,
    replayed_alerts,
    settings_for,
    wait_for,
    wide_exits,
)

from clock import SimClock
from daemon import Daemon
from journal_rescue import rescue_paths
from sim.market import SyntheticMarket, demo_script
from sim.polygon_server import FakePolygon, SyntheticSource
from sim.pushover_server import FakePushover
from sim.webhook_server import FakeWebhook
from supervisor import Supervisor, error_text
from tape import TapeReader

ROOT = Path(__file__).resolve().parents[1]
BEFORE_BUY = at(10, 6, 0)  # the demo day's first burst fires its BUY at about 10:06:25


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return SyntheticMarket(demo_script())


def trades_of(kinds_sent: list[str]) -> list[str]:
    return [k for k in kinds_sent if k in ("BUY", "SELL")]


def refuse_writes(daemon: Daemon, refuse: bool = True) -> None:
    """A real SQLite refusal on the daemon's own connection ("attempt to write a readonly database"),
    as a read-only file gives. Disk full (SQLITE_FULL) is exercised in test_delivery.py."""
    with daemon.journal._lock:
        daemon.journal._db.execute(f"PRAGMA query_only={int(refuse)}")


def journal_rows(path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_journal_refusing_writes_from_before_the_buy_to_after_the_sell_loses_and_repeats_nothing(
    market, tmp_path
):
    start = at(10, 4)
    with (
        fakes(market, start) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, thread),
    ):
        assert wait_for(lambda: clock.now_ms() >= BEFORE_BUY, 30)
        assert "BUY" not in kinds(pushover)
        refuse_writes(daemon)
        assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
        during = daemon._snapshot()
        trades_during = journal_rows(tmp_path / "journal.sqlite3", "SELECT * FROM trades")
        refuse_writes(daemon, False)
        assert wait_for(lambda: not daemon.writer.health().failing, 10)
        assert wait_for(lambda: "JOURNAL RECOVERED" in kinds(pushover), 10), (kinds(pushover), during)
        assert thread.is_alive()
    sent = kinds(pushover)
    assert trades_of(sent) == ["BUY", "SELL"]
    assert sent.count("JOURNAL FAILING") == 1 and sent.index("JOURNAL FAILING") < sent.index("SELL")
    assert during["status"] == "degraded" and during["journal"]["failing"] is True
    assert trades_during == []
    trades = journal_rows(tmp_path / "journal.sqlite3", "SELECT trade_id, reason FROM trades")
    outbox = journal_rows(tmp_path / "journal.sqlite3", "SELECT kind, status FROM outbox ORDER BY id")
    assert len(trades) == 1
    assert [row for row in outbox if row[0] in ("BUY", "SELL")] == [("BUY", "sent"), ("SELL", "sent")]
    assert journal_rows(tmp_path / "journal.sqlite3", "SELECT COUNT(*) FROM positions WHERE open=1") == [(0,)]


def test_a_lock_held_by_another_process_never_freezes_the_engine_or_loses_an_alert(market, tmp_path):
    start = at(10, 4)
    with (
        fakes(market, start) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, thread),
    ):
        assert wait_for(lambda: clock.now_ms() >= BEFORE_BUY, 30)
        holder = sqlite3.connect(tmp_path / "journal.sqlite3", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # a backup or a DB browser holding the write lock
        try:
            assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
            assert daemon.writer.health().failing
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert wait_for(lambda: not daemon.writer.health().failing, 10)
        assert thread.is_alive()
    sent = kinds(pushover)
    assert trades_of(sent) == ["BUY", "SELL"]
    assert "STALL" not in sent  # the engine thread never sat out SQLite's busy timeout
    assert len(journal_rows(tmp_path / "journal.sqlite3", "SELECT * FROM trades")) == 1


@pytest.mark.parametrize("pushover_down", [False, True], ids=["after-the-sell", "alerts-unsent"])
def test_a_stop_while_the_journal_refuses_keeps_its_writes_for_the_next_start(
    market, tmp_path, pushover_down
):
    # A deploy while a backup holds the lock: the SELL (or, with Pushover down, the BUY and the SELL
    # themselves) exist only in memory. Lost, the restart would resume the closed position.
    start = at(10, 4)
    rescue, _reserve, spare = rescue_paths(tmp_path)
    with fakes(market, start) as (pushover, polygon, clock):
        settings = settings_for(polygon, pushover, tmp_path)
        holder = sqlite3.connect(tmp_path / "journal.sqlite3", isolation_level=None)
        with daemon_running(settings, clock) as (daemon, _thread):
            assert wait_for(lambda: clock.now_ms() >= BEFORE_BUY, 30)
            holder.execute("BEGIN IMMEDIATE")
            if pushover_down:
                pushover.fail_with(500)
                assert wait_for(lambda: daemon.engine.trades_today, 60), "no trade closed"
            else:
                assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
        try:
            assert rescue.is_file() and not spare.exists()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        pushover.recover()
        with daemon_running(settings, SimClock(polygon.now_ms(), SPEED)) as (daemon, _thread):
            assert wait_for(lambda: kinds(pushover).count("START") == 2 and not rescue.exists(), 30)
            assert wait_for(lambda: daemon.outbox.pending_count() == 0, 30)
            time.sleep(0.5)
            held_again = daemon.engine.position
    assert trades_of(kinds(pushover)) == ["BUY", "SELL"]
    assert held_again is None, "the restart resumed a position whose SELL was decided before the stop"
    assert len(journal_rows(tmp_path / "journal.sqlite3", "SELECT * FROM trades")) == 1
    outbox = journal_rows(tmp_path / "journal.sqlite3", "SELECT kind, status FROM outbox ORDER BY id")
    assert [row for row in outbox if row[0] in ("BUY", "SELL")] == [("BUY", "sent"), ("SELL", "sent")]


@pytest.mark.parametrize("removed", ["data-dir", "wal", "truncated"])
def test_journal_files_deleted_under_the_running_daemon_are_written_back_with_every_trade(
    market, tmp_path, removed
):
    data = tmp_path / "data"
    start = at(10, 4)
    with (
        fakes(market, start) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, data), clock) as (daemon, thread),
    ):
        assert wait_for(lambda: "BUY" in kinds(pushover), 60), kinds(pushover)
        if removed == "data-dir":
            shutil.rmtree(data)
        elif removed == "wal":
            (data / "journal.sqlite3-wal").unlink()
        else:  # emptied in place: a restart (or a --status) then let SQLite delete the -wal, and all with it
            os.truncate(data / "journal.sqlite3", 0)
        assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
        assert wait_for(lambda: any("written back" in text for text in system_texts(pushover)), 20)
        assert thread.is_alive() and (data / "daemon.lock").is_file()
    assert trades_of(kinds(pushover)) == ["BUY", "SELL"]
    assert len(journal_rows(data / "journal.sqlite3", "SELECT * FROM trades")) == 1
    assert journal_rows(data / "journal.sqlite3", "SELECT COUNT(*) FROM positions WHERE open=1") == [(0,)]
    assert [text for text in system_texts(pushover) if "written back" in text][0].startswith("The journal")


def test_a_data_dir_deleted_just_before_a_stop_is_written_back_by_the_stop(market, tmp_path):
    """The files are checked every 5 s: a stop inside that window closed the connection on the deleted
    file, and the restart said "No open position. Lifetime $0.00" (the SELL never came)."""
    data = tmp_path / "data"
    with (
        fakes(market, at(10, 4)) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, data), clock),
    ):
        assert wait_for(lambda: "BUY" in kinds(pushover), 60), kinds(pushover)
        shutil.rmtree(data)
    held_or_closed = "SELECT (SELECT COUNT(*) FROM positions WHERE open=1) + (SELECT COUNT(*) FROM trades)"
    assert journal_rows(data / "journal.sqlite3", held_or_closed) == [(1,)]


@pytest.mark.parametrize("freed", [True, False], ids=["freed", "never freed"])
def test_a_journal_that_cannot_be_written_back_fails_health_and_is_kept_aside_at_the_stop(
    market, tmp_path, freed
):
    """Until it is written back everything lives in the open connection only, and /health said ok (only
    one SYSTEM alert told); a stop then closed the connection and every trade and the P&L were gone."""
    from journal_rescue import journal_copy_path

    data = tmp_path / "data"
    copy = journal_copy_path(data)
    with (
        fakes(market, at(10, 4)) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, data), clock) as (daemon, _thread),
    ):
        assert wait_for(lambda: "BUY" in kinds(pushover), 60), kinds(pushover)
        shutil.rmtree(data)
        data.write_text("a file where DATA_DIR was: the folder cannot be made again")

        def gone_said() -> bool:
            health = daemon.health
            return health.get("status") == "failing" and any("could not be written back" in p
                                                             for p in health.get("problems", []))  # fmt: skip

        assert wait_for(gone_said, 30), daemon.health.get("problems")
        if freed:
            data.unlink()
            assert wait_for(lambda: not gone_said() and (data / "journal.sqlite3").is_file(), 30)
    assert any("could not be written back" in text for text in system_texts(pushover))
    try:
        kept = data / "journal.sqlite3" if freed else copy
        held_or_closed = (
            "SELECT (SELECT COUNT(*) FROM positions WHERE open=1) + (SELECT COUNT(*) FROM trades)"
        )
        assert journal_rows(kept, held_or_closed) == [(1,)]
        assert copy.exists() is not freed
    finally:
        copy.unlink(missing_ok=True)


def test_a_tape_that_blocks_holds_neither_the_start_nor_a_trade(market, tmp_path):
    """Tape writes ran on the engine thread: a disk that hung held the engine in the kernel (no BUY, no
    SELL, and the watchdog's exit could not end it), and a tape path that blocked on open (a FIFO) hung a
    restart before any thread ran. The tape has a thread of its own now."""
    start = at(10, 4)
    fifo = tmp_path / "tapes" / "2025-10-02.jsonl.gz"  # the market's day: opening it blocks for ever
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with (
        fakes(market, start) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, thread),
    ):
        assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
        assert thread.is_alive() and "did not take a write" in (daemon.recorder.problem or "")
        assert any("tape not recording" in p for p in daemon.health.get("problems", []))
    sent = kinds(pushover)
    assert trades_of(sent) == ["BUY", "SELL"] and sent.count("TAPE FAILING") == 1, sent


def system_texts(pushover: FakePushover) -> list[str]:
    return [m.form["message"] for m in pushover.messages if m.form["title"].endswith("SYSTEM")]


def test_journal_failing_while_an_alert_waits_for_pushover_never_resends_it(market, tmp_path):
    start = at(10, 4)
    with (
        fakes(market, start) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, thread),
    ):
        assert wait_for(lambda: "START" in kinds(pushover) and clock.now_ms() >= BEFORE_BUY, 30)
        pushover.fail_with(500)
        assert wait_for(lambda: daemon.engine.position is not None, 60)
        refuse_writes(daemon)  # "mark sent" of the BUY will fail
        pushover.recover()
        assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
        time.sleep(3.0)  # a resend of the BUY would follow the SELL at once: the queue is empty now
        assert thread.is_alive()
    sent = kinds(pushover)
    assert trades_of(sent) == ["BUY", "SELL"]


def test_a_journal_whose_disk_stops_answering_holds_neither_the_buy_nor_the_sell(market, tmp_path):
    """A frozen or lost volume keeps each journal write in the kernel. Written on the engine thread, the
    first one held it there: no BUY, no SELL and no word for as long as the disk hung, and the watchdog's
    exit could not end a process in disk sleep. The journal's own lock stands in for the hung disk (an
    fsfreeze of the data folder, checked by hand, gives the same pushes)."""
    start = at(10, 4)
    with (
        fakes(market, start) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, thread),
    ):
        assert wait_for(lambda: "START" in kinds(pushover) and clock.now_ms() >= BEFORE_BUY, 30)
        with daemon.journal._lock:  # every journal write from here waits, as on a frozen disk
            assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
            assert wait_for(
                lambda: any("journal failing" in p for p in daemon.health.get("problems", [])), 10
            )
            assert daemon.writer.stuck and thread.is_alive()
        assert wait_for(lambda: "JOURNAL RECOVERED" in kinds(pushover), 30), kinds(pushover)
        assert wait_for(lambda: daemon.journal.trades() != [], 10)
    sent = kinds(pushover)
    assert trades_of(sent) == ["BUY", "SELL"] and sent.count("JOURNAL FAILING") == 1
    (failing,) = [m.form["message"] for m in pushover.messages if m.form["title"].endswith("JOURNAL FAILING")]
    assert "did not take a write within 1 s" in failing
    from pnl_tracker import Journal

    reopened = Journal(tmp_path / "journal.sqlite3")
    (trade,) = reopened.trades()
    assert trade.trade_id.startswith("2025-10-02") and reopened.restored_state("2025-10-02").position is None
    reopened.close()


def test_a_silent_socket_is_replaced_and_the_day_goes_on(market, tmp_path):
    start = at(10, 4)
    with fakes(market, start) as (pushover, polygon, clock):
        polygon.silence(True)  # the socket opens, answers pings, sends nothing
        settings = settings_for(polygon, pushover, tmp_path, stream_silence_seconds=15.0)
        with daemon_running(settings, clock) as (daemon, thread):
            assert wait_for(lambda: polygon.ws_connections >= 1, 20)
            assert wait_for(lambda: clock.now_ms() >= at(10, 5, 0), 20)
            polygon.silence(False)
            assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
            assert thread.is_alive()
            reconnects = daemon.stream.silent_reconnects if daemon.stream else 0
    assert polygon.ws_connections >= 2 and reconnects >= 1
    assert trades_of(kinds(pushover)) == ["BUY", "SELL"]


def test_a_stream_that_stays_silent_while_backfills_bring_bars_is_said_once_and_its_return_too(
    market, tmp_path
):
    # Each redial backfills the gap over REST, so the engine keeps getting bars: only the stream is gone.
    start = at(10, 4)
    with fakes(market, start) as (pushover, polygon, clock):
        settings = settings_for(polygon, pushover, tmp_path, stream_silence_seconds=10.0)
        with daemon_running(settings, clock) as (daemon, thread):
            assert wait_for(lambda: polygon.ws_connections >= 1 and daemon.engine.counters.bars > 5, 20)
            polygon.silence(True)
            assert wait_for(lambda: "FEED ERROR" in kinds(pushover), 30), kinds(pushover)
            assert wait_for(lambda: any("no bar from the stream" in p for p in daemon.health["problems"]), 10)
            assert daemon.health["status"] == "failing"
            polygon.silence(False)
            assert wait_for(lambda: "FEED RECOVERED" in kinds(pushover), 30), kinds(pushover)
            assert wait_for(lambda: not any("stream" in p for p in daemon.health["problems"]), 10)
            assert thread.is_alive()
    said = [k for k in kinds(pushover) if k.startswith("FEED")]
    # Said once per silence: at 40x a wall-clock hiccup can be a second silence, never a repeat of one.
    assert said[:2] == ["FEED ERROR", "FEED RECOVERED"] and said[::2] == ["FEED ERROR"] * len(said[::2])
    assert said[1::2] == ["FEED RECOVERED"] * len(said[1::2])
    error = next(m.form["message"] for m in pushover.messages if m.form["title"].endswith("FEED ERROR"))
    assert "No IWM bar from the stream for 3" in error and "REST backfills" in error


def test_pushover_out_of_quota_sends_by_the_fallback_and_health_says_degraded(market, tmp_path):
    start = at(10, 4)
    with (
        FakePushover() as pushover,
        FakeWebhook() as hook,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        pushover.fail_with(429)
        clock = SimClock(start, SPEED)
        settings = settings_for(polygon, pushover, tmp_path, alert_fallback_urls=(hook.apprise_url,))
        with daemon_running(settings, clock) as (daemon, thread):
            assert wait_for(lambda: any(p.body["title"].endswith("SELL") for p in hook.posts), 60)
            health = daemon._snapshot()
            assert thread.is_alive()
        titles = [p.body["title"].rsplit("— ", 1)[-1] for p in hook.posts]
    assert trades_of(titles) == ["BUY", "SELL"]
    assert pushover.messages == []
    assert health["status"] == "degraded" and health["alerts"]["channel"] == "fallback"


def test_pushover_out_of_quota_without_a_fallback_holds_alerts_and_says_failing(market, tmp_path):
    start = at(10, 4)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        pushover.fail_with(429)
        clock = SimClock(start, SPEED)
        with daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, thread):
            assert wait_for(lambda: daemon.engine.position is not None, 60)
            assert wait_for(lambda: daemon._snapshot()["status"] == "failing", 5)
            # The BUY reaches the queue just after the position is set (its decision is recorded first).
            wait_for(lambda: daemon.outbox.pending_count() >= 2, 5)
            health = daemon._snapshot()
            held = daemon.outbox.pending_count()
            assert thread.is_alive()
    assert pushover.requests == 1  # asked once; then held, not hammered, not dropped
    assert held >= 2  # START and BUY still queued for when the quota returns
    assert any("429" in problem for problem in health["problems"])


def test_pushover_answering_after_12_seconds_delivers_each_alert_once(market, tmp_path):
    start = at(10, 4)
    with fakes(market, start) as (pushover, polygon, clock):
        settings = settings_for(polygon, pushover, tmp_path, options_stream="off")
        with daemon_running(settings, clock) as (daemon, thread):
            assert wait_for(lambda: "START" in kinds(pushover) and clock.now_ms() >= BEFORE_BUY, 30)
            pushover.slow(12.0)  # past httpx's old 10 s timeout: the BUY's answer comes after 12 s
            assert wait_for(lambda: "BUY" in kinds(pushover), 60), kinds(pushover)
            pushover.slow(0.0)
            assert wait_for(lambda: "SELL" in kinds(pushover), 60), kinds(pushover)
            assert thread.is_alive()
    sent = kinds(pushover)
    assert trades_of(sent) == ["BUY", "SELL"] and sent.count("START") == 1
    assert [m.form["title"][-3:] for m in pushover.history].count("BUY") == 1  # asked once, not re-sent


@pytest.mark.parametrize(
    "error",
    [
        RecursionError("maximum recursion depth exceeded"),
        SystemExit("a library called sys.exit"),
        KeyboardInterrupt(),
    ],
    ids=type,
)
def test_a_crashing_thread_is_restarted_reported_once_and_shown_in_health(error: BaseException):
    crashes: list[tuple[str, str]] = []
    stop = threading.Event()
    runs = []

    def flaky() -> None:
        runs.append(time.monotonic())
        if len(runs) <= 3:
            raise error
        stop.wait()

    supervisor = Supervisor(
        stop, on_crash=lambda name, error: crashes.append((name, error)), backoff_first_s=0.05
    )
    supervisor.spawn("poller", flaky, stale_after_s=60)
    assert wait_for(lambda: len(runs) >= 2, 5)
    while_down = supervisor.problems()
    assert wait_for(lambda: len(runs) == 4, 5)
    health = supervisor.health()
    stop.set()
    supervisor.join(5)
    assert crashes == [("poller", error_text(error))]
    assert health[0].restarts == 3 and health[0].alive
    assert runs[2] - runs[1] > runs[1] - runs[0]  # the back-off grows
    assert while_down == [] or "poller" in while_down[0]


def test_two_threads_failing_in_one_minute_are_two_alerts_and_a_repeat_is_one(market, tmp_path):
    """A notice's key was its kind and minute: the second thread to fail in a minute was never said."""
    with (
        fakes(market, at(10, 4)) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread),
    ):
        assert wait_for(lambda: "START" in kinds(pushover), 10)
        daemon._thread_crashed("poller", "RuntimeError: one")
        daemon._thread_crashed("poller", "RuntimeError: one")
        daemon._thread_crashed("notifier", "OSError: two")
        assert wait_for(lambda: kinds(pushover).count("SYSTEM") >= 2, 10)
        time.sleep(0.5)
    texts = [m.form["message"] for m in pushover.messages if m.form["title"].endswith("SYSTEM")]
    assert len(texts) == 2 and "poller" in texts[0] and "notifier" in texts[1]


def test_chain_polls_that_all_fail_make_health_failing_until_a_chain_comes(market, tmp_path):
    """Polls that end but bring no chain used to count as polls: /health said ok with no chain for minutes."""
    with (
        fakes(market, at(10, 4)) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread),
    ):
        assert wait_for(lambda: daemon.engine.chain is not None, 20)
        polygon.fail_rest(500, path_prefix="/v3/snapshot/options")
        assert wait_for(lambda: daemon.health.get("status") == "failing", 20), daemon.health
        problems = daemon.health["problems"]
        polygon.heal()
        assert wait_for(lambda: daemon.health.get("status") in ("ok", "degraded"), 20), daemon.health
    assert any(p.startswith("no option chain for") and "HTTP 500" in p for p in problems), problems


def test_a_peer_echoing_the_api_key_never_puts_it_on_the_tape(market, tmp_path):
    echo = json.dumps([{"ev": "status", "status": "info", "message": f"your key {API_KEY} is fine"}])
    with (
        fakes(market, at(10, 4)) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread),
    ):
        assert wait_for(lambda: "START" in kinds(pushover), 10)
        polygon.send_garbage([echo])
        assert wait_for(
            lambda: any("your key" in s.message for s in daemon.pipeline.decoder.counters.statuses), 10
        )
    text = gzip.decompress((tmp_path / "tapes" / "2025-10-02.jsonl.gz").read_bytes())
    assert API_KEY.encode() not in text and b"your key *** is fine" in text


def test_a_hanging_chain_poll_never_holds_back_the_held_contracts_quotes(market, tmp_path):
    """The contract's poll waited behind the chain's: a chain answer that hung (then retried) for a
    minute froze the mark, and the stop never fired. The held contract now polls on its own thread."""
    with fakes(market, at(10, 4)) as (pushover, polygon, clock):
        settings = wide_exits(settings_for(polygon, pushover, tmp_path))
        with daemon_running(settings, clock) as (daemon, _thread):
            assert wait_for(lambda: daemon.engine.position is not None, 60), kinds(pushover)
            polygon.options_silent(True)
            polygon.delay_rest(120.0, path_prefix="/v3/snapshot/options/IWM?")
            time.sleep(1.0)  # 40 s of engine time: the chain poll under way hangs
            before = daemon.engine.marks.rest
            polled = wait_for(lambda: daemon.engine.marks.rest >= before + 10, 10)
            after = daemon.engine.marks.rest
            polygon.heal()
    assert polled, f"{after - before} contract quotes while the chain poll hung"


def test_every_thread_is_listed_in_health_and_a_dead_one_is_failing(market, tmp_path):
    start = at(10, 4)
    with (
        fakes(market, start) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread),
    ):
        assert wait_for(lambda: "threads" in daemon.health, 10)
        time.sleep(6.0)
        threads = daemon._snapshot()["threads"]
        names = set(threads)
        assert all(t["alive"] and t["last_turn_s"] < 6.0 for t in threads.values()), threads
        worker = daemon.supervisor._workers["poller"]
        worker.down, worker.last_error = True, "RuntimeError: test"
        assert wait_for(lambda: daemon.health["status"] == "failing", 5)
        worker.down = False
    assert {"notifier", "poller", "marks", "session", "watchdog"} <= names


def test_a_second_daemon_on_the_same_data_dir_exits_2_naming_the_first(market, tmp_path):
    start = at(10, 4)
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon,
    ):
        first = launch(polygon, pushover, tmp_path, tmp_path / "first.log")
        try:
            assert wait_for(lambda: "START" in kinds(pushover), 60)
            second = launch(polygon, pushover, tmp_path, tmp_path / "second.log")
            code = second.wait(30)
            assert first.poll() is None
        finally:
            first.send_signal(signal.SIGTERM)
            first.wait(15)
    said = (tmp_path / "second.log").read_text()
    assert code == 2
    assert f"PID {first.pid}" in said
    assert kinds(pushover).count("START") == 1


@contextmanager
def launched(
    market, tmp_path: Path, start_ms: int
) -> Iterator[tuple[subprocess.Popen, FakePushover, FakePolygon]]:
    """`main.py` in its own process against the fakes (logging to tmp_path/daemon.log), killed if still running."""
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start_ms, speed=20.0) as polygon,
    ):
        process = launch(polygon, pushover, tmp_path, tmp_path / "daemon.log")
        try:
            yield process, pushover, polygon
        finally:
            if process.poll() is None:
                process.kill()


def test_a_log_reader_that_stops_reading_loses_no_alert_and_is_said(market, tmp_path):
    """stderr into a pipe nobody reads (a paused `| less`, a log driver in blocking mode): every thread that
    logged waited on the full pipe, the engine's and the watchdog's too, and the daemon hung after START."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # full after a few lines
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=at(10, 4), speed=SLOW) as polygon,
    ):
        env = launch_env(polygon, pushover, tmp_path) | {"LOG_LEVEL": "DEBUG", "WATCHDOG_SECONDS": "10"}
        process = subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=tmp_path, env=env,
                                   stdout=write_end, stderr=write_end)  # fmt: skip
        os.close(write_end)
        try:
            assert wait_for(lambda: "SELL" in kinds(pushover) and "SYSTEM" in kinds(pushover), 90)
            assert process.poll() is None, "the watchdog must not end a daemon whose engine turns"
            process.send_signal(signal.SIGTERM)
            with os.fdopen(read_end, "rb") as output:  # read again: the held lines come, then the stop
                logged = output.read().decode()
            code = process.wait(15)
        finally:
            if process.poll() is None:
                process.kill()
    (said,) = [m.form["message"] for m in pushover.messages if m.form["title"].endswith("SYSTEM")]
    assert "log output blocked" in said and "alerts are not affected" in said
    assert kinds(pushover).count("BUY") >= 1 and code == 0
    assert '"event": "stopped"' in logged and "Traceback" not in logged


def test_the_log_never_waits_for_its_reader_and_counts_what_it_drops():
    from logs import BackgroundStderr

    class HeldStream(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()

        def write(self, text: str) -> int:
            self.release.wait()
            return super().write(text)

    stream = HeldStream()
    handler = BackgroundStderr(stream, capacity=3)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test-held-stream")
    logger.propagate, logger.handlers = False, [handler]
    started = time.monotonic()
    for n in range(10):
        logger.warning("line %d", n)
    assert time.monotonic() - started < 1.0, "logging waited for the stream"
    assert handler.dropped >= 6 and "dropped" in (handler.problem() or "")
    stream.release.set()
    handler.flush(5.0)
    written = stream.getvalue().splitlines()
    assert "line 0" in written and "line 9" not in written
    assert any(line.startswith("log_lines_dropped count=") for line in written)
    handler.close()


def test_sighup_stops_like_sigterm_and_flushes_the_tape(market, tmp_path):
    with launched(market, tmp_path, at(10, 3)) as (process, pushover, polygon):
        assert wait_for(lambda: "START" in kinds(pushover) and polygon.ws_connections >= 1, 60)
        time.sleep(1.0)
        process.send_signal(signal.SIGHUP)
        code = process.wait(10)
    tapes = list((tmp_path / "tapes").glob("*.jsonl.gz"))
    assert code == 0
    assert tapes and sum(1 for line in TapeReader(tapes[0]) if line.kind == "ws") > 0


def test_a_kill_right_after_a_buy_leaves_the_tape_that_replays_to_that_buy(market, tmp_path):
    """The tape buffers up to 5 s of lines between its flushes; a kill -9 then took the bars behind the
    BUY with it, and the replay of the day made no such trade. Lines reach the OS before each decision."""
    with launched(market, tmp_path, at(10, 4)) as (process, pushover, _polygon):
        assert wait_for(lambda: "BUY" in kinds(pushover), 90)
        process.kill()
        process.wait(10)
    (live,) = [m for m in pushover.messages if m.form["title"].endswith("BUY")]
    replayed = replayed_alerts(tmp_path / "tapes" / "2025-10-02.jsonl.gz", tmp_path / "replay.sqlite3")
    buys = [(a.title, a.message) for a in replayed if a.kind == "BUY"]
    assert buys == [(live.form["title"], live.form["message"])]


def test_a_burst_of_stop_signals_stops_the_daemon_once_and_cleanly(market, tmp_path):
    """Signals that arrive while the main thread holds the stop Event's lock (GNU `timeout` signals the
    child and its group; a supervisor may repeat itself) had hung the daemon for good, watchdog and all."""
    with launched(market, tmp_path, at(10, 3)) as (process, pushover, polygon):
        assert wait_for(lambda: "START" in kinds(pushover) and polygon.ws_connections >= 1, 60)
        # Signals until the process is gone: the late ones land while it exits (the default action, put
        # back by the interpreter at its exit, had turned a clean stop into status 143).
        deadline, n = time.monotonic() + 20, 0
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal((signal.SIGTERM, signal.SIGINT, signal.SIGHUP)[n % 3])
            n += 1
        code = process.wait(5)
    log = (tmp_path / "daemon.log").read_text()
    assert code == 0
    assert log.count('"stop_signal"') == 1 and "Traceback" not in log


def run_main(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        cwd=tmp_path,
        env={**clean, "PYTHON_DOTENV_DISABLED": "1", "POLYGON_API_KEY": API_KEY, "DATA_DIR": str(tmp_path)}
        | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def make_journal_with_a_trade(path: Path) -> None:
    from pnl_tracker import Journal

    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO meta VALUES ('k', ?)", ("x" * 20000,))
    db.commit()
    db.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "newer"])
def test_a_bad_journal_at_start_exits_2_with_advice(tmp_path, damage):
    path = tmp_path / "journal.sqlite3"
    if damage == "garbage":
        path.write_bytes(b"this is not a database, just some bytes " * 100)
    else:
        make_journal_with_a_trade(path)
        if damage == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2 + 100])
        else:
            db = sqlite3.connect(path)
            db.execute("PRAGMA user_version=99")
            db.close()
    result = run_main(tmp_path, SIM_CLOCK_START="2025-10-02T10:00:00-04:00")
    said = result.stderr
    assert result.returncode == 2, said
    assert "Traceback" not in said
    assert str(path) in said and "Move it aside" in said and "tapes" in said


def test_a_replay_into_a_damaged_replay_journal_exits_2_and_names_fresh(tmp_path, short_tapes):
    (tmp_path / "replay.sqlite3").write_bytes(b"not a database at all " * 50)
    clean = {k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--replay", str(short_tapes[0])],
        env={**clean, "PYTHON_DOTENV_DISABLED": "1", "DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "replay.sqlite3" in result.stderr and "--fresh" in result.stderr


def write_tape_until(data_dir: Path, last_ms: int) -> Path:
    """Today's tape (2025-10-02) with one IWM bar frame at 09:30 and one at `last_ms`."""
    from tape import TapeWriter, tape_path

    path = tape_path(data_dir, date(2025, 10, 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    with TapeWriter(path, underlying="IWM", benchmark="SPY", start_ms=at(9, 29)) as tape:
        for ms in (at(9, 30), last_ms):
            bar = {"ev": "A", "sym": "IWM", "v": 100, "vw": 240.0, "o": 240.0, "c": 240.0, "h": 240.0,
                   "l": 240.0, "a": 240.0, "s": ms - 1000, "e": ms}  # fmt: skip
            tape.write_ws(ms, [bar])
    return path


def test_a_rehearsal_on_a_data_dir_that_already_ran_past_its_clock_is_refused_with_the_fix(tmp_path):
    """A second rehearsal of the same day on the same DATA_DIR warmed up to 10:06, so every bar from
    09:30 on was late: 40 market minutes of FEED ERROR, STALL and no BUY, with no word of the cause."""
    tape = write_tape_until(tmp_path, at(10, 6, 12))
    result = run_main(tmp_path, SIM_CLOCK_START="2025-10-02T09:25:00-04:00")
    assert result.returncode == 2, result.stderr
    assert str(tape) in result.stderr and "10:06:12" in result.stderr and "fresh DATA_DIR" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_tape_ahead_of_the_clock_stops_the_warm_up_there_and_is_said(market, tmp_path):
    """The live daemon (a system clock set back) warms up to now only, and says why."""
    write_tape_until(tmp_path, at(10, 6, 12))
    with (
        fakes(market, at(9, 40)) as (pushover, polygon, clock),
        daemon_running(settings_for(polygon, pushover, tmp_path), clock) as (daemon, _thread),
    ):
        assert wait_for(lambda: any("clock went back" in m.form["message"] for m in pushover.messages), 20)
        latest = daemon.engine.last_bar
    # Bars of 09:40 and after come from the fake (the start's backfill, the stream); 10:06 is not warmed.
    assert latest is None or latest.end_ms < at(10, 0)


def test_a_stop_asked_during_the_warm_up_starts_nothing_and_sends_no_start(market, tmp_path):
    """The warm-up of a long tape ignored SIGTERM, then the stopping process sent a START; with a hung
    Pushover its send in the last flush took the stop past Render's 30 s grace."""
    from structlog.testing import capture_logs

    write_tape_until(tmp_path, at(10, 3))
    with fakes(market, at(10, 4)) as (pushover, polygon, clock):
        stop = threading.Event()
        daemon = Daemon(settings_for(polygon, pushover, tmp_path), clock, stop=stop)
        stop.set()  # as the signal watcher does when SIGTERM comes during the warm-up
        with capture_logs() as logs:
            assert daemon.run() == 0
        time.sleep(0.5)
        assert pushover.messages == []
    events = [e["event"] for e in logs]
    assert "warm_up_stopped" in events and "stream_started" not in events
