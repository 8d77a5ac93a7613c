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

import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from backtest_run import use_batch_gc
from executors import ExecutorError
from tape_cache import content_digest

T = TypeVar("T")
log = logging.getLogger(__name__)
# While a run waits on the cluster it looks every CHECK_EVERY_S whether the scheduler still answers (within
# SCHEDULER_ANSWER_S) and still has workers (none for NO_WORKERS_S ends the run): a run whose workers had all
# gone waited in silence for ever.
CHECK_EVERY_S = 10.0
SCHEDULER_ANSWER_S = 30.0
NO_WORKERS_S = 60.0
# A tape scattered to a worker that dies is lost with it, and the tasks that needed it are cancelled: it is
# shipped again (to the workers left) and they are sent again, this many times at most per tape.
MAX_SHIPS_PER_TAPE = 4
ADDRESS_VARIABLE = "DASK_SCHEDULER_ADDRESS"
LOCAL_PREFIX = "local:"
CACHE_FOLDER = "iwm-alerter-cache"
URL_MARK = "://"
FILE_SCHEME = "file://"
# Group or others may write: anyone who can write a cache folder can plant a pickle that tape_cache loads.
SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True, slots=True)
class TapeRef:
    """What a worker needs to find or rebuild a tape: its file name, an identity digest, and a URL or not."""

    name: str
    digest: str
    url: str | None = None


def is_url(tape: Path | str) -> bool:
    """Whether a tape argument is an fsspec URL (`s3://...`) rather than a local path."""
    return isinstance(tape, str) and URL_MARK in tape


def fsspec_url(url: str) -> str:
    """`url` as fsspec must get it: a `file://` URL percent-decoded (fsspec takes its path literally, so
    `Path.as_uri()`'s `a%20b` named no file); a raw one (`file:///tmp/a b`) decodes to itself."""
    if url.startswith(FILE_SCHEME):
        return urllib.parse.unquote(url)
    return url


def scheduler_address(flag: str | None, environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The cluster to use: `--dask` wins over DASK_SCHEDULER_ADDRESS; None means the local pool."""
    return flag or environ.get(ADDRESS_VARIABLE) or None


@functools.cache
def code_fingerprint() -> str:
    """A hash of this checkout's project modules (every `*.py` beside this file): what every worker must
    share with the client, or its trades differ (run on each worker by `Client.run`)."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(module.name.encode() + b"\0" + module.read_bytes())
    return digest.hexdigest()


class TapeMissing(Exception):
    """A task got no bytes for a tape its worker does not hold (a worker that joined late, a cleared cache)."""


def worker_cache_root(local_directory: str | None = None) -> Path:
    """This worker machine's cache: beside the workers' scratch folders, so it outlives one cluster.

    Only a private folder is used (`private_cache_root`): the cache holds pickles that tape_cache loads.
    """
    if local_directory is None:
        from distributed import get_worker

        local_directory = get_worker().local_directory
    return private_cache_root(str(Path(local_directory).parent / CACHE_FOLDER))


@functools.cache
def private_cache_root(wanted: str) -> Path:
    """`wanted`, made with mode 0o700 if absent, when it and its parent are private to this user; else a
    fresh private temporary folder for this process, said once in the log.

    A folder another user owns or may write (Dask's scratch space in a shared /tmp) lets them plant a
    pickle the worker would load: code run as this user.
    """
    root = Path(wanted)
    problem = not_private(root.parent)  # one who may write the parent may swap the folder in it
    if problem is None:
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o700)
        problem = not_private(root)
    if problem is None:
        return root
    fallback = Path(tempfile.mkdtemp(prefix="iwm-alerter-cache-"))  # 0o700, a name no one could guess
    log.warning("tape cache %s not used (%s); this worker caches in %s instead", root, problem, fallback)
    return fallback


def not_private(folder: Path) -> str | None:
    """Why `folder` is not private to this user (a symlink, another owner, writable by others), or None."""
    try:
        info = folder.lstat()  # lstat: a planted symlink must not pass as the folder it points to
    except OSError as exc:
        return f"{folder}: {one_line(exc)}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{folder} is not a folder"
    if info.st_uid != os.getuid():
        return f"{folder} is owned by uid {info.st_uid}"
    if info.st_mode & SHARED_WRITE:
        return f"{folder} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def held_digests(dask_worker: Any) -> list[str]:
    """The digests of the tapes this worker's machine holds (run on every worker by `Client.run`)."""
    folder = worker_cache_root(dask_worker.local_directory) / "tapes"
    try:
        return sorted(entry.name for entry in folder.iterdir() if any(entry.iterdir()))
    except OSError:
        return []


def worker_tape(ref: TapeRef, data: bytes | None) -> Path:
    """The tape as a file on this worker, written once per digest (later tasks find it there).

    A local tape's copy is checked against the digest it is filed under: a copy damaged on the worker's
    disk had given another sweep.csv, exit 0, without a word. A URL's digest names the file, not its bytes.
    """
    path = worker_cache_root() / "tapes" / ref.digest / ref.name
    if path.is_file() and (ref.url is not None or content_digest(path)[: len(ref.digest)] == ref.digest):
        return path
    if data is None and ref.url is None:
        raise TapeMissing(ref.digest)
    if data is None:
        import fsspec

        with fsspec.open(fsspec_url(ref.url), "rb") as handle:
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

        url = fsspec_url(str(tape))
        fs, inner = fsspec.core.url_to_fs(url)
        identity = hashlib.sha256(f"{url}\0{fs.ukey(inner)}".encode()).hexdigest()[:32]
        return TapeRef(url.rsplit("/", 1)[-1], identity, url)
    assert data is not None
    return TapeRef(Path(tape).name, hashlib.sha256(data).hexdigest()[:32])


class DaskDays:
    """A `DayExecutor` on a Dask cluster: tapes shipped once, tasks followed as they complete.

    A tape every worker's machine already holds (by content digest, from an earlier run) is not shipped
    again; a task that lands on a worker without it fails with `TapeMissing` and is sent again with
    the bytes.
    """

    remote = True

    def __init__(
        self,
        client: Any,
        tapes: Sequence[Path | str],
        cache: bool,
        cluster: Any = None,
        *,
        scratch: Path | None = None,
        code: str | None = None,
        check_every_s: float = CHECK_EVERY_S,
        no_workers_s: float = NO_WORKERS_S,
    ) -> None:
        """`code`: the fingerprint the workers' project code must have (this checkout's by default);
        `scratch`: the started cluster's private folder, removed at `close`."""
        self._client, self._cluster, self._cache, self._scratch = client, cluster, cache, scratch
        self._check_every_s, self._no_workers_s = check_every_s, no_workers_s
        self._no_workers_since: float | None = None
        self._same_code_everywhere(code or code_fingerprint())
        self._tapes = list(tapes)
        # One tape in memory at a time: a year of tapes is gigabytes.
        self.refs = [tape_ref(t, None if is_url(t) else Path(t).read_bytes()) for t in self._tapes]
        self.data: list[Any] = [None] * len(self._tapes)
        self.shipped = 0
        self._ships = [0] * len(self._tapes)  # times each tape was scattered
        held = self._held_everywhere()
        self._ship(
            [i for i, t in enumerate(self._tapes) if not is_url(t) and self.refs[i].digest not in held]
        )

    def _same_code_everywhere(self, code: str) -> None:
        """Workers running another version of the project give other trades without a word: refused."""
        try:
            with translated_errors():
                answers = self._client.run(code_fingerprint)
        except ExecutorError:
            raise
        except Exception as exc:  # a worker without the project on its path cannot import this module
            raise ExecutorError(
                f"Dask workers cannot run this project's code ({one_line(exc)}): start them with the checkout"
                " on PYTHONPATH"
            ) from None
        others = sorted(worker for worker, theirs in answers.items() if theirs != code)
        if others:
            raise ExecutorError(
                f"{len(others)} Dask worker(s) run other code than this checkout ({', '.join(others[:3])}):"
                " start the workers from the same version of the project"
            )

    def _wait_for_some(self, pending: Sequence[Any]) -> list[Any]:
        """The futures of `pending` that are done, in their order, once one is; between waits the cluster
        is checked (`_check_cluster`), so a cluster that has gone ends the run instead of hanging it."""
        from distributed import wait

        while True:
            with translated_errors():
                try:
                    done, _ = wait(pending, timeout=self._check_every_s, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                except concurrent.futures.CancelledError:
                    # A worker died with a scattered tape: its tasks are cancelled (see `_ship_lost`).
                    done = {future for future in pending if future.cancelled()}
            if done:
                return [future for future in pending if future in done]
            self._check_cluster()

    def _check_cluster(self) -> None:
        """ExecutorError when the scheduler does not answer or has had no worker for `no_workers_s`."""
        try:
            workers = self._client.nthreads(callback_timeout=SCHEDULER_ANSWER_S)
        except (OSError, TimeoutError) as exc:
            raise ExecutorError(
                f"Dask scheduler not answering within {SCHEDULER_ANSWER_S:.0f} s: {one_line(exc)}"
            ) from None
        if workers:
            self._no_workers_since = None
            return
        now = time.monotonic()
        since = self._no_workers_since = self._no_workers_since or now
        if now - since >= self._no_workers_s:
            raise ExecutorError(
                f"no Dask worker left for {self._no_workers_s:.0f} s: start workers (dask worker ADDRESS)"
                " and run again"
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
            self._ships[i] += 1
        self.shipped += len(todo)

    def _ship_lost(self, indices: Sequence[int]) -> None:
        """A task that needed the tapes at `indices` was cancelled: a worker died with a scattered copy.
        The copies seen lost (all of them when none is yet: the news may lag) are shipped again to the
        workers left; ExecutorError once a tape has gone MAX_SHIPS_PER_TAPE times (workers dying one after
        another), so the run cannot loop for ever."""
        lost = [i for i in indices if self.data[i] is not None and self.data[i].status != "finished"]
        again = lost or list(indices)
        for i in again:
            if self._ships[i] >= MAX_SHIPS_PER_TAPE:
                raise ExecutorError(
                    f"Dask worker lost: {self.refs[i].name} was lost with its worker {self._ships[i]} times"
                )
            if is_url(self._tapes[i]):
                self._ships[i] += 1  # a URL is not scattered: its task is only sent again, counted here
            self.data[i] = None
        log.warning("dask tape(s) lost with a worker: shipping %d again", len(again))
        self._ship(again)

    def _submit_day(self, task: Callable[..., T], i: int, args: tuple[Any, ...]) -> Any:
        with translated_errors():
            return self._client.submit(
                on_tape, task, self.refs[i], self.data[i], self._cache, *args, pure=False
            )

    def each_day(self, task: Callable[..., T], indices: Sequence[int], *args: Any) -> Iterator[tuple[int, T]]:
        """See `executors.DayExecutor.each_day`."""
        futures = {self._submit_day(task, i, args): i for i in indices}
        while futures:
            for future in self._wait_for_some(list(futures)):
                i = futures.pop(future)
                if future.cancelled():
                    self._ship_lost([i])
                elif _tape_was_missing(future):
                    self._ship([i])
                else:
                    yield i, _result(future)
                    continue
                futures[self._submit_day(task, i, args)] = i

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
        for job, first in zip(jobs, futures, strict=True):
            future = first
            self._wait_for_some([future])
            while future.cancelled() or _tape_was_missing(future):
                if future.cancelled():
                    self._ship_lost(indices)  # raises once a tape was lost too often: no endless loop
                else:
                    self._ship(indices)
                future = submit(job)
                self._wait_for_some([future])
            results.append(_result(future))
        return results

    def close(self) -> None:
        """Release the scattered tapes, disconnect, and stop a cluster started for the run."""
        close_all(self._client, self._cluster, self._scratch)

    def __enter__(self) -> DaskDays:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def connect(address: str, tapes: Sequence[Path | str], cache: bool) -> DaskDays:
    """A `DaskDays` on the scheduler at `address`, or on a fresh `LocalCluster` for `local:N`."""
    client = cluster = scratch = None
    try:
        with translated_errors():
            from distributed import Client

            # After the import: importing distributed sets its loggers' levels from its config.
            quiet_dask_logs()
            if address.startswith(LOCAL_PREFIX):
                workers = local_workers(address)
                # A private folder of its own: a run shares no cache with other runs or other users
                scratch = private_scratch()
                cluster = local_cluster(workers, str(scratch))
                client = Client(cluster)
            else:
                client = Client(scheduler(address), security=security_for(address))
        return DaskDays(client, tapes, cache, cluster, scratch=scratch)
    except BaseException:
        close_all(client, cluster, scratch)  # a refused cluster must not outlive the run
        raise


def private_scratch() -> Path:
    """A fresh folder only this user can enter (mode 0o700) for a local cluster's workers."""
    return Path(tempfile.mkdtemp(prefix="iwm-dask-"))


def close_all(client: Any, cluster: Any, scratch: Path | None) -> None:
    """Disconnect, stop a cluster started for the run, and remove its scratch folder (each may be None)."""
    # Closing after a lost scheduler must not hide the first error.
    for thing in (client, cluster):
        if thing is not None:
            with contextlib.suppress(Exception):
                thing.close()
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def scheduler(address: str) -> str:
    """`address` when Dask can dial it; ExecutorError for one it cannot (no port, an unknown scheme).

    Checked here, before a Client is made: a Client built on such an address raises, and the next one
    made in the same process had hung."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme)
        if scheme in ("tcp", "tls"):
            parse_host_port(location)
    except (ValueError, TypeError) as exc:
        raise ExecutorError(
            f"--dask {address}: not a scheduler address Dask can dial ({one_line(exc)})"
        ) from None
    return address


def security_for(address: str) -> Any:
    """Dask's TLS settings from its own configuration (`DASK_DISTRIBUTED__COMM__TLS__CA_FILE`,
    `..._TLS__CLIENT__CERT`, `..._TLS__CLIENT__KEY`, or a dask config file); ExecutorError for a tls://
    address without them (a Client then failed with a TypeError traceback)."""
    from distributed.security import Security

    security = Security()
    if address.startswith("tls://") and security.get_connection_args("client")["ssl_context"] is None:
        raise ExecutorError(
            f"--dask {address}: a tls:// scheduler needs Dask's TLS files; set "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY (or the same keys in a Dask config file)"
        )
    return security


def local_cluster(workers: int, local_directory: str) -> Any:
    """A `LocalCluster` of `workers` single-threaded processes (a day task is pure Python: one core each).

    `local_directory` is required: Dask's default is the shared temporary folder, where the workers' tape
    cache would be shared with every run and user of the machine (`private_scratch` gives a private one).
    """
    import dask
    from distributed import LocalCluster

    # The scheduler takes no local_directory: without this its scratch folder went to the shared one
    with dask.config.set({"temporary-directory": local_directory}):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",  # None is Dask's default :8787, which warns when taken
            # The worker processes' own log level: at ERROR, a worker's last heartbeat to the scheduler
            # closing after a good run printed a 30-line traceback (1 run in 7). Task errors reach the client.
            silence_logs=logging.CRITICAL,
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

    try:
        yield
    except (OSError, TimeoutError) as exc:
        raise ExecutorError(f"Dask cluster unreachable or lost: {one_line(exc)}") from None
    # CancelledError covers Dask's FutureCancelledError and `wait`'s FuturesCancelledError (plural, not a
    # subclass of the other): a worker lost with a scattered tape cancels the tasks that needed it.
    except (KilledWorker, concurrent.futures.CancelledError) as exc:
        raise ExecutorError(f"Dask worker lost: {one_line(exc)}") from None


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


def one_line(exc: BaseException) -> str:
    """An exception's text on one line, at most 200 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
