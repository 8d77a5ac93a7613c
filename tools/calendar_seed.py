"""Write the calendar seed shipped with the code: one `xnys-YYYY.json` per year into `calendar_seed/`.

Run from the repo root after upgrading exchange_calendars (requirements.lock) or at a new year:
    python3 tools/calendar_seed.py [--last-year YYYY]
The files carry the installed exchange_calendars version; `MarketCalendar` reads them only under
that same version, so an outdated seed costs a build, never a wrong session.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from market_calendar import (  # noqa: E402 - needs the repo root on sys.path
    CALENDAR_START,
    CALENDAR_YEARS_AHEAD,
    SEED_DIR,
    CalendarCache,
    build_year_tables,
    cache_key,
)


def main() -> None:
    """Build every year from CALENDAR_START through `--last-year` and write each one's file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_last = datetime.date.today().year + CALENDAR_YEARS_AHEAD
    parser.add_argument("--last-year", type=int, default=default_last, help="last year written")
    args = parser.parse_args()
    key = cache_key()
    if key is None:
        raise SystemExit("exchange_calendars is not installed: nothing to seed from")
    SEED_DIR.mkdir(exist_ok=True)
    for stale in SEED_DIR.glob("xnys-*.json"):
        stale.unlink()
    seed = CalendarCache(SEED_DIR, key)
    tables = build_year_tables(CALENDAR_START.year, args.last_year)
    for year, table in tables.items():
        seed.write(year, table)
    print(f"wrote {len(tables)} years ({CALENDAR_START.year}-{args.last_year}) under key {key} to {SEED_DIR}")


if __name__ == "__main__":
    main()
