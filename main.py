"""The IWM 0DTE Momentum Alerter: command line and wiring. See README.md and docs/architecture.md."""

from __future__ import annotations

import requires_python  # noqa: F401 - first: one clear line, not a traceback, on a Python before 3.11

# isort: split
import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cli_exit import run_quietly
from config import (
    CALENDAR_CACHE_DIR,
    PAUSE_FILE,
    ConfigError,
    Settings,
    data_dir_problem,
    load_settings,
    read_dotenv,
    unknown_keys,
)
from logs import configure_logging
from start_watch import StartWatch

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable

    from alerts import Notifier
    from clock import Clock
    from daemon import Daemon
    from pnl_tracker import Journal
    from replay import ReplayResult, RunSummary

# 2: nothing was done (a usage or settings error, an unusable DATA_DIR or journal, another process in
# the way). 1: a replay ran but its record or its alerts are incomplete (see its summary's problems).
EXIT_OK, EXIT_INCOMPLETE, EXIT_CONFIG = 0, 1, 2
EXIT_FAILED = 1  # the live daemon ended on an error (said on the phone as STOPPED)
REPLAY_FLUSH_S = 60.0  # how long a --notify replay waits, at its end, for Pushover to take what is left


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 main.py",
        description="IWM 0DTE momentum alerts (alert-only; never trades).",
        epilog="Without an option: the live daemon (needs POLYGON_API_KEY; settings from .env and the environment, "
        "see the README). Ctrl-C or SIGTERM stops it cleanly.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--demo", action="store_true", help="replay the bundled synthetic day, print every alert"
    )
    mode.add_argument("--replay", metavar="TAPE", type=Path, help="replay a recorded tape through the engine")
    parser.add_argument(
        "--speed",
        default="max",
        type=parse_speed,
        help="replay speed: a positive factor (e.g. 10) or 'max' (default)",
    )
    mode.add_argument(
        "--pause", action="store_true", help="stop new entries in the running daemon (exits go on)"
    )
    mode.add_argument("--resume", action="store_true", help="allow new entries again")
    parser.add_argument("--notify", action="store_true", help="with --replay: also send alerts to Pushover")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="with --replay: move the replay journal aside (kept as .bak) and start a new one",
    )
    mode.add_argument(
        "--status", action="store_true", help="today's session, position, trades, P&L and alerts"
    )
    parser.add_argument("--json", action="store_true", help="with --status: one JSON object instead of text")
    args = parser.parse_args(argv)
    speed_given = any(arg == "--speed" or arg.startswith("--speed=") for arg in argv)
    for flag, given in (("--fresh", args.fresh), ("--notify", args.notify), ("--speed", speed_given)):
        if given and not args.replay:
            parser.error(f"{flag} goes with --replay TAPE")
    if args.json and not args.status:
        parser.error("--json goes with --status")
    return args


MIN_SPEED = 0.01  # as SIM_CLOCK_SPEED's: slower, a day's pauses overflow the clock (1e-20 did)


def parse_speed(raw: str) -> float | None:
    """`--speed`: None for 'max', else a positive finite factor. argparse turns the error into exit 2."""
    if raw.strip().lower() == "max":
        return None
    try:
        speed = float(raw)
    except ValueError:
        speed = math.nan
    if not (math.isfinite(speed) and speed >= MIN_SPEED):
        raise argparse.ArgumentTypeError(
            f"{raw!r} is neither a number >= {MIN_SPEED:g} (such as 10) nor 'max'"
        )
    return speed


def load_or_exit() -> Settings:
    """Settings from `.env` and the environment; warn about `.env` keys no setting reads; exit 2 on a bad one."""
    dotenv = read_dotenv(".env", os.environ)  # once: a named pipe (1Password) gives its text once
    for warning in unknown_keys(dotenv):
        print(warning, file=sys.stderr)
    try:
        return load_settings(dotenv)
    except ConfigError as exc:
        print("Configuration problems (nothing started):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.demo:
        from demo import run_demo

        configure_logging("WARNING", "console")
        return run_demo(sys.stdout)
    if args.replay or args.status or args.pause or args.resume:
        return run_command(args, None)
    import threading

    from stop_signals import ignore_stop_signals, stop_on_signals

    # First of all: a SIGTERM during start-up (settings, calendar, journal) killed the process with
    # status 143, where the daemon promises a clean stop (exit 0) on SIGTERM at any time.
    stop = threading.Event()
    stop_on_signals(stop)  # SIGHUP (a closed terminal, some supervisors) stops cleanly like SIGTERM
    try:
        return run_command(args, stop)
    finally:
        ignore_stop_signals()


def run_command(args: argparse.Namespace, stop: threading.Event | None) -> int:
    """Every command but the demo, once its arguments are read; `stop` is the live daemon's."""
    settings = load_or_exit()
    configure_logging(
        settings.log_level, settings.log_format, settings.secret_values(), background=is_live(args)
    )
    # --status only reads: it never creates DATA_DIR, but a DATA_DIR that cannot be a folder is said.
    check = status_data_dir_problem if args.status else data_dir_problem
    problem = check(settings.data_dir)
    if problem is not None:
        print(f"{'No status' if args.status else 'Nothing started'}: {problem}.", file=sys.stderr)
        if is_live(args):  # a daemon that was holding a position goes silent: the phone must know
            notify_cannot_start(settings, problem)  # it names DATA_DIR and the folder already
        return EXIT_CONFIG
    if args.replay:
        return run_replay(settings, args.replay, args.speed, notify=args.notify, fresh=args.fresh)
    if args.status:
        return run_status(settings, as_json=args.json)
    if args.pause or args.resume:
        return set_pause(settings, paused=args.pause)
    assert stop is not None
    return run_live(settings, stop)


def is_live(args: argparse.Namespace) -> bool:
    """Whether the command line starts the live daemon (no other command given)."""
    return not (args.replay or args.status or args.pause or args.resume)


def status_data_dir_problem(data_dir: Path) -> str | None:
    """Why DATA_DIR cannot hold a journal (it, or a folder above it, is a file), without creating it; else
    None (a missing DATA_DIR is no problem for --status: it says there is no journal)."""
    for folder in (data_dir, *data_dir.parents):
        try:
            found, is_dir = folder.exists(), folder.is_dir()
        except OSError as exc:  # a name too long, no permission to look: what the system said
            return f"DATA_DIR={str(data_dir)!r}: cannot be looked at ({exc.strerror or exc})"
        if found:
            if is_dir:
                return None
            where = "is a file" if folder == data_dir else f"is under {folder}, which is a file"
            return f"DATA_DIR={str(data_dir)!r}: {where}, not a folder"
    return None


def set_pause(settings: Settings, *, paused: bool) -> int:
    """The kill switch is a file under DATA_DIR that the running daemon checks every turn.

    A switch that cannot be set or cleared (PAUSE is a folder, the file system refuses) is one line on
    stderr and exit 2, with the daemon's state unchanged.
    """
    flag = settings.data_dir / PAUSE_FILE
    try:
        flag.parent.mkdir(parents=True, exist_ok=True)
        if paused:
            flag.write_text("entries paused by `python3 main.py --pause`\n")
        else:
            flag.unlink(missing_ok=True)
    except OSError as exc:
        action = "pause entries" if paused else "allow entries again"
        print(f"Could not {action}: {flag}: {exc.strerror or exc}{pause_hint(flag)}.", file=sys.stderr)
        return EXIT_CONFIG
    if paused:
        print(f"Entries paused ({flag}). Exits and SELL alerts continue. Undo: python3 main.py --resume")
    else:
        print("Entries allowed again.")
    return EXIT_OK


def pause_hint(flag: Path) -> str:
    """What to add when the switch is a folder: the daemon pauses while anything named PAUSE exists."""
    if not flag.is_dir():
        return ""
    return " (the daemon counts anything named PAUSE as paused: remove that folder yourself)"


def run_live(settings: Settings, stop: threading.Event) -> int:
    """The live daemon until `stop` (SIGTERM/SIGINT: exit 0) or the watchdog (exit 3)."""
    if not settings.polygon_api_key:
        print(
            "POLYGON_API_KEY (or MASSIVE_API_KEY) is not set, so the live daemon cannot start.\n"
            "Try the offline demo: python3 main.py --demo",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    clock = clock_or_none(settings)
    if clock is None:
        return EXIT_CONFIG
    open_files = raise_open_files_limit()
    if open_files < OPEN_FILES_WANTED // 16:
        print(
            f"Warning: this process may open only {open_files} files (ulimit -n); the daemon needs about 25 and "
            "more under load: chain polls and redials may fail with 'Too many open files'.",
            file=sys.stderr,
        )
    problem = rehearsal_behind_its_data(settings, clock)
    if problem is not None:
        print(problem, file=sys.stderr)
        return EXIT_CONFIG
    watch = StartWatch(settings.watchdog_seconds, lambda step, limit_s: start_stuck(settings, step, limit_s))
    daemon = start_daemon_or_explain(settings, clock, stop, watch.start())
    if daemon is None:
        watch.done()
        return EXIT_CONFIG
    try:
        return daemon.run()
    except Exception as exc:
        # The process ends and the platform starts it again; the phone must know it is down meanwhile.
        import structlog

        from supervisor import error_text

        structlog.get_logger("main").critical("daemon_failed", error=error_text(exc), exc_info=True)
        notify_cannot_start(settings, f"{error_text(exc)}; the platform starts it again", title="STOPPED")
        return EXIT_FAILED


def start_stuck(
    settings: Settings, step: str, limit_s: float, exit_process: Callable[[int], None] | None = None
) -> None:
    """A start that stood still for `limit_s` while `step`: said (log, stderr, a NOT STARTED alert once an
    hour) and the process ends with the watchdog's status, so that the platform starts it again."""
    import structlog

    from daemon import EXIT_WATCHDOG, exit_after_logs

    exit_process = exit_process or exit_after_logs

    reason = f"the start made no progress for {limit_s:.0f} s while {step} (a disk or a file that does not answer?)"
    structlog.get_logger("main").critical(
        "start_stuck", step=step, limit_s=limit_s, exit_status=EXIT_WATCHDOG
    )
    print(f"Not started: {reason}; exiting with status {EXIT_WATCHDOG}.", file=sys.stderr)
    try:
        notify_cannot_start(settings, reason)
    finally:
        exit_process(EXIT_WATCHDOG)


OPEN_FILES_WANTED = 4096  # the daemon uses about 25; /health clients, redials and REST pools add some


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files toward the hard one (OPEN_FILES_WANTED at most); the
    limit it has then. A soft limit of 20 (`ulimit -n 20`) cost every chain request ("Too many open
    files") and so every entry, with only /health to say why."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return soft


def clock_or_none(settings: Settings) -> Clock | None:
    """The daemon's clock: the wall clock, or the rehearsal clock of SIM_CLOCK_START (None, said, if bad)."""
    from clock import SimClock, WallClock, parse_instant

    try:
        if settings.sim_clock_start:
            return SimClock(parse_instant(settings.sim_clock_start), settings.sim_clock_speed)
        return WallClock()
    except ValueError as exc:
        print(f"SIM_CLOCK_START={settings.sim_clock_start!r}: {exc}", file=sys.stderr)
        return None


def rehearsal_behind_its_data(settings: Settings, clock: Clock) -> str | None:
    """Why a rehearsal (SIM_CLOCK_START) must not start on this DATA_DIR, or None: today's tape already
    runs past its clock (an earlier rehearsal of the same day), so its bars would make the new run's
    bars late and its trades count against the new run's protections."""
    if not settings.sim_clock_start:
        return None
    from daemon import TAPE_AHEAD_MS
    from market_calendar import ny_date, ny_datetime
    from tape import TapeReader, tape_path

    now = clock.now_ms()
    path = tape_path(settings.data_dir, ny_date(now))
    try:
        last_ms = (
            max((line.t for line in TapeReader(path, lazy_bodies=True)), default=0) if path.is_file() else 0
        )
    except Exception:  # noqa: BLE001 - a damaged tape is the warm-up's to say, not a reason to refuse
        return None
    if last_ms <= now + TAPE_AHEAD_MS:
        return None
    return (
        f"Not started: {path} already records this day up to {ny_datetime(last_ms):%H:%M:%S}, later than "
        f"SIM_CLOCK_START ({ny_datetime(now):%H:%M:%S}): an earlier rehearsal of the same day. Start each "
        f"rehearsal in a fresh DATA_DIR (or remove {settings.data_dir})."
    )


def start_daemon_or_explain(
    settings: Settings, clock: Clock, stop: threading.Event, watch: StartWatch | None = None
) -> Daemon | None:
    """Build the daemon; a second daemon, a bad journal or bad fallback URLs end start-up with a paragraph."""
    from daemon import Daemon  # noqa: F811 - the runtime import; the name is typed above
    from instance_lock import AlreadyRunning
    from pnl_tracker import JournalError

    try:
        daemon = Daemon(settings, clock, stop=stop, start_watch=watch)
    except AlreadyRunning as exc:
        print(f"Not started: {exc}.", file=sys.stderr)
    except JournalError as exc:
        print(bad_journal_advice(settings.data_dir / "journal.sqlite3", exc), file=sys.stderr)
        notify_cannot_start(settings, "the journal cannot be opened; see the daemon's log")
    except ValueError as exc:  # bad fallback URLs: said here only (the text may name a channel's secret)
        print(f"Not started: {exc}.", file=sys.stderr)
    except OSError as exc:  # a data directory the daemon cannot use (full, read-only, gone)
        print(f"Not started: {exc}.", file=sys.stderr)
        notify_cannot_start(settings, str(exc))
    else:
        # Live, each chain is priced as it arrives so that a BUY's selection does no root finding.
        daemon.engine.price_chains_on_arrival = True
        return daemon
    return None


# The file is sound, the system around it is not. "unable to open" is SQLite's CANTOPEN: no room (or no
# inode) for its -wal or -shm file, or no permission, never a damaged journal.
TRANSIENT_JOURNAL_ERRORS = (
    "locked",
    "disk is full",
    "readonly",
    "read-only",
    "disk i/o error",
    "unable to open",
)


def bad_journal_advice(path: Path, exc: Exception) -> str:
    """One paragraph: what is wrong with the journal, which file, and what to do."""
    if any(words in str(exc).lower() for words in TRANSIENT_JOURNAL_ERRORS):
        # The file is sound: moving it aside would throw away the open position and the lifetime P&L.
        return (
            f"Not started: the journal {path} cannot be opened now ({exc}). Do not move it aside: it holds "
            "the open position, the trades and the lifetime P&L. Free disk space (or inodes: `df -i`), or "
            "close the program holding it, or make it and its folder writable, then start again."
        )
    return (
        f"Not started: the journal {path} cannot be used ({exc}). It holds the open position, the trades "
        "and the lifetime P&L, so the daemon will not guess. Move it aside (for example "
        f"`mv {path} {path}.bad`) and start again: a new journal is created, and the recorded tapes under "
        f"{path.parent / 'tapes'} still hold the day for `python3 main.py --replay`. If the file came from a "
        "newer version of this program, run that version instead."
    )


NOT_STARTED_REPEAT_S = 3600.0  # the same reason is told again after this long, not at every restart
NOT_STARTED_NAME = "not_started.said"  # in DATA_DIR: what the last NOT STARTED said, and when


def notify_cannot_start(settings: Settings, reason: str, *, title: str = "NOT STARTED") -> None:
    """Best effort: tell the phone the daemon is down, since no alert can follow; once an hour for one
    reason (Render restarts a worker that exits: a priority-1 NOT STARTED came at every attempt)."""
    if not (settings.pushover_token and settings.pushover_user_key):
        return
    import hashlib
    import time

    from alerts import PushoverClient
    from journal_rescue import in_temp
    from pnl_tracker import OutboxItem

    # On the data disk when it takes the file: a restart on Render wipes the temporary folder, and a
    # priority-1 NOT STARTED came at every restart (an audit's find). The temporary folder when it does not.
    places = (settings.data_dir / NOT_STARTED_NAME, in_temp(settings.data_dir, "not_started"))
    words = hashlib.sha256(reason.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    if any(_said_within_the_hour(place, words) for place in places):
        print("NOT STARTED was sent for the same reason within the hour: not sent again.", file=sys.stderr)
        return
    for place in places:
        try:
            place.write_text(f"{words} {time.time():.0f}\n", encoding="utf-8")
            break
        except OSError:
            continue

    heading = f"{settings.rules.underlying} alerter — {title}"
    said_as = "did not start" if title == "NOT STARTED" else "stopped"
    now_ms = time.time_ns() // 1_000_000
    item = OutboxItem(0, "NOT_STARTED", "SYSTEM", heading, f"The daemon {said_as}: {reason}.", 1, now_ms, 0)
    client = PushoverClient(settings.pushover_token, settings.pushover_user_key, settings.pushover_api_url)
    try:
        result = client.send(item)
    finally:
        client.close()
    if not result.ok and not result.timed_out:
        # Not delivered for sure: the next start tells it again (a 5xx blip had silenced an hour of them).
        for place in places:
            with contextlib.suppress(OSError):
                place.unlink()
        print(f"{title} could not be sent to Pushover ({result.error}).", file=sys.stderr)


def _said_within_the_hour(place: Path, words: str) -> bool:
    """Whether the NOT STARTED memory at `place` says these words were sent within the hour."""
    import time

    try:
        last_words, last_at = place.read_text(encoding="utf-8").split()
        return last_words == words and time.time() - float(last_at) < NOT_STARTED_REPEAT_S
    except (OSError, ValueError):
        return False  # never said, or unreadable: say it


def run_replay(
    settings: Settings, tape: Path, speed: float | None, *, notify: bool, fresh: bool = False
) -> int:
    """Replay a tape into DATA_DIR/replay.sqlite3 (never the live journal).

    Alerts go through that journal's outbox like live ones: to the log, and to Pushover with `notify`.
    `fresh` moves the old replay journal aside first. The run ends with a summary of THIS run on
    stdout: a readable block on a terminal, else one JSON line. A file with no tape line, or another
    replay running into the same journal, exits 2 before the journal is touched; a run whose journal
    refused writes, or whose alerts did not all reach Pushover, exits 1.
    """
    from instance_lock import AlreadyRunning, replay_lock

    problem = replay_problem(settings, tape, notify=notify)
    if problem is not None:
        print(problem, file=sys.stderr)
        return EXIT_CONFIG
    journal_path = settings.data_dir / "replay.sqlite3"
    # Two replays into one journal write the same trades twice, and each reports the other's trades.
    lock = replay_lock(journal_path)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"Not started: {exc}.", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"Not started: cannot lock {lock.path}: {exc.strerror or exc}.", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return replay_locked(settings, tape, speed, journal_path, notify=notify, fresh=fresh)
    finally:
        lock.release()


def replay_locked(
    settings: Settings, tape: Path, speed: float | None, journal_path: Path, *, notify: bool, fresh: bool
) -> int:
    """`run_replay` once its journal's lock is held: open the journal, replay, flush, summarise."""
    from alerts import Notifier, PushoverClient
    from clock import WallClock
    from market_calendar import MarketCalendar
    from replay import failed_alerts, replay_tape, resume_note, saved_line, summarize_run

    opened = open_replay_journal(journal_path, fresh=fresh)
    if opened is None:
        return EXIT_CONFIG
    journal, moved = opened
    failed_before = failed_alerts(journal) if notify else None
    known_before = [t.trade_id for t in journal.trades()]
    note = resume_note(tape, saved_line(journal, tape.name))
    if note and speed is not None:  # a paced replay takes a while: say at once; the summary says it once more
        print(note, file=sys.stderr)
    client = PushoverClient.for_settings(settings) if notify else None
    notifier = Notifier(journal, client, clock_ms=WallClock().now_ms)
    rules = settings.rules
    calendar = MarketCalendar(rules, settings.market_closed_dates, settings.data_dir / CALENDAR_CACHE_DIR)
    result = replay_tape(
        tape,
        rules=rules,
        calendar=calendar,
        journal=journal,
        on_alerts=lambda _alerts: notifier.drain_once(),
        speed=speed,
    )
    if notify:
        flush_to_pushover(notifier, journal)
    summary = summarize_run(
        result,
        tape=tape,
        journal=journal,
        known_before=known_before,
        moved_aside=moved,
        failed_before=failed_before,
    )
    journal.close()
    return print_replay_summary(result, summary)


def flush_to_pushover(notifier: Notifier, journal: Journal) -> None:
    """At the end of a --notify replay, give Pushover up to REPLAY_FLUSH_S to take what is still pending,
    saying so first (a silent minute looks like a hang)."""
    pending = journal.pending_count()
    if pending == 0:
        return
    problem = notifier.health().problem
    why = f" ({problem})" if problem else ""
    print(
        f"Waiting up to {REPLAY_FLUSH_S:.0f} s for Pushover to take {pending} pending alert(s){why}...",
        file=sys.stderr,
        flush=True,
    )
    notifier.flush(deadline_s=REPLAY_FLUSH_S)


def replay_problem(settings: Settings, tape: Path, *, notify: bool) -> str | None:
    """Why this replay cannot start (no such file, not a tape, --notify without Pushover keys), or None."""
    from replay import NotATape, check_tape

    if tape.is_dir():
        return f"{tape} is a folder: --replay takes one tape file (backtest.py runs a folder of tapes)"
    if not tape.exists():
        # A fresh clone has none: the README's example names a tape the live daemon records.
        return (
            f"No such tape: {tape} (the live daemon records one per session in DATA_DIR/tapes; "
            "python3 main.py --demo replays a synthetic day, and backtest.py --synthetic N writes some)"
        )
    if not tape.is_file():
        # A named pipe or a device (a link to /dev/zero) is there, but a replay reads a tape twice.
        return f"{tape} is not a regular file: --replay takes one tape file"
    try:
        check_tape(tape)
    except NotATape as exc:
        return str(exc)
    if notify and not (settings.pushover_token and settings.pushover_user_key):
        return "--notify needs PUSHOVER_TOKEN and PUSHOVER_USER_KEY."
    return None


def open_replay_journal(journal_path: Path, *, fresh: bool) -> tuple[Journal, Path | None] | None:
    """The replay journal (moved aside first with `fresh`) and where the old one went; None (said on
    stderr) when the journal cannot be used."""
    from pnl_tracker import Journal, JournalError
    from replay import move_aside

    moved = move_aside(journal_path) if fresh else None
    if fresh:
        old = f"previous replay journal moved to {moved}" if moved else "there was no replay journal"
        print(f"--fresh: {old}; starting a new one at {journal_path}", file=sys.stderr)
    try:
        return Journal(journal_path, check=True), moved
    except JournalError as exc:
        print(
            f"{exc}. Start this replay on a new journal with --fresh (the old one is kept aside).",
            file=sys.stderr,
        )
        return None


def print_replay_summary(result: ReplayResult, summary: RunSummary) -> int:
    """Log the run and print its summary: a readable block on a terminal, else one JSON line."""
    import json

    import structlog

    from replay import render_summary

    structlog.get_logger("replay").info(
        "replay_done",
        lines=result.lines,
        bad_lines=result.bad_lines,
        resumed_after=result.resumed_after,
        bad_events=result.feed.bad_events,
        late_bars=result.late_bars,
        trades=summary.trades,
        still_pending=summary.pending_alerts,
        journal_write_failures=summary.journal_write_failures,
        undelivered_alerts=summary.undelivered_alerts,
    )
    status = EXIT_INCOMPLETE if summary.problems() else EXIT_OK
    if sys.stdout.isatty():
        print(render_summary(summary), flush=True)
        return status
    # The JSON line holds the note and the problems too; a person reads stderr.
    if summary.note():
        print(summary.note(), file=sys.stderr)
    for problem in summary.problems():
        print(f"Replay incomplete: {problem}.", file=sys.stderr)
    print(json.dumps(summary.as_dict()), flush=True)
    return status


def run_status(settings: Settings, *, as_json: bool) -> int:
    """Print today's view of the live journal (read-only): text, or one JSON object with `as_json`.

    Works while the daemon runs and on a stopped one; without a journal it says so and exits 0.
    A journal that cannot be read (corrupt, empty, busy) is shown as such, with what to do on stderr,
    and exits 2 (with `as_json` the object's `journal_problem` says it). The clock is the daemon's:
    SIM_CLOCK_START, when set, is "now" (rehearsals, tests).
    """
    import json

    from market_calendar import MarketCalendar, ny_date
    from status import build_status, render_status, status_dict, tape_age_s

    clock = clock_or_none(settings)
    if clock is None:
        return EXIT_CONFIG
    now_ms = clock.now_ms()
    snapshot, note = health_or_why(settings)
    age = tape_age_s(settings.data_dir / "tapes", ny_date(now_ms).isoformat())
    if age is not None:
        note += f"; today's tape was last written {age:.0f}s ago"
    status = build_status(
        settings.data_dir / "journal.sqlite3",
        rules=settings.rules,
        calendar=MarketCalendar(
            settings.rules, settings.market_closed_dates, settings.data_dir / CALENDAR_CACHE_DIR
        ),
        now_ms=now_ms,
        pause_file=settings.data_dir / PAUSE_FILE,
        health=lambda: snapshot,
        feed_note=note,
    )
    shown = json.dumps(status_dict(status)) if as_json else render_status(status)
    print(settings.redactor()(shown))
    if status.journal_problem is not None:
        print(status.journal_problem.advice, file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def health_or_why(settings: Settings) -> tuple[dict[str, object] | None, str]:
    """The running daemon's /health snapshot, or None and why it cannot be had (the status's feed note)."""
    port = settings.health_port
    if port is None:
        return None, "HEALTH_PORT is not set, so the running daemon's feed health cannot be read"
    if port == 0:
        # The daemon then binds a port the system picks and tells no one but its log.
        return None, (
            "HEALTH_PORT=0 makes the daemon listen on a port the system picks, which --status cannot "
            "know; set a fixed HEALTH_PORT to read the running daemon's feed health"
        )
    from status import read_health

    return read_health(settings.health_host, port)


if __name__ == "__main__":
    sys.exit(run_quietly(main))
