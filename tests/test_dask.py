"""Sweeps and single runs on a real Dask LocalCluster (two worker processes) equal the local pool's (issue 13)."""

from __future__ import annotations

import datetime
import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask
import pytest
from conftest import ROOT, short_script
from distributed import Client, LocalCluster

from backtest import Io, main
from backtest_report import write_sweep
from dask_days import CACHE_FOLDER, DaskDays, local_cluster, private_cache_root
from market_calendar import ny_ms
from sim.market import SyntheticMarket, write_tape
from sweep import parse_sweep, run_sweep, sweep_cells

GRID = ["--sweep", "STOP_LOSS_PERCENT=10,20", "--sweep", "VWAP_EXIT_BLOCKS=1,2"]
DAYS = ((datetime.date(2025, 10, 6), 11), (datetime.date(2025, 10, 7), 12), (datetime.date(2025, 10, 8), 13))


@pytest.fixture(scope="module")
def tapes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three short seeded days (09:28 to 10:25)."""
    folder = tmp_path_factory.mktemp("tapes")
    built = []
    for day, seed in DAYS:
        path = folder / f"{day.isoformat()}.jsonl.gz"
        built.append(
            write_tape(
                SyntheticMarket(short_script(day, seed)), path, end_ms=ny_ms(day, datetime.time(10, 25))
            )
        )
    return built


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Two single-threaded worker processes whose scratch (and so the tape cache) is a fresh folder."""
    scratch = tmp_path_factory.mktemp("scratch")
    with local_cluster(2, local_directory=str(scratch)) as local:
        yield local


def worker_cache(cluster: LocalCluster) -> Path:
    with Client(cluster) as client:
        [directory] = {
            Path(d).parent for d in client.run(lambda dask_worker: dask_worker.local_directory).values()
        }
    return directory / CACHE_FOLDER


def run_cli(args: list[str], environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(args, Io(out, err, environ=environ or {}, env_file=None))
    return status, out.getvalue(), err.getvalue()


def test_a_sweep_on_the_cluster_writes_the_pools_sweep_csv_byte_for_byte(tapes, cluster, tmp_path):
    folder = str(tapes[0].parent)
    pool_status, pool_out, _ = run_cli(
        [folder, *GRID, "--out", str(tmp_path / "pool"), "--no-cache", "--workers", "2"]
    )
    dask_args = [folder, *GRID, "--out", str(tmp_path / "dask"), "--dask", cluster.scheduler_address]
    dask_status, dask_out, err = run_cli(dask_args, {"DATA_DIR": str(tmp_path / "data")})
    assert pool_status == dask_status == 0, err
    pool_csv = (tmp_path / "pool" / "sweep.csv").read_bytes()
    assert pool_csv == (tmp_path / "dask" / "sweep.csv").read_bytes()
    assert pool_csv.count(b"\n") == 5 and b"STOP_LOSS_PERCENT" in pool_csv
    assert pool_out.replace(str(tmp_path / "pool"), "R") == dask_out.replace(str(tmp_path / "dask"), "R")
    assert not (tmp_path / "data" / "decoded").exists(), "the client cached nothing: the workers did"
    cached = worker_cache(cluster)
    assert sorted(p.name for p in (cached / "tapes").glob("*/*.jsonl.gz")) == sorted(t.name for t in tapes)
    assert any((cached / "decoded").glob("2025-10-06-*.decoded")), "decoded once, on the worker machine"


def test_workers_run_shipped_tapes_whose_client_files_are_gone(tapes, cluster, tmp_path):
    cells = sweep_cells(parse_sweep(GRID[1::2]), {}, environ={}, env_file=None)
    pool = run_sweep(tapes, cells, workers=2)
    moved = [shutil.copy(t, tmp_path / t.name) for t in tapes]
    with Client(cluster) as client:
        # no cache: a worker decodes every tape it gets, so only the shipped bytes can serve the tasks
        executor = DaskDays(client, [Path(m) for m in moved], cache=False)
        for path in moved:
            Path(path).unlink()  # scattered already; a worker opening the client's path would fail
        shipped = run_sweep(moved, cells, executor=executor)
        assert all(ref.url is None and len(ref.digest) == 32 for ref in executor.refs)
    assert [(r.params, r.trades, r.stats) for r in shipped] == [(r.params, r.trades, r.stats) for r in pool]
    write_sweep(tmp_path / "a", pool, len(tapes), {})
    write_sweep(tmp_path / "b", shipped, len(tapes), {})
    assert (tmp_path / "a" / "sweep.csv").read_bytes() == (tmp_path / "b" / "sweep.csv").read_bytes()


def test_the_environment_variable_picks_the_cluster_and_the_flag_wins(tapes, cluster, tmp_path):
    folder = str(tapes[0].parent)
    base = [folder, "--no-charts", "--no-cache"]
    assert run_cli([*base, "--out", str(tmp_path / "pool")])[0] == 0
    environ = {"DASK_SCHEDULER_ADDRESS": cluster.scheduler_address}
    status, _, err = run_cli([*base, "--out", str(tmp_path / "env")], environ)
    assert status == 0, err
    for name in ("trades.csv", "summary.json"):
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "env" / name).read_bytes(), name
    unreachable = {"DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:9"}
    flagged = [*base, "--out", str(tmp_path / "flag"), "--dask", cluster.scheduler_address]
    assert run_cli(flagged, unreachable)[0] == 0, "--dask wins over the variable"


def test_an_unreachable_scheduler_is_one_clear_line_and_exit_1(tapes, tmp_path):
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        status, _, err = run_cli([str(tapes[0]), "--out", str(tmp_path), "--dask", "tcp://127.0.0.1:9"])
    assert status == 1
    assert err.startswith("Error: Dask cluster unreachable or lost:") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_tapes_the_workers_hold_are_not_shipped_again_and_a_lost_copy_is_resent(tapes, cluster, tmp_path):
    cells = sweep_cells(parse_sweep(GRID[1::2]), {}, environ={}, env_file=None)
    pool = [(r.params, r.trades, r.stats) for r in run_sweep(tapes, cells, workers=2)]
    with Client(cluster) as client:
        run_sweep(tapes, cells, executor=DaskDays(client, tapes, cache=False))  # the workers hold them now
        again = DaskDays(client, tapes, cache=False)
        assert again.shipped == 0
        assert [(r.params, r.trades, r.stats) for r in run_sweep(tapes, cells, executor=again)] == pool
        lost = DaskDays(client, tapes, cache=False)
        shutil.rmtree(worker_cache(cluster) / "tapes")  # as a worker joining later would lack them
        assert [(r.params, r.trades, r.stats) for r in run_sweep(tapes, cells, executor=lost)] == pool
        assert lost.shipped == len(tapes)


def test_a_run_whose_workers_are_all_gone_ends_with_one_line_instead_of_waiting_for_ever(tapes, tmp_path):
    """A sweep whose workers had all died printed nothing more and never exited."""
    from executors import ExecutorError

    cells = sweep_cells(parse_sweep(GRID[1::2]), {}, environ={}, env_file=None)
    urls = [f"file://{tape}" for tape in tapes]  # nothing to scatter: the tasks wait on the workers alone
    with local_cluster(0, local_directory=str(tmp_path)) as empty, Client(empty) as client:
        executor = DaskDays(client, urls, cache=False, check_every_s=0.2, no_workers_s=1.0)
        with pytest.raises(ExecutorError, match=r"no Dask worker left for 1 s: start workers"):
            run_sweep(urls, cells, executor=executor)


def test_a_workers_damaged_copy_of_a_tape_is_replaced_not_used(tapes, cluster, tmp_path):
    """A copy cut short on the worker's disk gave another sweep.csv, exit 0, without a word."""
    cells = sweep_cells(parse_sweep(GRID[1::2]), {}, environ={}, env_file=None)
    pool = [(r.params, r.trades, r.stats) for r in run_sweep(tapes, cells, workers=2)]
    with Client(cluster) as client:
        run_sweep(tapes, cells, executor=DaskDays(client, tapes, cache=False))  # the workers hold them now
        copies = sorted((worker_cache(cluster) / "tapes").glob("*/*.jsonl.gz"))
        assert len(copies) == len(tapes)
        for copy in copies:
            copy.write_bytes(copy.read_bytes()[: copy.stat().st_size // 2])
        again = DaskDays(client, tapes, cache=False)
        assert [(r.params, r.trades, r.stats) for r in run_sweep(tapes, cells, executor=again)] == pool
        assert again.shipped == len(tapes), "each damaged copy was sent again"


def test_workers_running_other_code_are_refused(tapes, cluster):
    """Workers started from another checkout gave other trades, exit 0."""
    from executors import ExecutorError

    with Client(cluster) as client, pytest.raises(ExecutorError, match="run other code than this checkout"):
        DaskDays(client, tapes, cache=False, code="the fingerprint of another version")


@pytest.mark.parametrize("address", ["garbage", "foo:bar", "http://127.0.0.1:9"])
def test_an_address_dask_cannot_dial_is_one_line_not_a_traceback(address, tapes, tmp_path):
    status, _, err = run_cli([str(tapes[0]), "--out", str(tmp_path), "--dask", address])
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith(f"Error: --dask {address}: not a scheduler address Dask can dial (")


def test_a_tls_address_without_dasks_tls_files_is_one_line_naming_them(tapes, tmp_path):
    """A tls:// scheduler ended in a TypeError traceback ("TLS expects a `ssl_context` argument")."""
    status, _, err = run_cli([str(tapes[0]), "--out", str(tmp_path), "--dask", "tls://127.0.0.1:9"])
    assert status == 1 and err.count("\n") == 1, err
    assert "DASK_DISTRIBUTED__COMM__TLS__CA_FILE" in err and "Traceback" not in err


def test_a_tape_url_that_is_no_tape_is_named_and_nothing_runs(tmp_path):
    """A file:// URL of a file that is not a tape ended in a JSONDecodeError traceback, where the same file
    given as a path was refused in one line."""
    import gzip

    text = tmp_path / "notes.jsonl.gz"
    text.write_bytes(gzip.compress(b"not json at all\n"))
    status, _, err = run_cli([f"file://{text}", "--out", str(tmp_path / "report")])
    assert status == 2 and "Traceback" not in err
    assert f"file://{text}: cannot be read as a tape (JSONDecodeError: " in err


def sweep_rows(tapes: list[Path] | list[str], executor: DaskDays | None = None) -> list[tuple[object, ...]]:
    """A small sweep's results, on `executor` or on the local pool."""
    cells = sweep_cells(parse_sweep(GRID[1::2]), {}, environ={}, env_file=None)
    results = run_sweep(tapes, cells, executor=executor) if executor else run_sweep(tapes, cells, workers=2)
    return [(r.params, r.trades, r.stats) for r in results]


def test_the_worker_cache_is_a_private_folder(tapes, cluster):
    """The cache holds pickles the workers load: a folder others may write lets them run code as us."""
    with Client(cluster) as client:
        sweep_rows(tapes, DaskDays(client, tapes, cache=True))
    assert stat.S_IMODE(worker_cache(cluster).stat().st_mode) == 0o700


def test_a_cache_folder_others_may_write_is_not_used(tapes, tmp_path):
    """Dask's scratch space in the shared temp folder held a cache every user of the machine could fill."""
    scratch = tmp_path / "scratch"
    shared = scratch / "dask-scratch-space" / CACHE_FOLDER
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # as another user's run, or an attacker, could have left it
    with local_cluster(1, local_directory=str(scratch)) as local, Client(local) as client:
        assert sweep_rows(tapes, DaskDays(client, tapes, cache=True)) == sweep_rows(tapes)
    assert list(shared.iterdir()) == [], "nothing written to, nor read from, the shared folder"


@pytest.mark.parametrize("flaw", ["writable parent", "writable root", "symlink", "other owner"])
def test_a_cache_root_not_private_to_this_user_is_replaced_by_a_fresh_private_one(flaw, tmp_path):
    parent = tmp_path / "scratch"
    parent.mkdir(mode=0o700)
    root = parent / CACHE_FOLDER
    if flaw == "writable parent":
        parent.chmod(0o777)
    elif flaw == "writable root":
        root.mkdir(mode=0o700)
        root.chmod(0o770)
    elif flaw == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        root.symlink_to(tmp_path / "elsewhere")
    else:
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        root.mkdir(mode=0o700)
        os.chown(root, os.getuid() + 4242, -1)
    used = private_cache_root(str(root))
    assert used != root
    assert used.stat().st_uid == os.getuid() and stat.S_IMODE(used.stat().st_mode) == 0o700
    shutil.rmtree(used)


def test_a_private_cache_root_is_made_with_mode_700(tmp_path):
    parent = tmp_path / "scratch"
    parent.mkdir(mode=0o755)
    root = private_cache_root(str(parent / CACHE_FOLDER))
    assert root == parent / CACHE_FOLDER and stat.S_IMODE(root.stat().st_mode) == 0o700


def test_a_local_cluster_run_keeps_its_scratch_private_and_removes_it(tapes, tmp_path):
    """`--dask local:N` put its workers' cache in the shared temp folder, where it outlived the run."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    command = [sys.executable, "backtest.py", str(tapes[0]), "--no-charts", "--out", str(tmp_path / "r")]
    environ = {**os.environ, "TMPDIR": str(temp), "DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(
        [*command, "--dask", "local:1"], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert list(temp.iterdir()) == [], "the run's private scratch folder is gone, nothing else was made"


def test_a_worker_killed_with_a_scattered_tape_costs_a_reship_not_the_run(tapes, tmp_path):
    """A worker lost with a scattered tape cancelled its tasks: first a 43-line traceback, then one line and
    exit 1; the tape is now shipped again to the worker left and the sweep ends as the pool's."""
    pool = sweep_rows(tapes)
    with local_cluster(2, local_directory=str(tmp_path)) as local, Client(local) as client:
        executor = DaskDays(client, tapes, cache=False)  # the tapes are scattered over both workers
        holder = next(iter(client.who_has(executor.data[0]).values()))[0]
        pid = client.run(os.getpid, workers=[holder])[holder]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while holder in client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sweep_rows(tapes, executor) == pool
    assert executor.shipped > len(tapes), "the lost copies were shipped again"


def test_percent_encoded_and_raw_file_urls_name_the_same_tapes(tapes, cluster, tmp_path):
    """`Path.as_uri()` writes `file:///tmp/a%20b/...`; fsspec took the `%20` literally: no such tape."""
    folder = tmp_path / "a b%"
    folder.mkdir()
    copies = [Path(shutil.copy(t, folder / t.name)) for t in tapes]
    encoded = [copy.as_uri() for copy in copies]
    raw = [f"file://{copy}" for copy in copies]
    assert "%20" in encoded[0] and " " in raw[0]
    pool = sweep_rows(tapes)
    with Client(cluster) as client:
        for urls in (encoded, raw):
            executor = DaskDays(client, urls, cache=False)
            assert [ref.name for ref in executor.refs] == [t.name for t in tapes]
            assert sweep_rows(urls, executor) == pool


def test_the_command_line_takes_a_percent_encoded_file_url(tapes, cluster, tmp_path):
    """The workers took `Path.as_uri()`'s form, but the command line's own checks (is it there, which day)
    still read `%20` literally and refused it as no such tape."""
    folder = tmp_path / "a b"
    folder.mkdir()
    url = Path(shutil.copy(tapes[0], folder / tapes[0].name)).as_uri()
    args = [url, "--out", str(tmp_path / "report"), "--dask", cluster.scheduler_address]
    status, out, err = run_cli(args, {"DATA_DIR": str(tmp_path / "data")})
    assert status == 0, err
    assert "%20" in url and tapes[0].name[:10] in out


def test_the_dask_bench_ships_every_tape_in_each_timed_run(tmp_path):
    """The bench's Dask figures claimed to include shipping the tapes, but the workers' cache (shared by
    every cluster) held them already: nothing was shipped in the timed run. Figures only, no time asserted."""
    bench = [sys.executable, "bench/dask_sweep.py", "--days", "1", "--repeat", "1", "--data", str(tmp_path)]
    done = subprocess.run(bench, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    shipped = [line for line in done.stdout.splitlines() if line.startswith("dask, ")]
    assert len(shipped) == 2 and all(", 1 tape(s) shipped" in line for line in shipped), done.stdout
