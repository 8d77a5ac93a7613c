"""How a command-line process ends when its user stops it: a reader closing stdout early, or Ctrl-C.

Both are ordinary ways to stop a tool, not errors: the process ends with the status a shell expects
(141 after SIGPIPE, 130 after SIGINT) and one short line at most, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import sys
from collections.abc import Callable

EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE
EXIT_INTERRUPTED = 128 + 2  # ... and by SIGINT


def usable_std_streams() -> None:
    """Standard streams a command can always write to: a closed one (`2>&-`, for which Python leaves
    None) goes to /dev/null, and a character its encoding cannot hold (`PYTHONIOENCODING=ascii`, a
    DATA_DIR name that is not UTF-8) is replaced, not raised: tables and alert texts hold dashes and
    emoji, and `isatty()` or `print()` on a closed stream ended commands with a traceback or silently."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - the process's own
        elif isinstance(stream, io.TextIOWrapper) and stream.errors in ("strict", "surrogateescape"):
            # surrogateescape is what Python sets under a C locale without UTF-8 mode (LC_ALL=C
            # PYTHONUTF8=0): it escapes undecodable bytes only, and a dash in the demo's text still raised.
            stream.reconfigure(errors="replace")


def run_quietly(run: Callable[[], int]) -> int:
    """Run a command line; a closed stdout (`| head -1`) or Ctrl-C ends it quietly.

    For a closed stdout, the Python docs' recipe: point stdout at /dev/null so the interpreter's final
    flush cannot raise again. What a run has committed (journals, caches) stays; it resumes next time.
    """
    usable_std_streams()
    interrupted: list[bool] = []

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    # Inherited through exec, a parent's blocked SIGINT left Ctrl-C pending for good: the run went on to
    # its end and said nothing (a test run's process had it blocked now and then).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        status = run()
        # Buffered output into a pipe is written here at the latest, where a closed pipe is still ours to
        # handle; left to the interpreter's exit it costs a warning and status 120.
        sys.stdout.flush()
        if not interrupted:
            return status
        # A Ctrl-C whose KeyboardInterrupt a library swallowed (an import under way) still ends as one.
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EIO):
            raise
        # Output to a full device (`> /dev/full`, a full disk): one line, not a traceback.
        with contextlib.suppress(OSError):
            print(f"Stopped: {exc.strerror} ({exc.filename or 'standard output'}).", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception:
        # Ctrl-C reaches pool workers too: their end can surface first, as a broken pool.
        if not interrupted:
            raise
    except KeyboardInterrupt:
        pass
    print("\nInterrupted.", file=sys.stderr)
    return EXIT_INTERRUPTED


def end_quietly_on_interrupt() -> None:
    """In a pool worker: Ctrl-C (sent to the whole process group) ends it without a traceback."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
