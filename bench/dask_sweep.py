"""A 3x3 sweep over synthetic full days: the local pool against a local Dask cluster of 1 and 2 workers.

Prints figures; asserts nothing. Each executor first runs the sweep once untimed so its decoded-tape cache
is warm (the pool's under DATA_DIR/decoded, the workers' beside their scratch folders), then once timed.
The Dask figures include reading, digesting and scattering every tape, not the cluster's start-up
(printed on its own).

Run: python bench/dask_sweep.py [--days 100] [--data data]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed import Client  # noqa: E402

from backtest import build_synthetic_tapes, synthetic_dates, synthetic_folder  # noqa: E402
from backtest_run import use_batch_gc  # noqa: E402
from config import Rules  # noqa: E402
from dask_days import DaskDays, local_cluster  # noqa: E402
from executors import PoolDays  # noqa: E402
from market_calendar import MarketCalendar  # noqa: E402
from sweep import Cell, parse_sweep, run_sweep, sweep_cells  # noqa: E402

SEED = 7
GRID = ["MAX_GIVEBACK_PERCENT=25,30,40", "STOP_LOSS_PERCENT=10,15,20"]


def timed(work: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def pool_sweep(tapes: list[Path], cells: list[Cell], cache: Path) -> float:
    """Seconds of a warm sweep on the local pool of 2 processes."""

    def once() -> None:
        with PoolDays(tapes, 2, cache) as pool:
            run_sweep(tapes, cells, executor=pool)

    once()
    return timed(once)


def dask_sweep(tapes: list[Path], cells: list[Cell], workers: int) -> tuple[float, float]:
    """Start-up and seconds of a warm sweep on a fresh local cluster of `workers` processes."""
    started = time.perf_counter()
    cluster = local_cluster(workers)
    client = Client(cluster)
    startup = time.perf_counter() - started
    try:

        def once() -> None:
            executor = DaskDays(client, tapes, cache=True)
            run_sweep(tapes, cells, executor=executor)
            del executor  # releases the scattered tapes before the next run

        once()
        return startup, timed(once)
    finally:
        client.close()
        cluster.close()


def main() -> None:
    """Build (or reuse) the days, then print the pool, Dask-1 and Dask-2 figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=100)
    parser.add_argument("--data", type=Path, default=Path("data"))
    args = parser.parse_args()
    use_batch_gc()
    calendar = MarketCalendar(Rules())
    folder = synthetic_folder(args.data, SEED)
    tapes = build_synthetic_tapes(synthetic_dates(args.days, calendar), SEED, folder, workers=2)
    cells = sweep_cells(parse_sweep(GRID), {}, environ={}, env_file=None)
    label = f"{args.days} day(s) x {len(cells)} cells"
    pool_s = pool_sweep(tapes, cells, args.data / "decoded")
    print(f"pool (2 processes): {pool_s:.1f} s for {label} (target: under 25 s for 100 days)")
    start_1, dask1_s = dask_sweep(tapes, cells, 1)
    print(f"dask, 1 worker:     {dask1_s:.1f} s (cluster start-up {start_1:.1f} s, not included)")
    start_2, dask2_s = dask_sweep(tapes, cells, 2)
    print(f"dask, 2 workers:    {dask2_s:.1f} s (cluster start-up {start_2:.1f} s, not included)")
    print(f"dask-2 / pool:      {dask2_s / pool_s:.2f} (target: at most 1.15)")
    print(f"1 -> 2 workers:     {dask1_s / dask2_s:.2f}x speed-up")


if __name__ == "__main__":
    main()
