"""Decisions the journal refuses, kept in a rescue file and written at the next start.

While the journal cannot be written (disk full, a lock held, a read-only file) the live daemon keeps
its decisions in memory (`delivery.WriteBehindJournal`). A stop in that state (a deploy, SIGTERM)
or a kill would lose them: the restart would resume a position whose SELL was already sent, and send it
again with other numbers, or forget a BUY and never sell it. So the held decisions and delivery outcomes
are pickled to the first of `rescue_paths` that accepts them, kept current while the journal fails and
written once more at a stop, and the next start writes them to the journal, in order, before it reads any
state. The file is written and read only by this program (pickle: never put one there).

A data disk that is full takes no new file, and the system's temporary folder does not outlive a restart
on Render: a rescue there was lost with it, and the restart resumed a position whose SELL was already sent,
then sold it again at another price (an audit's find). So the daemon keeps a reserve file on the data disk,
made at start while there is room (`ensure_reserve`): its two slots are written in place, which takes no
new block, each with its own length and digest, the older slot first, so a torn write never spoils the other.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sqlite3
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from events import Action
from pnl_tracker import Journal, JournalError

RESCUE_NAME = "journal.rescue"
RESERVE_NAME = "journal.rescue.reserve"
RESCUE_FORMAT = 1
# A rescue larger than a slot (hundreds of held decisions) goes on to the next path.
RESERVE_SLOT_BYTES = 256 << 10
_RESERVE_MAGIC = b"IWMRSV01"
_SLOT_HEADER = struct.Struct(">8sQQ32s")  # magic, sequence, length, SHA-256 of the rescue
log = structlog.get_logger("journal")


@dataclass(frozen=True, slots=True)
class Outcome:
    """A delivery outcome not yet written: the outbox row's key, status, error and send time."""

    dedupe_key: str
    status: str
    error: str | None
    sent_ms: int | None


@dataclass(frozen=True, slots=True)
class Held:
    """What the journal has not taken yet, in the order it must be written."""

    decisions: tuple[tuple[tuple[Action, ...], str | None], ...]
    outcomes: tuple[Outcome, ...]

    def __len__(self) -> int:
        return len(self.decisions) + len(self.outcomes)


def rescue_paths(data_dir: Path) -> tuple[Path, Path, Path]:
    """Where a rescue goes, in order: beside the journal; the reserve file on the data disk (for a full
    disk); the temporary folder under a name of DATA_DIR's (a last resort: a restart may wipe it)."""
    return data_dir / RESCUE_NAME, data_dir / RESERVE_NAME, in_temp(data_dir, RESCUE_NAME)


def off_the_data_disk(paths: Sequence[Path]) -> list[Path]:
    """The rescue paths after the first (beside the journal) but the reserve: those off the data disk, for
    a disk that hangs (a write there would hang too)."""
    return [path for path in paths[1:] if path.name != RESERVE_NAME]


def ensure_reserve(data_dir: Path) -> bool:
    """Make the reserve file (two slots of zeros) unless it is there whole; False when the disk refuses."""
    path = Path(data_dir) / RESERVE_NAME
    size = 2 * RESERVE_SLOT_BYTES
    try:
        if path.is_file() and path.stat().st_size == size:
            return True
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as file:
            block = bytes(1 << 16)
            for _ in range(size // len(block)):
                file.write(block)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    except OSError as exc:
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        log.warning("journal_reserve_not_made", path=str(path), error=str(exc))
        return False
    return True


def journal_copy_path(data_dir: Path) -> Path:
    """Where a stop copies a journal it could not write back to DATA_DIR (removed, on a full disk)."""
    return in_temp(data_dir, "journal.sqlite3")


def in_temp(data_dir: Path, name: str) -> Path:
    """A file of this DATA_DIR's in the system's temporary folder (for when DATA_DIR cannot take it).

    Without a usable temporary folder (a container's read-only root) it is in DATA_DIR itself: the
    folder is a fallback, and its absence refused the start. A DATA_DIR name that is not UTF-8 is
    hashed as the bytes it names (a strict encode refused that start too)."""
    digest = hashlib.sha256(os.fsencode(Path(data_dir).resolve())).hexdigest()[:12]
    try:
        folder = Path(tempfile.gettempdir())
    except OSError:
        folder = Path(data_dir)
    return folder / f"iwm-alerter-{digest}.{name}"


def save(held: Held, paths: Sequence[Path], *, quiet: bool = False) -> Path | None:
    """Write `held` to the first path that takes it whole (temp file, fsync, rename); None if none does.

    The rescues at the other paths are removed once it is written: each save holds everything not yet
    in the journal, so an older one there is a stale part of this one. `quiet` leaves refusals unsaid
    (the write-behind journal saves often while failing and says a failing rescue once itself).
    """
    data = pickle.dumps((RESCUE_FORMAT, held), protocol=pickle.HIGHEST_PROTOCOL)
    for path in paths:
        try:
            if path.name == RESERVE_NAME:
                _write_into_reserve(path, data)
            else:
                _write_atomically(path, data)
        except OSError as exc:
            if not quiet:
                log.error("journal_rescue_not_written", path=str(path), error=str(exc))
            continue
        discard(p for p in paths if p != path)
        return path
    return None


def discard(paths: Iterable[Path]) -> None:
    """Remove the rescues at `paths` (their writes are in the journal now); a refusal is said, not raised."""
    for path in paths:
        try:
            if path.name == RESERVE_NAME:
                _clear_reserve(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("journal_rescue_not_removed", path=str(path), error=str(exc))


def load(paths: Sequence[Path]) -> list[tuple[Path, Held]]:
    """Every rescue found, oldest file first; an unreadable one is renamed `.bad` and said, not loaded."""
    found = []
    for path in sorted((p for p in paths if p.is_file()), key=lambda p: p.stat().st_mtime):
        reserved = _read_reserve(path) if path.name == RESERVE_NAME else None
        if path.name == RESERVE_NAME and reserved is None:
            continue  # the reserve holds no rescue
        try:
            data = path.read_bytes() if reserved is None else reserved
            version, held = pickle.loads(data)  # noqa: S301 - our own file, see the docstring
            if version != RESCUE_FORMAT or not isinstance(held, Held):
                raise ValueError(f"not a rescue of format {RESCUE_FORMAT}")
        except Exception as exc:
            bad = path.with_name(path.name + ".bad")
            moved_to = str(bad)
            try:
                path.replace(bad)
            except OSError as move_error:  # a read-only folder: said, skipped, and said again next start
                moved_to = f"nowhere ({move_error.strerror})"
            log.critical("journal_rescue_unreadable", path=str(path), moved_to=moved_to, error=str(exc))
            continue
        found.append((path, held))
    return found


def _write_into_reserve(path: Path, data: bytes) -> None:
    """`data` into the reserve's older slot, in place (data first, then its header, each fsynced)."""
    if len(data) > RESERVE_SLOT_BYTES - _SLOT_HEADER.size:
        raise OSError(f"{len(data)} bytes: larger than a reserve slot")
    with open(path, "r+b") as file:  # FileNotFoundError (an OSError) when there is no reserve
        if os.fstat(file.fileno()).st_size != 2 * RESERVE_SLOT_BYTES:
            raise OSError("the reserve file is not whole")
        slots = [_slot(file.fileno(), i) for i in (0, 1)]
        sequences = [found[0] if found else 0 for found in slots]
        target = 0 if sequences[0] <= sequences[1] else 1
        offset = target * RESERVE_SLOT_BYTES
        header = _SLOT_HEADER.pack(
            _RESERVE_MAGIC, max(sequences) + 1, len(data), hashlib.sha256(data).digest()
        )
        os.pwrite(file.fileno(), data, offset + _SLOT_HEADER.size)
        os.fsync(file.fileno())
        os.pwrite(file.fileno(), header, offset)
        os.fsync(file.fileno())


def _read_reserve(path: Path) -> bytes | None:
    """The newest whole rescue in the reserve's slots, or None."""
    try:
        with open(path, "rb") as file:
            slots = [found for found in (_slot(file.fileno(), i) for i in (0, 1)) if found]
    except OSError:
        return None
    return max(slots)[1] if slots else None


def _slot(fd: int, index: int) -> tuple[int, bytes] | None:
    """(sequence, rescue) of a reserve slot whose header and digest hold, else None."""
    offset = index * RESERVE_SLOT_BYTES
    magic, sequence, length, digest = _SLOT_HEADER.unpack(
        os.pread(fd, _SLOT_HEADER.size, offset).ljust(_SLOT_HEADER.size, b"\0")
    )
    if magic != _RESERVE_MAGIC or length > RESERVE_SLOT_BYTES - _SLOT_HEADER.size:
        return None
    data = os.pread(fd, length, offset + _SLOT_HEADER.size)
    return (sequence, data) if hashlib.sha256(data).digest() == digest else None


def _clear_reserve(path: Path) -> None:
    """Both slots' headers zeroed in place (the file stays, for the next full disk)."""
    if not path.is_file():
        return
    with open(path, "r+b") as file:
        for index in (0, 1):
            os.pwrite(file.fileno(), bytes(_SLOT_HEADER.size), index * RESERVE_SLOT_BYTES)
        os.fsync(file.fileno())


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def write_to(journal: Journal, held: Held) -> None:
    """Write a rescue's decisions, then its outcomes, in order, as the write-behind journal writes its
    backlog; a refusal other than the schema's raises JournalError."""
    for actions, cursor in held.decisions:
        write_decision(journal, list(actions), cursor)
    for outcome in held.outcomes:
        journal.mark_outcome(outcome.dedupe_key, outcome.status, outcome.error, outcome.sent_ms)


def write_decision(journal: Journal, actions: list[Action], cursor: str | None) -> None:
    """One decision into the journal. A decision the schema refuses (an IntegrityError: already there,
    or never writable) is dropped and said: holding it would block every later write."""
    try:
        journal.record(actions, cursor)
    except JournalError as exc:
        if not isinstance(exc.__cause__, sqlite3.IntegrityError):
            raise
        log.critical("journal_decision_dropped", error=str(exc), actions=len(actions))
