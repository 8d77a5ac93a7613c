"""Tapes decoded once into engine events and cached, so re-runs and sweeps skip gzip, JSON and parsing.

Decoding a full day's tape (about 60 MB of JSON) costs several times what the engine spends on it.
`load_decoded` keeps the decoder's output for every line in a cache file and reads that instead
on the next run. Chain pages stay raw JSON, compressed, and are inflated only when a chain is used.
The features the market computed from a decoded tape are cached the same way (`features_path`),
keyed also by the market rules, so a re-run that changes only exit or gate rules reads them too.

The cache file is a pickle: it is written and read only by this program, under DATA_DIR; never
put one there from elsewhere. Its name carries a key of everything the output depends on: the
tape's content (a SHA-256 of its bytes), the decoder's rules, the Python version and the source
of the decoding (or feature) modules, so editing a parser makes every cached tape stale. A file that cannot be
read is rebuilt; a cache that cannot be written (disk full, read-only) is skipped with a warning.

Stale copies are removed, not left to fill the disk that the live journal may share: a name ends with
its generation (`-g` and a digest of the Python version and the modules' source), and writing a copy
removes the folder's copies of every other generation. Two checkouts of different code sharing one
DATA_DIR therefore decode again after each other: a cost in time, never a wrong result.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import os
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from config import Rules
from events import ContractSnapshot, Event
from feed import FeedDecoder
from market_calendar import ny_date
from market_state import market_key
from replay import DecodedLine, decoded_lines
from signals import Features
from tape import TapeReader

HERE = Path(__file__).resolve().parent
DECODING_MODULES = ("events.py", "feed.py", "polygon_client.py", "tape.py", "replay.py", "tape_cache.py")
# Everything the cached features are computed by (their input, the decoded tape, is keyed apart):
# the per-bar engine, the whole-day planner, the market that feeds them bars and rolls their days (on
# New York dates), and the day runner that plans, records and serves them. Rules are keyed by value.
FEATURE_MODULES = (
    "signals.py",
    "features_vector.py",
    "market_state.py",
    "market_calendar.py",
    "day_runner.py",
)
SUFFIX = ".decoded"
FEATURES_SUFFIX = ".features"


@dataclass(frozen=True, slots=True)
class DecodedTape:
    """Every line of a tape (the meta line aside) as the engine thread would decode it.

    A line is (receive stamp, "events", tuple of events), (receive stamp, "control", payload) or
    (receive stamp, "quotes", packed events): a line of option quotes only, each stamped with the
    line's time (the options stream's frames, about half of a day's lines). Engines without a
    position skip those, so they stay packed (`unpack_quotes`) until one needs them: loading and
    freeing a day's objects was the largest part of a warm sweep day.
    """

    session_date: str
    reconstructed: bool
    bad_lines: int
    lines: tuple[DecodedLine, ...]


def only_quotes(t: int, events: Sequence[Event]) -> bool:
    """Whether decoded events are option quotes only, each stamped with the line's time `t`."""
    return bool(events) and all(type(e) is ContractSnapshot and e.received_ms == t for e in events)


def pack_quotes(line: DecodedLine) -> DecodedLine:
    """An events line of quotes only as a "quotes" line; any other line as it is."""
    t, kind, body = line
    if kind == "events" and only_quotes(t, body):  # type: ignore[arg-type]
        return (t, "quotes", pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL))
    return line


def unpack_quotes(packed: object) -> tuple[Event, ...]:
    """The events of a "quotes" line (written by `pack_quotes` in this program's own cache)."""
    return pickle.loads(packed)  # type: ignore[arg-type]


def decode_tape(tape: Path, rules: Rules) -> DecodedTape:
    """Read and decode a whole tape with the live decoder for `rules` (no cache)."""
    reader = TapeReader(tape, lazy_bodies=True)
    lines: list[DecodedLine] = []
    first_t: int | None = None
    for _line_no, line in decoded_lines(reader, FeedDecoder.for_rules(rules)):
        first_t = line[0] if first_t is None else first_t
        if line[1] != "meta":
            lines.append(line)
    session_date = ny_date(first_t).isoformat() if first_t is not None else ""
    reconstructed = bool((reader.meta or {}).get("reconstructed"))
    packed = tuple(pack_quotes(line) for line in lines)
    return DecodedTape(session_date, reconstructed, reader.bad_lines, packed)


def load_decoded(tape: Path, rules: Rules, cache_dir: Path | None) -> DecodedTape:
    """The decoded tape, from `cache_dir` when it holds a current copy (None: always decode)."""
    if cache_dir is None:
        return decode_tape(tape, rules)
    path = cache_path(tape, rules, cache_dir)
    cached = _read(path)
    if isinstance(cached, DecodedTape):
        return cached
    decoded = decode_tape(tape, rules)
    _write(path, decoded)
    return decoded


def decoder_key(rules: Rules) -> tuple[object, ...]:
    """The rules the decoder reads: equal keys decode a tape identically."""
    return (rules.underlying, rules.benchmark, rules.volume_profile_days)


def ensure_decoded(tape: Path, rules: Rules, cache_dir: Path) -> Path:
    """Decode `tape` into the cache unless a copy for these rules is there already; returns its path."""
    path = cache_path(tape, rules, cache_dir)
    if not path.is_file():
        _write(path, decode_tape(tape, rules))
    return path


def cache_path(tape: Path, rules: Rules, cache_dir: Path) -> Path:
    """Where the decoded copy of `tape` for these rules lives; see the module docstring for the key."""
    parts = [
        content_digest(tape),
        repr(decoder_key(rules)),
        sys.version,
        _code_fingerprint(),
    ]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{tape.name.split('.')[0]}-{key}{_generation(DECODING_MODULES)}{SUFFIX}"


_DIGESTS: dict[tuple[object, ...], str] = {}


def content_digest(tape: Path) -> str:
    """The SHA-256 of the tape's bytes (as the Dask path names a shipped tape), once per file version.

    Size and mtime alone would serve a stale copy for a tape replaced by another of the same size
    with its mtime kept (cp -p, rsync -t, a restore). Hashing a full day (~13 MB gzip) takes ~11 ms,
    against seconds to decode it. Within a process the digest is remembered per path, size, mtime,
    inode and ctime: a replaced file changes its inode or ctime, which no copy tool can set.
    """
    stat = tape.stat()
    version = (str(tape.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
    digest = _DIGESTS.get(version)
    if digest is None:
        with open(tape, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        _DIGESTS[version] = digest
    return digest


def features_path(tape: Path, rules: Rules, cache_dir: Path) -> Path:
    """Where the features computed from the decoded `tape` under these market rules are cached."""
    decoded = cache_path(tape, rules, cache_dir)
    parts = [decoded.name, repr(market_key(rules)), _code_fingerprint(FEATURE_MODULES)]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    generation = _generation(DECODING_MODULES + FEATURE_MODULES)
    return decoded.with_name(f"{tape.name.split('.')[0]}-{key}{generation}{FEATURES_SUFFIX}")


def read_features(path: Path) -> list[Features] | None:
    """The cached features at `path`, or None (missing or unreadable: compute them again)."""
    value = _read(path)
    return value if isinstance(value, list) else None


def write_features(path: Path, features: list[Features]) -> None:
    """Cache a day's features (skipped with a warning when the cache cannot be written)."""
    _write(path, features)


@functools.cache
def _code_fingerprint(modules: tuple[str, ...] = DECODING_MODULES) -> str:
    """A hash of the modules' source, read once per process (every cache lookup needs it)."""
    digest = hashlib.sha256()
    for name in modules:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()


@functools.cache
def _generation(modules: tuple[str, ...]) -> str:
    """The tag that ends the names of copies this Python and these modules' source write."""
    digest = hashlib.sha256(f"{sys.version}\0{_code_fingerprint(modules)}".encode())
    return f"-g{digest.hexdigest()[:10]}"


def _remove_other_generations(path: Path) -> None:
    """Remove the copies beside `path` (of its kind) that another generation wrote: nothing reads them."""
    suffix = path.suffix
    current = path.name[path.name.rindex("-g") :]
    try:
        stale = [
            entry
            for entry in path.parent.iterdir()
            if entry.name.endswith(suffix)
            and not entry.name.endswith(current)
            and not entry.name.startswith(".")
        ]
    except OSError:
        return
    for entry in stale:
        with contextlib.suppress(OSError):  # another process may remove it first
            entry.unlink()
    if stale:
        structlog.get_logger("tape_cache").info("cache_pruned", folder=str(path.parent), files=len(stale))


def _read(path: Path) -> object:
    try:
        with open(path, "rb") as handle:
            value = _unpickle_without_gc(handle.read())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except Exception as exc:  # any damage at all: the tape is the truth, decode it again
        structlog.get_logger("tape_cache").warning("cache_unreadable", path=str(path), error=repr(exc))
        return None
    return value


def _unpickle_without_gc(data: bytes) -> object:
    """Unpickle with the cyclic GC paused: the load allocates ~100k objects and none is garbage yet."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return pickle.loads(data)
    finally:
        if enabled:
            gc.enable()


def _write(path: Path, value: object) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:
            pickle.dump(value, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(partial, path)
        _remove_other_generations(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        structlog.get_logger("tape_cache").warning("cache_not_written", path=str(path), error=str(exc))
