"""Replays of the demo day: determinism, resume after a stop, and bad tape lines."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from builders import DAY, TICKER, at, bar, calendar, chain, engine, quote, wire_event

from config import Rules
from events import Alert
from instance_lock import replay_lock
from pnl_tracker import Journal
from replay import NotATape, check_tape, move_aside, replay_tape
from sim.pushover_server import FakePushover

RULES = Rules()


def run(tape: Path, journal_path: Path) -> tuple[list[Alert], Journal]:
    sent: list[Alert] = []
    journal = Journal(journal_path)
    replay_tape(
        tape,
        rules=RULES,
        calendar=calendar(RULES),
        journal=journal,
        on_alerts=sent.extend,
        on_log=lambda _log: None,
    )
    return sent, journal


def raw_lines(tape: Path) -> list[str]:
    with gzip.open(tape, "rt") as handle:
        return handle.read().splitlines()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def test_demo_day_is_deterministic(demo_tape, tmp_path):
    first, j1 = run(demo_tape, tmp_path / "a.sqlite3")
    second, j2 = run(demo_tape, tmp_path / "b.sqlite3")
    assert [a.message for a in first] == [a.message for a in second]
    assert [a.kind for a in first].count("BUY") >= 2
    for table in ("positions", "trades", "outbox", "meta"):
        assert j1.table_rows(table) == j2.table_rows(table)


def test_demo_has_two_round_trips_with_two_exit_reasons(demo_tape, tmp_path):
    alerts, journal = run(demo_tape, tmp_path / "j.sqlite3")
    trades = journal.trades()
    assert len(trades) >= 2 and len({t.reason for t in trades}) >= 2
    kinds = [a.kind for a in alerts if a.kind in ("BUY", "SELL")]
    assert kinds == ["BUY", "SELL"] * len(trades)
    sell = next(a for a in alerts if a.kind == "SELL")
    for field in ("Reason: ", "vs VWAP", "Peak $", "→ Now $", "P&L: ", "LIFETIME: ", "W-"):
        assert field in sell.message


def buy_line_numbers(lines: list[str], journal: Journal) -> int:
    """A line number at which the demo day holds an open position (just after the second entry)."""
    second_entry_ms = journal.table_rows("positions")[1][8]
    return next(i for i, line in enumerate(lines) if json.loads(line)["t"] > second_entry_ms + 3_000)


def test_resume_after_a_stop_gives_the_same_trades_and_no_duplicate_alert(demo_tape, tmp_path):
    one_pass, whole = run(demo_tape, tmp_path / "whole.sqlite3")
    lines = raw_lines(demo_tape)
    cut = buy_line_numbers(lines, whole)
    half = write_lines(tmp_path / "half" / demo_tape.name, lines[:cut])

    first_part, journal = run(half, tmp_path / "split.sqlite3")
    open_position = journal.restored_state("2025-10-02").position
    assert open_position is not None
    peak_at_stop = open_position.peak
    journal.close()

    rest, journal = run(demo_tape, tmp_path / "split.sqlite3")
    assert [a.dedupe_key for a in first_part + rest] == [a.dedupe_key for a in one_pass]
    assert [a.message for a in first_part + rest] == [a.message for a in one_pass]
    assert journal.table_rows("trades") == whole.table_rows("trades")
    assert journal.outbox_rows() == whole.outbox_rows()
    trade = next(t for t in journal.trades() if t.trade_id == open_position.trade_id)
    assert trade.peak >= peak_at_stop


def corrupt(lines: list[str]) -> list[str]:
    """The clean tape with bad lines slipped in after the first few hundred lines."""
    out = list(lines[:300])
    t = json.loads(lines[299])["t"]
    original = next(json.loads(line) for line in lines[1:300] if '"ev":"A"' in line and '"IWM"' in line)
    resent = {"t": t, "ws": original["ws"]}
    bad_prices = [
        {"ev": "A", "sym": "IWM", "v": 100, "o": float("nan"), "h": 1, "l": 1, "c": 1, "s": 0, "e": 1000},
        {"ev": "A", "sym": "IWM", "v": 100, "o": -1, "h": -1, "l": -1, "c": -1, "s": 1, "e": 1001},
        {"ev": "A", "sym": "IWM", "v": "lots", "o": 1, "h": 1, "l": 1, "c": 1, "s": 2, "e": 1002},
        {"ev": "A", "sym": "QQQ", "v": 100, "o": 500, "h": 500, "l": 500, "c": 500, "s": 3, "e": 1003},
    ]
    out += [
        '{"t": ' + str(t) + ', "ws": [{"ev": "A", "sym": "IW',  # truncated JSON
        json.dumps({"t": "yesterday", "ws": []}),  # wrong type
        json.dumps({"t": t, "ws": bad_prices}),
        json.dumps(resent),  # a re-sent bar
        json.dumps({"t": t, "mystery": 1}),  # unknown shape
    ]
    return out + lines[300:]


def test_bad_lines_are_counted_and_skipped_with_the_same_decisions(demo_tape, tmp_path):
    clean, _ = run(demo_tape, tmp_path / "clean.sqlite3")
    dirty_tape = write_lines(tmp_path / "dirty" / demo_tape.name, corrupt(raw_lines(demo_tape)))
    sent: list[Alert] = []
    result = replay_tape(
        dirty_tape,
        rules=RULES,
        calendar=calendar(RULES),
        journal=Journal(tmp_path / "d.sqlite3"),
        on_alerts=sent.extend,
        on_log=lambda _log: None,
    )
    assert [a.message for a in sent] == [a.message for a in clean]
    assert result.bad_lines == 3
    assert result.feed.bad_events == 3 and result.feed.ignored_events >= 1
    assert result.late_bars >= 1


def test_truncated_tape_tail_replays_what_it_can(demo_tape, tmp_path):
    data = demo_tape.read_bytes()
    cut = tmp_path / "cut" / demo_tape.name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    result = replay_tape(
        cut,
        rules=RULES,
        calendar=calendar(RULES),
        journal=None,
        on_alerts=lambda _a: None,
        on_log=lambda _log: None,
    )
    assert result.lines > 1000 and result.bad_lines >= 1


def test_a_tape_cut_short_is_said_in_the_summary_not_only_counted(demo_tape, tmp_path):
    """The summary said "(1 unreadable)" of a tape cut at 60 %: nothing told that the day's trades and P&L
    were only its first hours'."""
    data = demo_tape.read_bytes()
    cut = tmp_path / "cut" / demo_tape.name
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) * 6 // 10])
    summary = summary_of(replay_cli([str(cut)], tmp_path / "data"))
    assert summary["bad_lines"] >= 1 and summary["problems"] == []
    (warning,) = summary["warnings"]
    assert "unreadable line(s)" in warning and "may not be the whole day's" in warning
    whole = summary_of(replay_cli([str(demo_tape), "--fresh"], tmp_path / "data"))
    assert whole["warnings"] == []


def replay_with(tape: Path, rules: Rules, journal_path: Path) -> tuple[list[Alert], list, Journal]:
    sent: list[Alert] = []
    logs: list = []
    journal = Journal(journal_path)
    replay_tape(
        tape,
        rules=rules,
        calendar=calendar(rules),
        journal=journal,
        on_alerts=sent.extend,
        on_log=logs.append,
    )
    return sent, logs, journal


def blocked_rules(logs: list) -> set[str]:
    return {log.fields["rule"] for log in logs if log.event == "entry_blocked"}


def test_protections_trip_in_a_replay(demo_tape, tmp_path):
    from dataclasses import replace

    cases = {
        "max_trades_per_day": (replace(RULES, max_trades_per_day=2), 2),
        "max_consecutive_losses": (replace(RULES, max_consecutive_losses=1), 1),
        "daily_loss_limit": (replace(RULES, daily_loss_limit=10.0), 1),
    }
    for rule, (rules, trades) in cases.items():
        _, logs, journal = replay_with(demo_tape, rules, tmp_path / f"{rule}.sqlite3")
        assert len(journal.trades()) == trades, rule
        assert rule in blocked_rules(logs)


def test_a_recorded_pause_blocks_entries_and_the_sell_still_goes_out(demo_tape, tmp_path):
    _, whole = run(demo_tape, tmp_path / "whole.sqlite3")
    second_entry_ms = whole.table_rows("positions")[1][8]
    lines = raw_lines(demo_tape)
    cut = next(i for i, line in enumerate(lines) if json.loads(line)["t"] > second_entry_ms)
    pause = json.dumps({"t": json.loads(lines[cut])["t"], "control": {"paused": True}})
    paused_tape = write_lines(tmp_path / "paused" / demo_tape.name, lines[:cut] + [pause] + lines[cut:])
    sent, logs, journal = replay_with(paused_tape, RULES, tmp_path / "paused.sqlite3")
    assert [a.kind for a in sent if a.kind in ("BUY", "SELL")] == ["BUY", "SELL", "BUY", "SELL"]
    assert len(journal.trades()) == 2
    assert "paused" in blocked_rules(logs)


def replay_into(tape: Path, journal: Journal, logs: list | None = None):
    """One replay into an open journal, logs collected in `logs` when given."""
    return replay_tape(
        tape,
        rules=RULES,
        calendar=calendar(RULES),
        journal=journal,
        on_alerts=lambda _alerts: None,
        on_log=(logs.append if logs is not None else lambda _log: None),
    )


def trade_facts(trades) -> list[tuple]:
    """What a trade is, apart from where the journal keeps it."""
    return [(t.trade_id, t.ticker, t.entry_price, t.exit_price, t.entry_ms, t.exit_ms, t.reason, t.pnl_dollars)
            for t in trades]  # fmt: skip


def test_days_replay_in_reverse_order_into_one_journal_as_on_fresh_ones(short_tapes, tmp_path):
    early, late = short_tapes
    fresh = {}
    for tape in short_tapes:
        fresh_journal = Journal(tmp_path / f"fresh-{tape.name}.sqlite3")
        replay_into(tape, fresh_journal)
        fresh[tape.name] = fresh_journal.trades()
    assert fresh[early.name] and fresh[late.name]

    shared = Journal(tmp_path / "shared.sqlite3")
    replay_into(late, shared)
    logs: list = []
    replay_into(early, shared, logs)
    day = early.name[:10]
    early_trades = [t for t in shared.trades() if t.session_date == day]
    assert trade_facts(early_trades) == trade_facts(fresh[early.name])
    blocks = [log.fields for log in logs if log.event == "entry_blocked" and log.fields["rule"] == "cooldown"]
    assert all(not str(b["value"]).startswith("-") for b in blocks), blocks
    every = fresh[early.name] + fresh[late.name]
    lifetime = shared.restored_state(day).lifetime
    assert lifetime.pnl == round(sum(t.pnl_dollars for t in every), 2)
    assert lifetime.wins + lifetime.losses == len(every)
    for trade in shared.trades():
        assert trade.exit_ms >= trade.entry_ms, trade


def test_a_later_days_exit_never_blocks_an_earlier_day_and_the_wait_is_never_negative():
    from engine import RestoredState, same_day_exit
    from risk_manager import DayRecord, Lifetime

    next_day_exit = at(10, 0, day=DAY + timedelta(days=1))
    assert same_day_exit(next_day_exit, DAY.isoformat()) is None
    assert same_day_exit(at(9, 50), DAY.isoformat()) == at(9, 50)
    eng = engine(RULES)
    state = RestoredState(None, DayRecord(), 0, next_day_exit, Lifetime(12.0, 1, 0), False)
    eng.restore(state, DAY.isoformat())
    assert eng.last_exit_ms is None and eng.lifetime.pnl == 12.0
    # Set directly (as a journal of an older program would): a future exit still never blocks.
    eng.last_exit_ms = next_day_exit
    eng.on_event(chain(at(10, 0), quote(at(10, 0))))
    eng.on_event(bar(at(10, 0), 220.0))
    block = eng._entry_block(eng.last_bar)
    assert block is None or block.rule != "cooldown"
    eng.last_exit_ms = at(9, 59, 30)
    block = eng._entry_block(eng.last_bar)
    assert block is not None and block.rule == "cooldown" and block.value == "31.2s"


ROOT = Path(__file__).resolve().parents[1]


def replay_cli(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """`main.py --replay ...` in a fresh process (stdout a pipe, so the summary is one JSON line), plus `env`."""
    base = {
        k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY", "DATA_DIR"))
    }
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "--replay", *args], cwd=data_dir.parent,
                          env={**base, "DATA_DIR": str(data_dir), **env}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def summary_of(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    summary = json.loads(lines[0])
    assert summary["event"] == "replay_summary"
    return summary


def test_cli_summaries_count_this_run_and_the_lifetime_adds_up_in_any_order(short_tapes, tmp_path):
    early, late = short_tapes
    data_dir = tmp_path / "data"
    second_day = summary_of(replay_cli([str(late)], data_dir))
    first_day = summary_of(replay_cli([str(early)], data_dir))
    journal = Journal(data_dir / "replay.sqlite3")
    by_day = {
        day: [t for t in journal.trades() if t.session_date == day] for day in ("2025-10-06", "2025-10-07")
    }
    for summary, day in ((second_day, "2025-10-07"), (first_day, "2025-10-06")):
        trades = by_day[day]
        assert summary["trades"] == len(trades) > 0
        assert summary["pnl"] == round(sum(t.pnl_dollars for t in trades), 2)
        assert summary["wins"] == sum(t.pnl_dollars > 0 for t in trades)
        assert summary["wins"] + summary["losses"] == len(trades)
    assert second_day["lifetime_pnl"] == second_day["pnl"]
    assert first_day["lifetime_pnl"] == round(first_day["pnl"] + second_day["pnl"], 2)
    assert first_day["lifetime_wins"] == first_day["wins"] + second_day["wins"]
    # The later day's tape ends with a position open; the earlier day left it alone.
    assert second_day["open_position"] == first_day["open_position"] == "2025-10-07-03"


def test_the_same_tape_again_says_so_names_fresh_and_fresh_starts_over(short_tapes, tmp_path):
    tape = short_tapes[0]
    data_dir = tmp_path / "data"
    first = summary_of(replay_cli([str(tape)], data_dir))
    assert first["trades"] > 0 and first["resumed_after"] == 0
    again = replay_cli([str(tape)], data_dir)
    summary = summary_of(again)
    last = first["lines"]
    assert f"already holds this tape ({tape.name}) up to line {last}" in again.stderr
    assert "nothing left to do" in again.stderr and "nothing left to do" in summary["note"]
    assert again.stderr.count("already holds this tape") == 1, "one note, not two that disagree"
    assert f"--replay {tape} --fresh" in again.stderr
    assert summary["resumed_after"] == last and summary["new_lines"] == 0
    assert summary["trades"] == 0 and summary["pnl"] == 0 and summary["lifetime_pnl"] == first["lifetime_pnl"]

    fresh = replay_cli([str(tape), "--fresh"], data_dir)
    summary = summary_of(fresh)
    backups = sorted(data_dir.glob("replay.sqlite3.*.bak"))
    assert len(backups) == 1 and f"previous replay journal moved to {backups[0]}" in fresh.stderr
    assert summary["moved_aside"] == str(backups[0])
    assert summary["resumed_after"] == 0 and (summary["trades"], summary["pnl"]) == (
        first["trades"],
        first["pnl"],
    )
    assert summary["lifetime_pnl"] == first["pnl"]
    kept = Journal(backups[0])
    assert len(kept.trades()) == first["trades"]


def test_the_terminal_summary_is_a_readable_block(short_tapes, tmp_path):
    import pty

    data_dir = tmp_path / "data"
    summary_of(replay_cli([str(short_tapes[0])], data_dir))
    base = {
        k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY", "DATA_DIR"))
    }
    leader, follower = pty.openpty()
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--replay", str(short_tapes[0])],
                          cwd=tmp_path, env={**base, "DATA_DIR": str(data_dir)}, stdout=follower,
                          stderr=subprocess.PIPE, timeout=300)  # fmt: skip
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end is closed and drained
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    text = out.decode()
    assert done.returncode == 0
    assert text.startswith(f"Replay of {short_tapes[0]}") and "{" not in text
    assert "this run          0 trades, 0W-0L" in text and "nothing left to do" in text and "--fresh" in text


@pytest.mark.parametrize(
    "name, content",
    [
        ("text.jsonl.gz", b"this is not a tape\nnor is this\n"),
        ("empty.jsonl.gz", b""),
        ("garbage.jsonl.gz", gzip.compress(b"\x00\x01garbage\nmore garbage\n", mtime=0)),
        ("torn.jsonl.gz", gzip.compress(b'{"t": 1, "ws": []}\n' * 50, mtime=0)[:20]),
    ],
    # Fixed ids: test workers must collect the very same names (a gzip header holds its mtime).
    ids=["text", "empty", "garbage", "torn"],
)
def test_a_file_with_no_tape_line_exits_2_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(NotATape):
        check_tape(path)
    data_dir = tmp_path / "data"
    done = replay_cli([str(path)], data_dir)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{path} is not a tape" in done.stderr and done.stdout == ""
    assert not (data_dir / "replay.sqlite3").exists()


def test_move_aside_keeps_the_journal_with_its_wal(tmp_path):
    path = tmp_path / "replay.sqlite3"
    journal = Journal(path)
    journal.set_meta("marker", "kept")
    wal = path.with_name(path.name + "-wal")
    assert wal.exists()  # still open: the commit may live only in the WAL
    moved = move_aside(path, now=lambda: 1_759_760_000.0)
    journal.close()
    assert moved == tmp_path / "replay.sqlite3.20251006T141320Z.bak"
    assert not path.exists() and not wal.exists()
    assert Journal(moved).meta("marker") == "kept"
    assert move_aside(path) is None
    Journal(path).close()
    second = move_aside(path, now=lambda: 1_759_760_000.0)
    assert second == tmp_path / "replay.sqlite3.20251006T141320Z-2.bak"


def test_a_second_replay_into_the_same_journal_exits_2_naming_the_first_and_touches_nothing(
    short_tapes, tmp_path
):
    data_dir = tmp_path / "data"
    # This process stands for a replay under way: it holds the journal's lock as main.py does.
    held = replay_lock(data_dir / "replay.sqlite3").acquire()
    try:
        done = replay_cli([str(short_tapes[0]), "--fresh"], data_dir)
    finally:
        held.release()
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert f"another replay (PID {os.getpid()}) is running on {data_dir}" in done.stderr
    assert not (data_dir / "replay.sqlite3").exists() and "--fresh" not in done.stderr
    first = summary_of(replay_cli([str(short_tapes[0])], data_dir))  # the lock is free again
    assert first["trades"] > 0 and first["problems"] == []


def test_a_replay_whose_journal_refuses_writes_says_so_and_exits_1(short_tapes, tmp_path):
    data_dir = tmp_path / "data"
    Journal(data_dir / "replay.sqlite3").close()
    with sqlite3.connect(data_dir / "replay.sqlite3") as db:
        # A real refusal from SQLite at the first BUY (as a UNIQUE conflict or a full disk would give).
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON positions BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    done = replay_cli([str(short_tapes[0])], data_dir)
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert summary["journal_write_failures"] > 0 and "journal_write_failed" in done.stderr
    assert len(summary["problems"]) == 1 and "refused" in summary["problems"][0]
    assert f"Replay incomplete: the replay journal refused {summary['journal_write_failures']} write(s)" in (
        done.stderr
    )


def test_notify_says_it_waits_for_pushover_and_exits_1_when_alerts_were_not_delivered(short_tapes, tmp_path):
    data_dir = tmp_path / "data"
    with FakePushover() as pushover:
        pushover.fail_with(429)  # the monthly quota is used up: nothing can go out
        done = replay_cli([str(short_tapes[0]), "--notify"], data_dir, PUSHOVER_TOKEN="a" * 30,
                          PUSHOVER_USER_KEY="u" * 30, PUSHOVER_API_URL=pushover.url)  # fmt: skip
    assert done.returncode == 1, done.stderr
    summary = json.loads(done.stdout)
    assert summary["undelivered_alerts"] == summary["pending_alerts"] > 0
    assert (
        f"Waiting up to 60 s for Pushover to take {summary['pending_alerts']} pending alert(s)" in done.stderr
    )
    assert f"Replay incomplete: {summary['undelivered_alerts']} alert(s) were not delivered" in done.stderr


def snapshot_result(bid: float, ask: float, quote_ms: int) -> dict:
    """The held contract as an options snapshot result, its quote stamped `quote_ms`."""
    return {
        "details": {"ticker": TICKER, "strike_price": 242.0, "expiration_date": DAY.isoformat(),
                    "contract_type": "call"},
        "greeks": {"delta": 0.38}, "implied_volatility": 0.2, "day": {"volume": 5000}, "open_interest": 1000,
        "last_quote": {"bid": bid, "ask": ask, "bid_size": 50, "ask_size": 50, "last_updated": quote_ms * 10**6},
    }  # fmt: skip


def contract_line(t: int, bid: float, ask: float, quote_ms: int | None = None) -> str:
    """The held contract's REST snapshot received at `t`, its quote stamped `quote_ms` (default `t`)."""
    body = {"status": "OK", "results": snapshot_result(bid, ask, quote_ms or t)}
    return json.dumps({"t": t, "rest": f"/v3/snapshot/options/IWM/{TICKER}", "status": 200, "body": body})


def burst_tape_lines() -> tuple[list[str], int]:
    """A BUY at the burst's last bar (ask 1.02, mid 1.01), as tape lines; and that bar's receive time."""
    from builders import burst_bars

    bars = burst_bars(at(10, 0))
    entry_t = bars[-1].received_ms
    path = f"/v3/snapshot/options/IWM?expiration_date={DAY.isoformat()}&contract_type=call&limit=250"
    chain_body = {"results": [snapshot_result(1.0, 1.02, entry_t - 400)]}
    meta = {"format": "tape/1", "underlying": "IWM", "benchmark": "SPY"}
    lines = [json.dumps({"t": bars[0].received_ms - 1000, "meta": meta})]
    lines += [json.dumps({"t": b.received_ms, "ws": [wire_event(b)]}) for b in bars[:-1]]
    lines.append(json.dumps({"t": entry_t - 300, "rest": path, "status": 200, "body": chain_body}))
    lines.append(json.dumps({"t": entry_t, "ws": [wire_event(bars[-1])]}))
    return lines, entry_t


@pytest.mark.parametrize("late_quote", [False, True], ids=["unsaved-peak", "older-quote"])
def test_a_replay_resumed_right_after_an_unsaved_peak_makes_the_uninterrupted_replays_trade(
    tmp_path, late_quote
):
    """Peaks reach the journal at most once a second: a replay cut right after a new peak resumed from
    the journal's older peak (and with no quote clock, so an older quote could mark it), and its trade
    differed from the uninterrupted replay's."""
    lines, entry_t = burst_tape_lines()
    lines.append(contract_line(entry_t + 300, 1.99, 2.01))  # a new peak of 2.00, not saved yet
    cut = len(lines)
    if late_quote:  # a quote older than the one behind the mark: ignored by the uninterrupted replay
        lines.append(contract_line(entry_t + 500, 1.04, 1.06, quote_ms=entry_t + 100))
    lines.append(contract_line(entry_t + 600, 1.39, 1.41))  # 30 % off 2.00: a Hard giveback
    lines += [contract_line(entry_t + k * 1000, 1.30, 1.32) for k in range(1, 30)]
    tape = write_lines(tmp_path / "full" / "2025-10-02.jsonl.gz", lines)

    whole_alerts, whole = run(tape, tmp_path / "whole.sqlite3")
    part = write_lines(tmp_path / "part" / tape.name, lines[:cut])
    first, journal = run(part, tmp_path / "split.sqlite3")
    journal.close()
    rest, journal = run(tape, tmp_path / "split.sqlite3")

    (trade,) = whole.trades()
    assert (trade.reason, trade.exit_price) == ("Hard giveback", 1.39)
    assert journal.table_rows("trades") == whole.table_rows("trades")
    assert [a.message for a in first + rest] == [a.message for a in whole_alerts]


def test_notify_sends_each_kind_with_the_live_daemons_sound(short_tapes, tmp_path):
    with FakePushover() as pushover:
        done = replay_cli([str(short_tapes[0]), "--notify"], tmp_path / "data", PUSHOVER_TOKEN="a" * 30,
                          PUSHOVER_USER_KEY="u" * 30, PUSHOVER_API_URL=pushover.url,
                          ALERT_SOUND_BUY="bugle")  # fmt: skip
        forms = [m.form for m in pushover.messages]
    assert done.returncode == 0, done.stderr
    sounds = {f["title"].rsplit(" ", 1)[-1]: f.get("sound") for f in forms}
    assert sounds["BUY"] == "bugle" and sounds["SELL"] == "siren"
