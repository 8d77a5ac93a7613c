"""Logging set-up: structlog over the standard library, console on a terminal, JSON otherwise.

In the live daemon, lines are formatted (and their secrets removed) in the thread that logs, and written
to stderr by a thread of their own: a log line never waits for whatever reads the process's output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import threading
import time
from typing import TextIO

import structlog

from redaction import Redactor


def redact_rendered(redactor: Redactor):  # noqa: ANN201 - a structlog processor factory
    """The last processor: the rendered line without any secret, wherever in the event it was
    (nested in a list of problems, cut short in an error text, in a foreign library's message)."""

    def processor(_logger: object, _method: str, rendered: str) -> str:
        return redactor(rendered)

    return processor


def configure_logging(
    level: str = "INFO", fmt: str = "", secrets: tuple[str, ...] = (), *, background: bool = False
) -> None:
    """Configure structlog once per process. `fmt` is console, json or '' (console on a TTY).

    `background` (the live daemon): lines are written by a thread of their own, see `BackgroundStderr`.
    A command keeps them in order with what it prints to stderr itself."""
    terminal = sys.stderr is not None and sys.stderr.isatty()  # None: stderr closed (`2>&-`)
    use_json = fmt == "json" or (fmt == "" and not terminal)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks never show frame locals: a frame that holds an API key would print it.
    renderer = (
        [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False, use_rich=False)
            ),
            structlog.processors.JSONRenderer(),
        ]
        if use_json
        else [
            structlog.dev.ConsoleRenderer(colors=terminal, exception_formatter=structlog.dev.plain_traceback)
        ]
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *renderer,
            redact_rendered(Redactor.of(secrets)),
        ],
    )
    stream = sys.stderr or open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - the process's own
    handler = BackgroundStderr(stream) if background else logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for earlier in root.handlers:
        if isinstance(earlier, BackgroundStderr):  # a reconfiguration keeps the lines already logged
            earlier.flush()
            earlier.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Apprise's debug lines spell out its URLs' tokens (a Telegram bot token in the request URL).
    # urllib3 (under Apprise's requests) names request paths, which hold an ntfy topic or a chat id.
    for noisy in ("httpx", "httpcore", "websockets", "apprise", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


LOG_QUEUE_LINES = 10_000  # lines held while stderr is slow; past this they are dropped, never waited for
FLUSH_WAIT_S = 2.0  # at exit (logging.shutdown flushes every handler), how long the held lines may take
DROPS_SHOWN_S = 300.0  # how long /health says lines were dropped after the last one
WRITE_STUCK_S = 30.0  # a write to stderr that waited this long: the output's reader stopped reading


class BackgroundStderr(logging.Handler):
    """A handler that queues each formatted line for a writer thread, so that logging never blocks.

    A reader that stops reading (a paused `| less`, a container log driver in blocking mode, a full pipe)
    had held every thread that logs: the engine's (no BUY, no SELL) and the watchdog's, which logs before
    it exits, so the daemon hung without a word. Past `capacity` lines a line is dropped and counted; the
    writer says how many before its next line, and `problem` tells /health of a write that waits.
    """

    def __init__(self, stream: TextIO, capacity: int = LOG_QUEUE_LINES) -> None:
        super().__init__()
        self._stream = stream
        self._lines: queue.Queue[str | None] = queue.Queue(capacity)
        self._drops_lock = threading.Lock()
        self.dropped = 0
        self._last_drop_at = -float("inf")
        self._said_drops = 0
        self._writing_since: float | None = None  # when the write under way began
        threading.Thread(target=self._write_lines, name="log-writer", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the formatted line; drop it (counted) if the queue is full. Never waits, never raises."""
        try:
            line = self.format(record)
        except Exception as exc:  # noqa: BLE001 - a line that cannot be formatted is said, not raised
            line = f"a log line could not be formatted ({type(exc).__name__}: {exc}): {record.name}"
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            with self._drops_lock:
                self.dropped += 1
                self._last_drop_at = time.monotonic()

    def flush(self, timeout_s: float = FLUSH_WAIT_S) -> None:
        """Wait, `timeout_s` at most, until every queued line is written."""
        deadline = time.monotonic() + timeout_s
        with self._lines.all_tasks_done:
            while self._lines.unfinished_tasks and (left := deadline - time.monotonic()) > 0:
                self._lines.all_tasks_done.wait(left)

    def close(self) -> None:
        """Let the writer thread end once the lines before this are written."""
        # A full queue: the writer is stuck on its stream; a daemon thread, it ends with the process.
        with contextlib.suppress(queue.Full):
            self._lines.put_nowait(None)
        super().close()

    def problem(self) -> str | None:
        """What /health says while a write to stderr has waited WRITE_STUCK_S, or lines were dropped in
        the last DROPS_SHOWN_S; else None."""
        now = time.monotonic()
        with self._drops_lock:
            dropped, last = self.dropped, self._last_drop_at
        writing_since = self._writing_since
        stuck_s = 0.0 if writing_since is None else now - writing_since
        if stuck_s < WRITE_STUCK_S and now - last > DROPS_SHOWN_S:
            return None
        return (
            f"log output blocked (nothing reads this process's stderr): {self._lines.qsize()} log line(s) "
            f"waiting, {dropped} dropped; alerts are not affected"
        )

    def _write_lines(self) -> None:
        while True:
            line = self._lines.get()
            try:
                if line is None:
                    return
                self._say_drops()
                self._write(line)
            finally:
                self._lines.task_done()

    def _say_drops(self) -> None:
        dropped = self.dropped
        if dropped > self._said_drops:
            count, self._said_drops = dropped - self._said_drops, dropped
            note = logging.makeLogRecord(
                {"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                 "msg": f"log_lines_dropped count={count}: stderr was not read, so these lines were lost"}
            )  # fmt: skip
            self._write(self.format(note))

    def _write(self, text: str) -> None:
        self._writing_since = time.monotonic()
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stderr loses the line, and only the line
        finally:
            self._writing_since = None


def log_output_problem() -> str | None:
    """The problem of this process's log output (see `BackgroundStderr.problem`), or None."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundStderr):
            return handler.problem()
    return None


def flush_logs(timeout_s: float = FLUSH_WAIT_S) -> None:
    """Write the queued log lines, waiting `timeout_s` at most (before an `os._exit`, which skips it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, BackgroundStderr):
            handler.flush(timeout_s)
