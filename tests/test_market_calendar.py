import datetime
from zoneinfo import ZoneInfo

import pytest

from config import Rules
from market_calendar import (
    MarketCalendar,
    Session,
    minute_of_day,
    ny_date,
    ny_datetime,
    ny_ms,
)

D = datetime.date
T = datetime.time
UTC = datetime.UTC


def utc_ms(year: int, month: int, day: int, hour: int, minute: int = 0) -> int:
    """Unix ms of a UTC wall-clock instant, computed independently of the module under test."""
    return int(datetime.datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()) * 1000


@pytest.fixture(scope="module")
def calendar() -> MarketCalendar:
    return MarketCalendar(Rules())


def test_regular_day_2025_10_02(calendar: MarketCalendar) -> None:
    # EDT (UTC-4): 09:30 ET = 13:30 UTC.
    assert calendar.session(D(2025, 10, 2)) == Session(
        date=D(2025, 10, 2),
        open_ms=utc_ms(2025, 10, 2, 13, 30),
        close_ms=utc_ms(2025, 10, 2, 20, 0),
        early_close=False,
        entry_start_ms=utc_ms(2025, 10, 2, 13, 35),
        entry_end_ms=utc_ms(2025, 10, 2, 19, 30),
        time_stop_ms=utc_ms(2025, 10, 2, 19, 55),
    )
    assert utc_ms(2025, 10, 2, 13, 30) == 1759411800000


def test_early_close_2025_11_28_moves_cut_offs(calendar: MarketCalendar) -> None:
    # EST (UTC-5): 13:00 ET = 18:00 UTC.
    session = calendar.session(D(2025, 11, 28))
    assert session is not None
    assert session.early_close is True
    assert session.open_ms == utc_ms(2025, 11, 28, 14, 30)
    assert session.close_ms == utc_ms(2025, 11, 28, 18, 0)
    assert session.entry_start_ms == utc_ms(2025, 11, 28, 14, 35)
    assert session.entry_end_ms == utc_ms(2025, 11, 28, 17, 30)
    assert session.time_stop_ms == utc_ms(2025, 11, 28, 17, 55)


def test_christmas_eve_2025_is_early_christmas_is_closed(calendar: MarketCalendar) -> None:
    eve = calendar.session(D(2025, 12, 24))
    assert eve is not None and eve.close_ms == utc_ms(2025, 12, 24, 18, 0)
    assert calendar.session(D(2025, 12, 25)) is None


def test_weekend_has_no_session(calendar: MarketCalendar) -> None:
    assert calendar.session(D(2025, 10, 4)) is None
    assert calendar.session(D(2025, 10, 5)) is None


def test_other_known_holidays(calendar: MarketCalendar) -> None:
    for day in (D(2026, 4, 3), D(2026, 6, 19), D(2026, 7, 3), D(2025, 1, 9)):
        assert calendar.session(day) is None, day


def test_closed_dates_override() -> None:
    cal = MarketCalendar(Rules(), closed_dates=[D(2025, 10, 2)])
    assert cal.session(D(2025, 10, 2)) is None
    assert cal.session(D(2025, 10, 3)) is not None
    assert cal.session_at(utc_ms(2025, 10, 2, 15, 0)) is None
    assert cal.next_session(D(2025, 10, 1)).date == D(2025, 10, 3)


def test_dst_boundaries_shift_open_by_one_hour(calendar: MarketCalendar) -> None:
    march_fri = calendar.session(D(2025, 3, 7))
    march_mon = calendar.session(D(2025, 3, 10))
    oct_fri = calendar.session(D(2025, 10, 31))
    nov_mon = calendar.session(D(2025, 11, 3))
    assert march_fri and march_mon and oct_fri and nov_mon
    assert march_fri.open_ms == utc_ms(2025, 3, 7, 14, 30)
    assert march_mon.open_ms == utc_ms(2025, 3, 10, 13, 30)
    assert oct_fri.open_ms == utc_ms(2025, 10, 31, 13, 30)
    assert nov_mon.open_ms == utc_ms(2025, 11, 3, 14, 30)
    # Three days apart on the calendar, minus/plus the hour gained or lost.
    three_days = 3 * 86_400_000
    assert march_mon.open_ms - march_fri.open_ms == three_days - 3_600_000
    assert nov_mon.open_ms - oct_fri.open_ms == three_days + 3_600_000


def test_next_session_skips_holiday_and_weekend(calendar: MarketCalendar) -> None:
    assert calendar.next_session(D(2025, 12, 24)).date == D(2025, 12, 26)
    assert calendar.next_session(D(2025, 11, 26)).date == D(2025, 11, 28)
    assert calendar.next_session(D(2025, 10, 3)).date == D(2025, 10, 6)
    # Strictly after: a session day itself is not returned.
    assert calendar.next_session(D(2025, 10, 2)).date == D(2025, 10, 3)


def test_session_at_late_evening_uses_new_york_date(calendar: MarketCalendar) -> None:
    # 2025-10-02 23:30 EDT is 2025-10-03 03:30 UTC.
    ms = utc_ms(2025, 10, 3, 3, 30)
    session = calendar.session_at(ms)
    assert session is not None and session.date == D(2025, 10, 2)
    assert session.is_open(ms) is False
    # Friday 23:30 ET is Saturday UTC; a Saturday 00:30 ET instant has no session.
    assert calendar.session_at(utc_ms(2025, 10, 4, 3, 30)).date == D(2025, 10, 3)
    assert calendar.session_at(utc_ms(2025, 10, 4, 4, 30)) is None


def test_session_at_repeated_same_hour_then_next_hour(calendar: MarketCalendar) -> None:
    # 03:59:59.999 UTC is still 23:59 ET on Oct 2; 04:00:00.000 UTC is midnight Oct 3.
    assert calendar.session_at(utc_ms(2025, 10, 3, 4, 0) - 1).date == D(2025, 10, 2)
    assert calendar.session_at(utc_ms(2025, 10, 3, 3, 0)).date == D(2025, 10, 2)
    assert calendar.session_at(utc_ms(2025, 10, 3, 4, 0)).date == D(2025, 10, 3)


def test_is_open_and_entry_allowed_edges(calendar: MarketCalendar) -> None:
    s = calendar.session(D(2025, 10, 2))
    assert s is not None
    assert (s.is_open(s.open_ms - 1), s.is_open(s.open_ms), s.is_open(s.close_ms - 1)) == (False, True, True)
    assert s.is_open(s.close_ms) is False
    assert s.entry_allowed(s.entry_start_ms - 1) is False
    assert s.entry_allowed(s.entry_start_ms) is True
    assert s.entry_allowed(s.entry_end_ms - 1) is True
    assert s.entry_allowed(s.entry_end_ms) is False


def test_custom_cut_offs_on_early_close() -> None:
    rules = Rules(no_entry_before=T(10, 0), no_entry_after=T(15, 0), hard_time_stop=T(15, 45))
    s = MarketCalendar(rules).session(D(2025, 11, 28))
    assert s is not None
    assert s.entry_start_ms == utc_ms(2025, 11, 28, 15, 0)
    assert s.entry_end_ms == utc_ms(2025, 11, 28, 17, 0)
    assert s.time_stop_ms == utc_ms(2025, 11, 28, 17, 45)


def test_cut_offs_outside_session_are_clamped() -> None:
    rules = Rules(no_entry_before=T(9, 0), no_entry_after=T(16, 30), hard_time_stop=T(16, 10))
    s = MarketCalendar(rules).session(D(2025, 10, 2))
    assert s is not None
    assert (s.entry_start_ms, s.entry_end_ms, s.time_stop_ms) == (s.open_ms, s.close_ms, s.close_ms)


def test_dates_beyond_calendar_fall_back_to_weekdays(calendar: MarketCalendar) -> None:
    # 2100-12-24 is a Friday; the fallback knows no holidays or early closes.
    s = calendar.session(D(2100, 12, 24))
    assert s is not None and s.early_close is False
    assert s.open_ms == utc_ms(2100, 12, 24, 14, 30)
    assert s.close_ms == utc_ms(2100, 12, 24, 21, 0)
    assert calendar.session(D(2100, 12, 25)) is None
    assert calendar.next_session(D(2100, 12, 24)).date == D(2100, 12, 27)
    assert calendar.session(D(2010, 1, 4)).open_ms == utc_ms(2010, 1, 4, 14, 30)


def test_first_day_of_calendar_range_is_a_holiday(calendar: MarketCalendar) -> None:
    assert calendar.session(D(2015, 1, 1)) is None
    assert calendar.session(D(2015, 1, 2)) is not None


def test_time_helpers() -> None:
    ms = utc_ms(2025, 10, 3, 3, 30)
    assert ny_datetime(ms) == datetime.datetime(2025, 10, 2, 23, 30, tzinfo=ZoneInfo("America/New_York"))
    assert ny_datetime(ms).utcoffset() == datetime.timedelta(hours=-4)
    assert ny_date(ms) == D(2025, 10, 2)
    assert minute_of_day(ms) == 23 * 60 + 30
    assert minute_of_day(utc_ms(2025, 11, 28, 14, 31) + 59_999) == 9 * 60 + 31
    assert ny_ms(D(2025, 10, 2), T(9, 30)) == 1759411800000
    assert ny_ms(D(2025, 11, 28), T(13, 0, 0, 1000)) == utc_ms(2025, 11, 28, 18, 0) + 1
