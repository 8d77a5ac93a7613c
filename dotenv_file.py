"""Reading the `.env` file once per command: a regular file, or a named pipe.

1Password Environments (and other secret managers) mount `.env` as a named pipe (FIFO) so that secrets are
never written to disk. A pipe is read until its writer closes it, within a deadline: a reader that simply
opened it would wait forever for a writer that is waiting for the user's approval. A pipe gives its text
once per writer, so each command reads the file once and passes the `DotenvFile` on. Anything else at
the path (a `.env` folder is a common name for a virtual environment) is not a settings file and is
left alone, as python-dotenv does.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import time
from dataclasses import dataclass
from pathlib import Path

PIPE_WAIT_S = 30.0  # how long a named pipe's writer may take to give the whole file
MAX_BYTES = 1 << 20  # a settings file is a few kilobytes; a pipe that never ends is not one


@dataclass(frozen=True, slots=True)
class DotenvFile:
    """The text of a `.env` file, or why it could not be read; both None when there is no such file."""

    path: Path
    text: str | None = None
    problem: str | None = None

    @classmethod
    def read(cls, path: str | Path, *, pipe_wait_s: float = PIPE_WAIT_S) -> DotenvFile:
        """Read `path` now. A byte that is not UTF-8 becomes a lone surrogate, which decoded text never
        holds, so the line can be named rather than the whole file refused."""
        path = Path(path)
        try:
            raw = read_settings_file(path, pipe_wait_s)
        except OSError as exc:
            return cls(path, problem=f"{path.name}: cannot be read ({exc.strerror or exc})")
        if raw is None:
            return cls(path)
        return cls(path, text=raw.decode("utf-8", errors="surrogateescape"))


def read_settings_file(path: Path, pipe_wait_s: float) -> bytes | None:
    """The bytes of a regular file or a named pipe at `path`; None when there is neither there."""
    try:
        # Non-blocking: opening a pipe for reading otherwise waits for its writer, without a deadline.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            os.set_blocking(fd, True)
            return _read_to_end(fd, pipe_wait_s, waits=False)
        if stat.S_ISFIFO(mode):
            return _read_to_end(fd, pipe_wait_s, waits=True)
        return None
    finally:
        os.close(fd)


def _read_to_end(fd: int, wait_s: float, *, waits: bool) -> bytes:
    """Every byte until the end; a pipe (`waits`) must reach its end within `wait_s`."""
    deadline = time.monotonic() + wait_s
    chunks: list[bytes] = []
    size = 0
    poller = select.poll() if waits else None  # a regular file's reads never wait
    if poller is not None:
        poller.register(fd, select.POLLIN)
    while True:
        if poller is not None and not _readable_before(poller, deadline):
            raise OSError(
                errno.ETIMEDOUT,
                f"a named pipe whose writer gave no whole file within {wait_s:g} s"
                " (a secret manager waiting for approval?)",
            )
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BYTES:
            raise OSError(errno.EFBIG, f"larger than {MAX_BYTES // 1024} KB: not a settings file")


def _readable_before(poller: select.poll, deadline: float) -> bool:
    """Whether the pipe has bytes or its writer closed it before `deadline` (poll reports a writer's
    close only once a writer has come: a pipe no one has opened yet keeps waiting)."""
    left_ms = (deadline - time.monotonic()) * 1000
    return left_ms > 0 and bool(poller.poll(max(1, int(left_ms))))
