"""Sweeps and single runs on a real Dask LocalCluster (two worker processes) equal the local pool's (issue 13)."""

from __future__ import annotations

import datetime
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import dask
import pytest
from conftest import short_script
from distributed import Client, LocalCluster

from backtest import Io, main
from backtest_report import write_sweep
from dask_days import CACHE_FOLDER, DaskDays, local_cluster
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


def test_a_tape_url_that_is_no_tape_is_named_and_nothing_runs(tmp_path):
    """A file:// URL of a file that is not a tape ended in a JSONDecodeError traceback, where the same file
    given as a path was refused in one line."""
    import gzip

    text = tmp_path / "notes.jsonl.gz"
    text.write_bytes(gzip.compress(b"not json at all\n"))
    status, _, err = run_cli([f"file://{text}", "--out", str(tmp_path / "report")])
    assert status == 2 and "Traceback" not in err
    assert f"file://{text}: cannot be read as a tape (JSONDecodeError: " in err
