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

import functools
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
JOURNAL_STUCK_S = 1.0  # a write to the journal this long in the kernel: its disk does not answer
HAND_OVER_MOST_S = 2.0  # how long a caller waits for a busy (not stuck) writer thread
WAIT_STEP_S = 0.01
WAIT_IDLE_S = 1.0
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

    With `stuck_after_s`, the writes are made by a thread of their own (`run`): a caller waits for its
    write while that thread makes progress (HAND_OVER_MOST_S at most) and goes on when the thread has
    been on one write for `stuck_after_s` (the journal is then failing: its disk does not answer). A
    write that blocks in the kernel (a frozen or lost volume) held the engine thread itself: no BUY, no
    SELL, not even the watchdog's exit, for as long as the disk hung. Without it, a caller writes.
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
        stuck_after_s: float | None = None,
    ) -> None:
        self.journal = journal
        self._known = journal.dedupe_keys()
        self._clock_ms = clock_ms
        self._on_failing = on_failing
        self._on_recovered = on_recovered
        self._retry_every_s = retry_every_s
        self._monotonic = monotonic
        self._stuck_after_s = stuck_after_s
        self._lock = threading.Lock()  # the backlog's state; never held across a write to the disk
        self._changed = threading.Condition(self._lock)
        self._io_lock = threading.Lock()  # one writer of the journal and the rescue file at a time
        self._decisions: list[tuple[list[Action], str | None]] = []
        self._outcomes: list[Outcome] = []
        self._since_ms: int | None = None
        self._last_error: str | None = None
        self._retry_at = 0.0
        self._written_while_failing = 0
        self._writing_since: float | None = None  # when the write under way began (head not yet popped)
        self._progress_at = -math.inf  # when the last write ended
        self._closed = False
        self._running, self._ended = threading.Event(), threading.Event()  # the writer thread's life
        self._rescue_paths = tuple(rescue_paths)
        self._rescue_due = False  # the backlog changed since the last rescue file
        self._rescue_urgent = False  # ... by more than mark updates: saved at once
        self._rescued_at = -math.inf
        self._rescue_refused_said = False
        self._discard_due = False  # the journal recovered: the rescue file is to go
        self._aside: threading.Thread | None = None  # keeps the rescue while the writer thread is stuck
        self._aside_again = False  # the backlog changed while `_aside` was saving: it saves once more

    def record(self, actions: Sequence[Action], cursor: str | None = None) -> list[Alert]:
        """Write one decision (now, or later if the journal refuses); return its alerts new to the outbox."""
        durable = [a for a in actions if not isinstance(a, Log)]
        if not durable:
            return []
        with self._lock:
            fresh = self._fresh_alerts(durable)
            self._queue_decision(durable, cursor)
            self._note_change(urgent=not _only_updates(durable))
        self._write_or_wait()
        return fresh

    def set_meta(self, key: str, value: str) -> None:
        """A meta value, written like a decision (so it waits its turn behind earlier ones)."""
        self.record([SetMeta(key, value)])

    def mark(self, dedupe_key: str, status: str, error: str | None, sent_ms: int | None) -> None:
        """Record a delivery outcome, now or once the journal accepts writes again."""
        with self._lock:
            self._outcomes.append(Outcome(dedupe_key, status, error, sent_ms))
            self._note_change(urgent=True)
        self._write_or_wait()

    def catch_up(self, *, now: bool = False) -> None:
        """Retry the backlog if one waits and its retry time has come (every engine turn), or `now`."""
        with self._lock:
            if self._since_ms is None and not self._discard_due:
                return
            if now:
                self._retry_at = 0.0
            self._changed.notify_all()
        if self._stuck_after_s is None:
            self._drain()

    def run(self, beat: Callable[[], None] = lambda: None) -> None:
        """The writer thread (with `stuck_after_s`): write the backlog in order, retry a refusing journal
        every `retry_every_s`, keep the rescue file current while it fails; return after `close`."""
        self._running.set()
        try:
            while True:
                beat()
                self._drain()
                with self._lock:
                    if self._closed and (not self._backlog() or self._since_ms is not None):
                        return
                    if not self._work_due(self._monotonic()):  # checked under the lock: no change is missed
                        self._changed.wait(self._wait_s())
        finally:
            self._ended.set()

    def close(self, wait_s: float = 0.0) -> None:
        """Let the writer thread end once the backlog is written (at once, if the journal fails), and
        wait `wait_s` at most for it: the connection may be closed after, not under, its last write."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
        if self._running.is_set():
            self._ended.wait(wait_s)

    @property
    def stuck(self) -> bool:
        """Whether a write has been under way for `stuck_after_s` (the journal's disk does not answer)."""
        since, limit = self._writing_since, self._stuck_after_s
        return since is not None and limit is not None and self._monotonic() - since > limit

    def held(self) -> Held:
        """What the journal has not taken yet (for a rescue file at shutdown), in write order."""
        with self._lock:
            return self._held_now()

    def health(self) -> JournalHealth:
        """The journal's state for `/health` and the status view."""
        with self._lock:
            backlog = len(self._decisions) + len(self._outcomes)
            return JournalHealth(self._since_ms is not None, self._since_ms, backlog, self._last_error)

    def _held_now(self) -> Held:
        decisions = tuple((tuple(actions), cursor) for actions, cursor in self._decisions)
        return Held(decisions, tuple(self._outcomes))

    def _backlog(self) -> bool:
        return bool(self._decisions or self._outcomes)

    def _fresh_alerts(self, durable: list[Action]) -> list[Alert]:
        fresh = []
        for action in durable:
            if isinstance(action, Alert) and action.dedupe_key not in self._known:
                self._known.add(action.dedupe_key)
                fresh.append(action)
        return fresh

    def _queue_decision(self, durable: list[Action], cursor: str | None) -> None:
        # While failing, consecutive mark updates of the held position replace each other: only the last
        # peak and mark matter, and a day of failing writes must not grow memory per quote. Never the one
        # being written: its write would pop the newer update.
        being_written = 1 if self._writing_since is not None else 0
        if len(self._decisions) > being_written and cursor is None and _only_updates(durable):
            previous, previous_cursor = self._decisions[-1]
            if previous_cursor is None and _only_updates(previous) and _same_trade(previous, durable):
                self._decisions[-1] = (durable, None)
                return
        self._decisions.append((durable, cursor))

    def _note_change(self, *, urgent: bool) -> None:
        self._rescue_due = True
        self._rescue_urgent = self._rescue_urgent or urgent
        self._changed.notify_all()
        self._rescue_aside_if_stuck()

    def _rescue_aside_if_stuck(self) -> None:
        """While the writer thread is stuck in a write (its disk does not answer), it cannot keep the
        rescue file either: a thread of its own keeps it at the paths after the first (the temporary
        folder, as a rule on another disk). A kill -9 during a hung disk had lost every held decision,
        and the restart sold the position a second time. Called with the state lock held."""
        if len(self._rescue_paths) < 2 or self._since_ms is None or not self.stuck:
            return
        if self._aside is not None and self._aside.is_alive():
            self._aside_again = True
            return
        self._aside_again = False
        self._aside = threading.Thread(
            target=self._keep_rescue_aside, name="journal-rescue-aside", daemon=True
        )
        try:
            self._aside.start()
        except RuntimeError as exc:  # the system refuses a thread: the writer's own rescue is all there is
            self._aside = None
            log.error("journal_rescue_aside_not_started", error=str(exc))

    def _keep_rescue_aside(self) -> None:
        """`_rescue_aside_if_stuck`'s thread: save the backlog aside until it has saved the latest one."""
        while True:
            with self._lock:
                if self._since_ms is None:
                    return
                held = self._held_now()
            saved = journal_rescue.save(
                held, journal_rescue.off_the_data_disk(self._rescue_paths), quiet=True
            )
            with self._lock:
                recovered = self._since_ms is None
                again, self._aside_again = self._aside_again, False
            if recovered and saved is not None:
                journal_rescue.discard([saved])  # the journal took it all meanwhile: this copy is stale
                return
            if not again:
                return

    def _write_or_wait(self) -> None:
        """Write the backlog on this thread, or (with a writer thread) wait for it, see the class doc."""
        if self._stuck_after_s is None:
            self._drain()
            return
        started = self._monotonic()
        with self._lock:
            while self._backlog() and self._since_ms is None and not self._closed:
                now = self._monotonic()
                if now - max(started, self._progress_at) > self._stuck_after_s:
                    self._note_failure(
                        f"the journal's disk did not take a write within {self._stuck_after_s:g} s"
                    )
                    self._rescue_aside_if_stuck()
                    return
                if now - started > HAND_OVER_MOST_S:
                    log.warning("journal_hand_over_late", waited_s=round(now - started, 2), note="busy")
                    return
                self._changed.wait(WAIT_STEP_S)

    def _drain(self) -> None:
        """Do what is due, one step at a time, the disk's work outside the state lock; after a refused
        write only the rescue file (the write is tried again at its retry time)."""
        with self._io_lock:
            writes = True
            while (step := self._next_step(writes)) is not None:
                writes = step() and writes

    def _next_step(self, writes: bool) -> Callable[[], bool] | None:
        with self._lock:
            now = self._monotonic()
            if self._discard_due:
                self._discard_due = False
                return lambda: journal_rescue.discard(self._rescue_paths) or True
            if self._rescue_wanted(now):
                self._rescue_due = self._rescue_urgent = False
                held = self._held_now()
                return lambda: self._save_rescue(held, now) or True
            if not writes or not self._work_due(now):
                return None
            self._writing_since = now
            if self._decisions:
                actions, cursor = head = self._decisions[0]
                return lambda: self._write_head(head, lambda: write_decision(self.journal, actions, cursor))
            outcome = self._outcomes[0]
            write = functools.partial(
                self.journal.mark_outcome, outcome.dedupe_key, outcome.status, outcome.error, outcome.sent_ms
            )
            return lambda: self._write_head(outcome, write)

    def _write_head(self, head: object, write: Callable[[], None]) -> bool:
        """One write to the journal (no lock held), then its result into the backlog's state; whether
        it was written."""
        try:
            write()
            error = None
        except JournalError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - whatever refused the write, the alerts still go out
            error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._writing_since, self._progress_at = None, self._monotonic()
            if error is not None:
                self._note_failure(error)
            else:
                self._pop(head)
                if not self._backlog() and self._since_ms is not None:
                    self._note_recovery()
            self._changed.notify_all()
        return error is None

    def _pop(self, head: object) -> None:
        if self._decisions and self._decisions[0] is head:
            self._decisions.pop(0)
            self._written_while_failing += self._since_ms is not None
        elif self._outcomes and self._outcomes[0] is head:
            self._outcomes.pop(0)

    def _work_due(self, now: float) -> bool:
        if self._discard_due or self._rescue_wanted(now):
            return True
        return self._backlog() and (self._since_ms is None or now >= self._retry_at)

    def _wait_s(self) -> float:
        """How long the writer thread may sleep: until the next retry, a second at most."""
        if self._since_ms is None or not self._backlog():
            return WAIT_IDLE_S
        return min(WAIT_IDLE_S, max(WAIT_STEP_S, self._retry_at - self._monotonic()))

    def _rescue_wanted(self, now: float) -> bool:
        """Whether the rescue file is to be saved now (see the class docstring)."""
        if self._since_ms is None or not self._rescue_paths or not self._rescue_due:
            return False
        return self._rescue_urgent or now >= self._rescued_at + self._retry_every_s

    def _save_rescue(self, held: Held, now: float) -> None:
        if journal_rescue.save(held, self._rescue_paths, quiet=True) is not None:
            self._rescued_at = now
            return
        self._rescued_at = now  # tried: mark updates alone are tried again after `retry_every_s`
        if not self._rescue_refused_said:
            self._rescue_refused_said = True
            log.critical(
                "journal_rescue_failing",
                paths=[str(p) for p in self._rescue_paths],
                note="held decisions are in memory only: a kill now would lose them",
            )

    def _note_failure(self, error: str) -> None:
        self._retry_at = self._monotonic() + self._retry_every_s
        self._last_error = error
        if self._since_ms is not None:
            return
        self._since_ms = self._clock_ms()
        self._written_while_failing = 0
        self._rescue_due = self._rescue_urgent = True  # the backlog is now held: into the rescue file
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
            self._discard_due = True
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
