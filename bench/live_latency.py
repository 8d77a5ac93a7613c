"""Frame received -> Pushover request started, through the live path. Prints figures; asserts nothing.

The live pieces run as in the daemon: a queue, the engine thread (decode, engine, SQLite journal
with synchronous=FULL), and the notifier thread posting to the fake Pushover on 127.0.0.1. A
producer feeds 100 scripted bursts; each burst's last bar triggers a BUY and a contract snapshot
right after it triggers a stop-loss SELL: on every other round trip that quote is a streamed `Q` event of
the options cluster instead of a REST snapshot, and those SELLs are also reported on their own ("quote
received -> SELL request started"). For every alert the clock runs from the moment its triggering item
is put on the queue to the moment the HTTP request to Pushover starts.

The chain is a realistic one: 250 same-day calls on strikes around the money (the chain poll asks for
calls only), priced by Black-Scholes, and every other quote without greeks, so that the BUY's selection
has to find those deltas from an implied volatility solved from the mid. The journal lives on the normal
disk (under DATA_DIR, default ./data), not on a tmpfs, as the daemon's does.

Run: python bench/live_latency.py [--round-trips 100] [--chain-quotes 250] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import date
from datetime import time as clock_time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alerts import Notifier, PushoverClient  # noqa: E402
from config import Rules  # noqa: E402
from contract_selector import bs_call_delta, bs_call_price, years_until  # noqa: E402
from engine import Engine  # noqa: E402
from events import Received  # noqa: E402
from feed import FeedDecoder  # noqa: E402
from market_calendar import MarketCalendar, ny_ms  # noqa: E402
from pipeline import Pipeline  # noqa: E402
from pnl_tracker import Journal  # noqa: E402
from sim.pushover_server import FakePushover  # noqa: E402

DAY = date(2025, 10, 2)
SWITCH_INTERVAL_S = float(os.environ.get("BENCH_SWITCH_INTERVAL", "0.005"))
TICKER = "O:IWM251002C00242000"
HELD_STRIKE = 242.0
CHAIN_SPOT = 240.15  # about where the ramp stands when the chain arrives
CHAIN_SIGMA = 0.25
STRIKE_STEP = 0.5
CHAIN_PATH = "/v3/snapshot/options/IWM?expiration_date=2025-10-02&contract_type=call&limit=250"


def bar_frame(start_ms: int, close: float, volume: float) -> str:
    event = {"ev": "A", "sym": "IWM", "v": volume, "av": 1, "op": 240.0, "vw": close, "o": close, "c": close,
             "h": close, "l": close, "a": close, "z": 1, "s": start_ms, "e": start_ms + 1000}  # fmt: skip
    return json.dumps([event])


def option_result(at_ms: int, bid: float, ask: float) -> dict:
    """The held contract as the REST snapshot shows it: greeks included, the biggest volume in the chain."""
    return {
        "details": {"contract_type": "call", "expiration_date": DAY.isoformat(), "strike_price": 242.0,
                    "ticker": TICKER},
        "greeks": {"delta": 0.38}, "implied_volatility": 0.2, "open_interest": 1000, "day": {"volume": 5000},
        "last_quote": {"bid": bid, "ask": ask, "bid_size": 50, "ask_size": 50, "last_updated": at_ms * 1_000_000},
    }  # fmt: skip


def chain_result(at_ms: int, strike: float, t_years: float, with_greeks: bool, volume: int) -> dict:
    """One call of the realistic chain, priced by Black-Scholes (a 2 % spread around the model price)."""
    mid = max(bs_call_price(CHAIN_SPOT, strike, t_years, CHAIN_SIGMA), 0.01)
    result: dict = {
        "details": {"contract_type": "call", "expiration_date": DAY.isoformat(), "strike_price": strike,
                    "ticker": f"O:IWM251002C{round(strike * 1000):08d}"},
        "open_interest": 1000, "day": {"volume": volume},
        "last_quote": {"bid": round(mid * 0.99, 4), "ask": round(mid * 1.01, 4), "bid_size": 50,
                       "ask_size": 50, "last_updated": at_ms * 1_000_000},
    }  # fmt: skip
    if with_greeks:
        result["greeks"] = {"delta": bs_call_delta(CHAIN_SPOT, strike, t_years, CHAIN_SIGMA)}
        result["implied_volatility"] = CHAIN_SIGMA
    return result


def chain_results(at_ms: int, quotes: int, close_ms: int) -> list[dict]:
    """`quotes` calls on strikes around the money, every other one without greeks; the held contract
    (strike 242, greeks included) is among them and, with the largest notional in the delta band, wins."""
    t_years = years_until(at_ms, close_ms)
    first = HELD_STRIKE - STRIKE_STEP * (quotes // 2)
    results = []
    for n in range(quotes):
        strike = round(first + n * STRIKE_STEP, 2)
        if strike == HELD_STRIKE:
            results.append(option_result(at_ms, 1.00, 1.02))
        else:
            # Volumes well below the held contract's 5000, so its notional stays the largest in the band.
            results.append(chain_result(at_ms, strike, t_years, n % 2 == 1, 100 + 50 * (n % 7)))
    return results


def q_frame(at_ms: int, bid: float, ask: float, seq: int) -> str:
    """One options-cluster frame with a quote of the held contract."""
    event = {"ev": "Q", "sym": TICKER, "bx": 302, "ax": 313, "bp": bid, "ap": ask, "bs": 50, "as": 50,
             "t": at_ms - 3, "q": seq}  # fmt: skip
    return json.dumps([event])


def round_trip(
    first_ms: int, streamed: bool, chain_quotes: int, close_ms: int
) -> tuple[list[Received], Received, Received]:
    """Warm-up items, the BUY trigger (last ramp bar) and the SELL trigger (a stop-loss quote)."""
    items = [
        Received(first_ms + i * 1000 + 200, "ws", bar_frame(first_ms + i * 1000, 240.0, 100))
        for i in range(100)
    ]
    for j in range(1, 20):
        start = first_ms + (99 + j) * 1000
        items.append(Received(start + 1200, "ws", bar_frame(start, round(240.0 + 0.01 * j, 2), 100)))
    chain_at = first_ms + 115_000
    items.append(
        Received(
            chain_at, "rest", {"results": chain_results(chain_at, chain_quotes, close_ms)}, CHAIN_PATH, 200
        )
    )
    items.sort(key=lambda item: item.t)
    last = first_ms + 119_000
    buy = Received(last + 1200, "ws", bar_frame(last, 240.2, 500))
    sell_at = last + 3000
    if streamed:
        return items, buy, Received(sell_at, "ws", q_frame(sell_at, 0.80, 0.82, first_ms))
    sell = Received(
        sell_at, "rest", {"results": option_result(sell_at, 0.80, 0.82)}, f"/v3/snapshot/options/IWM/{TICKER}"
    )
    return items, buy, sell


class StampingTransport(httpx.HTTPTransport):
    """Records when each Pushover request starts (the end of the measured path)."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[float] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.started.append(time.perf_counter())
        return super().handle_request(request)


def engine_loop(pipeline: Pipeline, inbox: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            item = inbox.get(timeout=0.05)
        except queue.Empty:
            continue
        pipeline.handle(item)
        inbox.task_done()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=100)
    parser.add_argument("--chain-quotes", type=int, default=250, help="calls in each chain snapshot")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("DATA_DIR") or "data"),
        help="where the bench's journal is written (a temporary directory inside it); default DATA_DIR or ./data",
    )
    args = parser.parse_args()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    rules = replace(
        Rules(),
        max_trades_per_day=0,
        max_consecutive_losses=0,
        daily_loss_limit=0.0,
        critical_loss_threshold=-1e12,
    )
    args.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp, FakePushover() as pushover:
        journal = Journal(Path(tmp) / "bench.sqlite3")
        transport = StampingTransport()
        client = PushoverClient("a" * 30, "u" * 30, pushover.url, transport=transport)
        notifier = Notifier(journal, client, clock_ms=lambda: 0)
        calendar = MarketCalendar(rules)
        engine = Engine(rules, calendar)
        engine.price_chains_on_arrival = True  # as the live daemon runs it (main.py)
        pipeline = Pipeline(engine, journal, FeedDecoder.for_rules(rules), on_alerts=lambda _a: notifier.wake(),
                            on_log=lambda _l: None)  # fmt: skip
        inbox: queue.Queue = queue.Queue()
        stop = threading.Event()
        threads = [threading.Thread(target=engine_loop, args=(pipeline, inbox, stop), daemon=True),
                   threading.Thread(target=notifier.run, args=(stop,), daemon=True)]  # fmt: skip
        for thread in threads:
            thread.start()
        put_at: list[float] = []
        first = ny_ms(DAY, clock_time(9, 40))
        session = calendar.session(DAY)
        assert session is not None
        for n in range(args.round_trips):
            items, buy, sell = round_trip(
                first + n * 130_000, n % 2 == 1, args.chain_quotes, session.close_ms
            )
            for item in items:
                inbox.put(item)
            for trigger in (buy, sell):
                inbox.join()
                expected = len(transport.started) + 1
                while len(pushover.history) < len(put_at):  # the previous alert's request has completed
                    time.sleep(0.0005)
                time.sleep(0.002)
                put_at.append(time.perf_counter())
                inbox.put(trigger)
                while len(transport.started) < expected:
                    time.sleep(0.0002)
        time.sleep(0.2)
        stop.set()
        latencies = [(s - p) * 1000 for p, s in zip(put_at, transport.started, strict=False)]
        journal.close()
    buys = latencies[0::2]  # the BUYs: the only alerts whose path runs the contract selection
    sells = latencies[
        1::2
    ]  # no selection: what the rest of the path (decode, journal commit, notifier) costs
    streamed_sells = latencies[3::4]  # round trips 1, 3, 5, ...: BUY then a SELL on a streamed quote
    print(f"chain: {args.chain_quotes} calls, every other one without greeks; journal under {args.data_dir}")
    print(f"alerts measured: {len(latencies)} ({len(pushover.messages)} accepted by the fake Pushover)")
    print(f"frame received -> Pushover request started: {figures(latencies)}")
    print(f"  BUYs only (selection over the chain): {figures(buys)}")
    print(f"  SELLs only (no selection): {figures(sells)}")
    print(f"quote received (Q event) -> SELL request started: {figures(streamed_sells)}")


def figures(latencies: list[float]) -> str:
    """p50, p99 and max of a list of milliseconds."""
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return f"p50 {statistics.median(ordered):.2f} ms, p99 {p99:.2f} ms, max {ordered[-1]:.2f} ms"


if __name__ == "__main__":
    main()
