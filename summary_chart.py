"""The chart attached to the close's DAILY SUMMARY alert.

`SummaryChart` is the Pushover client's `attachment_for` hook: for a SUMMARY outbox item it replays
the day's tape (`DATA_DIR/tapes/<date>.jsonl.gz`, the date taken from the dedupe key
`SUMMARY:<date>`) through the backtest's day runner with the live rules, from an empty in-memory
journal, and draws the backtest's day chart small: the underlying with its rolling VWAP and the
entries and exits, a panel per trade beneath with its option mark and the live rules' levels. Every
other alert gets no image.

It runs on the notifier thread after the close, so a couple of seconds of replay and drawing cost
nothing that matters. Without a tape (recording off, another machine's day) the summary goes out as
text alone; an error is the client's to catch, which then also sends the text alone. matplotlib
and the backtest code are imported only when a chart is drawn, so the daemon starts without them.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from config import Rules, Settings
from tape import tape_path

if TYPE_CHECKING:
    from pnl_tracker import OutboxItem

SUMMARY_KIND = "SUMMARY"
# Small on a phone and on the wire: 900 x 500 px at 90 dpi comes out well under 100 kB.
SUMMARY_PX = (900, 500)
SUMMARY_DPI = 90

log = structlog.get_logger("summary_chart")


def summary_date(dedupe_key: str) -> datetime.date | None:
    """The session date of a `SUMMARY:<YYYY-MM-DD>` key, or None for any other key."""
    kind, _, rest = dedupe_key.partition(":")
    if kind != SUMMARY_KIND:
        return None
    try:
        return datetime.date.fromisoformat(rest)
    except ValueError:
        return None


class SummaryChart:
    """`attachment_for` hook: the day's chart as PNG bytes for a SUMMARY item, None for anything else.

    The last chart is kept, so a retried send (Pushover 5xx) does not replay the day again.
    """

    def __init__(self, data_dir: Path, rules: Rules, closed_dates: Iterable[datetime.date] = ()) -> None:
        self._data_dir = Path(data_dir)
        self._rules = rules
        self._closed_dates = tuple(closed_dates)
        self._last: tuple[str, bytes | None] | None = None

    def __call__(self, item: OutboxItem) -> bytes | None:
        """PNG bytes of the day's chart for a SUMMARY item; None for other kinds or without a tape."""
        day = summary_date(item.dedupe_key) if item.kind == SUMMARY_KIND else None
        if day is None:
            return None
        if self._last is not None and self._last[0] == item.dedupe_key:
            return self._last[1]
        png = self.render(day)
        self._last = (item.dedupe_key, png)
        return png

    def render(self, day: datetime.date) -> bytes | None:
        """Replay `day`'s tape and draw its chart; None (and a warning) when there is no tape."""
        tape = tape_path(self._data_dir, day)
        if not tape.is_file():
            log.warning("summary_chart_skipped", date=day.isoformat(), reason="no tape", tape=str(tape))
            return None
        started = time.monotonic()
        from backtest import run_day  # the backtest's replay and series recorder; heavy imports
        from market_calendar import MarketCalendar
        from pnl_tracker import Journal
        from report_charts import day_chart_png

        journal = Journal(Path(":memory:"))
        try:
            result = run_day(tape, self._rules, MarketCalendar(self._rules, self._closed_dates), journal)
        finally:
            journal.close()
        png = day_chart_png(result, SUMMARY_PX, SUMMARY_DPI, self._rules.underlying, rules=self._rules)
        elapsed = round(time.monotonic() - started, 2)
        log.info(
            "summary_chart", date=day.isoformat(), bytes=len(png), trades=len(result.trades), seconds=elapsed
        )
        return png


def summary_attachment(settings: Settings) -> SummaryChart | None:
    """The daemon's hook for `PushoverClient(attachment_for=...)`; None when DAILY_SUMMARY=0."""
    if not settings.rules.daily_summary:
        return None
    return SummaryChart(settings.data_dir, settings.rules, settings.market_closed_dates)
