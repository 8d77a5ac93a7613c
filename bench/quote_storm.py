"""A quote storm on the held contract through the engine thread's step. Prints figures; asserts nothing.

Ten minutes of 200 quotes a second (120,000 `Q` frames of the held contract, prices wandering a cent at a
time, quote times 5 ms apart) go through what the live engine thread does with each: record the frame
on a tape, decode it, run the engine, and write the durable actions through the daemon's write-behind
journal (SQLite, synchronous=FULL). It prints the throughput (frames a second of one core: the headroom
over the 200 a second the storm needs), the share of a core the storm takes, and how many journal writes
the peak cost (at most one a second of engine time, not one per quote).

Run: python bench/quote_storm.py [--minutes 10] [--rate 200]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the tests' hand-made market builders

from builders import at, burst_bars, chain, engine, quote  # noqa: E402

from delivery import WriteBehindJournal  # noqa: E402
from events import Received, UpdatePosition  # noqa: E402
from feed import FeedDecoder  # noqa: E402
from pipeline import Pipeline  # noqa: E402
from pnl_tracker import Journal  # noqa: E402
from tape import TapeWriter  # noqa: E402

TICKER = "O:IWM251002C00242000"


class CountingJournal(WriteBehindJournal):
    """The daemon's write-behind journal, counting the position updates it writes."""

    updates = 0

    def record(self, actions, cursor=None):  # noqa: ANN001, ANN201 - the parent's signature
        self.updates += sum(isinstance(a, UpdatePosition) for a in actions)
        return super().record(actions, cursor)


def storm_frames(first_ms: int, count: int, gap_ms: int, seed: int) -> list[Received]:
    """`count` one-quote frames of the held contract, `gap_ms` apart, the mid wandering by cents."""
    rng = random.Random(seed)
    mid, frames = 1.20, []
    for n in range(count):
        mid = min(1.30, max(1.10, mid + rng.choice((-0.01, 0.0, 0.01))))  # within every exit's reach
        t = first_ms + n * gap_ms
        event = {"ev": "Q", "sym": TICKER, "bp": round(mid - 0.01, 2), "ap": round(mid + 0.01, 2),
                 "bs": 20, "as": 20, "t": t - 2, "q": n}  # fmt: skip
        frames.append(Received(t, "ws", json.dumps([event])))
    return frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args(argv)
    eng = engine()
    start = at(10, 0)
    count = int(args.minutes * 60 * args.rate)
    frames = storm_frames(start + 121_000, count, max(1, round(1000 / args.rate)), seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "journal.sqlite3")
        writer = CountingJournal(journal, clock_ms=lambda: 0)
        pipeline = Pipeline(eng, writer, FeedDecoder("IWM", "SPY"), on_alerts=lambda _a: None,
                            on_log=lambda _l: None)  # fmt: skip
        for event in [chain(start + 110_000, quote()), *burst_bars(start)]:
            pipeline.run(event)
        assert eng.position is not None, "the scripted burst did not open a position"
        with TapeWriter(
            Path(tmp) / "storm.jsonl.gz", underlying="IWM", benchmark="SPY", start_ms=start
        ) as tape:
            began = time.perf_counter()
            for item in frames:
                tape.write_ws(item.t, item.payload)
                pipeline.handle(item)
            took = time.perf_counter() - began
        journal.close()
    per_second = count / took
    print(
        f"{count:,} Q frames ({args.minutes:g} min at {args.rate:g}/s) in {took:.2f} s: {per_second:,.0f} frames/s"
    )
    print(f"share of one core the storm takes: {args.rate / per_second:.1%}")
    print(f"position updates written: {writer.updates} (quotes that moved the mark: {eng.marks.stream:,})")
    ignored = eng.marks.stale + eng.marks.invalid
    print(f"position still open: {eng.position is not None}; quotes ignored (older or invalid): {ignored}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
