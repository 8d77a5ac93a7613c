"""Time `parse_ws_frame` on synthetic IWM per-second aggregates and print events/s.

Run from the repo root: `python bench/parse.py`. Prints figures only; asserts nothing. Each figure
is the best of a few rounds. Two floors are printed for scale, because they bound the parser on any
given machine: `json.loads` alone, and constructing `events.Bar` alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from events import Bar  # noqa: E402 - needs the repo root on sys.path
from polygon_client import parse_ws_frame  # noqa: E402

EVENTS = 100_000
EVENTS_PER_FRAME = 2
START_MS = 1_759_415_400_000
SYMBOLS = frozenset({"IWM", "SPY"})
ROUNDS = 3


def synthetic_event(i: int) -> dict:
    """One plausible IWM `A` event for second `i` of the session."""
    close = 242.0 + (i % 50) * 0.01
    return {
        "ev": "A",
        "sym": "IWM",
        "v": 100 + i % 900,
        "av": 1_000_000 + i * 500,
        "op": 241.5,
        "vw": close - 0.002,
        "o": close - 0.01,
        "c": close,
        "h": close + 0.02,
        "l": close - 0.02,
        "a": 241.9,
        "z": 100,
        "s": START_MS + i * 1000,
        "e": START_MS + i * 1000 + 1000,
    }


def synthetic_frames() -> list[str]:
    """The raw text of frames holding `EVENTS` events, `EVENTS_PER_FRAME` each."""
    frames = []
    for first in range(0, EVENTS, EVENTS_PER_FRAME):
        batch = [synthetic_event(i) for i in range(first, first + EVENTS_PER_FRAME)]
        frames.append(json.dumps(batch, separators=(",", ":")))
    return frames


def best_seconds(work: Callable[[], object]) -> float:
    """The shortest wall time of `ROUNDS` runs of `work`."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def parse_all(payloads: list) -> int:
    """Parse every payload once; the number of bars produced."""
    bars = 0
    for received_ms, payload in enumerate(payloads, START_MS):
        bars += len(parse_ws_frame(payload, received_ms, SYMBOLS).bars)
    return bars


def decode_all(frames: list[str]) -> None:
    """`json.loads` of every frame, nothing else."""
    for frame in frames:
        json.loads(frame)


def build_bars() -> None:
    """Construct `EVENTS` bars directly, nothing else."""
    for i in range(EVENTS):
        Bar("IWM", i, i + 1000, 242.0, 242.02, 241.98, 242.01, 100, 242.0, 241.9, 1_000_000, i)


def report(label: str, seconds: float) -> None:
    """Print one rate line."""
    print(f"{label:<34} {seconds:6.3f} s = {EVENTS / seconds:>10,.0f} events/s")


def main() -> None:
    """Build the frames, then time text frames (live), pre-decoded frames (replay) and the floors."""
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and nothing else
    frames = synthetic_frames()
    decoded = [json.loads(frame) for frame in frames]
    print(f"{EVENTS:,} IWM A events in {len(frames):,} frames of {EVENTS_PER_FRAME}, best of {ROUNDS}")
    print(f"bars per pass: {parse_all(frames):,}")
    report("parse_ws_frame, text frames (live)", best_seconds(lambda: parse_all(frames)))
    report("parse_ws_frame, decoded (tape)", best_seconds(lambda: parse_all(decoded)))
    report("floor: json.loads only", best_seconds(lambda: decode_all(frames)))
    report("floor: Bar(...) only", best_seconds(build_bars))


if __name__ == "__main__":
    main()
