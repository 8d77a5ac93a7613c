"""Whether the held contract's mark is fresh enough for the price exits to fire.

The stop, the giveback and the tightened giveback read the mark, and only a valid quote of the held
contract moves it: the stream, the contract's snapshot every POSITION_POLL_SECONDS, the chain. When
no quote has set it for `alert_after_ms` while a position is held (every quote invalid, every poll
failing or hanging), the price exits are blind; that is said once (a FEED alert, a degraded /health),
and again when a valid quote sets the mark. The time stop and the VWAP exit do not read the mark.

Only the first such episode of a held contract goes to the phone (`pushed`): a contract that quotes
only now and then, with REST down, flapped stale and fresh 14 times in 36 minutes, 28 pushes. Later
episodes are logged and shown on /health; the phone already knows this contract's marks are unsure.

Pure: the daemon hands it the engine's times; nothing here reads a clock or sends anything.
"""

from __future__ import annotations

from dataclasses import dataclass

STALE = "stale"
FRESH = "fresh"


@dataclass(slots=True)
class MarkWatch:
    """The held contract, since when it is watched, and whether its stale mark has been said."""

    alert_after_ms: int
    ticker: str | None = None
    held_since_ms: int = 0
    alerted: bool = False
    episodes: int = 0  # stale episodes of the held contract so far

    def check(self, now_ms: int, ticker: str | None, mark_set_ms: int | None) -> str | None:
        """STALE once when the held contract's mark has not moved for `alert_after_ms`; FRESH when a
        quote sets it after that. `mark_set_ms` None: no quote since a restart (the watch's start counts)."""
        self.follow(ticker, now_ms)
        age_ms = self.age_ms(now_ms, mark_set_ms)
        if age_ms is None:
            return None
        if self.alerted and age_ms < self.alert_after_ms:
            self.alerted = False
            return FRESH
        if not self.alerted and age_ms >= self.alert_after_ms:
            self.alerted = True
            self.episodes += 1
            return STALE
        return None

    def follow(self, ticker: str | None, now_ms: int, said: str | None = None) -> None:
        """Watch `ticker` from `now_ms` on (nothing when it is already watched). `said` is what the phone
        has about it from before a restart: STALE (its first episode, FRESH still owed) or FRESH (both);
        that first episode is not pushed again."""
        if ticker == self.ticker:
            return
        self.ticker, self.held_since_ms, self.alerted, self.episodes = ticker, now_ms, False, 0
        if said in (STALE, FRESH):
            self.episodes = 1
        if said == STALE:
            # Still stale until a quote sets the mark (no quote since the restart counts as none).
            self.alerted, self.held_since_ms = True, now_ms - self.alert_after_ms

    def resumed_after_hold(self, now_ms: int) -> None:
        """The process was held (SIGSTOP, a paused VM): its seconds are downtime, as a restart's, so the
        mark's age counts from `now_ms` again. Counted through the hold, a feed that never failed was said
        stale (a high-priority FEED) and restored a second later, and the position's one push was spent.
        A mark already said stale stays so until a quote sets it."""
        if self.ticker is not None and not self.alerted:
            self.held_since_ms = max(self.held_since_ms, now_ms)

    @property
    def pushed(self) -> bool:
        """Whether the episode under way (or just ended) is the held contract's first: the one to push."""
        return self.episodes == 1

    def age_ms(self, now_ms: int, mark_set_ms: int | None) -> int | None:
        """How long no quote has set the held contract's mark (None while flat)."""
        if self.ticker is None:
            return None
        return max(0, now_ms - max(mark_set_ms or 0, self.held_since_ms))

    def problem(self, now_ms: int, mark_set_ms: int | None) -> str | None:
        """For /health while the stale mark has been said: what is wrong, in words."""
        age_ms = self.age_ms(now_ms, mark_set_ms)
        if not self.alerted or age_ms is None:
            return None
        return (
            f"no valid quote of the held contract {self.ticker} for {age_ms / 1000:.0f} s: "
            "the stop and the giveback read an old mark"
        )
