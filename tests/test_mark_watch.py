"""The held contract's stale-mark watch: when it speaks, and which of its episodes go to the phone."""

from __future__ import annotations

from mark_watch import FRESH, STALE, MarkWatch

TICKER = "O:IWM251002C00243000"
AFTER_MS = 30_000


def walk(
    watch: MarkWatch, quotes_ms: list[int], until_ms: int, ticker: str = TICKER
) -> list[tuple[int, str, bool]]:
    """Check every second up to `until_ms` with quotes setting the mark at `quotes_ms`: (time, said, pushed)."""
    said, mark_set = [], None
    for now in range(0, until_ms + 1, 1000):
        mark_set = max([q for q in quotes_ms if q <= now], default=mark_set)
        change = watch.check(now, ticker, mark_set)
        if change is not None:
            said.append((now, change, watch.pushed))
    return said


def test_a_mark_unmoved_for_the_limit_is_stale_once_and_fresh_at_the_next_quote() -> None:
    said = walk(MarkWatch(AFTER_MS), quotes_ms=[0, 5_000, 50_000], until_ms=60_000)
    assert said == [(35_000, STALE, True), (50_000, FRESH, True)]


def test_only_the_first_episode_of_a_held_contract_is_pushed_the_rest_are_said_in_the_log() -> None:
    # A contract that quotes only every 40 s with REST down: stale and fresh again and again.
    said = walk(MarkWatch(AFTER_MS), quotes_ms=list(range(0, 400_001, 40_000)), until_ms=400_000)
    assert [s[1] for s in said] == [STALE, FRESH] * 10
    assert [s[2] for s in said] == [True, True] + [False, False] * 9


def test_a_new_contract_starts_a_new_count() -> None:
    watch = MarkWatch(AFTER_MS)
    walk(watch, quotes_ms=[0, 40_000, 80_000], until_ms=90_000)
    assert watch.episodes >= 2
    assert watch.check(100_000, "O:IWM251002C00244000", None) is None and watch.episodes == 0
    assert watch.check(130_000, "O:IWM251002C00244000", None) == STALE and watch.pushed


def test_a_restart_after_the_pushed_episode_does_not_push_it_again() -> None:
    """Before the fix a restart (a deploy, a crash) forgot the episode told, and pushed the next as new."""
    watch = MarkWatch(AFTER_MS)
    watch.follow(TICKER, 0, said=FRESH)  # the phone has had this position's STALE and its FRESH
    said = walk(watch, quotes_ms=[0, 40_000], until_ms=60_000)
    assert said == [(30_000, STALE, False), (40_000, FRESH, False)]


def test_a_restart_while_the_told_episode_lasts_owes_only_its_fresh_at_the_first_quote() -> None:
    restart = 1_000_000
    watch = MarkWatch(AFTER_MS)
    watch.follow(TICKER, restart, said=STALE)  # the phone has the STALE; no quote since the restart yet
    assert watch.problem(restart + 2_000, None) is not None  # /health still names the stale mark
    quiet = [watch.check(restart + s * 1000, TICKER, None) for s in range(60)]
    assert quiet == [None] * 60  # neither a second STALE nor a FRESH without a quote
    assert watch.check(restart + 61_000, TICKER, restart + 61_000) == FRESH and watch.pushed


def test_what_was_said_for_one_contract_is_not_carried_to_another() -> None:
    watch = MarkWatch(AFTER_MS)
    watch.follow(TICKER, 0, said=FRESH)
    watch.follow("O:IWM251002C00244000", 1_000)
    assert watch.check(31_000, "O:IWM251002C00244000", None) == STALE and watch.pushed


def test_a_process_held_counts_the_marks_age_from_its_resume_as_a_restart_does() -> None:
    """SIGSTOP for 5 minutes while holding: the hold's seconds were counted as a quote outage, a priority-1
    FEED went out for a feed that never failed, a FEED RESTORED a second later, and the position's one
    push was spent (an audit's find)."""
    watch = MarkWatch(AFTER_MS)
    assert watch.check(10_000, TICKER, 9_000) is None
    watch.resumed_after_hold(310_000)  # held from 11 s to 310 s, quotes flowing before and after
    assert watch.check(310_000, TICKER, 9_000) is None
    assert watch.check(311_000, TICKER, 311_000) is None and watch.episodes == 0
    # A real outage after it is still the position's first episode, and pushed.
    assert watch.check(341_000, TICKER, 311_000) == STALE and watch.pushed


def test_a_mark_said_stale_before_a_hold_stays_stale_until_a_quote_comes() -> None:
    watch = MarkWatch(AFTER_MS)
    assert watch.check(5_000, TICKER, 5_000) is None
    assert watch.check(40_000, TICKER, 5_000) == STALE
    watch.resumed_after_hold(100_000)
    assert watch.check(100_000, TICKER, 5_000) is None, "no false FRESH: no quote came"
    assert watch.check(101_000, TICKER, 101_000) == FRESH
