"""Trading sessions of the New York Stock Exchange and the entry and exit cut-offs of each.

Sessions come from exchange_calendars' XNYS calendar (holidays, 13:00 early closes). All wall-clock
times are America/New_York; all instants are Unix milliseconds.

Importing exchange_calendars brings in pandas and numpy (about 0.3 s, most of a short command's
start-up), so it is imported only when session tables are built. A caller with a data directory
passes `cache_dir`: each calendar year's table of session opens and closes is then kept there in a
small JSON file, valid for the installed exchange_calendars version, and later processes read it
instead of building. A missing, stale, corrupt or unwritable cache only costs the build.

The repository ships the same files for the years around its release (`calendar_seed/`, written by
`python3 tools/calendar_seed.py`). They are read only under the key they were written with (format and
exchange_calendars version), so a first command, a backtest or a Dask worker with the tested version
installed builds nothing, and any other version builds as before: the seed can be stale, never wrong.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

from config import Rules

NEW_YORK = ZoneInfo("America/New_York")
CALENDAR_START = datetime.date(2015, 1, 1)
CALENDAR_YEARS_AHEAD = 2
REGULAR_OPEN = datetime.time(9, 30)
REGULAR_CLOSE = datetime.time(16, 0)

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_ONE_MS = datetime.timedelta(milliseconds=1)
_HOUR_MS = 3_600_000

# Bump when the cache file's layout or meaning changes; files of another format are rebuilt.
CACHE_FORMAT = 1
CACHE_DISTRIBUTION = "exchange_calendars"
SEED_DIR = Path(__file__).resolve().parent / "calendar_seed"


@dataclass(frozen=True, slots=True)
class Session:
    """One trading day: its open and close and the cut-offs that move with the close."""

    date: datetime.date
    open_ms: int
    close_ms: int
    early_close: bool
    entry_start_ms: int
    entry_end_ms: int
    time_stop_ms: int

    def is_open(self, ms: int) -> bool:
        """Whether the market is open at `ms` (open inclusive, close exclusive)."""
        return self.open_ms <= ms < self.close_ms

    def entry_allowed(self, ms: int) -> bool:
        """Whether `ms` lies in the entry window [entry_start, entry_end)."""
        return self.entry_start_ms <= ms < self.entry_end_ms


def ny_datetime(ms: int) -> datetime.datetime:
    """The instant `ms` as an aware America/New_York datetime."""
    return datetime.datetime.fromtimestamp(ms / 1000, NEW_YORK)


def ny_date(ms: int) -> datetime.date:
    """The New York calendar date of the instant `ms`."""
    return ny_datetime(ms).date()


def ny_ms(day: datetime.date, at: datetime.time) -> int:
    """Unix ms of the New York wall-clock time `at` on `day`."""
    aware = datetime.datetime.combine(day, at, tzinfo=NEW_YORK)
    return (aware - _EPOCH) // _ONE_MS


def minute_of_day(ms: int) -> int:
    """New York minutes since midnight of the instant `ms`."""
    local = ny_datetime(ms)
    return local.hour * 60 + local.minute


def build_session(rules: Rules, day: datetime.date, open_ms: int, close_ms: int) -> Session:
    """A session with its cut-offs; on an early close the exit-side cut-offs shift earlier with it.

    The entry window is also kept inside [open, close) and the time stop no later than the close,
    so settings that reach outside the session cannot allow entries while the market is shut.
    """
    shift = ny_ms(day, REGULAR_CLOSE) - close_ms
    entry_start = max(open_ms, ny_ms(day, rules.no_entry_before))
    entry_end = min(close_ms, ny_ms(day, rules.no_entry_after) - shift)
    time_stop = min(close_ms, ny_ms(day, rules.hard_time_stop) - shift)
    return Session(
        date=day,
        open_ms=open_ms,
        close_ms=close_ms,
        early_close=shift > 0,
        entry_start_ms=entry_start,
        entry_end_ms=entry_end,
        time_stop_ms=time_stop,
    )


@dataclass(frozen=True, slots=True)
class Hours:
    """The open and close (Unix ms) of one XNYS session: all a year table holds per date."""

    open_ms: int
    close_ms: int


YearTable = Mapping[datetime.date, Hours]


@functools.cache
def build_year_tables(first_year: int, last_year: int) -> Mapping[int, YearTable]:
    """XNYS sessions of the whole calendar years `first_year`..`last_year`, from exchange_calendars.

    The only place that imports exchange_calendars (and with it pandas). Every year in the range
    gets a table, and a date that is not in its year's table has no session. Memoised (the tables
    are read-only): a sweep makes a calendar per cell and day, and building costs ~50 ms each time.
    """
    import warnings

    with warnings.catch_warnings():
        # exchange_calendars' own use of pandas draws deprecation and performance notices (on stderr, at
        # a daemon's start) that no user of this program can act on.
        warnings.simplefilter("ignore")
        import exchange_calendars as xcals

        xnys = xcals.get_calendar("XNYS", start=f"{first_year}-01-01", end=f"{last_year}-12-31")
        schedule = xnys.schedule
        opens, closes = list(schedule["open"]), list(schedule["close"])
    tables: dict[int, dict[datetime.date, Hours]] = {y: {} for y in range(first_year, last_year + 1)}
    for label, open_ts, close_ts in zip(schedule.index, opens, closes, strict=True):
        day = label.date()
        tables[day.year][day] = Hours(open_ts.value // 1_000_000, close_ts.value // 1_000_000)
    return MappingProxyType({year: MappingProxyType(table) for year, table in tables.items()})


def cache_key() -> str | None:
    """What a cache file must carry to be used: the format and the installed exchange_calendars version.

    Read from the distribution's metadata, which is cheap, because `exchange_calendars.__version__`
    would need the very import the cache avoids. None (no caching) when the version cannot be read.
    """
    import importlib.metadata

    try:
        return f"{CACHE_FORMAT}/{importlib.metadata.version(CACHE_DISTRIBUTION)}"
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        return None


@dataclass(frozen=True, slots=True)
class CalendarCache:
    """Year tables as JSON files `xnys-YYYY.json` in `folder`, valid only under `key`.

    Never raises for the disk: a file that cannot be read or is not exactly what `write` wrote is a
    miss, and a write that fails (read-only or full disk, missing parent) is skipped.
    """

    folder: Path
    key: str

    def path(self, year: int) -> Path:
        """The file of `year`'s table."""
        return self.folder / f"xnys-{year}.json"

    def read(self, year: int) -> YearTable | None:
        """The cached table of `year`, or None when it is missing, unreadable, corrupt or stale."""
        try:
            raw = json.loads(regular_file_bytes(self.path(year)))
        except (OSError, ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            return None
        return table_from_json(raw, self.key, year)

    def write(self, year: int, table: YearTable) -> None:
        """Store `year`'s table atomically (a reader sees the old file or the new one, never half)."""
        body = json.dumps(table_to_json(table, self.key, year), separators=(",", ":")).encode()
        try:
            # No `parents=True`: without its data directory a command (--status) creates nothing.
            self.folder.mkdir(exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.folder, prefix=f".xnys-{year}.", suffix=".tmp")
        except OSError:
            return
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(body)
            os.replace(temp, self.path(year))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def regular_file_bytes(path: Path) -> bytes:
    """The bytes of the regular file at `path`; OSError for anything else: reading a named pipe waits for
    a writer for ever, and a start that read one hung before its watchdog ran."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        return file.read()


def table_to_json(table: YearTable, key: str, year: int) -> dict[str, Any]:
    """The cache file's content: the key, the year and [date, open_ms, close_ms] per session, in order."""
    sessions = [[day.isoformat(), h.open_ms, h.close_ms] for day, h in sorted(table.items())]
    return {"key": key, "year": year, "sessions": sessions}


def table_from_json(raw: Any, key: str, year: int) -> YearTable | None:
    """The table `table_to_json` wrote, or None for anything else (another key or year, bad values)."""
    if not isinstance(raw, dict) or raw.get("key") != key or raw.get("year") != year:
        return None
    sessions = raw.get("sessions")
    if not isinstance(sessions, list) or not sessions:
        return None
    table: dict[datetime.date, Hours] = {}
    previous = datetime.date(year, 1, 1) - datetime.timedelta(days=1)
    for entry in sessions:
        found = _session_entry(entry, year)
        if found is None or found[0] <= previous:  # dates strictly ascending, as written
            return None
        previous, hours = found
        table[previous] = hours
    return table


def _session_entry(entry: Any, year: int) -> tuple[datetime.date, Hours] | None:
    # Strict on purpose: a cache that is anything but what was written is rebuilt, never trusted.
    if not isinstance(entry, list) or len(entry) != 3:
        return None
    iso, open_ms, close_ms = entry
    if not (isinstance(iso, str) and type(open_ms) is int and type(close_ms) is int and open_ms < close_ms):
        return None
    try:
        day = datetime.date.fromisoformat(iso)
    except ValueError:
        return None
    if day.year != year or ny_date(open_ms) != day:
        return None
    return day, Hours(open_ms, close_ms)


class MarketCalendar:
    """NYSE sessions by New York date, cached per date.

    The XNYS calendar is built for the whole years from 2015 through two years after construction
    at once; a year outside that range (a daemon running for years, a backtest of old tapes) is
    built on its own when first asked for. Only if exchange_calendars cannot build it is every
    weekday of that year taken as a regular 09:30-16:00 session, so an odd date never crashes the
    engine. Dates in `closed_dates` (the
    MARKET_CLOSED_DATES override, for closures the calendar does not know yet) have no session.
    `cache_dir` (for example DATA_DIR/calendar) keeps the built year tables for later processes;
    `seed_dir` holds the tables shipped with the code. A year found in neither is built from
    exchange_calendars on first use.
    """

    def __init__(
        self,
        rules: Rules,
        closed_dates: Iterable[datetime.date] = (),
        cache_dir: Path | None = None,
        seed_dir: Path | None = SEED_DIR,
    ) -> None:
        self._rules = rules
        self._closed = frozenset(closed_dates)
        self._start = CALENDAR_START
        self._end = _years_after(datetime.datetime.now(NEW_YORK).date(), CALENDAR_YEARS_AHEAD)
        self._cache_dir = cache_dir
        self._seed_dir = seed_dir
        # Filled on first use, so that constructing a calendar never imports exchange_calendars.
        self._years: dict[int, YearTable] = {}
        self._unbuildable: set[int] = set()  # years outside the range exchange_calendars refused
        self._sessions: dict[datetime.date, Session | None] = {}
        # (UTC hour number, session) of the last session_at call; one tuple so readers on other
        # threads never see the hour of one call paired with the session of another.
        self._last_hour: tuple[int, Session | None] = (-1, None)

    def session(self, day: datetime.date) -> Session | None:
        """The session on New York date `day`; None on weekends, holidays and closed dates."""
        try:
            return self._sessions[day]
        except KeyError:
            found = self._lookup(day)
            self._sessions[day] = found
            return found

    def session_at(self, ms: int) -> Session | None:
        """The session of the New York date of the instant `ms` (whether or not it is open then)."""
        hour = ms // _HOUR_MS
        cached_hour, cached = self._last_hour
        if hour == cached_hour:
            return cached
        found = self.session(ny_date(ms))
        # New York's UTC offsets are whole hours, so a UTC hour never straddles a New York
        # midnight; the check keeps this exact for any zone rule regardless.
        if ny_date(hour * _HOUR_MS) == ny_date(hour * _HOUR_MS + _HOUR_MS - 1):
            self._last_hour = (hour, found)
        return found

    def next_session(self, after: datetime.date) -> Session:
        """The first session strictly after the date `after`."""
        day = after + datetime.timedelta(days=1)
        while (found := self.session(day)) is None:
            day += datetime.timedelta(days=1)
        return found

    def _lookup(self, day: datetime.date) -> Session | None:
        if day in self._closed:
            return None
        table = self._year_table(day.year)
        if table is None:
            return self._weekday_session(day)
        hours = table.get(day)
        if hours is None:
            return None
        return build_session(self._rules, day, hours.open_ms, hours.close_ms)

    def _year_table(self, year: int) -> YearTable | None:
        """`year`'s sessions: from memory, else the cache, else the seed, else built (every year of the
        range at once; a year outside it alone). None when exchange_calendars cannot build that year."""
        table = self._years.get(year)
        if table is not None or year in self._unbuildable:
            return table
        key = cache_key() if self._cache_dir is not None or self._seed_dir is not None else None
        cache = None if key is None or self._cache_dir is None else CalendarCache(Path(self._cache_dir), key)
        table = self._stored_table(year, key, cache)
        if table is not None:
            self._years[year] = table
            return table
        # One build serves the whole range: building exchange_calendars' calendar is the costly part.
        first, last = self._start.year, self._end.year
        if first <= year <= last:
            built = build_year_tables(first, last)
        else:
            try:
                built = build_year_tables(year, year)
            except Exception:  # noqa: BLE001 - a year the library cannot build is taken as plain weekdays
                self._unbuildable.add(year)
                return None
        if cache is not None:
            for each, each_table in built.items():
                cache.write(each, each_table)
        self._years.update(built)
        return built[year]

    def _stored_table(self, year: int, key: str | None, cache: CalendarCache | None) -> YearTable | None:
        """`year`'s table from the data directory's cache, else from the shipped seed (same key only,
        then copied into the cache)."""
        if key is None:
            return None
        table = None if cache is None else cache.read(year)
        if table is None and self._seed_dir is not None:
            table = CalendarCache(Path(self._seed_dir), key).read(year)
            if table is not None and cache is not None:
                cache.write(year, table)  # the data directory's cache answers from now on, seed or not
        return table

    def _weekday_session(self, day: datetime.date) -> Session | None:
        if day.weekday() >= 5:
            return None
        return build_session(self._rules, day, ny_ms(day, REGULAR_OPEN), ny_ms(day, REGULAR_CLOSE))


def _years_after(day: datetime.date, years: int) -> datetime.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)
