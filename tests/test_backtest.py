"""Backtests: statistics, sweeps equal single runs, no look-ahead, history reconstruction, charts."""

from __future__ import annotations

import csv
import datetime
import gzip
import io
import json
import math
import os
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from builders import calendar
from conftest import short_script

from backtest import Io, main
from backtest_report import compute_stats, old_quote_warnings, write_trades_csv
from backtest_run import BacktestResult, DayResult, run_backtest, run_day
from config import Rules
from contract_selector import SECONDS_PER_YEAR, bs_call_price, select_contract
from history import fetch_history
from market_calendar import ny_ms
from pnl_tracker import Journal, TradeRow
from polygon_client import occ_ticker, parse_chain_page
from sim.market import SyntheticMarket
from sweep import parse_sweep, resolve_settings, run_sweep, sweep_cells
from tape import TapeReader

RULES = Rules()


def journal() -> Journal:
    return Journal(Path(":memory:"))


def trade(n: int, pnl: float, reason: str) -> TradeRow:
    return TradeRow(
        f"2025-10-02-{n:02d}",
        "2025-10-02",
        "O:IWM251002C00242000",
        1,
        1.0,
        1.0 + pnl / 100,
        n * 1000,
        n * 1000 + 500,
        reason,
        1.5,
        pnl,
        pnl,
    )


def test_statistics_of_a_hand_made_trade_list():
    trades = [
        trade(1, 50.0, "VWAP persistence"),
        trade(2, -20.0, "Stop loss"),
        trade(3, 30.0, "Hard giveback"),
        trade(4, -40.0, "Stop loss"),
        trade(5, 0.0, "Time stop"),
        trade(6, 25.0, "VWAP persistence"),
    ]
    stats = compute_stats(trades)
    assert (stats.trades, stats.wins, stats.losses) == (6, 3, 3)
    assert stats.win_rate_pct == 50.0
    assert stats.avg_win == 35.0  # (50 + 30 + 25) / 3
    assert stats.avg_loss == -20.0  # (-20 - 40 + 0) / 3: a $0.00 trade is a loss
    assert stats.expectancy == 7.5  # 45 / 6
    assert stats.profit_factor == pytest.approx(105 / 60, abs=1e-12)
    assert stats.max_drawdown == 40.0  # equity 50, 30, 60, 20, 20, 45: peak 60 down to 20
    assert stats.total_pnl == 45.0
    assert stats.exits_by_reason == {
        "Stop loss": 2,
        "VWAP persistence": 2,
        "Hard giveback": 1,
        "Time stop": 1,
    }
    assert list(stats.exits_by_reason) == ["Stop loss", "VWAP persistence", "Hard giveback", "Time stop"]


def test_statistics_without_losses_or_trades():
    only_wins = compute_stats([trade(1, 10.0, "Time stop"), trade(2, 5.5, "Time stop")])
    assert only_wins.profit_factor == math.inf
    assert only_wins.avg_loss is None and only_wins.max_drawdown == 0.0 and only_wins.total_pnl == 15.5
    empty = compute_stats([])
    assert (empty.trades, empty.win_rate_pct, empty.profit_factor, empty.expectancy) == (0, None, None, None)
    drawdown_from_start = compute_stats([trade(1, -12.5, "Stop loss"), trade(2, 2.5, "Time stop")])
    assert drawdown_from_start.max_drawdown == 12.5


def test_sweep_cells_are_the_grid_in_order_each_validated():
    axes = parse_sweep(["MAX_GIVEBACK_PERCENT=25, 35", "VWAP_EXIT_BLOCKS=1,2"])
    cells = sweep_cells(axes, {"STOP_LOSS_PERCENT": "12"}, environ={"STOP_LOSS_PERCENT": "99"}, env_file=None)
    assert [c.params for c in cells] == [
        (("MAX_GIVEBACK_PERCENT", "25"), ("VWAP_EXIT_BLOCKS", "1")),
        (("MAX_GIVEBACK_PERCENT", "25"), ("VWAP_EXIT_BLOCKS", "2")),
        (("MAX_GIVEBACK_PERCENT", "35"), ("VWAP_EXIT_BLOCKS", "1")),
        (("MAX_GIVEBACK_PERCENT", "35"), ("VWAP_EXIT_BLOCKS", "2")),
    ]
    assert [(c.rules.max_giveback_percent, c.rules.vwap_exit_blocks) for c in cells] == [
        (25.0, 1),
        (25.0, 2),
        (35.0, 1),
        (35.0, 2),
    ]
    assert {c.rules.stop_loss_percent for c in cells} == {12.0}, "--set beats the environment"


def test_each_sweep_cell_equals_its_single_run(short_tapes):
    cells = sweep_cells(
        parse_sweep(["MAX_GIVEBACK_PERCENT=35", "VWAP_EXIT_BLOCKS=1,2"]), {}, environ={}, env_file=None
    )
    ranked = run_sweep(short_tapes, cells, workers=2)
    assert [r.params for r in ranked] == [cells[0].params, cells[1].params], "ranked by total P&L"
    assert ranked[0].stats.total_pnl > ranked[1].stats.total_pnl, "the grid matters on these days"
    rules_of = {c.params: c.rules for c in cells}
    for cell in ranked:
        # Exit rules do not move the sessions' cut-offs, so the default rules' calendar is the same calendar.
        single = run_backtest(short_tapes, rules_of[cell.params], calendar=calendar(RULES))
        assert cell.trades == single.trades
        assert cell.stats == compute_stats(single.trades)
        assert {t.session_date for t in cell.trades} == {"2025-10-06", "2025-10-07"}


def raw_lines(tape: Path) -> list[str]:
    with gzip.open(tape, "rt") as handle:
        return handle.read().splitlines()


def test_decisions_on_any_prefix_equal_the_full_day_up_to_the_cut(short_tapes, tmp_path):
    tape = short_tapes[0]
    full = run_day(tape, RULES, calendar(RULES), journal())
    assert len(full.trades) >= 2
    lines = raw_lines(tape)
    times = [json.loads(line)["t"] for line in lines]
    first, second = full.trades[0], full.trades[1]
    cuts = [first.entry_ms + 1, (first.entry_ms + first.exit_ms) // 2, second.entry_ms + 2_500]
    for n, cut in enumerate(cuts):
        keep = sum(1 for t in times if t < cut)
        prefix = tmp_path / f"cut{n}" / tape.name
        prefix.parent.mkdir()
        with gzip.open(prefix, "wt") as handle:
            handle.write("\n".join(lines[:keep]) + "\n")
        last_t = times[keep - 1]
        part = run_day(prefix, RULES, calendar(RULES), journal())
        assert part.alerts == tuple(a for a in full.alerts if a.at_ms <= last_t)
        assert part.trades == tuple(t for t in full.trades if t.exit_ms <= last_t)
        assert part.prices == full.prices[: len(part.prices)]
        assert any(a.kind == "BUY" for a in part.alerts)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_cli_writes_the_report_with_charts_of_the_expected_size(short_tapes, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    for earlier in ("day-2020-01-02.png", "sweep.csv", "sweep.json"):  # an earlier, longer run's files
        (out / earlier).write_text("old")
    (out / "my-notes.txt").write_text("mine")
    stdout, stderr = io.StringIO(), io.StringIO()
    environ = {"DATA_DIR": str(tmp_path / "data")}
    args = [str(short_tapes[0].parent), "--out", str(out), "--workers", "2"]
    status = main(args, Io(stdout, stderr, environ=environ, env_file=None))
    assert status == 0
    assert "decoding tapes [####################] 2/2" in stderr.getvalue()
    assert len(list((tmp_path / "data" / "decoded").glob("*.decoded"))) == 2
    printed = stdout.getvalue()
    assert "entry at the ask, exit at the bid" in printed and "2025-10-07" in printed
    assert "days [####################] 2/2" in stderr.getvalue()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["entry_fill"] == "ask" and summary["exit_fill"] == "bid"
    assert summary["reconstructed"] is False
    assert [d["session_date"] for d in summary["days"]] == ["2025-10-06", "2025-10-07"]
    rows = list(csv.DictReader((out / "trades.csv").open()))
    assert summary["stats"]["trades"] == len(rows) == sum(d["trades"] for d in summary["days"]) > 0
    assert summary["stats"]["total_pnl"] == round(sum(float(r["pnl_dollars"]) for r in rows), 2)
    assert {r["session_date"] for r in rows} <= {"2025-10-06", "2025-10-07"}
    assert png_size(out / "equity.png") == (1000, 400)
    for day in ("2025-10-06", "2025-10-07"):
        chart = out / f"day-{day}.png"
        assert png_size(chart) == (1200, 700) and chart.stat().st_size > 10_000
    kept = sorted(path.name for path in out.iterdir())
    assert kept == ["day-2025-10-06.png", "day-2025-10-07.png", "equity.png", "my-notes.txt", "summary.json",
                    "trades.csv"], "the report folder is this run's alone; other files are left"  # fmt: skip

    again = tmp_path / "again"
    rerun_err = io.StringIO()
    args = [str(short_tapes[0].parent), "--out", str(again), "--no-charts"]
    assert main(args, Io(io.StringIO(), rerun_err, environ=environ, env_file=None)) == 0
    assert "decoding tapes" not in rerun_err.getvalue(), "the second run reads the cached decoded tapes"
    assert (again / "trades.csv").read_text() == (out / "trades.csv").read_text()


def test_cli_refuses_unknown_rules_and_bad_cells(short_tapes, tmp_path):
    err = io.StringIO()
    quiet = Io(io.StringIO(), err, environ={}, env_file=None)
    assert main([str(short_tapes[0]), "--set", "NOT_A_RULE=1"], quiet) == 2
    assert "NOT_A_RULE: not a rule" in err.getvalue()
    assert main([str(short_tapes[0]), "--sweep", "MAX_GIVEBACK_PERCENT=10,30"], quiet) == 2
    assert "cell MAX_GIVEBACK_PERCENT=10: TIGHTEN_GIVEBACK_PERCENT must not exceed" in err.getvalue()
    assert main([str(short_tapes[0]), str(short_tapes[0])], quiet) == 2
    assert "one run takes one tape per day" in err.getvalue()
    # 4 x 20 values: 160,000 cells sat silent for hours before its first line.
    values = ",".join(str(v) for v in range(10, 30))
    grid = [
        f"--sweep={name}={values}"
        for name in ("STOP_LOSS_PERCENT", "COOLDOWN_SECONDS", "CONTRACTS", "VOLUME_MIN_BARS")
    ]
    assert main([str(short_tapes[0]), *grid], quiet) == 2
    assert "--sweep makes 160,000 cells, over the 5,000 one run takes" in err.getvalue()


HISTORY_DAY = datetime.date(2025, 10, 6)
API_KEY = "testkey123"
STRIKES = range(232, 249)
OPTION_VOL = 0.35


class FakeHistory:
    """Polygon history for 09:30-10:00 of one day: stock second aggs, the contracts reference, option minutes."""

    def __init__(self) -> None:
        self.market = SyntheticMarket(short_script(HISTORY_DAY, 21))
        self.open_ms = self.market.session_open_ms
        self.end_ms = self.open_ms + 30 * 60_000
        self.close_ms = self.open_ms + 23_400_000
        self.contracts = [
            {
                "cfi": "OCASPS",
                "contract_type": "call",
                "exercise_style": "american",
                "expiration_date": HISTORY_DAY.isoformat(),
                "shares_per_contract": 100,
                "strike_price": strike,
                "ticker": occ_ticker("IWM", HISTORY_DAY, "call", strike),
                "underlying_ticker": "IWM",
            }
            for strike in STRIKES
        ]
        self.minutes = {c["ticker"]: self._minutes(c["strike_price"]) for c in self.contracts}
        self.requests: list[str] = []
        self.rate_limited = False

    def _minutes(self, strike: float) -> list[dict]:
        bars = []
        for i, start in enumerate(range(self.open_ms, self.end_ms, 60_000)):
            end = start + 60_000
            years = (self.close_ms - end) / 1000 / SECONDS_PER_YEAR
            close = round(bs_call_price(self.market.spot_at(end), strike, years, OPTION_VOL), 2)
            close = max(close, 0.01)
            bars.append(
                {"v": 150 + i, "vw": close, "o": close, "c": close, "h": close, "l": close, "t": start}
            )
        return bars

    def answer(self, path: str) -> tuple[int, dict, dict[str, str]]:
        self.requests.append(path)
        parts = urlsplit(path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/v3/reference/options/contracts":
            if not self.rate_limited:
                self.rate_limited = True
                return (
                    429,
                    {"status": "ERROR", "error": "You've exceeded the maximum requests"},
                    {"Retry-After": "2"},
                )
            return 200, self._page(parts.path, query, self.contracts, 5), {}
        segments = parts.path.split("/")
        if parts.path.startswith("/v2/aggs/ticker/") and len(segments) == 10:
            sym, span = segments[4], segments[7]
            if span == "second":
                rows = self.market.aggs(sym, self.open_ms, self.end_ms - 1).get("results", [])
                return 200, self._page(parts.path, query, rows, 1000), {}
            if sym.startswith("O:"):
                return 200, {"status": "OK", "results": self.minutes.get(sym, []), "ticker": sym}, {}
            return 200, {"status": "OK", "resultsCount": 0, "ticker": sym}, {}
        if parts.path.startswith("/v3/quotes/"):  # a plan without option quotes
            return 403, {"status": "NOT_AUTHORIZED", "message": "You are not entitled to this data."}, {}
        return 404, {"status": "NOT_FOUND"}, {}

    def _page(self, path: str, query: dict, rows: list, size: int) -> dict:
        start = int(query.get("cursor", "0"))
        body = {"status": "OK", "request_id": f"r{start}", "results": rows[start : start + size]}
        if start + size < len(rows):
            body["next_url"] = f"https://api.polygon.io{path}?cursor={start + size}"
        return body


@pytest.fixture(scope="module")
def history_server() -> Iterator[tuple[str, FakeHistory]]:
    history = FakeHistory()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                status, body, headers = 401, {"status": "ERROR", "error": "Unknown API Key"}, {}
            else:
                status, body, headers = history.answer(self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", history
    server.shutdown()
    server.server_close()


def test_fetch_rebuilds_a_day_from_rest_history_and_it_replays(history_server, tmp_path):
    url, history = history_server
    env = {"POLYGON_API_KEY": API_KEY, "POLYGON_REST_URL": url, "DATA_DIR": str(tmp_path / "data")}
    sleeps: list[float] = []
    stdout = io.StringIO()
    cli = Io(stdout, io.StringIO(), environ=env, env_file=None, sleep=sleeps.append)
    args = ["--fetch", HISTORY_DAY.isoformat(), "--out", str(tmp_path / "report"), "--no-charts"]
    assert main(args, cli) == 0
    assert sleeps == [2.0], "the 429 was retried after its Retry-After"
    paths = [urlsplit(p).path for p in history.requests]
    assert paths.count("/v2/aggs/ticker/IWM/range/1/second/2025-10-06/2025-10-06") == 2, "two pages"
    assert paths.count("/v3/reference/options/contracts") == 1 + 4, "one 429, then four pages"
    assert sum(p.startswith("/v2/aggs/ticker/O:IWM251006C") for p in paths) == len(STRIKES)
    assert sum(p.startswith("/v3/quotes/") for p in paths) == 1, "the 403 falls back at once"
    assert stdout.getvalue().count("plan does not include option quotes") == 1

    tape = tmp_path / "data" / "history" / "2025-10-06.jsonl.gz"
    assert TapeReader(tape).meta["reconstructed"] is True
    assert TapeReader(tape).meta["option_quotes"] == "minute"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["reconstructed"] is True and summary["reconstructed_days"] == ["2025-10-06"]
    assert summary["minute_bar_approximation"] is True and "minute-bar approximation" in summary["data"]
    assert summary["days"][0]["source"] == "reconstructed (minute)"
    assert "reconstructed (minute)" in stdout.getvalue()
    assert "minute-bar approximation" in stdout.getvalue()

    day = run_day(tape, RULES, calendar(RULES), journal())
    assert day.bad_lines == 0 and day.reconstructed
    assert day.bars == len(history.market.aggs("IWM", history.open_ms, history.end_ms - 1)["results"])
    assert day.chains == (23_400 + 300) // 10, "a chain every 10 s from 09:25 to the close"
    check_no_look_ahead(tape, history)

    requests_before, first_build = len(history.requests), tape.read_bytes()
    settings = resolve_settings({}, environ=env, env_file=None)
    quiet = io.StringIO()
    assert fetch_history(settings, HISTORY_DAY, HISTORY_DAY, progress_stream=quiet) == [tape], "kept"
    tape.unlink()
    assert fetch_history(settings, HISTORY_DAY, HISTORY_DAY, progress_stream=quiet, out=quiet) == [tape]
    asked_again = [urlsplit(p).path for p in history.requests[requests_before:]]
    assert asked_again == ["/v3/quotes/O:IWM251006C00232000"], "only the refused quotes are asked again"
    assert tape.read_bytes() == first_build


def check_no_look_ahead(tape: Path, history: FakeHistory) -> None:
    """Bars arrive after their second; each quote is the close of the newest minute that had ended."""
    selectable = 0
    for line in TapeReader(tape):
        if line.kind == "ws":
            assert all(event["e"] <= line.t for event in line.payload)
            continue
        if line.kind != "rest" or not line.path.startswith("/v3/snapshot/options/IWM?"):
            continue
        at_ms = line.t - 300
        for result in line.payload["results"]:
            quote = result.get("last_quote")
            minutes = history.minutes[result["details"]["ticker"]]
            newest = [m for m in minutes if m["t"] + 60_000 <= at_ms]
            if quote is None:
                assert not newest or at_ms - newest[-1]["t"] - 60_000 >= 5 * 60_000
                continue
            assert quote["midpoint"] == newest[-1]["c"]
            assert quote["last_updated"] == at_ms * 1_000_000
        if at_ms == history.open_ms + 15 * 60_000:
            chain = parse_chain_page(line.payload).quotes
            spot = history.market.spot_at(line.t - 1250)
            choice = select_contract(
                chain,
                rules=RULES,
                session_date="2025-10-06",
                now_ms=line.t,
                spot=spot,
                session_close_ms=history.close_ms,
            )
            selectable += choice.chosen is not None
    assert selectable == 1, "default rules find a contract in a reconstructed chain"


def test_fetch_stops_at_a_rejected_key(history_server, tmp_path):
    url, history = history_server
    env = {"POLYGON_API_KEY": "wrongkey99", "POLYGON_REST_URL": url, "DATA_DIR": str(tmp_path / "data")}
    stdout, stderr = io.StringIO(), io.StringIO()
    args = ["--fetch", "2025-10-06", "--to", "2025-10-08", "--out", str(tmp_path / "report")]
    assert main(args, Io(stdout, stderr, environ=env, env_file=None, sleep=lambda _s: None)) == 1
    assert (
        "2025-10-06: not rebuilt: /v2/aggs/ticker/IWM/range/1/second/2025-10-06/2025-10-06"
        in stdout.getvalue()
    )
    assert "HTTP 401 Unknown API Key" in stdout.getvalue()
    assert "2025-10-07" not in stdout.getvalue(), "a rejected key stops the fetch"
    assert not (tmp_path / "data" / "history").exists()


def test_an_unusable_data_dir_is_a_settings_problem_not_a_traceback(tmp_path):
    (tmp_path / "a-file").write_text("not a folder\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    environ = {"DATA_DIR": str(tmp_path / "a-file")}
    status = main(["--synthetic", "1"], Io(stdout, stderr, environ=environ, env_file=None))
    assert status == 2
    assert "DATA_DIR=" in stderr.getvalue() and "is a file, not a folder" in stderr.getvalue()


def test_a_file_that_is_not_a_tape_is_named_so_not_empty(tmp_path):
    text = tmp_path / "notes.md"
    text.write_text("# notes\nnot a tape line\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    status = main([str(text)], Io(stdout, stderr, environ={"DATA_DIR": str(tmp_path / "d")}, env_file=None))
    assert status == 2
    assert "notes.md: not a tape: no valid tape line in it (2 unreadable)" in stderr.getvalue()


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--fetch", "2025-10-04", "--to", "2025-10-05"], "No trading session from 2025-10-04 to 2025-10-05"),
    ],  # fmt: skip
)
def test_a_fetch_range_without_a_session_says_why_and_asks_nothing(tmp_path, argv, said):
    stdout, stderr = io.StringIO(), io.StringIO()
    environ = {
        "DATA_DIR": str(tmp_path / "d"),
        "POLYGON_API_KEY": "abcdefgh1234",
        "POLYGON_REST_URL": "http://127.0.0.1:9",
    }
    status = main(argv, Io(stdout, stderr, environ=environ, env_file=None, sleep=pytest.fail))
    assert status == 2 and said in stderr.getvalue()


def test_a_tapes_folder_not_recorded_yet_says_where_tapes_come_from(tmp_path):
    """The README's first backtest command on a fresh clone said only "data/tapes: no such tape"."""
    stderr = io.StringIO()
    status = main([str(tmp_path / "data" / "tapes")], Io(io.StringIO(), stderr, environ={}, env_file=None))
    assert status == 2
    assert "tapes: no such tape or folder (the daemon records tapes under DATA_DIR/tapes" in stderr.getvalue()


def test_synthetic_days_that_cannot_be_written_are_one_line_not_a_traceback(tmp_path):
    """DATA_DIR passed its access check, then making its synthetic folder failed: a traceback, exit 1."""
    data = tmp_path / "d"
    data.mkdir()
    (data / "synthetic").write_text("a file where the folder goes")
    stdout, stderr = io.StringIO(), io.StringIO()
    args = ["--synthetic", "1", "--workers", "1", "--out", str(tmp_path / "r")]
    status = main(args, Io(stdout, stderr, environ={"DATA_DIR": str(data)}, env_file=None))
    assert status == 2
    assert f"The synthetic days cannot be written under {data / 'synthetic'}" in stderr.getvalue()


def test_tapes_run_in_session_date_order_and_holdout_keeps_the_latest_dates(short_tapes, tmp_path):
    out = tmp_path / "report"
    stdout = io.StringIO()
    later_first = [str(short_tapes[1]), str(short_tapes[0])]
    args = [*later_first, "--holdout", "1", "--out", str(out), "--no-cache", "--no-charts", "--workers", "1"]
    assert main(args, Io(stdout, io.StringIO(), environ={}, env_file=None)) == 0
    assert (
        "Held out: the last 1 of 2 day(s), 2025-10-07; in sample: 1 day(s), 2025-10-06" in stdout.getvalue()
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [d["session_date"] for d in summary["days"]] == ["2025-10-06", "2025-10-07"]
    assert summary["holdout"]["held_out_days"] == ["2025-10-07"]
    in_order = run_backtest(short_tapes, RULES, calendar=calendar(RULES))
    rows = list(csv.DictReader((out / "trades.csv").open()))
    assert [r["trade_id"] for r in rows] == [t.trade_id for t in in_order.trades]


def test_trades_csv_keeps_sub_penny_fills_so_its_prices_give_its_pnl(tmp_path):
    fills = [(1.2345, 1.5678, 2), (0.4449, 0.3951, 1), (2.5, 2.75, 1)]
    trades = []
    for n, (entry, exit_, contracts) in enumerate(fills, start=1):
        pnl = round((exit_ - entry) * 100 * contracts, 2)
        percent = round((exit_ / entry - 1) * 100, 2)
        trades.append(
            TradeRow(f"2025-10-02-{n:02d}", "2025-10-02", "O:IWM251002C00242000", contracts, entry, exit_,
                     n * 1000, n * 1000 + 500, "Stop loss", 1.61234, pnl, percent)
        )  # fmt: skip
    write_trades_csv(tmp_path / "trades.csv", BacktestResult(RULES, (), tuple(trades)))
    rows = list(csv.DictReader((tmp_path / "trades.csv").open()))
    for row, (entry, exit_, _contracts) in zip(rows, fills, strict=True):
        assert (float(row["entry_price"]), float(row["exit_price"])) == (entry, exit_)
        e, x, n = float(row["entry_price"]), float(row["exit_price"]), int(row["contracts"])
        assert f"{(x - e) * 100 * n:.2f}" == row["pnl_dollars"], (
            "money stays at cents, from the CSV's own fills"
        )
        assert f"{(x / e - 1) * 100:.2f}" == row["pnl_percent"]
    assert rows[2]["entry_price"] == "2.50" and rows[0]["peak"] == "1.61234"


def test_a_damaged_tape_is_named_in_the_report_with_its_lines(short_tapes, tmp_path):
    data = short_tapes[0].read_bytes()
    cut = tmp_path / "tapes" / short_tapes[0].name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) * 2 // 3])  # a gzip cut short, as a copy interrupted mid-way
    out, stdout = tmp_path / "report", io.StringIO()
    args = [str(cut), str(short_tapes[1]), "--out", str(out), "--no-cache", "--no-charts", "--workers", "1"]
    assert main(args, Io(stdout, io.StringIO(), environ={}, env_file=None)) == 0, (
        "still a run: the lines are data"
    )
    summary = json.loads((out / "summary.json").read_text())
    day = summary["days"][0]
    assert day["bad_lines"] == 1 and day["lines"] > 100
    warning = [line for line in stdout.getvalue().splitlines() if "is damaged" in line]
    assert len(warning) == 1 and summary["damaged_tapes"] == warning
    assert warning[0].startswith(f"Warning: {cut.name} (2025-10-06) is damaged: {day['lines']} line(s) read,")
    assert "1 unreadable" in warning[0] and "cut short" in warning[0]


def report_of(tapes: list[Path], out: Path, *extra: str) -> str:
    """backtest.py on `tapes` into `out` (no cache, no charts, one worker): its stdout, once it exits 0."""
    stdout = io.StringIO()
    args = [*map(str, tapes), "--out", str(out), "--no-cache", "--no-charts", "--workers", "1", *extra]
    assert main(args, Io(stdout, io.StringIO(), environ={}, env_file=None)) == 0
    return stdout.getvalue()


def test_a_sweep_says_what_the_single_run_says_of_damaged_and_part_days(short_tapes, tmp_path):
    """A sweep over a damaged tape ranked its cells on a part day without a word: the warnings the single
    run prints were missing from its output and from sweep.json (an audit's find)."""
    data = short_tapes[0].read_bytes()
    cut = tmp_path / "tapes" / short_tapes[0].name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) * 2 // 3])
    said = {}
    for name, extra in (("single", []), ("sweep", ["--sweep", "STOP_LOSS_PERCENT=15,20"])):
        lines = report_of([cut, short_tapes[1]], tmp_path / name, *extra).splitlines()
        # Exits on old quotes are a single run's, per trade (a sweep's cells keep their trades only).
        said[name] = [line for line in lines if line.startswith("Warning:") and "exited at a bid" not in line]
        said[f"{name} open"] = [line.split()[1].strip(":") for line in lines if line.startswith("Note:")]
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert any("is damaged" in w for w in said["single"]) and said["sweep"] == said["single"]
    assert summary["damaged_tapes"] + summary["incomplete_days"] == said["sweep"]
    assert said["single open"] and said["sweep open"] == said["single open"]
    assert all(note.startswith("Note: 2025-10-0") for note in summary["open_at_end"])
    assert len(summary["open_at_end"]) == len(said["sweep open"])


def test_a_hole_in_a_tape_is_said_and_an_exit_on_an_old_quote_is_marked_an_estimate(short_tapes, tmp_path):
    """A tape without a line from 13:30 to 15:58 sold at the 15:55 time stop on a bid 145 min old: the
    replay's SELL said "Old price", the backtest showed an ordinary fill and no word of the hole."""
    holed = tmp_path / "tapes" / short_tapes[0].name
    holed.parent.mkdir()
    start, end = (
        ny_ms(datetime.date(2025, 10, 6), datetime.time(9, 40)),
        ny_ms(datetime.date(2025, 10, 6), datetime.time(9, 50)),
    )
    kept = [line for line in raw_lines(short_tapes[0]) if not start <= json.loads(line)["t"] < end]
    holed.write_bytes(gzip.compress("\n".join(kept).encode() + b"\n"))
    out = tmp_path / "report"
    printed = report_of([holed], out)
    hole = [
        w for w in json.loads((out / "summary.json").read_text())["incomplete_days"] if "has no line" in w
    ]
    assert hole == [
        f"Warning: {holed.name} (2025-10-06) has no line from 09:39:59 to 09:50:00 (10 min) in session: what"
        " was decided after it rests on the prices from before it."
    ]
    assert hole[0] in printed

    trade = TradeRow(
        "2025-10-06-01",
        "2025-10-06",
        "O:IWM251006C00242000",
        1,
        1.02,
        1.30,
        1,
        2,
        "Time stop",
        1.31,
        28.0,
        27.45,
    )
    day = DayResult(
        "t.jsonl.gz", "2025-10-06", False, (trade,), (), (), 0, 0, 0, old_exits=(("2025-10-06-01", 8700),)
    )
    result = BacktestResult(RULES, (day,), (trade,))
    write_trades_csv(tmp_path / "trades.csv", result)
    (row,) = csv.DictReader((tmp_path / "trades.csv").open())
    assert row["exit_quote_age_s"] == "8700"
    assert old_quote_warnings(result.days) == [
        "Warning: trade 2025-10-06-01 (2025-10-06) exited at a bid no quote had renewed for 145 min: its exit"
        " price and P&L are estimates."
    ]


def test_the_reports_say_that_no_commission_fee_or_slippage_is_counted(short_tapes, tmp_path):
    """Win rate and profit factor read better without costs: the reports now say they are not counted."""
    for name, extra in (("single", []), ("sweep", ["--sweep", "STOP_LOSS_PERCENT=15,20"])):
        printed = report_of([short_tapes[0]], tmp_path / name, *extra)
        saved = json.loads((tmp_path / name / ("sweep.json" if extra else "summary.json")).read_text())
        assert "No commission, fee or slippage is counted" in printed
        assert "No commission, fee or slippage is counted" in saved["fills"]


def test_a_tape_that_stops_early_or_holds_no_chain_is_said_to_be_no_whole_day(short_tapes, tmp_path):
    """A recorder that died at 10:25 leaves a tape that reads cleanly; a day without a chain trades nothing.
    Both had been reported as ordinary days."""
    no_chain = tmp_path / "tapes" / short_tapes[0].name
    no_chain.parent.mkdir()
    kept = [line for line in raw_lines(short_tapes[0]) if '"/v3/snapshot/options/' not in line]
    no_chain.write_bytes(gzip.compress("\n".join(kept).encode() + b"\n"))
    out, stdout = tmp_path / "report", io.StringIO()
    args = [
        str(no_chain),
        str(short_tapes[1]),
        "--out",
        str(out),
        "--no-cache",
        "--no-charts",
        "--workers",
        "1",
    ]
    assert main(args, Io(stdout, io.StringIO(), environ={}, env_file=None)) == 0
    summary = json.loads((out / "summary.json").read_text())
    said = summary["incomplete_days"]
    assert said == [line for line in stdout.getvalue().splitlines() if line.startswith("Warning:")]
    assert (
        said[0]
        == f"Warning: {no_chain.name} (2025-10-06) holds no option chain: no entry was possible on this day."
    )
    assert [w.split(" stops at ")[0] for w in said[1:]] == [
        f"Warning: {no_chain.name} (2025-10-06)",
        f"Warning: {short_tapes[1].name} (2025-10-07)",
    ]
    assert all(
        "before the 16:00:00 close: this day's figures cover only what was recorded." in w for w in said[1:]
    )
    assert summary["days"][0]["chains"] == 0 and summary["days"][0]["pnl"] == 0


def test_a_tape_of_a_day_without_a_session_is_said_to_be_no_trading_day(short_tapes, tmp_path):
    """A closed date's tape (here by MARKET_CLOSED_DATES) read as an ordinary $0.00 day: its real trades
    vanished without a word. It still counts (as the $0.00 day it is), now said to be one."""
    out, stdout = tmp_path / "report", io.StringIO()
    args = [str(short_tapes[0]), "--out", str(out), "--no-cache", "--no-charts", "--workers", "1"]
    environ = {"MARKET_CLOSED_DATES": "2025-10-06"}
    assert main(args, Io(stdout, io.StringIO(), environ=environ, env_file=None)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["incomplete_days"] == [
        f"Warning: {short_tapes[0].name} (2025-10-06) is of a day with no session (a weekend, a holiday or a "
        "date in MARKET_CLOSED_DATES): no entry was possible, so its $0.00 is no result of the rules."
    ]
    assert summary["incomplete_days"][0] in stdout.getvalue() and summary["days"][0]["pnl"] == 0


def test_a_dotenv_named_pipe_is_read_once_for_every_sweep_cell(tmp_path):
    """Each cell read `.env` again: a secret manager's pipe gives its text once, so the second cell waited."""
    pipe = tmp_path / ".env"
    os.mkfifo(pipe)

    def serve_once() -> None:
        with open(pipe, "w", encoding="utf-8") as out:
            out.write("MAX_GIVEBACK_PERCENT=30\n")

    writer = threading.Thread(target=serve_once, daemon=True)
    writer.start()
    stdout, stderr = io.StringIO(), io.StringIO()
    args = ["--synthetic", "1", "--sweep", "TIGHTEN_GIVEBACK_PERCENT=10,20,40"]
    status = main(args, Io(stdout, stderr, environ={"DATA_DIR": str(tmp_path / "d")}, env_file=pipe))
    assert status == 2 and not writer.is_alive()
    assert "cell TIGHTEN_GIVEBACK_PERCENT=40: TIGHTEN_GIVEBACK_PERCENT must not exceed" in stderr.getvalue()
    assert "(40 > 30)" in stderr.getvalue() and "named pipe" not in stderr.getvalue()
