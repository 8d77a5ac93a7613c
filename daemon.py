"""The live daemon: threads around one engine (DESIGN section 1).

stream thread ─┐
poller thread ─┼─► queue ─► engine thread (decode, tape, engine, journal) ─► notifier thread ─► Pushover
clock ─────────┘

Producers only stamp what they receive and enqueue it. The engine thread decodes, records the raw
item to the tape and runs the engine, so the tape's order is the engine's order. A watchdog exits
the process with status 3 when the engine thread stops turning, so the supervisor restarts it.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path

import structlog

from alert_text import PRIORITY_NORMAL, money
from alerts import Notifier, PushoverClient
from clock import Clock
from config import Settings
from engine import Engine, position_fields
from events import Alert, FeedStatus, Received
from feed import FeedDecoder
from health import VERSION, HealthServer, Heartbeat, Snapshot, health_status
from market_calendar import MarketCalendar, Session, ny_date, ny_datetime
from pipeline import Pipeline
from pnl_tracker import Journal
from polygon_client import PolygonRest, PolygonStream, RestAnswer
from replay import received_from
from tape import TapeReader, TapeWriter, prune_tapes, tape_path

EXIT_WATCHDOG = 3
CONNECT_BEFORE_OPEN_MS = 5 * 60_000
PROFILE_META = "volume_profile"
REFUSED_RETRY_SECONDS = 60.0
REFUSALS = {401: "unauthorized", 403: "not_entitled"}
TAPE_FLUSH_SECONDS = 5.0
BACKFILL_REACH_BACK_MS = 5_000
PAUSE_FILE = "PAUSE"
log = structlog.get_logger("daemon")


@dataclass(frozen=True, slots=True)
class Interest:
    """What the poller needs from the engine thread: the held contract and the last price."""

    ticker: str | None
    spot: float | None


class Daemon:
    """Owns the threads; `run()` blocks until `stop` is set, then shuts down in order."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        *,
        stop: threading.Event | None = None,
        exit_process: Callable[[int], None] = os._exit,
    ) -> None:
        self.settings = settings
        self._exit_process = exit_process
        self.rules = settings.rules
        self.clock = clock
        self.stop = stop or threading.Event()
        self.calendar = MarketCalendar(self.rules, settings.market_closed_dates)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(settings.data_dir / "journal.sqlite3")
        self.engine = Engine(self.rules, self.calendar)
        self.queue: queue.Queue[object] = queue.Queue()
        self.notifier = Notifier(self.journal, self._pushover_client(), clock_ms=clock.now_ms)
        self.pipeline = Pipeline(
            self.engine,
            self.journal,
            FeedDecoder.for_rules(self.rules),
            on_alerts=lambda _alerts: self.notifier.wake(),
        )
        self.interest = Interest(None, None)
        self.health: Snapshot = {"status": "closed", "version": VERSION}
        self.last_turn = time.monotonic()
        self._health_at = 0.0
        self._flushed_at = time.monotonic()
        self.tape: TapeWriter | None = None
        self.tape_day: date | None = None
        self.stream: PolygonStream | None = None
        self.health_server: HealthServer | None = None
        self._rest_refused: str | None = None
        self.rest = PolygonRest(
            settings.polygon_rest_url,
            settings.polygon_api_key,
            clock_ms=clock.now_ms,
            sleep=lambda seconds: self.stop.wait(seconds * clock.sleep_scale()),
        )

    def _pushover_client(self) -> PushoverClient | None:
        s = self.settings
        if not (s.pushover_token and s.pushover_user_key):
            log.warning("pushover_not_configured", note="alerts go to the log only")
            return None
        return PushoverClient(s.pushover_token, s.pushover_user_key, s.pushover_api_url)

    def run(self) -> int:
        """Start every thread, run until stopped; returns the exit status."""
        self._warm_up_and_restore()
        self._announce_start()
        threads = [
            threading.Thread(target=self.notifier.run, args=(self.stop,), name="notifier", daemon=True),
            threading.Thread(target=self._poll_loop, name="poller", daemon=True),
            threading.Thread(target=self._session_loop, name="session", daemon=True),
            threading.Thread(target=self._watchdog_loop, name="watchdog", daemon=True),
        ]
        if self.settings.heartbeat_url:
            heartbeat = Heartbeat(self.settings.heartbeat_url)
            threads.append(threading.Thread(target=self._heartbeat_loop, args=(heartbeat,), daemon=True))
        health_server = self.health_server = self._start_health_server()
        for thread in threads:
            thread.start()
        try:
            self._engine_loop()
        finally:
            self._shutdown(health_server)
        return 0

    def _warm_up_and_restore(self) -> None:
        """Rebuild today's features from today's tape (if any), then adopt the journal's trading state."""
        today = ny_date(self.clock.now_ms())
        path = tape_path(self.settings.data_dir, today)
        if path.is_file():
            self.pipeline.warming = True
            for line in TapeReader(path, lazy_bodies=True):
                item = received_from(line)
                if item is not None:
                    self.pipeline.handle(item)
            self.pipeline.warming = False
        self.engine.restore(self.journal.restored_state(today.isoformat()), today.isoformat())
        if self.engine.position is not None:
            log.info("position_resumed", **(position_fields(self.engine.position) or {}))

    def _announce_start(self) -> None:
        now = self.clock.now_ms()
        position = self.engine.position
        held = f"Holding {position.ticker} (peak ${position.peak:.2f})." if position else "No open position."
        pushover = "on" if self.notifier_enabled else "off (log only)"
        lifetime = self.engine.lifetime
        text = (
            f"Alerter {VERSION} started. {held} Lifetime {money(lifetime.pnl)} {lifetime.record()}. "
            f"Pushover {pushover}."
        )
        minute = ny_datetime(now).strftime("%Y-%m-%dT%H:%M")
        title = f"{self.rules.underlying} alerter — START"
        self.journal.record([Alert("START", f"START:{minute}", title, text, PRIORITY_NORMAL, now)])
        self.notifier.wake()

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
            self.last_turn = time.monotonic()
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                item = None
            now = self.clock.now_ms()
            if isinstance(item, Received):
                stamped = replace(item, t=now)
                self._record(stamped)
                self.pipeline.handle(stamped)
            elif isinstance(item, FeedStatus):
                self.pipeline.run(replace(item, received_ms=now))
            self.pipeline.advance_to(now)
            self._after_turn(pause_file)

    def _after_turn(self, pause_file: Path) -> None:
        paused = pause_file.exists()
        if paused != self.engine.paused:
            item = Received(self.clock.now_ms(), "control", {"paused": paused})
            self._record(item)
            self.pipeline.handle(item)
        position = self.engine.position
        spot = self.engine.last.close if self.engine.last else None
        self.interest = Interest(position.ticker if position else None, spot)
        if time.monotonic() - self._health_at >= 1.0:
            self.health, self._health_at = self._snapshot(), time.monotonic()
        if self.tape is not None and time.monotonic() - self._flushed_at >= TAPE_FLUSH_SECONDS:
            self._flush_tape()

    def _flush_tape(self) -> None:
        """A durable point for the recording: a crash loses at most the last few seconds of tape."""
        self._flushed_at = time.monotonic()
        try:
            assert self.tape is not None
            self.tape.flush()
        except OSError as exc:
            log.error("tape_flush_failed", error=str(exc), note="recording paused; trading unaffected")
            self.tape = None

    def _record(self, item: Received) -> None:
        if not self.settings.record:
            return
        day = ny_date(item.t)
        if self.tape is None or self.tape_day != day:
            self._rotate_tape(day, item.t)
        assert self.tape is not None
        try:
            if item.kind == "ws":
                self.tape.write_ws(item.t, item.payload)  # type: ignore[arg-type]
            elif item.kind == "control":
                self.tape.write_control(item.t, item.payload)  # type: ignore[arg-type]
            else:
                self.tape.write_rest(item.t, item.path, item.status, item.payload)
        except OSError as exc:
            log.error("tape_write_failed", error=str(exc), note="recording paused; trading unaffected")
            self.tape = None

    def _rotate_tape(self, day: date, t: int) -> None:
        if self.tape is not None:
            self.tape.close()
        path = tape_path(self.settings.data_dir, day)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tape = TapeWriter(
            path, underlying=self.rules.underlying, benchmark=self.rules.benchmark, start_ms=t
        )
        self.tape_day = day
        removed = prune_tapes(path.parent, self.settings.record_retention_days, day)
        if removed:
            log.info("tapes_pruned", count=len(removed))

    def _snapshot(self) -> Snapshot:
        now = self.clock.now_ms()
        engine = self.engine
        session = engine.session
        market_open = bool(session and session.is_open(now))
        chain = engine.chain
        return {
            "status": health_status(market_open=market_open, stalled=engine.is_stalled(now)),
            "market_open": market_open,
            "ws_connected": bool(self.stream and self.stream.connected),
            "last_bar_age_s": round(engine.bar_age_s(now), 1),
            "chain_age_s": None if chain is None else round((now - chain.received_ms) / 1000, 1),
            "position": position_fields(engine.position),
            "outbox_pending": self.journal.pending_count(),
            "late_bars": engine.counters.late_bars,
            "bad_frames": self.pipeline.decoder.counters.bad_frames
            + self.pipeline.decoder.counters.bad_events,
            "paused": engine.paused,
            "conditions": engine.conditions(engine.last) if engine.last else None,
            "version": VERSION,
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
            remaining = target_ms - self.clock.now_ms()
            if remaining <= 0:
                return
            self.stop.wait(min(remaining / 1000 * self.clock.sleep_scale(), 5.0))

    def _connect(self) -> None:
        if self.stream is not None:
            return
        symbols = (self.rules.underlying, self.rules.benchmark)
        self.stream = PolygonStream(
            self.settings.polygon_ws_url,
            self.settings.polygon_api_key,
            symbols,
            self.queue.put,
            clock_ms=self.clock.now_ms,
            backfill=self._backfill,
        )
        self.stream.start()
        log.info("stream_started")

    def _disconnect(self) -> None:
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
                self.queue.put(Received(answer.received_ms, "rest", answer.body, answer.path, answer.status))

    def _poll_loop(self) -> None:
        """Chain every CHAIN_POLL_SECONDS in session; the held contract every POSITION_POLL_SECONDS."""
        next_chain = next_contract = 0
        profile_day: date | None = None
        while not self.stop.is_set():
            now = self.clock.now_ms()
            session = self.calendar.session_at(now)
            live = session is not None and session.open_ms - CONNECT_BEFORE_OPEN_MS <= now < session.close_ms
            if live and session is not None:
                if profile_day != session.date:
                    self._fetch_profile(session.date)
                    profile_day = session.date
                if now >= next_chain:
                    next_chain = now + self._chain_interval_ms()
                    self._poll_chain(session.date)
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
        self._put_answers(answers)

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
        if answers and all(answer.status == 200 for answer in answers):
            stored = [{"path": a.path, "body": a.body} for a in answers]
            self.journal.set_meta(
                PROFILE_META, json.dumps({"date": session_date.isoformat(), "answers": stored})
            )
        self._put_answers(answers)

    def _cached_profile(self, session_date: date) -> list[RestAnswer] | None:
        raw = self.journal.meta(PROFILE_META)
        if not raw:
            return None
        cached = json.loads(raw)
        if cached.get("date") != session_date.isoformat():
            return None
        now = self.clock.now_ms()
        log.info("volume_profile_reused", date=cached["date"])
        return [RestAnswer(a["path"], 200, a["body"], now) for a in cached["answers"]]

    def _put_answers(self, answers: list[RestAnswer]) -> None:
        for answer in answers:
            self._note_access(answer)
            self.queue.put(Received(answer.received_ms, "rest", answer.body, answer.path, answer.status))

    def _note_access(self, answer: RestAnswer) -> None:
        """One FEED ERROR when REST starts refusing the key (401) or the plan (403), one line when it heals."""
        refused = REFUSALS.get(answer.status)
        if refused == self._rest_refused or (refused is None and answer.status != 200):
            return
        self._rest_refused = refused
        if refused is not None:
            log.error(
                "rest_refused", status=answer.status, reason=refused, retry_every_s=REFUSED_RETRY_SECONDS
            )
            self.queue.put(
                FeedStatus(answer.received_ms, bool(self.stream and self.stream.connected), refused)
            )
        else:
            log.info("rest_access_restored")

    def _watchdog_loop(self) -> None:
        """Exit the process (status 3) when the engine thread has not turned for WATCHDOG_SECONDS.

        A hung process is invisible to Render, which restarts only processes that exit.
        """
        limit = self.settings.watchdog_seconds
        while not self.stop.wait(1.0):
            stuck = time.monotonic() - self.last_turn
            if stuck > limit:
                log.critical("watchdog_exit", stuck_s=round(stuck, 1), limit_s=limit)
                self._exit_process(EXIT_WATCHDOG)
                return

    def _start_health_server(self) -> HealthServer | None:
        port = self.settings.health_port
        if port is None:
            return None
        server = HealthServer(self.settings.health_host, port, lambda: self.health).start()
        log.info("health_listening", host=self.settings.health_host, port=server.port)
        return server

    def _heartbeat_loop(self, heartbeat: Heartbeat) -> None:
        while not self.stop.wait(5.0):
            heartbeat.maybe_ping(time.monotonic(), self.health.get("status") != "stalled")

    def _shutdown(self, health_server: HealthServer | None) -> None:
        log.info("shutting_down")
        self._disconnect()
        self.notifier.flush(deadline_s=5.0)
        if self.tape is not None:
            self.tape.close()
        if health_server is not None:
            health_server.stop()
        self.journal.close()
        log.info("stopped")
