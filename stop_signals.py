"""SIGTERM, SIGINT and SIGHUP stop the daemon: `stop.set()`, called on a thread of its own.

A Python signal handler runs on the main thread between two bytecodes, wherever that thread is, and that
can be inside `stop.set()` or `stop.wait()` while it holds the Event's lock, which is not reentrant. A
handler that sets the Event there waits for that lock forever: an audit's burst of SIGTERMs (GNU `timeout`
signals the child and its group) hung the daemon for good, and the watchdog, waiting on the same lock,
never fired. So the handler does nothing in Python. The interpreter writes each signal's number to a
wakeup pipe (`signal.set_wakeup_fd`), and a watcher thread reads the pipe and sets the Event.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence

import structlog

log = structlog.get_logger("signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _noted_by_the_wakeup_pipe(_signum: int, _frame: object) -> None:
    """The Python-level handler: nothing (the pipe carries the signal; see the module docstring)."""


def stop_on_signals(stop: threading.Event, signals: Sequence[int] = STOP_SIGNALS) -> None:
    """From now on each of `signals` sets `stop` (once is enough; repeats are harmless). Main thread only."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the interpreter's C handler must never block on a full pipe
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in signals:
        signal.signal(signum, _noted_by_the_wakeup_pipe)
    # A mask is inherited through exec: a parent that blocked these (Python's multiprocessing does, for a
    # moment, around its spawns) left them pending for good, and a stop became the platform's SIGKILL.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    wanted = frozenset(int(s) for s in signals)
    watcher = threading.Thread(target=_watch, args=(read_fd, wanted, stop), name="signals", daemon=True)
    watcher.start()


def ignore_stop_signals(signals: Sequence[int] = STOP_SIGNALS) -> None:
    """From now on `signals` are ignored: the daemon has stopped and its status is decided. At its exit
    the interpreter puts back the default action of every signal with a Python handler, and a SIGTERM of
    a burst landing then killed the cleanly stopped process with status 143; ignored ones stay ignored."""
    for signum in signals:
        signal.signal(signum, signal.SIG_IGN)


def _watch(read_fd: int, wanted: frozenset[int], stop: threading.Event) -> None:
    """Set `stop` at the first wanted signal number read from the pipe; keep reading (repeats are no-ops)."""
    while True:
        try:
            received = os.read(read_fd, 512)
        except OSError:
            return
        if not received:
            return
        numbers = wanted.intersection(received)
        if numbers and not stop.is_set():
            log.info("stop_signal", signal=signal.Signals(min(numbers)).name)
            stop.set()
