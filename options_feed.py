"""The held contract's quotes from the options cluster, and whether the marks can count on them.

From the BUY to the SELL the daemon subscribes `Q.<held contract>` on its own connection to the options
cluster (`POLYGON_OPTIONS_WS_URL`); the frames go through the engine queue and onto the tape like the
stocks stream's, so a replay sees the same quotes. REST polling never stops: it is the fallback. When
the stream cannot help (auth refused on the options cluster, a refused subscription, a dropped socket,
or no quote while the REST snapshots show the contract quoting) the marks come from REST exactly as
without a stream; one FEED alert says which, another says when quotes stream again.

Everything here runs on the engine thread except the stream's own thread, whose status changes reach
the engine thread through the queue as `OptionsStatus` items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from clock import Clock
from config import Settings
from events import FeedStatus
from polygon_client import PolygonStream
from said_memory import SaidMemory

# No quote on the stream for this long (since subscribing, or since its latest quote), while a REST
# quote newer than that exists, means the stream is not delivering: no plan for it, or a socket that
# went quiet while still open.
NO_QUOTES_AFTER_MS = 15_000
# Twice that without any frame while holding: the socket itself is stuck, so it is redialled.
OPTIONS_SILENCE_MS = 2 * NO_QUOTES_AFTER_MS
# SaidMemory's name for what the phone has about the held position's stream: "<trade id> FEED" (the
# fallback was said; its FEED RESTORED is owed) or "<trade id> FEED_RESTORED" (both were said).
FEED_SAID = "options_feed"
# The problem a restart carries over when the phone was told of a fallback and not yet of its end.
CARRIED_PROBLEM = "no quote streamed since the fallback said before the restart"
log = structlog.get_logger("options_feed")

PROBLEMS = {
    "auth_failed": "the options cluster refused the key (plan without options quotes?)",
    "subscription_refused": "the options cluster refused the quote subscription (plan without quotes?)",
    "max_connections": "another connection to the options cluster uses this key",
}


def options_url(settings: Settings) -> str:
    """POLYGON_OPTIONS_WS_URL, else the stocks stream's URL with its cluster path changed to /options
    (wss://socket.massive.com/stocks -> .../options; delayed.massive.com likewise), so a daemon pointed
    at another host (a rehearsal, a proxy) never dials the real vendor behind the user's back."""
    if settings.polygon_options_ws_url:
        return settings.polygon_options_ws_url
    base = settings.polygon_ws_url.rstrip("/")
    return base.removesuffix("/stocks") + "/options"


@dataclass(frozen=True, slots=True)
class OptionsStatus:
    """A status change of the options stream, on its way to the engine thread."""

    status: FeedStatus


class OptionsFeed:
    """Subscribes the held contract's quotes and tells when marks fall back to REST.

    `put` takes the stream's frames (the engine queue); `notify(kind, text)` raises a FEED alert (kind
    "FEED" when marks fall back to REST, "FEED_RESTORED" when quotes stream again). `said` remembers,
    across restarts, which of the two a position (named by its trade id) already had.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        put: Callable[[object], None],
        notify: Callable[[str, str], None],
        said: SaidMemory | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._put = put
        self._notify = notify
        self.stream: PolygonStream | None = None
        self._ticker: str | None = None
        self._position: str | None = None  # the held position's trade id (its ticker when none is given)
        self._since_ms = 0
        self._seen_stream = 0
        # The engine time of the latest streamed quote that set the mark, and that quote's own stamp.
        self._last_streamed = (0, 0)
        self._status_problem: str | None = None
        self.problem: str | None = None
        # At most one FEED (and its FEED RESTORED) per held contract: a stream that comes and goes (or a
        # REST stamp that keeps looking newer) must not flood the phone; later episodes are logged.
        self._said_for: str | None = None
        self._said = False
        self._memory = said if said is not None else SaidMemory()

    @property
    def enabled(self) -> bool:
        """OPTIONS_STREAM=auto (the default)."""
        return self._settings.options_stream == "auto"

    def start(self) -> None:
        """Connect to the options cluster (once per session, beside the stocks stream)."""
        if not self.enabled or self.stream is not None:
            return
        self.stream = PolygonStream(
            options_url(self._settings),
            self._settings.polygon_api_key,
            (),
            self._from_stream,
            clock_ms=self._clock.now_ms,
            topics=self._topics(),
            wait_scale=self._clock.sleep_scale(),
            silence_s=self._silence_limit_s,
        )
        try:
            self.stream.start()
        except BaseException:
            self.stream = (
                None  # a thread the system refused (out of threads or memory): tried again next turn
            )
            raise
        # The engine thread may have followed a contract while this one built the stream: subscribe it.
        self.stream.set_topics(self._topics())
        log.info("options_stream_started")

    def _silence_limit_s(self) -> float | None:
        """Wall seconds without a frame after which the options socket is redialled: only while a
        contract is held. A socket that answers pings but brings no quote stays stuck for good, though
        a new connection would deliver (read on the stream's thread: one attribute, no lock needed)."""
        if self._ticker is None:
            return None
        return OPTIONS_SILENCE_MS / 1000 * self._clock.sleep_scale()

    def stop(self) -> None:
        """Disconnect (after the close)."""
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.stop()

    def follow(self, ticker: str | None, now_ms: int, trade_id: str | None = None) -> None:
        """Stream exactly the held contract (none while flat); `trade_id` names the position, so that
        what the phone was told about it before a restart is not told again."""
        if ticker == self._ticker:
            return
        self._ticker = ticker
        self._position = trade_id or ticker
        self._since_ms = now_ms
        if ticker is not None and self._status_problem == PROBLEMS["subscription_refused"]:
            # That refusal was of the last contract's topic: the new one is judged on its own answer. Carried
            # over, an accepted subscription had a FEED at its BUY and a FEED RESTORED at its first quote.
            self._status_problem = None
        stream = self.stream  # read once: the session thread may stop it meanwhile
        if stream is not None:
            stream.set_topics(self._topics())
        if ticker is not None:
            if trade_id is not None:
                self._resume_said(trade_id)
            self._judge_at_entry()
            return
        self._said_for = None  # the next position is news to the phone, even on the same contract
        if self.problem is not None:
            # The held contract's marks were all the fallback was about: with nothing held it is over
            # (a FEED RESTORED after the SELL had told of marks for a position that no longer existed).
            log.info("marks_fallback_ended", reason="position closed", problem=self.problem)
            self.problem, self._said = None, False

    def _resume_said(self, trade_id: str) -> None:
        """A restart mid-position: the FEED it had is not said again, and a FEED RESTORED it is owed
        still comes when quotes stream."""
        said = self._memory.for_position(FEED_SAID, trade_id)
        if said is None:
            return
        self._said_for = trade_id
        if said == "FEED":
            self.problem, self._said = CARRIED_PROBLEM, True
            log.info("marks_fallback_carried_over", trade_id=trade_id)

    def _judge_at_entry(self) -> None:
        """At the BUY, a stream already known not to work means REST marks from the first second."""
        if self._status_problem is not None:
            self._fall_back(self._status_problem)
            return
        stream = self.stream
        if stream is not None and not stream.connected and stream.last_error:
            self._fall_back(f"cannot connect to the options cluster ({stream.last_error})")

    def on_status(self, status: FeedStatus) -> None:
        """A status change of the stream (engine thread). Only a held contract's marks can suffer: while
        flat the problem is remembered and judged at the next BUY."""
        log.info("options_stream_status", reason=status.reason, holding=self._ticker)
        if status.reason == "auth_success":
            self._status_problem = None
            if self._ticker is None:
                self._restored()  # nothing held: a working connection is all there is to judge
            return  # while holding, a connection is not yet a quote: quotes arriving judge recovery
        if status.reason.startswith("disconnected"):
            why = status.reason.removeprefix("disconnected: ")
            self._status_problem = f"the options stream disconnected ({why})"
        else:
            self._status_problem = PROBLEMS.get(status.reason, self._status_problem)
        if self._ticker is not None and self._status_problem is not None:
            self._fall_back(self._status_problem)

    def check(self, now_ms: int, stream_quotes: int, mark_quote_ms: int | None) -> None:
        """Judge the stream from what the engine saw (engine thread, every turn)."""
        if stream_quotes > self._seen_stream:
            self._seen_stream = stream_quotes
            self._last_streamed = (now_ms, mark_quote_ms if mark_quote_ms is not None else now_ms)
            self._restored()
            return
        if self._ticker is None or self.stream is None or self.problem is not None:
            return
        heard_ms, stamp_ms = self._last_streamed
        if heard_ms < self._since_ms:  # nothing streamed for this contract yet
            heard_ms = stamp_ms = self._since_ms
        quiet = now_ms - heard_ms >= NO_QUOTES_AFTER_MS
        rest_newer = mark_quote_ms is not None and mark_quote_ms > stamp_ms
        if not (quiet and rest_newer):
            return
        if self.stream.connected:
            self._fall_back("no quote on the options stream while REST shows the contract quoting")
        else:
            self._fall_back(
                f"cannot connect to the options cluster ({self.stream.last_error or 'no answer'})"
            )

    def _remember(self, said: str) -> None:
        if self._position is not None:
            self._memory.put_for_position(FEED_SAID, self._position, said)

    def health(self) -> dict[str, object]:
        """The marks' stream side for `/health`."""
        if not self.enabled:
            state = "off"
        elif self.problem is not None:
            state = f"fallback to REST: {self.problem}"
        elif self._ticker is None and self._status_problem is not None:
            refused = self._status_problem == PROBLEMS["subscription_refused"]
            then = (
                "the next BUY's subscription is tried again" if refused else "REST marks from the next BUY on"
            )
            state = f"not streaming: {self._status_problem} ({then})"
        elif self.stream is not None and self.stream.connected:
            state = "streaming" if self._ticker else "connected (nothing held)"
        else:
            state = "not connected"
        return {"options_stream": state, "subscribed": self._ticker}

    def _topics(self) -> list[str]:
        return [f"Q.{self._ticker}"] if self._ticker else []

    def _from_stream(self, item: object) -> None:
        self._put(OptionsStatus(item) if isinstance(item, FeedStatus) else item)

    def _fall_back(self, problem: str) -> None:
        if self.problem is not None:
            return
        self.problem = problem
        already_said = self._ticker is not None and self._said_for == self._position
        log.warning("marks_from_rest", reason=problem, alerted=not already_said)
        if already_said:
            return
        self._said_for, self._said = self._position, True
        poll = self._settings.rules.position_poll_seconds
        self._notify(
            "FEED",
            f"Options quotes are not streaming: {problem}. Marks come from REST polls (the held contract "
            f"every {poll:g} s, the chain every {self._settings.chain_poll_seconds:g} s), so exits may fire "
            "late on a fast move.",
        )
        self._remember("FEED")  # after the alert is queued: a crash in between repeats it, never loses it

    def _restored(self) -> None:
        if self.problem is None:
            return
        log.info("marks_streaming_again", after=self.problem, alerted=self._said)
        self.problem = None
        if not self._said:
            return
        self._said = False
        self._notify(
            "FEED_RESTORED",
            "Options quotes are streaming again: marks follow every quote of the held contract.",
        )
        self._remember("FEED_RESTORED")
