"""The decision core: events in, actions out.

`Engine.on_event` is the only way in. It never reads the wall clock (time is the event's receive
stamp, never allowed to run backwards), does no I/O and starts no threads, so the same engine runs
live, in replay, in the demo and in backtests and makes the same decisions on the same input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import date, time, timedelta
from typing import Protocol

from alert_text import (
    BuyContext,
    DayTrade,
    Overrides,
    SellContext,
    buy_message,
    buy_title,
    exit_lines,
    exit_trigger,
    feed_error_text,
    holding_note,
    late_summary_text,
    leadership_text,
    money,
    priority_for,
    rule_words,
    sell_message,
    sell_title,
    summary_key,
    summary_message,
    summary_title,
)
from config import Rules
from contract_selector import Candidate, mark_mid
from events import (
    Action,
    Alert,
    Bar,
    ChainSnapshot,
    ClosePosition,
    ContractSnapshot,
    Event,
    FeedStatus,
    Log,
    OpenPosition,
    OptionQuote,
    SetMeta,
    Tick,
    UpdatePosition,
    VolumeProfile,
)
from market_calendar import Session, minute_of_day, ny_datetime, ny_ms
from market_state import MarketCounters, MarketState
from priced_chain import PricedChain, price_chain, select_priced
from risk_manager import (
    Block,
    DayRecord,
    Lifetime,
    Position,
    check_exit,
    exit_quiet_until,
    pnl_of,
    protection_block,
    track_vwap,
    with_mark,
)
from signals import Features

CRITICAL_LATCH = "critical_loss_latched"
# "<trade_id> <ms>": the own stamp of the quote behind the held position's saved mark. Without it a restart
# took the first valid quote whatever its age: an older REST snapshot re-marked a position and fired a false
# Hard giveback.
MARK_QUOTE_META = "mark_quote_ms"


def mark_quote_meta(trade_id: str, quote_ms: int) -> SetMeta:
    """The durable record of the stamp behind a position's saved mark (read by `saved_mark_quote_ms`)."""
    return SetMeta(MARK_QUOTE_META, f"{trade_id} {quote_ms}")


def saved_mark_quote_ms(saved: str | None, trade_id: str | None) -> int | None:
    """The stamp `mark_quote_meta` saved, when it belongs to the trade `trade_id`, else None."""
    saved_id, _, stamp = (saved or "").partition(" ")
    if trade_id is None or saved_id != trade_id:
        return None
    try:
        return int(stamp)
    except ValueError:
        return None


# A streamed contract can quote hundreds of times a second, and each save is an fsync: a new peak is
# written at most once a second of engine time, a mark or bid that moved without a new peak at most
# every MARK_SAVE_MS (a restart exits at the saved bid until a quote comes). The SELL's close carries
# the final peak in its own transaction.
PEAK_SAVE_MS = 1000
MARK_SAVE_MS = 5000
# How far ahead of the engine clock a quote's stamp can hold back the quotes after it.
QUOTE_AHEAD_MS = 2000
# A quote stamp further ahead of the engine clock than this is no feed's skew but a bad stamp (as for bars).
QUOTE_SKEW_MS = 60_000
# System alerts about the feed: while a position is held they say so, as loud as its SELL.
FEED_TROUBLE_KINDS = frozenset({"STALL", "FEED_ERROR"})
FEED_ERROR_REASONS = frozenset({"auth_failed", "max_connections", "unauthorized", "not_entitled"})
# One FEED ERROR per reason in this window: a stream refused at each redial (max_connections, a bad key)
# had pushed one a minute, with its STALL and RECOVERED, about 180 pushes an hour.
FEED_ERROR_REPEAT_MS = 15 * 60_000
# How far back a restart looks for the last session before today: the longest NYSE closure this century
# was four weekdays (11-14 September 2001), so ten days cover it with the weekends around it.
MAX_SESSION_GAP_DAYS = 10


class SessionSource(Protocol):
    def session_at(self, ms: int) -> Session | None: ...


@dataclass(frozen=True, slots=True)
class OwedSummary:
    """A day whose close the daemon missed: positions were opened then, and no SUMMARY was recorded."""

    session_date: str
    trades: tuple[DayTrade, ...]


@dataclass(frozen=True, slots=True)
class RestoredState:
    """Trading state read back from the journal after a restart."""

    position: Position | None
    day: DayRecord
    opened_today: int
    last_exit_ms: int | None
    lifetime: Lifetime
    critical_latched: bool
    trades_today: tuple[DayTrade, ...] = ()  # the day's closed trades, for the close's summary
    owed_summary: OwedSummary | None = None  # the live daemon's restart after a missed close only
    mark_quote_ms: int | None = None  # the stamp of the quote behind the open position's saved mark


@dataclass(frozen=True, slots=True)
class FilterReading:
    """One entry filter's value and whether it blocks, for logs, health and the BUY alert."""

    name: str
    value: str
    blocks: bool
    limit: str = ""


@dataclass(slots=True)
class MarkCounters:
    """Quotes of the held contract by what became of them: setting the mark per source, or ignored."""

    chain: int = 0
    rest: int = 0
    stream: int = 0
    invalid: int = 0
    stale: int = 0

    def count(self, source: str) -> None:
        """One quote from `source` ("chain", "rest" or "stream") set the mark."""
        setattr(self, source, getattr(self, source) + 1)


def entry_conditions_hold(f: Features) -> bool:
    """The four entry conditions of a bar's features (the filters and blocks come after)."""
    return f.above_vwap and f.vwap_rising and f.volume_surge and f.momentum_ok


class Engine:
    """One state machine for the whole trading day; see module docstring.

    The engine owns its `MarketState` unless one is passed in: then the caller applies each event
    to that shared market first and hands the engine only the events `wants` says can matter.
    """

    def __init__(
        self,
        rules: Rules,
        calendar: SessionSource,
        market: MarketState | None = None,
        alert_overrides: Overrides | None = None,
    ) -> None:
        self.rules = rules
        # ALERT_PRIORITY_<KIND> settings (alert_text.delivery_overrides); None: the default table.
        self._alert_overrides = alert_overrides
        self._calendar = calendar
        self._owns_market = market is None
        self.market = MarketState(rules) if market is None else market
        self._now = 0
        self._day_end_ms = 0
        self._summary_due_ms = 0
        self._session: Session | None = None
        self._session_date = ""
        self._logged_date = ""  # the last date a session_day line was logged for
        self._logged_minute = -1
        self.position: Position | None = None
        self.day = DayRecord()
        self.opened_today = 0
        self.last_exit_ms: int | None = None
        self.lifetime = Lifetime()
        self._critical_latched = False
        self.paused = False
        self._stall_alerted = False
        self._recovered_minute: int | None = None  # the minute (ms // 60,000) of the last RECOVERED
        self._feed_errors_said: dict[str, int] = {}  # reason -> when its last FEED ERROR was decided
        self._watching_since = 0
        self.trades_today: tuple[DayTrade, ...] = ()
        self._summarised_date = ""
        self._owed_summary: OwedSummary | None = None
        self.marks = MarkCounters()
        self.mark_source: str | None = None
        # The own stamp of the quote behind the mark, and the stamp below which quotes are older (see
        # `_floor_of`).
        self._mark_quote_ms: int | None = None
        self._mark_floor_ms: int | None = None
        self.mark_set_ms: int | None = None  # engine time a valid quote last set the held mark (or the entry)
        self._position_saved_ms = 0
        self._position_save_due_ms: int | None = None  # when an unsaved change of the position is due
        # The live daemon prices each chain as it arrives, off the BUY's critical path; replays and
        # backtests, which never look at most chains, price one only when a selection needs it. The
        # outcome is the same either way (priced_chain's docstring): only when the work is done differs.
        self.price_chains_on_arrival = False
        self._priced: tuple[ChainSnapshot, PricedChain] | None = None
        # (quiet until, position, features, session) of the last exit check that found no exit: a
        # holding engine checks its exits at every event, and most change none of check_exit's inputs.
        self._exit_quiet: tuple[int, Position, Features | None, Session] | None = None

    @property
    def stall_alerted(self) -> bool:
        """Whether a STALL alert went out for the current silence (RECOVERED not yet sent)."""
        return self._stall_alerted

    @property
    def last(self) -> Features | None:
        return self.market.last

    @property
    def last_bar(self) -> Bar | None:
        return self.market.last_bar

    @property
    def chain(self) -> ChainSnapshot | None:
        return self.market.chain

    @property
    def profile(self) -> VolumeProfile | None:
        return self.market.profile

    @property
    def counters(self) -> MarketCounters:
        return self.market.counters

    @property
    def now_ms(self) -> int:
        return self._now

    @property
    def mark_quote_ms(self) -> int | None:
        """The quote time behind the held position's mark (None when unknown)."""
        return self._mark_quote_ms

    @property
    def session(self) -> Session | None:
        return self._session

    def restore(self, state: RestoredState, session_date: str, *, replayed: bool = False) -> None:
        """Adopt the journal's trading state for `session_date` (it is the truth after a restart).

        `replayed`: the engine has just rebuilt its state from the very tape lines the journal recorded
        (a replay resuming after its cursor). When its open position is the journal's open trade, it is
        at least as new as the journal's copy, which saves a new peak at most once a second and a mark
        every 5 s: it is kept, with the time of the quote behind its mark. An audit's resumed replay took
        the journal's older peak and missed the giveback the uninterrupted replay sold on.
        """
        rebuilt = self.position if replayed else None
        self._session_date = session_date
        self.position = state.position
        self.day = state.day
        self.opened_today = state.opened_today
        # The cooldown belongs to a day: an exit on another day (replays run days in any order) is ignored.
        self.last_exit_ms = same_day_exit(state.last_exit_ms, session_date)
        self.lifetime = state.lifetime
        self._critical_latched = state.critical_latched
        self.trades_today = state.trades_today
        self._owed_summary = self._summary_still_owed(state.owed_summary, session_date)
        if rebuilt is not None and state.position is not None and rebuilt.trade_id == state.position.trade_id:
            self.position = rebuilt
            return
        self._mark_quote_ms = state.mark_quote_ms  # unknown (None): the next valid quote sets the mark
        self._mark_floor_ms = None  # capped again at the first quote, against the clock of then
        self.mark_set_ms = None

    def on_event(self, event: Event) -> list[Action]:
        """Handle one event and return the decisions it caused, in order."""
        market = self.market
        fresh = market.apply(event) if self._owns_market else market.fresh
        now = market.now_ms if market.now_ms > self._now else self._now
        self._now = now
        actions: list[Action] = []
        if now >= self._day_end_ms:
            self._roll_day(now, actions)
        kind = type(event)
        if kind is Bar:
            if fresh is not None:
                self._on_bar(event, fresh, actions)  # type: ignore[arg-type]
        elif kind is ChainSnapshot:
            self._mark_from_chain(event, actions)  # type: ignore[arg-type]
            if self.price_chains_on_arrival and self.position is None:
                self._priced_chain(event)  # type: ignore[arg-type]
        elif kind is ContractSnapshot:
            self._mark_from_quote(event.quote, event.source, actions)  # type: ignore[union-attr]
        elif kind is FeedStatus:
            self._on_feed_status(event, actions)  # type: ignore[arg-type]
        elif kind is Tick:
            self._check_stall(now, actions)
        if self.position is not None:
            self._save_position_if_due(actions)
            self._check_exit(now, actions)
        if now >= self._summary_due_ms:
            self._summarise_day(actions)
        if self._owed_summary is not None:
            self._send_owed_summary(actions)
        return actions

    def note_start(self, at_ms: int) -> None:
        """The daemon (re)started at `at_ms`: bars missing before it were its downtime, so the stall
        clock counts from here (as it does from the first event of a day)."""
        self._watching_since = max(self._watching_since, at_ms)

    def set_paused(self, paused: bool, at_ms: int = 0) -> list[Action]:
        """The kill switch: entries stop at once; exits and SELL alerts carry on."""
        self._now = max(self._now, at_ms)
        if paused == self.paused:
            return []
        self.paused = paused
        return [Log("entries_paused" if paused else "entries_resumed", {"at_ms": self._now})]

    def _roll_day(self, now: int, actions: list[Action]) -> None:
        session = self._calendar.session_at(now)
        day = ny_datetime(now).date()
        self._day_end_ms = ny_ms(day + timedelta(days=1), time(0))
        new_date = day.isoformat()
        self._session = session
        self._watching_since = self._watching_since or now
        # No session (weekend, holiday): no summary that day.
        self._summary_due_ms = session.close_ms if session is not None else self._day_end_ms
        if new_date != self._logged_date:
            # Also the first day after a restore, which set the date already: a holiday's replay says so.
            self._logged_date = new_date
            actions.append(Log("session_day", {"date": new_date, "trading": session is not None}))
        if new_date == self._session_date:
            return
        self._session_date = new_date
        # A STALL still open at the close stays open: its RECOVERED comes with the next bars (DESIGN: one
        # STALL, one RECOVERED when bars return), or the phone's last word on the feed is "Entries paused".
        self.day, self.opened_today = DayRecord(), 0
        self.trades_today = ()
        self.last_exit_ms = None  # the cooldown never reaches across days
        self._watching_since = now

    def _on_bar(self, bar: Bar, features: Features, actions: list[Action]) -> None:
        """A new underlying bar, already absorbed by the market: follow the position, try an entry."""
        if not bar.backfilled:
            self._note_bar_arrival(actions)
        if self.position is not None:
            self._follow_vwap(features, actions)
            self._check_exit(self._now, actions)
        if self.position is None and entry_conditions_hold(features):
            self._try_entry(bar, features, actions)
        self._log_minute(bar, features, actions)

    def _note_bar_arrival(self, actions: list[Action]) -> None:
        """A streamed bar ends an open STALL. A backfilled one does not: entries stay blocked on it
        (`feed_backfill`), and each redial's backfill of a silent stream had sent a RECOVERED saying
        "entries resume", then a STALL again, three pairs in one 5-minute outage."""
        if self._stall_alerted:
            self._stall_alerted = False
            self._recovered_minute = self._now // 60_000
            actions.append(self._system_alert("RECOVERED", "Bars are flowing again; entries resume."))

    def _follow_vwap(self, features: Features, actions: list[Action]) -> None:
        assert self.position is not None
        moved = track_vwap(self.position, close=features.close, vwap=features.rolling_vwap, now_ms=self._now)
        if moved is not self.position:
            self._set_position(moved, actions)

    def _try_entry(self, bar: Bar, features: Features, actions: list[Action]) -> None:
        block = self._entry_block(bar)
        readings = self.filter_readings()
        block = block or next((Block(r.name, r.value, r.limit) for r in readings if r.blocks), None)
        if block is not None:
            fields = {
                "time": self._clock_text(),
                "rule": block.rule,
                "value": block.value,
                "limit": block.limit,
            }
            actions.append(Log("entry_blocked", fields))
            return
        assert self.chain is not None and self._session is not None
        selection = select_priced(
            self._priced_chain(self.chain),
            now_ms=self._now,
            spot=features.close,
            session_close_ms=self._session.close_ms,
        )
        if selection.chosen is None:
            actions.append(Log("no_contract", {"time": self._clock_text(), "why": selection.summary()}))
            return
        self._open(selection.chosen, bar, features, readings, actions)

    def _priced_chain(self, chain: ChainSnapshot) -> PricedChain:
        """`chain` priced for these rules and today's session, at the latest close; once per snapshot."""
        cached = self._priced
        if cached is not None and cached[0] is chain and cached[1].session_date == self._session_date:
            return cached[1]
        last = self.market.last
        priced = price_chain(
            chain.quotes,
            rules=self.rules,
            session_date=self._session_date,
            spot=last.close if last is not None else None,
            now_ms=self._now,
        )
        self._priced = (chain, priced)
        return priced

    def _clock_text(self) -> str:
        return ny_datetime(self._now).strftime("%H:%M:%S")

    def _entry_block(self, bar: Bar) -> Block | None:
        """The first non-filter reason an entry cannot happen now (window, data, cooldown, protections)."""
        now, rules, session = self._now, self.rules, self._session
        if session is None or not session.entry_allowed(now):
            return Block("entry_window", ny_datetime(now).strftime("%H:%M:%S"), "session entry window")
        lag_s = (now - bar.end_ms) / 1000
        if lag_s > rules.stall_seconds:
            return Block("feed_stale", f"bar {lag_s:.1f}s old", f"{rules.stall_seconds:g}s")
        if bar.backfilled:
            # A backfill reaches up to now, so its last bars are fresh; but the stream that should have
            # brought them is down or redialling, and a BUY needs a feed that follows the position.
            return Block("feed_backfill", "bar from a REST backfill", "a streamed bar")
        if self.chain is None:
            return Block("chain_missing", "no chain yet", f"{rules.chain_max_age_seconds:g}s")
        chain_age = (now - self.chain.received_ms) / 1000
        if chain_age > rules.chain_max_age_seconds:
            return Block("chain_stale", f"{chain_age:.1f}s", f"{rules.chain_max_age_seconds:g}s")
        waited_ms = None if self.last_exit_ms is None else now - self.last_exit_ms
        # A negative wait means the exit lies ahead of `now` (another day's): it never blocks.
        if waited_ms is not None and 0 <= waited_ms < rules.cooldown_seconds * 1000:
            waited = waited_ms // 100 / 10  # down to a tenth: 59.999 s is no "60.0s" against a 60 s limit
            return Block("cooldown", f"{waited:.1f}s", f"{rules.cooldown_seconds:g}s")
        return protection_block(
            self.day,
            opened_today=self.opened_today,
            clock=ny_datetime(now).time(),
            paused=self.paused,
            rules=rules,
        )

    def filter_readings(self) -> tuple[FilterReading, ...]:
        """SPY leadership and relative volume at the latest IWM bar."""
        return (self._leadership_reading(), self._relative_volume_reading())

    def _leadership_reading(self) -> FilterReading:
        if self.last is None:
            return FilterReading("spy_leadership", "n/a", False)
        iwm, spy = self.market.leadership_percents()
        if iwm is None or spy is None:
            return FilterReading("spy_leadership", "n/a (no history)", False)
        lag = spy - iwm
        limit = self.rules.spy_iwm_lag_threshold
        return FilterReading("spy_leadership", leadership_text(lag), lag > limit, f"{limit:.2f} pts max")

    def _relative_volume_reading(self) -> FilterReading:
        required = self.rules.relative_volume_required
        profile = self.profile
        if self.last is None or profile is None or not profile.minutes:
            return FilterReading("relative_volume", "unavailable", required, "a volume profile (required)")
        average = profile.minutes.get(minute_of_day(self.last.start_ms))
        if not average:
            return FilterReading(
                "relative_volume", "unavailable for this minute", required, "a volume profile (required)"
            )
        expected = average * self.rules.relative_volume_window_seconds / 60
        ratio = self.last.window_volume / expected
        minimum = self.rules.relative_volume_min
        return FilterReading("relative_volume", f"{ratio:.2f}x", ratio < minimum, f"{minimum:.2f}x min")

    def _open(
        self,
        chosen: Candidate,
        bar: Bar,
        features: Features,
        readings: tuple[FilterReading, ...],
        actions: list[Action],
    ) -> None:
        quote = chosen.quote
        assert quote.ask is not None and quote.bid is not None
        self.opened_today += 1
        trade_id = f"{self._session_date}-{self.opened_today:02d}"
        position = Position(
            trade_id=trade_id,
            session_date=self._session_date,
            ticker=quote.ticker,
            strike=quote.strike,
            expiry=quote.expiry,
            contracts=self.rules.contracts,
            entry_price=quote.ask,
            entry_mark=chosen.mid,
            entry_ms=self._now,
            delta=chosen.delta,
            iv=chosen.iv if chosen.iv is not None else quote.iv,
            peak=chosen.mid,
            mark=chosen.mid,
            bid=quote.bid,
        )
        self.position = position
        self._set_mark_stamp(quote.quote_ms)
        self.mark_set_ms = self._now
        self._position_saved_ms, self._position_save_due_ms = self._now, None
        self.mark_source = "chain"
        actions.append(open_action(position))
        self._save_mark_quote_ms(position, actions)
        context = BuyContext(
            underlying=self.rules.underlying,
            close=features.close,
            rolling_vwap=features.rolling_vwap,
            day_vwap=bar.day_vwap,
            momentum_pct_per_sec=features.momentum_pct_per_sec,
            volume_z=features.volume_z,
            bid=quote.bid,
            mid=chosen.mid,
            spread_pct=chosen.spread_pct,
            bid_size=quote.bid_size,
            ask_size=quote.ask_size,
            delta_source=chosen.delta_source,
            filters="; ".join(f"{rule_words(r.name)}: {r.value}" for r in readings),
            exit_rules=self._exit_lines(position),
        )
        message = buy_message(position, context)
        title = buy_title(self.rules.underlying)
        actions.append(Alert("BUY", f"BUY:{trade_id}", title, message, self._priority("BUY"), self._now))

    def _exit_lines(self, position: Position) -> str:
        stop_at = ny_datetime(self._session.time_stop_ms).strftime("%H:%M") if self._session else "n/a"
        return exit_lines(position, self.rules, stop_at)

    def _priority(self, kind: str) -> int:
        return priority_for(kind, self._alert_overrides)

    def _mark_from_chain(self, chain: ChainSnapshot, actions: list[Action]) -> None:
        if self.position is None:
            return
        quote = chain.quote_for(self.position.ticker)
        if quote is not None:
            self._mark_from_quote(quote, "chain", actions)

    def _mark_from_quote(self, quote: OptionQuote, source: str, actions: list[Action]) -> None:
        """The mark rule: a valid quote of the held contract, from any source, that is not older than
        the quote behind the current mark sets the mark (its mid) and the exit bid (its bid); the peak
        follows. Invalid quotes (a glitch's absurd spread included: `mark_mid`) and older quotes are
        counted and change nothing."""
        position = self.position
        if position is None or quote.ticker != position.ticker:
            return
        mid = mark_mid(quote)
        if mid is None:
            self.marks.invalid += 1
            return
        quote_ms, current_ms = quote.quote_ms, self._mark_quote_ms
        if quote_ms is not None and current_ms is not None and self._older(quote_ms, current_ms):
            self.marks.stale += 1
            return
        if quote_ms is not None:
            self._set_mark_stamp(quote_ms)
        self.mark_set_ms = self._now
        self.marks.count(source)
        self.mark_source = source
        assert quote.bid is not None
        moved = with_mark(position, mid, quote.bid)
        if moved is not position:
            self._note_unsaved(moved.peak != position.peak)
        elif quote_ms is not None and quote_ms != current_ms:
            # The same price, newer: its stamp is saved too, or a restart dated the last quote back to the
            # last price change (a SELL said "no quote of this contract for 33 min" of a quote 0.5 s old).
            self._note_unsaved(new_peak=False)
        self.position = moved

    def _older(self, quote_ms: int, current_ms: int) -> bool:
        """Whether a quote is older than the one behind the mark: below the mark's floor (`_floor_of`)."""
        if quote_ms >= current_ms:
            return False
        floor = self._mark_floor_ms
        if floor is None:  # after a restart: the saved stamp, judged against the clock of now
            floor = self._mark_floor_ms = self._floor_of(current_ms)
        return quote_ms < floor

    def _floor_of(self, quote_ms: int) -> int:
        """The stamp below which quotes are older than one stamped `quote_ms`, judged as it comes.

        Quotes are ordered by their own stamps, whatever their lead over this machine's clock, as long as
        the stamp is a plausible one (at most QUOTE_SKEW_MS ahead): an audit's feed running 10 s ahead had
        let older quotes past a capped stamp and fired a false stop. A stamp further ahead (from tomorrow)
        holds back only quotes below the clock + QUOTE_AHEAD_MS of when it came: it delays real quotes by
        that much at most, never freezes the mark. Judged once, as it comes: judged again at each quote, a
        stamp 61 s ahead became plausible a second later and froze the mark (and the stop) for a minute.
        """
        if quote_ms <= self._now + QUOTE_SKEW_MS:
            return quote_ms
        return self._now + QUOTE_AHEAD_MS

    def _set_mark_stamp(self, quote_ms: int | None) -> None:
        """The stamp behind the mark, and its floor (see `_floor_of`)."""
        self._mark_quote_ms = quote_ms
        self._mark_floor_ms = None if quote_ms is None else self._floor_of(quote_ms)

    def _note_unsaved(self, new_peak: bool) -> None:
        due = self._position_saved_ms + (PEAK_SAVE_MS if new_peak else MARK_SAVE_MS)
        pending = self._position_save_due_ms
        self._position_save_due_ms = due if pending is None else min(pending, due)

    def _save_position_if_due(self, actions: list[Action]) -> None:
        due = self._position_save_due_ms
        if due is not None and self._now >= due:
            assert self.position is not None
            self._set_position(self.position, actions)

    def _set_position(self, position: Position, actions: list[Action]) -> None:
        self.position = position
        self._position_save_due_ms = None
        self._position_saved_ms = self._now
        actions.append(
            UpdatePosition(
                position.trade_id, position.peak, position.mark, position.below_vwap_since_ms, position.bid
            )
        )
        self._save_mark_quote_ms(position, actions)

    def _save_mark_quote_ms(self, position: Position, actions: list[Action]) -> None:
        """Keep the stamp behind the saved mark beside it, so a restart refuses quotes older than it."""
        if self._mark_quote_ms is not None:
            actions.append(mark_quote_meta(position.trade_id, self._mark_quote_ms))

    def _check_exit(self, now: int, actions: list[Action]) -> None:
        position = self.position
        if position is None:
            return
        missed = self._missed_time_stop(position, now)
        if missed is not None:
            # The daemon was down (or stuck) at the time stop and the market has since shut.
            self._close(position, "Time stop", now, actions, missed_ms=missed)
            return
        session, last = self._session, self.last
        if session is None:
            return
        quiet = self._exit_quiet
        if (
            quiet is not None
            and now < quiet[0]
            and quiet[1] is position
            and quiet[2] is last
            and quiet[3] is session
        ):
            return  # nothing check_exit reads has changed, and no time-based exit is due yet
        decision = check_exit(
            position,
            now_ms=now,
            time_stop_ms=session.time_stop_ms,
            last_close=last.close if last else None,
            last_vwap=last.rolling_vwap if last else None,
            rules=self.rules,
        )
        if decision is None:
            until = exit_quiet_until(position, time_stop_ms=session.time_stop_ms, rules=self.rules)
            self._exit_quiet = (until, position, last, session)
        else:
            actions.append(
                Log("exit", {"trade_id": position.trade_id, "rule": decision.reason, "why": decision.detail})
            )
            self._close(position, decision.reason, now, actions)

    def _missed_time_stop(self, position: Position, now: int) -> int | None:
        """The time stop the position should have exited at, when the engine sees it only after its
        session's close (a restart that evening or on a later day); None otherwise.

        A position of an earlier day whose session the calendar does not know is closed at `now`.
        """
        if position.session_date == self._session_date:
            session = self._session
            if session is None or now < session.close_ms:
                return None
            return min(session.time_stop_ms, now)
        try:
            held_date = date.fromisoformat(position.session_date)
        except ValueError:
            return now
        held = self._calendar.session_at(ny_ms(held_date, time(12)))
        return now if held is None else min(held.time_stop_ms, now)

    def _old_mark_ms(self, at_ms: int) -> int | None:
        """How long no valid quote had set the held mark at `at_ms`, when longer than MAX_QUOTE_AGE_SECONDS
        (an exit then books a bid every quote source failed to renew: the stream, the contract's snapshot,
        the chain). After a restart with no quote since, the age counts from the saved quote's own stamp;
        None when nothing tells. A quote repeated unchanged counts: a quiet contract's standing quote is
        its market (only its source going silent makes the bid a guess)."""
        since = self.mark_set_ms if self.mark_set_ms is not None else self._mark_quote_ms
        if since is None or at_ms - since <= self.rules.max_quote_age_seconds * 1000:
            return None
        return at_ms - since

    def _close(
        self,
        position: Position,
        reason: str,
        now: int,
        actions: list[Action],
        *,
        missed_ms: int | None = None,
    ) -> None:
        """Close at the last bid. `missed_ms`: the time stop the daemon missed, which the trade is
        booked at (its day's record, summary and status) while the SELL still goes out now."""
        exit_price = max(position.bid, 0.0)
        exit_ms = now if missed_ms is None else missed_ms
        dollars, percent = pnl_of(position.entry_price, exit_price, position.contracts)
        self.position, self.last_exit_ms = None, now
        trade = day_trade(position, exit_price, exit_ms, reason, dollars, percent)
        if position.session_date == self._session_date:
            self.day = self.day.after_trade(dollars)
            self.trades_today += (trade,)
        owed = self._owed_summary
        if owed is not None and position.session_date == owed.session_date:
            self._owed_summary = OwedSummary(owed.session_date, (*owed.trades, trade))
        self.lifetime = self.lifetime.after_trade(dollars)
        actions.append(
            ClosePosition(position.trade_id, exit_price, exit_ms, reason, position.peak, dollars, percent)
        )
        old_quote_ms = self._old_mark_ms(exit_ms)
        if old_quote_ms is not None:
            fields = {"trade_id": position.trade_id, "quote_age_s": round(old_quote_ms / 1000)}
            actions.append(Log("exit_on_old_quote", fields))
        context = SellContext(
            underlying=self.rules.underlying,
            reason=reason,
            close=self.last.close if self.last else None,
            rolling_vwap=self.last.rolling_vwap if self.last else None,
            exit_price=exit_price,
            exit_ms=exit_ms,
            pnl_dollars=dollars,
            pnl_percent=percent,
            lifetime=self.lifetime,
            trigger=exit_trigger(reason, position, self.rules),
            missed=missed_ms is not None,
            old_quote_ms=old_quote_ms,
        )
        message = sell_message(position, context)
        title = sell_title(self.rules.underlying)
        actions.append(
            Alert("SELL", f"SELL:{position.trade_id}", title, message, self._priority("SELL"), now)
        )
        self._check_critical_loss(actions)

    def _summarise_day(self, actions: list[Action]) -> None:
        """The close's SUMMARY alert, once per session day (a restart's repeat is dropped by the
        outbox's unique dedupe key)."""
        self._summary_due_ms = self._day_end_ms
        if not self.rules.daily_summary or self._summarised_date == self._session_date:
            return
        self._summarised_date = self._session_date
        if self._never_watched_today():
            actions.append(
                Log("summary_skipped", {"date": self._session_date, "why": "started after the close"})
            )
            return
        actions.append(self._summary_alert(self._session_date, self.trades_today))

    def _never_watched_today(self) -> bool:
        """A start after the close with nothing of the day's to tell: a first deploy in the evening sent
        "No trades today" for a session it never saw (two audits' find). A day with trades is told."""
        session = self._session
        watched_after_close = session is not None and self._watching_since >= session.close_ms
        return watched_after_close and not self.trades_today and self.position is None

    def _summary_still_owed(self, owed: OwedSummary | None, today: str) -> OwedSummary | None:
        """`owed` when it is the last session before `today` (a later restart lets an older day go)."""
        if owed is None or not self.rules.daily_summary:
            return None
        try:
            day = date.fromisoformat(today)
        except ValueError:
            return None
        for back in range(1, MAX_SESSION_GAP_DAYS + 1):
            earlier = day - timedelta(days=back)
            if self._calendar.session_at(ny_ms(earlier, time(12))) is not None:
                return owed if earlier.isoformat() == owed.session_date else None
        return None

    def _send_owed_summary(self, actions: list[Action]) -> None:
        """The missed close's SUMMARY, once that day's position (closed as a missed time stop) is booked."""
        owed = self._owed_summary
        assert owed is not None
        if self.position is not None and self.position.session_date == owed.session_date:
            return
        self._owed_summary = None
        actions.append(self._summary_alert(owed.session_date, owed.trades, late=True))

    def _summary_alert(self, session_date: str, trades: tuple[DayTrade, ...], *, late: bool = False) -> Alert:
        """A day's SUMMARY (`late`: after a restart, for a close the daemon missed)."""
        message = summary_message(session_date, trades, self.lifetime)
        if late:
            message = late_summary_text(session_date) + "\n" + message
        title = summary_title(self.rules.underlying)
        return Alert(
            "SUMMARY", summary_key(session_date), title, message, self._priority("SUMMARY"), self._now
        )

    def _check_critical_loss(self, actions: list[Action]) -> None:
        threshold = self.rules.critical_loss_threshold
        below = self.lifetime.pnl <= threshold
        if below and not self._critical_latched:
            self._critical_latched = True
            actions.append(SetMeta(CRITICAL_LATCH, "1"))
            text = f"Lifetime P&L {money(self.lifetime.pnl)} is at or below {money(threshold)}."
            actions.append(self._system_alert("CRITICAL_LOSS", text))
        elif not below and self._critical_latched:
            self._critical_latched = False
            actions.append(SetMeta(CRITICAL_LATCH, "0"))

    def _check_stall(self, now: int, actions: list[Action]) -> None:
        session = self._session
        if session is None or not session.is_open(now) or self._stall_alerted:
            return
        if now // 60_000 == self._recovered_minute:
            # A system alert's key is its kind and minute: a STALL in the minute of the last RECOVERED (so perhaps
            # of the last STALL) could be dropped as a repeat, and its RECOVERED then come alone. It waits.
            return
        age_s = self.bar_age_s(now)
        if age_s >= self.rules.stall_alert_seconds:
            self._stall_alerted = True
            text = f"No {self.rules.underlying} bar for {age_s:.0f}s. Entries paused; exits still checked."
            actions.append(self._system_alert("STALL", text))

    def bar_age_s(self, now: int) -> float:
        """Seconds since the last IWM bar, or since the open (or since we started watching, if later)."""
        session = self._session
        reference = max(self.market.last_iwm_ms or 0, self._watching_since)
        if session is not None and now >= session.open_ms:  # before the open, the age of the last bar
            reference = max(reference, session.open_ms)
        if reference == 0:  # before the first event: nothing has been missed yet
            return 0.0
        return max(0.0, (now - reference) / 1000)

    def is_stalled(self, now: int) -> bool:
        session = self._session
        return bool(session and session.is_open(now) and self.bar_age_s(now) >= self.rules.stall_seconds)

    def _on_feed_status(self, status: FeedStatus, actions: list[Action]) -> None:
        actions.append(Log("feed_status", {"connected": status.connected, "reason": status.reason}))
        if status.reason not in FEED_ERROR_REASONS:
            return
        said_ms = self._feed_errors_said.get(status.reason)
        if said_ms is not None and self._now - said_ms < FEED_ERROR_REPEAT_MS:
            return  # the same refusal again within the window: logged above, already on the phone
        self._feed_errors_said[status.reason] = self._now
        actions.append(self._system_alert("FEED_ERROR", feed_error_text(status.reason)))

    def _system_alert(self, kind: str, text: str) -> Alert:
        minute = ny_datetime(self._now).strftime("%Y-%m-%dT%H:%M")
        title = f"{self.rules.underlying} alerter — {kind.replace('_', ' ')}"
        priority = self._priority(kind)
        if kind in FEED_TROUBLE_KINDS and self.position is not None:
            # The feed a held position's SELL depends on is in trouble: as loud as the SELL it may delay.
            priority = max(priority, self._priority("SELL"))
            text = f"{text} {holding_note(self.position.ticker)}"
        return Alert(kind, f"{kind}:{minute}", title, text, priority, self._now)

    def _log_minute(self, bar: Bar, f: Features, actions: list[Action]) -> None:
        minute = bar.start_ms // 60_000
        if minute == self._logged_minute:
            return
        self._logged_minute = minute
        actions.append(Log("signal_conditions", self.conditions(f)))

    def conditions(self, f: Features) -> dict[str, object]:
        """Every entry condition, filter and protection with its value (the minute log and /health)."""
        block = self._entry_block(self.last_bar) if self.last_bar else None
        fields: dict[str, object] = {
            "time": ny_datetime(f.start_ms).strftime("%H:%M:%S"),
            "close": round(f.close, 4),
            "vwap": round(f.rolling_vwap, 4),
            "above_vwap": f.above_vwap,
            "vwap_slope": None if f.vwap_slope is None else round(f.vwap_slope, 6),
            "vwap_rising": f.vwap_rising,
            "volume": f.volume,
            "volume_threshold": None if f.volume_threshold is None else round(f.volume_threshold, 1),
            "volume_surge": f.volume_surge,
            "volume_z": round(f.volume_z, 2),
            "momentum_pct_s": None if f.momentum_pct_per_sec is None else round(f.momentum_pct_per_sec, 5),
            "momentum_ok": f.momentum_ok,
            "chain_age_s": None
            if self.chain is None
            else round((self._now - self.chain.received_ms) / 1000, 1),
            "position": self.position.ticker if self.position else None,
            "blocked_by": block.describe() if block else None,
            "trades_today": self.opened_today,
            "day_pnl": self.day.pnl,
        }
        for reading in self.filter_readings():
            fields[reading.name] = reading.value + (" (blocks)" if reading.blocks else "")
        return fields


def same_day_exit(last_exit_ms: int | None, session_date: str) -> int | None:
    """`last_exit_ms` when it falls on `session_date` (New York), else None: cooldowns are per day."""
    if last_exit_ms is None or ny_datetime(last_exit_ms).date().isoformat() != session_date:
        return None
    return last_exit_ms


def day_trade(
    position: Position, exit_price: float, exit_ms: int, reason: str, dollars: float, percent: float
) -> DayTrade:
    """A closed position as the daily summary lists it."""
    return DayTrade(
        position.trade_id,
        position.ticker,
        position.entry_ms,
        exit_ms,
        position.entry_price,
        exit_price,
        reason,
        dollars,
        percent,
    )


def open_action(position: Position) -> OpenPosition:
    """The durable record of a new position: its entry fields (peak and mark start at the entry mark)."""
    return OpenPosition(**{f.name: getattr(position, f.name) for f in dataclasses.fields(OpenPosition)})


def position_fields(position: Position | None) -> dict[str, object] | None:
    """The open position as plain JSON-ready values (health output, logs)."""
    if position is None:
        return None
    return {
        "trade_id": position.trade_id,
        "ticker": position.ticker,
        "entry": position.entry_price,
        "mark": position.mark,
        "peak": position.peak,
        "bid": position.bid,
        "below_vwap_since_ms": position.below_vwap_since_ms,
    }
