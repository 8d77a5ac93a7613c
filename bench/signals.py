"""Time `FeatureEngine.update` on random per-second bars and print bars/s.

Run from the repo root: `python bench/signals.py`. Prints figures only; asserts nothing. The figure
is the best of a few rounds. The bars are built before timing and frozen out of the garbage
collector, so the figure is the engine's, not the collector's walk over the prepared input.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import Rules  # noqa: E402 - needs the repo root on sys.path
from events import Bar  # noqa: E402
from signals import FeatureEngine  # noqa: E402

BARS = 100_000
START_MS = 1_759_415_400_000
ROUNDS = 3


def random_bars(count: int, seed: int = 1) -> list[Bar]:
    """Bars one to three seconds apart with a random-walk close and heavy-tailed volume."""
    rng = random.Random(seed)
    bars = []
    start = START_MS
    price = 220.0
    for _ in range(count):
        start += 1000 * rng.choice((1, 1, 1, 2, 3))
        price = round(price + rng.gauss(0.0, 0.02), 2)
        volume = float(int(rng.paretovariate(1.5) * 100))
        vw = None if rng.random() < 0.1 else price + 0.001
        bar = Bar("IWM", start, start + 1000, price, price, price, price, volume, vw, None, None, start)
        bars.append(bar)
    return bars


def time_updates(bars: list[Bar]) -> float:
    """Seconds one fresh engine with default rules takes over `bars`."""
    engine = FeatureEngine(Rules())
    began = time.perf_counter()
    for bar in bars:
        engine.update(bar)
    return time.perf_counter() - began


def main() -> None:
    """Print the best rate over ROUNDS runs of BARS bars."""
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and nothing else
    bars = random_bars(BARS)
    gc.collect()
    gc.freeze()
    best = min(time_updates(bars) for _ in range(ROUNDS))
    print(f"FeatureEngine.update: {BARS:,} bars, best of {ROUNDS}: {best:.3f} s = {BARS / best:,.0f} bars/s")


if __name__ == "__main__":
    main()
