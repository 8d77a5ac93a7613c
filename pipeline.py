"""The engine thread's step: received item → decoder → engine → journal → new alerts.

Live, replay, demo and backtests all push items through a `Pipeline`; only where items come from
and where new alerts go differ. Ticks fill every whole second between items, so time stops and
stall checks fire even when no data arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from engine import Engine
from events import Action, Alert, Event, Log, Received, SetMeta, Tick
from feed import FeedDecoder
from pnl_tracker import Journal, JournalError

AlertSink = Callable[[list[Alert]], None]
LogSink = Callable[[Log], None]


class DecisionLog(Protocol):
    """Where decisions are made durable: the SQLite `Journal`, or the live daemon's write-behind one."""

    def record(self, actions: Sequence[Action], cursor: str | None = None) -> list[Alert]: ...


class TickSchedule:
    """The whole seconds Ticks must fill as items arrive: those after the latest item's second, up to
    and including the new item's; none before the first item."""

    __slots__ = ("_last_second",)

    def __init__(self) -> None:
        self._last_second: int | None = None

    def due(self, now_ms: int) -> range:
        """The seconds to tick before an item stamped `now_ms` (then counted as ticked)."""
        second, last = now_ms // 1000, self._last_second
        if last is None:
            self._last_second = second
            return range(0)
        self._last_second = max(last, second)
        return range(last + 1, second + 1)

    def skip_to(self, now_ms: int) -> None:
        """Count every second up to `now_ms` as ticked, without ticking it."""
        second = now_ms // 1000
        self._last_second = second if self._last_second is None else max(self._last_second, second)


STARTED: dict[str, object] = {"started": True}  # the control line a daemon records when it (re)starts
# The line a daemon records when it runs again after its whole process was held (SIGSTOP, a paused VM):
# a start to the engine and to replays (the held seconds are downtime), told apart only for a reader.
RESUMED: dict[str, object] = {"started": True, "resumed_after_hold": True}


def is_start(payload: object) -> bool:
    """Whether a control line's payload says the daemon (re)started."""
    return isinstance(payload, dict) and payload.get("started") is True


def structlog_sink(log: Log) -> None:
    """Default log sink: one structured line per engine log action (signal lines at debug)."""
    logger = structlog.get_logger("engine")
    level = "debug" if log.event == "signal_conditions" else "info"
    getattr(logger, level)(log.event, **log.fields)


class Pipeline:
    """Feeds one engine; writes each decision to the journal in one transaction before it is sent."""

    def __init__(
        self,
        engine: Engine,
        journal: Journal | DecisionLog | None,
        decoder: FeedDecoder,
        *,
        on_alerts: AlertSink,
        on_log: LogSink = structlog_sink,
    ) -> None:
        self.engine = engine
        self.journal = journal
        self.decoder = decoder
        self.on_alerts = on_alerts
        self.on_log = on_log
        self._ticks = TickSchedule()
        self.journal_failures = 0
        self.warming = False

    def handle(self, item: Received, cursor: str | None = None) -> None:
        """Decode one received item and run its events (ticks for the seconds before it first)."""
        if item.kind == "control":
            self.control_line(item.t, item.payload)
            return
        self.advance_to(item.t)
        for event in self.decoder.decode(item):
            self.run(event, cursor)

    def control_line(self, t: int, payload: object) -> None:
        """A control line at `t`, with the ticks of the seconds before it.

        The seconds before a (re)start are the daemon's own downtime: they are not ticked. Nothing can be
        decided in them (an audit's restart sold by VWAP persistence at a second the daemon was down, at
        the bid it saw before it stopped, while the chain that came with the restart showed a lower one);
        the first event after the start decides what the downtime left due, at its own time and prices.
        Nor are they a silence of the feed (a STALL dated inside the downtime, then a RECOVERED, was all
        a restart sent). The pause switch acts after the ticks, at its instant.
        """
        if is_start(payload):
            self.engine.note_start(t)
            self._ticks.skip_to(t)
        self.advance_to(t)
        self.control(t, payload)

    def control(self, t: int, payload: object) -> None:
        """Operator actions recorded on the tape: today only the pause switch."""
        paused = payload.get("paused") if isinstance(payload, dict) else None
        if isinstance(paused, bool):
            for log in self.engine.set_paused(paused, t):
                if not self.warming and isinstance(log, Log):
                    self.on_log(log)

    def advance_to(self, now_ms: int) -> None:
        """Tick every whole second in (last tick, now_ms]."""
        for second in self._ticks.due(now_ms):
            self.run(Tick(second * 1000))

    def run(self, event: Event, cursor: str | None = None) -> list[Action]:
        """One event through the engine; durable actions to the journal; new alerts to the sink."""
        actions = self.engine.on_event(event)
        if not actions or self.warming:
            return actions
        for action in actions:
            if isinstance(action, Log):
                self.on_log(action)
        self._commit(actions, cursor)
        return actions

    def deliver(self, alerts: Sequence[Alert | SetMeta]) -> None:
        """Alerts decided outside the engine (START, SYSTEM), with any meta beside them: journaled in one
        transaction, then the alerts handed on like the engine's."""
        self._commit(list(alerts), None)

    def _commit(self, actions: list[Action], cursor: str | None) -> None:
        alerts = [a for a in actions if isinstance(a, Alert)]
        if self.journal is None:
            if alerts:
                self.on_alerts(alerts)
            return
        try:
            fresh = self.journal.record(actions, cursor)
        except JournalError as exc:
            # The decision stands in memory; sending it beats losing it, though not crash-proof now.
            self.journal_failures += 1
            structlog.get_logger("journal").error("journal_write_failed", error=str(exc), alerts=len(alerts))
            fresh = alerts
        if fresh:
            self.on_alerts(fresh)
