"""A seeded synthetic IWM/SPY session in Polygon's exact wire shapes, and a tape renderer.

`SyntheticMarket` is a model of one session: it answers what the vendor would have sent at any instant
(WS `A` frames, chain pages, single-contract snapshots, 1-second and minute aggregates), so a fake
Polygon server can serve arbitrary queries from it and `write_tape` can render a recording of it.

The price path is a random walk plus mean-reverting microstructure noise, shaped by a `DayScript` of
episodes:

- "burst": a sustained rise of `strength` percent with a volume surge;
- "pullback": a drop of `strength` percent whose first seconds are a sharp flush;
- "fade": a slow, steady bleed of `strength` percent on light volume;
- "grind": a slow, steady rise of `strength` percent (the close-out drift of the late trade);
- "chop": noisy sideways trading, `strength` times the normal noise;
- "quiet": thin trading at `strength` times normal volume, with seconds that have no trades;
- "lead": the benchmark (SPY) rises `strength` percent while the underlying trades sideways.

An episode's `volume` scales its volume on top of that (a burst at 0.25 is a surge against a quiet
stretch that is still light for the time of day). A `DayScript` may also hold pause windows: the
tape records the operator's pause switch at their ends, so a replay sees it at the same instants.

Outside bursts, a second whose volume would be a surge while the price also looks like momentum gets its
volume trimmed below the surge line: random data is full of accidental momentum signals, and the demo
must show the scripted trades, not noise. Bursts are the only place where the §4 entry conditions meet.

Option prices are Black-Scholes (r = 0, T = seconds to the 16:00 close / (365 * 86400)) with an ATM
volatility that rises into the close and a smile in standardised moneyness. The ATM level (~0.34-0.48)
is what real IWM 0DTE premiums imply with this calendar-time T; the 0.18 of the brief would price a
10:00 ATM call near $0.45 and leave the 0.30-0.45 delta band empty most of the afternoon.

Days of `random_script` carry a `Texture` (issue 12): bursts that fail as well as succeed, twice the
noise, an implied volatility that walks around the ATM curve and jumps in fast markets, spreads that widen
in fast markets and the last half hour, and the occasional one-second gap. `demo_script` has none, so the
demo day is unchanged. sim/README.md describes the model and every parameter.

Streamed option quotes (the options cluster, issue 11) come from the same model: `stream_quote` is the
chain's quote at whole seconds and, between them, the quote on a spot that moves in a straight line to
the second's close (`live_spot`). `write_tape(stream_quotes=N)` records them for the contracts a daemon
would stream; `build_stream_days` and `without_stream_quotes` give the exit-slippage benchmark its days
and their REST-only twins.
"""

from __future__ import annotations

import bisect
import datetime
import gzip
import hashlib
import heapq
import json
import math
import os
import random
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

# numpy loads `numpy.random` at its first use; a Ctrl-C that landed inside that import (the demo's first
# tenth of a second) lost its KeyboardInterrupt there, and the demo ran on to its end with status 0.
import numpy as np
import numpy.random  # noqa: F401

from config import Rules, parse_blackouts
from tape import TapeWriter

NY = ZoneInfo("America/New_York")
SESSION_SECONDS = 23400
EPISODE_KINDS = frozenset({"burst", "pullback", "fade", "grind", "chop", "quiet", "lead"})
REST_BASE = "https://api.massive.com"
YEAR_SECONDS = 365 * 86400
SQRT2 = math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Per-second scales, relative to price (IWM ~ $240: 3.2e-5 is ~0.8 cent).
RW_SIGMA = 3.2e-5
OU_PHI = 0.7
OU_SIGMA = 2.5e-5
SPY_BETA = 0.8
SPY_IDIO_SIGMA = 1.0e-5
IWM_MEAN_VOLUME = 1300.0
SPY_MEAN_VOLUME = 3200.0
MAX_GAP_SECONDS = 3
STRIKE_MARGIN = 12
STALE_QUOTE_MS = 300_000
OTHER_EXPIRY_AT_S = 1800
GUARD_TRIM = 0.85
PROFILE_DAYS = 10
PROFILE_FETCH_AT = datetime.time(9, 20)
# The demo runs with this ENTRY_BLACKOUTS setting; the demo day has a signal inside it.
DEMO_BLACKOUTS = "12:00-12:30"
DEMO_ENTRY_BLACKOUTS = parse_blackouts(DEMO_BLACKOUTS)
# Streamed option quotes (issue 11): checked every quarter second, emitted only when bid or ask changes.
STREAM_CHECK_MS = 250
STREAM_BAND_MIDDLE = 0.375  # the middle of the default 0.30-0.45 delta band
STREAM_KEEP_DELTA = (0.10, 0.90)
STREAM_CONNECT_BEFORE_OPEN_MS = 1500
STREAM_SUBSCRIBE_AFTER_MS = 1000  # after a chain snapshot's instant: its pages have arrived by then
STREAM_LATENCY_MS = (15, 60)
OPTION_EXCHANGES = (300, 301, 302, 303, 304, 307, 308, 309, 312, 313, 315, 316, 319, 322, 323, 325)
# What the demo tape streams: the four calls nearest the band (and any held one while its delta lasts).
DEMO_STREAM_QUOTES = 4
# The first day `build_stream_days` builds (the benchmark's synthetic days with streamed quotes).
STREAM_DAYS_FIRST = datetime.date(2025, 1, 2)
# Bumped whenever a seed's synthetic tape changes, so caches of tapes keyed by seed are not reused.
MODEL_VERSION = 3
# How a random day's burst ends (issue 12): drawn uniformly per burst; see sim/README.md.
BURST_OUTCOMES = ("run", "stall", "reversal", "fade", "false_breakout", "shakeout")
SPEED_WINDOW_S = 5
SMOOTH_SKEW = 0.02  # the smile's tilt without texture (the demo day)


class StreamQuote(NamedTuple):
    """One contract's quote on the options stream: prices rounded as the chain's, sizes, exchange ids."""

    bid: float
    ask: float
    bid_size: int
    ask_size: int
    bid_exchange: int
    ask_exchange: int


@dataclass(frozen=True, slots=True)
class Episode:
    """One scripted stretch of the day; see the module doc for what `strength` means per kind."""

    start: datetime.time
    kind: str
    seconds: int
    strength: float
    volume: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in EPISODE_KINDS:
            raise ValueError(f"unknown episode kind {self.kind!r}; expected one of {sorted(EPISODE_KINDS)}")
        if self.seconds <= 0:
            raise ValueError("an episode lasts at least one second")
        if self.volume <= 0:
            raise ValueError("an episode's volume scale must be positive")


@dataclass(frozen=True, slots=True)
class Texture:
    """What makes a random day rough (issue 12): a moving implied volatility, spreads, gaps.

    Speed is the underlying's move over the last `SPEED_WINDOW_S` seconds in units of its normal noise
    (a z-score); a market is fast by `max(0, speed - fast_speed)`, remembered with `fast_memory_s`
    decay. See sim/README.md for what each parameter does and why it has its value.
    """

    noise: float = 2.0  # random-walk and microstructure noise, times the smooth model's
    iv_walk: float = 0.003  # per-second sd of the slow log-vol deviation (a random walk)
    iv_revert_s: float = 900.0  # its mean-reversion time back to the ATM curve
    iv_fast_push: float = 0.008  # log-vol added per second per unit of fast market
    iv_crush_s: float = 90.0  # how fast that push decays once the market calms (the vol crush)
    iv_bounds: tuple[float, float] = (-0.4, 0.6)  # the deviation's clip (log units)
    fast_speed: float = 2.0
    fast_memory_s: float = 10.0
    spread_fast_ticks: float = 0.5  # extra spread ticks per unit of fast market (dithered)
    spread_max_extra: int = 3
    close_window_s: int = 1800  # the last 30 minutes quote one tick wider
    gaps_mean: float = 1.5  # gaps per session (Poisson)
    gap_dollars: tuple[float, float] = (0.10, 0.40)  # size of a gap, either way
    skew: float = 0.10  # slope of the smile in standardised moneyness (the smooth model's is 0.02)
    premium_median: float = 0.08  # a burst's call-IV premium (log-vol): the median of a lognormal
    premium_sd: float = 0.7  # its log-sd: 10-90 % of bursts between ~0.03 and ~0.20
    premium_cap: float = 0.35
    premium_ramp_s: float = 5.0  # how fast market makers mark it in once a burst starts
    premium_crush_s: tuple[float, float] = (30.0, 600.0)  # its decay time after the burst, log-uniform


@dataclass(frozen=True, slots=True)
class DayScript:
    """Everything that determines a synthetic session: same script, same bytes.

    `texture` None is the smooth model (the demo day); `random_script` days carry a `Texture`.
    """

    session_date: datetime.date
    seed: int
    open_price: float
    episodes: tuple[Episode, ...]
    pauses: tuple[tuple[datetime.time, datetime.time], ...] = ()
    texture: Texture | None = None

    def __post_init__(self) -> None:
        for start, end in self.pauses:
            if not start < end:
                raise ValueError(f"a pause must end after it starts: {start}-{end}")


def demo_script() -> DayScript:
    """The bundled demo day: four scripted trades, one per kind of exit, and four blocked signals.

    10:06 a burst that fails at once (stop loss): it tops out five seconds after the entry, low enough
    that the streamed marks meet the stop before the 20% giveback below VWAP; 11:12 a burst that drifts below VWAP (VWAP
    persistence); 13:12 a burst flushed by a sharp pullback (hard giveback); 15:12 a late burst
    that grinds up into the close (time stop at 15:55). The late burst is as late as the default
    4% spread limit allows: by 15:20 a 0.30-0.45 delta call is worth well under $0.25 and a penny
    spread is already wider than 4%. A fade before it leaves the spot ~$0.30 under a strike, so
    the band holds a contract when the burst fires. The 13:12 burst trades heavily enough (1.5x a
    burst's volume) to clear the relative-volume filter on its first signal bar.

    Four more bursts are signals the entry rules stop, each at least 25 minutes from a trade:
    10:43 inside the pause window 10:40-10:46; 11:42 after twenty quiet minutes, a surge against
    them but light for the time of day (relative volume); 12:10 inside `DEMO_BLACKOUTS`; 14:10
    right after SPY rallied 0.45% in four minutes while IWM went sideways (SPY leadership). The
    10:43 and 12:10 bursts are light as well, so without the pause or the blackout the relative-volume
    filter still stops them and the day keeps its four trades. Each blocked burst is followed by a
    fade that gives back exactly what its stretch added (the last fade of each stretch is tuned to
    the random walk's draws), so the path after it, and the four trades, are as without it.
    """
    t = datetime.time
    light = 0.25
    episodes = (
        Episode(t(9, 48, 0), "chop", 600, 1.2),
        Episode(t(10, 6, 12), "burst", 18, 0.072),
        Episode(t(10, 6, 30), "pullback", 67, 0.422),
        Episode(t(10, 8, 0), "chop", 900, 1.0),
        Episode(t(10, 23, 0), "quiet", 1200, 0.3),
        Episode(t(10, 43, 0), "burst", 40, 0.10, light),
        Episode(t(10, 43, 40), "fade", 180, 0.16789, 0.4),
        Episode(t(11, 12, 5), "burst", 80, 0.30),
        Episode(t(11, 13, 25), "chop", 40, 0.6),
        Episode(t(11, 14, 5), "fade", 150, 0.18),
        Episode(t(11, 20, 0), "quiet", 1320, 0.3),
        Episode(t(11, 42, 0), "burst", 40, 0.10, light),
        Episode(t(11, 42, 40), "fade", 180, 0.10, 0.4),
        Episode(t(11, 45, 40), "quiet", 1460, 0.3),
        Episode(t(12, 10, 0), "burst", 40, 0.10, light),
        Episode(t(12, 10, 40), "fade", 180, 0.18742, 0.4),
        Episode(t(12, 13, 40), "quiet", 380, 0.3),
        Episode(t(12, 30, 0), "chop", 1200, 1.0),
        Episode(t(13, 12, 0), "burst", 100, 0.28, 1.5),
        Episode(t(13, 13, 40), "chop", 42, 0.5),
        Episode(t(13, 14, 22), "pullback", 70, 0.36),
        Episode(t(13, 30, 0), "quiet", 1500, 0.35),
        Episode(t(14, 6, 0), "lead", 240, 0.45),
        Episode(t(14, 10, 0), "burst", 40, 0.12),
        Episode(t(14, 10, 40), "fade", 180, 0.18141),
        Episode(t(14, 20, 0), "chop", 2160, 1.0),
        Episode(t(14, 56, 0), "fade", 600, 0.12),
        Episode(t(15, 12, 0), "burst", 80, 0.16),
        Episode(t(15, 13, 20), "grind", 2800, 0.14),
    )
    pauses = ((t(10, 40), t(10, 46)),)
    return DayScript(datetime.date(2025, 10, 2), 20251002, 240.12, episodes, pauses)


def random_script(session_date: datetime.date, seed: int) -> DayScript:
    """A plausible random day for backtests: 3-6 bursts that succeed or fail, with `Texture()`.

    Each burst's outcome is drawn uniformly from `BURST_OUTCOMES` (see `_burst_group`).
    """
    rng = random.Random(f"script:{session_date.isoformat()}:{seed}")
    open_price = _cents(240.0 * math.exp(rng.gauss(0.0, 0.04)))
    episodes: list[Episode] = []
    cursor = 15 * 60 + rng.randint(0, 600)
    for _ in range(rng.randint(3, 6)):
        cursor += rng.randint(900, 3600)
        if cursor > SESSION_SECONDS - 1800:
            break
        episodes += _burst_group(rng, cursor, rng.choice(BURST_OUTCOMES))
        cursor += 400
    if rng.random() < 0.7:
        episodes.append(Episode(_clock(rng.randint(7200, 10800)), "quiet", rng.randint(600, 2400), 0.3))
    episodes.sort(key=lambda e: e.start)
    return DayScript(session_date, seed, open_price, tuple(_drop_overlaps(episodes)), texture=Texture())


def outcome_script(
    session_date: datetime.date,
    seed: int,
    outcomes: Iterable[str] = BURST_OUTCOMES,
    *,
    first: datetime.time = datetime.time(9, 45),
    every_s: int = 480,
) -> DayScript:
    """A textured day whose bursts have the given outcomes, one every `every_s` from `first`.

    The bursts' sizes and what follows them are drawn from the seed as in `random_script`; meant for
    short tapes (tests), where a random day's first burst may come too late.
    """
    rng = random.Random(f"outcomes:{session_date.isoformat()}:{seed}")
    start = _seconds_from_open(first)
    episodes: list[Episode] = []
    for n, outcome in enumerate(outcomes):
        if outcome not in BURST_OUTCOMES:
            raise ValueError(f"unknown burst outcome {outcome!r}; expected one of {BURST_OUTCOMES}")
        episodes += _burst_group(rng, start + n * every_s, outcome)
    return DayScript(session_date, seed, 240.0, tuple(_drop_overlaps(episodes)), texture=Texture())


def _burst_group(rng: random.Random, at_s: int, outcome: str) -> list[Episode]:
    """A burst and what follows it, back to back from `at_s`.

    run: a grind higher that may pull back 25-50 % of its gain and then go on or not; stall: chop,
    then a slow bleed of part of the move; reversal: a decline in one to three legs back through the
    burst's start, which may bounce; fade: a slow bleed of part, all or more of it; false_breakout: a
    short, weak burst, a few seconds of chop, then a decline like a reversal's; shakeout: a dip, a
    second burst and a run (a stop that is too tight sells the dip). Depths are drawn log-uniformly
    over wide ranges (`_depth`), so the option's drawdown spreads over 5-50 % of its entry price.
    """
    # A failing burst is short, at the pace of a lasting one: at the entry signal the two look alike.
    fails = outcome not in ("run", "shakeout")
    burst_s = rng.randint(15, 45) if fails else rng.randint(40, 120)
    pace = rng.uniform(0.12, 0.35) / 80.0
    strength = round(pace * (80 if not fails else burst_s), 3)
    steps: list[tuple[str, int, float]] = [("burst", burst_s, strength)]
    if outcome == "run":
        steps += _run_steps(rng, strength)
    elif outcome == "stall":
        steps.append(("chop", rng.randint(120, 400), round(rng.uniform(0.8, 1.4), 2)))
        steps.append(("fade", rng.randint(120, 300), _depth(rng, strength, 0.2, 1.5)))
    elif outcome == "reversal":
        steps += _decline_steps(rng, _depth(rng, strength, 0.5, 2.5))
    elif outcome == "fade":
        steps.append(("fade", rng.randint(180, 480), _depth(rng, strength, 0.4, 2.0)))
    elif outcome == "false_breakout":
        steps.append(("chop", rng.randint(20, 60), 1.0))
        steps += _decline_steps(rng, _depth(rng, strength, 0.8, 2.5))
    else:
        steps.append(("pullback", rng.randint(20, 60), _depth(rng, strength, 0.3, 0.9)))
        steps.append(("burst", rng.randint(40, 90), round(rng.uniform(0.12, 0.30), 3)))
        steps += _run_steps(rng, 0.2)
    group = []
    for kind, seconds, size in steps:
        group.append(Episode(_clock(at_s), kind, seconds, size))
        at_s += seconds
    return group


def _depth(rng: random.Random, strength: float, low: float, high: float) -> float:
    """`strength` times a log-uniform factor in [low, high]: shallow and deep moves equally likely per octave."""
    return round(strength * math.exp(rng.uniform(math.log(low), math.log(high))), 3)


def _run_steps(rng: random.Random, gained: float) -> list[tuple[str, int, float]]:
    """A run after a burst that gained `gained` %: a grind; then, six times in ten, a pullback of
    25-50 % of the gain so far (a flush or a slow bleed), after which it goes on (half the time) or
    bleeds away the rest."""
    first = round(rng.uniform(0.08, 0.25), 3)
    steps = [("grind", rng.randint(150, 600), first)]
    if rng.random() >= 0.6:
        return [*steps, ("grind", rng.randint(150, 600), round(rng.uniform(0.05, 0.15), 3))]
    back = round((gained + first) * rng.uniform(0.25, 0.50), 3)
    if rng.random() < 0.5:
        steps.append(("pullback", rng.randint(30, 120), back))
    else:
        steps.append(("fade", rng.randint(60, 240), back))
    if rng.random() < 0.5:
        steps.append(("grind", rng.randint(150, 600), round(rng.uniform(0.08, 0.25), 3)))
    else:
        rest = gained + first - back
        steps.append(("fade", rng.randint(120, 400), round(rest * rng.uniform(0.5, 1.2), 3)))
    return steps


def _decline_steps(rng: random.Random, depth: float) -> list[tuple[str, int, float]]:
    """A decline of `depth` % in one to three legs with pauses of chop between them; four times in ten
    it then bounces back 20-70 % of the way (a stop that was too tight sold the low)."""
    legs = rng.randint(1, 3)
    shares = [rng.uniform(0.3, 1.0) for _ in range(legs)]
    steps: list[tuple[str, int, float]] = []
    for n, share in enumerate(shares):
        if n:
            steps.append(("chop", rng.randint(20, 90), round(rng.uniform(0.6, 1.2), 2)))
        size = round(depth * share / sum(shares), 3)
        steps.append(
            ("pullback", rng.randint(30, 120), size) if n == 0 else ("fade", rng.randint(40, 150), size)
        )
    if rng.random() < 0.4:
        steps.append(("grind", rng.randint(60, 300), round(depth * rng.uniform(0.2, 0.7), 3)))
    return steps


def _drop_overlaps(episodes: list[Episode]) -> list[Episode]:
    kept: list[Episode] = []
    end = -1
    for episode in episodes:
        start = _seconds_from_open(episode.start)
        if start >= end:
            kept.append(episode)
            end = start + episode.seconds
    return kept


def _clock(seconds_from_open: int) -> datetime.time:
    total = 9 * 3600 + 30 * 60 + seconds_from_open
    return datetime.time(total // 3600, total % 3600 // 60, total % 60)


def _seconds_from_open(at: datetime.time) -> int:
    return at.hour * 3600 + at.minute * 60 + at.second - (9 * 3600 + 30 * 60)


def session_open_ms(day: datetime.date) -> int:
    """Unix ms of 09:30 New York time on `day`."""
    return int(datetime.datetime.combine(day, datetime.time(9, 30), NY).timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class _Regime:
    drift: np.ndarray
    rw_scale: np.ndarray
    ou_scale: np.ndarray
    volume: np.ndarray
    gap_prob: np.ndarray
    pull: np.ndarray
    guarded: np.ndarray
    spy_drift: np.ndarray
    jump: np.ndarray  # a gap: log return added in one second (texture only)


def intraday_volume_shape(n: int = SESSION_SECONDS) -> np.ndarray:
    """U-shaped relative volume per second of the session, mean 1: heavy open and close, light midday."""
    hours = np.arange(n) / 3600.0
    left = 6.5 - hours
    shape = 0.62 + 2.4 * np.exp(-hours / 0.3) + 0.55 * np.exp(-left / 0.35) + 0.3 * np.exp(-left / 1.6)
    return shape / shape.mean()


def _regime(script: DayScript) -> _Regime:
    n = SESSION_SECONDS
    regime = _Regime(
        drift=np.zeros(n),
        rw_scale=np.ones(n),
        ou_scale=np.ones(n),
        volume=intraday_volume_shape(n),
        gap_prob=np.zeros(n),
        pull=np.zeros(n),
        guarded=np.ones(n, dtype=bool),
        spy_drift=np.zeros(n),
        jump=_gaps(script, n),
    )
    for episode in script.episodes:
        start = _seconds_from_open(episode.start)
        stop = min(n, start + episode.seconds)
        if 0 <= start < stop:
            _apply_episode(regime, episode, start, stop)
    if script.texture is not None:
        regime.rw_scale[:] *= script.texture.noise
        regime.ou_scale[:] *= script.texture.noise
    return regime


def _gaps(script: DayScript, n: int) -> np.ndarray:
    """The texture's gaps: a Poisson number of one-second jumps of `gap_dollars` either way.

    Drawn from their own generator so the bars' draws (and a day without texture) are unchanged.
    """
    jumps = np.zeros(n)
    texture = script.texture
    if texture is None:
        return jumps
    rng = np.random.default_rng([script.seed, 12, 1])
    count = int(rng.poisson(texture.gaps_mean))
    at = rng.integers(300, n - 600, size=count)
    sizes = rng.uniform(*texture.gap_dollars, size=count) * rng.choice((-1.0, 1.0), size=count)
    jumps[at] = np.log1p(sizes / script.open_price)
    return jumps


def _apply_episode(regime: _Regime, episode: Episode, start: int, stop: int) -> None:
    span = slice(start, stop)
    u = (np.arange(stop - start) + 0.5) / (stop - start)
    move = episode.strength / 100.0
    kind = episode.kind
    if kind == "burst":
        weights = 0.5 + 0.5 * np.sin(np.pi * u)
        regime.drift[span] = move * weights / weights.sum()
        regime.volume[span] *= 3.5 + 3.0 * np.sin(np.pi * u)
        regime.rw_scale[span] = 1.3
        regime.ou_scale[span] = 1.1
        regime.guarded[span] = False
    elif kind == "pullback":
        regime.drift[span] = -move * _flush_weights(stop - start)
        regime.volume[span] *= np.where(np.arange(stop - start) < _flush_seconds(stop - start), 3.5, 2.0)
        regime.rw_scale[span] = 1.1
    elif kind == "fade":
        regime.drift[span] = -move / (stop - start)
        regime.volume[span] *= 0.85
        regime.rw_scale[span] = 0.25
        regime.ou_scale[span] = 0.5
    elif kind == "grind":
        # Quiet enough that the drift keeps every close near or above the trailing VWAP.
        regime.drift[span] = move / (stop - start)
        regime.rw_scale[span] = 0.12
        regime.ou_scale[span] = 0.4
    elif kind == "chop":
        regime.rw_scale[span] = 0.8 * episode.strength
        regime.ou_scale[span] = 1.6 * episode.strength
        regime.pull[span] = 0.02
        regime.volume[span] *= 1.1
    elif kind == "lead":
        regime.spy_drift[span] = move / (stop - start)
        regime.rw_scale[span] = 0.5
        regime.ou_scale[span] = 0.7
    else:
        regime.rw_scale[span] = 0.35
        regime.ou_scale[span] = 0.4
        regime.volume[span] *= episode.strength
        regime.gap_prob[span] = 0.3
    regime.volume[span] *= episode.volume


def _flush_seconds(length: int) -> int:
    return int(min(8, max(3, round(0.15 * length))))


def _flush_weights(length: int) -> np.ndarray:
    """55% of a pullback happens in its first few seconds, the rest decays over the remainder."""
    flush = _flush_seconds(length)
    weights = np.zeros(length)
    weights[:flush] = 0.55 / flush
    rest = length - flush
    if rest > 0:
        tail = np.exp(-np.arange(rest) / max(1.0, rest / 3.0))
        weights[flush:] = 0.45 * tail / tail.sum()
    else:
        weights *= 1.0 / 0.55
    return weights


class _EntryWatch:
    """Tracks the §4 entry features per bar so non-burst seconds can be kept from signalling."""

    def __init__(self, rules: Rules) -> None:
        self._rules = rules
        self._vwap_bars: deque[tuple[int, float, float]] = deque()
        self._pv = 0.0
        self._v = 0.0
        self._vwap_series: deque[tuple[int, float]] = deque()
        self._closes: deque[tuple[int, float]] = deque()
        self._volumes: deque[tuple[int, float]] = deque()
        self._sorted_volumes: list[float] = []

    def surge_line(self, s: int) -> float | None:
        """The volume percentile a bar starting at second `s` must beat, or None with too few bars."""
        self._evict(s)
        if len(self._sorted_volumes) < self._rules.volume_min_bars:
            return None
        return _percentile(self._sorted_volumes, self._rules.volume_percentile)

    def looks_like_momentum(self, s: int, close: float, vw: float, v: float) -> bool:
        """Close above the rolling VWAP, VWAP rising and positive slope, each with a little slack."""
        self._evict(s)
        pv, vol = self._pv + vw * v, self._v + v
        vwap = pv / vol if vol > 0 else close
        if close <= vwap - 0.006:
            return False
        window = self._rules.vwap_rising_seconds
        points = [(x, y) for x, y in self._vwap_series if x > s - window] + [(s, vwap)]
        if len(points) < self._rules.vwap_rising_min_points or _slope(points) <= -1e-7:
            return False
        closes = [(x, y) for x, y in self._closes if x > s - self._rules.momentum_window_seconds]
        closes.append((s, close))
        return len(closes) >= 2 and _slope(closes) > -1e-7

    def add(self, s: int, close: float, vw: float, v: float) -> None:
        """Take in a bar (after any trimming)."""
        self._evict(s)
        self._vwap_bars.append((s, vw * v, v))
        self._pv += vw * v
        self._v += v
        vwap = self._pv / self._v if self._v > 0 else close
        _push_window(self._vwap_series, (s, vwap), s - self._rules.vwap_rising_seconds)
        _push_window(self._closes, (s, close), s - self._rules.momentum_window_seconds)
        self._volumes.append((s, v))
        bisect.insort(self._sorted_volumes, v)

    def _evict(self, s: int) -> None:
        """Drop what leaves the windows of a bar starting at `s`: VWAP (s-60, s], volume (s-1200, s)."""
        while self._vwap_bars and self._vwap_bars[0][0] <= s - self._rules.vwap_window_seconds:
            _, old_pv, old_v = self._vwap_bars.popleft()
            self._pv -= old_pv
            self._v -= old_v
        horizon = s - self._rules.volume_window_seconds
        while self._volumes and self._volumes[0][0] <= horizon:
            _, old = self._volumes.popleft()
            del self._sorted_volumes[bisect.bisect_left(self._sorted_volumes, old)]


def _push_window(window: deque[tuple[int, float]], item: tuple[int, float], horizon: int) -> None:
    window.append(item)
    while window and window[0][0] <= horizon:
        window.popleft()


def _percentile(sorted_values: list[float], pct: float) -> float:
    rank = pct / 100.0 * (len(sorted_values) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope; x is shifted to the last point to keep the sums small."""
    x0 = points[-1][0]
    n = len(points)
    sx = sy = sxx = sxy = 0.0
    for x, y in points:
        x -= x0
        sx += x
        sy += y
        sxx += x * x
        sxy += x * y
    den = n * sxx - sx * sx
    return (n * sxy - sx * sy) / den if den else 0.0


@dataclass(frozen=True, slots=True)
class _Bars:
    """One symbol's per-second bars as parallel arrays (index = seconds since the open)."""

    present: np.ndarray
    o: np.ndarray
    h: np.ndarray
    l: np.ndarray  # noqa: E741 - Polygon's own field name
    c: np.ndarray
    vw: np.ndarray
    v: np.ndarray
    av: np.ndarray
    a: np.ndarray
    n: np.ndarray
    official_open: float


@dataclass(frozen=True, slots=True)
class _BarDraws:
    """Pre-drawn random numbers for one symbol, so the draw order never depends on the path.

    Plain lists: the per-second loops index them one at a time, which is slow on numpy scalars.
    """

    rw: list[float]
    ou: list[float]
    vol: list[float]
    gap: list[float]
    block: list[float]
    block_size: list[float]
    wick_up: list[float]  # in dollars: 0, 1 or 2 ticks
    wick_down: list[float]
    vw_pos: list[float]
    vw_out: list[float]
    trade_size: list[float]
    extra: list[float]

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int) -> _BarDraws:
        return cls(
            rw=rng.standard_normal(n).tolist(),
            ou=rng.standard_normal(n).tolist(),
            vol=rng.standard_normal(n).tolist(),
            gap=rng.random(n).tolist(),
            block=rng.random(n).tolist(),
            block_size=rng.uniform(6.0, 20.0, n).tolist(),
            wick_up=_wick_ticks(rng.random(n)),
            wick_down=_wick_ticks(rng.random(n)),
            vw_pos=rng.random(n).tolist(),
            vw_out=rng.random(n).tolist(),
            trade_size=rng.uniform(60.0, 180.0, n).tolist(),
            extra=rng.random(n).tolist(),
        )


def _iwm_bars(
    script: DayScript, regime: _Regime, draws: _BarDraws, rng: np.random.Generator
) -> tuple[_Bars, np.ndarray]:
    """IWM bars and the underlying price level per second (the path without microstructure noise)."""
    n = SESSION_SECONDS
    drift, rw_scale, ou_scale = regime.drift.tolist(), regime.rw_scale.tolist(), regime.ou_scale.tolist()
    pull, gap_prob, guarded = regime.pull.tolist(), regime.gap_prob.tolist(), regime.guarded.tolist()
    jump = regime.jump.tolist()
    base_volume = (IWM_MEAN_VOLUME * regime.volume).tolist()
    columns: list[list[float]] = [[0.0] * n for _ in range(6)]
    present = [False] * n
    levels = [0.0] * n
    watch = _EntryWatch(Rules())
    level = anchor = script.open_price
    noise = log_vol = 0.0
    prev_close = script.open_price
    gap_run = 0
    for i in range(n):
        if pull[i] == 0.0:
            anchor = level
        level *= math.exp(drift[i] + RW_SIGMA * rw_scale[i] * draws.rw[i])
        if jump[i]:
            level *= math.exp(jump[i])
        level += pull[i] * (anchor - level)
        noise = OU_PHI * noise + OU_SIGMA * ou_scale[i] * draws.ou[i]
        log_vol = 0.6 * log_vol + 0.4 * draws.vol[i]
        levels[i] = level
        if draws.gap[i] < gap_prob[i] and gap_run < MAX_GAP_SECONDS:
            gap_run += 1
            continue
        gap_run = 0
        close = _cents(level * (1.0 + noise))
        o, h, lo, vw = _bar_prices(prev_close, close, draws, i)
        v = _bar_volume(base_volume[i], log_vol, draws, i, guarded[i])
        if guarded[i]:
            v = _trim_accidental_surge(watch, i, close, vw, v)
        watch.add(i, close, vw, v)
        present[i] = True
        for column, value in zip(columns, (o, h, lo, close, vw, v), strict=True):
            column[i] = value
        prev_close = close
    o_, h_, l_, c_, vw_, v_ = (np.asarray(column) for column in columns)
    bars = _finish_bars(np.asarray(present), o_, h_, l_, c_, vw_, v_, draws, rng, 650_000.0)
    return bars, np.asarray(levels)


def _trim_accidental_surge(watch: _EntryWatch, i: int, close: float, vw: float, v: float) -> float:
    line = watch.surge_line(i)
    if line is None or v <= GUARD_TRIM * line:
        return v
    if not watch.looks_like_momentum(i, close, vw, v):
        return v
    return float(max(1, math.floor(GUARD_TRIM * line)))


def _bar_volume(base: float, log_vol: float, draws: _BarDraws, i: int, guarded: bool) -> float:
    # Log-AR(1) noise (sd 0.5) clusters volume; rare block prints add a heavy tail outside bursts.
    v = base * math.exp(log_vol - 0.125)
    if guarded and draws.block[i] < 0.002:
        v *= draws.block_size[i]
    return float(max(1, int(v)))


def _bar_prices(
    prev_close: float, close: float, draws: _BarDraws, i: int
) -> tuple[float, float, float, float]:
    o = prev_close
    h = _cents(max(o, close) + draws.wick_up[i])
    lo = _cents(min(o, close) - draws.wick_down[i])
    vw = lo + (h - lo) * (0.25 + 0.5 * draws.vw_pos[i])
    if draws.vw_out[i] < 0.004:
        # Odd lots can print outside the bar's range (polygon.md §2.4).
        vw = h + 0.003 if draws.vw_out[i] < 0.002 else lo - 0.003
    return o, h, lo, _round4(vw)


def _wick_ticks(u: np.ndarray) -> list[float]:
    """Most seconds trade inside open-close; some reach one or two ticks beyond."""
    return np.where(u < 0.6, 0.0, np.where(u < 0.9, 0.01, 0.02)).tolist()


def _finish_bars(
    present: np.ndarray,
    o: np.ndarray,
    h: np.ndarray,
    lo: np.ndarray,
    c: np.ndarray,
    vw: np.ndarray,
    v: np.ndarray,
    draws: _BarDraws,
    rng: np.random.Generator,
    premarket_volume: float,
) -> _Bars:
    """Day VWAP (`a`), cumulative volume (`av`) with premarket trades, trade counts."""
    first = int(np.argmax(present))
    pre_volume = float(int(premarket_volume * rng.uniform(0.8, 1.2)))
    pre_vwap = o[first] * (1.0 + rng.normal(0.0, 0.001))
    # Some trades update volume but not the bar (polygon.md §2.5): av grows a little faster than Σv.
    extra = np.where(present, np.floor(v * 0.02 * np.asarray(draws.extra)), 0.0)
    av = pre_volume + np.cumsum(v + extra)
    a = (pre_volume * pre_vwap + np.cumsum(vw * v)) / (pre_volume + np.cumsum(v))
    trades = np.maximum(1, np.round(v / np.asarray(draws.trade_size)))
    return _Bars(present, o, h, lo, c, vw, v, av, np.round(a, 4), trades, float(o[first]))


def _spy_bars(
    script: DayScript, iwm_levels: np.ndarray, regime: _Regime, draws: _BarDraws, rng: np.random.Generator
) -> _Bars:
    n = SESSION_SECONDS
    shape = intraday_volume_shape(n)
    spy_open = _cents(665.0 * math.exp(rng.normal(0.0, 0.01)))
    iwm_returns = np.diff(np.log(iwm_levels), prepend=math.log(script.open_price))
    log_level = np.cumsum(SPY_BETA * iwm_returns + SPY_IDIO_SIGMA * np.asarray(draws.rw) + regime.spy_drift)
    noise = _ar1(np.asarray(draws.ou) * OU_SIGMA * 0.8, OU_PHI)
    closes = np.round(spy_open * np.exp(log_level) * (1.0 + noise), 2)
    log_vol = _ar1(np.asarray(draws.vol) * 0.4, 0.6)
    surge = 1.0 + 0.3 * (regime.volume / shape - 1.0)
    volumes = np.maximum(1.0, np.floor(SPY_MEAN_VOLUME * shape * surge * np.exp(log_vol - 0.125)))
    close_list = closes.tolist()
    prev = [spy_open, *close_list[:-1]]
    rows = [_bar_prices(prev[i], close_list[i], draws, i) for i in range(n)]
    opens, highs, lows, vws = (np.asarray(col) for col in zip(*rows, strict=True))
    present = np.ones(n, dtype=bool)
    return _finish_bars(present, opens, highs, lows, closes, vws, volumes, draws, rng, 2_800_000.0)


def _ar1(shocks: np.ndarray, phi: float) -> np.ndarray:
    out = np.empty_like(shocks)
    acc = 0.0
    for i, shock in enumerate(shocks.tolist()):
        acc = phi * acc + shock
        out[i] = acc
    return out


def _texture_paths(script: DayScript, levels: np.ndarray) -> tuple[list[float] | None, list[int] | None]:
    """Per second: the ATM volatility's factor and the spread's extra ticks (None, None without texture).

    The log-vol deviation is a mean-reverting random walk pushed up while the market is fast; the
    spread gains dithered ticks in fast markets and one tick in the last `close_window_s`.
    """
    texture = script.texture
    if texture is None:
        return None, None
    n = len(levels)
    rng = np.random.default_rng([script.seed, 12, 2])
    shocks, dither = rng.standard_normal(n).tolist(), rng.random(n).tolist()
    log_level = np.log(levels)
    lagged = np.concatenate((np.full(SPEED_WINDOW_S, log_level[0]), log_level[:-SPEED_WINDOW_S]))
    speed = np.abs(log_level - lagged) / (texture.noise * RW_SIGMA * math.sqrt(SPEED_WINDOW_S))
    # log1p: a flush ten times as fast as a burst is not ten times as frightening to market makers.
    over = np.log1p(np.maximum(0.0, speed - texture.fast_speed)).tolist()
    keep = math.exp(-1.0 / texture.fast_memory_s)
    revert, crush = 1.0 - 1.0 / texture.iv_revert_s, 1.0 - 1.0 / texture.iv_crush_s
    low, high = texture.iv_bounds
    close_from = n - texture.close_window_s
    premium = _burst_premium(script, texture, levels).tolist()
    factors, extras = [1.0] * n, [0] * n
    fast = slow = push = 0.0
    for i in range(n):
        fast = max(over[i], fast * keep)
        slow = slow * revert + texture.iv_walk * shocks[i]
        push = push * crush + texture.iv_fast_push * fast
        factors[i] = math.exp(min(high, max(low, slow + push + premium[i])))
        extra = min(texture.spread_max_extra, int(texture.spread_fast_ticks * fast + dither[i]))
        extras[i] = extra + (1 if i >= close_from else 0)
    return factors, extras


def _burst_premium(script: DayScript, texture: Texture, levels: np.ndarray) -> np.ndarray:
    """Per second, the log-vol that buyers of calls add during each burst and take out after it.

    Each burst draws a premium (lognormal, capped) and a crush time (log-uniform). Market makers
    mark it in within the burst's first `premium_ramp_s` seconds, so a buyer who chases the burst
    pays it. After the burst it is held in proportion to how much of the burst's move the
    (noise-free) price still holds, so it comes out at once when the price falls back (a falling
    spot cheapens the calls' volatility as well as their intrinsic value), and otherwise decays with
    the crush time. Drawn from its own generator, in the order of the script's bursts.
    """
    n = len(levels)
    out = np.zeros(n)
    rng = np.random.default_rng([script.seed, 12, 3])
    low, high = (math.log(x) for x in texture.premium_crush_s)
    for episode in script.episodes:
        if episode.kind != "burst":
            continue
        size = min(texture.premium_cap, texture.premium_median * math.exp(texture.premium_sd * rng.normal()))
        crush_s = math.exp(rng.uniform(low, high))
        start = _seconds_from_open(episode.start)
        end = min(n, start + episode.seconds)
        stop = min(n, end + int(5 * crush_s))
        if not 0 <= start < end:
            continue
        move = levels[end - 1] - levels[start]
        if move <= 0:
            continue  # noise swamped the burst: nobody chased it
        seconds = np.arange(start, stop)
        held = np.clip((levels[start:stop] - levels[start]) / move, 0.0, 1.0)
        ramp = np.minimum(1.0, (seconds - start + 1) / texture.premium_ramp_s)
        decay = np.exp(-np.maximum(0, seconds - end) / crush_s)
        out[start:stop] += size * np.where(seconds < end, ramp, held * decay)
    return out


def norm_cdf(x: float) -> float:
    """Standard normal CDF by math.erf."""
    return 0.5 * (1.0 + math.erf(x / SQRT2))


def atm_vol(elapsed_fraction: float) -> float:
    """ATM implied volatility: ~0.34 at the open, rising to ~0.48 into the close."""
    frac = min(1.0, max(0.0, elapsed_fraction))
    return 0.34 + 0.14 * frac * frac


def smile_vol(strike: float, spot: float, t_years: float, atm: float, skew: float = SMOOTH_SKEW) -> float:
    """Implied volatility with a smile in standardised moneyness (higher away from the money).

    `skew` tilts it (lower for higher strikes). The smile is fixed in moneyness, so it moves with the
    spot: when the spot drops, a call above it sits further up the tilted wing and its volatility falls.
    """
    m = math.log(strike / spot) / (atm * math.sqrt(t_years))
    m = min(6.0, max(-6.0, m))
    return atm * (1.0 + 0.035 * m * m - skew * m)


class CallValue(NamedTuple):
    """Black-Scholes value and greeks of a call (r = 0); theta per day, vega per vol point.

    A NamedTuple rather than a frozen dataclass: a demo tape builds a hundred thousand of them.
    """

    price: float
    delta: float
    gamma: float
    theta: float
    vega: float


def bs_call(spot: float, strike: float, t_years: float, sigma: float) -> CallValue:
    """Black-Scholes call with r = 0."""
    root_t = math.sqrt(t_years)
    sd = sigma * root_t
    d1 = (math.log(spot / strike) + 0.5 * sd * sd) / sd
    nd1 = norm_cdf(d1)
    price = spot * nd1 - strike * norm_cdf(d1 - sd)
    density = INV_SQRT_2PI * math.exp(-0.5 * d1 * d1)
    return CallValue(
        price=max(0.0, price),
        delta=nd1,
        gamma=density / (spot * sd),
        theta=-spot * density * sigma / (2.0 * root_t) / 365.0,
        vega=spot * density * root_t / 100.0,
    )


def occ_ticker(root: str, expiry: datetime.date, strike: float) -> str:
    """`O:IWM251002C00243000` for a call."""
    return f"O:{root}{expiry:%y%m%d}C{round(strike * 1000):08d}"


@dataclass(frozen=True, slots=True)
class _Contract:
    strike: float
    expiry: datetime.date
    ticker: str
    open_interest: int
    volume_scale: float
    trap: str = ""

    @property
    def details(self) -> dict[str, Any]:
        """The `details` object of the vendor's result."""
        return {
            "contract_type": "call",
            "exercise_style": "american",
            "expiration_date": self.expiry.isoformat(),
            "shares_per_contract": 100,
            "strike_price": int(self.strike) if self.strike.is_integer() else self.strike,
            "ticker": self.ticker,
        }


class _OptionBook:
    """Same-day IWM calls priced off the synthetic spot path; pure function of (script, time)."""

    def __init__(self, market: SyntheticMarket, spot_by_second: np.ndarray, volume_shape: np.ndarray) -> None:
        self._market = market
        self._seed = market.script.seed
        self._day = market.script.session_date
        self._spot = spot_by_second
        self._volume_shape = volume_shape
        texture = market.script.texture
        self._skew = SMOOTH_SKEW if texture is None else texture.skew
        low = math.floor(float(spot_by_second.min())) - STRIKE_MARGIN
        high = math.ceil(float(spot_by_second.max())) + STRIKE_MARGIN
        self._contracts: dict[tuple[float, datetime.date, str], _Contract] = {}
        self._last_moment: tuple[tuple[int, datetime.date] | None, tuple[float, float, float]] = (
            None,
            (0, 0, 0),
        )
        self._cum_volume: dict[tuple[float, datetime.date], np.ndarray] = {}
        self._minute_stats: dict[tuple[float, datetime.date], _MinuteStats] = {}
        self.listed = tuple(self._contract(float(k), self._day, "") for k in range(low, high + 1))

    @property
    def session_open_ms(self) -> int:
        """The session's opening instant (Unix ms)."""
        return self._market.session_open_ms

    def _contract(self, strike: float, expiry: datetime.date, trap: str) -> _Contract:
        key = (strike, expiry, trap)
        if key not in self._contracts:
            self._contracts[key] = self._new_contract(strike, expiry, trap)
        return self._contracts[key]

    def _new_contract(self, strike: float, expiry: datetime.date, trap: str) -> _Contract:
        rng = random.Random(f"oi:{self._seed}:{strike}:{expiry}")
        whole = strike == int(strike)
        centre = float(self._spot[0])
        interest = 150 + 4500 * math.exp(-(((strike - centre) / 6.0) ** 2)) * rng.uniform(0.6, 1.4)
        scale = (1.0 if whole else 0.25) * (1.0 if expiry == self._day else 0.3)
        ticker = occ_ticker(self._market.underlying, expiry, strike)
        # Half-dollar strikes are thinner, but keep open interest above the selector's floor so each
        # trap is rejected for its own defect only.
        open_interest = int(interest) if whole else max(120, int(interest * 0.3))
        return _Contract(strike, expiry, ticker, open_interest, scale, trap)

    def contract_by_ticker(self, ticker: str) -> _Contract:
        root = f"O:{self._market.underlying}"
        body = ticker[len(root) :] if ticker.startswith(root) else ""
        if len(body) != 15 or body[6] != "C" or not body[:6].isdigit() or not body[7:].isdigit():
            raise KeyError(ticker)
        expiry = datetime.datetime.strptime(body[:6], "%y%m%d").date()
        strike = int(body[7:]) / 1000.0
        if expiry < self._day or strike * 2 != int(strike * 2):
            raise KeyError(ticker)
        return self._contract(strike, expiry, "")

    def chain(self, at_ms: int) -> list[_Contract]:
        """Every call the chain request returns at `at_ms`, with this snapshot's traps, ticker order."""
        spot = self._market.spot_at(at_ms)
        t_years = self._t_years(at_ms, self._day)
        atm = self._atm(at_ms)
        contracts = list(self.listed) + self._traps(spot, t_years, atm)
        if 0 <= at_ms - self._market.session_open_ms - OTHER_EXPIRY_AT_S * 1000 < 10_000:
            contracts.append(self._other_expiry(spot, at_ms, atm))
        return sorted(contracts, key=lambda c: c.ticker)

    def _traps(self, spot: float, t_years: float, atm: float) -> list[_Contract]:
        """Half-dollar strikes around the 0.40 delta point, each with one defect for the selector."""
        halves = [math.floor(spot) + 0.5 + j for j in range(-4, 5)]
        deltas = [bs_call(spot, k, t_years, self._smile(k, spot, t_years, atm)).delta for k in halves]
        wide = min(range(len(halves)), key=lambda j: abs(deltas[j] - 0.40))
        plan = {0: "wide", 1: "stale", -1: "crossed", -2: "no_greeks"}
        return [self._contract(halves[wide] + offset, self._day, trap) for offset, trap in plan.items()]

    def _other_expiry(self, spot: float, at_ms: int, atm: float) -> _Contract:
        expiry = self._day + datetime.timedelta(days=3 if self._day.weekday() == 4 else 1)
        t_years = self._t_years(at_ms, expiry)
        strikes = [math.floor(spot) + j for j in range(0, 4)]
        deltas = [bs_call(spot, k, t_years, self._smile(k, spot, t_years, atm)).delta for k in strikes]
        best = min(range(len(strikes)), key=lambda j: abs(deltas[j] - 0.40))
        return self._contract(float(strikes[best]), expiry, "")

    def _t_years(self, at_ms: int, expiry: datetime.date) -> float:
        close_ms = self._market.session_close_ms + (expiry - self._day).days * 86_400_000
        # A floor of one second keeps prices finite at and after the bell.
        return max(1.0, (close_ms - at_ms) / 1000.0) / YEAR_SECONDS

    def _elapsed_fraction(self, at_ms: int) -> float:
        return (at_ms - self._market.session_open_ms) / (SESSION_SECONDS * 1000.0)

    def _smile(self, strike: float, spot: float, t_years: float, atm: float) -> float:
        return smile_vol(strike, spot, t_years, atm, self._skew)

    def _atm(self, at_ms: int) -> float:
        """The ATM volatility at `at_ms`: the day's curve times the texture's moving factor (1 without)."""
        return atm_vol(self._elapsed_fraction(at_ms)) * self._market.iv_factor(at_ms)

    def value(self, contract: _Contract, at_ms: int) -> tuple[CallValue, float, float]:
        """(value, implied volatility, spot) of a contract at `at_ms`."""
        spot, t_years, atm = self._moment(at_ms, contract.expiry)
        sigma = self._smile(contract.strike, spot, t_years, atm)
        return bs_call(spot, contract.strike, t_years, sigma), sigma, spot

    def _moment(self, at_ms: int, expiry: datetime.date) -> tuple[float, float, float]:
        """(spot, T, ATM vol) at `at_ms`; the last answer is kept since a snapshot asks ~30 times."""
        key = (at_ms, expiry)
        last_key, last_moment = self._last_moment
        if last_key == key:
            return last_moment
        moment = (
            self._market.spot_at(at_ms),
            self._t_years(at_ms, expiry),
            self._atm(at_ms),
        )
        self._last_moment = (key, moment)
        return moment

    def deltas(self, at_ms: int) -> list[tuple[_Contract, float]]:
        """The day's listed calls (the chain without its traps) with their deltas at `at_ms`."""
        return [(contract, self.value(contract, at_ms)[0].delta) for contract in self.listed]

    def quotes_with_spot(
        self, contracts: list[_Contract], at_ms: int, spot: float
    ) -> list[tuple[float, float]]:
        """(bid, ask) of each contract at `at_ms` with the underlying at `spot`, rounded as the chain's.

        With `spot = spot_at(at_ms)` this is exactly the chain's quote of a contract without a trap.
        """
        atm = self._atm(at_ms)
        extra = self._market.spread_extra_ticks(at_ms)
        quotes = []
        for contract in contracts:
            t_years = self._t_years(at_ms, contract.expiry)
            sigma = self._smile(contract.strike, spot, t_years, atm)
            value = bs_call(spot, contract.strike, t_years, sigma)
            quotes.append(quote_for(value.price, 0.05 <= value.delta <= 0.95, extra))
        return quotes

    def day_volume(self, contract: _Contract, at_ms: int) -> int:
        """Contracts traded today up to `at_ms`, busiest near the money, following the stock's U shape."""
        key = (contract.strike, contract.expiry)
        if key not in self._cum_volume:
            width = np.maximum(0.8, self._spot * 0.004)
            rate = 1.1 * self._volume_shape * np.exp(-0.5 * ((contract.strike - self._spot) / width) ** 2)
            self._cum_volume[key] = np.cumsum(rate * contract.volume_scale)
        index = (at_ms - self._market.session_open_ms) // 1000
        if index <= 0:
            return 0
        return int(self._cum_volume[key][min(index, SESSION_SECONDS) - 1])

    def minute_stats(self, contract: _Contract) -> _MinuteStats:
        key = (contract.strike, contract.expiry)
        if key not in self._minute_stats:
            self._minute_stats[key] = self._build_minute_stats(contract)
        return self._minute_stats[key]

    def _build_minute_stats(self, contract: _Contract) -> _MinuteStats:
        open_ms = self._market.session_open_ms
        marks = [_cents(self.value(contract, open_ms + m * 60_000)[0].price) for m in range(390)]
        volumes = [self.day_volume(contract, open_ms + (m + 1) * 60_000) for m in range(390)]
        traded = np.diff(np.asarray(volumes, dtype=float), prepend=0.0)
        first = int(np.argmax(traded > 0)) if traded.any() else 0
        prices = np.asarray(marks)
        prices[:first] = prices[first]
        prev_spot = self._market.script.open_price * 0.998
        prev_t = self._t_years(open_ms - 63_000_000, contract.expiry)
        previous = bs_call(prev_spot, contract.strike, prev_t, 0.28).price
        return _MinuteStats(
            marks=marks,
            first_traded=first,
            high=np.maximum.accumulate(prices).tolist(),
            low=np.minimum.accumulate(prices).tolist(),
            pv=np.cumsum(prices * traded).tolist(),
            volume=np.cumsum(traded).tolist(),
            previous_close=max(0.01, _cents(previous)),
        )


@dataclass(frozen=True, slots=True)
class _MinuteStats:
    marks: list[float]
    first_traded: int
    high: list[float]
    low: list[float]
    pv: list[float]
    volume: list[float]
    previous_close: float


def _cents(x: float) -> float:
    """Round to cents; float(int) / 100 prints as the short decimal, and beats round() by ~6x."""
    return math.floor(x * 100.0 + 0.5) / 100.0


def _round4(x: float) -> float:
    return math.floor(x * 10_000.0 + 0.5) / 10_000.0


def _round5(x: float) -> float:
    return math.floor(x * 100_000.0 + 0.5) / 100_000.0


def _tick(price: float) -> float:
    return 0.01 if price < 3.0 else 0.05


def quote_for(theo: float, liquid: bool, extra_ticks: int = 0) -> tuple[float, float]:
    """A penny-wide (nickel above $3) market around `theo`; zero bid when it is worth under half a cent.

    `extra_ticks` widens it (the texture's fast markets and last half hour).
    """
    tick = _tick(theo)
    width = tick * ((1 if liquid else 2) + extra_ticks)
    if theo < 0.005:
        return 0.0, _cents(width)
    bid = max(0.0, math.floor((theo - width / 2) / tick + 0.5) * tick)
    return _cents(bid), _cents(bid + width)


def _ticker_salt(ticker: str) -> int:
    return int(_request_id(ticker)[:8], 16)


def _quote_extras(seed: int, salt: int, at_ms: int) -> tuple[int, int, int, int]:
    """(bid size, ask size, bid exchange, ask exchange) of a streamed quote: a pure function of its inputs."""
    # Tuples of ints hash the same in every process (only str hashing is salted).
    mix = hash((seed, salt, at_ms)) & 0xFFFF_FFFF
    exchanges = len(OPTION_EXCHANGES)
    return (
        10 + mix % 291,
        10 + (mix >> 9) % 291,
        OPTION_EXCHANGES[(mix >> 18) % exchanges],
        OPTION_EXCHANGES[(mix >> 23) % exchanges],
    )


def _request_id(*parts: object) -> str:
    return hashlib.md5(":".join(str(p) for p in parts).encode()).hexdigest()


class SyntheticMarket:
    """One synthetic session as a model: every answer is a pure function of the script and the time."""

    def __init__(self, script: DayScript, *, underlying: str = "IWM", benchmark: str = "SPY") -> None:
        self.script = script
        self.underlying = underlying
        self.benchmark = benchmark
        self.session_open_ms = session_open_ms(script.session_date)
        self.session_close_ms = self.session_open_ms + SESSION_SECONDS * 1000
        rng = np.random.default_rng(script.seed)
        regime = _regime(script)
        iwm_draws = _BarDraws.draw(rng, SESSION_SECONDS)
        spy_draws = _BarDraws.draw(rng, SESSION_SECONDS)
        iwm, levels = _iwm_bars(script, regime, iwm_draws, rng)
        self._iv_factor, self._spread_extra = _texture_paths(script, levels)
        spy = _spy_bars(script, levels, regime, spy_draws, rng)
        self._bars = {underlying: iwm, benchmark: spy}
        self._wire = {sym: _wire_rows(bars, self.session_open_ms) for sym, bars in self._bars.items()}
        self._latency = rng.integers(150, 401, size=(SESSION_SECONDS, 2)).tolist()
        self._framing = rng.integers(0, 4, size=SESSION_SECONDS).tolist()
        self._spot = _forward_fill(iwm.c, iwm.present, iwm.official_open)
        self._spot_index = np.maximum.accumulate(
            np.where(iwm.present, np.arange(SESSION_SECONDS), 0)
        ).tolist()
        self._spot_list = self._spot.tolist()
        self._options = _OptionBook(self, self._spot, intraday_volume_shape())

    @property
    def option_book(self) -> _OptionBook:
        """The option model behind the chain, the contract snapshots and the streamed quotes."""
        return self._options

    def spot_at(self, ms: int) -> float:
        """The underlying's last close at `ms`: the close of the newest second that has ended by then."""
        index = (ms - self.session_open_ms) // 1000 - 1
        if index < 0:
            return self._bars[self.underlying].official_open
        return self._spot_list[min(index, SESSION_SECONDS - 1)]

    def iv_factor(self, ms: int) -> float:
        """The texture's multiplier of the ATM volatility at `ms` (1.0 without texture).

        A step per second, taken like `spot_at` (the newest second that has ended), so a streamed quote
        at a whole second is the chain's.
        """
        index = (ms - self.session_open_ms) // 1000 - 1
        if self._iv_factor is None or index < 0:
            return 1.0
        return self._iv_factor[min(index, SESSION_SECONDS - 1)]

    def spread_extra_ticks(self, ms: int) -> int:
        """Ticks the texture adds to every quote's spread at `ms` (0 without texture), stepped as `iv_factor`."""
        index = (ms - self.session_open_ms) // 1000 - 1
        if self._spread_extra is None or index < 0:
            return 0
        return self._spread_extra[min(index, SESSION_SECONDS - 1)]

    def live_spot(self, ms: int) -> float:
        """The underlying as its trades move it: `spot_at` at each whole second, and within second i a
        straight line from the previous close to second i's close.

        Option quotes follow the underlying between bars (a bar arrives only after its second ends), so
        streamed quotes move every quarter second while the chain, taken at whole seconds, is unchanged.
        """
        offset = ms - self.session_open_ms
        index, into = divmod(offset, 1000)
        if index < 0 or index >= SESSION_SECONDS or into == 0:
            return self.spot_at(ms)
        before = self.spot_at(ms - into)
        return before + (self._spot_list[index] - before) * (into / 1000.0)

    def stream_quote(self, ticker: str, at_ms: int) -> StreamQuote:
        """A contract's quote on the options stream at `at_ms` (KeyError for a ticker not listed).

        The chain's quote at whole seconds, moving with `live_spot` between them; sizes and exchanges
        are a pure function of (seed, ticker, at_ms).
        """
        contract = self._options.contract_by_ticker(ticker)
        ((bid, ask),) = self._options.quotes_with_spot([contract], at_ms, self.live_spot(at_ms))
        return StreamQuote(bid, ask, *_quote_extras(self.script.seed, _ticker_salt(ticker), at_ms))

    def stream_set(self, at_ms: int, count: int, held: Iterable[str] = ()) -> list[str]:
        """The contracts a daemon streams after the chain snapshot of `at_ms`, in ticker order.

        The `count` listed calls whose delta is nearest the middle of the delta band, and of `held`
        (the ones streamed until now) those whose delta stays within `STREAM_KEEP_DELTA`: a contract
        bought from the band keeps its quotes while it moves, as a held contract does live.
        """
        if count <= 0:
            return []
        deltas = self._options.deltas(at_ms)
        middle = STREAM_BAND_MIDDLE
        nearest = sorted(deltas, key=lambda item: (abs(item[1] - middle), item[0].strike))[:count]
        chosen = {contract.ticker for contract, _ in nearest}
        kept = set(held)
        low, high = STREAM_KEEP_DELTA
        chosen.update(c.ticker for c, delta in deltas if c.ticker in kept and low <= delta <= high)
        return sorted(chosen)

    def bars(self, sym: str) -> list[dict[str, Any]]:
        """The `A` events of one symbol, in time order (wire dicts)."""
        return [_a_event(sym, row) for row in self._wire[sym] if row is not None]

    def ws_frames(self) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(receive ms, frame) for every data frame of the session, all symbols, in time order.

        Bars arrive 150-400 ms after their second ends. The two symbols' bars of one second share a
        frame half the time and otherwise come in two frames; either symbol may come first.
        """
        first, second = self._wire[self.underlying], self._wire[self.benchmark]
        for i in range(SESSION_SECONDS):
            end_ms = self.session_open_ms + (i + 1) * 1000
            events = [
                _a_event(sym, row)
                for sym, row in ((self.underlying, first[i]), (self.benchmark, second[i]))
                if row is not None
            ]
            yield from _frames_of_second(events, end_ms, self._latency[i], self._framing[i])

    def chain_pages(
        self,
        at_ms: int,
        *,
        page_size: int = 250,
        strike_gte: float | None = None,
        strike_lte: float | None = None,
    ) -> list[dict[str, Any]]:
        """The chain snapshot request's response bodies at `at_ms`; each page but the last has next_url."""
        contracts = [
            c
            for c in self._options.chain(at_ms)
            if (strike_gte is None or c.strike >= strike_gte)
            and (strike_lte is None or c.strike <= strike_lte)
        ]
        draws = _draws(self.script.seed, at_ms, rows=len(contracts))
        results = [self._result(c, at_ms, row) for c, row in zip(contracts, draws, strict=True)]
        chunks = [results[i : i + page_size] for i in range(0, len(results), page_size)] or [[]]
        query = chain_query(self.script.session_date, strike_gte, strike_lte)
        pages = []
        for number, chunk in enumerate(chunks, start=1):
            page: dict[str, Any] = {
                "results": chunk,
                "status": "OK",
                "request_id": _request_id("chain", self.script.seed, at_ms, number),
            }
            if number < len(chunks):
                page["next_url"] = (
                    f"{REST_BASE}/v3/snapshot/options/{self.underlying}?{query}&cursor=p{number + 1}"
                )
            pages.append(page)
        return pages

    def contract_snapshot(self, ticker: str, at_ms: int) -> dict[str, Any]:
        """The `/v3/snapshot/options/IWM/{ticker}` body; KeyError for a ticker this market does not list."""
        contract = self._options.contract_by_ticker(ticker)
        salt = int(_request_id(ticker)[:8], 16)
        return {
            "request_id": _request_id("contract", self.script.seed, ticker, at_ms),
            "results": self._result(contract, at_ms, _draws(self.script.seed, at_ms, salt, rows=1)[0]),
            "status": "OK",
        }

    def aggs(self, sym: str, from_ms: int, to_ms: int) -> dict[str, Any]:
        """The `/v2/aggs/ticker/{sym}/range/1/second/{from}/{to}` body (t = window start, inclusive range)."""
        results = [
            {k: row[k] for k in ("v", "vw", "o", "c", "h", "l")} | {"t": row["s"], "n": row["n"]}
            for row in self._wire[sym]
            if row is not None and from_ms <= row["s"] <= to_ms
        ]
        return _aggs_body(sym, results, _request_id("aggs", self.script.seed, sym, from_ms, to_ms))

    def minute_aggs(self, sym: str, day: datetime.date) -> dict[str, Any]:
        """The `/v2/aggs/ticker/{sym}/range/1/minute/{day}/{day}` body, for the volume profile.

        The session day itself is aggregated from its own bars. An earlier weekday is a plain synthetic
        day (no bursts) with pre- and post-market minutes, like the real endpoint. Weekends and later
        days have no results.
        """
        request_id = _request_id("minute", self.script.seed, sym, day)
        if day > self.script.session_date or day.weekday() >= 5:
            return _aggs_body(sym, [], request_id)
        if day == self.script.session_date:
            return _aggs_body(sym, _minutes_from_bars(self._wire[sym]), request_id)
        return _aggs_body(sym, _past_minutes(self, sym, day), request_id)

    def profile_answer(self, days: int) -> tuple[str, dict[str, Any]]:
        """The REST path and body of the underlying's minute aggregates over the previous `days` weekdays."""
        weekdays = _previous_weekdays(self.script.session_date, days)
        path = (
            f"/v2/aggs/ticker/{self.underlying}/range/1/minute/{weekdays[0].isoformat()}/"
            f"{weekdays[-1].isoformat()}?adjusted=true&sort=asc&limit=50000"
        )
        results = [
            row for day in weekdays for row in self.minute_aggs(self.underlying, day).get("results", [])
        ]
        request_id = _request_id("profile", self.script.seed, self.underlying, days)
        return path, _aggs_body(self.underlying, results, request_id)

    def ms_at(self, at: datetime.time) -> int:
        """Unix ms of New York wall-clock time `at` on the session day."""
        return self.session_open_ms + _seconds_from_open(at) * 1000

    def spot_time_ms(self, ms: int) -> int:
        """When the underlying price `spot_at(ms)` was set: the end of its bar (the open before any)."""
        index = (ms - self.session_open_ms) // 1000 - 1
        if index < 0:
            return self.session_open_ms
        return self.session_open_ms + (self._spot_index[min(index, SESSION_SECONDS - 1)] + 1) * 1000

    def _result(self, contract: _Contract, at_ms: int, draws: list[int]) -> dict[str, Any]:
        return _contract_result(self, self._options, contract, at_ms, draws, self.spot_time_ms(at_ms))


def chain_query(
    session_date: datetime.date, strike_gte: float | None = None, strike_lte: float | None = None
) -> str:
    """The chain request's query string (what the daemon asks for)."""
    query = f"expiration_date={session_date.isoformat()}&contract_type=call&limit=250"
    if strike_gte is not None:
        query += f"&strike_price.gte={strike_gte:g}"
    if strike_lte is not None:
        query += f"&strike_price.lte={strike_lte:g}"
    return query


def _previous_weekdays(day: datetime.date, count: int) -> list[datetime.date]:
    """The `count` weekdays before `day`, oldest first."""
    days: list[datetime.date] = []
    while len(days) < count:
        day -= datetime.timedelta(days=1)
        if day.weekday() < 5:
            days.append(day)
    return days[::-1]


def _forward_fill(values: np.ndarray, present: np.ndarray, first: float) -> np.ndarray:
    index = np.where(present, np.arange(len(values)), -1)
    index = np.maximum.accumulate(index)
    return np.where(index >= 0, values[np.maximum(index, 0)], first)


def _wire_rows(bars: _Bars, open_ms: int) -> list[dict[str, Any] | None]:
    """Per second, the bar's wire fields (None for a second without trades)."""
    cols = {
        name: getattr(bars, name).tolist()
        for name in ("present", "o", "h", "l", "c", "vw", "v", "av", "a", "n")
    }
    op = bars.official_open
    rows: list[dict[str, Any] | None] = []
    for i in range(SESSION_SECONDS):
        if not cols["present"][i]:
            rows.append(None)
            continue
        v = int(cols["v"][i])
        trades = int(cols["n"][i])
        rows.append(
            {
                "v": v,
                "av": int(cols["av"][i]),
                "op": op,
                "vw": cols["vw"][i],
                "o": cols["o"][i],
                "c": cols["c"][i],
                "h": cols["h"][i],
                "l": cols["l"][i],
                "a": cols["a"][i],
                "z": max(1, v // trades),
                "s": open_ms + i * 1000,
                "n": trades,
            }
        )
    return rows


def _a_event(sym: str, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "ev": "A",
        "sym": sym,
        "v": row["v"],
        "av": row["av"],
        "op": row["op"],
        "vw": row["vw"],
        "o": row["o"],
        "c": row["c"],
        "h": row["h"],
        "l": row["l"],
        "a": row["a"],
        "z": row["z"],
        "s": row["s"],
        "e": row["s"] + 1000,
    }


def _frames_of_second(
    events: list[dict[str, Any]], end_ms: int, latency: list[int], framing: int
) -> list[tuple[int, list[dict[str, Any]]]]:
    """framing 0/1: one frame (either order); 2/3: one frame per symbol (either order)."""
    if not events:
        return []
    if framing % 2 == 1:
        events = events[::-1]
    first_t = end_ms + min(latency)
    if len(events) == 1 or framing < 2:
        return [(first_t, events)]
    return [(first_t, [events[0]]), (max(first_t + 1, end_ms + max(latency)), [events[1]])]


def _aggs_body(sym: str, results: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "ticker": sym,
        "queryCount": len(results),
        "resultsCount": len(results),
        "adjusted": True,
    }
    if results:
        body["results"] = results
    body |= {"status": "OK", "request_id": request_id, "count": len(results)}
    return body


def _minutes_from_bars(rows: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    minutes: list[dict[str, Any]] = []
    for start in range(0, SESSION_SECONDS, 60):
        bars = [row for row in rows[start : start + 60] if row is not None]
        if not bars:
            continue
        volume = sum(b["v"] for b in bars)
        minutes.append(
            {
                "v": volume,
                "vw": _round4(sum(b["vw"] * b["v"] for b in bars) / volume),
                "o": bars[0]["o"],
                "c": bars[-1]["c"],
                "h": max(b["h"] for b in bars),
                "l": min(b["l"] for b in bars),
                "t": bars[0]["s"] - bars[0]["s"] % 60_000,
                "n": sum(b["n"] for b in bars),
            }
        )
    return minutes


def _past_minutes(market: SyntheticMarket, sym: str, day: datetime.date) -> list[dict[str, Any]]:
    """A plain day: U-shaped minute volume with noise, a random-walk price, thin extended hours."""
    rng = np.random.default_rng(int(_request_id("past", market.script.seed, sym, day)[:12], 16))
    is_underlying = sym == market.underlying
    mean_volume = (IWM_MEAN_VOLUME if is_underlying else SPY_MEAN_VOLUME) * 60.0
    back = max(1, (market.script.session_date - day).days)
    base_price = market.spot_at(market.session_open_ms) if is_underlying else 665.0
    price = base_price * math.exp(rng.normal(0.0, 0.012 * math.sqrt(back)))
    day_factor = math.exp(rng.normal(0.0, 0.15))
    shape = intraday_volume_shape().reshape(390, 60).mean(axis=1)
    midnight_ms = int(datetime.datetime.combine(day, datetime.time(0, 0), NY).timestamp() * 1000)
    minutes = []
    for minute_of_day in range(4 * 60, 20 * 60):
        rth = 570 <= minute_of_day < 960
        relative = shape[minute_of_day - 570] if rth else 0.015
        if not rth and rng.random() < 0.4:
            continue
        volume = max(1, int(mean_volume * day_factor * relative * math.exp(rng.normal(-0.03, 0.25))))
        step = price * rng.normal(0.0, 0.0006 if rth else 0.0003)
        o, c = price, price + step
        price = c
        minutes.append(
            {
                "v": volume,
                "vw": _round4((o + c) / 2),
                "o": _cents(o),
                "c": _cents(c),
                "h": _cents(max(o, c) + abs(rng.normal(0.0, 0.02))),
                "l": _cents(min(o, c) - abs(rng.normal(0.0, 0.02))),
                "t": midnight_ms + minute_of_day * 60_000,
                "n": max(1, volume // 120),
            }
        )
    return minutes


def _contract_result(
    market: SyntheticMarket,
    book: _OptionBook,
    contract: _Contract,
    at_ms: int,
    draws: list[int],
    spot_ms: int,
) -> dict[str, Any]:
    """One `results[i]` object of polygon.md §3.2, keys in the vendor's (alphabetical) order.

    `draws` are six uniform integers in [0, 10**6) that jitter sizes and timestamps.
    """
    stale = contract.trap == "stale"
    quote_ms = at_ms - STALE_QUOTE_MS - draws[0] % 1000 if stale else at_ms - 50 - draws[0] % 2450
    value, sigma, spot = book.value(contract, quote_ms if stale else at_ms)
    bid, ask = _trap_quote(contract.trap, value, market.spread_extra_ticks(quote_ms if stale else at_ms))
    midpoint = _round4((bid + ask) / 2)
    volume = book.day_volume(contract, at_ms)
    result: dict[str, Any] = {
        "break_even_price": _round4(contract.strike + midpoint),
        "day": _day_bar(book, contract, at_ms, volume, midpoint, draws),
        "details": contract.details,
    }
    if contract.trap == "no_greeks":
        result["greeks"] = {}
    else:
        result["greeks"] = {
            "delta": _round5(value.delta),
            "gamma": _round5(value.gamma),
            "theta": _round5(value.theta),
            "vega": _round5(value.vega),
        }
        result["implied_volatility"] = _round5(sigma)
    result["last_quote"] = {
        "ask": ask,
        "ask_size": 10 + draws[1] % 291,
        "bid": bid,
        "bid_size": 10 + draws[2] % 291,
        "last_updated": quote_ms * 1_000_000 + draws[3],
        "midpoint": midpoint,
        "timeframe": "REAL-TIME",
    }
    result["open_interest"] = contract.open_interest
    result["underlying_asset"] = {
        "change_to_break_even": _round4(contract.strike + midpoint - spot),
        "last_updated": spot_ms * 1_000_000 + draws[4],
        "price": spot,
        "ticker": market.underlying,
        "timeframe": "REAL-TIME",
    }
    return result


def _trap_quote(trap: str, value: CallValue, extra_ticks: int) -> tuple[float, float]:
    theo = value.price
    if trap == "wide":
        width = max(0.05, _cents(0.10 * theo))
        bid = max(0.01, _cents(theo - width / 2))
        return bid, _cents(bid + width)
    if trap == "crossed":
        bid = max(0.03, _cents(theo + 0.01))
        return bid, _cents(bid - 0.02)
    return quote_for(theo, 0.05 <= value.delta <= 0.95, extra_ticks)


def _day_bar(
    book: _OptionBook, contract: _Contract, at_ms: int, volume: int, close: float, draws: list[int]
) -> dict[str, Any]:
    """The contract's day bar so far; `{}` until it has traded (as the vendor sends)."""
    if volume <= 0:
        return {}
    stats = book.minute_stats(contract)
    minute = max(0, min(389, (at_ms - book.session_open_ms) // 60_000 - 1))
    close = _cents(close)
    traded = stats.volume[minute]
    previous = stats.previous_close
    return {
        "change": _cents(close - previous),
        "change_percent": _round4((close - previous) / previous * 100.0),
        "close": close,
        "high": max(stats.high[minute], close),
        "last_updated": (at_ms - draws[5] % 20_000) * 1_000_000 + draws[3],
        "low": min(stats.low[minute], close),
        "open": stats.marks[stats.first_traded],
        "previous_close": previous,
        "volume": volume,
        "vwap": _round4(stats.pv[minute] / traded) if traded > 0 else close,
    }


def _draws(*seed: int, rows: int) -> list[list[int]]:
    """`rows` x 6 uniform integers in [0, 10**6), a pure function of `seed` (hash-derived: cheap per page)."""
    digest = hashlib.shake_128(repr(seed).encode()).digest(rows * 6 * 4)
    return (np.frombuffer(digest, dtype="<u4") % 1_000_000).reshape(rows, 6).tolist()


def handshake_frames(
    connected_ms: int, underlying: str, benchmark: str
) -> list[tuple[int, list[dict[str, Any]]]]:
    """The status frames a real recording starts with: connected, auth_success, subscribed."""
    return [
        (connected_ms, [{"ev": "status", "status": "connected", "message": "Connected Successfully"}]),
        (connected_ms + 142, [{"ev": "status", "status": "auth_success", "message": "authenticated"}]),
        (
            connected_ms + 297,
            [
                {"ev": "status", "status": "success", "message": f"subscribed to: A.{underlying}"},
                {"ev": "status", "status": "success", "message": f"subscribed to: A.{benchmark}"},
            ],
        ),
    ]


def options_handshake_frames(connected_ms: int) -> list[tuple[int, list[dict[str, Any]]]]:
    """The options cluster's greeting and auth reply; its subscriptions follow the chain snapshots."""
    return [
        (connected_ms, [_status("connected", "Connected Successfully")]),
        (connected_ms + 131, [_status("auth_success", "authenticated")]),
    ]


def _status(status: str, message: str) -> dict[str, Any]:
    return {"ev": "status", "status": status, "message": message}


def q_event(ticker: str, quote: StreamQuote, t_ms: int, sequence: int) -> dict[str, Any]:
    """A `Q` event of the options cluster (polygon.md section 2.7), keys in the vendor's order."""
    return {
        "ev": "Q",
        "sym": ticker,
        "bx": quote.bid_exchange,
        "ax": quote.ask_exchange,
        "bp": quote.bid,
        "ap": quote.ask,
        "bs": quote.bid_size,
        "as": quote.ask_size,
        "c": 1,
        "i": [],
        "t": t_ms,
        "q": sequence,
    }


@dataclass(slots=True)
class _Streamed:
    """A subscribed contract on the tape: its last emitted (bid, ask) and its sequence number."""

    contract: _Contract
    salt: int
    sequence: int
    last: tuple[float, float] | None = None


def _stream_quote_lines(
    market: SyntheticMarket, count: int, chain_every_s: int
) -> Iterator[tuple[int, str, Any]]:
    """The options stream of a daemon that follows `stream_set` after each chain snapshot.

    Handshake before the open; one second after each snapshot's instant the changes of the set as
    subscription status frames; then every `STREAM_CHECK_MS` a frame of the `Q` events of the
    subscribed contracts whose bid or ask changed (a new subscription's first quote included).
    """
    rng = random.Random(f"quotes:{market.script.seed}")
    for t, frame in options_handshake_frames(market.session_open_ms - STREAM_CONNECT_BEFORE_OPEN_MS):
        yield t, "ws", frame
    book, seed = market.option_book, market.script.seed
    held: dict[str, _Streamed] = {}
    sequences: dict[str, int] = {}
    every_ms = chain_every_s * 1000
    for at_ms in range(market.session_open_ms, market.session_close_ms, every_ms):
        change_ms = at_ms + STREAM_SUBSCRIBE_AFTER_MS
        statuses = _resubscribe(market, held, market.stream_set(at_ms, count, held), sequences)
        if statuses:
            yield change_ms, "ws", statuses
        window_end = min(change_ms + every_ms, market.session_close_ms)
        streamed = list(held.values())
        contracts = [item.contract for item in streamed]
        for check_ms in range(change_ms, window_end, STREAM_CHECK_MS):
            quotes = book.quotes_with_spot(contracts, check_ms, market.live_spot(check_ms))
            events = []
            for item, quote in zip(streamed, quotes, strict=True):
                if quote == item.last:
                    continue
                item.last = quote
                item.sequence += 1
                extras = _quote_extras(seed, item.salt, check_ms)
                events.append(
                    q_event(item.contract.ticker, StreamQuote(*quote, *extras), check_ms, item.sequence)
                )
            if events:
                yield check_ms + rng.randint(*STREAM_LATENCY_MS), "ws", events


def _resubscribe(
    market: SyntheticMarket, held: dict[str, _Streamed], wanted: list[str], sequences: dict[str, int]
) -> list[dict[str, Any]]:
    """Bring `held` to `wanted`; the status events the cluster answers (unsubscribed first)."""
    statuses = [_status("success", f"unsubscribed to: Q.{ticker}") for ticker in held if ticker not in wanted]
    for ticker in [ticker for ticker in held if ticker not in wanted]:
        sequences[ticker] = held.pop(ticker).sequence
    for ticker in wanted:
        if ticker in held:
            continue
        salt = _ticker_salt(ticker)
        contract = market.option_book.contract_by_ticker(ticker)
        # The sequence goes on from where it stopped: `q` never repeats for a contract.
        sequence = sequences.setdefault(ticker, 100_000 + salt % 900_000)
        held[ticker] = _Streamed(contract, salt, sequence)
        statuses.append(_status("success", f"subscribed to: Q.{ticker}"))
    return statuses


def write_tape(
    market: SyntheticMarket,
    path: Path,
    *,
    chain_every_s: int = 10,
    page_size: int = 20,
    end_ms: int | None = None,
    profile_days: int = PROFILE_DAYS,
    stream_quotes: int = 0,
) -> Path:
    """Render the session as a tape: handshake, every bar frame, a paged chain every `chain_every_s` s.

    An existing file at `path` is replaced. The chain is recorded as the daemon polls it: page 1 at
    `.../options/IWM?expiration_date=...&contract_type=call&limit=250`, then each `next_url`'s path.
    Before the open (at `PROFILE_FETCH_AT`) comes the minute aggregates of the previous `profile_days`
    weekdays, the relative-volume profile (0: none); the script's pauses are recorded as control lines.
    `stream_quotes` > 0 adds the options cluster as ws lines (handshake, subscriptions, `Q` events) for
    the contracts of `SyntheticMarket.stream_set(at, stream_quotes, ...)` after each chain snapshot;
    0 writes the tape without it, byte for byte as before streamed quotes existed.
    `end_ms` stops the recording early (lines received before it), for short tapes in tests.
    """
    path = Path(path)
    path.unlink(missing_ok=True)
    connect_ms = market.session_open_ms - 2000
    profile = [_profile_line(market, profile_days)] if profile_days > 0 else []
    start_ms = market.ms_at(PROFILE_FETCH_AT) if profile else connect_ms
    ws = [
        (t, "ws", frame)
        for t, frame in handshake_frames(connect_ms + 120, market.underlying, market.benchmark)
    ]
    streams = (
        iter(profile),
        iter(ws),
        iter(_control_lines(market)),
        ((t, "ws", frame) for t, frame in market.ws_frames()),
        _chain_lines(market, chain_every_s, page_size),
    )
    if stream_quotes > 0:
        streams += (_stream_quote_lines(market, stream_quotes, chain_every_s),)
    # Level 1: a synthetic day is ~70 MB of JSON; speed matters more than the last few MB here.
    with TapeWriter(
        path, underlying=market.underlying, benchmark=market.benchmark, start_ms=start_ms, compresslevel=1
    ) as writer:
        for t, kind, item in heapq.merge(*streams, key=lambda line: line[0]):
            if end_ms is not None and t >= end_ms:
                break
            _write_line(writer, t, kind, item)
    return path


def _write_line(writer: TapeWriter, t: int, kind: str, item: Any) -> None:
    if kind == "ws":
        writer.write_ws(t, item)
    elif kind == "control":
        writer.write_control(t, item)
    else:
        rest_path, body = item
        writer.write_rest(t, rest_path, 200, body)


def _control_lines(market: SyntheticMarket) -> list[tuple[int, str, Any]]:
    """The pause switch at each end of the script's pause windows."""
    lines: list[tuple[int, str, Any]] = []
    for start, end in market.script.pauses:
        lines.append((market.ms_at(start), "control", {"paused": True}))
        lines.append((market.ms_at(end), "control", {"paused": False}))
    return sorted(lines, key=lambda line: line[0])


def _profile_line(market: SyntheticMarket, days: int) -> tuple[int, str, Any]:
    """The daemon's pre-open volume-profile request, answered at `PROFILE_FETCH_AT`."""
    rest_path, body = market.profile_answer(days)
    latency = random.Random(f"profile:{market.script.seed}").randint(150, 450)
    return market.ms_at(PROFILE_FETCH_AT) + latency, "rest", (rest_path, body)


def _chain_lines(market: SyntheticMarket, every_s: int, page_size: int) -> Iterator[tuple[int, str, Any]]:
    first_path = f"/v3/snapshot/options/{market.underlying}?{chain_query(market.script.session_date)}"
    for at_ms in range(market.session_open_ms, market.session_close_ms, every_s * 1000):
        rng = random.Random(f"latency:{market.script.seed}:{at_ms}")
        t = at_ms + rng.randint(90, 260)
        rest_path = first_path
        for page in market.chain_pages(at_ms, page_size=page_size):
            yield t, "rest", (rest_path, page)
            if "next_url" in page:
                rest_path = page["next_url"][len(REST_BASE) :]
                t += rng.randint(40, 140)


def stream_day_dates(count: int, first: datetime.date = STREAM_DAYS_FIRST) -> list[datetime.date]:
    """`count` consecutive regular (not early-close) XNYS sessions from `first`: a synthetic day is 6.5 h."""
    from market_calendar import MarketCalendar  # exchange_calendars only for those who build days

    calendar = MarketCalendar(Rules())
    days: list[datetime.date] = []
    day = first - datetime.timedelta(days=1)
    while len(days) < count:
        session = calendar.next_session(day)
        day = session.date
        if not session.early_close:
            days.append(day)
    return days


def stream_day_seed(seed: int, day: datetime.date) -> int:
    """The noise seed of one day: the market seeds its draws with it, so days must not share one."""
    return int.from_bytes(hashlib.sha256(f"stream:{seed}:{day.isoformat()}".encode()).digest()[:4], "big")


def build_stream_day(
    day: datetime.date, seed: int, folder: Path, *, stream_quotes: int = DEMO_STREAM_QUOTES
) -> Path:
    """The tape of `random_script(day, ...)` with `stream_quotes` streamed contracts, at `folder/<day>.jsonl.gz`.

    An existing tape there is reused (the name carries no parameters: one folder per setting).
    """
    path = Path(folder) / f"{day.isoformat()}.jsonl.gz"
    if path.is_file():
        return path
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    market = SyntheticMarket(random_script(day, stream_day_seed(seed, day)))
    write_tape(market, partial, stream_quotes=stream_quotes)
    os.replace(partial, path)
    return path


def build_stream_days(
    folder: Path,
    count: int,
    seed: int,
    *,
    first: datetime.date = STREAM_DAYS_FIRST,
    stream_quotes: int = DEMO_STREAM_QUOTES,
    workers: int = 1,
) -> list[Path]:
    """Build (or reuse) `count` seeded synthetic full days with streamed quotes; their tapes in date order.

    Same (count, seed, first, stream_quotes): same tapes, byte for byte. `workers` > 1 builds them in a
    process pool (a day takes about 4.5 s). `without_stream_quotes` gives each one's REST-only twin.
    """
    Path(folder).mkdir(parents=True, exist_ok=True)
    days = stream_day_dates(count, first)
    if workers <= 1:
        return [build_stream_day(day, seed, folder, stream_quotes=stream_quotes) for day in days]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(build_stream_day, day, seed, Path(folder), stream_quotes=stream_quotes)
            for day in days
        ]
        return [future.result() for future in futures]


def without_stream_quotes(src: Path, dst: Path) -> Path:
    """Write the REST-only twin of tape `src` to `dst`: every `Q` event and `Q.` subscription status gone.

    A line that held nothing else is dropped; every other line is copied byte for byte, so a replay of
    the twin sees what a daemon without the options stream recorded (the options cluster's
    connected/auth lines stay: status frames change no decision). Returns `dst`.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    with gzip.open(src, "rb") as source, gzip.GzipFile(partial, "wb", compresslevel=1, mtime=0) as target:
        for line in source:
            kept = _without_quotes(line)
            if kept is not None:
                target.write(kept)
    os.replace(partial, dst)
    return dst


def _without_quotes(line: bytes) -> bytes | None:
    """The line without its options-stream events; None when nothing else was in it."""
    if b'"ws"' not in line or (b'"Q"' not in line and b"Q.O:" not in line):
        return line  # the cheap test: most lines are bars and chain pages
    try:
        record = json.loads(line)
    except ValueError:
        return line
    frame = record.get("ws") if isinstance(record, dict) else None
    if not isinstance(frame, list):
        return line
    kept = [event for event in frame if not _is_stream_quote_event(event)]
    if len(kept) == len(frame):
        return line
    if not kept:
        return None
    return json.dumps({**record, "ws": kept}, separators=(",", ":")).encode() + b"\n"


def _is_stream_quote_event(event: object) -> bool:
    if not isinstance(event, dict):
        return False
    if event.get("ev") == "Q":
        return True
    message = event.get("message")
    return event.get("ev") == "status" and isinstance(message, str) and "subscribed to: Q." in message


def build_demo_tape(path: Path, *, stream_quotes: int = DEMO_STREAM_QUOTES) -> Path:
    """Write the bundled demo day's tape to `path`, with the options stream of `stream_quotes` contracts."""
    return write_tape(SyntheticMarket(demo_script()), path, stream_quotes=stream_quotes)
