"""Start-up of the short commands: what `--status`, `--pause` and a bars-only `--replay` import.

Each command runs in a fresh process through a small wrapper that runs main.py and then reports which
heavy packages ended up in `sys.modules`. Time is never asserted (bench/startup.py measures it); what
is asserted is the cause of slow start-ups: exchange_calendars and pandas come in only to build the
market calendar's cache, which the first command in a DATA_DIR writes and later ones read (the first
one copies it from the seed shipped in calendar_seed/ instead, when that seed is of the installed
exchange_calendars version).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from datetime import time as clock_time
from pathlib import Path

import pytest

from config import CALENDAR_CACHE_DIR, PAUSE_FILE
from market_calendar import SEED_DIR, cache_key, ny_ms
from tape import TapeWriter

ROOT = Path(__file__).resolve().parents[1]
HEAVY = frozenset({"pandas", "exchange_calendars", "httpx", "websockets", "numpy", "matplotlib"})
# Heavy packages these commands still import through modules this test's change did not touch:
# engine -> market_state -> features_vector imports numpy at its top, and replay -> feed ->
# polygon_client imports httpx and websockets at its top. Drop an entry once its import is lazy,
# so that this test guards it from then on.
STILL_IMPORTED = {
    "--status": frozenset({"numpy"}),
    "--pause": frozenset(),
    "--replay": frozenset({"numpy", "httpx", "websockets"}),
}
MARKER = "HEAVY_MODULES="
WRAPPER = f"""
import json, runpy, sys
root = sys.argv[1]
sys.path.insert(0, root)
sys.argv = [root + "/main.py", *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    code = 0
except SystemExit as stop:
    code = stop.code
heavy = sorted({{name.split(".")[0] for name in sys.modules}} & set({sorted(HEAVY)!r}))
print({MARKER!r} + json.dumps(heavy), file=sys.stderr)
sys.exit(code)
"""
DAY = date(2025, 11, 28)  # an early close: the session the status shows comes from the cache


def run_command(args: list[str], data_dir: Path, **env: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """main.py ARGS in a fresh process (no keys, HEALTH_PORT or `.env`); its result and heavy imports."""
    dropped = ("API_KEY", "TOKEN", "USER_KEY", "HEALTH_PORT", "SIM_CLOCK_START", "DATA_DIR")
    base = {k: v for k, v in os.environ.items() if not k.endswith(dropped)}
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(ROOT), *args],
        cwd=data_dir.parent,
        env={**base, "DATA_DIR": str(data_dir), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    reported = [line for line in done.stderr.splitlines() if line.startswith(MARKER)]
    assert reported, done.stderr
    return done, set(json.loads(reported[-1].removeprefix(MARKER)))


def status_json(data_dir: Path) -> tuple[dict, set[str]]:
    done, heavy = run_command(["--status", "--json"], data_dir, SIM_CLOCK_START="2025-11-28T12:00:00-05:00")
    return json.loads(done.stdout), heavy


def write_tiny_tape(path: Path) -> Path:
    """Five seconds of IWM and SPY bars: a bars-only tape, so the replay is nearly all start-up."""
    start = ny_ms(DAY, clock_time(10, 0))
    with TapeWriter(path, underlying="IWM", benchmark="SPY", start_ms=start) as tape:
        for n in range(5):
            s = start + n * 1000
            bars = [{"ev": "A", "sym": sym, "v": 100, "av": 100 * (n + 1), "op": price, "vw": price, "o": price,
                     "c": price, "h": price, "l": price, "a": price, "z": 1, "s": s, "e": s + 1000}
                    for sym, price in (("IWM", 240.0), ("SPY", 660.0))]  # fmt: skip
            tape.write_ws(s + 1000, json.dumps(bars))
        tape.flush()
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def test_status_with_a_warm_calendar_cache_imports_nothing_heavy(data_dir: Path) -> None:
    cold, _ = status_json(data_dir)  # the first command in this DATA_DIR builds and writes the cache
    assert any((data_dir / CALENDAR_CACHE_DIR).glob("xnys-*.json"))
    warm, heavy = status_json(data_dir)
    assert heavy <= STILL_IMPORTED["--status"], heavy - STILL_IMPORTED["--status"]
    assert warm == cold  # the cached calendar tells the same session as the built one
    session = warm["session"]
    assert session["trading_day"] and session["early_close"] and session["close_time"] == "13:00"


def test_a_first_status_reads_the_shipped_seed_of_the_installed_version(data_dir: Path) -> None:
    seeded = json.loads((SEED_DIR / f"xnys-{DAY.year}.json").read_text())["key"] == cache_key()
    status, heavy = status_json(data_dir)
    # With the seed's version installed nothing is built; with another one the build imports pandas.
    assert (heavy <= STILL_IMPORTED["--status"]) is seeded, heavy
    assert status["session"]["early_close"] is True
    assert (data_dir / CALENDAR_CACHE_DIR / f"xnys-{DAY.year}.json").exists()


def test_status_in_a_missing_data_dir_builds_and_creates_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "missing"
    status, _ = status_json(data_dir)
    assert status["session"]["early_close"] is True and status["journal_found"] is False
    assert not data_dir.exists()


def test_status_with_a_corrupt_calendar_cache_still_answers(data_dir: Path) -> None:
    cold, _ = status_json(data_dir)
    for path in (data_dir / CALENDAR_CACHE_DIR).glob("xnys-*.json"):
        path.write_bytes(path.read_bytes()[:40])
    again, _ = status_json(data_dir)
    assert again == cold
    _, heavy = status_json(data_dir)  # the corrupt files were rewritten: warm again
    assert heavy <= STILL_IMPORTED["--status"]


def test_pause_and_resume_do_not_import_the_daemon(data_dir: Path) -> None:
    for flag in ("--pause", "--resume"):
        _, heavy = run_command([flag], data_dir)
        assert heavy <= STILL_IMPORTED["--pause"], (flag, heavy)
        assert (data_dir / PAUSE_FILE).exists() is (flag == "--pause")


def test_bars_only_replay_with_a_warm_calendar_cache_imports_nothing_heavy(data_dir: Path) -> None:
    tape = write_tiny_tape(data_dir.parent / f"{DAY.isoformat()}.jsonl.gz")
    status_json(data_dir)  # warms the cache, as any earlier command in this DATA_DIR would have
    done, heavy = run_command(["--replay", str(tape), "--speed", "max"], data_dir)
    assert heavy <= STILL_IMPORTED["--replay"], heavy - STILL_IMPORTED["--replay"]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["bad_lines"] == 0 and summary["lines"] >= 5


def test_constructing_a_calendar_imports_no_exchange_calendars() -> None:
    code = (
        "import sys; from config import Rules; from market_calendar import MarketCalendar; "
        "MarketCalendar(Rules()); print(sorted({m.split('.')[0] for m in sys.modules} & {'pandas', "
        "'exchange_calendars', 'numpy'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_pause_file_name_is_the_daemons() -> None:
    import daemon

    assert daemon.PAUSE_FILE == PAUSE_FILE
