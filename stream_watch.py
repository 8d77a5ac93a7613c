"""Whether the stream itself still brings the underlying's bars, apart from REST backfills.

After a silent stream is redialled, the gap is backfilled over REST, so the engine keeps getting bars
and its stall clock (any bar) keeps resetting: a stream that never recovers would stay unnoticed,
with entries decided on bars 15 s old. This watch follows only streamed bars. When none has come for
`alert_after_ms` in the session, it says so once (a FEED_ERROR alert, a failing /health), unless the
engine has already sent a STALL for the same silence; it says so again when streamed bars return.
While the engine's STALL stands the silence is said; once a backfill lifts it, the count starts again
from there: a reconnect backfills before its first streamed bar, and an alert about the silence just
ended would be stale.

Pure: the daemon hands it its clock's time; nothing here reads a clock or sends anything.
"""

from __future__ import annotations

from dataclasses import dataclass

SILENT = "silent"
RECOVERED = "recovered"


@dataclass(slots=True)
class StreamWatch:
    """The last streamed bar of the underlying, and whether its absence has been said."""

    alert_after_ms: int
    started_ms: int
    last_bar_ms: int | None = None
    alerted: bool = False
    stall_said_ms: int = 0  # the latest time the engine's STALL stood for this silence

    def on_stream_bar(self, now_ms: int) -> str | None:
        """A streamed bar of the underlying arrived; RECOVERED when its absence had been said."""
        self.last_bar_ms = now_ms
        if self.alerted:
            self.alerted = False
            return RECOVERED
        return None

    def check(self, now_ms: int, session_open_ms: int | None, *, engine_stall_said: bool) -> str | None:
        """SILENT once, when no streamed bar has come for `alert_after_ms` of an open session."""
        if engine_stall_said:
            self.stall_said_ms = now_ms
            return None
        silent_ms = self.silent_for_ms(now_ms, session_open_ms)
        if self.alerted or silent_ms is None or silent_ms < self.alert_after_ms:
            return None
        self.alerted = True
        return SILENT

    def silent_for_ms(self, now_ms: int, session_open_ms: int | None) -> int | None:
        """How long the stream has brought no bar in this session (None outside the session)."""
        if session_open_ms is None:
            return None
        return max(0, now_ms - max(self._last_streamed_ms(session_open_ms), self.stall_said_ms))

    def _last_streamed_ms(self, session_open_ms: int) -> int:
        """The last streamed bar of this session, or the open, or the start, whichever came last."""
        return max(self.last_bar_ms or 0, session_open_ms, self.started_ms)

    def problem(self, now_ms: int, session_open_ms: int | None) -> str | None:
        """For /health while the silence has been said: what is wrong, in words."""
        if not self.alerted or session_open_ms is None:
            return None
        # From the last streamed bar itself: the engine's STALL, which restarts the alert's count, does
        # not make the stream any less silent (/health had said "for 0 s" mid-outage).
        silent_s = max(0, now_ms - self._last_streamed_ms(session_open_ms)) / 1000
        return f"no bar from the stream for {silent_s:.0f} s (only REST backfills bring bars)"
