"""Reading an HTTP `Retry-After` header (RFC 9110): a number of seconds, or an HTTP date."""

from __future__ import annotations

import datetime
import email.utils
import math


def retry_after_seconds(value: str | None, now_ms: int) -> float | None:
    """A Retry-After header in seconds, given as seconds or as an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until_date(value, now_ms)
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _seconds_until_date(value: str, now_ms: int) -> float | None:
    """Seconds from `now_ms` to an HTTP date (`Wed, 21 Oct 2026 07:28:00 GMT`), at least 0; None if unreadable."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now_ms / 1000)
