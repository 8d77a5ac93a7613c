"""`python3 main.py --status` and the 5-minute session pulse: what the alerter is doing, in one view.

`build_status` reads the live journal through its own read-only SQLite connection (so it works while
the daemon writes, and on a stopped one) and returns a `Status` value; `render_status` turns it into
text and `status_dict` into JSON-ready values. `session_pulse` is the INFO "sign of life" the daemon
logs every 5 minutes of session, built from the engine alone.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alert_text import money
from config import Rules
from engine import Engine
from market_calendar import MarketCalendar, Session, ny_date, ny_datetime
from pnl_tracker import SCHEMA_VERSION, empty_journal_problem, file_size
from risk_manager import pnl_of

HealthFetch = Callable[[], dict[str, Any] | None]
CONDITION_NAMES = ("above_vwap", "vwap_rising", "volume_surge", "momentum_ok")

# SQLite's primary result codes for a journal that is sound but cannot be read right now (busy,
# locked, not openable, no permission, an I/O error): moving such a file aside would be bad advice.
UNREADABLE_NOW = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM,
     sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_NOMEM}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SessionView:
    """Today's session as the calendar has it."""

    date: str
    trading_day: bool
    is_open: bool
    open_time: str | None
    close_time: str | None
    early_close: bool
    time_stop: str | None
    next_session: str | None
    entry_window: str | None = None  # "HH:MM-HH:MM" ET, where the rules allow entries today
    entries_open: bool = False  # whether now lies in that window


@dataclass(frozen=True, slots=True)
class ExitTrigger:
    """One exit rule of the open position and the mark at which it fires."""

    rule: str
    price: float
    distance_percent: float  # how far the mark must fall to reach it, in % of the mark


@dataclass(frozen=True, slots=True)
class PositionView:
    """The open position with its unrealised P&L at the mark and its nearest price exit."""

    trade_id: str
    session_date: str
    ticker: str
    contracts: int
    entry: float
    mark: float
    peak: float
    entry_time: str
    pnl_dollars: float
    pnl_percent: float
    nearest_exit: ExitTrigger
    other_exits: tuple[ExitTrigger, ...]
    mark_source: str  # "journal" (as of its last update) or "health" (the running daemon's)


@dataclass(frozen=True, slots=True)
class TradeView:
    trade_id: str
    ticker: str
    entry: float
    exit: float
    entry_time: str
    exit_time: str
    reason: str
    pnl_dollars: float
    pnl_percent: float


@dataclass(frozen=True, slots=True)
class AlertsView:
    """The outbox: the last alert sent and what still waits."""

    last_sent_kind: str | None
    last_sent_title: str | None
    last_sent_time: str | None
    pending: int
    failed: int
    oldest_pending_age_s: float | None


@dataclass(frozen=True, slots=True)
class JournalProblem:
    """Why the journal file could not be read, and `advice` on what to do. `kind`: "damaged" (not a
    database: the daemon refuses to start on it), "no_tables" (an empty file or another program's
    database: nothing is recorded in it), "unreadable" (sound, perhaps, but not readable now) or "newer"
    (written by a newer version of this program, which the daemon refuses to start on)."""

    kind: str
    error: str
    advice: str


@dataclass(frozen=True, slots=True)
class Status:
    """Everything `--status` shows; `journal_found` False, or a `journal_problem`, means only session,
    pause and feed are known."""

    now: str
    journal: str
    journal_found: bool
    session: SessionView
    paused: bool
    position: PositionView | None = None
    trades_today: tuple[TradeView, ...] = ()
    day_pnl: float = 0.0
    day_wins: int = 0
    day_losses: int = 0
    lifetime_pnl: float = 0.0
    wins: int = 0
    losses: int = 0
    alerts: AlertsView | None = None
    feed: dict[str, Any] | None = None
    feed_note: str = ""
    journal_problem: JournalProblem | None = None


def clock_of(ms: int) -> str:
    """`HH:MM:SS` New York time."""
    return ny_datetime(ms).strftime("%H:%M:%S")


def session_view(calendar: MarketCalendar, now_ms: int) -> SessionView:
    """Today's session (New York date of `now_ms`), and the next one when today's is over or absent."""
    today = ny_date(now_ms)
    session: Session | None = calendar.session(today)
    upcoming = None
    if session is None or now_ms >= session.close_ms:
        upcoming = calendar.next_session(today).date.isoformat()
    if session is None:
        return SessionView(today.isoformat(), False, False, None, None, False, None, upcoming)
    return SessionView(
        date=today.isoformat(),
        trading_day=True,
        is_open=session.is_open(now_ms),
        open_time=clock_hm(session.open_ms),
        close_time=clock_hm(session.close_ms),
        early_close=session.early_close,
        time_stop=clock_hm(session.time_stop_ms),
        next_session=upcoming,
        entry_window=f"{clock_hm(session.entry_start_ms)}-{clock_hm(session.entry_end_ms)}",
        entries_open=session.entry_allowed(now_ms),
    )


def clock_hm(ms: int) -> str:
    """`HH:MM` New York time."""
    return ny_datetime(ms).strftime("%H:%M")


def exit_triggers(entry: float, mark: float, peak: float, rules: Rules) -> tuple[ExitTrigger, ...]:
    """The price exits, nearest first: the stop loss below the entry and the hard giveback below the peak.

    Both fire when the mark falls to their price, so the nearest is the higher price. (The tighter
    VWAP giveback applies only while the underlying is below VWAP, which the journal does not hold.)
    """
    stop = round(entry * (1 - rules.stop_loss_percent / 100), 4)
    giveback = round(peak * (1 - rules.max_giveback_percent / 100), 4)
    triggers = [
        ExitTrigger("Stop loss", stop, _distance(mark, stop)),
        ExitTrigger("Hard giveback", giveback, _distance(mark, giveback)),
    ]
    # The higher trigger is the nearer; on a tie the stop loss is named (it is checked first).
    triggers.sort(key=lambda t: -t.price)
    return tuple(triggers)


def price_text(value: float) -> str:
    """A price to the cent, with more places only when it has them: `0.52`, `0.945`, `0.6685`."""
    text = f"{value:.4f}"
    while text.endswith("0") and len(text.partition(".")[2]) > 2:
        text = text[:-1]
    return text


def _distance(mark: float, price: float) -> float:
    return round((mark - price) / mark * 100, 2) if mark > 0 else 0.0


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection: never writes, never creates the file, waits briefly behind a writer."""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=2.0)


def build_status(
    journal_path: Path,
    *,
    rules: Rules,
    calendar: MarketCalendar,
    now_ms: int,
    pause_file: Path,
    health: HealthFetch = lambda: None,
    feed_note: str = "",
) -> Status:
    """Read the journal at `journal_path` (read-only) and assemble the status at `now_ms`.

    `health` returns the running daemon's /health snapshot, or None when it cannot be had; then
    `feed_note` says why. A journal file that cannot be read (corrupt, empty, not a journal, busy)
    gives a status with `journal_problem` set and nothing from the journal, never an exception.
    """
    feed = health()
    base = Status(
        now=ny_datetime(now_ms).strftime("%Y-%m-%d %H:%M:%S %Z"),
        journal=str(journal_path),
        journal_found=Path(journal_path).is_file(),
        session=session_view(calendar, now_ms),
        paused=Path(pause_file).exists(),
        feed=feed,
        feed_note="" if feed is not None else feed_note,
    )
    if Path(journal_path).is_dir():
        return dataclasses.replace(
            base, journal_found=True, journal_problem=_folder_problem(Path(journal_path))
        )
    if not base.journal_found:
        return base
    today = ny_date(now_ms).isoformat()
    if file_size(Path(journal_path)) == 0:
        # Not opened at all: SQLite deletes the -wal of an empty file on open, even read-only, and a
        # running daemon's latest writes live there.
        empty = sqlite3.DatabaseError("the file is empty (0 bytes)")
        return dataclasses.replace(base, journal_problem=journal_problem(Path(journal_path), empty))
    try:
        db = connect_read_only(journal_path)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                # Read as if sound, its figures had said nothing of the daemon refusing to start on it.
                raise NewerJournal(f"journal schema {version} is newer than this program ({SCHEMA_VERSION})")
            return dataclasses.replace(base, **_journal_fields(db, today, now_ms, rules, feed))
        finally:
            db.close()
    except sqlite3.Error as exc:
        return dataclasses.replace(base, journal_problem=journal_problem(Path(journal_path), exc))


class NewerJournal(sqlite3.DatabaseError):
    """A journal of a schema newer than this program's: sound, but the daemon refuses to start on it."""


def journal_problem(path: Path, exc: sqlite3.Error) -> JournalProblem:
    """What is wrong with the journal at `path` that `exc` was raised reading, and what to do about it."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in UNREADABLE_NOW:
        return JournalProblem(
            "unreadable",
            str(exc),
            f"The journal {path} cannot be read now ({exc}). Check that this user may read it and its "
            "folder, and try again in a moment; do not move it aside: it may be sound.",
        )
    tapes = f"The recorded tapes under {path.parent / 'tapes'} still hold the days for `python3 main.py --replay`."
    empty = file_size(path) == 0
    if empty or "no such table" in str(exc):
        # The daemon would start on it and create its tables: no refusal to predict, only an absence.
        error = (empty_journal_problem(path) or "the file is empty (0 bytes)") if empty else str(exc)
        return JournalProblem(
            "no_tables",
            error,
            f"The journal {path} holds no journal ({error}): no position, trade or P&L is recorded in it. "
            "The daemon creates its tables in it when it starts, unless its -wal or DATA_DIR's tapes show "
            "it held a history (then it refuses); if the file belongs to something else, move it aside "
            f"first (for example `mv {path} {path}.bad`). {tapes}",
        )
    if isinstance(exc, NewerJournal):
        return JournalProblem(
            "newer",
            str(exc),
            f"The journal {path} was written by a newer version of this program ({exc}); the daemon will "
            "not start on it. Run the version that wrote it; do not move it aside: it holds the open "
            "position, the trades and the lifetime P&L.",
        )
    return JournalProblem(
        "damaged",
        str(exc),
        f"The journal {path} cannot be used ({exc}). It holds the open position, the trades and the "
        "lifetime P&L, and the daemon will not start on it. Move it aside (for example "
        f"`mv {path} {path}.bad`) and start the daemon again: a new journal is created. {tapes}",
    )


def _folder_problem(path: Path) -> JournalProblem:
    """A folder where the journal file goes: the daemon refuses to start on it (it had said "none")."""
    error = "a folder, not a journal file"
    return JournalProblem(
        "damaged",
        error,
        f"The journal {path} is {error}: the daemon will not start while it is there. Rename or remove that "
        "folder (look inside first: something put it there).",
    )


def _journal_fields(
    db: sqlite3.Connection, today: str, now_ms: int, rules: Rules, feed: dict[str, Any] | None
) -> dict[str, Any]:
    trades = [_trade_view(row) for row in db.execute(
        "SELECT trade_id, ticker, entry_price, exit_price, entry_ms, exit_ms, reason, pnl_dollars, pnl_percent"
        " FROM trades WHERE session_date=? ORDER BY exit_ms, trade_id", (today,))]  # fmt: skip
    lifetime_pnl, wins, losses = db.execute(
        "SELECT COALESCE(SUM(pnl_dollars), 0), COALESCE(SUM(pnl_dollars > 0), 0),"
        " COALESCE(SUM(pnl_dollars <= 0), 0) FROM trades"
    ).fetchone()
    return {
        "position": _position_view(db, rules, feed),
        "trades_today": tuple(trades),
        "day_pnl": round(sum(t.pnl_dollars for t in trades), 2),
        "day_wins": sum(t.pnl_dollars > 0 for t in trades),
        "day_losses": sum(t.pnl_dollars <= 0 for t in trades),
        "lifetime_pnl": round(lifetime_pnl, 2),
        "wins": wins,
        "losses": losses,
        "alerts": _alerts_view(db, now_ms),
    }


def _trade_view(row: tuple[Any, ...]) -> TradeView:
    trade_id, ticker, entry, exit_price, entry_ms, exit_ms, reason, dollars, percent = row
    return TradeView(
        trade_id, ticker, entry, exit_price, clock_of(entry_ms), clock_of(exit_ms), reason, dollars, percent
    )


def _position_view(db: sqlite3.Connection, rules: Rules, feed: dict[str, Any] | None) -> PositionView | None:
    # The same row the engine restores after a restart: the newest open position.
    row = db.execute(
        "SELECT trade_id, session_date, ticker, contracts, entry_price, entry_ms, peak, mark FROM positions"
        " WHERE open=1 ORDER BY entry_ms DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    trade_id, session_date, ticker, contracts, entry, entry_ms, peak, mark = row
    source = "journal"
    live = (feed or {}).get("position")
    if isinstance(live, dict) and live.get("trade_id") == trade_id:
        # The daemon writes the mark only when the peak or the VWAP state moves; /health has every quote.
        mark, peak, source = float(live["mark"]), max(peak, float(live["peak"])), "health"
    dollars, percent = pnl_of(entry, mark, contracts)
    nearest, *others = exit_triggers(entry, mark, peak, rules)
    return PositionView(
        trade_id=trade_id,
        session_date=session_date,
        ticker=ticker,
        contracts=contracts,
        entry=entry,
        mark=mark,
        peak=peak,
        entry_time=clock_of(entry_ms),
        pnl_dollars=dollars,
        pnl_percent=percent,
        nearest_exit=nearest,
        other_exits=tuple(others),
        mark_source=source,
    )


def _alerts_view(db: sqlite3.Connection, now_ms: int) -> AlertsView:
    last = db.execute(
        "SELECT kind, title, sent_ms FROM outbox WHERE status='sent' AND sent_ms IS NOT NULL"
        " ORDER BY sent_ms DESC, id DESC LIMIT 1"
    ).fetchone()
    # 'sending': a request left without an answer; still to be delivered (as a possible repeat).
    pending, oldest = db.execute(
        "SELECT COUNT(*), MIN(at_ms) FROM outbox WHERE status IN ('pending', 'sending')"
    ).fetchone()
    failed = db.execute("SELECT COUNT(*) FROM outbox WHERE status='failed'").fetchone()[0]
    return AlertsView(
        last_sent_kind=None if last is None else last[0],
        last_sent_title=None if last is None else last[1],
        last_sent_time=None if last is None else ny_datetime(last[2]).strftime("%Y-%m-%d %H:%M:%S ET"),
        pending=pending,
        failed=failed,
        oldest_pending_age_s=None if oldest is None else round(max(0, now_ms - oldest) / 1000, 1),
    )


def status_dict(status: Status) -> dict[str, Any]:
    """The status as JSON-ready values (what `--status --json` prints)."""
    return dataclasses.asdict(status)


def render_status(status: Status) -> str:
    """The status as a readable block for a terminal."""
    lines = [f"IWM alerter status at {status.now}", _session_line(status.session)]
    lines.append(_entries_line(status))
    if not status.journal_found:
        lines.append(f"Journal:   none at {status.journal} (the daemon has not run with this DATA_DIR)")
        lines.append(_feed_line(status))
        return "\n".join(lines)
    if status.journal_problem is not None:
        problem = status.journal_problem
        lines.append(f"Journal:   CANNOT BE READ ({problem.kind}: {problem.error}) at {status.journal}")
        lines.append(_feed_line(status))
        return "\n".join(lines)
    lines += _position_lines(status.position)
    count = len(status.trades_today)
    lines.append(f"Today:     {count} trade{'' if count == 1 else 's'}, {status.day_wins}W-{status.day_losses}L, "
                 f"P&L {money(status.day_pnl)}")  # fmt: skip
    for t in status.trades_today:
        lines.append(f"  {t.trade_id} {t.ticker} {t.entry_time}-{t.exit_time} {t.entry:.2f} -> {t.exit:.2f} "
                     f"{money(t.pnl_dollars)} ({t.pnl_percent:+.1f}%) {t.reason}")  # fmt: skip
    lines.append(f"Lifetime:  {money(status.lifetime_pnl)}, {status.wins}W-{status.losses}L")
    lines.append(_alerts_line(status.alerts))
    lines.append(_feed_line(status))
    lines.append(f"Journal:   {status.journal} (read-only)")
    return "\n".join(lines)


def _entries_line(status: Status) -> str:
    """Whether a BUY could come now: the kill switch, then today's entry window (a session that is over,
    an early close past its cut-off and a holiday allow none, whatever the switch says)."""
    if status.paused:
        return "Entries:   PAUSED (python3 main.py --resume to allow)"
    window = status.session.entry_window
    if window is None:
        return "Entries:   none today (no session)"
    if not status.session.entries_open:
        return f"Entries:   none now (today's entry window is {window} ET)"
    return f"Entries:   allowed (entry window {window} ET)"


def _session_line(s: SessionView) -> str:
    if not s.trading_day:
        return f"Session:   {s.date} no session (market closed); next {s.next_session}"
    state = "OPEN" if s.is_open else "closed"
    early = f", EARLY CLOSE at {s.close_time}" if s.early_close else ""
    upcoming = f"; next {s.next_session}" if s.next_session else ""
    return (f"Session:   {s.date} {state} ({s.open_time}-{s.close_time} ET{early}; time stop {s.time_stop})"
            f"{upcoming}")  # fmt: skip


def _position_lines(p: PositionView | None) -> list[str]:
    if p is None:
        return ["Position:  none open"]
    near = p.nearest_exit
    lines = [
        f"Position:  {p.ticker} x{p.contracts} ({p.trade_id}, since {p.entry_time})",
        f"  entry {price_text(p.entry)}  mark {price_text(p.mark)} ({p.mark_source})  peak {price_text(p.peak)}  "
        f"unrealised {money(p.pnl_dollars)} ({p.pnl_percent:+.1f}%) at the mark",
        f"  nearest exit: {near.rule} at {price_text(near.price)} ({near.distance_percent:.1f}% below the mark)",
    ]
    lines += [
        f"  then:         {t.rule} at {price_text(t.price)} ({t.distance_percent:.1f}% below)"
        for t in p.other_exits
    ]
    return lines


def _alerts_line(a: AlertsView | None) -> str:
    if a is None:
        return "Alerts:    n/a"
    last = f"{a.last_sent_kind} at {a.last_sent_time}" if a.last_sent_kind else "none sent yet"
    waiting = f"{a.pending} pending"
    if a.pending and a.oldest_pending_age_s is not None:
        waiting += f" (oldest {a.oldest_pending_age_s:.0f}s)"
    failed = f", {a.failed} failed" if a.failed else ""
    return f"Alerts:    last sent {last}; {waiting}{failed}"


def _feed_line(status: Status) -> str:
    feed = status.feed
    if feed is None:
        return f"Feed:      unknown ({status.feed_note or 'no health snapshot'})"
    fields = ("status", "ws_connected", "last_bar_age_s", "chain_age_s", "outbox_pending")
    return "Feed:      " + ", ".join(f"{k} {feed.get(k)}" for k in fields if k in feed)


def health_url(host: str, port: int) -> str:
    """The URL of /health on `host`:`port`: a wildcard bind is asked on loopback, an IPv6 literal is
    bracketed (`http://[::1]:8080/health`; unbracketed, its colons read as a port)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


def read_health(host: str, port: int, *, timeout_s: float = 1.0) -> tuple[dict[str, Any] | None, str]:
    """The running daemon's /health snapshot, or None and why it could not be had (never raises)."""
    import httpx

    url = health_url(host, port)
    try:
        response = httpx.get(url, timeout=timeout_s)
        body = response.json()
    except httpx.ConnectError as exc:
        return None, f"nothing answers on {url} ({exc or 'connection refused'}; daemon stopped?)"
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as exc:
        # A bad HEALTH_HOST, a timeout, or something other than the daemon answering: said, not raised.
        return None, f"{url} gave no health snapshot ({type(exc).__name__}: {exc})"
    if not isinstance(body, dict):
        return None, f"{url} answered {response.status_code} without a health snapshot"
    return body, ""


def fetch_health(host: str, port: int, *, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """The running daemon's /health snapshot, or None when it cannot be had (see `read_health` for why)."""
    return read_health(host, port, timeout_s=timeout_s)[0]


def tape_age_s(tapes_dir: Path, day: str, now: Callable[[], float] = time.time) -> float | None:
    """Seconds since today's tape was last written (a recording daemon writes it every few seconds)."""
    path = Path(tapes_dir) / f"{day}.jsonl.gz"
    try:
        return round(max(0.0, now() - path.stat().st_mtime), 1)
    except OSError:
        return None


def session_pulse(engine: Engine, now_ms: int) -> dict[str, Any]:
    """The INFO sign-of-life fields logged every 5 minutes of session (pure: reads the engine only).

    Bars received today, the last close and rolling VWAP, the chain's age, the position and its
    mark, and what (if anything) blocks an entry right now: a position already open, the first
    window/data/cooldown/protection rule, a blocking filter, or the signal conditions not yet met.
    """
    features, chain, position = engine.last, engine.chain, engine.position
    pulse: dict[str, Any] = {
        "time": clock_of(now_ms),
        "bars_today": engine.counters.bars_today,
        "last_close": None if features is None else round(features.close, 4),
        "vwap": None if features is None else round(features.rolling_vwap, 4),
        "last_bar_age_s": round(engine.bar_age_s(now_ms), 1),
        "chain_age_s": None if chain is None else round(max(0, now_ms - chain.received_ms) / 1000, 1),
        "position": None if position is None else position.ticker,
        "mark": None if position is None else position.mark,
        "trades_today": engine.opened_today,
        "day_pnl": engine.day.pnl,
    }
    pulse["blocked_by"] = _pulse_blocks(engine, features)
    return pulse


def _pulse_blocks(engine: Engine, features: Any) -> list[str]:
    """Every reason no entry can happen now, most decisive first; empty when an entry could fire."""
    if features is None:
        return ["no bar yet today"]
    conditions = engine.conditions(features)
    blocks = [f"position open ({engine.position.ticker})"] if engine.position is not None else []
    if conditions.get("blocked_by"):
        blocks.append(str(conditions["blocked_by"]))
    blocks += [f"{r.name} ({r.value} vs {r.limit})" for r in engine.filter_readings() if r.blocks]
    missing = [name for name in CONDITION_NAMES if not conditions.get(name)]
    if missing:
        blocks.append("waiting for " + ", ".join(missing))
    return blocks
