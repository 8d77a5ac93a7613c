"""`python main.py --status` on real journals built by replays, and the 5-minute session pulse."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from builders import DAY, TICKER, at, bar, calendar, chain, engine, quote

from alert_text import money
from config import Rules
from engine import open_action
from events import SetMeta, UpdatePosition
from health import HealthServer
from pnl_tracker import Journal
from replay import replay_tape
from risk_manager import Position
from status import (
    exit_triggers,
    fetch_health,
    health_url,
    journal_problem,
    price_text,
    read_health,
    session_pulse,
)

ROOT = Path(__file__).resolve().parents[1]
RULES = Rules()


def run_main(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """main.py in a fresh process, without the caller's keys, HEALTH_PORT or `.env`, plus `env`."""
    dropped = ("API_KEY", "TOKEN", "USER_KEY", "HEALTH_PORT", "SIM_CLOCK_START", "DATA_DIR")
    base = {k: v for k, v in os.environ.items() if not k.endswith(dropped)}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def status_json(data_dir: Path, now: str, **env: str) -> dict:
    done = run_main(
        ["--status", "--json"], data_dir.parent, DATA_DIR=str(data_dir), SIM_CLOCK_START=now, **env
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def live_journal_from(tape: Path, data_dir: Path) -> Path:
    """Replay `tape` into a journal and put it where the daemon keeps its live one."""
    journal = Journal(data_dir / "replay.sqlite3")
    replay_tape(
        tape,
        rules=RULES,
        calendar=calendar(RULES),
        journal=journal,
        on_alerts=lambda _a: None,
        on_log=lambda _log: None,
    )
    journal.close()
    live = data_dir / "journal.sqlite3"
    shutil.copy(data_dir / "replay.sqlite3", live)
    return live


def journal_trades(path: Path, day: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT trade_id, pnl_dollars FROM trades WHERE session_date=? ORDER BY exit_ms", (day,)
        ).fetchall()


@pytest.fixture(scope="module")
def closed_day(short_tapes, tmp_path_factory) -> Path:
    """DATA_DIR whose journal holds the first short day: three closed trades, no open position."""
    data_dir = tmp_path_factory.mktemp("closed") / "data"
    live_journal_from(short_tapes[0], data_dir)
    return data_dir


@pytest.fixture(scope="module")
def open_day(short_tapes, tmp_path_factory) -> Path:
    """DATA_DIR whose journal holds the second short day, whose tape ends with a position open."""
    data_dir = tmp_path_factory.mktemp("open") / "data"
    live_journal_from(short_tapes[1], data_dir)
    return data_dir


def test_status_json_matches_the_journals_trades(closed_day):
    live = closed_day / "journal.sqlite3"
    trades = journal_trades(live, "2025-10-06")
    assert len(trades) >= 2
    with sqlite3.connect(live) as db:
        alerts = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    status = status_json(closed_day, "2025-10-06T10:30:00-04:00")
    assert [(t["trade_id"], t["pnl_dollars"]) for t in status["trades_today"]] == trades
    assert status["day_pnl"] == round(sum(p for _, p in trades), 2) == status["lifetime_pnl"]
    assert status["day_wins"] == status["wins"] == sum(p > 0 for _, p in trades)
    assert status["day_losses"] == status["losses"] == sum(p <= 0 for _, p in trades)
    assert status["position"] is None and status["paused"] is False
    assert status["session"] | {"next_session": None} == {
        "date": "2025-10-06", "trading_day": True, "is_open": True, "open_time": "09:30",
        "close_time": "16:00", "early_close": False, "time_stop": "15:55", "next_session": None,
        "entry_window": "09:35-15:30", "entries_open": True,
    }  # fmt: skip
    # replay_tape without a notifier leaves every alert pending: nothing was sent.
    assert status["alerts"]["pending"] == alerts > 0 and status["alerts"]["last_sent_kind"] is None
    assert "HEALTH_PORT" in status["feed_note"] and status["feed"] is None


def test_status_text_on_another_day_shows_no_trades_today_but_the_lifetime(closed_day):
    trades = journal_trades(closed_day / "journal.sqlite3", "2025-10-06")
    lifetime = round(sum(p for _, p in trades), 2)
    done = run_main(["--status"], closed_day.parent, DATA_DIR=str(closed_day),
                    SIM_CLOCK_START="2025-10-07T08:00:00-04:00")  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "Session:   2025-10-07 closed (09:30-16:00 ET" in out
    assert f"Today:     0 trades, 0W-0L, P&L {money(0.0)}" in out
    wins = sum(p > 0 for _, p in trades)
    assert f"Lifetime:  {money(lifetime)}, {wins}W-{len(trades) - wins}L" in out
    assert "Position:  none open" in out
    assert "Entries:   none now (today's entry window is 09:35-15:30 ET)" in out, "08:00: before the window"


def test_the_last_sent_alert_and_the_pending_count_come_from_the_outbox(closed_day, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(closed_day, data_dir)
    journal = Journal(data_dir / "journal.sqlite3")
    pending = journal.pending()
    journal.mark_sent(pending[0].id, at(10, 0, day=DAY.replace(day=6)))
    journal.mark_sent(pending[1].id, at(10, 5, day=DAY.replace(day=6)))
    journal.mark_failed(pending[2].id, "HTTP 400")
    journal.close()
    status = status_json(data_dir, "2025-10-06T10:30:00-04:00")
    alerts = status["alerts"]
    assert alerts["last_sent_kind"] == pending[1].kind and alerts["last_sent_title"] == pending[1].title
    assert alerts["last_sent_time"] == "2025-10-06 10:05:00 ET"
    assert alerts["pending"] == len(pending) - 3 and alerts["failed"] == 1


def test_an_open_position_shows_its_pnl_and_the_nearest_exit_price(open_day):
    with sqlite3.connect(open_day / "journal.sqlite3") as db:
        row = db.execute(
            "SELECT trade_id, ticker, entry_price, peak, mark FROM positions WHERE open=1"
        ).fetchone()
    trade_id, ticker, entry, peak, mark = row
    status = status_json(open_day, "2025-10-07T10:30:00-04:00")
    position = status["position"]
    assert (position["trade_id"], position["ticker"], position["entry"]) == (trade_id, ticker, entry)
    assert (position["mark"], position["peak"], position["mark_source"]) == (mark, peak, "journal")
    assert position["pnl_dollars"] == round((mark - entry) * 100, 2)
    assert position["pnl_percent"] == round((mark / entry - 1) * 100, 2)
    stop, giveback = round(entry * 0.85, 4), round(peak * 0.70, 4)
    nearest = max(("Stop loss", stop), ("Hard giveback", giveback), key=lambda t: t[1])
    assert (position["nearest_exit"]["rule"], position["nearest_exit"]["price"]) == nearest
    assert {t["rule"] for t in position["other_exits"]} == {"Stop loss", "Hard giveback"} - {nearest[0]}
    text = run_main(["--status"], open_day.parent, DATA_DIR=str(open_day),
                    SIM_CLOCK_START="2025-10-07T10:30:00-04:00").stdout  # fmt: skip
    assert f"Position:  {ticker} x1 ({trade_id}" in text
    assert f"nearest exit: {nearest[0]} at {price_text(nearest[1])}" in text


def position_at(entry: float, peak: float, mark: float) -> Position:
    day = DAY.isoformat()
    return Position(
        f"{day}-01", day, TICKER, 242.0, day, 1, entry, entry, at(10, 0), 0.38, 0.2, peak, mark, entry
    )


def test_a_position_written_by_engine_actions_near_its_stop_names_the_stop(tmp_path):
    data_dir = tmp_path / "data"
    journal = Journal(data_dir / "journal.sqlite3")
    opened = position_at(entry=1.00, peak=1.00, mark=1.00)
    journal.record([open_action(opened)])
    journal.record([UpdatePosition(opened.trade_id, 1.04, 0.95, None)])
    journal.close()
    (data_dir / "PAUSE").write_text("paused\n")
    status = status_json(data_dir, "2025-10-02T11:00:00-04:00", STOP_LOSS_PERCENT="10")
    position = status["position"]
    assert position["nearest_exit"] == {"rule": "Stop loss", "price": 0.9, "distance_percent": 5.26}
    assert position["other_exits"][0]["rule"] == "Hard giveback"
    assert position["other_exits"][0]["price"] == pytest.approx(1.04 * 0.70)
    assert position["pnl_dollars"] == -5.0 and status["paused"] is True


def test_price_text_keeps_the_places_a_price_has():
    assert [price_text(v) for v in (0.52, 0.945, 0.6685, 2.0, 0.1)] == [
        "0.52",
        "0.945",
        "0.6685",
        "2.00",
        "0.10",
    ]


def test_exit_triggers_order_and_prices():
    near_stop = exit_triggers(2.00, 1.80, 2.10, RULES)
    assert [(t.rule, t.price) for t in near_stop] == [("Stop loss", 1.7), ("Hard giveback", 1.47)]
    after_a_run = exit_triggers(1.00, 2.50, 3.00, RULES)
    assert [(t.rule, t.price) for t in after_a_run] == [("Hard giveback", 2.1), ("Stop loss", 0.85)]
    assert after_a_run[0].distance_percent == 16.0


def test_the_running_daemons_health_gives_feed_and_live_mark_and_a_held_write_lock_does_not_block(
    open_day, tmp_path
):
    data_dir = tmp_path / "data"
    shutil.copytree(open_day, data_dir)
    with sqlite3.connect(data_dir / "journal.sqlite3") as db:
        trade_id, entry, peak = db.execute(
            "SELECT trade_id, entry_price, peak FROM positions WHERE open=1"
        ).fetchone()
    snapshot = {
        "status": "ok", "ws_connected": True, "last_bar_age_s": 0.4, "chain_age_s": 3.0, "outbox_pending": 0,
        "position": {"trade_id": trade_id, "mark": round(peak + 0.10, 2), "peak": round(peak + 0.10, 2)},
    }  # fmt: skip
    server = HealthServer("127.0.0.1", 0, lambda: snapshot).start()
    writer = sqlite3.connect(data_dir / "journal.sqlite3", isolation_level=None)
    try:
        # The daemon in the middle of a write: a read-only reader must neither wait for it nor see it.
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE positions SET mark=99 WHERE open=1")
        status = status_json(data_dir, "2025-10-07T10:30:00-04:00", HEALTH_PORT=str(server.port))
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        server.stop()
    assert status["feed"]["ws_connected"] is True and status["feed"]["status"] == "ok"
    position = status["position"]
    assert position["mark_source"] == "health" and position["mark"] == round(peak + 0.10, 2)
    assert position["pnl_dollars"] == round((position["mark"] - entry) * 100, 2)


def test_no_journal_says_so_and_creates_nothing(tmp_path):
    data_dir = tmp_path / "empty"
    done = run_main(
        ["--status"], tmp_path, DATA_DIR=str(data_dir), SIM_CLOCK_START="2025-11-28T12:00:00-05:00"
    )
    assert done.returncode == 0, done.stderr
    assert f"none at {data_dir / 'journal.sqlite3'}" in done.stdout
    assert "EARLY CLOSE at 13:00" in done.stdout and "time stop 12:55" in done.stdout
    assert "Entries:   allowed (entry window 09:35-12:30 ET)" in done.stdout
    after_cut_off = run_main(
        ["--status"], tmp_path, DATA_DIR=str(data_dir), SIM_CLOCK_START="2025-11-28T12:40:00-05:00"
    )
    assert "Entries:   none now (today's entry window is 09:35-12:30 ET)" in after_cut_off.stdout
    assert not (data_dir / "journal.sqlite3").exists()
    status = status_json(data_dir, "2025-11-29T12:00:00-05:00")
    assert status["journal_found"] is False and status["position"] is None
    assert status["session"]["trading_day"] is False and status["session"]["next_session"] == "2025-12-01"
    assert status["session"]["entries_open"] is False


def test_json_without_status_and_fresh_without_replay_are_usage_errors(tmp_path):
    for args in (["--json"], ["--fresh"]):
        done = run_main(args, tmp_path)
        assert done.returncode == 2 and "usage: python3 main.py" in done.stderr, args


def pulse_engine():
    eng = engine(RULES)
    eng.on_event(chain(at(9, 59, 50), quote(quote_ms=at(9, 59, 50))))
    for second in range(70):
        eng.on_event(bar(at(10, 0) + second * 1000, 240.0 + second * 0.001))
    return eng


def test_session_pulse_reports_bars_prices_chain_and_what_blocks():
    eng = pulse_engine()
    now = at(10, 1, 11)
    pulse = session_pulse(eng, now)
    assert pulse["bars_today"] == 70
    assert pulse["last_close"] == 240.069 and pulse["vwap"] == pytest.approx(240.0395, abs=1e-4)
    assert pulse["chain_age_s"] == 81.0 and pulse["position"] is None and pulse["mark"] is None
    assert pulse["last_bar_age_s"] == 0.8
    assert any(b.startswith("chain_stale") for b in pulse["blocked_by"]), pulse
    assert any(b.startswith("waiting for") and "volume_surge" in b for b in pulse["blocked_by"])


def test_session_pulse_with_a_position_and_the_bar_count_starting_again_each_day():
    eng = pulse_engine()
    eng.position = replace(position_at(entry=1.00, peak=1.10, mark=1.05), session_date=DAY.isoformat())
    pulse = session_pulse(eng, at(10, 1, 12))
    assert (pulse["position"], pulse["mark"]) == (TICKER, 1.05)
    assert pulse["blocked_by"][0] == f"position open ({TICKER})"
    eng.position = None
    next_day = DAY + timedelta(days=1)
    eng.on_event(bar(at(9, 40, day=next_day), 241.0))
    pulse = session_pulse(eng, at(9, 40, 2, day=next_day))
    assert pulse["bars_today"] == 1 and pulse["last_close"] == 241.0
    assert eng.counters.bars == 71


def test_session_pulse_before_any_bar():
    eng = engine(RULES)
    pulse = session_pulse(eng, at(9, 30))
    assert pulse["bars_today"] == 0 and pulse["last_close"] is None
    assert pulse["blocked_by"] == ["no bar yet today"]


def another_programs_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")


@pytest.mark.parametrize(
    "make, kind, error",
    [
        (lambda path: path.write_bytes(b""), "no_tables", "the file is empty (0 bytes)"),
        (lambda path: path.write_bytes(bytes(range(256)) * 16), "damaged", "file is not a database"),
        (another_programs_database, "no_tables", "no such table: trades"),
    ],
    ids=["empty", "random-bytes", "another-programs-database"],
)
def test_a_journal_that_cannot_be_read_is_said_with_what_to_do_and_exit_2(tmp_path, make, kind, error):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    journal = data_dir / "journal.sqlite3"
    make(journal)
    now = "2025-10-06T10:30:00-04:00"
    text = run_main(["--status"], tmp_path, DATA_DIR=str(data_dir), SIM_CLOCK_START=now)
    assert text.returncode == 2 and "Traceback" not in text.stderr
    assert f"Journal:   CANNOT BE READ ({kind}: {error}) at {journal}" in text.stdout
    assert "Session:   2025-10-06 OPEN" in text.stdout
    assert f"({error})" in text.stderr and f"mv {journal} {journal}.bad" in text.stderr
    said = "the daemon will not start on it" if kind == "damaged" else "The daemon creates its tables"
    assert said in text.stderr
    as_json = run_main(["--status", "--json"], tmp_path, DATA_DIR=str(data_dir), SIM_CLOCK_START=now)
    assert as_json.returncode == 2 and "Traceback" not in as_json.stderr
    status = json.loads(as_json.stdout)
    assert status["journal_found"] is True and status["position"] is None and status["alerts"] is None
    problem = status["journal_problem"]
    assert problem["kind"] == kind and problem["error"] == error and f"{journal}.bad" in problem["advice"]


def test_status_never_opens_an_emptied_journal_whose_wal_holds_the_daemon_s_writes(tmp_path):
    """`--status` opened a journal truncated under the daemon (read-only), and SQLite deleted its -wal:
    every trade, the lifetime P&L and the open position, which only the -wal still held."""
    from pnl_tracker import Journal

    data_dir = tmp_path / "data"
    journal = Journal(data_dir / "journal.sqlite3")
    journal.record([SetMeta("cursor", "x" * 5000)])
    path, wal = data_dir / "journal.sqlite3", data_dir / "journal.sqlite3-wal"
    os.truncate(path, 0)
    size = wal.stat().st_size
    text = run_main(
        ["--status"], tmp_path, DATA_DIR=str(data_dir), SIM_CLOCK_START="2025-10-06T10:30:00-04:00"
    )
    assert text.returncode == 2 and "Traceback" not in text.stderr
    assert f"its -wal holds {size:,} bytes" in text.stdout + text.stderr
    assert wal.stat().st_size == size
    journal.close()


def test_a_journal_of_a_newer_version_is_said_as_such_not_read_as_sound(tmp_path):
    """`--status` printed its position and lifetime with exit 0 while the daemon refused to start on it."""
    from pnl_tracker import Journal

    data_dir = tmp_path / "data"
    Journal(data_dir / "journal.sqlite3").close()
    with sqlite3.connect(data_dir / "journal.sqlite3") as db:
        db.execute("PRAGMA user_version=999")
    text = run_main(
        ["--status"], tmp_path, DATA_DIR=str(data_dir), SIM_CLOCK_START="2025-10-06T10:30:00-04:00"
    )
    assert text.returncode == 2 and "Traceback" not in text.stderr
    assert "CANNOT BE READ (newer: journal schema 999 is newer than this program (1))" in text.stdout
    assert "Run the version that wrote it" in text.stderr and "Lifetime" not in text.stdout


def test_a_folder_where_the_journal_goes_is_named_as_such_not_as_no_journal(tmp_path):
    """`--status` said "none ... the daemon has not run", while the daemon refused to start on it."""
    data_dir = tmp_path / "data"
    (data_dir / "journal.sqlite3").mkdir(parents=True)
    text = run_main(
        ["--status"], tmp_path, DATA_DIR=str(data_dir), SIM_CLOCK_START="2025-10-06T10:30:00-04:00"
    )
    assert text.returncode == 2 and "Traceback" not in text.stderr
    assert "CANNOT BE READ (damaged: a folder, not a journal file)" in text.stdout
    assert "the daemon will not start while it is there" in text.stderr


def test_a_journal_sqlite_cannot_open_now_is_unreadable_not_to_be_moved_aside(tmp_path):
    path = tmp_path / "gone" / "journal.sqlite3"
    with pytest.raises(sqlite3.OperationalError) as caught:
        sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True).execute("SELECT 1 FROM trades")
    problem = journal_problem(path, caught.value)
    assert problem.kind == "unreadable" and "do not move it aside" in problem.advice


def test_a_readable_journal_has_no_journal_problem(closed_day):
    status = status_json(closed_day, "2025-10-06T10:30:00-04:00")
    assert status["journal_problem"] is None


@pytest.mark.parametrize("where", ["a-file", "a-file/data"])
def test_a_data_dir_that_is_a_file_is_named_and_exits_2(tmp_path, where):
    (tmp_path / "a-file").write_text("not a folder\n")
    for args in (["--status"], ["--status", "--json"]):
        done = run_main(args, tmp_path, DATA_DIR=str(tmp_path / where))
        assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
        assert f"No status: DATA_DIR={str(tmp_path / where)!r}:" in done.stderr
        expected = "which is a file, not a folder" if "/" in where else "is a file, not a folder"
        assert expected in done.stderr


def test_a_data_dir_that_is_a_dangling_symbolic_link_names_its_target(tmp_path):
    """It said "cannot be created as a folder (File exists)", naming neither the link nor its target."""
    (tmp_path / "data").symlink_to(tmp_path / "volume-not-mounted")
    done = run_main([], tmp_path, DATA_DIR=str(tmp_path / "data"), POLYGON_API_KEY="k" * 20)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is a symbolic link to" in done.stderr and "volume-not-mounted" in done.stderr
    assert not (tmp_path / "volume-not-mounted").exists()


def test_health_port_0_says_the_port_cannot_be_known(tmp_path):
    status = status_json(tmp_path / "data", "2025-10-06T10:30:00-04:00", HEALTH_PORT="0")
    assert status["feed"] is None and "HEALTH_PORT=0" in status["feed_note"]
    assert "not set" not in status["feed_note"]


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_health_endpoint_that_cannot_answer_is_a_reason_never_an_exception():
    port = free_port()
    assert health_url("::1", 8080) == "http://[::1]:8080/health"
    assert health_url("0.0.0.0", 8080) == "http://127.0.0.1:8080/health"
    assert fetch_health("::1", port) is None  # unbracketed, httpx raised InvalidURL here
    snapshot, why = read_health("127.0.0.1", port)
    assert snapshot is None and f"nothing answers on http://127.0.0.1:{port}/health" in why
    snapshot, why = read_health("999.1.1.1", port)
    assert snapshot is None and "InvalidURL" in why


def test_health_on_an_ipv6_loopback_is_read():
    import http.server
    import socket
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = json.dumps({"status": "ok"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    class Server6(http.server.HTTPServer):
        address_family = socket.AF_INET6

    try:
        server = Server6(("::1", 0), Health)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert read_health("::1", server.server_address[1]) == ({"status": "ok"}, "")
    finally:
        server.shutdown()
        server.server_close()
