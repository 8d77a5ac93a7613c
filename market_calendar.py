"""Trading sessions of the New York Stock Exchange and the entry and exit cut-offs of each.

Sessions come from exchange_calendars' XNYS calendar (holidays, 13:00 early closes). All wall-clock
times are America/New_York; all instants are Unix milliseconds.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import exchange_calendars as xcals

from config import Rules

NEW_YORK = ZoneInfo("America/New_York")
CALENDAR_START = datetime.date(2015, 1, 1)
CALENDAR_YEARS_AHEAD = 2
REGULAR_OPEN = datetime.time(9, 30)
REGULAR_CLOSE = datetime.time(16, 0)

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_ONE_MS = datetime.timedelta(milliseconds=1)
_HOUR_MS = 3_600_000


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


class MarketCalendar:
    """NYSE sessions by New York date, cached per date.

    The XNYS calendar is built for 2015-01-01 through two years after construction. Outside that
    range every weekday is assumed to be a regular 09:30-16:00 session (no holidays, no early
    closes) so that far-future or old dates never crash. Dates in `closed_dates` (the
    MARKET_CLOSED_DATES override, for closures the calendar does not know yet) have no session.
    """

    def __init__(self, rules: Rules, closed_dates: Iterable[datetime.date] = ()) -> None:
        self._rules = rules
        self._closed = frozenset(closed_dates)
        self._start = CALENDAR_START
        self._end = _years_after(datetime.datetime.now(NEW_YORK).date(), CALENDAR_YEARS_AHEAD)
        self._xnys = xcals.get_calendar("XNYS", start=self._start.isoformat(), end=self._end.isoformat())
        self._first = self._xnys.first_session.date()
        self._last = self._xnys.last_session.date()
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
        if not self._start <= day <= self._end:
            return self._weekday_session(day)
        if not self._first <= day <= self._last:
            return None
        if not self._xnys.is_session(day):
            return None
        open_ts, close_ts = self._xnys.session_open_close(day)
        return build_session(self._rules, day, open_ts.value // 1_000_000, close_ts.value // 1_000_000)

    def _weekday_session(self, day: datetime.date) -> Session | None:
        if day.weekday() >= 5:
            return None
        return build_session(self._rules, day, ny_ms(day, REGULAR_OPEN), ny_ms(day, REGULAR_CLOSE))


def _years_after(day: datetime.date, years: int) -> datetime.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)
