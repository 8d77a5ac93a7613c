"""Thread supervision: every long-running thread of the daemon comes back after an unexpected error.

A worker is a function that loops until the daemon's `stop` event is set and calls `beat(name)` on each
turn. When it raises (or returns while the daemon is still running), the supervisor logs the traceback,
reports the crash once per run of failures (the daemon turns the report into a SYSTEM alert), waits a
back-off of 1 s doubling to 60 s, and starts it again. A worker that has turned for `HEALTHY_AFTER_S`
since its restart counts as recovered. `health()` lists each worker for `/health`: a worker that is down
or has not beaten for longer than its `stale_after_s` is a problem the daemon reports.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import structlog

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
HEALTHY_AFTER_S = 30.0
ERROR_TEXT_LIMIT = 200
THREAD_START_TRIES = 5  # a thread the system refuses is asked for again: 0.1 + 0.2 + 0.4 + 0.8 s apart
THREAD_START_WAIT_S = 0.1
log = structlog.get_logger("supervisor")


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    """One worker as `/health` shows it."""

    name: str
    alive: bool
    beat_age_s: float
    restarts: int
    last_error: str | None
    stale: bool


@dataclass(slots=True)
class _Worker:
    name: str
    target: Callable[[], None]
    stale_after_s: float | None
    last_beat: float
    started: float
    restarts: int = 0
    failures: int = 0
    down: bool = False
    last_error: str | None = None
    thread: threading.Thread | None = None


def error_text(exc: BaseException) -> str:
    """`Type: message`, cut short, for log lines and alerts."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:ERROR_TEXT_LIMIT]


class Supervisor:
    """Runs named workers on daemon threads and restarts them with back-off after a crash."""

    def __init__(
        self,
        stop: threading.Event,
        *,
        on_crash: Callable[[str, str], None],
        monotonic: Callable[[], float] = time.monotonic,
        backoff_first_s: float = BACKOFF_FIRST_S,
        backoff_max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self._stop = stop
        self._on_crash = on_crash
        self._monotonic = monotonic
        self._backoff_first_s = backoff_first_s
        self._backoff_max_s = backoff_max_s
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()

    def spawn(self, name: str, target: Callable[[], None], *, stale_after_s: float | None = None) -> None:
        """Start `target` on its own thread under supervision."""
        now = self._monotonic()
        worker = _Worker(name, target, stale_after_s, last_beat=now, started=now)
        with self._lock:
            self._workers[name] = worker
        for attempt in range(THREAD_START_TRIES):
            thread = threading.Thread(target=self._run, args=(worker,), name=name, daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # "can't start new thread": out of threads or memory, often briefly
                log.error("thread_start_refused", thread=name, attempt=attempt + 1, error=str(exc))
                if attempt + 1 == THREAD_START_TRIES:
                    raise RuntimeError(f"the system refused the {name} thread ({exc})") from exc
                time.sleep(THREAD_START_WAIT_S * 2**attempt)
            else:
                worker.thread = thread
                return

    def beat(self, name: str) -> None:
        """A worker's turn: it is alive; after a quiet spell since a restart, its failures are forgiven."""
        worker = self._workers.get(name)
        if worker is None:
            return
        now = self._monotonic()
        worker.last_beat = now
        if worker.failures and now - worker.started >= HEALTHY_AFTER_S:
            log.info("thread_recovered", thread=name, restarts=worker.restarts)
            worker.failures = 0

    def health(self) -> list[WorkerHealth]:
        """Every worker, in the order they were spawned."""
        now = self._monotonic()
        with self._lock:
            workers = list(self._workers.values())
        return [self._health_of(worker, now) for worker in workers]

    def problems(self) -> list[str]:
        """One sentence per worker that is down or stuck."""
        found = []
        for worker in self.health():
            if not worker.alive:
                found.append(f"thread {worker.name} is down ({worker.last_error}); restarting")
            elif worker.stale:
                found.append(f"thread {worker.name} has not turned for {worker.beat_age_s:.0f} s")
        return found

    def join(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` in all for the workers to end after `stop` was set."""
        end = self._monotonic() + timeout_s
        for worker in list(self._workers.values()):
            if worker.thread is not None:
                worker.thread.join(max(0.0, end - self._monotonic()))

    def _health_of(self, worker: _Worker, now: float) -> WorkerHealth:
        age = now - worker.last_beat
        stale = worker.stale_after_s is not None and age > worker.stale_after_s
        alive = not worker.down and worker.thread is not None and worker.thread.is_alive()
        return WorkerHealth(worker.name, alive, round(age, 1), worker.restarts, worker.last_error, stale)

    def _run(self, worker: _Worker) -> None:
        while not self._stop.is_set():
            error = self._run_once(worker)
            if error is None:
                return
            if self._stop.wait(self._crashed(worker, error)):
                return
            worker.restarts += 1
            worker.started = worker.last_beat = self._monotonic()
            worker.down = False
            log.warning("thread_restarted", thread=worker.name, restarts=worker.restarts)

    def _run_once(self, worker: _Worker) -> str | None:
        """Run the target once; None when it ended because the daemon is stopping, else what went wrong."""
        try:
            worker.target()
        except BaseException as exc:  # noqa: BLE001 - a SystemExit or KeyboardInterrupt raised in a worker
            # ends that worker only: it is restarted like any crash, never left dead without a word.
            # Formatted here, without frame locals: a frame holding an API key must not print it.
            trace = "".join(traceback.format_exception(exc)[-12:])
            log.error("thread_failed", thread=worker.name, error=error_text(exc), traceback=trace)
            return error_text(exc)
        if self._stop.is_set():
            return None
        log.error("thread_failed", thread=worker.name, error="returned while the daemon runs")
        return "returned while the daemon runs"

    def _crashed(self, worker: _Worker, error: str) -> float:
        """Note the crash, report the first of a run; returns the back-off before the restart."""
        worker.down = True
        worker.last_error = error
        worker.failures += 1
        if worker.failures == 1:
            self._report(worker.name, error)
        return min(self._backoff_max_s, self._backoff_first_s * 2 ** min(worker.failures - 1, 16))

    def _report(self, name: str, error: str) -> None:
        try:
            self._on_crash(name, error)
        except Exception as exc:  # the report itself must never take the supervisor down
            log.error("crash_report_failed", thread=name, error=error_text(exc))
