"""Day tasks on a Dask distributed cluster (`backtest.py --dask ADDRESS`, or DASK_SCHEDULER_ADDRESS).

Workers on other machines cannot read this machine's paths, so every tape is shipped: a local tape is
read here once, scattered to the cluster once (its future serves the day task and any re-run), and an
fsspec URL (`s3://`, `gs://`, `file://`...) is shipped as the URL and opened on the worker. A worker
writes the tape it receives under its own cache folder, named by the tape's content digest (a URL by
its filesystem's identity of the file, `fsspec` `ukey`), and keeps its decoded copy and features
there (`tape_cache`), so a tape is decoded once per worker machine whatever path the client gave it.
Results come back as the plain dataclasses the tasks return.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from backtest_run import use_batch_gc
from executors import ExecutorError

T = TypeVar("T")
ADDRESS_VARIABLE = "DASK_SCHEDULER_ADDRESS"
LOCAL_PREFIX = "local:"
CACHE_FOLDER = "iwm-alerter-cache"
URL_MARK = "://"


@dataclass(frozen=True, slots=True)
class TapeRef:
    """What a worker needs to find or rebuild a tape: its file name, an identity digest, and a URL or not."""

    name: str
    digest: str
    url: str | None = None


def is_url(tape: Path | str) -> bool:
    """Whether a tape argument is an fsspec URL (`s3://...`) rather than a local path."""
    return isinstance(tape, str) and URL_MARK in tape


def scheduler_address(flag: str | None, environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The cluster to use: `--dask` wins over DASK_SCHEDULER_ADDRESS; None means the local pool."""
    return flag or environ.get(ADDRESS_VARIABLE) or None


class TapeMissing(Exception):
    """A task got no bytes for a tape its worker does not hold (a worker that joined late, a cleared cache)."""


def worker_cache_root(local_directory: str | None = None) -> Path:
    """This worker machine's cache: beside the workers' scratch folders, so it outlives one cluster."""
    if local_directory is None:
        from distributed import get_worker

        local_directory = get_worker().local_directory
    return Path(local_directory).parent / CACHE_FOLDER


def held_digests(dask_worker: Any) -> list[str]:
    """The digests of the tapes this worker's machine holds (run on every worker by `Client.run`)."""
    folder = worker_cache_root(dask_worker.local_directory) / "tapes"
    try:
        return sorted(entry.name for entry in folder.iterdir() if any(entry.iterdir()))
    except OSError:
        return []


def worker_tape(ref: TapeRef, data: bytes | None) -> Path:
    """The tape as a file on this worker, written once per digest (later tasks find it there)."""
    path = worker_cache_root() / "tapes" / ref.digest / ref.name
    if path.is_file():
        return path
    if data is None and ref.url is None:
        raise TapeMissing(ref.digest)
    if data is None:
        import fsspec

        with fsspec.open(ref.url, "rb") as handle:
            data = handle.read()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{ref.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)  # whole or absent: two workers of a machine may write it at once
    return path


def on_tape(task: Callable[..., T], ref: TapeRef, data: bytes | None, cache: bool, *args: Any) -> T:
    """Run a day task on a worker over its local copy of the tape."""
    use_batch_gc()  # as the pool's initializer does: cheap, and a worker may have joined since
    cache_dir = worker_cache_root() / "decoded" if cache else None
    return task(worker_tape(ref, data), cache_dir, *args)


def on_tapes(
    task: Callable[..., T], refs: Sequence[TapeRef], data: Sequence[bytes | None], cache: bool, *args: Any
) -> T:
    """Run a task over several tapes in order on one worker (a sweep's re-run, a dependent single run)."""
    use_batch_gc()
    cache_dir = worker_cache_root() / "decoded" if cache else None
    paths = [worker_tape(ref, blob) for ref, blob in zip(refs, data, strict=True)]
    return task(paths, cache_dir, *args)


def tape_ref(tape: Path | str, data: bytes | None) -> TapeRef:
    """A local tape by its content's digest; a URL by its filesystem's identity of the file."""
    if is_url(tape):
        import fsspec

        fs, inner = fsspec.core.url_to_fs(str(tape))
        identity = hashlib.sha256(f"{tape}\0{fs.ukey(inner)}".encode()).hexdigest()[:32]
        return TapeRef(str(tape).rsplit("/", 1)[-1], identity, str(tape))
    assert data is not None
    return TapeRef(Path(tape).name, hashlib.sha256(data).hexdigest()[:32])


class DaskDays:
    """A `DayExecutor` on a Dask cluster: tapes shipped once, tasks followed as they complete.

    A tape every worker's machine already holds (by content digest, from an earlier run) is not shipped
    again; a task that lands on a worker without it fails with `TapeMissing` and is sent again with
    the bytes.
    """

    remote = True

    def __init__(self, client: Any, tapes: Sequence[Path | str], cache: bool, cluster: Any = None) -> None:
        self._client, self._cluster, self._cache = client, cluster, cache
        self._tapes = list(tapes)
        # One tape in memory at a time: a year of tapes is gigabytes.
        self.refs = [tape_ref(t, None if is_url(t) else Path(t).read_bytes()) for t in self._tapes]
        self.data: list[Any] = [None] * len(self._tapes)
        self.shipped = 0
        held = self._held_everywhere()
        self._ship(
            [i for i, t in enumerate(self._tapes) if not is_url(t) and self.refs[i].digest not in held]
        )

    def _held_everywhere(self) -> set[str]:
        """Digests every current worker's machine holds."""
        with translated_errors():
            answers = self._client.run(held_digests)
        held = [set(digests) for digests in answers.values()]
        return set.intersection(*held) if held else set()

    def _ship(self, indices: Sequence[int]) -> None:
        """Scatter the bytes of the local tapes at `indices` that are not on the cluster yet."""
        todo = [i for i in indices if self.data[i] is None and not is_url(self._tapes[i])]
        if not todo:
            return
        blobs = [Path(self._tapes[i]).read_bytes() for i in todo]
        with translated_errors():
            # hash=False: the digest is ours; Dask's own hashing of every tape would only add time
            futures = self._client.scatter(blobs, hash=False)
        for i, future in zip(todo, futures, strict=True):
            self.data[i] = future
        self.shipped += len(todo)

    def _submit_day(self, task: Callable[..., T], i: int, args: tuple[Any, ...]) -> Any:
        with translated_errors():
            return self._client.submit(
                on_tape, task, self.refs[i], self.data[i], self._cache, *args, pure=False
            )

    def each_day(self, task: Callable[..., T], indices: Sequence[int], *args: Any) -> Iterator[tuple[int, T]]:
        """See `executors.DayExecutor.each_day`."""
        from distributed import as_completed

        futures = {self._submit_day(task, i, args): i for i in indices}
        with translated_errors():
            completed = as_completed(futures)
        while True:
            with translated_errors():
                future = next(completed, None)
            if future is None:
                return
            i = futures.pop(future)
            if _tape_was_missing(future):
                self._ship([i])
                again = self._submit_day(task, i, args)
                futures[again] = i
                completed.add(again)
                continue
            yield i, _result(future)

    def over_days(
        self, task: Callable[..., T], indices: Sequence[int], jobs: Sequence[tuple[Any, ...]]
    ) -> list[T]:
        """See `executors.DayExecutor.over_days`."""

        def submit(job: tuple[Any, ...]) -> Any:
            refs = [self.refs[i] for i in indices]
            data = [self.data[i] for i in indices]
            with translated_errors():
                return self._client.submit(on_tapes, task, refs, data, self._cache, *job, pure=False)

        futures = [submit(job) for job in jobs]
        results = []
        for job, future in zip(jobs, futures, strict=True):
            if _tape_was_missing(future):
                self._ship(indices)
                future = submit(job)
            results.append(_result(future))
        return results

    def close(self) -> None:
        """Release the scattered tapes, disconnect, and stop a cluster started for the run."""
        with contextlib.suppress(Exception):  # closing after a lost scheduler must not hide the first error
            self._client.close()
            if self._cluster is not None:
                self._cluster.close()

    def __enter__(self) -> DaskDays:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(address: str, tapes: Sequence[Path | str], cache: bool) -> DaskDays:
    """A `DaskDays` on the scheduler at `address`, or on a fresh `LocalCluster` for `local:N`."""
    with translated_errors():
        from distributed import Client

        quiet_dask_logs()  # after the import: importing distributed sets its loggers' levels from its config
        cluster = None
        if address.startswith(LOCAL_PREFIX):
            cluster = local_cluster(local_workers(address))
            client = Client(cluster)
        else:
            client = Client(address)
    return DaskDays(client, tapes, cache, cluster)


def local_cluster(workers: int, local_directory: str | None = None) -> Any:
    """A `LocalCluster` of `workers` single-threaded processes (a day task is pure Python: one core each)."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
        local_directory=local_directory,
    )


def local_workers(address: str) -> int:
    """N of `local:N` (at least 1); ExecutorError for anything else."""
    count = address[len(LOCAL_PREFIX) :]
    if not count.isdigit() or int(count) < 1:
        raise ExecutorError(f"--dask {address}: expected local:N with N >= 1 workers")
    return int(count)


def quiet_dask_logs() -> None:
    """Dask logs every retry of a connection; the CLI prints the one line that matters instead."""
    for name in (
        "distributed",
        "distributed.client",
        "distributed.core",
        "distributed.comm",
        "distributed.scheduler",
        "distributed.nanny",
        "distributed.worker",
        "distributed.http.proxy",
    ):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Cluster failures (unreachable scheduler, lost worker, closed connection) as one-line ExecutorErrors.

    A task's own exception passes through unchanged: it is a bug to see with its traceback.
    """
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError

    try:
        yield
    except (OSError, TimeoutError) as exc:
        raise ExecutorError(f"Dask cluster unreachable or lost: {_one_line(exc)}") from None
    except (KilledWorker, FutureCancelledError) as exc:
        raise ExecutorError(f"Dask worker lost: {_one_line(exc)}") from None


def _tape_was_missing(future: Any) -> bool:
    """Whether a task failed only because its worker had no copy of a tape (waits for the task)."""
    with translated_errors():
        exc = future.exception()  # None when the task succeeded
    return isinstance(exc, TapeMissing)


def _result(future: Any) -> Any:
    """A task's value; its own exception raised as is (a bug, with its traceback); cluster failures translated."""
    from distributed import KilledWorker

    with translated_errors():
        failed = future.status == "error"
        exc = future.exception() if failed else None
    if failed and not isinstance(exc, KilledWorker):
        return future.result()  # raises the task's own exception
    with translated_errors():
        return future.result()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
