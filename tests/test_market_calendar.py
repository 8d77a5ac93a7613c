import datetime
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import market_calendar
from config import Rules
from market_calendar import (
    CALENDAR_START,
    NEW_YORK,
    CalendarCache,
    MarketCalendar,
    Session,
    cache_key,
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


def test_years_beyond_the_built_range_are_built_when_asked_for(calendar: MarketCalendar) -> None:
    """The range ends two years after today; past it every weekday used to be a full session (an audit
    found Christmas 2028 and an early close in 2029 traded as regular days)."""
    assert calendar.session(D(2028, 12, 25)) is None  # Christmas, a Monday
    assert calendar.session(D(2029, 1, 1)) is None
    late = calendar.session(D(2029, 11, 23))  # the day after Thanksgiving
    assert late is not None and late.early_close and late.close_ms == utc_ms(2029, 11, 23, 18, 0)
    assert calendar.session(D(2010, 1, 1)) is None and calendar.session(D(2010, 1, 4)) is not None


def test_a_year_exchange_calendars_cannot_build_falls_back_to_weekdays(calendar: MarketCalendar) -> None:
    # 1850 is before the XNYS calendar's first session: plain weekdays, never a crash.
    s = calendar.session(D(1850, 1, 4))  # a Friday
    assert s is not None and s.early_close is False
    assert calendar.session(D(1850, 1, 5)) is None
    assert calendar.next_session(D(1850, 1, 4)).date == D(1850, 1, 7)


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


# --- the per-year cache of session tables -------------------------------------------------------------

NEXT_YEAR = datetime.datetime.now(NEW_YORK).year + 1
CACHED_YEAR = 2025


def every_day(first: datetime.date, last: datetime.date) -> Iterator[datetime.date]:
    day = first
    while day <= last:
        yield day
        day += datetime.timedelta(days=1)


def all_sessions(calendar: MarketCalendar) -> dict[datetime.date, Session | None]:
    """Every date of 2015..next year (weekends, holidays and early closes included) and its session."""
    return {day: calendar.session(day) for day in every_day(CALENDAR_START, D(NEXT_YEAR, 12, 31))}


def direct_from_exchange_calendars(rules: Rules) -> dict[datetime.date, Session | None]:
    """What the calendar gave before the cache existed: one exchange_calendars XNYS over its whole range."""
    import exchange_calendars as xcals

    end = market_calendar._years_after(datetime.datetime.now(NEW_YORK).date(), 2)
    xnys = xcals.get_calendar("XNYS", start=CALENDAR_START.isoformat(), end=end.isoformat())
    first, last = xnys.first_session.date(), xnys.last_session.date()
    found: dict[datetime.date, Session | None] = {}
    for day in every_day(CALENDAR_START, D(NEXT_YEAR, 12, 31)):
        if not first <= day <= last or not xnys.is_session(day):
            found[day] = None
            continue
        open_ts, close_ts = xnys.session_open_close(day)
        found[day] = market_calendar.build_session(
            rules, day, open_ts.value // 1_000_000, close_ts.value // 1_000_000
        )
    return found


def no_build(*_args: Any) -> Any:
    raise AssertionError("built from exchange_calendars although the cache should have answered")


@pytest.fixture(scope="module")
def uncached() -> dict[datetime.date, Session | None]:
    return all_sessions(MarketCalendar(Rules(), seed_dir=None))


@pytest.fixture
def warm_cache(tmp_path: Path) -> Path:
    """A cache folder filled by a first calendar, as the first command in a DATA_DIR leaves it."""
    folder = tmp_path / "data" / "calendar"
    folder.parent.mkdir()
    MarketCalendar(Rules(), cache_dir=folder, seed_dir=None).session(D(CACHED_YEAR, 10, 2))
    return folder


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pandas notices about exchange_calendars internals
def test_cache_gives_exactly_the_sessions_of_exchange_calendars(tmp_path, monkeypatch, uncached) -> None:
    rules = Rules()
    folder = tmp_path / "data" / "calendar"
    folder.parent.mkdir()
    cold = all_sessions(MarketCalendar(rules, cache_dir=folder, seed_dir=None))
    years = range(CALENDAR_START.year, NEXT_YEAR + 1)
    assert {p.name for p in folder.glob("*.json")} >= {f"xnys-{y}.json" for y in years}
    monkeypatch.setattr(market_calendar, "build_year_tables", no_build)
    warm = all_sessions(MarketCalendar(rules, cache_dir=folder, seed_dir=None))
    monkeypatch.undo()
    assert warm == cold == uncached == direct_from_exchange_calendars(rules)
    for year in years:  # the range holds what matters: early closes and weekday holidays every year
        sessions = [s for day, s in warm.items() if day.year == year]
        assert any(s is not None and s.early_close for s in sessions), year
        holidays = [d for d, s in warm.items() if d.year == year and d.weekday() < 5 and s is None]
        assert len(holidays) >= 8, year
    assert warm[D(2025, 11, 28)].early_close and warm[D(2025, 12, 25)] is None and warm[D(2025, 1, 9)] is None


def test_cache_read_keeps_custom_cut_offs(warm_cache, monkeypatch) -> None:
    # The cache holds opens and closes only; the cut-offs come from each calendar's own rules.
    monkeypatch.setattr(market_calendar, "build_year_tables", no_build)
    rules = Rules(no_entry_before=T(10, 0), no_entry_after=T(15, 0), hard_time_stop=T(15, 45))
    s = MarketCalendar(rules, cache_dir=warm_cache, seed_dir=None).session(D(2025, 11, 28))
    assert s is not None and s.time_stop_ms == utc_ms(2025, 11, 28, 17, 45)


def rewrite(path: Path, edit: Callable[[dict], Any]) -> None:
    body = json.loads(path.read_text())
    path.write_text(json.dumps(edit(body)))


def swap_first_two(body: dict) -> dict:
    body["sessions"][:2] = body["sessions"][1::-1]
    return body


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "not json": lambda p: p.write_bytes(b"\x00\x01 not json"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "empty file": lambda p: p.write_bytes(b""),
    "a list": lambda p: p.write_text("[]"),
    "deeply nested": lambda p: p.write_text("[" * 100_000),
    "other key": lambda p: rewrite(p, lambda b: {**b, "key": "0/0.0"}),
    "other year": lambda p: rewrite(p, lambda b: {**b, "year": CACHED_YEAR + 1}),
    "no sessions": lambda p: rewrite(p, lambda b: {**b, "sessions": []}),
    "float times": lambda p: rewrite(p, lambda b: {**b, "sessions": [[d, o + 0.5, c] for d, o, c in b["sessions"]]}),
    "bool time": lambda p: rewrite(p, lambda b: {**b, "sessions": [[b["sessions"][0][0], True, 2]]}),
    "bad date": lambda p: rewrite(p, lambda b: {**b, "sessions": [["2025-13-01", 1, 2]]}),
    "open after close": lambda p: rewrite(p, lambda b: {**b, "sessions": [[d, c, o] for d, o, c in b["sessions"]]}),
    "open on another day": lambda p: rewrite(
        p, lambda b: {**b, "sessions": [[d, o + 86_400_000, c + 86_400_000] for d, o, c in b["sessions"]]}
    ),
    "out of order": lambda p: rewrite(p, swap_first_two),
    "short entry": lambda p: rewrite(p, lambda b: {**b, "sessions": [e[:2] for e in b["sessions"]]}),
}  # fmt: skip


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_cache_is_rebuilt_and_rewritten(warm_cache, uncached, corruption) -> None:
    path = warm_cache / f"xnys-{CACHED_YEAR}.json"
    CORRUPTIONS[corruption](path)
    key = cache_key()
    assert key is not None and CalendarCache(warm_cache, key).read(CACHED_YEAR) is None
    calendar = MarketCalendar(Rules(), cache_dir=warm_cache, seed_dir=None)
    year = {d: s for d, s in uncached.items() if d.year == CACHED_YEAR}
    assert {d: calendar.session(d) for d in year} == year
    assert CalendarCache(warm_cache, key).read(CACHED_YEAR) is not None  # rewritten whole


def test_cache_of_another_exchange_calendars_version_is_rebuilt(warm_cache, monkeypatch, uncached) -> None:
    monkeypatch.setattr(market_calendar, "cache_key", lambda: "1/999.0")
    calls = []
    real_build = market_calendar.build_year_tables
    monkeypatch.setattr(market_calendar, "build_year_tables", lambda *a: calls.append(a) or real_build(*a))
    assert (
        MarketCalendar(Rules(), cache_dir=warm_cache, seed_dir=None).session(D(2025, 11, 28))
        == uncached[D(2025, 11, 28)]
    )
    assert len(calls) == 1
    assert json.loads((warm_cache / "xnys-2025.json").read_text())["key"] == "1/999.0"


def test_a_directory_where_the_file_should_be_is_only_a_miss(tmp_path, uncached) -> None:
    folder = tmp_path / "calendar"
    (folder / f"xnys-{CACHED_YEAR}.json").mkdir(parents=True)
    calendar = MarketCalendar(Rules(), cache_dir=folder, seed_dir=None)
    assert calendar.session(D(2025, 11, 28)) == uncached[D(2025, 11, 28)]
    assert calendar.session(D(2025, 12, 25)) is None


def test_cache_in_a_missing_data_dir_creates_nothing(tmp_path, uncached) -> None:
    folder = tmp_path / "no-such-data-dir" / "calendar"
    assert (
        MarketCalendar(Rules(), cache_dir=folder, seed_dir=None).session(D(2025, 11, 28))
        == uncached[D(2025, 11, 28)]
    )
    assert not folder.parent.exists()


def test_cache_under_a_file_never_raises(tmp_path, uncached) -> None:
    (tmp_path / "data").write_text("a file, not a directory")
    calendar = MarketCalendar(Rules(), cache_dir=tmp_path / "data" / "calendar", seed_dir=None)
    assert calendar.session(D(2025, 11, 28)) == uncached[D(2025, 11, 28)]


@pytest.mark.parametrize("failing", ["mkstemp", "replace"])
def test_read_only_or_full_disk_never_raises_and_leaves_no_temp_files(
    tmp_path, monkeypatch, uncached, failing
) -> None:
    def read_only(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    def disk_full(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "mkstemp":
        monkeypatch.setattr(market_calendar.tempfile, "mkstemp", read_only)
    else:
        monkeypatch.setattr(market_calendar.os, "replace", disk_full)
    folder = tmp_path / "calendar"
    calendar = MarketCalendar(Rules(), cache_dir=folder, seed_dir=None)
    assert calendar.session(D(2025, 11, 28)) == uncached[D(2025, 11, 28)]
    assert not folder.exists() or list(folder.iterdir()) == []


def test_without_a_readable_version_there_is_no_cache(tmp_path, monkeypatch, uncached) -> None:
    import importlib.metadata

    def missing(_name: str) -> str:
        raise importlib.metadata.PackageNotFoundError("exchange_calendars")

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cache_key() is None
    folder = tmp_path / "calendar"
    assert (
        MarketCalendar(Rules(), cache_dir=folder, seed_dir=None).session(D(2025, 11, 28))
        == uncached[D(2025, 11, 28)]
    )
    assert not folder.exists()


def test_cache_write_is_atomic_and_readable(tmp_path) -> None:
    key = "1/test"
    cache = CalendarCache(tmp_path, key)
    table = {D(2025, 10, 2): market_calendar.Hours(utc_ms(2025, 10, 2, 13, 30), utc_ms(2025, 10, 2, 20, 0))}
    cache.write(2025, table)
    assert cache.read(2025) == table
    assert CalendarCache(tmp_path, "1/other").read(2025) is None
    assert [p.name for p in tmp_path.iterdir()] == ["xnys-2025.json"]
    assert os.stat(tmp_path / "xnys-2025.json").st_size < 200


# --- the seed shipped with the code (calendar_seed/) ----------------------------------------------------


def test_the_shipped_seed_holds_exactly_what_exchange_calendars_builds() -> None:
    key = cache_key()
    files = sorted(market_calendar.SEED_DIR.glob("xnys-*.json"))
    years = [int(p.stem.removeprefix("xnys-")) for p in files]
    assert years[0] == CALENDAR_START.year and years == list(range(years[0], years[0] + len(files)))
    built = market_calendar.build_year_tables(years[0], years[-1])
    for path, year in zip(files, years, strict=True):
        written_under = json.loads(path.read_text())["key"]
        seeded = CalendarCache(market_calendar.SEED_DIR, written_under).read(year)
        assert seeded == built[year], year  # what tools/calendar_seed.py wrote, under the version it names
        assert (CalendarCache(market_calendar.SEED_DIR, key).read(year) is not None) == (written_under == key)


def test_a_seed_of_the_installed_version_answers_without_a_build(tmp_path, monkeypatch, uncached) -> None:
    key = cache_key()
    assert key is not None
    years = range(CALENDAR_START.year, NEXT_YEAR + 1)
    tables = market_calendar.build_year_tables(years[0], years[-1])
    for year in years:
        CalendarCache(tmp_path, key).write(year, tables[year])
    monkeypatch.setattr(market_calendar, "build_year_tables", no_build)
    assert all_sessions(MarketCalendar(Rules(), seed_dir=tmp_path)) == uncached
    data = tmp_path / "data"
    data.mkdir()
    assert MarketCalendar(Rules(), cache_dir=data / "calendar", seed_dir=tmp_path).session(D(2025, 11, 28))
    assert CalendarCache(data / "calendar", key).read(2025) == tables[2025]  # copied into the cache


def test_a_seed_of_another_version_is_only_a_miss(tmp_path, monkeypatch, uncached) -> None:
    table = market_calendar.build_year_tables(CALENDAR_START.year, CACHED_YEAR)[CACHED_YEAR]
    CalendarCache(tmp_path, "1/0.0-not-installed").write(CACHED_YEAR, table)
    calls = []
    real_build = market_calendar.build_year_tables
    monkeypatch.setattr(market_calendar, "build_year_tables", lambda *a: calls.append(a) or real_build(*a))
    day = D(CACHED_YEAR, 11, 28)
    assert MarketCalendar(Rules(), seed_dir=tmp_path).session(day) == uncached[day]
    assert len(calls) == 1


def test_a_named_pipe_in_the_cache_is_a_miss_not_a_start_that_hangs(warm_cache, uncached) -> None:
    """Reading a FIFO waits for a writer for ever: the daemon's start hung in its calendar, unsaid."""
    import threading

    path = warm_cache / f"xnys-{CACHED_YEAR}.json"
    path.unlink()
    os.mkfifo(path)
    built: list[object] = []
    reader = threading.Thread(
        target=lambda: built.append(MarketCalendar(Rules(), cache_dir=warm_cache, seed_dir=None).session(
            D(2025, 11, 28))), daemon=True)  # fmt: skip
    reader.start()
    reader.join(30)
    assert built == [uncached[D(2025, 11, 28)]], "the calendar read blocked on the named pipe"
    assert path.is_file(), "the cache file is written again in its place"
