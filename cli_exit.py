"""How a command-line process ends when its user stops it: a reader closing stdout early, or Ctrl-C.

Both are ordinary ways to stop a tool, not errors: the process ends with the status a shell expects
(141 after SIGPIPE, 130 after SIGINT) and one short line at most, never a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE
EXIT_INTERRUPTED = 128 + 2  # ... and by SIGINT


def run_quietly(run: Callable[[], int]) -> int:
    """Run a command line; a closed stdout (`| head -1`) or Ctrl-C ends it quietly.

    For a closed stdout, the Python docs' recipe: point stdout at /dev/null so the interpreter's final
    flush cannot raise again. What a run has committed (journals, caches) stays; it resumes next time.
    """
    interrupted: list[bool] = []

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        status = run()
        # Buffered output into a pipe is written here at the latest, where a closed pipe is still ours to
        # handle; left to the interpreter's exit it costs a warning and status 120.
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
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
