"""The live alert path's memory: a decision reaches the phone even while the journal cannot be written.

`WriteBehindJournal` stands between the engine thread and the SQLite journal. Each decision is still
written in one transaction before its alerts are handed on; when that write fails (disk full, another
process holding a lock, a read-only file) the decision is kept in memory, in order, and written as soon
as the journal accepts writes again. Its alerts go out either way: a lost SELL costs more than a P&L row
written late. Freshness (is this alert new?) is decided in memory from the dedupe keys the journal held
at start plus every key seen since, so a failing journal can neither lose nor repeat an alert.

`MemoryOutbox` is the notifier's queue in the live daemon: alerts in decision order, seeded at start
with what the journal still had pending. Delivery outcomes are remembered here and written behind, so a
failed "mark sent" never makes the notifier send the same alert again.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

import journal_rescue
from engine import MARK_QUOTE_META
from events import Action, Alert, Log, SetMeta, UpdatePosition
from journal_rescue import Held, Outcome, write_decision
from pnl_tracker import FAILED, IN_FLIGHT, PENDING, SENDING, SENT, Journal, JournalError, OutboxItem

RETRY_EVERY_S = 1.0
log = structlog.get_logger("journal")


@dataclass(frozen=True, slots=True)
class JournalHealth:
    """What `/health` says about the journal: failing since when, and how much is waiting to be written."""

    failing: bool
    since_ms: int | None
    backlog: int
    last_error: str | None


class WriteBehindJournal:
    """The journal for the live daemon: `record` never raises and never blocks for long.

    `on_failing(error)` is called once when writes start failing, `on_recovered(written)` once when the
    backlog has been written; both run on the thread that noticed (keep them cheap: enqueue, log).

    With `rescue_paths`, the backlog is also kept in a rescue file (`journal_rescue.save`) while the
    journal fails: at once after a decision with more than mark updates and after a delivery outcome,
    at most every `retry_every_s` for mark updates alone. A SIGKILL, the OOM killer or a power cut
    then loses no BUY, SELL or sent mark (memory alone lost them: the restart forgot a delivered BUY
    and never sold it). The file is removed once the journal has taken the backlog.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        clock_ms: Callable[[], int],
        on_failing: Callable[[str], None] = lambda _error: None,
        on_recovered: Callable[[int], None] = lambda _written: None,
        retry_every_s: float = RETRY_EVERY_S,
        monotonic: Callable[[], float] = time.monotonic,
        rescue_paths: Sequence[Path] = (),
    ) -> None:
        self.journal = journal
        self._known = journal.dedupe_keys()
        self._clock_ms = clock_ms
        self._on_failing = on_failing
        self._on_recovered = on_recovered
        self._retry_every_s = retry_every_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._decisions: list[tuple[list[Action], str | None]] = []
        self._outcomes: list[Outcome] = []
        self._since_ms: int | None = None
        self._last_error: str | None = None
        self._retry_at = 0.0
        self._written_while_failing = 0
        self._rescue_paths = tuple(rescue_paths)
        self._rescue_due = False  # the backlog changed since the last rescue file
        self._rescued_at = -math.inf
        self._rescue_refused_said = False

    def record(self, actions: Sequence[Action], cursor: str | None = None) -> list[Alert]:
        """Write one decision (now, or later if the journal refuses); return its alerts new to the outbox."""
        durable = [a for a in actions if not isinstance(a, Log)]
        if not durable:
            return []
        with self._lock:
            fresh = self._fresh_alerts(durable)
            self._queue_decision(durable, cursor)
            self._write_if_due()
            self._rescue_if_due(changed=True, urgent=not _only_updates(durable))
        return fresh

    def set_meta(self, key: str, value: str) -> None:
        """A meta value, written like a decision (so it waits its turn behind earlier ones)."""
        self.record([SetMeta(key, value)])

    def mark(self, dedupe_key: str, status: str, error: str | None, sent_ms: int | None) -> None:
        """Record a delivery outcome, now or once the journal accepts writes again."""
        with self._lock:
            self._outcomes.append(Outcome(dedupe_key, status, error, sent_ms))
            self._write_if_due()
            self._rescue_if_due(changed=True, urgent=True)

    def catch_up(self, *, now: bool = False) -> None:
        """Retry the backlog if one waits and its retry time has come (every engine turn), or `now`."""
        if self._since_ms is None:
            return
        with self._lock:
            if now:
                self._retry_at = 0.0
            self._write_if_due()
            self._rescue_if_due(changed=False)

    def held(self) -> Held:
        """What the journal has not taken yet (for a rescue file at shutdown), in write order."""
        with self._lock:
            return self._held_now()

    def _held_now(self) -> Held:
        decisions = tuple((tuple(actions), cursor) for actions, cursor in self._decisions)
        return Held(decisions, tuple(self._outcomes))

    def health(self) -> JournalHealth:
        """The journal's state for `/health` and the status view."""
        with self._lock:
            backlog = len(self._decisions) + len(self._outcomes)
            return JournalHealth(self._since_ms is not None, self._since_ms, backlog, self._last_error)

    def _fresh_alerts(self, durable: list[Action]) -> list[Alert]:
        fresh = []
        for action in durable:
            if isinstance(action, Alert) and action.dedupe_key not in self._known:
                self._known.add(action.dedupe_key)
                fresh.append(action)
        return fresh

    def _queue_decision(self, durable: list[Action], cursor: str | None) -> None:
        # While failing, consecutive mark updates of the held position replace each other: only the last
        # peak and mark matter, and a day of failing writes must not grow memory per quote.
        if self._decisions and cursor is None and _only_updates(durable):
            previous, previous_cursor = self._decisions[-1]
            if previous_cursor is None and _only_updates(previous) and _same_trade(previous, durable):
                self._decisions[-1] = (durable, None)
                return
        self._decisions.append((durable, cursor))

    def _write_if_due(self) -> None:
        if self._since_ms is not None and self._monotonic() < self._retry_at:
            return
        try:
            self._write_backlog()
        except JournalError as exc:
            self._note_failure(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - whatever refused the write, the alerts still go out
            self._note_failure(f"{type(exc).__name__}: {exc}")
            return
        if self._since_ms is not None:
            self._note_recovery()

    def _write_backlog(self) -> None:
        while self._decisions:
            actions, cursor = self._decisions[0]
            write_decision(self.journal, actions, cursor)
            self._decisions.pop(0)
            self._written_while_failing += self._since_ms is not None
        while self._outcomes:
            outcome = self._outcomes[0]
            self.journal.mark_outcome(outcome.dedupe_key, outcome.status, outcome.error, outcome.sent_ms)
            self._outcomes.pop(0)

    def _rescue_if_due(self, *, changed: bool, urgent: bool = False) -> None:
        """Keep the rescue file current while the journal fails (see the class docstring)."""
        if self._since_ms is None or not self._rescue_paths:
            return
        self._rescue_due = self._rescue_due or changed
        if not self._rescue_due:
            return
        now = self._monotonic()
        if not urgent and now < self._rescued_at + self._retry_every_s:
            return
        if journal_rescue.save(self._held_now(), self._rescue_paths, quiet=True) is None:
            if not self._rescue_refused_said:
                self._rescue_refused_said = True
                log.critical(
                    "journal_rescue_failing",
                    paths=[str(p) for p in self._rescue_paths],
                    note="held decisions are in memory only: a kill now would lose them",
                )
            return
        self._rescue_due, self._rescued_at = False, now

    def _note_failure(self, error: str) -> None:
        self._retry_at = self._monotonic() + self._retry_every_s
        self._last_error = error
        if self._since_ms is not None:
            return
        self._since_ms = self._clock_ms()
        self._written_while_failing = 0
        log.critical(
            "journal_failing",
            error=error,
            note="alerts still go out; decisions are kept in memory and written when the journal recovers",
        )
        self._on_failing(error)

    def _note_recovery(self) -> None:
        written = self._written_while_failing
        log.warning("journal_recovered", written=written, failing_since_ms=self._since_ms)
        self._since_ms = None
        self._last_error = None
        if self._rescue_paths:
            journal_rescue.discard(self._rescue_paths)
            self._rescue_due, self._rescue_refused_said = False, False
        self._on_recovered(written)


def _only_updates(actions: list[Action]) -> bool:
    # A mark's quote stamp rides with its update: both are replaced by the next ones alike.
    return all(
        isinstance(a, UpdatePosition) or (type(a) is SetMeta and a.key == MARK_QUOTE_META) for a in actions
    )


def _same_trade(first: list[Action], second: list[Action]) -> bool:
    ids = {a.trade_id for a in (*first, *second) if isinstance(a, UpdatePosition)}
    return len(ids) == 1


class TapeFirst:
    """A decision log that calls `before()` ahead of each durable decision, then records it in `log`.

    The daemon hands the tape's buffered lines to the OS there: a kill -9 had cost the tape its last
    seconds, the bars behind a BUY among them, so a replay of the day no longer made the live trades.
    """

    def __init__(self, log: WriteBehindJournal, before: Callable[[], None]) -> None:
        self._log = log
        self._before = before

    def record(self, actions: Sequence[Action], cursor: str | None = None) -> list[Alert]:
        """`before()` when any action is durable (not a log line), then the decision itself."""
        if any(not isinstance(a, Log) for a in actions):
            self._before()
        return self._log.record(actions, cursor)


class MemoryOutbox:
    """The notifier's queue: pending alerts in decision order, in memory; outcomes written behind.

    It offers the notifier the journal's outbox interface (`pending`, `mark_sent`, ...), with ids of its
    own: an alert that never reached the journal still has its place in the queue.
    """

    def __init__(self, outcomes: WriteBehindJournal, seed: Iterable[OutboxItem] = ()) -> None:
        self._outcomes = outcomes
        self._lock = threading.Lock()
        self._items: dict[int, OutboxItem] = {}
        self._next_id = 1
        self.last_sent: OutboxItem | None = None
        self.last_sent_ms: int | None = None
        for item in seed:
            self._append(item)

    def add(self, alerts: Sequence[Alert]) -> None:
        """Queue alerts the engine decided on (already known to be fresh)."""
        with self._lock:
            for alert in alerts:
                self._append(
                    OutboxItem(
                        0,
                        alert.dedupe_key,
                        alert.kind,
                        alert.title,
                        alert.message,
                        alert.priority,
                        alert.at_ms,
                        0,
                    )
                )

    def pending(self, limit: int = 50) -> list[OutboxItem]:
        """Unsent alerts in the order they were decided."""
        with self._lock:
            return list(self._items.values())[:limit]

    def pending_count(self) -> int:
        with self._lock:
            return len(self._items)

    def mark_sent(self, item_id: int, sent_ms: int) -> None:
        item = self._finish(item_id)
        if item is not None:
            self.last_sent, self.last_sent_ms = item, sent_ms
            self._outcomes.mark(item.dedupe_key, SENT, None, sent_ms)

    def mark_attempt(self, item_id: int, error: str, *, maybe_sent: bool = False) -> None:
        """A failed attempt that will be retried: the item keeps its place. `maybe_sent`: no answer
        came, so the alert may have arrived and its next send says it may be a repeat."""
        with self._lock:
            item = self._items.get(item_id)
            if item is None:
                return
            self._items[item_id] = replace(item, attempts=item.attempts + 1, maybe_sent=maybe_sent)
        self._outcomes.mark(item.dedupe_key, SENDING if maybe_sent else PENDING, error, None)

    def mark_in_flight(self, item_id: int) -> None:
        """A request with this alert is leaving; written at once, so a process killed before the answer
        sends it again after the restart marked as a possible repeat, never as a silent duplicate."""
        with self._lock:
            item = self._items.get(item_id)
        if item is not None:
            self._outcomes.mark(item.dedupe_key, IN_FLIGHT, None, None)

    def mark_failed(self, item_id: int, error: str) -> None:
        """A permanent failure: never retried."""
        item = self._finish(item_id)
        if item is not None:
            self._outcomes.mark(item.dedupe_key, FAILED, error, None)

    def _append(self, item: OutboxItem) -> None:
        self._items[self._next_id] = replace(item, id=self._next_id)
        self._next_id += 1

    def _finish(self, item_id: int) -> OutboxItem | None:
        with self._lock:
            return self._items.pop(item_id, None)
