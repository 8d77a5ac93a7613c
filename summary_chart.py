"""The chart attached to the close's DAILY SUMMARY alert.

`SummaryChart` is the Pushover client's `attachment_for` hook: for a SUMMARY outbox item it replays
the day's tape (`DATA_DIR/tapes/<date>.jsonl.gz`, the date taken from the dedupe key
`SUMMARY:<date>`) through the backtest's day runner with the live rules, from an empty in-memory
journal, and draws the backtest's day chart small: the underlying with its rolling VWAP and the
entries and exits, a panel per trade beneath with its option mark and the live rules' levels. Every
other alert gets no image.

It runs on the notifier thread after the close, so a couple of seconds of replay and drawing cost
nothing that matters. The replay and the drawing happen in a child process (this file run as a
script): in the daemon they had taken 25-50 MB a session that were never given back (its RSS grew
about 29 MB a day), and a child returns all of it; a child that fails or hangs costs the image only.
Without a tape (recording off, another machine's day) the summary goes out as text alone, and so it
does when the child fails. The daemon never imports matplotlib or the backtest code.
"""

from __future__ import annotations

import datetime
import pickle
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
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
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A day's replay and drawing take a few seconds; a child past this is stuck, and the summary goes as text.
CHART_TIMEOUT_S = 120.0

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

    def __init__(
        self,
        data_dir: Path,
        rules: Rules,
        closed_dates: Iterable[datetime.date] = (),
        *,
        child: Sequence[str] = (sys.executable, str(Path(__file__).resolve())),
    ) -> None:
        """`child`: the command that draws (this file as a script; tests give one that fails)."""
        self._child = tuple(child)
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
        """Replay `day`'s tape and draw its chart in a child process; None (and a warning) when there
        is no tape or the child fails."""
        tape = tape_path(self._data_dir, day)
        if not tape.is_file():
            log.warning("summary_chart_skipped", date=day.isoformat(), reason="no tape", tape=str(tape))
            return None
        started = time.monotonic()
        request = pickle.dumps((str(tape), self._rules, self._closed_dates))
        try:
            child = subprocess.run(
                self._child,
                input=request,
                capture_output=True,
                timeout=CHART_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("summary_chart_failed", date=day.isoformat(), error=type(exc).__name__)
            return None
        if child.returncode != 0 or not child.stdout.startswith(PNG_SIGNATURE):
            error = child.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no PNG"]
            log.warning(
                "summary_chart_failed", date=day.isoformat(), status=child.returncode, error=error[0][:300]
            )
            return None
        elapsed = round(time.monotonic() - started, 2)
        log.info("summary_chart", date=day.isoformat(), bytes=len(child.stdout), seconds=elapsed)
        return child.stdout


def summary_attachment(settings: Settings) -> SummaryChart | None:
    """The daemon's hook for `PushoverClient(attachment_for=...)`; None when DAILY_SUMMARY=0."""
    if not settings.rules.daily_summary:
        return None
    return SummaryChart(settings.data_dir, settings.rules, settings.market_closed_dates)


def draw(tape: Path, rules: Rules, closed_dates: Iterable[datetime.date]) -> bytes:
    """The day's chart as PNG bytes: `tape` replayed with `rules` from an empty in-memory journal."""
    from backtest import run_day  # the backtest's replay and series recorder; heavy imports
    from market_calendar import MarketCalendar
    from pnl_tracker import Journal
    from report_charts import day_chart_png

    journal = Journal(Path(":memory:"))
    try:
        result = run_day(tape, rules, MarketCalendar(rules, closed_dates), journal)
    finally:
        journal.close()
    return day_chart_png(result, SUMMARY_PX, SUMMARY_DPI, rules.underlying, rules=rules)


# Where Linux reads how willing a process is to be killed when memory runs out (1000: first in line).
OOM_SCORE_ADJ = Path("/proc/self/oom_score_adj")


def volunteer_for_the_oom_killer(adj_file: Path = OOM_SCORE_ADJ) -> bool:
    """Make this process the first the kernel kills when memory runs out; whether that could be said.

    The child decodes the whole day's tape: about 4 bytes of memory per byte of tape, 360 MB for a day of
    31-contract chains beside a daemon of about 60 MB on a 512 MB worker. Should the two not fit, the
    chart is what must go (the summary then goes as text), never the daemon that follows the market.
    """
    try:
        adj_file.write_text("1000")
    except OSError:
        return False  # not Linux, or a sandbox without /proc: the chart is still drawn
    return True


def main() -> int:
    """The child's side: (tape, rules, closed dates) pickled on stdin, the PNG on stdout."""
    volunteer_for_the_oom_killer()
    png_out = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed or logged on the way must not mix with the PNG
    tape, rules, closed_dates = pickle.loads(sys.stdin.buffer.read())
    png_out.write(draw(Path(tape), rules, closed_dates))
    png_out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
