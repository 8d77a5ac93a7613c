"""A 3x3 sweep over synthetic full days: the local pool against a local Dask cluster of 1 and 2 workers.

Prints figures; asserts nothing. Each executor first runs the sweep once untimed so its decoded-tape cache
is warm (the pool's under DATA_DIR/decoded, the workers' in their cluster's own fresh private folder), then
`--repeat` times timed; the best is printed. Before each timed Dask run the workers' copies of the tapes are
deleted, so every Dask figure includes reading, digesting, scattering and writing every tape on the workers
(and the printed count of tapes shipped says so), not the cluster's start-up (printed on its own).

Run: python bench/dask_sweep.py [--days 100] [--data data] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed import Client  # noqa: E402

from backtest import build_synthetic_tapes, synthetic_dates, synthetic_folder  # noqa: E402
from backtest_run import use_batch_gc  # noqa: E402
from config import Rules  # noqa: E402
from dask_days import DaskDays, close_all, local_cluster, private_scratch, worker_cache_root  # noqa: E402
from executors import PoolDays  # noqa: E402
from market_calendar import MarketCalendar  # noqa: E402
from sweep import Cell, parse_sweep, run_sweep, sweep_cells  # noqa: E402

SEED = 7
GRID = ["MAX_GIVEBACK_PERCENT=25,30,40", "STOP_LOSS_PERCENT=10,15,20"]


def best_of(work: Callable[[], object], repeat: int) -> float:
    """Fewest wall seconds of `repeat` calls (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def pool_sweep(tapes: list[Path], cells: list[Cell], cache: Path, repeat: int) -> float:
    """Best seconds of a warm sweep on the local pool of 2 processes."""

    def once() -> None:
        with PoolDays(tapes, 2, cache) as pool:
            run_sweep(tapes, cells, executor=pool)

    once()
    return best_of(once, repeat)


def forget_tapes(dask_worker: Any) -> None:
    """Delete this worker's copies of the shipped tapes, not its decoded cache (run by `Client.run`)."""
    shutil.rmtree(worker_cache_root(dask_worker.local_directory) / "tapes", ignore_errors=True)


def dask_sweep(tapes: list[Path], cells: list[Cell], workers: int, repeat: int) -> tuple[float, float, int]:
    """Start-up, best seconds of a sweep with warm decoded caches and every tape shipped, and the tapes
    shipped per timed run, on a local cluster of `workers` processes in a fresh private folder (an earlier
    cluster's or run's cache would spare it the shipping)."""
    scratch = private_scratch()
    started = time.perf_counter()
    cluster = local_cluster(workers, str(scratch))
    client = Client(cluster)
    startup = time.perf_counter() - started
    shipped = []
    try:

        def once() -> None:
            executor = DaskDays(client, tapes, cache=True)
            run_sweep(tapes, cells, executor=executor)
            shipped.append(executor.shipped)
            del executor  # releases the scattered tapes before the next run

        once()  # warms the decoded cache; the tapes it leaves on the workers are deleted before each run

        def cold_tapes() -> None:
            client.run(forget_tapes)
            once()

        return startup, best_of(cold_tapes, repeat), min(shipped[1:])
    finally:
        close_all(client, cluster, scratch)


def main() -> None:
    """Build (or reuse) the days, then print the pool, Dask-1 and Dask-2 figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=100)
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per executor; the best is printed")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    use_batch_gc()
    calendar = MarketCalendar(Rules())
    folder = synthetic_folder(args.data, SEED)
    tapes = build_synthetic_tapes(synthetic_dates(args.days, calendar), SEED, folder, workers=2)
    cells = sweep_cells(parse_sweep(GRID), {}, environ={}, env_file=None)
    label = f"{args.days} day(s) x {len(cells)} cells, best of {args.repeat}"
    pool_s = pool_sweep(tapes, cells, args.data / "decoded", args.repeat)
    print(f"pool (2 processes): {pool_s:.1f} s for {label} (target: under 25 s for 100 days)")
    start_1, dask1_s, shipped_1 = dask_sweep(tapes, cells, 1, args.repeat)
    print(
        f"dask, 1 worker:     {dask1_s:.1f} s, {shipped_1} tape(s) shipped (start-up {start_1:.1f} s, not included)"
    )
    start_2, dask2_s, shipped_2 = dask_sweep(tapes, cells, 2, args.repeat)
    print(
        f"dask, 2 workers:    {dask2_s:.1f} s, {shipped_2} tape(s) shipped (start-up {start_2:.1f} s, not included)"
    )
    print(f"dask-2 / pool:      {dask2_s / pool_s:.2f} (target: at most 1.15)")
    print(f"1 -> 2 workers:     {dask1_s / dask2_s:.2f}x speed-up")


if __name__ == "__main__":
    main()
