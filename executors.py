"""Where a backtest's day tasks run: the local process pool, or a Dask cluster (`dask_days`).

One seam for sweeps and single runs. A task is a module-level function whose first two parameters are
the tape (a local path, or a list of them) and the decoded-tape cache folder (None: no cache); the
executor supplies both, so a task never sees where the tape came from. The pool hands its workers the
client's own paths and cache folder; a Dask cluster ships each tape to its workers, which keep a
cache of their own (see `dask_days`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TextIO, TypeVar

from backtest_run import init_pool_worker
from config import Rules
from progress import Progress
from tape_cache import cache_path, ensure_decoded

T = TypeVar("T")


class ExecutorError(Exception):
    """The executor itself failed (scheduler unreachable, worker lost); its text is one line for the user."""


class DayExecutor(Protocol):
    """Runs day tasks over the tapes it was given, by their index in that list.

    `remote` says the tasks run away from this process: a single run then goes day by day in parallel
    (see `backtest_run.run_single`) instead of in order in this process.
    """

    remote: bool

    def each_day(self, task: Callable[..., T], indices: Sequence[int], *args: Any) -> Iterator[tuple[int, T]]:
        """`task(tape, cache_dir, *args)` once per tape at `indices`; (index, result) as each completes."""
        ...

    def over_days(
        self, task: Callable[..., T], indices: Sequence[int], jobs: Sequence[tuple[Any, ...]]
    ) -> list[T]:
        """`task(tapes, cache_dir, *job)` per job over the tapes at `indices` (in order); results in job order."""
        ...

    def close(self) -> None:
        """Release the workers (and any cluster the executor started)."""
        ...


class PoolDays:
    """The local process pool: tasks read the client's tapes and its decoded-tape cache directly."""

    remote = False

    def __init__(self, tapes: Sequence[Path], workers: int, cache_dir: Path | None) -> None:
        self.tapes = [Path(tape) for tape in tapes]
        self.cache_dir = cache_dir
        self._pool = ProcessPoolExecutor(max_workers=max(1, workers), initializer=init_pool_worker)

    def each_day(self, task: Callable[..., T], indices: Sequence[int], *args: Any) -> Iterator[tuple[int, T]]:
        """See `DayExecutor.each_day`."""
        futures = {self._pool.submit(task, self.tapes[i], self.cache_dir, *args): i for i in indices}
        for future in as_completed(futures):
            yield futures[future], future.result()

    def over_days(
        self, task: Callable[..., T], indices: Sequence[int], jobs: Sequence[tuple[Any, ...]]
    ) -> list[T]:
        """See `DayExecutor.over_days`."""
        tapes = [self.tapes[i] for i in indices]
        futures = [self._pool.submit(task, tapes, self.cache_dir, *job) for job in jobs]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Shut the pool down."""
        self._pool.shutdown()

    def __enter__(self) -> PoolDays:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def decode_in_pool(tapes: Sequence[Path], rules: Rules, cache_dir: Path, workers: int, err: TextIO) -> None:
    """Decode the tapes not yet cached on every core, so the (sequential) run only reads the cache."""
    missing = [t for t in tapes if not cache_path(Path(t), rules, cache_dir).is_file()]
    if len(missing) < 2:
        return
    progress = Progress("decoding tapes", len(missing), stream=err)
    with ProcessPoolExecutor(max_workers=workers, initializer=init_pool_worker) as pool:
        futures = {pool.submit(ensure_decoded, Path(t), rules, cache_dir): t for t in missing}
        for future in as_completed(futures):
            future.result()
            progress.step(Path(futures[future]).name)
    progress.close()
