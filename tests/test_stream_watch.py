"""The stream watch: silence of the stream itself (apart from REST backfills) said once, and its end."""

from __future__ import annotations

from stream_watch import RECOVERED, SILENT, StreamWatch

OPEN = 1_759_411_800_000  # a session's open
AFTER = 32_000


def test_silence_in_the_session_is_said_once_and_the_return_once():
    watch = StreamWatch(AFTER, started_ms=OPEN - 60_000)
    assert watch.on_stream_bar(OPEN + 1000) is None
    assert watch.check(OPEN + 1000 + AFTER - 1, OPEN, engine_stall_said=False) is None
    assert watch.check(OPEN + 1000 + AFTER, OPEN, engine_stall_said=False) == SILENT
    assert watch.check(OPEN + 1000 + 5 * AFTER, OPEN, engine_stall_said=False) is None
    assert watch.problem(OPEN + 1000 + AFTER, OPEN) == (
        "no bar from the stream for 32 s (only REST backfills bring bars)"
    )
    assert watch.on_stream_bar(OPEN + 200_000) == RECOVERED
    assert watch.on_stream_bar(OPEN + 201_000) is None
    assert watch.problem(OPEN + 201_000, OPEN) is None


def test_nothing_is_said_outside_the_session_or_while_the_engine_said_stall():
    watch = StreamWatch(AFTER, started_ms=OPEN - 60_000)
    assert watch.check(OPEN - 1, None, engine_stall_said=False) is None
    assert watch.check(OPEN + AFTER - 1, OPEN, engine_stall_said=False) is None, "counted from the open"
    assert watch.check(OPEN + AFTER, OPEN, engine_stall_said=True) is None
    assert watch.check(OPEN + AFTER + 5000, OPEN, engine_stall_said=False) is None, (
        "counted from the lifted STALL"
    )
    assert watch.check(OPEN + 2 * AFTER, OPEN, engine_stall_said=False) == SILENT, (
        "backfills only, ever since"
    )


def test_a_reconnect_that_backfills_before_its_first_streamed_bar_says_nothing_stale():
    """An audit saw STALL, then at the reconnect RECOVERED, FEED ERROR "no bar for 54 s" and FEED
    RECOVERED in one second: the backfill lifted the STALL before the first streamed bar came."""
    watch = StreamWatch(AFTER, started_ms=OPEN - 60_000)
    watch.on_stream_bar(OPEN + 1000)
    for t in range(OPEN + 31_000, OPEN + 53_000, 1000):  # the engine's STALL stands
        assert watch.check(t, OPEN, engine_stall_said=True) is None
    assert watch.check(OPEN + 53_500, OPEN, engine_stall_said=False) is None  # backfilled: STALL lifted
    assert watch.on_stream_bar(OPEN + 54_000) is None  # the stream is back: nothing to recover from


def test_a_daemon_started_mid_session_counts_from_its_start():
    started = OPEN + 3_600_000
    watch = StreamWatch(AFTER, started_ms=started)
    assert watch.check(started + AFTER - 1, OPEN, engine_stall_said=False) is None
    assert watch.check(started + AFTER, OPEN, engine_stall_said=False) == SILENT


def test_health_counts_the_silence_from_the_last_streamed_bar_not_from_a_lifted_stall():
    """/health said "no bar from the stream for 0 s" in the middle of a minute's outage: the count
    restarted where the engine's STALL (which the alert's count defers to) was last standing."""
    watch = StreamWatch(AFTER, started_ms=OPEN - 60_000)
    watch.on_stream_bar(OPEN + 1000)
    assert watch.check(OPEN + 40_000, OPEN, engine_stall_said=True) is None
    assert watch.check(OPEN + 40_000 + AFTER, OPEN, engine_stall_said=False) == SILENT
    assert watch.problem(OPEN + 40_000 + AFTER, OPEN) == (
        "no bar from the stream for 71 s (only REST backfills bring bars)"
    )
