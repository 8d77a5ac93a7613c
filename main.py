"""The IWM 0DTE Momentum Alerter: command line and wiring. See README.md and docs/architecture.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import ConfigError, Settings, load_settings
from logs import configure_logging

EXIT_OK, EXIT_CONFIG = 0, 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python main.py", description="IWM 0DTE momentum alerts (alert-only; never trades)."
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--demo", action="store_true", help="replay the bundled synthetic day, print every alert")
    mode.add_argument("--replay", metavar="TAPE", type=Path, help="replay a recorded tape through the engine")
    parser.add_argument("--speed", default="max", help="replay speed: a factor (e.g. 10) or 'max' (default)")
    parser.add_argument("--notify", action="store_true", help="with --replay: also send alerts to Pushover")
    return parser.parse_args(argv)


def parse_speed(raw: str) -> float | None:
    if raw == "max":
        return None
    speed = float(raw)
    if not speed > 0:
        raise ValueError("speed must be positive or 'max'")
    return speed


def load_or_exit() -> Settings:
    try:
        return load_settings()
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
    settings = load_or_exit()
    configure_logging(settings.log_level, settings.log_format, secrets_of(settings))
    if args.replay:
        return run_replay(settings, args.replay, parse_speed(args.speed), notify=args.notify)
    print("The live daemon is not built yet. Try: python main.py --demo", file=sys.stderr)
    return EXIT_CONFIG


def run_replay(settings: Settings, tape: Path, speed: float | None, *, notify: bool) -> int:
    """Replay a tape into DATA_DIR/replay.sqlite3 (never the live journal); alerts to the log."""
    import structlog

    from market_calendar import MarketCalendar
    from pnl_tracker import Journal
    from replay import replay_tape

    if not tape.is_file():
        print(f"No such tape: {tape}", file=sys.stderr)
        return EXIT_CONFIG
    log = structlog.get_logger("replay")
    journal = Journal(settings.data_dir / "replay.sqlite3")

    def log_alerts(alerts: list) -> None:
        for alert in alerts:
            log.info("alert", kind=alert.kind, title=alert.title, message=alert.message)

    rules = settings.rules
    calendar = MarketCalendar(rules, settings.market_closed_dates)
    result = replay_tape(tape, rules=rules, calendar=calendar, journal=journal, on_alerts=log_alerts, speed=speed)
    log.info("replay_done", lines=result.lines, bad_lines=result.bad_lines, resumed_after=result.resumed_after,
             bad_events=result.feed.bad_events, late_bars=result.late_bars)
    journal.close()
    return EXIT_OK


def secrets_of(settings: Settings) -> tuple[str, ...]:
    return (settings.polygon_api_key, settings.pushover_token, settings.pushover_user_key, settings.heartbeat_url)


if __name__ == "__main__":
    sys.exit(main())
