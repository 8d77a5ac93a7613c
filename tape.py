"""Tapes: one gzip'd JSON-lines recording per session day (DESIGN section 6).

Layout of a tape: line 1 is `{"t": ms, "meta": {"format": "tape/1", ...}}`; every other line is a
WebSocket frame `{"t": ms, "ws": [...]}` or a REST answer `{"t": ms, "rest": path, "status": int,
"body": {...}}`, stamped with its receive time.

Durability: the writer buffers lines in memory and `flush()` writes them as one complete gzip member,
then fsyncs. The file is therefore always a run of complete members plus, after a kill -9 in the middle
of a write, at most one torn member at the end. Reopening a writer cuts that torn tail off before
appending, so a later member is never hidden behind a damaged one. `gzip.open` reads multi-member files.

NaN: lines are written as strict JSON. A payload that really holds NaN or Infinity (a vendor bug) is
written with the non-standard `NaN` token instead of being altered, so replay hands the parser exactly
what the live parser saw and the value is counted as invalid downstream, the same way in both.

Hostile input: the writer never raises for what the data is, only OSError for the disk. A frame that
cannot be re-encoded (nested too deep) is kept as its raw text (`ws_raw`), a binary frame that is not
JSON as base64 (`ws_bin`), so replay hands the parser what live got and counts it the same way. A line
over MAX_RECORD_BYTES becomes a short `oversize` placeholder that replays as a bad line. The reader
never holds more than MAX_LINE_BYTES of one line (a gzip member inflating to gigabytes without a
newline is discarded up to the next newline and counted as one bad line) and never raises on a line
nested too deep to decode.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import gzip
import json
import os
import re
import zlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import orjson

TAPE_FORMAT = "tape/1"
TAPE_SUFFIX = ".jsonl.gz"
GZIP_MAGIC = b"\x1f\x8b\x08"
# Large buffers become a member on their own so memory stays bounded between durable flushes.
AUTO_MEMBER_BYTES = 8 * 1024 * 1024
# Secrets given to a TapeWriter are written as REDACTED; shorter ones could be ordinary words.
MIN_SECRET_CHARS = 8
REDACTED = b"***"
READ_CHUNK = 256 * 1024
# Inflated output is taken in slices of this size, so a gzip bomb never lands in memory at once.
INFLATE_CHUNK = 1024 * 1024
# The longest line the writer records (a full chain page is well under 1 MB; a day of 1-second
# aggregates in one REST page about 5 MB); longer becomes an `oversize` placeholder.
MAX_RECORD_BYTES = 16 * 1024 * 1024
# The longest line the reader holds; longer is dropped up to its newline and counted as one bad line.
MAX_LINE_BYTES = 32 * 1024 * 1024
# A stamp past 2100 is no clock's: one such line (read by the stdlib fallback as a Python int) had a
# replay tick through every second up to it, for ever.
MAX_STAMP_MS = 4_102_444_800_000
# How far a line's stamp may stray from the newest one before the next line must confirm it.
STAMP_LEAP_MS = 5 * 60_000
# A last line, which no next line can confirm, may lie this far ahead (a tape holds one session day:
# a daemon down from 09:30 to 10:06 that wrote one line and stopped made a real one).
STAMP_LAST_LEAP_MS = 24 * 3_600_000
_TAPE_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})\.jsonl\.gz$")


@dataclass(frozen=True, slots=True)
class TapeLine:
    """One readable tape line.

    `payload` is the meta dict, the decoded WebSocket frame (or the raw text of a frame that was not
    JSON, so the replay parser counts it as a bad frame exactly as live did), or the REST body.
    """

    line_no: int
    t: int
    kind: str
    payload: object
    path: str | None = None
    status: int | None = None


# A readable line's fields in TapeLine's order: (line_no, t, kind, payload, path, status).
LineFields = tuple[int, int, str, object, str | None, int | None]


def tape_path(data_dir: Path, session_date: datetime.date) -> Path:
    """Where the tape of one session day lives: `DATA_DIR/tapes/YYYY-MM-DD.jsonl.gz`."""
    return Path(data_dir) / "tapes" / f"{session_date.isoformat()}{TAPE_SUFFIX}"


def prune_tapes(tapes_dir: Path, keep_days: int, today: datetime.date) -> list[Path]:
    """Delete tapes more than `keep_days` calendar days older than `today`; return them, oldest first.

    Only files named `YYYY-MM-DD.jsonl.gz` are considered, so nothing else in the folder is touched.
    Today's tape is never deleted (age 0), even with `keep_days` 0.
    """
    tapes_dir = Path(tapes_dir)
    if not tapes_dir.is_dir():
        return []
    deleted = []
    for path in sorted(tapes_dir.iterdir()):
        day = _tape_date(path.name)
        if day is not None and (today - day).days > keep_days and path.is_file():
            path.unlink()
            deleted.append(path)
    return deleted


def _tape_date(name: str) -> datetime.date | None:
    match = _TAPE_NAME.match(name)
    if not match:
        return None
    try:
        return datetime.date.fromisoformat(match.group(1))
    except ValueError:
        return None


def strip_api_key(path: str) -> str:
    """Remove every API-key query parameter (`apiKey`, `api_key`, `API-KEY`...) from a request path,
    keeping the rest byte for byte."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    kept = [part for part in query.split("&") if not _is_key_name(part.partition("=")[0])]
    return f"{base}?{'&'.join(kept)}" if kept else base


def request_path(url: str) -> str | None:
    """The path and query a page's `next_url` asks for, without API keys: what the REST client asks of
    its own base URL and what the tape records for that page. None when it is no URL, or its path is
    not an absolute path of the base host: `a:http://elsewhere/x` has the path `http://elsewhere/x`, which
    an HTTP client takes for a URL of its own (and sent the key's header there)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an invalid IPv6 host
        return None
    if not is_local_path(parts.path):
        return None
    return strip_api_key(f"{parts.path}?{parts.query}" if parts.query else parts.path)


def is_local_path(path: str) -> bool:
    """Whether `path` can only mean a path on the host it is asked of: it starts with one `/`."""
    return path.startswith("/") and not path.startswith("//")


def _is_key_name(name: str) -> bool:
    return name.lower().replace("_", "").replace("-", "") == "apikey"


def encode_line(record: dict[str, Any]) -> bytes:
    """One compact JSON line; strict JSON unless the data itself holds NaN/Infinity (see module doc).

    Raises ValueError (never RecursionError) when the record is nested too deep to encode, and
    TypeError when it holds something JSON has no form for.
    """
    try:
        try:
            text = json.dumps(record, separators=(",", ":"), allow_nan=False)
        except ValueError:
            text = json.dumps(record, separators=(",", ":"), allow_nan=True)
    except RecursionError:
        raise ValueError("record nested too deep to encode") from None
    return text.encode("utf-8") + b"\n"


class TapeGone(OSError):
    """The tape's file is no longer at its path (deleted or replaced while it was being written)."""


# The gzip level of a member handed to the OS before a decision (`TapeWriter.hand_over`): fast over small.
HAND_OVER_LEVEL = 1


class TapeWriter:
    """Appends lines to one day's tape. Use as a context manager; `flush()` is the durable point."""

    def __init__(
        self,
        path: Path,
        *,
        underlying: str,
        benchmark: str,
        start_ms: int,
        compresslevel: int = 6,
        extra_meta: dict[str, Any] | None = None,
        secrets: Sequence[str] = (),
    ) -> None:
        """`secrets` (the API key and the like) never reach the file: wherever a peer echoed one (an
        error body, a status message, a link), it is written as `***`."""
        self.path = Path(path)
        # JSON encodes letters and digits as themselves; short strings could be ordinary words.
        self._secrets = tuple(secret.encode() for secret in secrets if len(secret) >= MIN_SECRET_CHARS)
        self._compresslevel = compresslevel
        self._buffer: list[bytes] = []
        self._buffered_bytes = 0
        # Items recorded raw (`ws_raw`/`ws_bin` because they could not be re-encoded) or as `oversize`.
        self.raw_lines = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        kept, ends_line = _truncate_to_complete_members(self.path)
        has_content = kept > 0
        self._file = open(self.path, "ab")  # noqa: SIM115 - owned for the writer's lifetime
        if created:
            _fsync_dir(self.path.parent)
        if not ends_line:
            # A line left open by a foreign member must not swallow the first line appended.
            self._add_line(b"\n")
        if not has_content:
            meta: dict[str, Any] = {"format": TAPE_FORMAT, "underlying": underlying, "benchmark": benchmark}
            # Labels such as `"reconstructed": true` ride along; the three keys above always win.
            meta |= {k: v for k, v in (extra_meta or {}).items() if k not in meta}
            self._append({"t": start_ms, "meta": meta})

    def __enter__(self) -> TapeWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once `close()` has run."""
        return self._file.closed

    def write_ws(self, t: int, frame: list[Any] | str | bytes) -> None:
        """Record one WebSocket frame received at `t` (ms): text, binary, or an already decoded array.

        Raises only OSError (the disk). Whatever the data, the line replays to the parser's same
        verdict as live: JSON is stored decoded; text that is not JSON or is nested too deep to
        re-encode is stored as its text (`ws_raw`); a binary frame is read as live reads it
        (`json.loads` of the bytes) and, when that fails, stored as base64 (`ws_bin`) and replayed
        as those bytes. Anything stored raw or as a placeholder is counted in `raw_lines`.
        """
        if isinstance(frame, (bytes, bytearray)):
            self._write_binary(t, bytes(frame))
        elif isinstance(frame, str):
            self._write_text(t, frame)
        elif not self._try_append({"t": t, "ws": frame}):
            # An array nobody can re-encode has no text to fall back to: a placeholder replays as bad.
            self._append_placeholder(t, "ws", None)

    def _write_text(self, t: int, frame: str) -> None:
        try:
            decoded: Any = json.loads(frame)
        except (ValueError, RecursionError):
            self._append_raw({"t": t, "ws_raw": frame}, "ws")
            return
        if not self._try_append({"t": t, "ws": decoded}):
            self._append_raw({"t": t, "ws_raw": frame}, "ws")

    def _write_binary(self, t: int, frame: bytes) -> None:
        # Secrets come out of the bytes themselves: once stored as base64 (`ws_bin`) no line-level
        # replacement can find them (a frame echoing the key went to the tape readable by anyone).
        for secret in self._secrets:
            frame = frame.replace(secret, REDACTED)
        try:
            # The call the live parser makes on bytes, so the stored form cannot disagree with it.
            decoded: Any = json.loads(frame)
        except (ValueError, RecursionError):
            try:
                text = frame.decode("utf-8")
            except UnicodeDecodeError:
                self._append_raw({"t": t, "ws_bin": _b64(frame)}, "ws")
                return
            # UTF-8 that is not JSON fails as text exactly as it failed as bytes.
            self._append_raw({"t": t, "ws_raw": text}, "ws")
            return
        if not self._try_append({"t": t, "ws": decoded}):
            # Decoded live but too deep to re-encode: the bytes themselves replay to the same result.
            self._append_raw({"t": t, "ws_bin": _b64(frame)}, "ws")

    def write_control(self, t: int, control: dict[str, Any]) -> None:
        """Record an operator action that changes decisions (the pause switch), so replays reproduce it.

        Raises only OSError; a payload that cannot be encoded becomes a placeholder (see `raw_lines`).
        """
        if not self._try_append({"t": t, "control": control}):
            self._append_placeholder(t, "control", None)

    def write_rest(self, t: int, path: str, status: int, body: object) -> None:
        """Record one REST answer received at `t` (ms); the API key is stripped from the path and next_url.

        Raises only OSError. A body nested too deep to encode, or a line over MAX_RECORD_BYTES, is
        recorded as an `oversize` placeholder naming the path and status, which replays as a bad line.
        """
        clean = strip_api_key(path) if isinstance(path, str) else str(path)
        record = {"t": t, "rest": clean, "status": status, "body": _strip_next_url_key(body)}
        if not self._try_append(record):
            self._append_placeholder(t, "rest", clean)

    def flush(self) -> None:
        """Write everything buffered as one gzip member and fsync: a crash after this loses none of it.

        Raises TapeGone when the file was removed or replaced meanwhile (its folder or DATA_DIR deleted):
        the writer would otherwise go on appending to a file nobody can read again.
        """
        self._check_open()
        self._write_member()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._check_still_linked()

    def hand_over(self) -> None:
        """Write everything buffered as one gzip member and hand it to the OS, without fsync: cheap enough
        before every decision, and what a killed process (kill -9, an OOM kill) had written survives it.

        The member is compressed at level 1: it is on a BUY's or SELL's path, and a buffer holding a
        250-contract chain page took milliseconds at the default level (a little more disk instead)."""
        self._check_open()
        self._write_member(HAND_OVER_LEVEL)
        self._file.flush()

    def _check_still_linked(self) -> None:
        try:
            linked = os.path.samestat(os.fstat(self._file.fileno()), os.stat(self.path))
        except FileNotFoundError:
            linked = False
        if not linked:
            raise TapeGone(f"{self.path} was removed or replaced while it was being written")

    def close(self) -> None:
        """Flush and close; calling it again does nothing."""
        if self._file.closed:
            return
        try:
            self.flush()
        finally:
            self._file.close()

    def _try_append(self, record: dict[str, Any]) -> bool:
        """Append the record; False when it cannot be encoded (too deep, not JSON-able)."""
        self._check_open()
        try:
            line = encode_line(record)
        except (ValueError, TypeError):
            return False
        if len(line) > MAX_RECORD_BYTES:
            self._append_placeholder(record["t"], _kind_of(record), record.get("rest"), len(line))
            return True
        self._add_line(line)
        return True

    def _append_raw(self, record: dict[str, Any], kind: str) -> None:
        """A raw record (text or base64) always encodes; only its size can still refuse it."""
        self.raw_lines += 1
        line = encode_line(record)
        if len(line) > MAX_RECORD_BYTES:
            self.raw_lines -= 1  # the placeholder counts it
            self._append_placeholder(record["t"], kind, None, len(line))
            return
        self._add_line(line)

    def _append_placeholder(self, t: int, kind: str, path: str | None, size: int | None = None) -> None:
        """A short line that says what was not recorded; the reader counts it as a bad line."""
        self.raw_lines += 1
        note: dict[str, Any] = {"kind": kind, "bytes": size}
        if path is not None:
            note["path"] = path[:500]
        self._add_line(encode_line({"t": t, "oversize": note}))

    def _append(self, record: dict[str, Any]) -> None:
        self._check_open()
        self._add_line(encode_line(record))

    def _add_line(self, line: bytes) -> None:
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, REDACTED)
        self._buffer.append(line)
        self._buffered_bytes += len(line)
        if self._buffered_bytes >= AUTO_MEMBER_BYTES:
            self._write_member()

    def _write_member(self, compresslevel: int | None = None) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._buffered_bytes = 0
        # mtime=0 keeps tapes of the same input byte-identical.
        level = self._compresslevel if compresslevel is None else min(compresslevel, self._compresslevel)
        self._file.write(gzip.compress(data, compresslevel=level, mtime=0))

    def _check_open(self) -> None:
        if self._file.closed:
            raise ValueError(f"tape {self.path} is closed")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kind_of(record: dict[str, Any]) -> str:
    return next((key for key in ("ws", "rest", "control") if key in record), "line")


def _strip_next_url_key(body: object) -> object:
    if isinstance(body, dict) and isinstance(body.get("next_url"), str):
        cleaned = strip_api_key(body["next_url"])
        if cleaned != body["next_url"]:
            return {**body, "next_url": cleaned}
    return body


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _truncate_to_complete_members(path: Path) -> tuple[int, bool]:
    """Cut a torn trailing gzip member off `path`.

    Returns the size of what is kept (0 if no file) and whether its content ends a line.
    """
    if not path.exists():
        return 0, True
    with open(path, "rb") as fh:
        head = fh.read(len(GZIP_MAGIC))
    if head and not GZIP_MAGIC.startswith(head):
        # Never cut a file that is not a gzip tape (a plain .jsonl, a wrong path): refuse instead.
        raise ValueError(f"{path} exists and is not a gzip tape")
    keep, ends_line = _complete_members_end(path)
    if keep != path.stat().st_size:
        os.truncate(path, keep)
    return keep, ends_line


def _complete_members_end(path: Path) -> tuple[int, bool]:
    """Byte offset just past the last gzip member that decompresses completely from the start,
    and whether the content up to there ends with a newline (True when there is none)."""
    end = 0
    pos = 0
    decomp = None
    last = kept_last = b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            data = chunk
            while data:
                if decomp is None:
                    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
                try:
                    # Output is thrown away in bounded slices: a member may inflate to gigabytes.
                    out = decomp.decompress(data, INFLATE_CHUNK)
                    last = out[-1:] or last
                    while not decomp.eof and (decomp.unconsumed_tail or len(out) >= INFLATE_CHUNK):
                        out = decomp.decompress(decomp.unconsumed_tail, INFLATE_CHUNK)
                        last = out[-1:] or last
                except zlib.error:
                    return end, kept_last == b"\n"
                if not decomp.eof:
                    pos += len(data)
                    break
                pos += len(data) - len(decomp.unused_data)
                end, kept_last = pos, last
                data = decomp.unused_data
                decomp = None
    return end, kept_last == b"\n"


def _strays(leapt: int, newest: int | None, next_t: int) -> bool:
    """Whether a line stamped `leapt` is a stray: the line after it is back near `newest`, far from it."""
    assert newest is not None
    return abs(next_t - newest) <= STAMP_LEAP_MS < abs(next_t - leapt)


class TapeReader:
    """Iterates a tape's readable lines; never raises on damaged content.

    `bad_lines` counts, for the latest iteration, lines that are not JSON objects, lack an integer `t`,
    or have no known shape, plus one for each damaged stretch of the gzip stream (such as a member torn
    by a crash). `meta` is the first meta line's dict, read when the reader is made. With
    `lazy_bodies`, REST bodies come as `RawJson` and are decoded only if someone asks.
    """

    def __init__(self, path: Path, *, lazy_bodies: bool = False) -> None:
        self.path = Path(path)
        self.lazy_bodies = lazy_bodies
        self.bad_lines = 0
        self.meta: dict[str, Any] | None = None
        lines = iter(self)
        first = next(lines, None)
        lines.close()
        if first is not None and first.kind == "meta" and isinstance(first.payload, dict):
            self.meta = first.payload
        self.bad_lines = 0

    def __iter__(self) -> Generator[TapeLine, None, None]:
        records = self.records()
        try:
            for fields in records:
                yield TapeLine(*fields)
        finally:
            records.close()  # closes the file at once when the caller stops early

    def records(self) -> Generator[LineFields, None, None]:
        """The readable lines as plain tuples in `TapeLine`'s field order: what iterating yields,
        without a TapeLine per line (a full day's tape has tens of thousands of lines).

        A line stamped more than STAMP_LEAP_MS away from the newest stamp so far, whose next line
        carries on from before it, is a stray stamp and counted bad: taken, one line of a month
        ahead had the replay tick through every second to it (a STALL and a SUMMARY for each day
        on the way, and every later bar late). A last line more than a day ahead is counted bad
        alike. A leap the next line confirms (a restart after hours of downtime) is kept.
        """
        self.bad_lines = 0
        line_no = 0
        lazy = self.lazy_bodies
        newest: int | None = None  # the newest stamp of the lines taken
        held: LineFields | None = None  # a line that leapt, until the next line says which it is
        for raw in self._raw_lines():
            line_no += 1
            parsed = _parse_line(raw, line_no, lazy)
            if parsed is None:
                self.bad_lines += 1
                continue
            t = parsed[1]
            if held is not None:
                if _strays(held[1], newest, t):
                    self.bad_lines += 1
                else:
                    yield held
                    newest = held[1]
                held = None
            if newest is not None and not -STAMP_LEAP_MS <= t - newest <= STAMP_LEAP_MS:
                held = parsed
                continue
            if newest is None or t > newest:
                newest = t
            yield parsed
        if held is not None:
            if newest is not None and held[1] - newest > STAMP_LAST_LEAP_MS:
                self.bad_lines += 1
            else:
                yield held

    def _raw_lines(self) -> Iterator[bytes]:
        with open(self.path, "rb") as fh:
            head = fh.read(len(GZIP_MAGIC))
            fh.seek(0)
            chunks = _gzip_chunks(fh, self._count_damage) if head == GZIP_MAGIC else _plain_chunks(fh)
            yield from _split_lines(chunks, self._count_damage)

    def _count_damage(self) -> None:
        self.bad_lines += 1


def _split_lines(chunks: Iterator[bytes | None], on_bad: Any) -> Iterator[bytes]:
    """Non-blank lines of the chunks, none longer than MAX_LINE_BYTES (a longer one is one bad line).

    A line is gathered as a list of pieces (joined once), so a long line costs linear time; once it
    passes the cap its pieces are dropped and the rest of it is skipped up to the next newline.
    """
    parts: list[bytes] = []
    size = 0
    skipping = False
    for chunk in chunks:
        if chunk is None:  # a damaged stretch: its partial line is gone (counted by the chunker)
            parts, size, skipping = [], 0, False
            continue
        pieces = chunk.split(b"\n")
        for piece in pieces[:-1]:
            if skipping:
                skipping = False
            elif size + len(piece) > MAX_LINE_BYTES:
                on_bad()
            else:
                line = b"".join((*parts, piece)) if parts else piece
                if line.strip():
                    yield line
            parts, size = [], 0
        tail = pieces[-1]
        if skipping or not tail:
            continue
        if size + len(tail) > MAX_LINE_BYTES:
            on_bad()
            parts, size, skipping = [], 0, True
        else:
            parts.append(tail)
            size += len(tail)
    if parts and not skipping:
        line = b"".join(parts)
        if line.strip():
            yield line


def _plain_chunks(fh: Any) -> Iterator[bytes | None]:
    while chunk := fh.read(READ_CHUNK):
        yield chunk


def _gzip_chunks(fh: Any, on_damage: Any) -> Iterator[bytes | None]:
    """Decompressed data of every member; `None` marks a damaged stretch (its partial line is dropped).

    One damaged stretch is reported once, however many false gzip headers it takes to get past it.
    """
    data = fh.read(READ_CHUNK)
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    started = damaged = more_out = False
    while data or more_out:
        try:
            # Bounded output: a member of compressed zeros can inflate a thousandfold.
            out = decomp.decompress(data, INFLATE_CHUNK)
        except zlib.error:
            if not damaged:
                on_damage()
            damaged = True
            yield None
            data = _resync(data[1:], fh)
            decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
            started = more_out = False
            continue
        started = True
        if out:
            yield out
        if decomp.eof:
            data = decomp.unused_data or fh.read(READ_CHUNK)
            decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
            started = damaged = more_out = False
            continue
        # A full slice may leave output inside zlib even when all input was taken: ask again first.
        more_out = len(out) >= INFLATE_CHUNK
        data = decomp.unconsumed_tail or (b"" if more_out else fh.read(READ_CHUNK))
    if started and not damaged:
        on_damage()
        yield None


def _resync(data: bytes, fh: Any) -> bytes:
    """Skip to the next gzip header after a damaged stretch; empty when there is none."""
    while True:
        found = data.find(GZIP_MAGIC)
        if found >= 0:
            return data[found:]
        more = fh.read(READ_CHUNK)
        if not more:
            return b""
        data = data[-(len(GZIP_MAGIC) - 1) :] + more


def loads_json(text: bytes) -> Any:
    """JSON text to values: orjson (several times faster on a day's 60 MB), stdlib json when orjson refuses.

    The fallback keeps the stdlib's reading of what orjson rejects (NaN and Infinity literals,
    integers beyond the float range). One difference stays: orjson reads an integer beyond 64 bits
    as a float; no field the feed gives us holds such a number. Raises only ValueError: text nested
    deeper than either parser goes (orjson stops at 1024, the stdlib at the recursion limit) too.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        try:
            return json.loads(text)
        except RecursionError:
            raise ValueError("JSON nested too deep") from None


class RawJson:
    """A REST body still in its JSON text: most chain pages are never looked at, so decode on use.

    `value()` decodes once (None when the text is not valid JSON). Pickled (by `tape_cache`) with
    its text compressed, and unpickled still compressed: it is inflated only when first used.
    """

    __slots__ = ("_text", "_value", "_decoded", "_packed")

    def __init__(self, text: bytes, *, packed: bool = False) -> None:
        self._text = text
        self._value: object = None
        self._decoded = False
        self._packed = packed

    def __reduce__(self) -> tuple[object, ...]:
        if self._decoded:
            return (_decoded_json, (self._value,))
        text = self._text if self._packed else zlib.compress(self._text, 1)
        return (_packed_json, (text,))

    def _unpack(self) -> bytes:
        if self._packed:
            self._text, self._packed = zlib.decompress(self._text), False
        return self._text

    def value(self) -> object:
        """The decoded body; None when the text is not JSON (or nested too deep to decode)."""
        if not self._decoded:
            try:
                self._value = loads_json(self._unpack())
            except (ValueError, RecursionError, zlib.error):
                self._value = None
            self._decoded, self._text = True, b""
        return self._value

    def is_object(self) -> bool:
        """Whether the body is a JSON object, judged by its first character until it is decoded."""
        if self._decoded:
            return isinstance(self._value, dict)
        return self._unpack().lstrip()[:1] == b"{"

    def top_level_string(self, key: str) -> str | None:
        """A string field found by text search (exact for the writer's compact, key-escaped output)."""
        if self._decoded:
            value = self._value.get(key) if isinstance(self._value, dict) else None
            return value if isinstance(value, str) and value else None
        match = re.search(rb'"' + re.escape(key.encode()) + rb'":"((?:[^"\\]|\\.)*)"', self._unpack())
        if match is None:
            return None
        try:
            return json.loads(b'"' + match.group(1) + b'"')
        except ValueError:  # an escape JSON does not know (`\q`): the body is no JSON, so has no such field
            self.value()  # decoded now, so `is_object` says what it is
            return None


def _packed_json(text: bytes) -> RawJson:
    return RawJson(text, packed=True)


def _decoded_json(value: object) -> RawJson:
    raw = RawJson(b"")
    raw._value, raw._decoded = value, True
    return raw


_BODY_KEY = b',"body":'


def _split_rest_line(raw: bytes) -> tuple[bytes, bytes] | None:
    """Our writer puts `body` last: split it off so the (large) body is decoded only when needed."""
    if not raw.startswith(b'{"t":') or b'"rest":' not in raw[:64]:
        return None
    at = raw.find(_BODY_KEY)
    end = raw.rstrip()
    if at < 0 or not end.endswith(b"}"):
        return None
    return raw[:at] + b"}", end[at + len(_BODY_KEY) : -1]


def _parse_line(raw: bytes, line_no: int, lazy_bodies: bool = False) -> LineFields | None:
    split = _split_rest_line(raw) if lazy_bodies else None
    if split is not None:
        line = _parse_line(split[0], line_no)
        if line is None or line[2] != "rest":
            return None
        return (line_no, line[1], "rest", RawJson(split[1]), line[4], line[5])
    try:
        record = loads_json(raw)
    except ValueError:
        return None
    if type(record) is not dict:
        return None
    t = record.get("t")
    if type(t) is not int or not 0 <= t <= MAX_STAMP_MS:  # bool is an int subclass, and not a stamp
        return None
    return _shape_line(record, t, line_no)


def _binary_line(encoded: object, t: int, line_no: int) -> LineFields | None:
    """A binary frame that was not JSON, replayed as the very bytes live received."""
    if not isinstance(encoded, str):
        return None
    try:
        return (line_no, t, "ws", base64.b64decode(encoded, validate=True), None, None)
    except (binascii.Error, ValueError):
        return None


def _shape_line(record: dict[str, Any], t: int, line_no: int) -> LineFields | None:
    if "meta" in record:
        return (line_no, t, "meta", record["meta"], None, None) if isinstance(record["meta"], dict) else None
    if "ws" in record:
        return (line_no, t, "ws", record["ws"], None, None)
    if "ws_raw" in record:
        raw = record["ws_raw"]
        return (line_no, t, "ws", raw, None, None) if isinstance(raw, str) else None
    if "ws_bin" in record:
        return _binary_line(record["ws_bin"], t, line_no)
    if "control" in record:
        control = record["control"]
        return (line_no, t, "control", control, None, None) if isinstance(control, dict) else None
    if "rest" in record:
        path, status = record["rest"], record.get("status")
        if not isinstance(path, str) or not isinstance(status, int) or isinstance(status, bool):
            return None
        return (line_no, t, "rest", record.get("body"), path, status)
    return None
