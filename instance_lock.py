"""One live daemon per DATA_DIR, one replay per replay journal: an OS lock on a file in DATA_DIR.

Two daemons on one journal would both send every alert; two replays into one journal would write the
same trades twice, fail on the second write and report each other's trades. `flock` is released by
the kernel when the holder dies, however it dies (kill -9 included), so a stale lock file never blocks
a restart. The file holds the holder's PID so the refusal can name it. The daemon locks
`DATA_DIR/daemon.lock`; a replay locks `DATA_DIR/replay.sqlite3.lock` (see `replay_lock`), so a
replay never blocks the daemon nor the daemon a replay. Backtests use their own journals and take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "daemon.lock"
DAEMON_ADVICE = "stop it first, or give this one its own DATA_DIR"


class AlreadyRunning(RuntimeError):
    """Another process holds the lock (another live daemon on DATA_DIR, or another replay on its journal)."""

    def __init__(
        self, path: Path, pid: str, holder: str = "alerter daemon", advice: str = DAEMON_ADVICE
    ) -> None:
        super().__init__(f"another {holder} (PID {pid or 'unknown'}) is running on {path.parent}; {advice}")
        self.pid = pid


class InstanceLock:
    """Held from `acquire()` until `release()` or the process ends.

    `name` is the lock file's name in `data_dir`; `holder` and `advice` word the refusal.
    """

    def __init__(
        self,
        data_dir: Path,
        name: str = LOCK_NAME,
        *,
        holder: str = "alerter daemon",
        advice: str = DAEMON_ADVICE,
    ) -> None:
        self.path = Path(data_dir) / name
        self.holder, self.advice = holder, advice
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
            raise AlreadyRunning(self.path, holder, self.holder, self.advice) from None
        # The flock is the lock; the PID in the file only names the holder to a second daemon, so a full
        # disk that refuses it must not keep this one from starting (and following its position).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def relock_if_gone(self) -> bool:
        """Take the lock again on a new file when ours was deleted (DATA_DIR removed under a running
        daemon): a lock on an unlinked file would let a second daemon start. Whether it had to."""
        if self._fd is None:
            return False
        try:
            linked = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
        except FileNotFoundError:
            linked = False
        if linked:
            return False
        old, self._fd = self._fd, None
        self.acquire()
        os.close(old)
        return True

    def release(self) -> None:
        """Let the next holder in (closing the file drops the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def replay_lock(journal_path: Path) -> InstanceLock:
    """The lock a replay holds on its journal: `<journal>.lock` beside it (not yet acquired)."""
    journal_path = Path(journal_path)
    return InstanceLock(
        journal_path.parent,
        f"{journal_path.name}.lock",
        holder="replay",
        advice=f"it writes to {journal_path}: wait for it to end, or give this one its own DATA_DIR",
    )
