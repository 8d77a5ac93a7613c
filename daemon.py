"""The live daemon: threads around one engine (DESIGN section 1).

stream thread ─┐                                                    ┌─► notifier thread ─► Pushover
poller thread ─┼─► inbox ─► engine thread (decode, engine, journal) ─┤
clock ─────────┘                                                    └─► tape thread ─► today's tape

Producers only stamp what they receive and enqueue it (waiting while the engine is far behind,
`engine_inbox.py`). The engine thread stamps each item, queues it for the tape (`tape_recorder.py`,
which never holds the engine for more than two seconds) and runs the engine, so the tape's order is
the engine's order. A watchdog exits
the process with status 3 when the engine thread stops turning, so the supervisor restarts it.

Fault tolerance (README "Durability"): every other thread runs under a `Supervisor` that restarts it
after an error and reports it once; an alert the engine decided on goes out even while the journal or
the tape cannot be written (`delivery.py`); one daemon per DATA_DIR (`instance_lock.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, timedelta
from datetime import time as dt_time
from pathlib import Path

import structlog

import journal_rescue
from alert_text import (
    PRIORITY_HIGH,
    PRIORITY_NORMAL,
    delivery_overrides,
    money,
    price,
    priority_for,
)
from alerts import LATE_AFTER_MS, AppriseFallback, Notifier, PushoverClient
from clock import Clock, WallClock
from config import CALENDAR_CACHE_DIR, PAUSE_FILE, Settings, pushover_key_warnings
from delivery import JOURNAL_STUCK_S, MemoryOutbox, TapeFirst, WriteBehindJournal
from engine import Engine, OwedSummary, position_fields
from engine_inbox import EngineInbox
from events import Alert, FeedStatus, Received, SetMeta
from feed import FeedDecoder
from health import (
    HEARTBEAT_FAILING,
    HEARTBEAT_RECOVERED,
    VERSION,
    HealthServer,
    Heartbeat,
    Snapshot,
    health_status,
)
from instance_lock import InstanceLock
from logs import flush_logs, log_output_problem
from mark_watch import FRESH, STALE, MarkWatch
from market_calendar import MarketCalendar, Session, ny_date, ny_datetime, ny_ms
from options_feed import OptionsFeed, OptionsStatus
from pipeline import RESUMED, STARTED, Pipeline
from pnl_tracker import Journal, JournalError
from polygon_client import NETWORK_ERROR_STATUS, PolygonRest, PolygonStream, RestAnswer
from replay import received_from
from said_memory import SAID_META, SaidMemory
from start_watch import StartWatch
from status import session_pulse
from stream_watch import RECOVERED, SILENT, StreamWatch
from summary_chart import summary_attachment
from supervisor import Supervisor, WorkerHealth, error_text
from tape import TapeReader, tape_path
from tape_recorder import RETRY_SECONDS as TAPE_RETRY_S
from tape_recorder import TapeRecorder

EXIT_WATCHDOG = 3
CONNECT_BEFORE_OPEN_MS = 5 * 60_000
PROFILE_META = "volume_profile"
REFUSED_RETRY_SECONDS = 60.0
KEY_CHECK_LIMIT = 1  # results asked by the start-up key check: the answer's status is all it reads
REFUSALS = {401: "unauthorized", 403: "not_entitled"}
REFUSED_WHAT = {"unauthorized": "API key (HTTP 401)", "not_entitled": "plan (HTTP 403: options not included)"}
# LOOP_STARTS starts within LOOP_WINDOW_MS are a crash loop: one RESTARTING alert an hour instead of a START
# each (see `start_announcement`).
LOOP_STARTS = 5
LOOP_WINDOW_MS = 30 * 60_000
HOUR_MS = 3_600_000
RECENT_STARTS_META = "recent_starts"
# A stop waits this long for the tape thread to write what is left (its disk may not answer).
TAPE_CLOSE_S = 5.0
PULSE_SECONDS = 300
# No valid quote of the held contract for this long: the price exits are blind (mark_watch.py).
MARK_STALE_MS = 30_000
# /health says "no option chain" after a minute; the phone is told after this long (a hiccup is not news).
CHAIN_MISSING_ALERT_MS = 180_000
MARK_SAID = "mark_watch"  # SaidMemory: "<trade id> stale|fresh", the held position's first stale mark told
BACKFILL_REACH_BACK_MS = 5_000
# Tape lines carry this daemon's own clock, so one later than now (past a minute's slack) means the clock
# went back: a rehearsal run again from an earlier SIM_CLOCK_START, a system clock set back.
TAPE_AHEAD_MS = 60_000
# Wall seconds between two log lines about dropped inputs (malformed frames, bars out of band or ahead).
BAD_INPUTS_LOG_S = 60.0
HEARTBEAT_STATUSES = frozenset({"ok", "closed", "degraded"})
# The live journal must never hold the engine thread for seconds behind another process's lock.
JOURNAL_BUSY_TIMEOUT_S = 0.1
CHAIN_POLL_STALE_MIN_S = 60.0
CHAIN_POLL_STALE_FACTOR = 6
THREAD_STALE_S = 180.0
# The engine thread turns every 50 ms; this long without a turn makes /health `failing` at once.
ENGINE_STUCK_S = 15.0
# A one-second wait of the watchdog that took this long: the whole process was held, not the engine.
WATCHDOG_OVERSLEPT_S = 5.0
# The engine thread waits at most ENGINE_WAIT_S for the next item; this long between two of its turns means
# the whole process was held, not that the inbox was empty.
ENGINE_WAIT_S = 0.05
HELD_PROCESS_S = 5.0
HEALTH_RETRY_S = 30.0
FILES_CHECK_SECONDS = 5.0  # how often the journal and lock files are checked to still be in place
STOP_JOURNAL_RETRY_S = 2.0  # at a stop, how long held journal writes are retried before a rescue file
JOURNAL_CLOSE_S = 1.5  # at a stop, how long the journal thread may take to end its last write
DELAYED_FRESH_MS = 5_000  # a bar received this recently tells how late the feed runs
DELAYED_FOR_MS = 60_000  # a feed is delayed when its fresh bars stay late this long (a hiccup is not a plan)
# A live bar received this long before its second ended says this machine's clock is behind the feed's.
CLOCK_BEHIND_MS = 5_000
CLOCK_BEHIND_FOR_MS = 30_000  # ... for this long, while bars keep coming
log = structlog.get_logger("daemon")


@dataclass(frozen=True, slots=True)
class SystemNotice:
    """A SYSTEM alert raised off the engine thread (a crashed thread, the journal, the tape).

    It travels through the queue so that the engine thread commits it like any other alert.
    """

    kind: str
    text: str
    priority: int = PRIORITY_HIGH


@dataclass(frozen=True, slots=True)
class Interest:
    """What the poller needs from the engine thread: the held contract and the last price."""

    ticker: str | None
    spot: float | None
    trade_id: str | None = None


def start_announcement(previous: list[int], now: int) -> tuple[str, list[int]]:
    """What a start at `now` says, given the earlier starts: "start" (a START alert) or "loop" (the
    LOOP_STARTS-th start within LOOP_WINDOW_MS: a crash loop, said once an hour instead); and the starts
    to keep, the last hour's with this one."""
    kept = [t for t in previous if 0 <= now - t < HOUR_MS] + [now]
    if sum(now - t < LOOP_WINDOW_MS for t in kept) >= LOOP_STARTS:
        return "loop", kept
    return "start", kept


def exit_after_logs(status: int) -> None:
    """End the process now with `status`, once the queued log lines are written (a second at most)."""
    flush_logs(1.0)
    os._exit(status)


class Daemon:
    """Owns the threads; `run()` blocks until `stop` is set, then shuts down in order."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        *,
        stop: threading.Event | None = None,
        exit_process: Callable[[int], None] = exit_after_logs,
        monotonic: Callable[[], float] = time.monotonic,
        tape_retry_s: float = TAPE_RETRY_S,
        start_watch: StartWatch | None = None,
    ) -> None:
        """`monotonic` times the engine's turns for the watchdog and /health (tests make time jump);
        `tape_retry_s` is how long recording rests after the tape failed; `start_watch` is told each step
        of the start, until the engine's watchdog runs."""
        self.start_watch = start_watch or StartWatch(math.inf, lambda _step, _limit: None)
        self.start_watch.step("loading the market calendar")
        self.settings = settings
        self._exit_process = exit_process
        self._monotonic = monotonic
        self.rules = settings.rules
        self.clock = clock
        self.stop = stop or threading.Event()
        self.calendar = MarketCalendar(
            self.rules, settings.market_closed_dates, settings.data_dir / CALENDAR_CACHE_DIR
        )
        lost_buys = self._open_journal()
        self.engine = Engine(self.rules, self.calendar, alert_overrides=delivery_overrides(settings))
        self.inbox = EngineInbox(self.stop, on_held=self._engine_behind)
        self.redact = settings.redactor()
        self.notifier = Notifier(
            self.outbox,
            self._pushover_client(),
            clock_ms=clock.now_ms,
            fallback=self._fallback(),
            redact=self.redact,
            # Wall time, as the user feels it: a rehearsal at 40x is late after 30 s of wall time too.
            late_after_ms=round(LATE_AFTER_MS / clock.sleep_scale()),
            lost_buys=lost_buys,
        )
        self.recorder = TapeRecorder(settings, clock, self._tape_notice, retry_s=tape_retry_s)
        self.pipeline = Pipeline(
            self.engine,
            TapeFirst(self.writer, self.recorder.hand_over),
            FeedDecoder.for_rules(self.rules),
            on_alerts=self._on_alerts,
        )
        self.supervisor = Supervisor(self.stop, on_crash=self._thread_crashed)
        self._init_watch_state()
        self.rest = PolygonRest(
            settings.polygon_rest_url,
            settings.polygon_api_key,
            clock_ms=clock.now_ms,
            sleep=lambda seconds: self.stop.wait(seconds * clock.sleep_scale()),
        )

    def _open_journal(self) -> dict[str, str]:
        """Take the instance lock, open the journal behind its write-behind writer and outbox, and
        return the BUYs the journal knows were lost; the lock is released if any step fails."""
        self.start_watch.step("taking the instance lock in DATA_DIR")
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.instance_lock = InstanceLock(self.settings.data_dir).acquire()
        try:
            self.start_watch.step("opening the journal")
            self.journal = Journal(
                self.settings.data_dir / "journal.sqlite3",
                busy_timeout_s=JOURNAL_BUSY_TIMEOUT_S,
                check=True,
                history=any((self.settings.data_dir / "tapes").glob("*.jsonl.gz")),
            )
            if self.journal.exclusive:
                log.warning(
                    "journal_opened_exclusive",
                    meaning="no room for the journal's shared-memory file (a full disk?): held by this process",
                    action="free disk space; --status from another process waits until the daemon stops",
                )
            self._write_rescues()
            # While the disk has room: the place a rescue goes when it is full (not the temp folder a
            # restart wipes). Without room now the temp folder remains, and the log says so.
            journal_rescue.ensure_reserve(self.settings.data_dir)
            self.writer = WriteBehindJournal(
                self.journal,
                clock_ms=self.clock.now_ms,
                on_failing=self._journal_failing,
                on_recovered=self._journal_recovered,
                rescue_paths=journal_rescue.rescue_paths(self.settings.data_dir),
                stuck_after_s=JOURNAL_STUCK_S,
            )
            self.outbox = MemoryOutbox(self.writer, self.journal.pending(1_000_000))
            self.said = SaidMemory(self._journal_meta(SAID_META), self.writer.set_meta)
            return self.journal.lost_buys()
        except BaseException:
            self.instance_lock.release()
            raise

    def _init_watch_state(self) -> None:
        """The options feed, the stream and mark watchers, and what the engine thread remembers between
        turns (all empty at start)."""
        self.engine_errors = 0
        self._pulse_slot: int | None = None
        self._last_chain_poll = time.monotonic()
        self._started_ms = self.clock.now_ms()
        self.interest = Interest(None, None)
        self.health: Snapshot = {"status": "closed", "version": VERSION}
        self.last_turn = self._monotonic()
        self._health_at = 0.0
        self._files_checked_at = time.monotonic()
        self._files_problem: str | None = None
        self.stream: PolygonStream | None = None
        # The session thread connects and the main thread disconnects at shutdown: one lock, and no
        # connection once stop is set, so no stream outlives the daemon.
        self._stream_lock = threading.RLock()
        self.options = OptionsFeed(
            self.settings, self.clock, self.inbox.put_data, self._options_notice, self.said
        )
        # Two seconds after the engine's own STALL would go out, so that one silence makes one alert.
        self.stream_watch = StreamWatch(int((self.rules.stall_alert_seconds + 2) * 1000), self.clock.now_ms())
        self.mark_watch = MarkWatch(MARK_STALE_MS)
        self.heartbeat: Heartbeat | None = None
        self.health_server: HealthServer | None = None
        self._health_problem: str | None = None
        self._stream_down_since_ms: int | None = None
        self._clock_behind_since: int | None = None  # since when fresh bars arrive ahead of this clock
        self._feed_late_since: int | None = None  # since when fresh bars arrive STALL_SECONDS late or more
        self._chain_missing_since: int | None = None  # since when /health says no chain comes in session
        self._chain_missing_said = False
        self._rest_refused: str | None = None
        self._bad_inputs_said, self._bad_inputs_said_at = 0, -math.inf  # see _say_bad_inputs
        self._refusal_said: str | None = None  # the refusal last alerted, until a 200 comes back
        self._key_checked = False  # the off-hours start-up key check was made (or is not needed)

    def _fallback(self) -> AppriseFallback | None:
        urls = self.settings.alert_fallback_urls
        return AppriseFallback(urls) if urls else None

    def _on_alerts(self, alerts: list[Alert]) -> None:
        self.outbox.add(alerts)
        self.notifier.wake()

    def _journal_failing(self, error: str) -> None:
        text = (
            f"The journal cannot be written ({error[:120]}). Alerts still go out and the position is "
            "followed in memory, but the P&L record is at risk until it recovers: free disk space or "
            "close whatever holds the database."
        )
        self.inbox.put(SystemNotice("JOURNAL_FAILING", text, PRIORITY_HIGH))

    def _journal_recovered(self, written: int) -> None:
        text = f"The journal is writable again; {written} held decision(s) written."
        self.inbox.put(SystemNotice("JOURNAL_RECOVERED", text, PRIORITY_NORMAL))

    def _engine_behind(self, depth: int) -> None:
        # Said once per daemon: the counts on /health (queue_holds) show whether it goes on.
        log.warning(
            "engine_behind",
            depth=depth,
            action="producers wait for the engine thread; nothing is dropped (see queue_holds on /health)",
        )

    def _thread_crashed(self, name: str, error: str) -> None:
        text = f"The {name} thread failed ({error}). It restarts by itself; check the logs if this repeats."
        self.inbox.put(SystemNotice("SYSTEM", text, PRIORITY_HIGH))

    def _tape_notice(self, kind: str, text: str) -> None:
        """A TAPE FAILING or TAPE RECOVERED from the tape thread: delivered by the engine thread."""
        self.inbox.put(SystemNotice(kind, text, PRIORITY_NORMAL))

    def _pushover_client(self) -> PushoverClient | None:
        s = self.settings
        if not (s.pushover_token and s.pushover_user_key):
            keys = {"PUSHOVER_TOKEN": s.pushover_token, "PUSHOVER_USER_KEY": s.pushover_user_key}
            missing = [name for name, value in keys.items() if not value]
            log.warning("pushover_not_configured", missing=missing, note="alerts go to the log only")
            return None
        for warning in pushover_key_warnings(s):
            log.warning("pushover_key_unusual", warning=warning)
        return PushoverClient.for_settings(s, attachment_for=summary_attachment(s))

    def run(self) -> int:
        """Start every thread, run until stopped; returns the exit status."""
        try:
            self._warm_up_and_restore()
            if self.stop.is_set():
                # Stopped while warming up: no START from a process on its way out (with a hung Pushover,
                # its send in the last flush took the stop past Render's 30 s grace).
                return 0
            # Before the first line is recorded: a tape that blocks must not hold the start (a FIFO did).
            self.supervisor.spawn("tape", lambda: self.recorder.run(lambda: self.supervisor.beat("tape")))
            # Before the first decision: a journal whose disk hangs must not hold the engine (it held it in
            # the kernel, watchdog exit and all, for as long as the disk hung).
            self.supervisor.spawn("journal", lambda: self.writer.run(lambda: self.supervisor.beat("journal")))
            self.start_watch.step("recording and announcing the start")
            self._note_start()
            self._announce_start()
            self._start_threads()
            self.start_watch.done()
            self._engine_loop()
        finally:
            self.start_watch.done()
            self._shutdown()
        return 0

    def _start_threads(self) -> None:
        self.last_turn = self._monotonic()  # warm-up is not a stuck engine
        spawn = self.supervisor.spawn
        beat = self.supervisor.beat
        spawn(
            "notifier",
            lambda: self.notifier.run(self.stop, lambda: beat("notifier")),
            stale_after_s=THREAD_STALE_S,
        )
        spawn("poller", self._poll_loop, stale_after_s=THREAD_STALE_S)
        spawn("marks", self._marks_poll_loop, stale_after_s=THREAD_STALE_S)
        spawn("session", self._session_loop, stale_after_s=THREAD_STALE_S)
        spawn("watchdog", self._watchdog_loop, stale_after_s=THREAD_STALE_S)
        if self.settings.heartbeat_url:
            heartbeat = self.heartbeat = Heartbeat(self.settings.heartbeat_url)
            spawn("heartbeat", lambda: self._heartbeat_loop(heartbeat), stale_after_s=THREAD_STALE_S)
        if self.settings.health_port is not None:
            spawn("health", self._health_loop, stale_after_s=THREAD_STALE_S)

    def _warm_up_and_restore(self) -> None:
        """Rebuild today's features from today's tape (if any), then adopt the journal's trading state."""
        today = ny_date(self.clock.now_ms())
        path = tape_path(self.settings.data_dir, today)
        self.start_watch.step("warming up from today's tape")
        if path.is_file():
            self._warm_up_from(path)
        self.start_watch.step("reading the position and the P&L from the journal")
        state = self.journal.restored_state(today.isoformat())
        state = dataclasses.replace(state, owed_summary=self._owed_summary(today.isoformat()))
        self.engine.restore(state, today.isoformat())
        if self.engine.position is not None:
            log.info("position_resumed", **(position_fields(self.engine.position) or {}))

    def _owed_summary(self, today: str) -> OwedSummary | None:
        """The missed close's summary to send late; a journal that cannot tell only costs that summary."""
        try:
            return self.journal.owed_summary(today)
        except sqlite3.Error as exc:
            log.warning("owed_summary_unknown", error=str(exc))
            return None

    def _warm_up_from(self, path: Path) -> None:
        """Replay today's tape with decisions discarded; a damaged tape only costs warm-up, never the start.

        A line the engine cannot handle is skipped, as the live engine skips an item: the lines after it
        still warm the features."""
        self.pipeline.warming = True
        skipped = 0
        latest_ms = self.clock.now_ms() + TAPE_AHEAD_MS
        try:
            for line in TapeReader(path, lazy_bodies=True):
                if self.stop.is_set():  # a stop asked during a long warm-up: nothing more is started
                    log.info("warm_up_stopped", tape=str(path), at_ms=line.t)
                    break
                if line.t > latest_ms:
                    self._say_tape_ahead(path, line.t)
                    break
                self.start_watch.beat()
                item = received_from(line)
                if item is not None:
                    skipped += not self._warm_up_line(item, path, skipped)
        except Exception as exc:
            log.error("warm_up_failed", tape=str(path), error=error_text(exc), note="features start cold")
        finally:
            self.pipeline.warming = False
        if skipped:
            log.warning("warm_up_lines_skipped", tape=str(path), count=skipped)

    def _say_tape_ahead(self, path: Path, line_ms: int) -> None:
        """Warm-up stops at a line stamped after now: its bars would make every bar of the day's real
        present "late" (a rehearsal run again on the same DATA_DIR sat 40 minutes without a bar)."""
        when = ny_datetime(line_ms).strftime("%Y-%m-%d %H:%M:%S")
        log.error("tape_ahead_of_clock", tape=str(path), line_at=when, note="warm-up stops there")
        text = (
            f"Today's tape holds lines from {when} New York, after this clock's now: the clock went back "
            "(a rehearsal run again on the same DATA_DIR, or a corrected system clock). Warm-up stopped "
            "there; the journal may hold trades from that later time. A rehearsal wants a fresh DATA_DIR."
        )
        self.inbox.put(SystemNotice("SYSTEM", text, PRIORITY_HIGH))

    def _warm_up_line(self, item: Received, path: Path, skipped_before: int) -> bool:
        """Whether the engine took one warm-up line; the first one it refuses is logged with its error."""
        try:
            self.pipeline.handle(item)
        except Exception as exc:  # noqa: BLE001 - one bad line must not cost the rest of the warm-up
            if not skipped_before:
                log.error("warm_up_line_failed", tape=str(path), error=error_text(exc), at_ms=item.t)
            return False
        return True

    def _note_start(self) -> None:
        """Record the (re)start on the tape and tell the engine, so replays see it at the same instant."""
        item = Received(self.clock.now_ms(), "control", dict(STARTED))
        self.recorder.record(item)
        self.pipeline.handle(item)

    def _announce_start(self) -> None:
        now = self.clock.now_ms()
        said, starts = start_announcement(self._recent_starts(), now)
        keep = SetMeta(RECENT_STARTS_META, json.dumps(starts))
        if said == "loop":
            self._announce_restarting(now, starts, keep)
            return
        position = self.engine.position
        held = (
            f"Holding {position.ticker} (peak {price(position.peak)})." if position else "No open position."
        )
        pushover = "on" if self.notifier_enabled else "off (log only)"
        lifetime = self.engine.lifetime
        text = (
            f"Alerter {VERSION} started. {held} Lifetime {money(lifetime.pnl)} {lifetime.record()}. "
            f"Pushover {pushover}."
        )
        if (self.settings.data_dir / PAUSE_FILE).exists():
            # A PAUSE left from an earlier --pause outlives restarts: a quiet day must not look like no signal.
            text += " Entries PAUSED (python3 main.py --resume allows them); exits and SELLs go on."
        title = f"{self.rules.underlying} alerter — START"
        priority = priority_for("START", delivery_overrides(self.settings))
        # One key per start, to the millisecond: a restart within the same minute still announces itself.
        self.pipeline.deliver([keep, Alert("START", f"START:{now}", title, text, priority, now)])

    def _announce_restarting(self, now: int, starts: list[int], keep: SetMeta) -> None:
        """A crash loop: one alert an hour saying so, instead of a START per restart (a loop every few
        seconds sent hundreds an hour and could use up the month's Pushover quota, BUY and SELL held after)."""
        recent = sum(now - t < LOOP_WINDOW_MS for t in starts)
        text = (
            f"The daemon has started {recent} times in {LOOP_WINDOW_MS // 60_000} minutes ({len(starts)} in the "
            "last hour): it keeps exiting. START alerts are held back meanwhile; check the logs (Render: the "
            "worker's events and logs)."
        )
        title = f"{self.rules.underlying} alerter — RESTARTING"
        key = f"RESTARTING:{now // HOUR_MS}"  # one an hour, whatever the loop's pace
        log.error("restarting_in_a_loop", starts_in_window=recent, starts_last_hour=len(starts))
        self.pipeline.deliver([keep, Alert("SYSTEM", key, title, text, PRIORITY_HIGH, now)])

    def _recent_starts(self) -> list[int]:
        """The start times the journal keeps (the last hour's); none when it cannot tell."""
        try:
            raw = self.journal.meta(RECENT_STARTS_META)
            starts = json.loads(raw) if raw else []
        except (sqlite3.Error, ValueError, RecursionError) as exc:
            log.warning("recent_starts_unknown", error=error_text(exc))
            return []
        return [t for t in starts if type(t) is int] if isinstance(starts, list) else []

    @property
    def notifier_enabled(self) -> bool:
        return bool(self.settings.pushover_token and self.settings.pushover_user_key)

    def _engine_loop(self) -> None:
        """Take items in queue order, each stamped with the engine's clock as it is taken.

        One thread reads the clock for both the ticks and the items, so the tape (which records those
        stamps) replays to the very same sequence of ticks and events: a replay of a live day makes the
        live day's decisions to the millisecond, whatever the threads' timing was.
        """
        pause_file = self.settings.data_dir / PAUSE_FILE
        while not self.stop.is_set():
            # From the last turn's start: a hold that fell inside a turn counts too. A turn takes well under
            # a second (a 16 MB frame about two), far below HELD_PROCESS_S.
            previous, self.last_turn = self.last_turn, self._monotonic()
            item = self.inbox.get(timeout=ENGINE_WAIT_S)
            now, held_s = self.clock.now_ms(), self._monotonic() - previous
            try:
                if held_s > HELD_PROCESS_S:
                    self._resumed_after_hold(now, held_s)
                self._turn(item, now, pause_file)
            except Exception as exc:
                self._engine_error(exc)

    def _resumed_after_hold(self, now: int, held_s: float) -> None:
        """The whole process was held (SIGSTOP, a paused VM): its seconds were downtime, as a restart's.
        Ticked through, they had decided a VWAP exit inside the hold at the bid of before it, and sent a
        STALL and a RECOVERED for a feed that never failed. Recorded, so a replay does the same."""
        log.warning(
            "process_was_held",
            held_s=round(held_s, 1),
            meaning="SIGSTOP or a paused VM: nothing is decided inside the hold, as after a restart",
        )
        item = Received(now, "control", dict(RESUMED))
        self.recorder.resumed_after_hold()
        self.recorder.record(item)
        self.pipeline.handle(item)
        self.stream_watch.started_ms = now  # the stream's silence counts from here, as from a dial
        self.mark_watch.resumed_after_hold(now)

    def _turn(self, item: object, now: int, pause_file: Path) -> None:
        if isinstance(item, Received):
            stamped = replace(item, t=now)
            self.recorder.record(stamped)
            bars_before = self.engine.counters.bars
            self.pipeline.handle(stamped)
            if stamped.kind == "ws" and self.engine.counters.bars > bars_before:
                self._say_stream(self.stream_watch.on_stream_bar(now), now)
        elif isinstance(item, FeedStatus):
            self.pipeline.run(replace(item, received_ms=now))
        elif isinstance(item, SystemNotice):
            self._deliver_notice(item, now)
        elif isinstance(item, OptionsStatus):
            self.options.on_status(item.status)
        self.pipeline.advance_to(now)
        said = self.engine.stall_alerted
        self._say_stream(
            self.stream_watch.check(now, self._open_session_ms(now), engine_stall_said=said), now
        )
        self._after_turn(pause_file)

    def _open_session_ms(self, now: int) -> int | None:
        """The open of the session under way at `now`, or None outside one."""
        session = self.calendar.session_at(now)
        return session.open_ms if session is not None and session.is_open(now) else None

    def _say_stream(self, change: str | None, now: int) -> None:
        """A FEED_ERROR when the stream brings no bar though REST backfills do; a notice when it is back."""
        if change == SILENT:
            silent_s = (self.stream_watch.silent_for_ms(now, self._open_session_ms(now)) or 0) / 1000
            text = (
                f"No {self.rules.underlying} bar from the stream for {silent_s:.0f}s; bars come only from "
                "REST backfills after each redial. Check the Polygon/Massive status page."
            )
            self._deliver_notice(SystemNotice("FEED_ERROR", text, PRIORITY_HIGH), now)
        elif change == RECOVERED:
            text = f"{self.rules.underlying} bars arrive by the stream again."
            self._deliver_notice(SystemNotice("FEED_RECOVERED", text, PRIORITY_NORMAL), now)

    def _say_log_output(self) -> None:
        """Once a day, alert that the log's reader stopped reading (lines are dropped, not waited for)."""
        problem = log_output_problem()
        if problem is not None:
            text = f"The daemon's {problem}. Check what reads its output (a paused terminal, a log driver)."
            notice = SystemNotice("SYSTEM", text, PRIORITY_NORMAL)
            self._say_once_a_day("log_output_blocked", self.clock.now_ms(), problem, "read stderr", notice)

    def _say_bad_inputs(self) -> None:
        """One warning a minute at most while the feed brings inputs the decoder drops: only a counter on
        /health had shown a flood of 1,785 bad frames in 80 s. Counts only; a frame's bytes stay unlogged."""
        counters = self.pipeline.decoder.counters
        bad = counters.bad_inputs()
        now = time.monotonic()
        if bad <= self._bad_inputs_said or now - self._bad_inputs_said_at < BAD_INPUTS_LOG_S:
            return
        log.warning(
            "bad_inputs_dropped",
            new=bad - self._bad_inputs_said,
            total=bad,
            bad_frames=counters.bad_frames,
            bad_events=counters.bad_events,
            ahead_bars=counters.ahead_bars,
            price_jumps=counters.price_jumps,
        )
        self._bad_inputs_said, self._bad_inputs_said_at = bad, now

    def _engine_error(self, exc: Exception) -> None:
        """An item the engine could not handle is skipped: one bad input must not stop the day."""
        self.engine_errors += 1
        trace = "".join(traceback.format_exception(exc)[-12:])
        log.error("engine_item_failed", error=error_text(exc), count=self.engine_errors, traceback=trace)
        if self.engine_errors == 1:
            text = f"An input could not be handled ({error_text(exc)}) and was skipped; trading continues."
            self._deliver_notice(SystemNotice("SYSTEM", text, PRIORITY_NORMAL), self.clock.now_ms())

    def _deliver_notice(self, notice: SystemNotice, now: int) -> None:
        # The same words twice in a minute are one alert (a flapping cause); other words are another
        # alert (two threads failing in one minute, an options fallback beside a stale mark).
        minute = ny_datetime(now).strftime("%Y-%m-%dT%H:%M")
        title = f"{self.rules.underlying} alerter — {notice.kind.replace('_', ' ')}"
        words = hashlib.sha256(notice.text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        key = f"{notice.kind}:{minute}:{words}"
        self.pipeline.deliver([Alert(notice.kind, key, title, notice.text, notice.priority, now)])

    def _after_turn(self, pause_file: Path) -> None:
        paused = pause_file.exists()
        if paused != self.engine.paused:
            item = Received(self.clock.now_ms(), "control", {"paused": paused})
            self.recorder.record(item)
            self.pipeline.handle(item)
        position = self.engine.position
        spot = self.engine.last.close if self.engine.last else None
        self.interest = (
            Interest(position.ticker, spot, position.trade_id) if position else Interest(None, spot)
        )
        self._follow_marks()
        self.writer.catch_up()
        self._maybe_pulse()
        if time.monotonic() - self._health_at >= 1.0:
            self.health, self._health_at = self._snapshot(), time.monotonic()
            self._say_feed_timing(self.clock.now_ms())
            self._say_chain_missing(self.clock.now_ms())
            self._say_bad_inputs()
            self._say_log_output()
        if time.monotonic() - self._files_checked_at >= FILES_CHECK_SECONDS:
            self._check_data_files()

    def _check_data_files(self) -> None:
        """The journal and the lock file still where they belong: a DATA_DIR deleted under the running
        daemon took the P&L record with it at the next stop, and let a second daemon start."""
        self._files_checked_at = time.monotonic()
        try:
            problem = self.journal.relink_if_gone()
            if self.instance_lock.relock_if_gone():
                log.warning("instance_lock_taken_again", path=str(self.instance_lock.path))
        except Exception as exc:
            if self._files_problem is None:
                self._files_problem = error_text(exc)
                log.critical("journal_not_written_back", error=self._files_problem)
                text = f"The journal's file is gone and could not be written back ({self._files_problem})."
                self.inbox.put(SystemNotice("SYSTEM", text, PRIORITY_HIGH))
            return
        self._files_problem = None
        if problem is not None:
            log.critical("journal_written_back", problem=problem, path=str(self.journal.path))
            text = (
                f"{problem[0].upper()}{problem[1:]} while the daemon ran. Everything it held was written back "
                f"to {self.journal.path}: trades, the open position and the lifetime P&L are intact. "
                "Find what removed it."
            )
            self.inbox.put(SystemNotice("SYSTEM", text, PRIORITY_HIGH))

    def _follow_marks(self) -> None:
        """Stream the held contract's quotes; judge whether the stream is delivering them, and whether
        any valid quote still sets the mark."""
        now, marks = self.clock.now_ms(), self.engine.marks
        ticker, trade_id = self.interest.ticker, self.interest.trade_id
        self.options.follow(ticker, now, trade_id)
        self.options.check(now, marks.stream, self.engine.mark_quote_ms)
        if ticker != self.mark_watch.ticker:  # what the phone has about it is read once per position
            told = self.said.for_position(MARK_SAID, trade_id) if trade_id is not None else None
            self.mark_watch.follow(ticker, now, told)
        said = self.mark_watch.check(now, ticker, self.engine.mark_set_ms)
        if said is not None:
            self._say_mark(said, now)

    def _say_mark(self, said: str, now: int) -> None:
        ticker, pushed = self.mark_watch.ticker, self.mark_watch.pushed
        episode = self.mark_watch.episodes
        if said == FRESH:
            log.info("mark_fresh_again", ticker=ticker, episode=episode)
            text = f"Valid quotes of {ticker} set the mark again: the stop and the giveback follow it."
            if pushed:
                self._deliver_notice(SystemNotice("FEED_RESTORED", text, PRIORITY_NORMAL), now)
                self._remember_for_position(MARK_SAID, FRESH)
            return
        marks, position = self.engine.marks, self.engine.position
        age_s = (self.mark_watch.age_ms(now, self.engine.mark_set_ms) or 0) / 1000
        log.warning(
            "mark_stale",
            ticker=ticker,
            age_s=age_s,
            invalid=marks.invalid,
            older=marks.stale,
            episode=episode,
        )
        if not pushed:
            return  # said on the phone at this contract's first episode; /health shows this one
        mark = price(position.mark) if position is not None else "n/a"
        text = (
            f"No valid quote of {ticker} for {age_s:.0f} s ({marks.invalid} invalid and {marks.stale} older "
            f"quotes ignored; REST: {self.rest.last_error or 'no error'}). The stop and the giveback read "
            f"the last mark, {mark}; the VWAP exit and the time stop still fire. Watch the contract yourself."
        )
        self._deliver_notice(SystemNotice("FEED", text, PRIORITY_HIGH), now)
        self._remember_for_position(MARK_SAID, STALE)

    def _remember_for_position(self, name: str, said: str) -> None:
        if self.interest.trade_id is not None:
            self.said.put_for_position(name, self.interest.trade_id, said)

    def _journal_meta(self, key: str) -> str | None:
        """A meta value at start; a journal that cannot tell only costs what the value remembered."""
        try:
            return self.journal.meta(key)
        except sqlite3.Error as exc:
            log.warning("journal_meta_unknown", key=key, error=error_text(exc))
            return None

    def _no_chain_since(self, now: int) -> int:
        """Since when the daemon has had no chain: its start, or the day's midnight (each day starts
        without one; counted from the start, a day-old daemon said its chain was 20 hours old)."""
        return max(self._started_ms, ny_ms(ny_date(now), dt_time(0)))

    def _options_notice(self, kind: str, text: str) -> None:
        self._deliver_notice(SystemNotice(kind, text, PRIORITY_NORMAL), self.clock.now_ms())

    def _maybe_pulse(self) -> None:
        """A sign of life at INFO every PULSE_SECONDS of session: what the daemon sees and what blocks entries."""
        now = self.clock.now_ms()
        slot = now // (PULSE_SECONDS * 1000)
        session = self.engine.session
        if slot == self._pulse_slot or session is None or not session.is_open(now):
            return
        self._pulse_slot = slot
        log.info("session_pulse", **session_pulse(self.engine, now), **self._pulse_health())

    def _pulse_health(self) -> dict[str, object]:
        problems = self.health.get("problems") or []
        return {
            "status": self.health.get("status"),
            "problems": problems,
            "pending": self.outbox.pending_count(),
        }

    def _snapshot(self) -> Snapshot:
        now = self.clock.now_ms()
        engine = self.engine
        session = self.calendar.session_at(now)  # the engine knows the session only from its first event
        market_open = bool(session and session.is_open(now))
        chain = engine.chain
        failing, degraded = self._problems()
        counters = self.pipeline.decoder.counters
        stalled = engine.is_stalled(now)
        # A 503 names its cause like any other: "stalled" with no problem listed told the operator nothing.
        stall = [self._stall_problem(now)] if market_open and stalled else []
        return {
            "status": health_status(
                market_open=market_open, stalled=stalled, failing=failing, degraded=degraded
            ),
            "market_open": market_open,
            "ws_connected": bool(self.stream and self.stream.connected),
            "last_bar_age_s": round(engine.bar_age_s(now), 1),
            # A float always (DESIGN's contract): without a chain yet, how long the daemon has gone without one.
            "chain_age_s": round(
                (now - (self._no_chain_since(now) if chain is None else chain.received_ms)) / 1000, 1
            ),
            "chain_received": chain is not None,
            "position": position_fields(engine.position),
            "outbox_pending": self.outbox.pending_count(),
            "late_bars": engine.counters.late_bars,
            "bad_frames": counters.bad_inputs(),
            "paused": engine.paused,
            "conditions": engine.conditions(engine.last) if engine.last else None,
            "problems": stall + failing + degraded,
            "threads": {w.name: self._worker_fields(w) for w in self.supervisor.health()},
            "journal": self._journal_fields(),
            "alerts": self._delivery_fields(),
            "tape": {"recording": self.recorder.recording, "problem": self.recorder.problem},
            "engine_errors": self.engine_errors,
            "marks": self._marks_fields(),
            "queue_depth": self.inbox.qsize(),
            "queue_depth_max": self.inbox.depth_max,
            "queue_holds": self.inbox.holds,
            "version": VERSION,
        }

    def _stall_problem(self, now: int) -> str:
        """What a stall is, in words, with the bars dropped meanwhile (those came, but too late to count)."""
        late = self.engine.counters.late_bars
        dropped = f"; {late} bar(s) dropped as late or repeated since the start" if late else ""
        return (
            f"no {self.rules.underlying} bar for {self.engine.bar_age_s(now):.0f} s: entries paused, exits still"
            f" checked{dropped}"
        )

    def _problems(self) -> tuple[list[str], list[str]]:
        """What stops the daemon doing its job (failing), and what it works around (degraded)."""
        failing = self.supervisor.problems()
        if self.stream is not None and not self.stream.alive:
            failing.append("the stream thread is not running")
        chain_problem = self._chain_poll_problem()
        if chain_problem:
            failing.append(chain_problem)
        stream_refused = self._stream_refused_problem()
        if stream_refused:
            failing.append(stream_refused)
        if self._files_problem is not None:
            # Everything lives on in the open connection only: a kill or a stop now loses the P&L record.
            failing.append(
                f"the journal's file is gone and could not be written back ({self._files_problem})"
            )
        now = self.clock.now_ms()
        stream_problem = self.stream_watch.problem(now, self._open_session_ms(now))
        if stream_problem:
            failing.append(stream_problem)
        delivery = self.notifier.health()
        degraded = []
        if delivery.problem:
            (failing if delivery.blocked else degraded).append(delivery.problem)
        if delivery.gave_up:
            # A BUY or SELL the phone never showed fails /health for a while: the heartbeat stops, and
            # a dead-man switch tells the user what no push could.
            (failing if delivery.lost_trade else degraded).append(delivery.gave_up)
        journal = self.writer.health()
        if journal.failing:
            degraded.append(
                f"journal failing ({journal.last_error}); {journal.backlog} write(s) held in memory"
            )
        worked_around = (
            self._health_problem,
            self._stream_down_problem(now),
            self._delayed_feed_problem(now),
            self._clock_behind_problem(now),
            None if self.recorder.problem is None else f"tape not recording ({self.recorder.problem})",
            self.mark_watch.problem(now, self.engine.mark_set_ms),
            None if self.heartbeat is None else self.heartbeat.problem(time.monotonic()),
            log_output_problem(),
        )
        degraded += [problem for problem in worked_around if problem]
        return failing, degraded

    def _delayed_feed_problem(self, now: int) -> str | None:
        """Bars that arrive on time but are old (a delayed plan): every entry is blocked as feed_stale."""
        bar = self.engine.last_bar
        fresh = bar is not None and now - bar.received_ms <= DELAYED_FRESH_MS
        late_s = (bar.received_ms - bar.end_ms) / 1000 if bar is not None and fresh else 0.0
        if self._open_session_ms(now) is None or late_s <= self.rules.stall_seconds:
            self._feed_late_since = None
            return None
        # A burst that came in late (a slow network minute, a busy machine) is not a delayed plan: the
        # bars must stay late while they keep coming, or the phone hears "delayed plan?" of a hiccup.
        since = self._feed_late_since = self._feed_late_since or now
        if now - since < DELAYED_FOR_MS:
            return None
        return (
            f"bars arrive {late_s:.0f} s after their second (a delayed plan?): every entry is blocked, "
            f"entries need bars under STALL_SECONDS={self.rules.stall_seconds:g} s old"
        )

    def _say_chain_missing(self, now: int) -> None:
        """Once a day, alert that no option chain has come for CHAIN_MISSING_ALERT_MS in session (every
        poll failing, a page cycle, a proxy's garbage): no entry can fire, and only /health had said so.
        A refused key is said at once elsewhere."""
        problem = self._chain_poll_problem() if self._rest_refused is None else None
        if problem is None:
            since, self._chain_missing_since = self._chain_missing_since, None
            said, self._chain_missing_said = self._chain_missing_said, False
            chain = self.engine.chain
            if said and since is not None and chain is not None and chain.received_ms >= since:
                text = "An option chain came again: entries can fire."  # not merely the session's close
                self._deliver_notice(SystemNotice("FEED_RECOVERED", text, PRIORITY_NORMAL), now)
            return
        since = self._chain_missing_since = self._chain_missing_since or now
        if now - since < CHAIN_MISSING_ALERT_MS or self._chain_missing_said:
            return
        text = f"Option chain missing: {problem}. No entry can fire; a held position is still followed."
        action = "check POLYGON_REST_URL, the plan and the Polygon/Massive status page"
        notice = SystemNotice("FEED_ERROR", text)
        self._chain_missing_said = self._say_once_a_day("chain_missing", now, problem, action, notice)

    def _say_feed_timing(self, now: int) -> None:
        """Once a day each, log and alert what makes the feed's times unusable: a delayed plan (no entry can
        fire; exits are still followed) and a clock behind the feed's (every time rule falls late)."""
        delayed = self._delayed_feed_problem(now)
        if delayed is not None:
            text = f"The stream's {delayed}. This alerter needs a real-time plan; exits are still followed."
            action = "use the real-time stream (POLYGON_WS_URL)"
            self._say_once_a_day("feed_delayed", now, delayed, action, SystemNotice("FEED_ERROR", text))
        behind = self._clock_behind_problem(now)
        if behind is not None:
            text = f"{behind[0].upper()}{behind[1:]}. Set this machine's clock right (NTP)."
            action = "set this machine's clock right (NTP)"
            self._say_once_a_day("clock_behind_feed", now, behind, action, SystemNotice("SYSTEM", text))

    def _say_once_a_day(self, event: str, now: int, problem: str, action: str, notice: SystemNotice) -> bool:
        """Log and alert `notice` unless `event` was said today (restarts included); whether it was said."""
        day = ny_date(now).isoformat()
        if self.said.get(event) == day:
            return False
        log.error(event, problem=problem, action=action)
        self._deliver_notice(notice, now)  # engine thread: queued to the journal before it is remembered
        self.said.put(event, day)
        return True

    def _clock_behind_problem(self, now: int) -> str | None:
        """Live, bars that arrive before their second has ended: this machine's clock is behind the
        feed's, and every time rule (session, entry cut-off, time stop) falls late by as much.

        Not in a rehearsal, whose clock and its server's start apart by design (the stream's lead
        there is the server's business; `feed.AheadGuard` adopts it)."""
        bar = self.engine.last_bar
        fresh = bar is not None and now - bar.received_ms <= DELAYED_FRESH_MS
        behind_ms = bar.end_ms - bar.received_ms if bar is not None and fresh else 0
        if not isinstance(self.clock, WallClock) or behind_ms <= CLOCK_BEHIND_MS:
            self._clock_behind_since = None
            return None
        # One glitched stamp is not a clock: it must hold while bars keep coming (a lone one goes stale).
        since = self._clock_behind_since = self._clock_behind_since or now
        if now - since < CLOCK_BEHIND_FOR_MS:
            return None
        return (
            f"this machine's clock is at least {behind_ms / 1000:.0f} s behind the feed's (bars arrive before "
            "their second ends): session times, the entry cut-off and the time stop fall as late"
        )

    def _stream_refused_problem(self) -> str | None:
        """The stream refusing the key (auth_failed), said at once as REST's refusal is: no redial can
        fix a key, and "stream not connected" came only after STREAM_SILENCE_SECONDS, without a reason."""
        stream = self.stream
        if stream is None or stream.refused is None:
            return None
        return f"Polygon stream refuses the API key ({stream.refused}): no bars, no entries"

    def _stream_down_problem(self, now: int) -> str | None:
        """In session, a stream that has not been connected for STREAM_SILENCE_SECONDS, in words.

        Before the engine's STALL (and the stream watch's FEED ERROR) a refused dial is otherwise only in
        the logs, while /health would say ok.
        """
        stream = self.stream
        if (stream is not None and stream.connected) or self._open_session_ms(now) is None:
            self._stream_down_since_ms = None
            return None
        since = self._stream_down_since_ms = self._stream_down_since_ms or now
        down_s = (now - since) / 1000
        if down_s < self.settings.stream_silence_seconds:
            return None
        error = stream.last_error if stream is not None else None
        return f"stream not connected for {down_s:.0f} s" + (f" ({error})" if error else "")

    def _chain_poll_problem(self) -> str | None:
        """Chain polls must keep coming in session: without them no entry can be priced or exit marked."""
        if self._rest_refused is not None:
            # Said at once: the slow retry while refused would otherwise stretch the limit below to minutes.
            # Outside the session too: the start-up key check finds a wrong key hours before the open.
            return f"Polygon REST refuses the {REFUSED_WHAT[self._rest_refused]}: no option chain, no entries"
        now = self.clock.now_ms()
        session = self.calendar.session_at(now)
        if session is None or not session.open_ms <= now < session.close_ms:
            return None
        limit_s = max(CHAIN_POLL_STALE_MIN_S, CHAIN_POLL_STALE_FACTOR * self._chain_interval_ms() / 1000)
        quiet_s = (time.monotonic() - self._last_chain_poll) / self.clock.sleep_scale()
        if quiet_s > limit_s:
            return f"no chain poll for {quiet_s:.0f} s"
        # Polls that end but bring nothing (every one failing or timing out) are no better.
        chain = self.engine.chain
        since_ms = max(session.open_ms, self._started_ms) if chain is None else chain.received_ms
        age_s = (now - since_ms) / 1000
        if age_s > limit_s:
            why = self.rest.chain_error or "answers hold no usable chain"
            return f"no option chain for {age_s:.0f} s (REST: {why})"
        return None

    @staticmethod
    def _worker_fields(worker: WorkerHealth) -> dict[str, object]:
        return {
            "alive": worker.alive,
            "last_turn_s": worker.beat_age_s,
            "restarts": worker.restarts,
            "last_error": worker.last_error,
        }

    def _marks_fields(self) -> dict[str, object]:
        marks = self.engine.marks
        counts = {"chain": marks.chain, "rest": marks.rest, "stream": marks.stream}
        ignored = {"invalid": marks.invalid, "older": marks.stale}
        return {
            "source": self.engine.mark_source,
            "quotes": counts,
            "ignored": ignored,
            **self.options.health(),
        }

    def _journal_fields(self) -> dict[str, object]:
        journal = self.writer.health()
        return {"failing": journal.failing, "held_writes": journal.backlog, "error": journal.last_error}

    def _delivery_fields(self) -> dict[str, object]:
        delivery = self.notifier.health()
        return {
            "channel": delivery.channel,
            "problem": delivery.problem,
            "blocked": delivery.blocked,
            "not_delivered": delivery.gave_up,
        }

    def _session_loop(self) -> None:
        """Connect the stream a few minutes before each open, disconnect after the close, idle between."""
        while not self.stop.is_set():
            now = self.clock.now_ms()
            session = self._current_or_next_session(now)
            connect_at = session.open_ms - CONNECT_BEFORE_OPEN_MS
            if now < connect_at:
                self._disconnect()
                log.info("idle_until_session", session=session.date.isoformat())
                self._sleep_until(connect_at)
                continue
            if now < session.close_ms:
                self._connect()
                self._sleep_until(session.close_ms + 60_000)
                continue
            self._disconnect()
            self._sleep_until(now + 60_000)

    def _current_or_next_session(self, now: int) -> Session:
        today = ny_date(now)
        session = self.calendar.session(today)
        if session is not None and now < session.close_ms:
            return session
        return self.calendar.next_session(today)

    def _sleep_until(self, target_ms: int) -> None:
        while not self.stop.is_set():
            self.supervisor.beat("session")
            self._keep_stream_alive()
            remaining = target_ms - self.clock.now_ms()
            if remaining <= 0:
                return
            self.stop.wait(min(remaining / 1000 * self.clock.sleep_scale(), 5.0))

    def _keep_stream_alive(self) -> None:
        """A stream whose thread ended (it should not) is replaced, so the session never runs blind."""
        with self._stream_lock:
            stream = self.stream
            if stream is not None and not stream.alive and not self.stop.is_set():
                log.error("stream_thread_gone", action="starting a new stream")
                self.stream = None
                self._start_streams()

    def _connect(self) -> None:
        with self._stream_lock:
            if self.stream is None and not self.stop.is_set():
                self._start_streams()

    def _start_streams(self) -> None:
        # The stream's silence counts from its dial, as the engine's stall clock counts from its first
        # event: counted from the daemon's construction, a slow start raised FEED ERROR before STALL.
        self.stream_watch.started_ms = self.clock.now_ms()  # one int store, read by the engine thread
        symbols = (self.rules.underlying, self.rules.benchmark)
        self.stream = PolygonStream(
            self.settings.polygon_ws_url,
            self.settings.polygon_api_key,
            symbols,
            self.inbox.put_data,
            clock_ms=self.clock.now_ms,
            backfill=self._backfill,
            silence_s=self._silence_limit_s,
            required_sym=self.rules.underlying,
            wait_scale=self.clock.sleep_scale(),
            gap_from_ms=self._missed_since_ms(),
        )
        self.stream.start()
        self.options.start()
        log.info("stream_started")

    def _missed_since_ms(self) -> int | None:
        """Where today's bars stop before a stream starts in session: the last bar the engine has (warm-up
        from the tape, which a kill -9 leaves a few seconds short), else the open; None before the open.
        Without it a start mid-session had VWAP and slopes from its own start only, and missed entries."""
        now = self.clock.now_ms()
        session = self.calendar.session_at(now)
        if session is None or now <= session.open_ms:
            return None
        last = self.engine.last_bar
        if last is not None and session.open_ms <= last.end_ms <= now:
            return last.end_ms
        return session.open_ms

    def _silence_limit_s(self) -> float | None:
        """Wall seconds of silence after which an open socket is replaced; None outside the session."""
        session = self.calendar.session_at(self.clock.now_ms())
        if session is None or not session.is_open(self.clock.now_ms()):
            return None
        return self.settings.stream_silence_seconds * self.clock.sleep_scale()

    def _disconnect(self) -> None:
        with self._stream_lock:
            self.options.stop()
            stream, self.stream = self.stream, None
        if stream is not None:
            stream.stop()
            log.info("stream_stopped")

    def _backfill(self, gap_from_ms: int, gap_to_ms: int) -> None:
        """Fetch the seconds missed while disconnected so the features have no hole.

        Bars arrive ~2 s after their second, so the gap reaches back further than the last frame;
        seconds the engine already has come back as late bars and are dropped.
        """
        start = gap_from_ms - BACKFILL_REACH_BACK_MS
        for sym in (self.rules.underlying, self.rules.benchmark):
            for answer in self.rest.aggs(sym, 1, "second", str(start), str(gap_to_ms)):
                self.inbox.put_data(
                    Received(answer.received_ms, "rest", answer.body, answer.path, answer.status)
                )

    def _poll_loop(self) -> None:
        """The chain every CHAIN_POLL_SECONDS in session (and the volume profile once a day)."""
        next_chain = 0
        profile_day: date | None = None
        self._check_key_off_hours()
        while not self.stop.is_set():
            self.supervisor.beat("poller")
            now = self.clock.now_ms()
            session = self._polling_session(now)
            if session is None:
                self._last_chain_poll = time.monotonic()  # nothing is due outside the session
            else:
                if profile_day != session.date:
                    self._fetch_profile(session.date)
                    profile_day = session.date
                if now >= next_chain:
                    polled_at = self.clock.now_ms()  # the day's profile fetch may have come first
                    self._poll_chain(session.date)
                    # After the poll: its answer may start or end a refusal, which sets the interval
                    # (a recovering 200 had waited the refused state's minute, entries blocked meanwhile).
                    next_chain = polled_at + self._chain_interval_ms()
            self.stop.wait(0.2 * self.clock.sleep_scale())

    def _polling_session(self, now: int) -> Session | None:
        """The session whose REST polls are due at `now` (from CONNECT_BEFORE_OPEN_MS before its open
        to its close), else None."""
        session = self.calendar.session_at(now)
        if session is None or not session.open_ms - CONNECT_BEFORE_OPEN_MS <= now < session.close_ms:
            return None
        return session

    def _check_key_off_hours(self) -> None:
        """Once per daemon, started outside the polling hours: one cheap chain request, so that a wrong
        key deployed in the evening is said now, not at the next 09:25 (no REST or stream call comes
        before then). Only a 401 or 403 judges the key, through the path a refused chain poll takes
        (one FEED ERROR, /health failing); any other answer says nothing about it and is only logged.
        In the polling hours the first chain poll, due at once, judges the key itself."""
        if self._key_checked:
            return
        self._key_checked = True  # before the request: a poller restarted after a crash asks no more
        if self._polling_session(self.clock.now_ms()) is not None:
            return
        answer = self.rest.get(f"/v3/snapshot/options/{self.rules.underlying}?limit={KEY_CHECK_LIMIT}")
        if answer.status in REFUSALS:
            self._put_answers([answer], judge_access=True)
        elif answer.status == 200:
            log.info("polygon_key_accepted", path=answer.path)
        else:
            log.warning("polygon_key_not_checked", status=answer.status, error=self.rest.last_error)

    def _marks_poll_loop(self) -> None:
        """The held contract every POSITION_POLL_SECONDS, on a thread of its own: a chain poll that
        hangs or retries for a minute must not hold back the quotes the exits read."""
        next_contract = 0
        while not self.stop.is_set():
            self.supervisor.beat("marks")
            now = self.clock.now_ms()
            ticker = self.interest.ticker
            if ticker and now >= next_contract:
                next_contract = now + int(self.rules.position_poll_seconds * 1000)
                self._put_answers([self.rest.contract(self.rules.underlying, ticker)])
            self.stop.wait(0.2 * self.clock.sleep_scale())

    def _chain_interval_ms(self) -> int:
        """CHAIN_POLL_SECONDS, or a slow retry while the key or plan is refused (a 401 won't heal in 10 s)."""
        seconds = self.settings.chain_poll_seconds
        if self._rest_refused is not None:
            seconds = max(seconds, REFUSED_RETRY_SECONDS)
        return int(seconds * 1000)

    def _poll_chain(self, session_date: date) -> None:
        answers = self.rest.chain_pages(self.rules.underlying, session_date, spot=self.interest.spot)
        self._last_chain_poll = time.monotonic()
        self._put_answers(answers, judge_access=True)

    def _fetch_profile(self, session_date: date) -> None:
        """Minute volumes of the previous sessions, for the relative-volume filter: fetched once a day.

        The answers are kept in the journal, so a restart on the same day reuses them; either way they
        pass through the queue and onto the tape, so a replay sees the same profile.
        """
        cached = self._cached_profile(session_date)
        if cached is not None:
            self._put_answers(cached)
            return
        start = session_date - timedelta(days=self.rules.volume_profile_days * 2 + 5)
        end = session_date - timedelta(days=1)
        answers = self.rest.aggs(self.rules.underlying, 1, "minute", start.isoformat(), end.isoformat())
        if self.stop.is_set():
            # The fetch outlived a stop, whose shutdown may have closed the journal: a write now only
            # logged a false "journal_failing" (and wrote a rescue file) as the process ended.
            return
        if answers and all(answer.status == 200 for answer in answers):
            stored = [{"path": a.path, "body": a.body} for a in answers]
            # A peer may echo the key (in a `next_url`): the journal keeps no secret either.
            cached = self.redact(json.dumps({"date": session_date.isoformat(), "answers": stored}))
            self.writer.set_meta(PROFILE_META, cached)
        self._put_answers(answers)

    def _cached_profile(self, session_date: date) -> list[RestAnswer] | None:
        """Today's profile answers from the journal; None when absent, stale or unreadable (fetch again)."""
        try:
            raw = self.journal.meta(PROFILE_META)
            cached = json.loads(raw) if raw else None
            if not isinstance(cached, dict) or cached.get("date") != session_date.isoformat():
                return None
            now = self.clock.now_ms()
            answers = [RestAnswer(a["path"], 200, a["body"], now) for a in cached["answers"]]
        except (JournalError, sqlite3.Error, ValueError, RecursionError, KeyError, TypeError) as exc:
            log.warning("volume_profile_cache_unreadable", error=error_text(exc), action="fetching it again")
            return None
        log.info("volume_profile_reused", date=session_date.isoformat())
        return answers

    def _put_answers(self, answers: list[RestAnswer], *, judge_access: bool = False) -> None:
        """Answers to the engine; the chain's (`judge_access`) also say whether REST takes the key and
        plan: a refused volume profile or contract snapshot must not claim that no chain comes."""
        for answer in answers:
            if judge_access:
                self._note_access(answer)
            self.inbox.put_data(Received(answer.received_ms, "rest", answer.body, answer.path, answer.status))

    def _note_access(self, answer: RestAnswer) -> None:
        """Whether REST refuses the key (401) or the plan (403), as its latest answer says: one FEED ERROR
        per refusal until a 200 comes back, however the refusal alternates with other errors.

        Any other HTTP answer ends the refusal's state (its slow polls, its /health text): a 401 followed
        by 5xx had kept saying "refuses the key" for minutes. No answer at all (599) says nothing."""
        if answer.status == NETWORK_ERROR_STATUS:
            return
        refused = REFUSALS.get(answer.status)
        if answer.status == 200:
            self._refusal_said = None
        if refused == self._rest_refused:
            return
        self._rest_refused = refused
        if refused is None:
            log.info(
                "rest_access_restored" if answer.status == 200 else "rest_refusal_ended", status=answer.status
            )
            return
        log.error("rest_refused", status=answer.status, reason=refused, retry_every_s=REFUSED_RETRY_SECONDS)
        if refused != self._refusal_said:
            self._refusal_said = refused
            self.inbox.put_data(
                FeedStatus(answer.received_ms, bool(self.stream and self.stream.connected), refused)
            )

    def _watchdog_loop(self) -> None:
        """Exit the process (status 3) when the engine thread has not turned for WATCHDOG_SECONDS.

        A hung process is invisible to Render, which restarts only processes that exit. A wait of this
        loop that overslept by WATCHDOG_OVERSLEPT_S means the whole process was held (SIGSTOP, a paused
        VM): the engine could not turn either, so it gets a new full window rather than an exit at the
        instant the process runs again (an audit's two-minute SIGSTOP ended a healthy daemon mid-position).
        """
        limit = self.settings.watchdog_seconds
        woke = grace_from = self._monotonic()
        while not self.stop.wait(1.0):
            self.supervisor.beat("watchdog")
            now = self._monotonic()
            if now - woke > WATCHDOG_OVERSLEPT_S:
                log.warning("watchdog_process_was_held", held_s=round(now - woke, 1))
                grace_from = now
            woke = now
            stuck = now - max(self.last_turn, grace_from)
            if stuck > limit:
                log.critical("watchdog_exit", stuck_s=round(stuck, 1), limit_s=limit)
                self._exit_process(EXIT_WATCHDOG)
                return

    def served_health(self) -> Snapshot:
        """The snapshot /health serves and the heartbeat reads: the engine thread's latest, unless that
        thread has not turned for ENGINE_STUCK_S. It makes the snapshot itself, so a stuck engine froze
        it at `ok` (and kept the dead-man switch fed) until the watchdog's exit."""
        snapshot = self.health
        stuck_s = self._monotonic() - self.last_turn
        if stuck_s <= ENGINE_STUCK_S:
            return snapshot
        limit = self.settings.watchdog_seconds
        problem = (
            f"the engine thread has not turned for {stuck_s:.0f} s (the watchdog exits at {limit:.0f} s)"
        )
        return {**snapshot, "status": "failing", "problems": [*snapshot.get("problems", []), problem]}

    def _health_loop(self) -> None:
        """Keep /health served: a port that cannot be bound (taken, an address not on this machine) is
        said once (log and alert) and tried again every HEALTH_RETRY_S; the trading path never waits on it."""
        while not self.stop.is_set():
            self.supervisor.beat("health")
            server = self.health_server
            if server is None or not server.alive:
                self.health_server = self._bind_health_server()
            self.stop.wait(HEALTH_RETRY_S * self.clock.sleep_scale())

    def _bind_health_server(self) -> HealthServer | None:
        host, port = self.settings.health_host, self.settings.health_port
        assert port is not None
        try:
            server = HealthServer(host, port, self.served_health, redact=self.redact).start()
        except OSError as exc:
            if self._health_problem is None:
                self._health_problem = f"cannot serve /health on {host}:{port} ({exc.strerror or exc})"
                log.error("health_unavailable", problem=self._health_problem, retry_every_s=HEALTH_RETRY_S)
                text = f"The daemon {self._health_problem}; it trades and alerts as usual and retries."
                self.inbox.put(SystemNotice("SYSTEM", text, PRIORITY_NORMAL))
            return None
        self._health_problem = None
        log.info("health_listening", host=host, port=server.port)
        return server

    def _heartbeat_loop(self, heartbeat: Heartbeat) -> None:
        """Ping the dead-man switch only while the daemon can do its job, so its silence pages the user."""
        while not self.stop.wait(5.0):
            self.supervisor.beat("heartbeat")
            healthy = self.served_health().get("status") in HEARTBEAT_STATUSES
            self._say_heartbeat(heartbeat.maybe_ping(time.monotonic(), healthy), heartbeat)

    def _say_heartbeat(self, change: str | None, heartbeat: Heartbeat) -> None:
        """Failing pings said once (their error type and status only: the URL is a secret), and their end."""
        if change == HEARTBEAT_FAILING:
            log.error("heartbeat_failing", error=heartbeat.last_error, in_a_row=heartbeat.failing_in_a_row)
            text = (
                f"Heartbeat pings to HEARTBEAT_URL fail ({heartbeat.last_error}): the dead-man switch may page "
                "you although the alerter runs, or miss a real outage. Check the URL; pings go on every minute."
            )
            self.inbox.put(SystemNotice("SYSTEM", text, PRIORITY_NORMAL))
        elif change == HEARTBEAT_RECOVERED:
            log.info("heartbeat_recovered")
            text = "Heartbeat pings to HEARTBEAT_URL go through again."
            self.inbox.put(SystemNotice("SYSTEM", text, PRIORITY_NORMAL))

    def _shutdown(self) -> None:
        """Stop in order; each step is guarded so a failing one (a full disk) never skips the rest."""
        log.info("shutting_down")
        self.stop.set()  # a failed start ends here too: no thread may go on (or reconnect) after this
        steps: list[tuple[str, Callable[[], object]]] = [
            ("stream", self._disconnect),
            ("notifier", lambda: self.notifier.flush(deadline_s=5.0)),
            ("tape", lambda: self.recorder.close(timeout_s=TAPE_CLOSE_S)),
            ("health", lambda: self.health_server.stop() if self.health_server is not None else None),
            ("journal", self._close_journal),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:
                log.error("shutdown_step_failed", step=name, error=error_text(exc))
        self.instance_lock.release()
        log.info("stopped")

    def _write_rescues(self) -> None:
        """Decisions a stop could not write (journal_rescue.py) go into the journal before any state is
        read from it; while it refuses them the daemon does not start (it would resume a closed trade)."""
        for path, held in journal_rescue.load(journal_rescue.rescue_paths(self.settings.data_dir)):
            try:
                journal_rescue.write_to(self.journal, held)
            except JournalError as exc:
                raise JournalError(
                    f"{exc}; {len(held)} write(s) held at the last stop wait in {path} and must be written first"
                ) from exc
            journal_rescue.discard([path])
            log.warning("journal_rescue_written", path=str(path), writes=len(held))

    def _copy_journal_aside(self) -> None:
        """The journal's file is gone and could not be written back: closing the connection would drop
        every trade and the lifetime P&L, so they go to the temporary folder first, said where."""
        copy = journal_rescue.journal_copy_path(self.settings.data_dir)
        try:
            copy.unlink(missing_ok=True)
            self.journal.copy_to(copy)
        except (OSError, JournalError) as exc:
            log.critical("journal_lost_at_stop", problem=self._files_problem, error=error_text(exc))
            return
        log.critical(
            "journal_copied_aside",
            path=str(copy),
            action=f"copy it to {self.journal.path} before the next start, or the P&L record starts from zero",
        )

    def _close_journal(self) -> None:
        """The journal's file written back if it was removed since the last check (closing the connection
        drops what only it still sees), last tries of held writes (a lock is often let go in a moment),
        then a rescue file for the rest."""
        self._check_data_files()
        deadline = time.monotonic() + STOP_JOURNAL_RETRY_S
        self.writer.catch_up(now=True)
        while self.writer.health().backlog and time.monotonic() < deadline:
            time.sleep(0.2)
            self.writer.catch_up(now=True)
        self.writer.close(wait_s=JOURNAL_CLOSE_S)
        held = self.writer.held()
        if held:
            paths = journal_rescue.rescue_paths(self.settings.data_dir)
            # A journal whose disk does not answer: the temporary folder first (the data disk would hang us).
            path = journal_rescue.save(held, paths[::-1] if self.writer.stuck else paths)
            if path is None:
                log.critical(
                    "journal_writes_lost_at_stop", held=len(held), note="no rescue file could be written"
                )
            else:
                log.critical(
                    "journal_writes_rescued", held=len(held), path=str(path), note="written at the next start"
                )
        if self._files_problem is not None:  # after the last writes, which went into the open connection
            self._copy_journal_aside()
        if self.writer.stuck:
            # Its writer thread is inside the connection, in the kernel: closing would wait for the disk.
            log.critical(
                "journal_left_open_at_stop",
                note="its disk does not answer; SQLite recovers at the next start",
            )
            return
        self.journal.close()
