"""Backtests: many session tapes through the live decision path, then statistics, a report and charts.

This module is the CLI and the collection of tapes; single runs are in `backtest_run`, sweeps in `sweep`,
statistics and reports in `backtest_report`.

    python3 backtest.py TAPES...                  recorded (or reconstructed) tapes, files or folders
    python3 backtest.py --synthetic N [--seed S]  N seeded synthetic sessions
    python3 backtest.py --fetch FROM [--to TO]    rebuild past sessions from Polygon REST, then test them

Each day gets a fresh `Engine` behind the same `Pipeline` and journal code as the live daemon and
`--replay`, fed by `day_runner` from the tape decoded once by the live `FeedDecoder` (`tape_cache`);
one in-memory journal spans the run, so the lifetime P&L accumulates from day to day. Fills are the
live alerts' prices: entry at the ask, exit at the bid.

`--sweep NAME=V1,V2` (repeatable) runs the grid of rule variants over every day in a process pool,
one task per day with all cells in one pass. A cell's trades are those of a single run with its settings.

`--fetch` reconstructs what the daemon would have recorded (see `history.py`); such tapes say
`"reconstructed": true` in their meta line and every report built on them says so.
"""

from __future__ import annotations

import requires_python  # noqa: F401 - first: one clear line, not a traceback, on a Python before 3.11

# isort: split
import argparse
import datetime
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from backtest_report import (
    FILLS_NOTE,
    Stats,
    compute_stats,
    print_report,
    print_sweep,
    split_stats,
    sweep_notes,
    write_report,
    write_sweep,
)
from backtest_run import (
    BacktestResult,
    DayResult,
    init_pool_worker,
    run_backtest,
    run_day,
    run_part,
    run_single,
    use_batch_gc,
)
from cli_exit import run_quietly
from config import ConfigError, Settings, data_dir_problem, read_dotenv, unknown_keys
from dask_days import fsspec_url, is_url, one_line, scheduler_address
from day_runner import SweepDay
from executors import DayExecutor, ExecutorError, PoolDays, decode_in_pool
from history import fetch_history, session_days
from holdout import Holdout, Split, parse_holdout, print_held_out, print_side_by_side, split_dates
from market_calendar import MarketCalendar, ny_date
from progress import Progress
from report_charts import day_chart
from sweep import Cell, CellResult, parse_assignments, parse_sweep, resolve_settings, run_sweep, sweep_cells
from tape import TapeReader

# Names other modules, tests and benches import from here, kept since the module was split by role.
__all__ = [
    "BacktestResult",
    "Cell",
    "CellResult",
    "DayResult",
    "Io",
    "Stats",
    "compute_stats",
    "day_chart",
    "decode_in_pool",
    "fetch_history",
    "main",
    "resolve_settings",
    "run_backtest",
    "run_day",
    "run_sweep",
    "sweep_cells",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SYNTHETIC_FIRST_DAY = datetime.date(2025, 1, 2)
# The most synthetic days one run builds: 20 years of sessions (a typo of 100000 sat silent for minutes).
MAX_SYNTHETIC_DAYS = 5040


# A tape argument: a local path, or an fsspec URL (`s3://...`) that Dask workers open.
Tape = Path | str


def tape_arg(text: str) -> Tape:
    """argparse type of a tape: a URL stays text (Path would fold its `//`), anything else is a path."""
    return text if is_url(text) else Path(text)


def tape_date(path: Tape) -> datetime.date | None:
    """The New York date of a tape's first line (None for an empty tape)."""
    if is_url(path):
        return _url_tape_date(str(path))
    first = next(iter(TapeReader(Path(path))), None)
    return None if first is None else ny_date(first.t)


def _url_tape_date(url: str) -> datetime.date | None:
    """The date of a URL tape from its first line, read through fsspec (only that line is fetched)."""
    import fsspec

    with fsspec.open(fsspec_url(url), "rb", compression="infer") as handle:
        line = handle.readline()
    return ny_date(int(json.loads(line)["t"])) if line.strip() else None


def _no_first_line(tape: Tape) -> str:
    """Why a tape has no first line: it is empty, or nothing in it is a tape line."""
    if is_url(tape):
        return "empty tape"
    reader = TapeReader(Path(tape))
    next(iter(reader), None)
    if reader.bad_lines:
        return f"not a tape: no valid tape line in it ({reader.bad_lines} unreadable)"
    return "empty tape"


def _exists(tape: Tape) -> bool:
    if is_url(tape):
        import fsspec

        fs, inner = fsspec.core.url_to_fs(fsspec_url(str(tape)))
        return bool(fs.isfile(inner))
    return Path(tape).is_file()


NO_SUCH_TAPE = datetime.date.max  # `check_distinct_days`'s mark of a tape that is not there


def check_distinct_days(tapes: Sequence[Tape]) -> list[str]:
    """Problems with a tape list: unreadable files and two tapes of one day (trade ids would collide)."""
    seen: dict[datetime.date, Tape] = {}
    problems = []
    for path in tapes:
        try:
            day = tape_date(path) if _exists(path) else NO_SUCH_TAPE
        except (ImportError, OSError, ValueError, KeyError, TypeError) as exc:
            # A URL's filesystem library missing (s3fs), or a file there that is not a tape.
            problems.append(f"{path}: cannot be read as a tape ({type(exc).__name__}: {one_line(exc)})")
            continue
        if day is NO_SUCH_TAPE:
            problems.append(
                f"{path}: no such tape or folder (the daemon records tapes under DATA_DIR/tapes as it runs;"
                " --synthetic N needs none)"
            )
        elif day is None:
            problems.append(f"{path}: {_no_first_line(path)}")
        elif day in seen:
            problems.append(f"{path} and {seen[day]} are both {day}; one run takes one tape per day")
        else:
            seen[day] = path
    return problems


def synthetic_dates(
    count: int, calendar: MarketCalendar, first: datetime.date = SYNTHETIC_FIRST_DAY
) -> list[datetime.date]:
    """`count` consecutive regular (not early-close) sessions from `first`: the synthetic day is 6.5 h."""
    days: list[datetime.date] = []
    day = first - datetime.timedelta(days=1)
    while len(days) < count:
        session = calendar.next_session(day)
        day = session.date
        if not session.early_close:
            days.append(day)
    return days


def day_seed(seed: int, day: datetime.date) -> int:
    """A per-day seed: the synthetic market seeds its noise with it, so days must not share one."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{day.isoformat()}".encode()).digest()[:4], "big")


def synthetic_folder(data_dir: Path, seed: int) -> Path:
    """Where the synthetic days of `seed` are kept: one folder per version of the market model."""
    from sim.market import MODEL_VERSION  # only synthetic runs need the model

    return data_dir / "synthetic" / f"v{MODEL_VERSION}" / f"seed-{seed}"


def build_synthetic_tape(day: datetime.date, seed: int, folder: Path) -> Path:
    """The tape of one synthetic day (`random_script`), built once: an existing tape is reused.

    It streams the options cluster's quotes of the contracts nearest the delta band, as a daemon with
    the options stream records them, so marks and exits move within a second as they do live.
    """
    from sim import market as model  # only synthetic runs need the model

    path = Path(folder) / f"{day.isoformat()}.jsonl.gz"
    if path.is_file():
        return path
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    market = model.SyntheticMarket(model.random_script(day, day_seed(seed, day)))
    model.write_tape(market, partial, stream_quotes=model.DEMO_STREAM_QUOTES)
    os.replace(partial, path)
    return path


def build_synthetic_tapes(
    days: Sequence[datetime.date],
    seed: int,
    folder: Path,
    *,
    workers: int,
    progress: Progress | None = None,
) -> list[Path]:
    """Build (or reuse) the tapes of `days` in a process pool; returns them in date order."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    missing = [d for d in days if not (Path(folder) / f"{d.isoformat()}.jsonl.gz").is_file()]
    if missing:
        with ProcessPoolExecutor(max_workers=max(1, workers), initializer=init_pool_worker) as pool:
            futures = {pool.submit(build_synthetic_tape, d, seed, Path(folder)): d for d in missing}
            for future in as_completed(futures):
                future.result()
                if progress is not None:
                    progress.step(futures[future].isoformat())
    return [Path(folder) / f"{d.isoformat()}.jsonl.gz" for d in days]


EXAMPLES = """examples:
  python3 backtest.py data/tapes/
  python3 backtest.py --synthetic 20 --seed 3 --set STOP_LOSS_PERCENT=10
  python3 backtest.py data/tapes/ --sweep MAX_GIVEBACK_PERCENT=20,30,40 --sweep STOP_LOSS_PERCENT=10,15,20
  python3 backtest.py --fetch 2025-10-02 --to 2025-10-31

Synthetic tapes are kept under DATA_DIR/synthetic/vM/seed-S/ (M: the market model's version),
reconstructed ones under DATA_DIR/history/ (raw REST answers under DATA_DIR/cache/DATE/, so an
interrupted --fetch resumes). Every tape run is decoded once into DATA_DIR/decoded/ (about 30 MB per
full day), which re-runs and sweeps read instead."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 backtest.py",
        description="Run the live decision path over many session days; print statistics and write a report. "
        + FILLS_NOTE,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "tapes",
        nargs="*",
        type=tape_arg,
        help="tapes (.jsonl.gz) or folders of tapes; with --dask, fsspec URLs too",
    )
    parser.add_argument("--synthetic", type=int, metavar="N", help="N seeded synthetic sessions (6.5 h each)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic days (default 1)")
    parser.add_argument(
        "--fetch",
        type=datetime.date.fromisoformat,
        metavar="DATE",
        help="rebuild past sessions from Polygon REST (needs POLYGON_API_KEY), then run them",
    )
    parser.add_argument("--to", type=datetime.date.fromisoformat, metavar="DATE", help="last day of --fetch")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a rule by its environment name (repeatable), e.g. STOP_LOSS_PERCENT=10",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="run every combination of the swept rules (repeatable); ranked by total P&L",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes for sweeps and for building synthetic days (default: every core)",
    )
    parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run the day tasks on the Dask scheduler at ADDRESS (default: $DASK_SCHEDULER_ADDRESS), or on a"
        " local cluster of N worker processes with local:N; tapes are shipped to the workers",
    )
    parser.add_argument(
        "--holdout",
        type=parse_holdout,
        metavar="K",
        help="keep the K latest dates (or a fraction of the days, e.g. 0.25) out of sample: a sweep ranks its cells"
        " on the other days only and reports the chosen cell on both; a single run reports both parts",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("report"),
        help="report folder (default ./report); an earlier run's report files in it are removed first",
    )
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="decode every tape afresh; read and write nothing in DATA_DIR/decoded",
    )
    args = parser.parse_args(list(argv))
    sources = sum([bool(args.tapes), args.synthetic is not None, args.fetch is not None])
    if sources != 1:
        parser.error("give exactly one of: TAPES..., --synthetic N, --fetch DATE")
    if args.synthetic is not None and not 1 <= args.synthetic <= MAX_SYNTHETIC_DAYS:
        # A typo's 100000 sat silent for minutes while the calendar was laid out, then would fill the disk.
        parser.error(
            f"--synthetic needs 1 <= N <= {MAX_SYNTHETIC_DAYS} (20 years of sessions; each takes about 43 MB"
            " under DATA_DIR)"
        )
    if args.workers < 1:
        parser.error(f"--workers needs at least 1 process (got {args.workers})")
    if args.to is not None and args.fetch is None:
        parser.error("--to goes with --fetch")
    if args.to is not None and args.to < args.fetch:
        parser.error(f"--to {args.to} is before --fetch {args.fetch}: give the first day, then the last")
    problem = out_folder_problem(args.out)
    if problem is not None:
        # Said now: the report is written after the run, which a sweep can take hours to finish.
        parser.error(f"--out {args.out} {problem}: give a folder this user can write for the report")
    return args


def out_folder_problem(out: Path) -> str | None:
    """Why the report could not be written to `out`, or None; nothing is made yet. A folder under /proc
    had run the whole backtest, then lost it to a traceback at the end."""
    try:
        if out.exists() and not out.is_dir():
            return "is a file"
        existing = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    except OSError as exc:  # a name too long, a folder that cannot be searched
        return f"cannot be looked at ({exc.strerror or exc})"
    if not existing.is_dir():
        return f"is under {existing}, which is a file"
    try:  # a real try, removed at once: root passes every access check where /sys or a read-only mount refuse
        os.rmdir(tempfile.mkdtemp(prefix=".report-check-", dir=existing))
    except OSError as exc:
        return f"cannot be made in {existing} ({exc.strerror or exc})"
    return None


@dataclass(frozen=True, slots=True)
class Io:
    """Where the CLI reads its environment and writes; injected so tests need no patching."""

    out: TextIO
    err: TextIO
    environ: Mapping[str, str] | None = None
    env_file: str | Path | None = ".env"
    sleep: Callable[[float], None] = time.sleep
    transport: Any = None


def main(argv: Sequence[str] | None = None, io: Io | None = None) -> int:
    """The CLI; returns the exit status (2 for bad arguments or settings)."""
    io = io or Io(sys.stdout, sys.stderr)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Read once: a named pipe (1Password) gives its text once, and every sweep cell reads the settings.
    dotenv = read_dotenv(io.env_file, os.environ if io.environ is None else io.environ)
    for warning in unknown_keys(dotenv):
        print(warning, file=io.err)
    try:
        overrides = parse_assignments(args.set)
        axes = parse_sweep(args.sweep)
        settings = resolve_settings(overrides, environ=io.environ, env_file=dotenv)
        cells = sweep_cells(axes, overrides, environ=io.environ, env_file=dotenv) if axes else []
    except ConfigError as exc:
        _print_problems("Settings problems (nothing run):", exc.problems, io.err)
        return EXIT_USAGE
    if args.synthetic is not None and holdout_problem(args.holdout, args.synthetic, io.err):
        return EXIT_USAGE
    problem = data_dir_problem(Path(settings.data_dir)) if uses_data_dir(args) else None
    if problem is not None:
        _print_problems("Settings problems (nothing run):", [problem], io.err)
        return EXIT_USAGE
    tapes = collect_tapes(args, settings, io)
    if tapes is None:
        return EXIT_USAGE
    if not tapes and args.fetch is not None:
        print("No session could be rebuilt; see the messages above.", file=io.err)
        return EXIT_FAILED
    problems = check_distinct_days(tapes)
    if problems or not tapes:
        _print_problems("Tape problems (nothing run):", problems or ["no tapes to run"], io.err)
        return EXIT_USAGE
    if holdout_problem(args.holdout, len(tapes), io.err):
        return EXIT_USAGE
    tapes = in_date_order(tapes)
    split = holdout_split(args.holdout, tapes)
    address = scheduler_address(args.dask, os.environ if io.environ is None else io.environ)
    if address is None and any(is_url(tape) for tape in tapes):
        print("Tape URLs are opened by Dask workers: give --dask ADDRESS (or local:N)", file=io.err)
        return EXIT_USAGE
    try:
        with closing(open_executor(address, tapes, settings, args)) as executor:
            if cells:
                return run_sweep_command(tapes, cells, settings, overrides, args, io, split, executor)
            return run_single_command(tapes, settings, overrides, args, io, split, executor)
    except ExecutorError as exc:
        print(f"Error: {exc}", file=io.err)
        return EXIT_FAILED


def open_executor(
    address: str | None, tapes: Sequence[Tape], settings: Settings, args: argparse.Namespace
) -> DayExecutor:
    """The local pool without an address; otherwise the Dask cluster there (or a local one, `local:N`)."""
    if address is None:
        return PoolDays([Path(t) for t in tapes], args.workers, decoded_dir(settings, args))
    from dask_days import connect  # distributed is imported only when a cluster is asked for

    return connect(address, tapes, cache=not args.no_cache)


def holdout_problem(holdout: Holdout | None, days: int, err: TextIO) -> bool:
    """Say so (and return True) when `--holdout` would leave no day in sample."""
    if holdout is None:
        return False
    try:
        holdout.days(days)
    except ValueError as exc:
        print(f"Holdout problem (nothing run): {exc}", file=err)
        return True
    return False


def in_date_order(tapes: Sequence[Tape]) -> list[Tape]:
    """The tapes by session date (the date of each one's first line; all distinct, see `check_distinct_days`).

    A backtest's days are a time series: a position or cooldown carries forward in time only, and
    `--holdout` keeps the latest dates out, so the order given on the command line does not count.
    """
    dated = [(tape_date(tape) or datetime.date.min, index) for index, tape in enumerate(tapes)]
    return [tapes[index] for _day, index in sorted(dated)]


def holdout_split(holdout: Holdout | None, tapes: Sequence[Tape]) -> Split | None:
    """The in-sample and held-out session dates of the tapes, given in date order (None without --holdout)."""
    if holdout is None:
        return None
    dates = [str(tape_date(tape)) for tape in tapes]
    return split_dates(dates, holdout.days(len(tapes)))


def uses_data_dir(args: argparse.Namespace) -> bool:
    """Whether the run writes under DATA_DIR: synthetic days, fetched history or the decoded cache."""
    return args.synthetic is not None or args.fetch is not None or not args.no_cache


def decoded_dir(settings: Settings, args: argparse.Namespace) -> Path | None:
    """Where decoded tapes are cached (None with --no-cache)."""
    return None if args.no_cache else Path(settings.data_dir) / "decoded"


def _print_problems(title: str, problems: Sequence[str], err: TextIO) -> None:
    print(title, file=err)
    for problem in problems:
        print(f"  - {problem}", file=err)


def collect_tapes(args: argparse.Namespace, settings: Settings, io: Io) -> list[Tape] | None:
    """The tapes the command runs over, building synthetic or reconstructed ones first."""
    if args.synthetic is not None:
        calendar = MarketCalendar(settings.rules, settings.market_closed_dates)
        days = synthetic_dates(args.synthetic, calendar)
        folder = synthetic_folder(Path(settings.data_dir), args.seed)
        progress = Progress("synthetic days", args.synthetic, stream=io.err)
        try:
            tapes = build_synthetic_tapes(days, args.seed, folder, workers=args.workers, progress=progress)
        except OSError as exc:  # a folder the access check let through, a disk that filled up
            print(f"The synthetic days cannot be written under {folder}: {exc.strerror or exc}", file=io.err)
            return None
        finally:
            progress.close()
        return tapes
    if args.fetch is not None:
        if not settings.polygon_api_key:
            print(
                "--fetch needs POLYGON_API_KEY (or MASSIVE_API_KEY) in the environment or .env", file=io.err
            )
            return None
        last = args.to or args.fetch  # never before it: parse_args refuses that
        calendar = MarketCalendar(settings.rules, settings.market_closed_dates)
        if not session_days(calendar, args.fetch, last):
            print(
                f"No trading session from {args.fetch} to {last} (weekends and holidays have none)",
                file=io.err,
            )
            return None
        return fetch_history(
            settings,
            args.fetch,
            last,
            sleep=io.sleep,
            transport=io.transport,
            progress_stream=io.err,
            out=io.out,
        )
    return expand_tapes(args.tapes)


def source_of(args: argparse.Namespace) -> str:
    """The kind of days the command runs over, for the report header."""
    if args.synthetic is not None:
        return f"synthetic sessions (seed {args.seed})"
    if args.fetch is not None:
        return "Polygon history"
    return "tapes"


def expand_tapes(paths: Iterable[Tape]) -> list[Tape]:
    """Files and URLs as given; local folders as their `*.jsonl.gz` in name (date) order."""
    tapes: list[Tape] = []
    for path in paths:
        if is_url(path):
            tapes.append(path)
        else:
            tapes += sorted(Path(path).glob("*.jsonl.gz")) if Path(path).is_dir() else [Path(path)]
    return tapes


def run_single_command(
    tapes: Sequence[Tape],
    settings: Settings,
    overrides: Mapping[str, str],
    args: argparse.Namespace,
    io: Io,
    split: Split | None,
    executor: DayExecutor,
) -> int:
    cache_dir = decoded_dir(settings, args)
    # Beside the local pool the run goes in order here, so decode its tapes on every core first.
    if cache_dir is not None and args.workers > 1 and not executor.remote:
        decode_in_pool([Path(t) for t in tapes], settings.rules, cache_dir, args.workers, io.err)
    progress = Progress("days", len(tapes), stream=io.err)
    result = run_single(
        executor,
        tapes,
        settings.rules,
        closed_dates=settings.market_closed_dates,
        progress=progress,
        cache_dir=cache_dir,
    )
    progress.close()
    held_out = None
    if split is not None:
        held_out = run_part(
            executor, range(len(split.in_sample), len(tapes)), settings.rules, settings.market_closed_dates
        )
    source = source_of(args)
    charts = not args.no_charts
    stats = write_report(
        args.out,
        result,
        overrides,
        charts=charts,
        source=source,
        progress_stream=io.err,
        split=split,
        held_out=held_out,
    )
    print_report(result, stats, io.out, source)
    if split is not None:
        inside, outside = split_stats(result, split, held_out)
        print(file=io.out)
        print_held_out(split, io.out)
        print_side_by_side(inside, outside, split, io.out)
    print(
        f"\nReport: {args.out}/ (trades.csv, summary.json{', charts' if not args.no_charts else ''})",
        file=io.out,
    )
    return EXIT_OK


def run_sweep_command(
    tapes: Sequence[Tape],
    cells: Sequence[Cell],
    settings: Settings,
    overrides: Mapping[str, str],
    args: argparse.Namespace,
    io: Io,
    split: Split | None,
    executor: DayExecutor,
) -> int:
    # Said before the first day ends (a day of a large grid takes minutes): what the run is doing.
    print(f"Sweeping {len(cells)} cells over {len(tapes)} day(s).", file=io.err, flush=True)
    progress = Progress("sweep days", len(tapes), stream=io.err)
    days: list[SweepDay] = []
    results = run_sweep(
        tapes,  # type: ignore[arg-type]
        cells,
        closed_dates=settings.market_closed_dates,
        progress=progress,
        held_out=len(split.held_out) if split else 0,
        executor=executor,
        on_day=days.append,
    )
    progress.close()
    notes = sweep_notes(days, settings.rules)
    print(f"Sweep: {len(cells)} cells x {len(tapes)} day(s). {FILLS_NOTE}", file=io.out)
    if split:
        print(
            f"Ranked on the {len(split.in_sample)} in-sample day(s) only; OOS = the {len(split.held_out)}"
            " held-out day(s), each cell run over them alone.",
            file=io.out,
        )
    print_sweep(results, io.out, split)
    lines = [line for kind in notes.values() for line in kind]
    if lines:
        print(file=io.out)
    for line in lines:
        print(line, file=io.out)
    write_sweep(args.out, results, len(tapes), overrides, split, notes)
    print(f"\nReport: {args.out}/ (sweep.csv, sweep.json)", file=io.out)
    return EXIT_OK


if __name__ == "__main__":
    from cli_exit import usable_std_streams
    from logs import configure_logging

    usable_std_streams()  # before the logging, which asks stderr whether it is a terminal
    configure_logging("WARNING", "console")
    use_batch_gc()
    sys.exit(run_quietly(main))
