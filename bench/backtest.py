"""Backtest throughput on synthetic full days. Prints figures; asserts nothing.

1. One core: a plain run (chart series recorded, no charts drawn) over the days: days/s.
2. The pool: a sweep with 2 cells per worker over the same days on every core: day-runs/s.
3. 100 days x a 3x3 sweep: extrapolated from (2) and the measured tape build time (say so when printed).
4. History reconstruction of one full day from in-memory REST answers (no network: a synthetic day's
   second bars and Black-Scholes-priced option minute bars), then one run over the reconstructed tape.

The synthetic tapes are built before any timed region (their build time is reported on its own).

Run: python bench/backtest.py [--days 2] [--workers N]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backtest import (  # noqa: E402
    build_synthetic_tapes,
    day_chart,
    parse_sweep,
    resolve_settings,
    run_backtest,
    run_day,
    run_sweep,
    sweep_cells,
    synthetic_dates,
)
from config import Rules  # noqa: E402
from contract_selector import SECONDS_PER_YEAR, bs_call_price  # noqa: E402
from history import SpreadModel, build_history_day  # noqa: E402
from market_calendar import MarketCalendar  # noqa: E402
from pnl_tracker import Journal  # noqa: E402
from polygon_client import RestAnswer, occ_ticker  # noqa: E402
from sim.market import SyntheticMarket, random_script  # noqa: E402

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
    parser.add_argument("--days", type=int, default=2, help="synthetic full days to measure on")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    rules = Rules()
    calendar = MarketCalendar(rules)
    with tempfile.TemporaryDirectory(prefix="bench-backtest-") as tmp:
        tapes, build_s = build(args.days, args.workers, Path(tmp), calendar)
        print(
            f"built {args.days} synthetic full day(s) in {build_s:.1f} s on {args.workers} worker(s)"
            f" ({build_s * args.workers / args.days:.1f} core-s per day; not in the figures below)"
        )

        started = time.perf_counter()
        result = run_backtest(tapes, rules, calendar=calendar)
        single_s = time.perf_counter() - started
        print(
            f"one core:  {args.days / single_s:.3f} days/s ({single_s / args.days:.2f} s per day,"
            f" {len(result.trades)} trades)"
        )

        started = time.perf_counter()
        for day in result.days:
            day_chart(Path(tmp) / f"{day.session_date}.png", day)
        print(f"charts:    {(time.perf_counter() - started) / args.days:.2f} s per day chart")

        axes = parse_sweep(
            [f"MAX_GIVEBACK_PERCENT={','.join(str(25 + 5 * i) for i in range(2 * args.workers))}"]
        )
        cells = sweep_cells(axes, {}, environ={}, env_file=None)
        started = time.perf_counter()
        run_sweep(tapes, cells, workers=args.workers)
        pool_s = time.perf_counter() - started
        day_runs = len(cells) * args.days
        pool_rate = day_runs / pool_s
        print(
            f"pool:      {pool_rate:.3f} day-runs/s on {args.workers} worker(s)"
            f" ({len(cells)} cells x {args.days} days in {pool_s:.1f} s, each cell builds its calendar)"
        )

        grid = sweep_cells(parse_sweep(GRID), {}, environ={}, env_file=None)
        runs = 100 * len(grid)
        sweep_s = runs / pool_rate
        build_100_s = build_s / args.days * 100
        print(
            f"100 days x 3x3 sweep ({runs} day-runs): ~{sweep_s / 60:.0f} min on {args.workers} worker(s),"
            f" EXTRAPOLATED from the pool rate above; building the 100 tapes first: ~{build_100_s / 60:.0f} min"
            f" (once; they are cached under DATA_DIR/synthetic)"
        )
        time_reconstruction(Path(tmp), rules, calendar)


if __name__ == "__main__":
    main()
