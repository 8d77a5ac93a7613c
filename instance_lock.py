"""One live daemon per DATA_DIR: an OS lock on `DATA_DIR/daemon.lock`.

Two daemons on one journal would both send every alert. `flock` is released by the kernel when the
holder dies, however it dies (kill -9 included), so a stale lock file never blocks a restart. The file
holds the holder's PID so the refusal can name it. Replays and backtests use their own journals and
never take this lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "daemon.lock"


class AlreadyRunning(RuntimeError):
    """Another live daemon holds DATA_DIR."""

    def __init__(self, path: Path, pid: str) -> None:
        super().__init__(
            f"another alerter daemon (PID {pid or 'unknown'}) is running on {path.parent}; "
            f"stop it first, or give this one its own DATA_DIR"
        )
        self.pid = pid


class InstanceLock:
    """Held from `acquire()` until `release()` or the process ends."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> InstanceLock:
        """Take the lock or raise `AlreadyRunning` naming the holder's PID."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Let the next daemon in (closing the file drops the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
