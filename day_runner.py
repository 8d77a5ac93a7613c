"""Engines over a decoded day: the market absorbs each event once; each engine gets what it wants.

Backtests (single runs and sweep cells alike) run here. A `MarketState` absorbs every event of the
day once, and any number of engines share it. Each engine is a full `Engine` behind its own
`Pipeline` and journal, but is handed only the events that can change its trades: while it holds a position,
every event; while flat, only bars whose entry conditions hold. The events it skips could only
feed the market (already done, once) or produce log lines and market-wide alerts (stall, feed
errors), never a trade; tests check the trades and BUY/SELL alerts against the full replay path.

A sweep runs all its cells over one day in one pass, one pool task per day, each cell from an
empty journal. `day_is_independent` says when that equals carrying the earlier days' journal (no
position left open, no cooldown reaching into the day); the caller re-runs the other cells in order.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from config import Rules
from engine import Engine, SessionSource, entry_conditions_hold
from events import Alert, ContractSnapshot, Event, Log, Tick
from features_vector import PlannedFeatures
from feed import FeedDecoder
from market_calendar import MarketCalendar, Session, ny_ms
from market_state import MarketState, market_key, market_rules
from pipeline import Pipeline, TickSchedule, is_start
from pnl_tracker import Journal, TradeRow
from replay import state_for_day
from signals import Features, RecordedFeatures, RecordingFeatures
from tape_cache import (
    DecodedTape,
    decoder_key,
    features_path,
    load_decoded,
    read_features,
    unpack_quotes,
    write_features,
)

# A tape without a line for this long in session lost that stretch (a recorder or its network down): the
# decisions after it were made on the prices from before it, and the reports say so.
SILENCE_MS = 5 * 60_000


@dataclass(frozen=True, slots=True)
class CellDay:
    """One cell's outcome on one day, run from an empty journal."""

    trades: tuple[TradeRow, ...]
    open_at_end: bool
    last_exit_ms: int | None


@dataclass(frozen=True, slots=True)
class TapeFacts:
    """What one tape held, whatever the rules: what the reports' warnings of damaged and part days read."""

    tape: str
    session_date: str
    bars: int
    chains: int
    bad_lines: int
    lines: int  # readable lines (the meta line aside)
    last_ms: int  # the receive stamp of the last readable line (0: none)
    trading_day: bool  # False: its date has no session (a weekend, a holiday, a closed date)
    silences: tuple[tuple[int, int], ...] = ()  # see `session_silences`


@dataclass(frozen=True, slots=True)
class SweepDay:
    """Every cell's outcome on one tape, in the order the rules were given, and what the tape held."""

    session_date: str
    first_ms: int
    cells: tuple[CellDay, ...]
    facts: TapeFacts | None = None


def has_session(calendar: SessionSource, session_date: str) -> bool:
    """Whether the calendar has a session on `session_date` (an unreadable date is given the benefit)."""
    try:
        datetime.date.fromisoformat(session_date)
    except ValueError:
        return True
    return session_of(calendar, session_date) is not None


def session_of(calendar: SessionSource, session_date: str) -> Session | None:
    """The calendar's session on `session_date` (YYYY-MM-DD), or None (no session, or no such date)."""
    try:
        day = datetime.date.fromisoformat(session_date)
    except ValueError:
        return None
    return calendar.session_at(ny_ms(day, datetime.time(12)))


def session_silences(decoded: DecodedTape, calendar: SessionSource) -> tuple[tuple[int, int], ...]:
    """Each stretch of the session, from its open, with no tape line for SILENCE_MS or more, as (the last
    line before, the first line after); a tape that stops early is said apart (`incomplete_day_warnings`)."""
    session = session_of(calendar, decoded.session_date)
    if session is None:
        return ()
    silences, previous = [], session.open_ms
    for t, _kind, _body in decoded.lines:
        if t >= session.close_ms:
            break
        if t - previous >= SILENCE_MS:
            silences.append((previous, t))
        previous = max(previous, t)
    return tuple(silences)


def tape_facts(tape: Path, decoded: DecodedTape, market: MarketState, calendar: SessionSource) -> TapeFacts:
    """The facts of a tape once a market has absorbed its whole day."""
    return TapeFacts(
        tape=str(tape),
        session_date=decoded.session_date,
        bars=market.counters.bars,
        chains=market.counters.chains,
        bad_lines=decoded.bad_lines,
        lines=len(decoded.lines),
        last_ms=decoded.lines[-1][0] if decoded.lines else 0,
        trading_day=has_session(calendar, decoded.session_date),
        silences=session_silences(decoded, calendar),
    )


def day_market(tape: Path, rules: Rules, cache_dir: Path | None) -> tuple[MarketState, Callable[[], None]]:
    """A market for one day and a `save` to call once the whole day has gone through it.

    With a cache, the features come from an earlier run over the same decoded tape under the same
    market rules when there was one; otherwise they are computed, recorded and `save` caches them.
    Computed features are planned by `feed_day` from the whole decoded day (`features_vector`).
    """
    if cache_dir is None:
        return MarketState(rules), _nothing_to_save
    path = features_path(tape, rules, cache_dir)
    recorded = read_features(path)
    if recorded is not None:
        served = RecordedFeatures(recorded)
        return MarketState(rules, lambda: served), _nothing_to_save
    computed: list[Features] = []
    planner = PlannedFeatures(rules)
    market = MarketState(rules, lambda: RecordingFeatures(planner.source(), computed), planner=planner)
    return market, lambda: write_features(path, computed)


def _nothing_to_save() -> None:
    """The features came from the cache (or there is none)."""


def engine_pipeline(
    rules: Rules,
    calendar: SessionSource,
    market: MarketState,
    journal: Journal,
    *,
    on_alerts: Callable[[list[Alert]], None] | None = None,
    on_log: Callable[[Log], None] | None = None,
) -> Pipeline:
    """An engine reading `market`, behind a pipeline that journals its decisions."""
    engine = Engine(rules, calendar, market=market)
    return Pipeline(
        engine,
        journal,
        FeedDecoder.for_rules(rules),
        on_alerts=on_alerts or _ignore,
        on_log=on_log or _ignore,
    )


def _ignore(_: list[Alert] | Log) -> None:
    """Sweeps keep trades only: alert texts and log lines of the cells are dropped."""


def feed_day(
    decoded: DecodedTape,
    market: MarketState,
    pipelines: Sequence[Pipeline],
    after_line: Callable[[], None] | None = None,
) -> None:
    """Every line of the day to the market and the pipelines, ticks first, as `Pipeline.handle` orders them.

    Each engine adopts its journal's state first, as a replay does at a tape's first line. The whole
    day is known, so the market plans its features from it first (computed at once, served checked).
    """
    market.precompute_features(day_events(decoded))
    for pipeline in pipelines:
        adopt_journal(pipeline, decoded.session_date)
    ticks = TickSchedule()
    holding = _any_holding(pipelines)
    for t, kind, body in decoded.lines:
        if kind == "quotes" and not holding and after_line is None:
            # Flat engines take no quote and no tick (see `_dispatch`): the market takes the time.
            ticks.due(t)
            market.note_time(t)
            continue
        ran = _feed_line(t, kind, body, ticks, market, pipelines)
        if after_line is not None:
            after_line()
        if ran:
            holding = _any_holding(pipelines)


def adopt_journal(pipeline: Pipeline, session_date: str) -> None:
    """The engine takes its journal's state for `session_date`, as `replay._adopt_journal` does.

    A position opened on a LATER session (tapes run out of date order) is not this day's to follow
    or close: closing it now would put its exit before its entry. It stays open in the journal.
    """
    assert pipeline.journal is not None
    pipeline.engine.restore(state_for_day(pipeline.journal, session_date), session_date)


def _feed_line(
    t: int, kind: str, body: object, ticks: TickSchedule, market: MarketState, pipelines: Sequence[Pipeline]
) -> bool:
    """One line, the ticks of the seconds before it first; whether any engine took something."""
    ran = False
    if kind == "control" and is_start(body):
        # The downtime before a (re)start is not ticked, as in `Pipeline.control_line`: nothing was
        # decided while the daemon was down (a backtest had sold inside it, at the bid of before).
        for pipeline in pipelines:
            pipeline.engine.note_start(t)
        ticks.skip_to(t)
    for second in ticks.due(t):
        ran |= _dispatch(Tick(second * 1000), market, pipelines)
    if kind == "control":
        for pipeline in pipelines:
            pipeline.control(t, body)
        return True
    if kind == "quotes":
        return _dispatch_quotes(unpack_quotes(body), market, pipelines) or ran  # type: ignore[arg-type]
    for event in body:  # type: ignore[attr-defined]
        ran |= _dispatch(event, market, pipelines)
    return ran


def _any_holding(pipelines: Sequence[Pipeline]) -> bool:
    return any(pipeline.engine.position is not None for pipeline in pipelines)


def day_events(decoded: DecodedTape) -> Iterator[Event]:
    """What the features planner needs of a decoded day, in order: every event but the quotes, whose
    lines stand as a Tick of their time (quotes feed no feature; their time can roll the day)."""
    for t, kind, body in decoded.lines:
        if kind == "events":
            yield from body  # type: ignore[misc]
        elif kind == "quotes":
            yield Tick(t)


def _dispatch(event: Event, market: MarketState, pipelines: Sequence[Pipeline]) -> bool:
    """The market absorbs `event`; an engine gets it only if it can change that engine's trades:
    a bar whose entry conditions hold (every engine), or anything while the engine holds a position.
    Decided once per event, not per engine: a sweep day is ~150k events times every cell.
    Returns whether any engine took the event (only then can a position have opened or closed)."""
    fresh = market.apply(event)
    if fresh is not None and entry_conditions_hold(fresh):
        for pipeline in pipelines:
            pipeline.run(event)
        return bool(pipelines)
    ran = False
    for pipeline in pipelines:
        if pipeline.engine.position is not None:
            pipeline.run(event)
            ran = True
    return ran


def _dispatch_quotes(
    quotes: Sequence[ContractSnapshot], market: MarketState, pipelines: Sequence[Pipeline]
) -> bool:
    """A line of option quotes (all stamped with the line's time): each holding engine gets the first,
    which moves its clock, then only its own contract's. Exactly what every quote would do: at an
    unchanged time, another contract's quote changes no mark, and the peak save, the exit check and
    the summary it would run again have just run after the previous event."""
    market.apply(quotes[0])  # the market takes only the time of a quote: the rest change nothing
    ran = False
    for pipeline in pipelines:
        engine = pipeline.engine
        if engine.position is None:
            continue
        ran = True
        pipeline.run(quotes[0])
        for event in quotes[1:]:
            position = engine.position
            if position is None:
                break
            if event.quote.ticker == position.ticker:
                pipeline.run(event)
    return ran


def run_cells_on_day(
    tape: Path,
    rules: Sequence[Rules],
    closed_dates: Iterable[datetime.date] = (),
    cache_dir: Path | None = None,
) -> SweepDay:
    """Every rule set over one tape from empty journals; cells with equal market rules share a market."""
    closed = tuple(closed_dates)
    groups: dict[tuple[object, ...], tuple[MarketState, Callable[[], None], list[Pipeline]]] = {}
    pipelines = []
    calendars = []
    for cell_rules in rules:
        key = market_key(cell_rules)
        if key not in groups:
            groups[key] = (*day_market(tape, market_rules(cell_rules), cache_dir), [])
        market, _save, members = groups[key]
        calendar = MarketCalendar(cell_rules, closed)
        calendars.append(calendar)
        journal = Journal(Path(":memory:"), synchronous="NORMAL")  # a sweep's cells keep trades only
        pipeline = engine_pipeline(cell_rules, calendar, market, journal)
        members.append(pipeline)
        pipelines.append(pipeline)
    copies: dict[tuple[object, ...], DecodedTape] = {}
    for market, save, members in groups.values():
        key = decoder_key(market.rules)
        if key not in copies:
            copies[key] = load_decoded(tape, market.rules, cache_dir)
        feed_day(copies[key], market, members)
        save()
    if not pipelines:
        return SweepDay("", 0, ())
    first_market = next(iter(groups.values()))[0]
    decoded = copies[decoder_key(first_market.rules)]
    facts = tape_facts(tape, decoded, first_market, calendars[0])
    first_ms = decoded.lines[0][0] if decoded.lines else 0
    return SweepDay(decoded.session_date, first_ms, tuple(_cell_day(p) for p in pipelines), facts)


def _cell_day(pipeline: Pipeline) -> CellDay:
    assert pipeline.journal is not None
    trades = tuple(pipeline.journal.trades())
    pipeline.journal.close()
    engine = pipeline.engine
    return CellDay(trades, engine.position is not None, engine.last_exit_ms)


def day_is_independent(previous: Sequence[CellDay], day_first_ms: int, rules: Rules) -> bool:
    """Whether a day run from an empty journal equals running it after `previous` days (in order).

    Trades depend on earlier days only through a position still open at a day's end and through
    the cooldown after the latest exit; the lifetime P&L only changes alert texts.
    """
    if any(day.open_at_end for day in previous):
        return False
    exits = [day.last_exit_ms for day in previous if day.last_exit_ms is not None]
    return not exits or max(exits) + rules.cooldown_seconds * 1000 <= day_first_ms
