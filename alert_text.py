"""Alert text as the phone shows it (DESIGN section 8), and how each kind of alert is delivered.

Pure: values in, strings out. Numbers are fixed-point (never scientific notation) and a value that
rounds to zero prints without a sign (`0.00`, `$0.00`), so the phone never shows `-0.00`.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from config import Rules
from market_calendar import ny_datetime
from risk_manager import PRICE_EPSILON, Lifetime, Position

PRIORITY_LOWEST = -2
PRIORITY_LOW = -1
PRIORITY_NORMAL = 0
PRIORITY_HIGH = 1
PRIORITY_EMERGENCY = 2

# Pushover's built-in sounds (https://pushover.net/api#sounds); "none" is silence.
PUSHOVER_SOUNDS = frozenset(
    {
        "pushover", "bike", "bugle", "cashregister", "classical", "cosmic", "falling", "gamelan",
        "incoming", "intermission", "magic", "mechanical", "pianobar", "siren", "spacealarm", "tugboat",
        "alien", "climb", "persistent", "echo", "updown", "vibrate", "none",
    }
)  # fmt: skip

# Priority and sound per alert kind. A sound of None sends no `sound` field: the phone's own default.
DEFAULT_DELIVERY: dict[str, tuple[int, str | None]] = {
    "BUY": (PRIORITY_HIGH, "cashregister"),
    "SELL": (PRIORITY_HIGH, "siren"),
    "START": (PRIORITY_NORMAL, None),
    "STALL": (PRIORITY_NORMAL, None),
    "RECOVERED": (PRIORITY_NORMAL, None),
    "FEED_ERROR": (PRIORITY_NORMAL, None),
    "CRITICAL_LOSS": (PRIORITY_EMERGENCY, "persistent"),
    "SUMMARY": (PRIORITY_NORMAL, None),
}
PRIORITY_PREFIX, SOUND_PREFIX = "ALERT_PRIORITY_", "ALERT_SOUND_"

# Overrides by variable name, e.g. {"ALERT_PRIORITY_BUY": 2, "ALERT_SOUND_SELL": "bugle"}.
Overrides = Mapping[str, object]


def _valid_priority(value: object) -> bool:
    return type(value) is int and PRIORITY_LOWEST <= value <= PRIORITY_EMERGENCY


def _sound_name(value: object) -> str:
    """A sound as Pushover spells it: `CashRegister ` -> `cashregister`."""
    return value.strip().lower() if isinstance(value, str) else ""


def _valid_sound(value: object) -> bool:
    return isinstance(value, str) and (not value.strip() or _sound_name(value) in PUSHOVER_SOUNDS)


def delivery_for(kind: str, overrides: Overrides | None = None) -> tuple[int, str | None]:
    """(priority, sound) for an alert kind: the default table, then `ALERT_PRIORITY_<KIND>` and
    `ALERT_SOUND_<KIND>` from `overrides`. A kind outside the table is normal priority, default sound.

    An invalid override is ignored rather than raised: this runs while an alert is being sent, and
    settings are checked at start-up (`delivery_problems`)."""
    priority, sound = DEFAULT_DELIVERY.get(kind, (PRIORITY_NORMAL, None))
    overrides = overrides or {}
    wanted_priority = overrides.get(PRIORITY_PREFIX + kind, priority)
    wanted_sound = overrides.get(SOUND_PREFIX + kind, sound)
    if _valid_priority(wanted_priority):
        priority = wanted_priority  # type: ignore[assignment]
    if wanted_sound is None or _valid_sound(wanted_sound):
        sound = _sound_name(wanted_sound) or None
    return priority, sound


def priority_for(kind: str, overrides: Overrides | None = None) -> int:
    """The Pushover priority (-2..2) of an alert kind; see `delivery_for`."""
    return delivery_for(kind, overrides)[0]


def sound_for(kind: str, overrides: Overrides | None = None) -> str | None:
    """The Pushover `sound` of an alert kind, or None to send no sound field (the phone's default)."""
    return delivery_for(kind, overrides)[1]


def delivery_overrides(settings: object) -> dict[str, object]:
    """The `ALERT_PRIORITY_*` / `ALERT_SOUND_*` values of a `Settings`, keyed by variable name."""
    return {
        f.name.upper(): getattr(settings, f.name)
        for f in fields(settings)  # type: ignore[arg-type]
        if f.name.upper().startswith((PRIORITY_PREFIX, SOUND_PREFIX))
    }


def delivery_problems(overrides: Overrides) -> list[str]:
    """One line per bad `ALERT_PRIORITY_*` / `ALERT_SOUND_*` value, in the style of `ConfigError`."""
    problems = []
    for name, value in sorted(overrides.items()):
        if name.startswith(PRIORITY_PREFIX) and not _valid_priority(value):
            problems.append(f"{name}={value!r}: expected a Pushover priority from -2 to 2")
        elif name.startswith(SOUND_PREFIX) and not _valid_sound(value):
            sounds = ", ".join(sorted(PUSHOVER_SOUNDS))
            problems.append(
                f"{name}={value!r}: expected a Pushover sound ({sounds}) or empty for the default"
            )
    return problems


def fixed(value: float, places: int, *, sign: bool = False) -> str:
    """`value` with exactly `places` decimals, never in scientific notation; a value that rounds to
    zero prints as `0.00` with no sign (`sign=True` adds `+` to positive values only)."""
    text = f"{value:+.{places}f}" if sign else f"{value:.{places}f}"
    return f"{0:.{places}f}" if float(text) == 0 else text


def money(amount: float) -> str:
    """`+$1,234.00` / `-$12.50`: signed with an ASCII sign, two decimals; a rounded zero is `$0.00`."""
    if round(amount, 2) == 0:
        return "$0.00"
    sign = "-" if amount < 0 else "+"
    return f"{sign}${abs(amount):,.2f}"


def price(value: float) -> str:
    """`$1.23`; a rule's trigger that falls between cents keeps up to four decimals (`$1.2325`), so the
    alert states the exact level the rule compares with."""
    text = f"{value:.4f}"
    whole, decimals = text.split(".")
    return f"${whole}.{decimals[:2]}{decimals[2:].rstrip('0')}"


def signed_pct(value: float, places: int = 1) -> str:
    """`+18.5%` / `-3.2%`; a rounded zero is `0.0%`."""
    return f"{fixed(value, places, sign=True)}%"


def momentum_text(pct_per_sec: float | None) -> str:
    """Momentum in %/s with five fixed decimals (`+0.00003%/s`), `n/a` before there is any."""
    return "n/a" if pct_per_sec is None else f"{fixed(pct_per_sec, 5, sign=True)}%/s"


def leadership_text(lag_pts: float) -> str:
    """How IWM's % change compares with SPY's (`lag_pts` = SPY's minus IWM's), without double negatives."""
    shown = fixed(abs(lag_pts), 2)
    if shown == fixed(0, 2):
        return "IWM level with SPY (0.00 pts)"
    return f"IWM {'lags' if lag_pts > 0 else 'leads'} SPY by {shown} pts"


# Rule names as a person reads them (logs keep the names).
RULE_WORDS = {
    "entry_window": "entry window",
    "feed_stale": "stale feed",
    "feed_backfill": "bar from a backfill",
    "chain_missing": "no option chain",
    "chain_stale": "stale option chain",
    "cooldown": "cooldown",
    "paused": "pause switch",
    "max_trades_per_day": "max trades a day",
    "max_consecutive_losses": "losses in a row",
    "daily_loss_limit": "daily loss limit",
    "entry_blackout": "entry blackout",
    "spy_leadership": "SPY leadership",
    "relative_volume": "relative volume",
}


def rule_words(rule: str) -> str:
    """`spy_leadership` -> `SPY leadership`; an unknown rule loses its underscores."""
    return RULE_WORDS.get(rule, rule.replace("_", " "))


def block_text(rule: str, value: str, limit: str) -> str:
    """Why a signal was refused, in words: `relative volume (0.60x vs 1.50x min)`."""
    if rule == "paused":
        return "the pause switch (python3 main.py --resume allows entries again)"
    return f"{rule_words(rule)} ({value} vs {limit})"


def clock_text(ms: int) -> str:
    return ny_datetime(ms).strftime("%H:%M:%S ET")


def vwap_distance(close: float, vwap: float) -> str:
    return signed_pct((close / vwap - 1) * 100, 2) if vwap > 0 else "n/a"


@dataclass(frozen=True, slots=True)
class ExitTrigger:
    """A price exit rule's level: the mark (the held contract's mid) at or below `level` sells.

    `percent` is measured from `base` (the entry price for the stop, the peak mark for givebacks)."""

    name: str
    level: float
    percent: float
    base_name: str
    base: float


# A mark this far past its trigger at the exit went through it between two quotes (README, "Alerts").
GAP_POINTS = 2.0  # percentage points of the rule's base...
GAP_CENTS = 0.01  # ...and more than one cent


def stop_trigger(position: Position, rules: Rules) -> ExitTrigger:
    """The stop loss: the mark against entry x (1 - STOP_LOSS_PERCENT/100), as `check_exit` compares."""
    pct = rules.stop_loss_percent
    return ExitTrigger("stop", position.entry_price * (1 - pct / 100), pct, "entry", position.entry_price)


def giveback_trigger(position: Position, percent: float, name: str) -> ExitTrigger:
    """A giveback exit: the mark against peak x (1 - percent/100), the peak as it stands now."""
    return ExitTrigger(name, position.peak * (1 - percent / 100), percent, "peak", position.peak)


def exit_trigger(reason: str, position: Position, rules: Rules) -> ExitTrigger | None:
    """The price level behind an exit reason; None for the rules that are not about the price."""
    if reason == "Stop loss":
        return stop_trigger(position, rules)
    if reason == "Hard giveback":
        return giveback_trigger(position, rules.max_giveback_percent, "hard giveback trigger")
    if reason == "VWAP giveback":
        return giveback_trigger(position, rules.tighten_giveback_percent, "VWAP giveback trigger")
    return None


def gapped(trigger: ExitTrigger, mark: float) -> bool:
    """Whether the mark is far past its trigger: by more than GAP_POINTS of the base and GAP_CENTS."""
    beyond = trigger.level - mark
    return beyond > max(GAP_CENTS, GAP_POINTS / 100 * trigger.base) + PRICE_EPSILON


def trigger_text(trigger: ExitTrigger, mark: float) -> str:
    """The SELL's line about the level that fired, saying so plainly when the mark jumped past it."""
    if gapped(trigger, mark):
        return (
            f"The mark gapped past the {trigger.name} between two quotes "
            f"({price(trigger.level)} trigger, marked {price(mark)})"
        )
    return (
        f"Trigger {price(trigger.level)} ({trigger.percent:g}% off the {price(trigger.base)} "
        f"{trigger.base_name}), marked {price(mark)}"
    )


def exit_lines(position: Position, rules: Rules, time_stop: str) -> str:
    """The BUY's exit plan with the stop and giveback levels in dollars, on the mark (the mid)."""
    stop = stop_trigger(position, rules)
    hard = giveback_trigger(position, rules.max_giveback_percent, "hard giveback")
    tight = giveback_trigger(position, rules.tighten_giveback_percent, "VWAP giveback")
    below_s = rules.vwap_exit_blocks * rules.vwap_block_seconds
    return "\n".join(
        (
            f"Stop {price(stop.level)} (-{stop.percent:g}% of entry): sells when the mid is at or below it",
            f"Giveback exit {hard.percent:g}% off peak (now {price(hard.level)}); "
            f"{tight.percent:g}% while {rules.underlying} is below VWAP (now {price(tight.level)})",
            f"Also exits after {below_s}s below VWAP | time stop {time_stop}",
        )
    )


@dataclass(frozen=True, slots=True)
class BuyContext:
    """Everything a BUY alert shows besides the position itself."""

    underlying: str
    close: float
    rolling_vwap: float
    day_vwap: float | None
    momentum_pct_per_sec: float | None
    volume_z: float
    bid: float
    mid: float
    spread_pct: float
    bid_size: float
    ask_size: float
    delta_source: str
    filters: str
    exit_rules: str


def buy_title(underlying: str) -> str:
    return f"{underlying} 0DTE CALL — BUY"


def sell_title(underlying: str) -> str:
    return f"{underlying} 0DTE CALL — SELL"


def buy_message(position: Position, ctx: BuyContext) -> str:
    """The BUY text: underlying vs VWAP, signal strength, the contract, its quote and how it will be exited."""
    day_vwap = f" | day VWAP ${ctx.day_vwap:.2f}" if ctx.day_vwap else ""
    iv = f"{position.iv * 100:.1f}%" if position.iv is not None else "n/a"
    greeks = "" if ctx.delta_source == "greeks" else " (BS)"
    return "\n".join(
        (
            f"{ctx.underlying} ${ctx.close:.2f} | VWAP ${ctx.rolling_vwap:.2f} "
            f"({vwap_distance(ctx.close, ctx.rolling_vwap)}){day_vwap}",
            f"Momentum {momentum_text(ctx.momentum_pct_per_sec)} | Volume Z {fixed(ctx.volume_z, 1)}",
            f"{position.ticker}",
            f"Exp {position.expiry} | Strike ${position.strike:g} | Delta {position.delta:.2f}{greeks} | IV {iv}",
            f"Entry ~${position.entry_price:.2f} (ask) | Mid {price(ctx.mid)} | Spread {ctx.spread_pct:.1f}%",
            f"bid {ctx.bid:.2f} × ask {position.entry_price:.2f} | "
            f"size {ctx.bid_size:,.0f} × {ctx.ask_size:,.0f} (bid × ask) | Contracts {position.contracts}",
            f"Filters: {ctx.filters}",
            ctx.exit_rules,
            f"{clock_text(position.entry_ms)} | trade {position.trade_id}",
        )
    )


@dataclass(frozen=True, slots=True)
class SellContext:
    """Everything a SELL alert shows besides the position itself (as it stood at the exit)."""

    underlying: str
    reason: str
    close: float | None
    rolling_vwap: float | None
    exit_price: float
    exit_ms: int
    pnl_dollars: float
    pnl_percent: float
    lifetime: Lifetime
    trigger: ExitTrigger | None = None
    missed: bool = False  # the daemon was not running at the time stop; the trade is booked at it
    old_quote_ms: int | None = None  # how long no new quote had set the mark, when that is too long


def late_summary_text(session_date: str) -> str:
    """The first line of a SUMMARY sent after a restart: the daemon was not running at that day's close."""
    weekday = datetime.date.fromisoformat(session_date).strftime("%a")
    return f"Late: the daemon was not running at the close of {weekday} {session_date}; sent on its restart."


def missed_stop_text(exit_ms: int) -> str:
    """The SELL line for a time stop the daemon missed: when it was due and what the exit price is."""
    due = ny_datetime(exit_ms).strftime("%a %Y-%m-%d %H:%M ET")
    return f"Late: the daemon was not running at the time stop ({due}); exit priced at the last bid it saw"


def sell_message(position: Position, ctx: SellContext) -> str:
    """The SELL text: why (and how far past its trigger), where the trade ended, the lifetime record."""
    if ctx.close is not None and ctx.rolling_vwap is not None:
        vs = f"{ctx.underlying} ${ctx.close:.2f} vs VWAP ${ctx.rolling_vwap:.2f} "
        vs += f"({vwap_distance(ctx.close, ctx.rolling_vwap)})"
    else:
        vs = f"{ctx.underlying}: no bar yet"
    trigger = () if ctx.trigger is None else (trigger_text(ctx.trigger, position.mark),)
    late = (missed_stop_text(ctx.exit_ms),) if ctx.missed else ()
    old = () if ctx.old_quote_ms is None else (old_quote_text(ctx.old_quote_ms),)
    return "\n".join(
        (
            f"Reason: {ctx.reason}",
            *late,
            *old,
            *trigger,
            vs,
            f"{position.ticker}",
            f"Peak {price(position.peak)} → Now {price(position.mark)}",
            f"Entry ${position.entry_price:.2f} → Exit ~${ctx.exit_price:.2f} (bid)",
            f"P&L: {signed_pct(ctx.pnl_percent)} ({money(ctx.pnl_dollars)})",
            f"LIFETIME: {money(ctx.lifetime.pnl)} | {ctx.lifetime.record()}",
            f"{clock_text(ctx.exit_ms)} | trade {position.trade_id}",
        )
    )


def quote_age_text(seconds: int) -> str:
    """How long no quote came, as the SELL's "Old price" line and the backtest's report say it."""
    return f"{seconds // 60} min" if seconds >= 120 else f"{seconds} s"


def old_quote_text(age_ms: int) -> str:
    """A SELL line when no valid quote renewed the bid it is booked at for long (every quote source failed):
    the P&L is a guess."""
    age = quote_age_text(round(age_ms / 1000))
    return (
        f"Old price: no quote of this contract for {age}; the exit and the P&L are estimates, check its bid."
    )


@dataclass(frozen=True, slots=True)
class DayTrade:
    """One closed trade of the session day, as the daily summary lists it."""

    trade_id: str
    ticker: str
    entry_ms: int
    exit_ms: int
    entry_price: float
    exit_price: float
    reason: str
    pnl_dollars: float
    pnl_percent: float


# Trade lines a summary lists before "... and N more": Pushover cuts a message at 1024 characters, and the
# totals come first so a long day never loses them.
SUMMARY_TRADE_LINES = 10
_OCC_TICKER = re.compile(r"(?:O:)?[A-Z.]+\d{6}([CP])(\d{8})")


def contract_label(ticker: str) -> str:
    """`O:IWM251002C00243500` -> `243.5C` (strike and right); any other ticker as it is."""
    match = _OCC_TICKER.fullmatch(ticker)
    if match is None:
        return ticker
    return f"{int(match.group(2)) / 1000:g}{match.group(1)}"


def summary_key(session_date: str) -> str:
    """The outbox's dedupe key of a day's SUMMARY: one per session day, however often it is decided."""
    return f"SUMMARY:{session_date}"


def summary_title(underlying: str) -> str:
    return f"{underlying} 0DTE — DAILY SUMMARY"


def trade_line(number: int, trade: DayTrade) -> str:
    """`1. 243C 10:06→10:12 $1.45→$1.60 +10.3% (+$15.00) Hard giveback`."""
    held = f"{ny_datetime(trade.entry_ms):%H:%M}→{ny_datetime(trade.exit_ms):%H:%M}"
    prices = f"${trade.entry_price:.2f}→${trade.exit_price:.2f}"
    result = f"{signed_pct(trade.pnl_percent)} ({money(trade.pnl_dollars)})"
    return f"{number}. {contract_label(trade.ticker)} {held} {prices} {result} {trade.reason}"


def summary_message(session_date: str, trades: Sequence[DayTrade], lifetime: Lifetime) -> str:
    """The close's summary: the day's count, P&L and W-L, the lifetime record, then one line per trade."""
    day = Lifetime()
    for trade in trades:
        day = day.after_trade(trade.pnl_dollars)
    weekday = datetime.date.fromisoformat(session_date).strftime("%a")
    count = f"{len(trades)} trade{'' if len(trades) == 1 else 's'}"
    lines = [
        f"{session_date} ({weekday}): {count}",
        f"Day P&L: {money(day.pnl)} | {day.record()}",
        f"LIFETIME: {money(lifetime.pnl)} | {lifetime.record()}",
    ]
    shown = trades[:SUMMARY_TRADE_LINES]
    lines += [trade_line(n, trade) for n, trade in enumerate(shown, start=1)]
    if len(trades) > len(shown):
        lines.append(f"... and {len(trades) - len(shown)} more")
    if not trades:
        lines.append("No trades today.")
    return "\n".join(lines)


FEED_ERROR_TEXT = {
    "auth_failed": "The stream refused the API key (auth_failed). Check POLYGON_API_KEY; retrying slowly.",
    "max_connections": (
        "Polygon closed the stream: another connection uses this key (max_connections). Run one daemon per "
        "key; backing off at least 60 s."
    ),
    "unauthorized": "REST refused the API key (HTTP 401). Check POLYGON_API_KEY; polling once a minute.",
    "not_entitled": (
        "Your Polygon plan does not include this data (HTTP 403), so no chain: entries are blocked. "
        "Polling once a minute."
    ),
}


def feed_error_text(reason: str) -> str:
    """What a FEED ERROR alert says for a feed status reason."""
    return FEED_ERROR_TEXT.get(reason, f"Market data feed: {reason}.")


def holding_note(ticker: str) -> str:
    """What a feed alert adds while a position is held: the SELL it waits for may come late."""
    return (
        f"You hold {ticker}: its SELL may come late while the feed is down, so watch the position yourself."
    )


REPEAT_TITLE_SUFFIX = " (possible repeat)"


def sent_late(title: str, message: str, at_ms: int, now_ms: int) -> tuple[str, str]:
    """The title and message of an alert that leaves well after it was decided (the way to the phone was
    down): a BUY read minutes late looks like a fresh one, and its prices have moved since."""
    minutes = max(1, round((now_ms - at_ms) / 60_000))
    decided = ny_datetime(at_ms).strftime("%H:%M:%S")
    note = f"Sent late: decided at {decided}, {minutes} min ago; prices have moved since."
    return f"{title} ({minutes} min late)", f"{note}\n\n{message}"


def buy_not_delivered(message: str, why: str) -> str:
    """A SELL's text when its BUY was given up on: said first, so the SELL is not a riddle."""
    return f"Its BUY alert was not delivered ({why}): this SELL closes that trade.\n\n{message}"


def possible_repeat(title: str, message: str, at_ms: int) -> tuple[str, str]:
    """The title and message of an alert sent again after a send that got no answer.

    Pushover may have taken the first request (the alerter was stopped, or the answer was lost), so the
    phone may already show it: said in the title, where a glance sees it, so nobody acts twice.
    """
    decided = ny_datetime(at_ms).strftime("%H:%M:%S")
    note = (
        f"Possible repeat: an earlier send of this alert (decided {decided}) got no answer, so it may "
        "already be on your phone. If it is, this is the same alert: do not act on it twice."
    )
    return title + REPEAT_TITLE_SUFFIX, f"{note}\n\n{message}"
