"""Time `select_contract` on a 60-quote same-day chain in which half the quotes lack greeks.

Run from anywhere: `python bench/selector.py [--seconds N]`. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import Rules  # noqa: E402  (needs the repo root on sys.path first)
from contract_selector import Selection, bs_call_delta, bs_call_price, select_contract  # noqa: E402
from events import OptionQuote  # noqa: E402

SESSION = "2025-10-02"
NOW_MS = 1_759_420_800_000  # 12:00 New York
CLOSE_MS = NOW_MS + 4 * 3600 * 1000
SPOT = 220.0
SIGMA = 0.25
QUOTES = 60


def build_chain() -> tuple[OptionQuote, ...]:
    """Strikes 205.0..234.5 by 0.5 priced by Black-Scholes; every other quote has no greeks."""
    t_years = (CLOSE_MS - NOW_MS) / 1000 / (365 * 86400)
    chain = []
    for n in range(QUOTES):
        strike = 205.0 + n * 0.5
        # A 2 % spread keeps every quote past the cheap filters, so all 30 without greeks reach the solver.
        mid = max(bs_call_price(SPOT, strike, t_years, SIGMA), 0.01)
        has_greeks = n % 2 == 0
        chain.append(
            OptionQuote(
                ticker=f"O:IWM251002C{round(strike * 1000):08d}",
                strike=strike,
                expiry=SESSION,
                right="call",
                delta=bs_call_delta(SPOT, strike, t_years, SIGMA) if has_greeks else None,
                iv=SIGMA if has_greeks else None,
                bid=mid * 0.99,
                ask=mid * 1.01,
                bid_size=50.0,
                ask_size=50.0,
                volume=float(100 + 37 * n),
                open_interest=1000.0,
                quote_ms=NOW_MS - 2000,
            )
        )
    return tuple(chain)


def run_once(chain: tuple[OptionQuote, ...], rules: Rules) -> Selection:
    """One selection as the engine would run it at a signal."""
    return select_contract(
        chain, rules=rules, session_date=SESSION, now_ms=NOW_MS, spot=SPOT, session_close_ms=CLOSE_MS
    )


def main() -> None:
    """Run selections for a fixed wall-clock budget and print the rate."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to run (default 2)")
    args = parser.parse_args()
    chain, rules = build_chain(), Rules()
    selection = run_once(chain, rules)
    runs = 0
    started = time.perf_counter()
    deadline = started + args.seconds
    while time.perf_counter() < deadline:
        run_once(chain, rules)
        runs += 1
    elapsed = time.perf_counter() - started
    print(f"chain: {len(chain)} quotes, {sum(q.delta is None for q in chain)} without greeks")
    print(f"result: {selection.summary()}")
    print(f"selections: {runs} in {elapsed:.2f} s = {runs / elapsed:,.0f} selections/s")
    print(f"per selection: {elapsed / runs * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
