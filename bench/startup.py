"""Start-up of the short commands: wall time of whole `python3 main.py ...` processes. Prints; asserts nothing.

Each command runs `--runs` times (default 5) as a fresh process with DATA_DIR in a temporary directory on
the normal disk (each replay gets its own, so none resumes another's journal); the median is printed, and
the best, since other work on the machine only ever adds time. The replay's tape is a tiny one written with
the project's own `TapeWriter`: a few IWM and SPY bars, so the figure is nearly all start-up.

Each DATA_DIR starts with the market calendar's cache (DATA_DIR/calendar, written once by a first
`--status`), as a DATA_DIR in use has it; the "cold" row runs without it, as the first command in a new
DATA_DIR (or after an exchange_calendars upgrade) does, and so pays for exchange_calendars and pandas.

Run: python bench/startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from datetime import time as clock_time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import CALENDAR_CACHE_DIR  # noqa: E402
from market_calendar import ny_ms  # noqa: E402
from tape import TapeWriter  # noqa: E402

DAY = date(2025, 10, 2)
TINY_BARS = 5


def write_tiny_tape(path: Path) -> Path:
    """A tape of `TINY_BARS` seconds of IWM and SPY bars, enough for the replay to run end to end."""
    start = ny_ms(DAY, clock_time(10, 0))
    with TapeWriter(path, underlying="IWM", benchmark="SPY", start_ms=start) as tape:
        for n in range(TINY_BARS):
            s = start + n * 1000
            bars = [{"ev": "A", "sym": sym, "v": 100, "av": 100 * (n + 1), "op": price, "vw": price, "o": price,
                     "c": price, "h": price, "l": price, "a": price, "z": 1, "s": s, "e": s + 1000}
                    for sym, price in (("IWM", 240.0), ("SPY", 660.0))]  # fmt: skip
            tape.write_ws(s + 1000, json.dumps(bars))
        tape.flush()
    return path


def wall_seconds(args: list[str], data_dir: Path) -> float:
    """Wall time of one `python3 main.py ARGS` run; a failing command stops the bench with its stderr."""
    env = {**os.environ, "DATA_DIR": str(data_dir)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"main.py {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return elapsed


def warm_calendar_cache(base: Path) -> Path:
    """The calendar cache folder one `--status` writes into a new DATA_DIR, to be copied into the others."""
    data_dir = base / "warm-up"
    data_dir.mkdir()
    wall_seconds(["--status"], data_dir)
    cache = data_dir / CALENDAR_CACHE_DIR
    if not any(cache.glob("*.json")):
        raise SystemExit(f"--status wrote no calendar cache under {cache}")
    return cache


def measure(label: str, args: list[str], base: Path, runs: int, calendar_cache: Path | None) -> None:
    """Print the median and best of `runs` fresh processes of one command (DATA_DIR seeded with `calendar_cache`)."""
    times = []
    for n in range(runs):
        data_dir = base / f"{label.replace(' ', '_').replace(',', '')}-{n}"
        data_dir.mkdir()
        if calendar_cache is not None:
            shutil.copytree(calendar_cache, data_dir / CALENDAR_CACHE_DIR)
        times.append(wall_seconds(args, data_dir))
    print(f"{label:<26} median {statistics.median(times):.3f} s, best {min(times):.3f} s ({runs} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        base = Path(tmp)
        tape = write_tiny_tape(base / "tiny.jsonl.gz")
        cache = warm_calendar_cache(base)
        commands = {
            "--help": ["--help"],
            "--demo --help": ["--demo", "--help"],
            "--status": ["--status"],
            "--status --json": ["--status", "--json"],
            "--replay tiny --speed max": ["--replay", str(tape), "--speed", "max"],
        }
        for label, command in commands.items():
            measure(label, command, base, args.runs, cache)
        measure("--status, cold cache", ["--status"], base, args.runs, None)
        measure("--replay tiny, cold cache", ["--replay", str(tape), "--speed", "max"], base, args.runs, None)


if __name__ == "__main__":
    main()
