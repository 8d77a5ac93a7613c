"""The write-behind journal and the in-memory outbox against a real SQLite file that runs out of room."""

from __future__ import annotations

from pathlib import Path

import pytest

import journal_rescue
from delivery import MemoryOutbox, WriteBehindJournal
from events import Alert, ClosePosition, OpenPosition, UpdatePosition
from journal_rescue import rescue_paths
from pnl_tracker import Journal

BIG = "x" * 20_000  # needs overflow pages, so a capped file cannot take it


def alert(key: str, message: str = "text") -> Alert:
    return Alert(key.split(":")[0], key, f"title {key}", message, 1, 1_759_415_400_000)


def opened(trade_id: str = "2025-10-02-01") -> OpenPosition:
    return OpenPosition(trade_id, "2025-10-02", "O:IWM251002C00243000", 243.0, "2025-10-02", 1, 1.5, 1.45,
                        1_759_415_400_000, 0.4, 0.3)  # fmt: skip


def closed(trade_id: str = "2025-10-02-01") -> ClosePosition:
    return ClosePosition(trade_id, 1.8, 1_759_415_500_000, "Hard giveback", 2.0, 30.0, 20.0)


class Recorder:
    def __init__(self) -> None:
        self.failing: list[str] = []
        self.recovered: list[int] = []


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Journal, WriteBehindJournal, Recorder]:
    journal = Journal(tmp_path / "journal.sqlite3")
    seen = Recorder()
    writer = WriteBehindJournal(
        journal,
        clock_ms=lambda: 1_759_415_400_000,
        on_failing=seen.failing.append,
        on_recovered=seen.recovered.append,
        retry_every_s=0.0,
    )
    yield journal, writer, seen
    journal.close()


def disk_full(journal: Journal, full: bool = True) -> None:
    """SQLITE_FULL for real: the file may not grow past its size (or may again)."""
    pages = journal._db.execute("PRAGMA page_count").fetchone()[0]
    journal._db.execute(f"PRAGMA max_page_count={pages if full else 1073741823}")


def test_a_full_disk_keeps_decisions_in_order_and_writes_them_when_room_returns(parts) -> None:
    journal, writer, seen = parts
    disk_full(journal)

    first = writer.record([opened(), alert("BUY:1", BIG)])
    second = writer.record([closed(), alert("SELL:1", BIG)])
    held = writer.health()

    assert [a.dedupe_key for a in first + second] == ["BUY:1", "SELL:1"]
    assert held.failing and held.backlog == 2 and "full" in (held.last_error or "")
    assert len(seen.failing) == 1 and journal.trades() == []

    writer.mark("BUY:1", "sent", None, 111)
    disk_full(journal, False)
    writer.catch_up(now=True)

    assert not writer.health().failing and writer.health().backlog == 0
    assert seen.recovered == [2]
    assert [t.trade_id for t in journal.trades()] == ["2025-10-02-01"]
    rows = [(r[1], r[7], r[10]) for r in journal.table_rows("outbox")]
    assert rows == [("BUY:1", "sent", 111), ("SELL:1", "pending", None)]


def test_an_alert_is_fresh_once_whether_or_not_the_journal_takes_it(parts) -> None:
    journal, writer, _seen = parts
    assert writer.record([alert("STALL:10:05")]) != []
    disk_full(journal)
    assert writer.record([alert("STALL:10:05"), alert("BUY:1", BIG)]) == [alert("BUY:1", BIG)]
    assert writer.record([alert("BUY:1", BIG)]) == []


def test_keys_already_in_the_journal_at_start_are_never_fresh(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.record([alert("SELL:1")])
    writer = WriteBehindJournal(journal, clock_ms=lambda: 0)
    assert writer.record([alert("SELL:1")]) == []
    journal.close()


def test_mark_updates_while_failing_coalesce_to_the_latest(parts) -> None:
    journal, writer, _seen = parts
    writer.record([opened()])
    disk_full(journal)
    writer.record([alert("X:1", BIG)])
    for peak in (1.5, 1.6, 1.7, 1.8):
        writer.record([UpdatePosition("2025-10-02-01", peak, peak, None)])
    assert writer.health().backlog == 2
    disk_full(journal, False)
    writer.catch_up(now=True)
    assert journal.restored_state("2025-10-02").position.peak == 1.8


def test_the_memory_outbox_keeps_order_and_writes_outcomes_behind(parts) -> None:
    journal, writer, _seen = parts
    journal.record([alert("START:1")])
    outbox = MemoryOutbox(writer, journal.pending())
    outbox.add(writer.record([alert("BUY:1"), alert("SELL:1")]))

    items = outbox.pending()
    assert [i.dedupe_key for i in items] == ["START:1", "BUY:1", "SELL:1"]
    outbox.mark_attempt(items[0].id, "HTTP 500")
    assert outbox.pending()[0].attempts == 1
    outbox.mark_sent(items[0].id, 5)
    outbox.mark_failed(items[1].id, "HTTP 400")
    outbox.mark_sent(items[0].id, 6)  # a second outcome for a finished item changes nothing

    assert [i.dedupe_key for i in outbox.pending()] == ["SELL:1"]
    statuses = {r[1]: (r[7], r[8]) for r in journal.table_rows("outbox")}
    assert statuses == {"START:1": ("sent", 2), "BUY:1": ("failed", 1), "SELL:1": ("pending", 0)}
    assert outbox.last_sent is not None and outbox.last_sent.dedupe_key == "START:1"


def test_a_decision_the_schema_refuses_is_dropped_so_later_ones_are_written(parts) -> None:
    journal, writer, seen = parts
    writer.record([closed("never-opened"), alert("SELL:never-opened")])  # no such trade: never writable
    writer.record([opened(), alert("BUY:1")])
    assert not writer.health().failing and seen.failing == []
    assert [r[1] for r in journal.table_rows("outbox")] == ["BUY:1"]
    assert journal.restored_state("2025-10-02").position is not None


def test_writes_held_at_a_stop_survive_in_a_rescue_file_and_are_written_in_order_at_the_next_start(
    parts, tmp_path: Path
) -> None:
    journal, writer, _seen = parts
    disk_full(journal)
    writer.record([opened(), alert("BUY:1", BIG)])
    writer.mark("BUY:1", "sent", None, 111)
    writer.record([closed(), alert("SELL:1", BIG)])
    first, _reserve, spare = rescue_paths(tmp_path / "data")
    first.mkdir(
        parents=True
    )  # a folder where the file should go: the data folder refuses, the spare takes it
    try:
        saved = journal_rescue.save(writer.held(), (first, spare))
        assert saved == spare
        disk_full(journal, False)
        ((path, held),) = journal_rescue.load((first, spare))
        journal_rescue.write_to(journal, held)
    finally:
        spare.unlink(missing_ok=True)
    assert path == spare and len(held) == 3
    assert [t.trade_id for t in journal.trades()] == ["2025-10-02-01"]
    rows = [(r[1], r[7], r[10]) for r in journal.table_rows("outbox")]
    assert rows == [("BUY:1", "sent", 111), ("SELL:1", "pending", None)]


def test_a_full_data_disk_keeps_the_rescue_in_its_reserve_not_in_a_temp_folder_a_restart_wipes(
    parts, tmp_path: Path
) -> None:
    """On a full disk the rescue went to the temporary folder; Render's restart wiped it, and the restart
    resumed a position whose SELL was sent, then sold it again at another price (an audit's find). The
    reserve made at start takes it in place; a torn write of one slot leaves the other whole."""
    journal, writer, _seen = parts
    data = tmp_path / "data"
    first, reserve, spare = rescue_paths(data)
    data.mkdir()
    assert (
        journal_rescue.ensure_reserve(data)
        and reserve.stat().st_size == 2 * journal_rescue.RESERVE_SLOT_BYTES
    )
    first.mkdir()  # the data folder takes no new file, as on a full disk
    disk_full(journal)
    writer.record([opened(), alert("BUY:1", BIG)])
    assert journal_rescue.save(writer.held(), (first, reserve, spare)) == reserve
    writer.record([closed(), alert("SELL:1", BIG)])
    assert journal_rescue.save(writer.held(), (first, reserve, spare)) == reserve
    assert not spare.exists() and reserve.stat().st_size == 2 * journal_rescue.RESERVE_SLOT_BYTES
    ((path, held),) = journal_rescue.load((first, reserve, spare))
    assert path == reserve and len(held) == 2, "the newer slot: the SELL too"
    # A write torn inside the newer slot (a kill mid-write): the older slot is read, whole.
    newer = 1  # the second save went to the second slot
    with open(reserve, "r+b") as file:
        file.seek(newer * journal_rescue.RESERVE_SLOT_BYTES + 100)
        file.write(b"torn")
    ((_path, older),) = journal_rescue.load((first, reserve, spare))
    assert len(older) == 1
    disk_full(journal, False)
    journal_rescue.write_to(journal, held)
    journal_rescue.discard([reserve])
    assert journal_rescue.load((first, reserve, spare)) == [] and reserve.is_file(), "kept for the next time"
    assert [t.trade_id for t in journal.trades()] == ["2025-10-02-01"]


def test_an_unreadable_rescue_file_is_set_aside_and_said(tmp_path: Path) -> None:
    path = tmp_path / "journal.rescue"
    path.write_bytes(b"not a pickle")
    assert journal_rescue.load((path,)) == []
    assert not path.exists() and (tmp_path / "journal.rescue.bad").read_bytes() == b"not a pickle"


class Ticks:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rescuing_writer(tmp_path: Path) -> tuple[Journal, WriteBehindJournal, tuple[Path, Path], Ticks]:
    """A write-behind journal that keeps a rescue file under `tmp_path/data`, retrying every 5 s."""
    paths = rescue_paths(tmp_path / "data")
    (tmp_path / "data").mkdir()
    journal = Journal(tmp_path / "journal.sqlite3")
    ticks = Ticks()
    writer = WriteBehindJournal(
        journal, clock_ms=lambda: 0, monotonic=ticks, retry_every_s=5.0, rescue_paths=paths
    )
    return journal, writer, paths, ticks


def test_held_writes_are_in_a_rescue_file_at_once_so_a_kill_loses_no_buy_or_sent_mark(
    tmp_path: Path,
) -> None:
    """A SIGKILL skips every stop: the rescue file kept while failing is all the next start has."""
    journal, writer, paths, _ticks = rescuing_writer(tmp_path)
    try:
        disk_full(journal)
        writer.record([opened(), alert("BUY:1", BIG)])
        writer.mark("BUY:1", "sent", None, 111)
        # Killed here: nothing of the writer runs again; the next start reads the rescue.
        ((path, held),) = journal_rescue.load(paths)
        disk_full(journal, False)
        journal_rescue.write_to(journal, held)
    finally:
        paths[1].unlink(missing_ok=True)
    assert path == paths[0]
    assert journal.restored_state("2025-10-02").position is not None
    assert [(r[1], r[7], r[10]) for r in journal.table_rows("outbox")] == [("BUY:1", "sent", 111)]
    journal.close()


def test_mark_updates_alone_refresh_the_rescue_at_most_once_per_retry_and_recovery_removes_it(
    tmp_path: Path,
) -> None:
    journal, writer, paths, ticks = rescuing_writer(tmp_path)
    writer.record([opened()])
    disk_full(journal)
    writer.record([alert("X:1", BIG)])
    writer.record([UpdatePosition("2025-10-02-01", 1.6, 1.6, None)])

    def rescued_peak() -> float:
        ((_path, held),) = journal_rescue.load(paths)
        updates = [a for actions, _ in held.decisions for a in actions if isinstance(a, UpdatePosition)]
        return updates[-1].peak if updates else 0.0

    assert rescued_peak() == 0.0  # within the retry time of the urgent save: not written yet
    ticks.now += 5.0
    writer.catch_up()
    assert rescued_peak() == 1.6  # the retry brought it up to date
    writer.record([UpdatePosition("2025-10-02-01", 1.7, 1.7, None)])
    assert rescued_peak() == 1.6
    disk_full(journal, False)
    ticks.now += 5.0
    writer.catch_up()
    assert not writer.health().failing
    assert not paths[0].exists() and not paths[1].exists()
    assert journal.restored_state("2025-10-02").position.peak == 1.7
    journal.close()


def test_a_journal_write_that_never_returns_holds_no_decision_and_is_written_when_the_disk_answers(tmp_path):
    """A frozen or lost volume keeps a write in the kernel: written on the engine thread, it held the engine
    (no BUY, no SELL, not even the watchdog's exit) for as long as the disk hung. The writer thread alone
    waits; the caller goes on after `stuck_after_s`. The journal's lock stands in for the hung disk."""
    import threading
    import time

    journal = Journal(tmp_path / "journal.sqlite3")
    seen = Recorder()
    writer = WriteBehindJournal(journal, clock_ms=lambda: 5, on_failing=seen.failing.append,
                                on_recovered=seen.recovered.append, stuck_after_s=2.0, retry_every_s=0.05)  # fmt: skip
    threading.Thread(target=writer.run, daemon=True).start()
    assert writer.record([alert("START:1")]) == [
        alert("START:1")
    ]  # a healthy disk: written before it returns
    assert [r[1] for r in journal.table_rows("outbox")] == ["START:1"]

    journal._lock.acquire()  # the next write waits inside the journal, as in a frozen disk's kernel
    started = time.monotonic()
    bought = writer.record([opened(), alert("BUY:1")])
    waited_for_buy = time.monotonic() - started
    started = time.monotonic()
    sold = writer.record([closed(), alert("SELL:1")])
    waited_for_sell = time.monotonic() - started
    writer.mark("BUY:1", "sent", None, 111)
    assert [a.dedupe_key for a in bought + sold] == ["BUY:1", "SELL:1"]
    assert 2.0 <= waited_for_buy < 10 and waited_for_sell < 1.0, "only the first decision waits, and briefly"
    assert writer.stuck and writer.health().failing
    assert seen.failing == ["the journal's disk did not take a write within 2 s"]

    journal._lock.release()  # the disk answers
    deadline = time.monotonic() + 10
    while writer.health().backlog and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not writer.health().failing and seen.recovered == [2] and not writer.stuck
    assert [t.trade_id for t in journal.trades()] == ["2025-10-02-01"]
    rows = [(r[1], r[7]) for r in journal.table_rows("outbox")]
    assert rows == [("START:1", "pending"), ("BUY:1", "sent"), ("SELL:1", "pending")]
    writer.close()
    journal.close()


def test_decisions_held_behind_a_write_that_never_returns_are_rescued_aside_for_a_kill(tmp_path):
    """The writer thread keeps the rescue file, and it was the thread stuck in the hung write: a kill -9
    while the disk hung left no rescue anywhere, and the restart resumed the sold position and sent a
    second SELL with another P&L. A thread of its own now keeps the rescue in the temporary folder."""
    import threading
    import time

    paths = (tmp_path / "data" / "journal.rescue", tmp_path / "temp" / "journal.rescue")
    for path in paths:
        path.parent.mkdir()
    journal = Journal(tmp_path / "journal.sqlite3")
    writer = WriteBehindJournal(journal, clock_ms=lambda: 5, stuck_after_s=0.5, retry_every_s=0.05,
                                rescue_paths=paths)  # fmt: skip
    threading.Thread(target=writer.run, daemon=True).start()
    journal._lock.acquire()  # the next write waits inside the journal, as in a frozen disk's kernel
    writer.record([opened(), alert("BUY:1")])
    writer.record([closed(), alert("SELL:1")])
    writer.mark("SELL:1", "sent", None, 222)

    def rescued_aside() -> list[str]:
        found = journal_rescue.load(paths[1:])
        held = found[0][1] if found else journal_rescue.Held((), ())
        keys = [a.dedupe_key for actions, _ in held.decisions for a in actions if isinstance(a, Alert)]
        return keys + [outcome.dedupe_key for outcome in held.outcomes]

    deadline = time.monotonic() + 10
    while rescued_aside() != ["BUY:1", "SELL:1", "SELL:1"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rescued_aside() == ["BUY:1", "SELL:1", "SELL:1"], "the BUY, the SELL and its sent mark"
    assert writer.stuck and not paths[0].exists(), "the stuck writer itself could save nothing"

    journal._lock.release()  # the disk answers: everything is written, and the rescue goes
    deadline = time.monotonic() + 10
    while (writer.health().backlog or paths[1].exists()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not writer.health().failing and not paths[0].exists() and not paths[1].exists()
    assert [t.trade_id for t in journal.trades()] == ["2025-10-02-01"]
    writer.close()
    journal.close()


def test_a_data_dir_not_named_in_utf8_and_a_missing_temp_folder_still_give_rescue_paths(
    tmp_path, monkeypatch
):
    """Both refused the daemon's start: a Latin-1 folder name failed a strict encode, and a container with a
    read-only root (no usable temporary folder) raised from `tempfile.gettempdir`."""
    import os
    import tempfile

    latin = tmp_path / os.fsdecode(b"caf\xe9")
    latin.mkdir()
    first, reserve, spare = rescue_paths(latin)
    assert first.parent == latin == reserve.parent and spare.name.startswith("iwm-alerter-")
    assert journal_rescue.save(journal_rescue.Held((), ()), (first,)) == first

    def no_temp_folder() -> str:
        raise FileNotFoundError("No usable temporary directory found")

    monkeypatch.setattr(tempfile, "gettempdir", no_temp_folder)
    first, _reserve, spare = rescue_paths(latin)
    assert spare.parent == latin and spare != first
    assert journal_rescue.in_temp(latin, "not_started").parent == latin
