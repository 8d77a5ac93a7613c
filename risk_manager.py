"""The open position, its exit rules and the entry protections.

Pure functions over small values: nothing here keeps state between calls, so every rule can be
tested with a hand-made `Position` and a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import time

from config import Rules

# Prices arrive as binary floats of cent values; a boundary reached to the cent must count as reached.
PRICE_EPSILON = 1e-9

EXIT_REASONS = ("Time stop", "Stop loss", "Hard giveback", "VWAP giveback", "VWAP persistence")


@dataclass(frozen=True, slots=True)
class Position:
    """An open position as the engine follows it. `mark` is the held contract's latest valid mid."""

    trade_id: str
    session_date: str
    ticker: str
    strike: float
    expiry: str
    contracts: int
    entry_price: float
    entry_mark: float
    entry_ms: int
    delta: float
    iv: float | None
    peak: float
    mark: float
    bid: float
    below_vwap_since_ms: int | None = None

    def giveback(self) -> float:
        """Fraction of the peak mark given back, 0 when the peak is not positive."""
        return (self.peak - self.mark) / self.peak if self.peak > 0 else 0.0


@dataclass(frozen=True, slots=True)
class ExitDecision:
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Block:
    """Why an entry was refused: the rule, the value it saw and the limit it compared with."""

    rule: str
    value: str
    limit: str

    def describe(self) -> str:
        return f"{self.rule} ({self.value} vs {self.limit})"


def with_mark(position: Position, mid: float, bid: float) -> Position:
    """The position after a new valid quote: mark, bid and (if higher) peak move.

    A quote that moves nothing returns `position` itself, so callers can tell "unchanged" by identity.
    """
    if mid == position.mark and bid == position.bid and mid <= position.peak:
        return position
    return replace(position, mark=mid, bid=bid, peak=max(position.peak, mid))


def track_vwap(position: Position, *, close: float, vwap: float, now_ms: int) -> Position:
    """Start the VWAP-persistence clock at the first close below VWAP; a close at or above resets it."""
    if close < vwap:
        if position.below_vwap_since_ms is None:
            return replace(position, below_vwap_since_ms=now_ms)
        return position
    if position.below_vwap_since_ms is not None:
        return replace(position, below_vwap_since_ms=None)
    return position


def check_exit(
    position: Position,
    *,
    now_ms: int,
    time_stop_ms: int,
    last_close: float | None,
    last_vwap: float | None,
    rules: Rules,
) -> ExitDecision | None:
    """The first exit rule that holds, in DESIGN order, or None."""
    if now_ms >= time_stop_ms:
        return ExitDecision("Time stop", "session cut-off reached")
    stop_price = position.entry_price * (1 - rules.stop_loss_percent / 100)
    if position.mark <= stop_price + PRICE_EPSILON:
        return ExitDecision("Stop loss", f"mark {position.mark:.4f} <= {stop_price:.4f}")
    giveback = position.giveback()
    if giveback >= rules.max_giveback_percent / 100 - PRICE_EPSILON:
        return ExitDecision("Hard giveback", f"gave back {giveback:.1%} of peak")
    below_vwap = last_close is not None and last_vwap is not None and last_close < last_vwap
    if below_vwap and giveback >= rules.tighten_giveback_percent / 100 - PRICE_EPSILON:
        return ExitDecision("VWAP giveback", f"below VWAP and gave back {giveback:.1%}")
    persistence_ms = vwap_persistence_ms(rules)
    since = position.below_vwap_since_ms
    if since is not None and now_ms - since >= persistence_ms:
        return ExitDecision("VWAP persistence", f"below VWAP for {(now_ms - since) / 1000:.0f}s")
    return None


def exit_quiet_until(position: Position, *, time_stop_ms: int, rules: Rules) -> int:
    """The first time a time-based exit rule can hold for this position, all else unchanged.

    `check_exit` depends on the time only through the time stop and the VWAP persistence clock, both
    reached by time passing; so after it finds no exit, the same inputs give no exit before this time.
    """
    if position.below_vwap_since_ms is None:
        return time_stop_ms
    return min(time_stop_ms, position.below_vwap_since_ms + vwap_persistence_ms(rules))


def vwap_persistence_ms(rules: Rules) -> int:
    """How long closes must stay below VWAP for the persistence exit."""
    return rules.vwap_exit_blocks * rules.vwap_block_seconds * 1000


@dataclass(frozen=True, slots=True)
class DayRecord:
    """What today's closed trades say about the protections."""

    trades: int = 0
    consecutive_losses: int = 0
    pnl: float = 0.0

    def after_trade(self, pnl: float) -> DayRecord:
        losses = 0 if pnl > 0 else self.consecutive_losses + 1
        return DayRecord(self.trades + 1, losses, round(self.pnl + pnl, 2))


def protection_block(
    day: DayRecord, *, opened_today: int, clock: time, paused: bool, rules: Rules
) -> Block | None:
    """The first protection that forbids a new entry now, or None. A limit of 0 disables it."""
    if paused:
        return Block("paused", "pause switch on", "resume to allow entries")
    if rules.max_trades_per_day and opened_today >= rules.max_trades_per_day:
        return Block("max_trades_per_day", str(opened_today), str(rules.max_trades_per_day))
    if rules.max_consecutive_losses and day.consecutive_losses >= rules.max_consecutive_losses:
        return Block("max_consecutive_losses", str(day.consecutive_losses), str(rules.max_consecutive_losses))
    if rules.daily_loss_limit and day.pnl <= -rules.daily_loss_limit:
        return Block("daily_loss_limit", f"{day.pnl:.2f}", f"-{rules.daily_loss_limit:.2f}")
    for start, end in rules.entry_blackouts:
        if start <= clock < end:
            return Block("entry_blackout", clock.strftime("%H:%M:%S"), f"{start:%H:%M}-{end:%H:%M}")
    return None


def pnl_of(entry_price: float, exit_price: float, contracts: int) -> tuple[float, float]:
    """P&L in dollars (cents-rounded) and percent (of the entry price)."""
    dollars = round((exit_price - entry_price) * 100 * contracts, 2)
    percent = round((exit_price / entry_price - 1) * 100, 2) if entry_price > 0 else 0.0
    return dollars, percent


@dataclass(frozen=True, slots=True)
class Lifetime:
    """Every closed trade ever: total P&L and the W-L record ($0.00 counts as a loss)."""

    pnl: float = 0.0
    wins: int = 0
    losses: int = 0

    def after_trade(self, pnl: float) -> Lifetime:
        won = pnl > 0
        return Lifetime(round(self.pnl + pnl, 2), self.wins + won, self.losses + (not won))

    def record(self) -> str:
        total = self.wins + self.losses
        rate = f"{self.wins / total * 100:.1f}%" if total else "n/a"
        return f"{self.wins}W-{self.losses}L ({rate})"
