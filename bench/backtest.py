"""Backtest throughput on synthetic full days. Prints figures; asserts nothing.

1. Build the synthetic tapes (not part of any figure below; reported on its own).
2. First run, one core: the tapes decoded afresh, the features computed (no cache), per day.
3. Decoding every tape once into the cache on every core, as the CLI does before a run (reported).
4. The 3x3 sweep over every day on every core, reading the decoded tapes; the features are computed
   once per day in the pass (and cached). With --days 100 this is the 100-day target measured; with
   fewer days it is extrapolated, and says so.
5. Re-run, one core: a plain run (chart series recorded, no charts drawn) reading the decoded tapes
   and the features the sweep cached, per day. This is the figure for the "under 1 s a day" target.
6. History reconstruction of one full day from in-memory REST answers (no network), then a run over it.

Run: python bench/backtest.py [--days 4] [--workers N]
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backtest import build_synthetic_tapes, decode_in_pool, synthetic_dates  # noqa: E402
from backtest_run import run_backtest, run_day, use_batch_gc  # noqa: E402
from config import Rules  # noqa: E402
from contract_selector import SECONDS_PER_YEAR, bs_call_price  # noqa: E402
from history import SpreadModel, build_history_day  # noqa: E402
from market_calendar import MarketCalendar  # noqa: E402
from pnl_tracker import Journal  # noqa: E402
from polygon_client import RestAnswer, occ_ticker  # noqa: E402
from report_charts import day_chart  # noqa: E402
from sim.market import SyntheticMarket, random_script  # noqa: E402
from sweep import parse_sweep, resolve_settings, run_sweep, sweep_cells  # noqa: E402

SEED = 7
GRID = ["MAX_GIVEBACK_PERCENT=25,30,40", "STOP_LOSS_PERCENT=10,15,20"]


def build(days: int, workers: int, folder: Path, calendar: MarketCalendar) -> tuple[list[Path], float]:
    started = time.perf_counter()
    tapes = build_synthetic_tapes(synthetic_dates(days, calendar), SEED, folder, workers=workers)
    return tapes, time.perf_counter() - started


class InMemoryHistory:
    """REST answers of one synthetic full day, as `PolygonRest.get` would return them (one page each)."""

    def __init__(self, day: datetime.date) -> None:
        self.market = SyntheticMarket(random_script(day, SEED))
        self.day = day
        self.open_ms = self.market.session_open_ms
        self.close_ms = self.open_ms + 23_400_000
        closes = [b["c"] for b in self.market.bars("IWM")]
        strikes = range(math.floor(min(closes)) - 15, math.ceil(max(closes)) + 16)
        self.contracts = [
            {
                "contract_type": "call",
                "expiration_date": day.isoformat(),
                "strike_price": k,
                "ticker": occ_ticker("IWM", day, "call", k),
            }
            for k in strikes
        ]

    def get(self, path_and_query: str) -> RestAnswer:
        path = path_and_query.partition("?")[0]
        parts = path.split("/")
        if path == "/v3/reference/options/contracts":
            body: dict = {"status": "OK", "results": self.contracts}
        elif parts[4].startswith("O:"):
            body = {"status": "OK", "results": self._minutes(self._strike(parts[4]))}
        elif parts[7] == "second":
            body = self.market.aggs(parts[4], self.open_ms, self.close_ms - 1)
        else:
            body = {"status": "OK", "results": []}
        return RestAnswer(path_and_query, 200, body, 0)

    def _strike(self, ticker: str) -> float:
        return next(c["strike_price"] for c in self.contracts if c["ticker"] == ticker)

    def _minutes(self, strike: float) -> list[dict]:
        bars = []
        for start in range(self.open_ms, self.close_ms, 60_000):
            years = (self.close_ms - start - 60_000) / 1000 / SECONDS_PER_YEAR
            price = bs_call_price(self.market.spot_at(start + 60_000), strike, years, 0.35)
            close = max(0.01, round(price, 2))
            bars.append({"v": 300, "vw": close, "o": close, "c": close, "h": close, "l": close, "t": start})
        return bars


def time_reconstruction(folder: Path, rules: Rules, calendar: MarketCalendar) -> None:
    day = synthetic_dates(1, calendar)[0]
    history = InMemoryHistory(day)
    settings = resolve_settings({}, environ={"DATA_DIR": str(folder / "data")}, env_file=None)
    session = calendar.session(day)
    assert session is not None
    started = time.perf_counter()
    tape = build_history_day(history, settings, session, folder / "rebuilt.jsonl.gz", SpreadModel())
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    result = run_day(tape, rules, calendar, Journal(Path(":memory:")))
    run_s = time.perf_counter() - started
    print(
        f"history:   reconstructing a full day ({len(history.contracts)} calls listed) took {build_s:.1f} s"
        f" without network; a run over it {run_s:.2f} s ({len(result.trades)} trades, {result.chains} chains)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=4, help="synthetic full days to measure on")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    use_batch_gc()  # as the backtest CLI and its pool workers do
    rules = Rules()
    calendar = MarketCalendar(rules)
    with tempfile.TemporaryDirectory(prefix="bench-backtest-") as tmp:
        folder, cache = Path(tmp), Path(tmp) / "decoded"
        tapes, build_s = build(args.days, args.workers, folder, calendar)
        print(
            f"built {args.days} synthetic full day(s) in {build_s:.1f} s on {args.workers} worker(s)"
            f" ({build_s * args.workers / args.days:.1f} core-s per day; not in the figures below)"
        )
        first_s = timed(lambda: run_backtest(tapes[:1], rules, calendar=calendar))
        print(
            f"first run: {first_s:.2f} s for one day on one core (tape decoded, features computed, no cache)"
        )

        decode_s = timed(lambda: decode_in_pool(tapes, rules, cache, args.workers, io.StringIO()))
        print(
            f"decoding:  {decode_s:.1f} s for {args.days} day(s) on {args.workers} worker(s), once per tape"
            f" ({decode_s * args.workers / args.days:.1f} core-s per day)"
        )
        grid = sweep_cells(parse_sweep(GRID), {}, environ={}, env_file=None)
        sweep_s = timed(lambda: run_sweep(tapes, grid, workers=args.workers, cache_dir=cache))
        runs = len(grid) * args.days
        hundred_s = sweep_s / args.days * 100
        label = "MEASURED" if args.days == 100 else f"EXTRAPOLATED from {args.days} days"
        print(
            f"sweep:     3x3 over {args.days} day(s) in {sweep_s:.1f} s on {args.workers} worker(s),"
            f" {runs / sweep_s:.1f} day-runs/s, features computed in the pass;"
            f" 100 days x 3x3: {hundred_s:.0f} s ({label})"
        )

        started = time.perf_counter()
        result = run_backtest(tapes, rules, calendar=calendar, cache_dir=cache)
        single_s = time.perf_counter() - started
        print(
            f"re-run:    {single_s / args.days:.2f} s per day on one core, {args.days / single_s:.2f} days/s"
            f" (decoded tapes and features from the cache; {len(result.trades)} trades)"
        )

        started = time.perf_counter()
        for day in result.days:
            day_chart(folder / f"{day.session_date}.png", day)
        print(f"charts:    {(time.perf_counter() - started) / args.days:.2f} s per day chart")

        time_reconstruction(folder, rules, calendar)


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
