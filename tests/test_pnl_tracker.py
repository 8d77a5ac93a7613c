"""The journal: one transaction per decision, outbox dedupe, state restored after a restart."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from events import Alert, ClosePosition, Log, OpenPosition, SetMeta, UpdatePosition
from pnl_tracker import SCHEMA_VERSION, Journal, JournalError

OPEN = OpenPosition(
    "2025-10-02-01",
    "2025-10-02",
    "O:IWM251002C00242000",
    242.0,
    "2025-10-02",
    1,
    1.02,
    1.01,
    1_000,
    0.38,
    0.2,
)
BUY = Alert("BUY", "BUY:2025-10-02-01", "IWM 0DTE CALL — BUY", "text", 1, 1_000)


def close(pnl: float, trade_id: str = "2025-10-02-01", exit_ms: int = 5_000) -> ClosePosition:
    return ClosePosition(trade_id, 1.02 + pnl / 100, exit_ms, "Stop loss", 1.3, pnl, pnl / 1.02)


def test_wal_full_sync_and_schema_version(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    db = sqlite3.connect(tmp_path / "j.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    journal.close()


def sync_level(journal: Journal) -> int:
    """What SQLite says of the connection: 2 is FULL, 1 NORMAL."""
    return journal._db.execute("PRAGMA synchronous").fetchone()[0]


def test_the_live_daemon_s_journal_syncs_full(tmp_path):
    from clock import SimClock
    from config import Settings
    from daemon import Daemon

    daemon = Daemon(Settings(polygon_api_key="k", data_dir=tmp_path), SimClock(1_759_411_800_000, 1.0))
    try:
        assert sync_level(daemon.journal) == 2 and daemon.journal.synchronous == "FULL"
    finally:
        daemon.journal.close()
        daemon.instance_lock.release()


def test_synchronous_is_full_or_normal_and_nothing_else(tmp_path):
    assert sync_level(Journal(tmp_path / "full.sqlite3")) == 2
    normal = Journal(tmp_path / "normal.sqlite3", synchronous="NORMAL")
    assert sync_level(normal) == 1 and normal.synchronous == "NORMAL"
    normal.set_synchronous("FULL")
    assert sync_level(normal) == 2
    for bad in ("OFF", "full; DROP TABLE meta", 1):
        with pytest.raises(ValueError, match="synchronous"):
            Journal(tmp_path / "bad.sqlite3", synchronous=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="synchronous"):
            normal.set_synchronous(bad)  # type: ignore[arg-type]
    assert not (tmp_path / "bad.sqlite3").exists()


def test_a_replay_journal_syncs_normal_with_the_same_trades_and_alerts_as_full(demo_tape, tmp_path):
    from builders import calendar

    from config import Rules
    from replay import replay_tape

    runs = {}
    for mode in ("FULL", None):  # None: the replay's default
        journal = Journal(tmp_path / f"{mode}.sqlite3")  # made as main.py makes it: FULL
        sent: list[Alert] = []
        options = {} if mode is None else {"synchronous": mode}
        replay_tape(
            demo_tape,
            rules=Rules(),
            calendar=calendar(Rules()),
            journal=journal,
            on_alerts=sent.extend,
            on_log=lambda _log: None,
            **options,  # type: ignore[arg-type]
        )
        assert sync_level(journal) == (2 if mode == "FULL" else 1)
        tables = [journal.table_rows(table) for table in ("positions", "trades", "outbox", "meta")]
        runs[mode] = (sent, tables)
        journal.close()
    assert runs["FULL"] == runs[None]
    assert [a.kind for a in runs[None][0]].count("SELL") >= 2


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "j.sqlite3"
    sqlite3.connect(path).execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match="newer"):
        Journal(path)


def test_decision_and_alert_commit_together_and_dedupe(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    fresh = journal.record([OPEN, BUY, Log("x", {})], cursor="tape:7")
    assert fresh == [BUY]
    assert journal.record([BUY]) == []  # same dedupe key: not recorded twice
    assert [row[0] for row in journal.outbox_rows()] == ["BUY:2025-10-02-01"]
    assert journal.meta("cursor") == "tape:7"


def test_a_failed_transaction_leaves_nothing_behind(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    with pytest.raises(JournalError):
        journal.record([BUY, close(-10.0, trade_id="unknown")])
    assert journal.outbox_rows() == [] and journal.trades() == []


def test_restored_state_has_position_peak_day_and_lifetime(tmp_path):
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    journal.record([OPEN, BUY])
    journal.record([UpdatePosition("2025-10-02-01", 1.40, 1.35, 4_000)])
    journal.close()
    state = Journal(path).restored_state("2025-10-02")
    assert state.position is not None
    assert (state.position.peak, state.position.mark, state.position.below_vwap_since_ms) == (
        1.40,
        1.35,
        4_000,
    )
    assert state.opened_today == 1 and state.lifetime.pnl == 0.0


def test_a_full_disk_with_no_room_for_the_wal_index_still_reads_the_open_position(tmp_path):
    """On a full disk SQLite cannot create the WAL's shared-memory file and refused even to read
    (SQLITE_IOERR_SHMSIZE): a restart while holding did not start, and the position was never sold. A
    file-size limit below that file's 32 KB makes the same failure without a real full disk."""
    import subprocess
    import sys

    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    journal.record([OPEN, BUY])
    assert not journal.exclusive
    journal.close()
    limited = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))\n"
        "from pnl_tracker import Journal\n"
        "journal = Journal(Path(sys.argv[1]), check=True)\n"
        "print(journal.exclusive, journal.restored_state('2025-10-02').position.trade_id)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", limited, str(path)], capture_output=True, text=True,
                          cwd=root, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "True 2025-10-02-01\n", "")


def test_closed_trades_feed_day_record_lifetime_and_latch(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    second = OpenPosition(**{**{f: getattr(OPEN, f) for f in OPEN.__slots__}, "trade_id": "2025-10-02-02"})
    journal.record([OPEN, close(-17.0)])
    journal.record([second, close(0.0, "2025-10-02-02", 9_000), SetMeta("critical_loss_latched", "1")])
    state = journal.restored_state("2025-10-02")
    assert state.position is None
    assert (state.day.trades, state.day.consecutive_losses, state.day.pnl) == (2, 2, -17.0)
    assert (state.lifetime.pnl, state.lifetime.wins, state.lifetime.losses) == (-17.0, 0, 2)
    assert state.last_exit_ms == 9_000 and state.critical_latched
    other_day = journal.restored_state("2025-10-03")
    assert other_day.day.trades == 0 and other_day.opened_today == 0 and other_day.lifetime.pnl == -17.0


def test_outbox_states(tmp_path):
    journal = Journal(tmp_path / "j.sqlite3")
    journal.record([BUY, Alert("SELL", "SELL:1", "t", "m", 1, 2_000)])
    first, second = journal.pending()
    journal.mark_attempt(first.id, "HTTP 500")
    assert [i.attempts for i in journal.pending()] == [1, 0]
    journal.mark_sent(first.id, 3_000)
    journal.mark_failed(second.id, "HTTP 400")
    assert journal.pending() == [] and journal.pending_count() == 0


def test_a_journal_that_refuses_writes_fails_loudly_and_the_alert_still_goes_out(tmp_path):
    """A write failure (disk full, read-only file; simulated with query_only) loses no alert."""
    from builders import at, burst_bars, chain, engine, quote
    from structlog.testing import capture_logs

    from feed import FeedDecoder
    from pipeline import Pipeline

    journal = Journal(tmp_path / "j.sqlite3")
    journal._db.execute("PRAGMA query_only=1")
    delivered: list[Alert] = []
    pipeline = Pipeline(
        engine(), journal, FeedDecoder("IWM", "SPY"), on_alerts=delivered.extend, on_log=lambda _l: None
    )
    start = at(10, 0)
    with capture_logs() as logs:
        pipeline.run(chain(start + 110_000, quote()))
        for bar in burst_bars(start):
            pipeline.run(bar)
    assert [a.kind for a in delivered] == ["BUY"]
    assert pipeline.journal_failures == 1
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["journal_write_failed"]
    journal._db.execute("PRAGMA query_only=0")
    assert journal.outbox_rows() == [] and journal.restored_state("2025-10-02").position is None


def test_a_journal_whose_write_lock_another_process_holds_still_opens_and_reads(tmp_path: Path) -> None:
    # A restart while a backup or a DB browser holds the write lock must not refuse to start (the
    # daemon then follows the position in memory and writes when the lock is gone).
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        reopened = Journal(path, busy_timeout_s=0.1, check=True)
        assert reopened.pending() == [] and reopened.trades() == []
        with pytest.raises(JournalError):
            reopened.set_meta("k", "v")
        reopened.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_another_programs_file_with_tables_of_our_names_is_refused_untouched(tmp_path: Path) -> None:
    """It was stamped as ours, then every read was a traceback (`no such column: exit_ms`)."""
    path = tmp_path / "journal.sqlite3"
    other = sqlite3.connect(path)
    other.execute("CREATE TABLE trades(x)")
    other.commit()
    other.close()
    with pytest.raises(JournalError, match="is not this program's: its table 'trades' lacks"):
        Journal(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 0


def journal_emptied_in_place(tmp_path: Path) -> Path:
    """A journal with a trade whose file was truncated to 0 bytes under a live connection (its -wal kept)."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.record([OPEN, BUY])
    journal.record([close(12.0)])
    os.truncate(path, 0)
    return path  # the connection is left open, as a kill -9 leaves it


def test_an_emptied_journal_whose_wal_holds_writes_is_refused_and_its_wal_kept(tmp_path):
    """SQLite deletes the -wal of an empty database file when it opens it: a restart on a journal truncated
    under the daemon started a new, empty journal ("Lifetime $0.00") and the held position's SELL never came."""
    path = journal_emptied_in_place(tmp_path)
    wal = path.with_name("journal.sqlite3-wal")
    size = wal.stat().st_size
    with pytest.raises(JournalError) as refused:
        Journal(path, check=True)
    assert "empty (0 bytes)" in str(refused.value) and f"{size:,} bytes" in str(refused.value)
    assert wal.stat().st_size == size


def test_an_empty_journal_is_new_unless_data_dir_holds_tapes_of_earlier_sessions(tmp_path):
    path = tmp_path / "journal.sqlite3"
    path.touch()
    with pytest.raises(JournalError) as refused:
        Journal(path, history=True)
    assert "tapes of earlier sessions" in str(refused.value)
    Journal(path).close()  # a first start killed before its tables were written: a new journal


def test_a_folder_named_like_the_journal_is_named_for_what_it_is(tmp_path):
    (tmp_path / "journal.sqlite3").mkdir()
    with pytest.raises(JournalError) as refused:
        Journal(tmp_path / "journal.sqlite3")
    assert "is a folder, not a journal file" in str(refused.value)


def test_a_journal_emptied_under_its_connection_is_written_back_from_it(tmp_path):
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal.record([OPEN, BUY])
    journal.record([close(12.0)])
    os.truncate(path, 0)
    assert journal.relink_if_gone() == "the journal file was emptied (truncated to 0 bytes)"
    journal.close()
    assert [t.pnl_dollars for t in Journal(path).trades()] == [12.0]
