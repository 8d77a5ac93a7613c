"""A bars-only full day through `python3 main.py --replay TAPE --speed max`. Prints figures; asserts nothing.

1. bars/s net: the whole replay process on a full regular day (23,400 one-second IWM bars, each with
   its SPY benchmark bar in the same frame) minus the same command on a tiny tape, best of N runs,
   each into a fresh DATA_DIR.
2. reading alone: inflating the full tape and parsing each line's JSON, nothing validated or decided
   (the ceiling of any replay of that tape).
3. the naive per-bar recompute (every window recomputed from scratch at every bar, plain Python) over
   the same bars, in bars/s, and the replay's multiple of it.
4. where a replay's time goes: a cProfile of one replay process, by area, and its top 15 functions.

Run from the repo root: python bench/replay.py [--repeat N] [--naive-rounds N] [--no-profile]
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import math
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import Rules  # noqa: E402 - needs the repo root on sys.path
from events import Bar  # noqa: E402
from market_calendar import ny_ms  # noqa: E402
from signals import SLOPE_NOISE, FeatureEngine, Features  # noqa: E402
from tape import TapeWriter, loads_json  # noqa: E402

DAY = datetime.date(2025, 10, 2)
FULL_DAY_BARS = 23_400
TINY_BARS = 10

# Profile areas by the file a function lives in (builtins by a word of their name).
AREAS = (
    ("tape read + JSON decode", ("tape.py", "orjson", "zlib", "gzip", "decompress", "loads")),
    ("feed parse (frames to bars)", ("feed.py", "polygon_client.py", "events.py")),
    ("features", ("signals.py", "features_vector.py", "numpy", "insort", "bisect")),
    ("SQLite journal", ("pnl_tracker.py", "sqlite3")),
    ("logging", ("structlog", "logs.py", "logging")),
    (
        "engine (decisions, market state, pipeline)",
        ("engine.py", "market_state.py", "pipeline.py", "replay.py", "risk_manager.py", "alert_text.py"),
    ),
    ("imports and start-up", ("<frozen", "importlib", "site-packages", "/lib/python")),
)


def wire_event(sym: str, start_ms: int, close: float, volume: int, vw: float) -> dict[str, Any]:
    """One `A` event as the WebSocket sends it."""
    return {
        "ev": "A", "sym": sym, "v": volume, "av": volume, "op": close, "vw": vw, "o": close,
        "c": close, "h": close, "l": close, "a": close, "z": 1, "s": start_ms, "e": start_ms + 1000,
    }  # fmt: skip


def write_bars_tape(path: Path, bars: int, seed: int = 7) -> Path:
    """A tape of `bars` seconds from the open, one frame per second holding IWM's and SPY's bar.

    Prices walk with drifting regimes and volume has heavy tails with bursts, so the entry
    conditions do hold now and then (no chain on the tape: such an entry finds no contract).
    """
    rng = random.Random(seed)
    open_ms = ny_ms(DAY, datetime.time(9, 30))
    iwm, spy, drift = 220.0, 570.0, 0.0
    with TapeWriter(
        path, underlying="IWM", benchmark="SPY", start_ms=open_ms - 2000, compresslevel=1
    ) as tape:
        for i in range(bars):
            if i % 120 == 0:
                drift = rng.choice((-0.004, 0.0, 0.0, 0.003, 0.008))
            iwm = round(iwm + drift + rng.gauss(0.0, 0.01), 2)
            spy = round(spy + 2.5 * drift + rng.gauss(0.0, 0.02), 2)
            volume = int(rng.paretovariate(1.6) * 300) * (4 if drift > 0.005 and rng.random() < 0.2 else 1)
            start = open_ms + i * 1000
            frame = [
                wire_event("IWM", start, iwm, volume, round(iwm - 0.002, 4)),
                wire_event("SPY", start, spy, volume * 2, round(spy - 0.003, 4)),
            ]
            tape.write_ws(start + 1000 + rng.randint(150, 400), frame)
    return path


def replay_seconds(tape: Path, folder: Path, label: str) -> float:
    """Wall seconds of one `main.py --replay TAPE --speed max` process into a fresh DATA_DIR.

    Fresh for every run of every tape: the tiny and the full tape share a name, so one folder would
    make the second a resumed replay, and the first would leave the second its calendar cache
    (DATA_DIR/calendar), which is start-up the net figure must subtract, not hide.
    """
    env = {k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))}
    env["DATA_DIR"] = str(folder / f"data-{label}")
    command = [sys.executable, str(ROOT / "main.py"), "--replay", str(tape), "--speed", "max"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"replay failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def decoded_bars(count: int, seed: int = 7) -> list[Bar]:
    """The IWM bars of `write_bars_tape` as the decoder makes them (for the in-process figures)."""
    from feed import FeedDecoder
    from tape import TapeReader

    with tempfile.TemporaryDirectory() as tmp:
        tape = write_bars_tape(Path(tmp) / "bars.jsonl.gz", count, seed)
        decoder = FeedDecoder("IWM", "SPY")
        bars: list[Bar] = []
        for line in TapeReader(tape):
            if line.kind == "ws":
                bars.extend(
                    e for e in decoder.ws(line.t, line.payload) if isinstance(e, Bar) and e.sym == "IWM"
                )
    return bars


def _slope_per_second(xs: list[int], ys: list[float]) -> float:
    n = len(xs)
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    co = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = co / spread * 1000.0
    return 0.0 if -SLOPE_NOISE <= slope <= SLOPE_NOISE else slope


def _linear_percentile(values: list[float], quantile: float) -> float:
    ordered = sorted(values)
    virtual = (len(ordered) - 1) * quantile
    below = int(virtual)
    if below >= len(ordered) - 1:
        return ordered[-1]
    return ordered[below] + (ordered[below + 1] - ordered[below]) * (virtual - below)


def naive_features(
    bars: list[Bar], rules: Rules
) -> list[tuple[float, float | None, float | None, float | None]]:
    """VWAP, VWAP slope, momentum and volume threshold of every bar, each window rebuilt from scratch."""
    starts = [b.start_ms for b in bars]
    vwaps: list[float] = []
    out = []
    for i, bar in enumerate(bars):
        s = bar.start_ms
        lo = bisect.bisect_right(starts, s - rules.vwap_window_seconds * 1000)
        window = bars[lo : i + 1]
        volume = sum(b.v for b in window)
        if volume > 0:
            vwap = sum((b.c if b.vw is None else b.vw) * b.v for b in window) / volume
        else:
            vwap = sum(b.c for b in window) / len(window)
        vwaps.append(vwap)
        lo = bisect.bisect_right(starts, s - rules.vwap_rising_seconds * 1000)
        slope = None
        if i + 1 - lo >= rules.vwap_rising_min_points:
            slope = _slope_per_second(starts[lo : i + 1], vwaps[lo : i + 1])
        lo = bisect.bisect_right(starts, s - rules.momentum_window_seconds * 1000)
        momentum = None
        if i - lo >= 1:
            closes = [b.c for b in bars[lo : i + 1]]
            momentum = _slope_per_second(starts[lo : i + 1], closes) / (sum(closes) / len(closes)) * 100
        lo = bisect.bisect_right(starts, s - rules.volume_window_seconds * 1000)
        previous = [b.v for b in bars[lo:i]]
        threshold = None
        if len(previous) >= rules.volume_min_bars:
            threshold = _linear_percentile(previous, rules.volume_percentile / 100)
            mean = sum(previous) / len(previous)
            math.sqrt(sum((v - mean) ** 2 for v in previous) / len(previous))
        out.append((vwap, slope, momentum, threshold))
    return out


def naive_check(bars: list[Bar], rules: Rules, naive: list[tuple[Any, ...]]) -> float:
    """The largest relative gap between the naive VWAP/threshold and FeatureEngine's (a sanity check)."""
    engine = FeatureEngine(rules)
    worst = 0.0
    for bar, (vwap, _slope, _momentum, threshold) in zip(bars, naive, strict=True):
        features: Features = engine.update(bar)
        worst = max(worst, abs(features.rolling_vwap - vwap) / vwap)
        if threshold is not None and features.volume_threshold is not None:
            worst = max(worst, abs(features.volume_threshold - threshold) / max(threshold, 1.0))
    return worst


def read_floor_seconds(tape: Path, repeat: int) -> float:
    """Best wall seconds to inflate the whole tape at once and parse every line's JSON, nothing more.

    No validation, no bar, no feature, no decision: the least any replay that reads this tape in
    Python must spend, so FULL_DAY_BARS over it is the ceiling of the replay's bars/s.
    """
    best = math.inf
    for _ in range(repeat):
        started = time.perf_counter()
        text = zlib.decompress(tape.read_bytes(), 16 + zlib.MAX_WBITS)
        records = [loads_json(line) for line in text.split(b"\n") if line]
        best = min(best, time.perf_counter() - started)
        assert len(records) > FULL_DAY_BARS  # the meta line and every frame
    return best


def profile_areas(tape: Path, folder: Path) -> tuple[dict[str, float], float, pstats.Stats]:
    """Seconds by area of one profiled replay process, its total, and the raw stats."""
    out = folder / "replay.prof"
    env = {k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))}
    env["DATA_DIR"] = str(folder / "data-profile")
    command = [sys.executable, "-m", "cProfile", "-o", str(out), str(ROOT / "main.py"), "--replay", str(tape)]
    subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True)
    stats = pstats.Stats(str(out))
    areas: dict[str, float] = {name: 0.0 for name, _ in AREAS} | {"other": 0.0}
    total = 0.0
    for (filename, _line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        own = row[2]
        total += own
        where = f"{filename} {function}"
        area = next((name for name, marks in AREAS if any(mark in where for mark in marks)), "other")
        areas[area] += own
    return areas, total, stats


def main() -> None:
    """Build the tapes, time the replays and the naive recompute, print the figures and the profile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="replay runs per tape (best is kept)")
    parser.add_argument("--naive-rounds", type=int, default=1, help="rounds of the naive recompute")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    args = parser.parse_args()
    rules = Rules()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        full = write_bars_tape(folder / "2025-10-02.jsonl.gz", FULL_DAY_BARS)
        tiny = write_bars_tape(folder / "tiny" / "2025-10-02.jsonl.gz", TINY_BARS)
        runs: dict[Path, list[float]] = {full: [], tiny: []}
        for run in range(args.repeat):  # interleaved, so a busy spell hits both alike
            for tape in (tiny, full):
                label = f"{'full' if tape == full else 'tiny'}-{run}"
                runs[tape].append(replay_seconds(tape, folder, label))
        net = min(runs[full]) - min(runs[tiny])
        replay_rate = (FULL_DAY_BARS - TINY_BARS) / net
        print(f"replay, full day ({FULL_DAY_BARS:,} IWM bars + as many SPY): "
              f"best {min(runs[full]):.3f} s; runs {', '.join(f'{t:.2f}' for t in runs[full])}")  # fmt: skip
        print(f"replay, tiny tape ({TINY_BARS} bars): best {min(runs[tiny]):.3f} s")
        print(f"replay net of start-up: {net:.3f} s = {replay_rate:,.0f} bars/s (target >= 250,000)")
        floor = read_floor_seconds(full, args.repeat)
        print(f"reading alone (inflate + JSON of every line, nothing decided): {floor:.3f} s = "
              f"{FULL_DAY_BARS / floor:,.0f} bars/s, the ceiling of any replay of this tape")  # fmt: skip
        bars = decoded_bars(FULL_DAY_BARS)
        naive_times = []
        for _ in range(args.naive_rounds):
            started = time.perf_counter()
            naive = naive_features(bars, rules)
            naive_times.append(time.perf_counter() - started)
        naive_rate = len(bars) / min(naive_times)
        print(f"naive per-bar recompute: {naive_rate:,.0f} bars/s "
              f"(agrees with FeatureEngine to {naive_check(bars, rules, naive):.1e} relative)")  # fmt: skip
        print(f"replay / naive: {replay_rate / naive_rate:.1f}x (target >= 25x)")
        if not args.no_profile:
            areas, total, stats = profile_areas(full, folder)
            print(f"profile of one replay process (cProfile, {total:.2f} s own time in all):")
            for name, seconds in sorted(areas.items(), key=lambda kv: -kv[1]):
                print(f"  {name:44s} {seconds:6.2f} s {100 * seconds / total:5.1f} %")
            stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
