"""Sweeps on textured synthetic days, and --holdout: held-out days never reach the ranking (issue 12)."""

from __future__ import annotations

import csv
import datetime
import io
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from test_day_runner import tape_cut_mid_trade

from backtest import Cell, Io, main
from backtest_report import compute_stats, stats_json
from backtest_run import run_backtest
from config import ConfigError, Rules
from holdout import parse_holdout
from market_calendar import ny_ms
from sim.market import DEMO_STREAM_QUOTES, SyntheticMarket, outcome_script, write_tape
from sweep import parse_sweep, run_sweep, sweep_cells

EXIT_GRID = ["STOP_LOSS_PERCENT=5,10,15", "MAX_GIVEBACK_PERCENT=20,25,30"]
DAYS = (datetime.date(2025, 3, 3), datetime.date(2025, 3, 4), datetime.date(2025, 3, 5))
END = datetime.time(10, 45)
# The last burst fails, so no position is open at the tape's end and the days stay independent.
OUTCOMES = ("run", "shakeout", "stall", "reversal", "fade", "false_breakout")


def textured_tape(folder: Path, day: datetime.date, seed: int) -> Path:
    """A short textured day (09:28-10:45): a burst of each outcome every 10 minutes, four streamed calls."""
    folder.mkdir(parents=True, exist_ok=True)
    market = SyntheticMarket(outcome_script(day, seed, OUTCOMES, every_s=600))
    path = folder / f"{day.isoformat()}.jsonl.gz"
    return write_tape(market, path, end_ms=ny_ms(day, END), stream_quotes=DEMO_STREAM_QUOTES)


@pytest.fixture(scope="module")
def textured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three seeded textured days, and the same three with the last one replaced by another seed's."""
    folder = tmp_path_factory.mktemp("textured")
    jobs = [(folder / "a", day, 1 + n) for n, day in enumerate(DAYS)] + [(folder / "b", DAYS[-1], 99)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        *days, other = pool.map(textured_tape, *zip(*jobs, strict=True))
    return {"days": days, "other_last": [*days[:-1], other]}


def exit_cells() -> list:
    return sweep_cells(parse_sweep(EXIT_GRID), {}, environ={}, env_file=None)


def test_a_sweep_of_exit_rules_on_textured_days_gives_different_results(textured):
    ranked = run_sweep(textured["days"], exit_cells(), workers=2)
    cell = {
        (dict(r.params)["STOP_LOSS_PERCENT"], dict(r.params)["MAX_GIVEBACK_PERCENT"]): r.stats for r in ranked
    }
    totals = {key: stats.total_pnl for key, stats in cell.items()}
    # On the smooth market all nine cells were equal; here each rule moves the total on its own.
    assert len(set(totals.values())) >= 7, totals
    for value in ("5", "10", "15"):
        assert len({totals[(value, giveback)] for giveback in ("20", "25", "30")}) > 1, totals
    for value in ("20", "25", "30"):
        assert len({totals[(stop, value)] for stop in ("5", "10", "15")}) > 1, totals
    assert len({totals[(stop, "25")] for stop in ("5", "10", "15")}) == 3, totals
    assert {"Stop loss", "VWAP persistence"} <= set(cell[("5", "25")].exits_by_reason)
    # The giveback changes which rule sells: at 20 % the hard giveback fires before the VWAP giveback.
    assert cell[("10", "20")].exits_by_reason.get("Hard giveback", 0) > 0
    assert "Hard giveback" not in cell[("10", "30")].exits_by_reason
    assert any(stats.losses > 0 for stats in cell.values()) and any(stats.wins > 0 for stats in cell.values())


def test_the_vwap_giveback_threshold_is_a_lever_of_its_own(textured):
    # TIGHTEN_GIVEBACK decides most exits (a pullback takes the close under its 60 s VWAP within
    # seconds), so its grid against the stop spreads the totals as widely as the stop's.
    grid = ["STOP_LOSS_PERCENT=5,10,15", "TIGHTEN_GIVEBACK_PERCENT=10,20,30"]
    ranked = run_sweep(
        textured["days"], sweep_cells(parse_sweep(grid), {}, environ={}, env_file=None), workers=2
    )
    totals = {r.params: r.stats.total_pnl for r in ranked}
    assert len(set(totals.values())) >= 6, totals
    by_tighten = {
        dict(p)["TIGHTEN_GIVEBACK_PERCENT"]: t
        for p, t in totals.items()
        if dict(p)["STOP_LOSS_PERCENT"] == "5"
    }
    assert len(set(by_tighten.values())) == 3, totals
    exits = {r.params: r.stats.exits_by_reason for r in ranked}
    # At 30 % it equals MAX_GIVEBACK, and the hard giveback, checked first, takes those exits.
    assert all("VWAP giveback" in exits[p] for p in exits if dict(p)["TIGHTEN_GIVEBACK_PERCENT"] != "30")


def test_held_out_days_never_reach_the_ranking(textured):
    cells = exit_cells()
    first = run_sweep(textured["days"], cells, workers=2, held_out=1)
    second = run_sweep(textured["other_last"], cells, workers=2, held_out=1)
    assert [r.params for r in first] == [r.params for r in second], "the same ranking, the same chosen cell"
    assert [(r.trades, r.stats) for r in first] == [(r.trades, r.stats) for r in second]
    in_sample = {t.session_date for r in first for t in r.trades}
    assert in_sample and in_sample <= {str(DAYS[0]), str(DAYS[1])}
    assert all(t.session_date == str(DAYS[2]) for r in first for t in r.out_trades)
    assert [r.out_stats for r in first] != [r.out_stats for r in second], "their out-of-sample numbers change"
    whole = {r.params: r.stats.total_pnl for r in run_sweep(textured["days"][:2], cells, workers=2)}
    assert {r.params: r.stats.total_pnl for r in first} == whole, "in sample = a run of those days alone"


def quiet(environ: dict[str, str] | None = None) -> tuple[Io, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Io(out, err, environ=environ or {}, env_file=None), out, err


def test_cli_sweep_with_holdout_reports_both_parts_and_the_held_out_days(short_tapes, tmp_path):
    report = tmp_path / "report"
    cli, out, _ = quiet()
    args = [
        str(short_tapes[0].parent),
        "--holdout",
        "1",
        "--out",
        str(report),
        "--no-cache",
        "--workers",
        "2",
    ]
    assert main([*args, "--sweep", "STOP_LOSS_PERCENT=10,20", "--sweep", "VWAP_EXIT_BLOCKS=1,2"], cli) == 0
    printed = out.getvalue()
    assert "Held out: the last 1 of 2 day(s), 2025-10-07; in sample: 1 day(s), 2025-10-06" in printed
    # The two VWAP_EXIT_BLOCKS cells trade alike on this day: the line says the grid's order chose.
    assert "Chosen on the in-sample days only (rank 1, tied with rank 2 on P&L and profit factor" in printed
    assert "in sample" in printed and "out of sample" in printed and "OOS P&L" in printed
    rows = list(csv.DictReader((report / "sweep.csv").open()))
    assert len(rows) == 4 and {"in_sample_total_pnl", "out_of_sample_total_pnl"} <= set(rows[0])
    summary = json.loads((report / "sweep.json").read_text())
    assert summary["holdout"]["held_out_days"] == ["2025-10-07"]
    assert summary["holdout"]["chosen"] == summary["cells"][0]["params"]
    ranked = [cell["in_sample"]["total_pnl"] for cell in summary["cells"]]
    assert ranked == sorted(ranked, reverse=True), "ranked on the in-sample days"
    assert all(cell["out_of_sample"]["trades"] >= 0 for cell in summary["cells"])


def test_cli_single_run_with_a_fractional_holdout_splits_its_statistics(short_tapes, tmp_path):
    report = tmp_path / "single"
    cli, out, _ = quiet()
    args = [str(short_tapes[0].parent), "--holdout", "0.5", "--out", str(report), "--no-cache", "--no-charts"]
    assert main(args, cli) == 0
    assert "Held out: the last 1 of 2 day(s), 2025-10-07" in out.getvalue()
    summary = json.loads((report / "summary.json").read_text())
    part = summary["holdout"]
    assert part["in_sample_days"] == ["2025-10-06"] and part["held_out_days"] == ["2025-10-07"]
    days = {d["session_date"]: d for d in summary["days"]}
    assert part["in_sample"]["total_pnl"] == days["2025-10-06"]["pnl"]
    assert part["out_of_sample"]["total_pnl"] == days["2025-10-07"]["pnl"]
    assert part["in_sample"]["trades"] + part["out_of_sample"]["trades"] == summary["stats"]["trades"] > 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "hold out at least 1 day"),
        ("-2", "hold out at least 1 day"),
        ("1.5", "strictly between 0 and 1"),
        ("0.0", "strictly between 0 and 1"),
        ("1.0", "strictly between 0 and 1"),
        ("abc", "expected a number of days"),
    ],
)
def test_holdout_values_out_of_range_exit_2(value, message, short_tapes, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([str(short_tapes[0]), "--holdout", value], quiet()[0])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_holdout_that_leaves_no_day_in_sample_exits_2(short_tapes, tmp_path):
    cli, _, err = quiet({"DATA_DIR": str(tmp_path / "data")})
    assert main([str(short_tapes[0].parent), "--holdout", "2", "--no-cache"], cli) == 2
    assert "holds out 2 of 2 day(s) and leaves none in sample" in err.getvalue()
    assert main([str(short_tapes[0]), "--holdout", "0.5", "--no-cache"], cli) == 2
    assert "holds out 1 of 1 day(s)" in err.getvalue()
    assert main(["--synthetic", "3", "--holdout", "5"], cli) == 2
    assert not (tmp_path / "data" / "synthetic").exists(), "refused before building any day"


def test_holdout_counts_round_a_fraction_and_keep_a_day_in_sample():
    assert parse_holdout("5").days(20) == 5
    assert parse_holdout("0.25").days(20) == 5
    assert parse_holdout("0.01").days(20) == 1, "at least one day"
    assert parse_holdout("0.6").days(3) == 2, "1.8 days round to 2"
    with pytest.raises(ValueError, match="leaves none in sample"):
        parse_holdout("0.9").days(2)
    with pytest.raises(ValueError, match="a holdout needs two days or more"):  # not "hold out at most 0"
        parse_holdout("1").days(1)


def test_single_run_holdout_splits_as_the_sweep_does(short_tapes, tmp_path):
    # The in-sample day ends with a position open; the full run closes it on the held-out day. Each
    # part is a run of its days alone (the sweep's rule), so that trade counts in neither part.
    first = tape_cut_mid_trade(short_tapes[0], tmp_path / "tapes" / short_tapes[0].name)
    tapes = [first, short_tapes[1]]
    report, (cli, out, _) = tmp_path / "single", quiet()
    args = [
        *map(str, tapes),
        "--holdout",
        "1",
        "--out",
        str(report),
        "--no-cache",
        "--no-charts",
        "--workers",
        "1",
    ]
    assert main(args, cli) == 0
    part = json.loads((report / "summary.json").read_text())["holdout"]
    [swept] = run_sweep(tapes, [Cell((), Rules())], held_out=1)
    assert part["in_sample"] == stats_json(swept.stats)
    assert swept.out_stats is not None and part["out_of_sample"] == stats_json(swept.out_stats)
    alone = run_backtest([first], Rules())
    assert part["in_sample"] == stats_json(compute_stats(alone.trades)) and alone.days[0].open_at_end
    carried = run_backtest(tapes, Rules()).days[1].trades
    assert any(t.session_date == "2025-10-06" for t in carried), "the full run closes it on the held-out day"
    assert "in sample" in out.getvalue() and part["rule"].startswith("each part is a run of its days alone")


def test_a_value_swept_twice_or_a_rule_both_set_and_swept_is_refused(short_tapes):
    """A repeated value ran the same cell twice and ranked it twice; a rule both --set and --sweep had its
    --set value replaced in every cell, without a word."""
    with pytest.raises(ConfigError, match="--sweep STOP_LOSS_PERCENT: 10 given more than once"):
        parse_sweep(["STOP_LOSS_PERCENT=10,20,10"])
    with pytest.raises(ConfigError, match="STOP_LOSS_PERCENT: both --set and --sweep give it"):
        sweep_cells(
            parse_sweep(["STOP_LOSS_PERCENT=10,20"]), {"STOP_LOSS_PERCENT": "15"}, environ={}, env_file=None
        )
    cli, out, err = quiet()
    args = [str(short_tapes[0]), "--set", "STOP_LOSS_PERCENT=15", "--sweep", "STOP_LOSS_PERCENT=10,20"]
    assert main([*args, "--no-cache"], cli) == 2 and out.getvalue() == ""
    assert "both --set and --sweep give it" in err.getvalue()


def test_a_rule_swept_twice_is_refused_not_silently_dropped(short_tapes):
    with pytest.raises(ConfigError, match="STOP_LOSS_PERCENT: given 2 times"):
        parse_sweep(["STOP_LOSS_PERCENT=10,20", "stop_loss_percent=30"])
    assert parse_sweep(["STOP_LOSS_PERCENT=10,20", "MAX_GIVEBACK_PERCENT=30"]) == [
        ("STOP_LOSS_PERCENT", ("10", "20")),
        ("MAX_GIVEBACK_PERCENT", ("30",)),
    ]
    cli, out, err = quiet()
    args = [str(short_tapes[0]), "--sweep", "STOP_LOSS_PERCENT=10,20", "--sweep", "STOP_LOSS_PERCENT=30"]
    assert main([*args, "--no-cache"], cli) == 2
    assert "--sweep STOP_LOSS_PERCENT: given 2 times" in err.getvalue() and out.getvalue() == ""
    args = [str(short_tapes[0]), "--set", "STOP_LOSS_PERCENT=10", "--set", "stop_loss_percent=20"]
    cli, out, err = quiet()
    assert main([*args, "--no-cache"], cli) == 2, "a --set given twice kept the last value silently"
    assert "--set STOP_LOSS_PERCENT: given 2 times" in err.getvalue() and out.getvalue() == ""


def test_an_out_that_is_a_file_is_refused_before_anything_runs(short_tapes, tmp_path, capsys):
    """The whole run went first, then a FileExistsError traceback lost its results."""
    taken = tmp_path / "report"
    taken.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as stopped:
        main([str(short_tapes[0]), "--out", str(taken)], quiet()[0])
    assert stopped.value.code == 2
    assert "is a file: give a folder this user can write for the report" in capsys.readouterr().err
    assert taken.read_text() == "a file, not a folder"


@pytest.mark.parametrize("out", ["/proc/alerter-report", "{file}/report"])
def test_an_out_that_cannot_be_made_is_refused_before_anything_runs(short_tapes, tmp_path, capsys, out):
    """`--out /proc/x` ran the whole backtest, then lost it to a FileNotFoundError traceback."""
    (tmp_path / "a-file").write_text("not a folder")
    out = out.format(file=tmp_path / "a-file")
    with pytest.raises(SystemExit) as stopped:
        main([str(short_tapes[0]), "--out", out], quiet()[0])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {out} " in err and "give a folder this user can write for the report" in err


def test_the_chosen_cell_line_says_when_the_in_sample_days_could_not_choose():
    """Every cell with no in-sample trade still had "Chosen on the in-sample days only (rank 1)" printed, and
    a cell tied with the next one was announced as chosen as if the days had preferred it."""
    from backtest_report import Stats, _chosen_line
    from sweep import CellResult

    def cell(value: str, trades: int, pnl: float, factor: float | None) -> CellResult:
        stats = Stats(trades, 0, 0, None, None, None, None, factor, 0.0, pnl)
        return CellResult((("STOP_LOSS_PERCENT", value),), (), stats)

    none = [cell("10", 0, 0.0, None), cell("20", 0, 0.0, None)]
    tied = [cell("10", 3, 52.0, 2.18), cell("20", 3, 52.0, 2.18), cell("30", 2, 10.0, 1.5)]
    clear = [cell("10", 3, 52.0, 2.18), cell("20", 3, 40.0, 2.18)]
    assert _chosen_line(none).startswith("No cell traded on the in-sample days: nothing to choose on")
    assert "tied with rank 2" in _chosen_line(tied) and "STOP_LOSS_PERCENT=10" in _chosen_line(tied)
    assert _chosen_line(clear) == "Chosen on the in-sample days only (rank 1): STOP_LOSS_PERCENT=10"
