"""Engine throughput on the demo day. Prints figures; asserts nothing.

1. bars/s: the engine alone over the day's decoded Bar events (IWM and SPY), no chains.
2. the whole day: the tape replayed through decoder, ticks, chains, selector and a real SQLite journal.

Run: python bench/engine.py [--repeat N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Rules  # noqa: E402
from engine import Engine  # noqa: E402
from events import Bar  # noqa: E402
from feed import FeedDecoder  # noqa: E402
from market_calendar import MarketCalendar  # noqa: E402
from pnl_tracker import Journal  # noqa: E402
from replay import received_from, replay_tape  # noqa: E402
from sim.market import build_demo_tape  # noqa: E402
from tape import TapeReader  # noqa: E402


def decoded_bars(tape: Path, rules: Rules) -> list[Bar]:
    decoder = FeedDecoder.for_rules(rules)
    bars: list[Bar] = []
    for line in TapeReader(tape):
        item = received_from(line)
        if item is not None and item.kind == "ws":
            bars.extend(e for e in decoder.ws(item.t, item.payload) if isinstance(e, Bar))
    return bars


def time_bars(bars: list[Bar], rules: Rules, calendar: MarketCalendar) -> float:
    engine = Engine(rules, calendar)
    started = time.perf_counter()
    for bar in bars:
        engine.on_event(bar)
    return time.perf_counter() - started


def time_day(tape: Path, rules: Rules, calendar: MarketCalendar, folder: Path, run: int) -> float:
    journal = Journal(folder / f"bench-{run}.sqlite3")
    started = time.perf_counter()
    replay_tape(
        tape,
        rules=rules,
        calendar=calendar,
        journal=journal,
        on_alerts=lambda _a: None,
        on_log=lambda _l: None,
    )
    elapsed = time.perf_counter() - started
    journal.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rules = Rules()
    calendar = MarketCalendar(rules)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tape = build_demo_tape(folder / "2025-10-02.jsonl.gz")
        bars = decoded_bars(tape, rules)
        bar_times = [time_bars(bars, rules, calendar) for _ in range(args.repeat)]
        day_times = [time_day(tape, rules, calendar, folder, run) for run in range(args.repeat)]
    best = min(bar_times)
    print(f"bar events: {len(bars):,} (IWM + SPY)")
    print(
        f"engine, bar events only: best {len(bars) / best:,.0f} bars/s ({best * 1e6 / len(bars):.1f} us/bar)"
    )
    print(
        f"whole day with chains, ticks, decoding and journal: best {min(day_times):.2f} s, "
        f"runs {', '.join(f'{t:.2f}' for t in day_times)}"
    )


if __name__ == "__main__":
    main()
