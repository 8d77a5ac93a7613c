"""Shared builders for hand-made bars, quotes and chains (exact values, no randomness)."""

from __future__ import annotations

import datetime
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402

from market_calendar import ny_ms  # noqa: E402
from sim.market import DayScript, Episode, SyntheticMarket, write_tape  # noqa: E402

T = datetime.time
STREAM_THREAD = "polygon-stream"
LEAK_GRACE_S = 10.0


def _stream_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == STREAM_THREAD and t.is_alive()}


@pytest.fixture(autouse=True)
def no_stream_outlives_its_test() -> object:
    """A stream left dialling after its test ends is a daemon that failed to stop it (and its log lines
    would leak into later tests' captured logs): fail the test that started it."""
    before = _stream_threads()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    leaked = _stream_threads() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.05)
        leaked = _stream_threads() - before
    assert not leaked, f"{len(leaked)} stream thread(s) still running after the test"


@pytest.fixture(scope="session")
def demo_tape(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo day as a tape, built once per test session (it takes a few seconds)."""
    from sim.market import build_demo_tape

    return build_demo_tape(tmp_path_factory.mktemp("demo") / "2025-10-02.jsonl.gz")


def short_script(day: datetime.date, seed: int) -> DayScript:
    """An hour of market with three scripted bursts, so a short tape holds several round trips."""
    return DayScript(
        day,
        seed,
        240.0,
        (
            Episode(T(9, 45), "chop", 300, 1.0),
            Episode(T(9, 52), "burst", 60, 0.25),
            Episode(T(9, 53), "pullback", 90, 0.35),
            Episode(T(10, 2), "burst", 80, 0.3),
            Episode(T(10, 3, 20), "fade", 150, 0.2),
            Episode(T(10, 12), "burst", 70, 0.28),
            Episode(T(10, 13, 10), "grind", 300, 0.15),
        ),
    )


def short_days(folder: Path, stream_quotes: int = 0) -> list[Path]:
    """Two short synthetic days (09:28 to 10:25) as tapes in `folder`."""
    tapes = []
    for day, seed in ((datetime.date(2025, 10, 6), 11), (datetime.date(2025, 10, 7), 12)):
        market = SyntheticMarket(short_script(day, seed))
        path = folder / f"{day.isoformat()}.jsonl.gz"
        tapes.append(write_tape(market, path, end_ms=ny_ms(day, T(10, 25)), stream_quotes=stream_quotes))
    return tapes


@pytest.fixture(scope="session")
def short_tapes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two short synthetic days (09:28 to 10:25), built once per test session."""
    return short_days(tmp_path_factory.mktemp("short"))


@pytest.fixture(scope="session")
def short_stream_tapes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The short days of `short_tapes` with the options stream recorded (`Q` lines for 4 contracts)."""
    return short_days(tmp_path_factory.mktemp("short-stream"), stream_quotes=4)
