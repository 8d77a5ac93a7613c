"""`python3 main.py --demo`: the bundled synthetic day through the full engine, printed as a phone shows it.

Nothing is sent and nothing touches the live journal: the tape and the journal live in a temporary
folder. Alerts print as they are decided; the once-a-minute "Signal conditions" line is condensed
to one line per half hour plus the line at each BUY, and a summary closes the run.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from alert_text import block_text, fixed, momentum_text, money, rule_words
from config import Rules
from events import Alert, Log
from market_calendar import MarketCalendar, ny_datetime
from pnl_tracker import Journal
from replay import ReplayResult, replay_tape
from sim.market import DEMO_BLACKOUTS, DEMO_ENTRY_BLACKOUTS, build_demo_tape

ALERT_ICONS = {"BUY": "🟢", "SELL": "🔴", "SUMMARY": "📊"}
CONDITIONS_EVERY_MINUTES = 30


@dataclass(slots=True)
class DemoPrinter:
    """Prints alerts in full and a condensed view of the engine's log lines."""

    out: TextIO
    minute_lines: int = 0
    blocked: Counter[str] = field(default_factory=Counter)
    no_contract: int = 0
    _last_note: str = ""
    _repeats: int = 0

    def alerts(self, alerts: list[Alert]) -> None:
        self.finish_notes()
        for alert in alerts:
            icon = ALERT_ICONS.get(alert.kind, "⚠️")
            print(f"\n{icon} {alert.title}", file=self.out)
            for line in alert.message.splitlines():
                print(f"   {line}", file=self.out)

    def log(self, log: Log) -> None:
        if log.event == "signal_conditions":
            self.minute_lines += 1
            if (self.minute_lines - 1) % CONDITIONS_EVERY_MINUTES == 0:
                self.finish_notes()
                print(file=self.out)
                print(condensed_conditions(log.fields), file=self.out)
        elif log.event == "entry_blocked":
            self.blocked[str(log.fields["rule"])] += 1
            text = "blocked by " + block_text(
                str(log.fields["rule"]), str(log.fields["value"]), str(log.fields["limit"])
            )
            self._note(log.fields["time"], str(log.fields["rule"]), text)
        elif log.event in ("entries_paused", "entries_resumed"):
            self.finish_notes()
            words = "paused (python3 main.py --pause)" if log.event == "entries_paused" else "resumed"
            print(f"   [{ny_datetime(int(log.fields['at_ms'])):%H:%M:%S}] entries {words}", file=self.out)
        elif log.event == "no_contract":
            self.no_contract += 1
            self._note(log.fields["time"], "no_contract", f"but {log.fields['why']}")

    def _note(self, at: object, key: str, text: str) -> None:
        """Print a blocked signal once; repeats for the same reason on the next bars are only counted."""
        if key == self._last_note:
            self._repeats += 1
            return
        self.finish_notes()
        self._last_note = key
        print(f"   [{at}] signal {text}", file=self.out)

    def finish_notes(self) -> None:
        if self._repeats:
            print(f"   ... and {self._repeats} more bar(s) with the same outcome", file=self.out)
        self._last_note, self._repeats = "", 0


def condensed_conditions(f: dict[str, Any]) -> str:
    """One short line of the minute's signal conditions, in words and fixed-point numbers."""

    def yes(flag: object) -> str:
        return "yes" if flag else "no"

    threshold = f["volume_threshold"]
    p95 = ", no p95 yet" if threshold is None else f" vs p95 {threshold:,.0f}"
    chain_age = "n/a" if f["chain_age_s"] is None else f"{fixed(f['chain_age_s'], 1)}s"
    return (
        f"[{f['time']}] Signal conditions: IWM ${f['close']:.2f} vs VWAP ${f['vwap']:.2f}"
        f" (above: {yes(f['above_vwap'])}) | VWAP rising: {yes(f['vwap_rising'])}"
        f" | volume {f['volume']:,.0f}{p95} (surge: {yes(f['volume_surge'])})"
        f" | momentum {momentum_text(f['momentum_pct_s'])} | chain age {chain_age}"
        f" | {rule_words('spy_leadership')}: {f.get('spy_leadership')}"
        f" | {rule_words('relative_volume')}: {f.get('relative_volume')}"
    )


def run_demo(out: TextIO) -> int:
    """Build the demo tape, replay it, print everything; returns the exit status."""
    rules = replace(Rules(), entry_blackouts=DEMO_ENTRY_BLACKOUTS)
    print(
        "IWM 0DTE Momentum Alerter — demo: a synthetic session (fixed seed) through the real engine.",
        file=out,
    )
    print("Alert-only. Nothing is sent to Pushover and nothing is traded.", file=out)
    print(
        f"Default rules, plus ENTRY_BLACKOUTS={DEMO_BLACKOUTS} to show the blackout; the tape pauses entries"
        " 10:40-10:46 as `python3 main.py --pause` would.",
        file=out,
    )
    print(
        "The held contract's quotes stream as the options cluster sends them (Q events), so each exit fires on"
        " the quote that crosses its trigger, at that quote's bid.",
        file=out,
    )
    with tempfile.TemporaryDirectory(prefix="iwm-demo-") as tmp:
        tape = build_demo_tape(Path(tmp) / "demo.jsonl.gz")
        journal = Journal(Path(tmp) / "demo.sqlite3")
        printer = DemoPrinter(out)
        result = replay_tape(
            tape,
            rules=rules,
            calendar=MarketCalendar(rules),
            journal=journal,
            on_alerts=printer.alerts,
            on_log=printer.log,
        )
        print_summary(out, journal, result, printer)
        journal.close()
        show_guard_rails(out, tape, rules)
    return 0


GUARD_RAILS = (
    ("MAX_TRADES_PER_DAY=2", {"max_trades_per_day": 2}),
    ("MAX_CONSECUTIVE_LOSSES=1", {"max_consecutive_losses": 1}),
    ("DAILY_LOSS_LIMIT=10", {"daily_loss_limit": 10.0}),
)


def show_guard_rails(out: TextIO, tape: Path, rules: Rules) -> None:
    """Replay the day under tighter protections and show the first signal each one stops."""
    print(
        "\nGuard rails: the same day under tighter limits (entries stop; exits and SELLs never do)", file=out
    )
    calendar = MarketCalendar(rules)
    for label, changes in GUARD_RAILS:
        rule = next(iter(changes))
        kinds, first = first_block(tape, replace(rules, **changes), calendar, rule)
        stop = (
            f"first blocked signal at {first['time']} ({first['value']} vs {first['limit']})"
            if first
            else "no block"
        )
        print(f"  {label}: {kinds.count('BUY')} BUY / {kinds.count('SELL')} SELL; {stop}", file=out)


def first_block(
    tape: Path, rules: Rules, calendar: MarketCalendar, rule: str
) -> tuple[list[str], dict[str, object] | None]:
    """The alert kinds of a replay under `rules` and the fields of the first signal `rule` blocked."""
    kinds: list[str] = []
    blocked: list[dict[str, object]] = []

    def keep_block(log: Log) -> None:
        if log.event == "entry_blocked" and log.fields["rule"] == rule:
            blocked.append(log.fields)

    replay_tape(
        tape,
        rules=rules,
        calendar=calendar,
        journal=None,
        on_alerts=lambda alerts: kinds.extend(a.kind for a in alerts),
        on_log=keep_block,
    )
    return kinds, (blocked[0] if blocked else None)


def print_summary(out: TextIO, journal: Journal, result: ReplayResult, printer: DemoPrinter) -> None:
    trades = journal.trades()
    wins = sum(1 for t in trades if t.pnl_dollars > 0)
    total = round(sum(t.pnl_dollars for t in trades), 2)
    reasons = Counter(t.reason for t in trades)
    rate = f"{wins / len(trades) * 100:.1f}%" if trades else "n/a"
    state = journal.restored_state("")
    print("\nSummary", file=out)
    print(
        f"  trades {len(trades)} | win rate {rate} ({wins}W-{len(trades) - wins}L) | P&L {money(total)}"
        f" | lifetime {money(state.lifetime.pnl)}",
        file=out,
    )
    print(f"  exits: {', '.join(f'{r} {n}' for r, n in reasons.most_common()) or 'none'}", file=out)
    for t in trades:
        print(
            f"  {t.trade_id} {t.ticker} entry ${t.entry_price:.2f} exit ${t.exit_price:.2f}"
            f" {money(t.pnl_dollars)} ({t.pnl_percent:+.1f}%) {t.reason}",
            file=out,
        )
    if printer.blocked:
        print(
            f"  signals blocked: {', '.join(f'{rule_words(r)} {n}' for r, n in printer.blocked.most_common())}",
            file=out,
        )
    feed = result.feed
    print(
        f"  tape: {result.lines} lines, {result.bars} IWM bars, {feed.bad_events} bad events,"
        f" {result.late_bars} late bars, {result.bad_lines} bad lines",
        file=out,
    )
