"""The SQLite journal: open position, closed trades, lifetime stats, the alert outbox and meta.

Every decision of the engine is written in ONE transaction together with the alerts it caused,
before any network call, so a crash at any instant loses nothing and sends nothing twice.
WAL mode with synchronous=FULL: each commit survives power loss where storage honours fsync.
Journals of replays and backtests may ask for synchronous=NORMAL instead (commits then reach the
disk at WAL checkpoints, not at each commit): they can always be rebuilt from their tapes.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from alert_text import DayTrade, summary_key
from engine import CRITICAL_LATCH, MARK_QUOTE_META, OwedSummary, RestoredState, saved_mark_quote_ms
from events import Action, Alert, ClosePosition, Log, OpenPosition, SetMeta, UpdatePosition
from redaction import valid_text
from risk_manager import DayRecord, Lifetime, Position

SCHEMA_VERSION = 1
# What a write can raise besides the disk's sqlite3.Error: a value SQLite cannot bind (a text that is not
# UTF-8, an int past 64 bits). Either way the write is refused as a JournalError, never a crash.
WRITE_ERRORS = (sqlite3.Error, ValueError, OverflowError)

# How hard a commit waits for the disk: FULL for the live journal (the truth after a crash),
# NORMAL for journals that can be rebuilt from their tapes (replays, backtests).
Synchronous = Literal["FULL", "NORMAL"]
SYNCHRONOUS_MODES: tuple[Synchronous, ...] = get_args(Synchronous)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS positions (
    trade_id TEXT PRIMARY KEY, session_date TEXT NOT NULL, ticker TEXT NOT NULL, strike REAL NOT NULL,
    expiry TEXT NOT NULL, contracts INTEGER NOT NULL, entry_price REAL NOT NULL, entry_mark REAL NOT NULL,
    entry_ms INTEGER NOT NULL, delta REAL NOT NULL, iv REAL, peak REAL NOT NULL, mark REAL NOT NULL,
    bid REAL NOT NULL, below_vwap_since_ms INTEGER, open INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS trades (
    trade_id TEXT PRIMARY KEY REFERENCES positions(trade_id), session_date TEXT NOT NULL,
    ticker TEXT NOT NULL, contracts INTEGER NOT NULL, entry_price REAL NOT NULL, exit_price REAL NOT NULL,
    entry_ms INTEGER NOT NULL, exit_ms INTEGER NOT NULL, reason TEXT NOT NULL, peak REAL NOT NULL,
    pnl_dollars REAL NOT NULL, pnl_percent REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, dedupe_key TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    title TEXT NOT NULL, message TEXT NOT NULL, priority INTEGER NOT NULL, at_ms INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    sent_ms INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(status, id);
"""


_IN_FLIGHT_BY_KEY = "UPDATE outbox SET status=? WHERE dedupe_key=? AND status=?"
_OUTCOME_BY_KEY = (
    "UPDATE outbox SET status=?, attempts=attempts+1, last_error=?, sent_ms=? WHERE dedupe_key=?"
)


@functools.cache
def _schema_columns() -> dict[str, frozenset[str]]:
    """Each table of SCHEMA and its columns, as SQLite itself reads the schema."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: frozenset(row[1] for row in db.execute(f"PRAGMA table_info({t})")) for t in tables}
    finally:
        db.close()


def empty_journal_problem(path: Path, *, history: bool = False) -> str | None:
    """Why the journal file at `path`, empty (0 bytes), must not be opened as a new journal; None when
    it is not empty or nothing would be lost. SQLite deletes the -wal of an empty database file when
    it opens it, and that -wal holds the latest writes (a `truncate` under the daemon, then a restart
    or a `--status`, lost a held position's SELL that way). `history`: DATA_DIR holds tapes of
    earlier sessions, so an empty journal is a lost one, not a first start."""
    if file_size(path) != 0:
        return None
    wal = file_size(path.with_name(path.name + "-wal")) or 0
    if wal > 0:
        return (
            f"the file is empty (0 bytes) while its -wal holds {wal:,} bytes of its latest writes, which "
            "opening it would delete: copy both files somewhere safe, then move both aside"
        )
    if history:
        return (
            "the file is empty (0 bytes), though DATA_DIR holds tapes of earlier sessions: the trades, the "
            "lifetime P&L and any open position it held are not in it"
        )
    return None


def file_size(path: Path) -> int | None:
    """The size of the regular file at `path`, or None (no such file, a folder, not readable)."""
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _set_aside(path: Path, problem: str) -> None:
    """A file that replaced the journal (with its side files) is renamed `.replaced`, not lost."""
    if "replaced" not in problem or not path.exists():
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        return
    for suffix in ("", "-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(path.with_name(f"{path.name}.replaced{suffix}"))


JOURNAL_TABLES = frozenset({"meta", "positions", "trades", "outbox"})


class JournalError(RuntimeError):
    """The journal cannot be used (newer schema, corrupt file, disk full)."""


def _check_synchronous(mode: object) -> None:
    """Refuse a mode other than FULL and NORMAL (it is put into a PRAGMA: never pass text through)."""
    if mode not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {mode!r}")


# Outbox statuses. SENDING: a request left with this alert and no answer came back (the process died
# or the request timed out), so it may have reached the phone: it is sent again, marked as a possible
# repeat. Both PENDING and SENDING are still to be delivered.
PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"
IN_FLIGHT = "in_flight"  # an outcome, not a status: a request is leaving now (PENDING becomes SENDING)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    dedupe_key: str
    kind: str
    title: str
    message: str
    priority: int
    at_ms: int
    attempts: int
    maybe_sent: bool = False  # an earlier request got no answer: it may have reached the phone


@dataclass(frozen=True, slots=True)
class TradeRow:
    trade_id: str
    session_date: str
    ticker: str
    contracts: int
    entry_price: float
    exit_price: float
    entry_ms: int
    exit_ms: int
    reason: str
    peak: float
    pnl_dollars: float
    pnl_percent: float


class Journal:
    """One SQLite file. Thread-safe: a lock serialises the engine's writes and the notifier's."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 5.0,
        check: bool = False,
        synchronous: Synchronous = "FULL",
        history: bool = False,
    ) -> None:
        """Open (or create) the journal at `path`.

        `busy_timeout_s` is how long a write waits for another process's lock; the live daemon uses a
        short one so its engine thread never freezes behind a backup or a DB browser. `check` runs
        SQLite's quick_check first, so a damaged file is refused at start, not at the first trade.
        `synchronous` is FULL (the default, the live journal's) or NORMAL for a journal that can be
        rebuilt from its tapes; anything else raises ValueError before the file is touched. An empty
        file is refused (JournalError) when its -wal holds writes, or when `history` says DATA_DIR has
        tapes of earlier sessions (`empty_journal_problem`); a folder at `path` is refused too.
        """
        _check_synchronous(synchronous)
        self.path = Path(path)
        if self.path.is_dir():
            raise JournalError(f"journal {self.path} is a folder, not a journal file: rename or remove it")
        empty = empty_journal_problem(self.path, history=history)
        if empty is not None:
            raise JournalError(f"journal {self.path}: {empty}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._busy_timeout_s = busy_timeout_s
        self.exclusive = False  # opened in exclusive locking mode (see `_connect`)
        try:
            self._db = self._connect(synchronous, check=check)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
        self._identity = _file_identity(self.path)

    def _connect(self, synchronous: str, *, check: bool = False) -> sqlite3.Connection:
        try:
            return self._open(synchronous, check, exclusive=False)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") != "SQLITE_IOERR_SHMSIZE":
                raise
            self._db.close()
        # No room for the WAL's shared-memory file (a full disk): not even a read works. In exclusive
        # locking mode SQLite keeps that index in this process's memory, so the open position is still
        # read and followed (a restart on a full disk had refused to start and left it unsold); other
        # processes (`--status`) cannot read the journal until this one closes it.
        return self._open(synchronous, check, exclusive=True)

    def _open(self, synchronous: str, check: bool, *, exclusive: bool) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=self._busy_timeout_s
        )
        self._db, self.exclusive = db, exclusive
        if exclusive:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # before the first read, or the index is shared
        if check:
            self._quick_check()
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        return db

    def relink_if_gone(self) -> str | None:
        """When the journal's file or its WAL was deleted or replaced under this connection (DATA_DIR
        removed, a stray `rm`), write everything the connection still sees back to the path and reopen
        it there; what happened, in words, or None when all is in place. A file that replaced ours is
        kept beside it (`.replaced`), never overwritten."""
        problem = self._link_problem()
        if problem is None:
            return None
        with self._lock:
            synchronous = self._db.execute("PRAGMA synchronous").fetchone()[0]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            copy = self.path.with_name(self.path.name + ".relink")
            copy.unlink(missing_ok=True)
            try:
                self._db.execute("VACUUM INTO ?", (str(copy),))
            except sqlite3.Error as exc:
                raise JournalError(
                    f"journal {self.path}: {problem}, and it cannot be written back: {exc}"
                ) from exc
            self._db.close()
            _set_aside(self.path, problem)
            os.replace(copy, self.path)
            self._connect("FULL" if synchronous >= 2 else "NORMAL")
            self._identity = _file_identity(self.path)
        return problem

    def copy_to(self, path: Path) -> None:
        """Write everything this connection sees to `path` (a consistent copy); raises JournalError."""
        with self._lock:
            try:
                self._db.execute("VACUUM INTO ?", (str(path),))
            except sqlite3.Error as exc:
                raise JournalError(f"journal copy to {path}: {exc}") from exc

    def _link_problem(self) -> str | None:
        identity = _file_identity(self.path)
        if identity is None:
            return "the journal file was deleted"
        if identity != self._identity:
            return "the journal file was replaced by another file"
        if file_size(self.path) == 0:
            # Truncated in place (same file): the pages the connection still caches are written back.
            return "the journal file was emptied (truncated to 0 bytes)"
        if not self.path.with_name(self.path.name + "-wal").exists():
            # The connection keeps its WAL open while it lives: a missing one was deleted, and the
            # writes since the last checkpoint would vanish with this process.
            return "the journal's -wal file was deleted"
        return None

    def _quick_check(self) -> None:
        verdict = self._db.execute("PRAGMA quick_check").fetchone()
        if verdict is None or verdict[0] != "ok":
            found = str(verdict[0]) if verdict else "no answer"
            # SQLite lists every damaged page: the first finding is enough to act on.
            first = found.splitlines()[0][:200] if found else found
            more = " (and more; PRAGMA integrity_check lists them)" if first != found else ""
            raise JournalError(f"journal {self.path} is damaged: {first}{more}")

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JournalError(f"journal schema {version} is newer than this program ({SCHEMA_VERSION})")
        self._refuse_other_tables()
        if version == SCHEMA_VERSION and self._has_every_table():
            # Nothing to write: a journal that is locked, on a full disk or read-only still opens, and
            # the daemon follows the position in memory while its writes are held (delivery.py).
            return
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _refuse_other_tables(self) -> None:
        """JournalError when a table of ours lacks a column of ours: another program's file (it was
        stamped as ours, then every read was a traceback: `no such column: exit_ms`)."""
        for table, wanted in _schema_columns().items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            missing = sorted(wanted - present) if present else []
            if missing:
                raise JournalError(
                    f"journal {self.path} is not this program's: its table {table!r} lacks "
                    f"{', '.join(missing)}; move the file aside (or point DATA_DIR elsewhere)"
                )

    def _has_every_table(self) -> bool:
        names = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return names >= JOURNAL_TABLES

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def synchronous(self) -> Synchronous:
        """The connection's synchronous mode as SQLite reports it."""
        with self._lock:
            level = self._db.execute("PRAGMA synchronous").fetchone()[0]
        return "FULL" if level >= 2 else "NORMAL"

    def set_synchronous(self, mode: Synchronous) -> None:
        """Change how hard later commits wait for the disk (see the constructor); ValueError if unknown."""
        _check_synchronous(mode)
        with self._lock:
            try:
                self._db.execute(f"PRAGMA synchronous={mode}")
            except sqlite3.Error as exc:
                raise JournalError(f"cannot set synchronous={mode} on {self.path}: {exc}") from exc

    def record(self, actions: Sequence[Action], cursor: str | None = None) -> list[Alert]:
        """Apply one decision's actions atomically; return the alerts that are new to the outbox."""
        durable = [a for a in actions if not isinstance(a, Log)]
        if not durable:
            # Log lines are not journaled and the cursor only moves with a durable action, so an
            # empty transaction would change nothing (a replay makes one every minute of bars).
            return []
        inserted: list[Alert] = []
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for action in durable:
                    if self._apply(action):
                        assert isinstance(action, Alert)
                        inserted.append(action)
                if cursor is not None and durable:
                    self._set_meta("cursor", cursor)
                self._db.execute("COMMIT")
            except WRITE_ERRORS as exc:
                self._rollback()
                raise JournalError(f"journal write failed, decision not recorded: {exc}") from exc
        return inserted

    def _rollback(self) -> None:
        # A failed ROLLBACK (the disk vanished) must not hide the error that caused it.
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _apply(self, action: Action) -> bool:
        if isinstance(action, Alert):
            cur = self._db.execute(
                "INSERT OR IGNORE INTO outbox(dedupe_key, kind, title, message, priority, at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    action.dedupe_key,
                    action.kind,
                    valid_text(action.title),
                    valid_text(action.message),
                    action.priority,
                    action.at_ms,
                ),
            )
            return cur.rowcount == 1
        if isinstance(action, OpenPosition):
            self._db.execute(
                "INSERT INTO positions(trade_id, session_date, ticker, strike, expiry, contracts, entry_price,"
                " entry_mark, entry_ms, delta, iv, peak, mark, bid) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    action.trade_id, action.session_date, action.ticker, action.strike, action.expiry,
                    action.contracts, action.entry_price, action.entry_mark, action.entry_ms, action.delta,
                    action.iv, action.entry_mark, action.entry_mark,
                    action.entry_price if action.bid is None else action.bid,
                ),
            )  # fmt: skip
        elif isinstance(action, UpdatePosition):
            self._db.execute(
                "UPDATE positions SET peak=?, mark=?, below_vwap_since_ms=?, bid=COALESCE(?, bid)"
                " WHERE trade_id=? AND open=1",
                (action.peak, action.mark, action.below_vwap_since_ms, action.bid, action.trade_id),
            )
        elif isinstance(action, ClosePosition):
            self._close(action)
        elif isinstance(action, SetMeta):
            self._set_meta(action.key, action.value)
        return False

    def _close(self, action: ClosePosition) -> None:
        row = self._db.execute(
            "SELECT session_date, ticker, contracts, entry_price, entry_ms FROM positions WHERE trade_id=?",
            (action.trade_id,),
        ).fetchone()
        if row is None:
            raise sqlite3.IntegrityError(f"close of unknown trade {action.trade_id}")
        self._db.execute(
            "UPDATE positions SET open=0, peak=? WHERE trade_id=?", (action.peak, action.trade_id)
        )
        self._db.execute(
            "INSERT INTO trades VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                action.trade_id, row[0], row[1], row[2], row[3], action.exit_price, row[4], action.exit_ms,
                action.reason, action.peak, action.pnl_dollars, action.pnl_percent,
            ),
        )  # fmt: skip

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (valid_text(key), valid_text(value)),
        )

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            try:
                self._set_meta(key, value)
            except WRITE_ERRORS as exc:
                raise JournalError(f"journal write failed, meta {key} not recorded: {exc}") from exc

    def meta(self, key: str) -> str | None:
        with self._lock:
            return self._meta(key)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def restored_state(self, session_date: str) -> RestoredState:
        """The trading state the engine must resume with on `session_date`."""
        with self._lock:
            position = self._open_position()
            trades_today = self._day_trades(session_date)
            opened = self._db.execute(
                "SELECT COUNT(*) FROM positions WHERE session_date=?", (session_date,)
            ).fetchone()[0]
            last_exit = self._db.execute("SELECT MAX(exit_ms) FROM trades").fetchone()[0]
            pnl, wins, losses = self._db.execute(
                "SELECT COALESCE(SUM(pnl_dollars), 0), COALESCE(SUM(pnl_dollars > 0), 0),"
                " COALESCE(SUM(pnl_dollars <= 0), 0) FROM trades"
            ).fetchone()
            critical = self._meta(CRITICAL_LATCH)
            mark_quote = self._meta(MARK_QUOTE_META)
        day = DayRecord()
        for trade in trades_today:
            day = day.after_trade(trade.pnl_dollars)
        return RestoredState(
            position=position,
            day=day,
            opened_today=opened,
            last_exit_ms=last_exit,
            lifetime=Lifetime(round(pnl, 2), wins, losses),
            critical_latched=critical == "1",
            trades_today=trades_today,
            mark_quote_ms=saved_mark_quote_ms(mark_quote, position.trade_id if position else None),
        )

    def owed_summary(self, before: str) -> OwedSummary | None:
        """The last day before `before` that opened a position, when no SUMMARY of it was ever recorded
        (the daemon was down at its close): its closed trades, for the late summary a restart sends."""
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(session_date) FROM positions WHERE session_date < ?", (before,)
            ).fetchone()
            if row[0] is None:
                return None
            day = row[0]
            summarised = self._db.execute("SELECT 1 FROM outbox WHERE dedupe_key=?", (summary_key(day),))
            if summarised.fetchone() is not None:
                return None
            return OwedSummary(day, self._day_trades(day))

    def _day_trades(self, session_date: str) -> tuple[DayTrade, ...]:
        rows = self._db.execute(
            "SELECT trade_id, ticker, entry_ms, exit_ms, entry_price, exit_price, reason, pnl_dollars,"
            " pnl_percent FROM trades WHERE session_date=? ORDER BY exit_ms, trade_id",
            (session_date,),
        ).fetchall()
        return tuple(DayTrade(*row) for row in rows)

    def _open_position(self) -> Position | None:
        row = self._db.execute(
            "SELECT trade_id, session_date, ticker, strike, expiry, contracts, entry_price, entry_mark, entry_ms,"
            " delta, iv, peak, mark, bid, below_vwap_since_ms FROM positions WHERE open=1"
            " ORDER BY entry_ms DESC LIMIT 1"
        ).fetchone()
        return None if row is None else Position(*row)

    def trades(self) -> list[TradeRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM trades ORDER BY exit_ms, trade_id").fetchall()
        return [TradeRow(*row) for row in rows]

    def pending(self, limit: int = 50) -> list[OutboxItem]:
        """Unsent alerts in the order they were decided."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, dedupe_key, kind, title, message, priority, at_ms, attempts, status=? FROM outbox"
                " WHERE status IN (?, ?) ORDER BY id LIMIT ?",
                (SENDING, PENDING, SENDING, limit),
            ).fetchall()
        return [OutboxItem(*row[:8], maybe_sent=bool(row[8])) for row in rows]

    def pending_count(self) -> int:
        with self._lock:
            query = "SELECT COUNT(*) FROM outbox WHERE status IN (?, ?)"
            return self._db.execute(query, (PENDING, SENDING)).fetchone()[0]

    def dedupe_keys(self) -> set[str]:
        """Every dedupe key the outbox has ever held: what must never be sent again."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT dedupe_key FROM outbox")}

    def lost_buys(self) -> dict[str, str]:
        """Trade id -> why, for each BUY given up on whose SELL has not left yet: what that SELL must
        say (a restart between the two would otherwise send it as if the BUY had reached the phone)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT substr(b.dedupe_key, 5), coalesce(b.last_error, 'not delivered') FROM outbox b"
                " WHERE b.kind = 'BUY' AND b.status = ? AND NOT EXISTS (SELECT 1 FROM outbox s"
                " WHERE s.dedupe_key = 'SELL:' || substr(b.dedupe_key, 5) AND s.status IN (?, ?))",
                (FAILED, SENT, FAILED),
            ).fetchall()
        return dict(rows)

    def mark_outcome(self, dedupe_key: str, status: str, error: str | None, sent_ms: int | None) -> None:
        """Record a delivery outcome by dedupe key (the in-memory outbox knows alerts by key).

        IN_FLIGHT is not an attempt's end but its start: a still pending alert becomes SENDING.
        """
        if status == IN_FLIGHT:
            sql, params = _IN_FLIGHT_BY_KEY, (SENDING, dedupe_key, PENDING)
        else:
            sql, params = _OUTCOME_BY_KEY, (status, _valid_or_none(error), sent_ms, dedupe_key)
        with self._lock:
            try:
                self._db.execute(sql, params)
            except WRITE_ERRORS as exc:
                raise JournalError(
                    f"journal write failed, outcome of {dedupe_key} not recorded: {exc}"
                ) from exc

    def mark_sent(self, item_id: int, sent_ms: int) -> None:
        self._update_outbox(item_id, SENT, None, sent_ms)

    def mark_attempt(self, item_id: int, error: str, *, maybe_sent: bool = False) -> None:
        """A failed attempt that will be retried; `maybe_sent` when no answer came (it may have arrived)."""
        self._update_outbox(item_id, SENDING if maybe_sent else PENDING, error, None)

    def mark_in_flight(self, item_id: int) -> None:
        """A request with this alert is leaving: until its answer, the alert may have reached the phone."""
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET status=? WHERE id=? AND status=?", (SENDING, item_id, PENDING)
            )

    def mark_failed(self, item_id: int, error: str) -> None:
        """A permanent failure (4xx): never retried."""
        self._update_outbox(item_id, FAILED, error, None)

    def _update_outbox(self, item_id: int, status: str, error: str | None, sent_ms: int | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET status=?, attempts=attempts+1, last_error=?, sent_ms=? WHERE id=?",
                (status, _valid_or_none(error), sent_ms, item_id),
            )

    def outbox_rows(self) -> list[tuple[str, str, str, str]]:
        """Every outbox row as (dedupe_key, kind, title, message), oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT dedupe_key, kind, title, message FROM outbox ORDER BY id"
            ).fetchall()

    def table_rows(self, table: str) -> list[tuple[object, ...]]:
        """All rows of one table in key order: for comparing two journals."""
        order = {"positions": "trade_id", "trades": "trade_id", "outbox": "id", "meta": "key"}[table]
        with self._lock:
            return self._db.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()


def _valid_or_none(text: str | None) -> str | None:
    return None if text is None else valid_text(text)
