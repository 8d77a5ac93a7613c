"""`python diagnose.py [--network]`: set-up checks for a new user, printed as a checklist.

Offline it checks Python, every runtime package of requirements.txt, the settings (and `.env` keys no
setting reads), the market calendar and the data folder. With `--network` it also asks Polygon for
today's chain (key and plan), authenticates on the stream and validates the Pushover keys; a probe
whose keys are not set is skipped, not failed. Each check is OK, WARN (optional or running low), skipped
or FAIL; the exit status is 0 unless one FAILs. Secrets are masked.
"""

from __future__ import annotations

import requires_python  # noqa: F401 - first: one clear line, not a traceback, on a Python before 3.11

# isort: split
import argparse
import asyncio
import dataclasses
import importlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Used only when requirements.txt is not beside this file (the runtime packages as of writing).
FALLBACK_REQUIREMENTS = (
    "exchange_calendars>=4.7",
    "websockets",
    "httpx",
    "orjson",
    "structlog",
    "python-dotenv",
    "numpy",
    "matplotlib",
)
# Distributions whose import name is not their name with dashes as underscores.
IMPORT_NAMES = {"python-dotenv": "dotenv", "pyyaml": "yaml", "pillow": "PIL", "beautifulsoup4": "bs4"}
# Render's disk is 1 GB (render.yaml); the journal needs little, tapes about TAPE_DAY_BYTES a day.
WARN_FREE_BYTES = 200 * 10**6
FAIL_FREE_BYTES = 50 * 10**6
# Measured: the synthetic demo day (09:15 profile fetch to 16:00, bars of both tickers and a 10 s chain
# poll) written as the daemon writes tapes (gzip level 6, a member every 5 s) is 10.1 MB.
TAPE_DAY_BYTES = 10 * 10**6

OK, WARN, SKIP, FAIL = "OK", "WARN", "SKIP", "FAIL"
MARKS = {OK: "[ OK ]", WARN: "[WARN]", SKIP: "[ -- ]", FAIL: "[FAIL]"}


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the checklist. Only FAIL makes the exit status non-zero."""

    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        """True unless the check failed: a warning or a skipped probe does not stop anything."""
        return self.status != FAIL

    def line(self) -> str:
        """The check as printed: mark, name, detail, and the fix on a second line when not OK."""
        text = f"{MARKS[self.status]} {self.name}: {self.detail}"
        return text if self.status in (OK, SKIP) or not self.fix else f"{text}\n       -> {self.fix}"


def passed(ok: bool) -> str:
    """OK or FAIL."""
    return OK if ok else FAIL


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info >= (3, 11)
    return Check("Python", passed(ok), version, "" if ok else "install Python 3.11 or newer")


def runtime_requirements(path: Path = HERE / "requirements.txt") -> list[str]:
    """The requirement lines of `path` (comments, options and blank lines dropped), else the fallback list."""
    if not path.is_file():
        return list(FALLBACK_REQUIREMENTS)
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def distribution_name(requirement: str) -> str:
    """`exchange_calendars>=4.7,<5` -> `exchange_calendars` (extras and markers dropped)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(0)


def import_name(distribution: str) -> str:
    """The module a distribution installs: python-dotenv -> dotenv, exchange-calendars -> exchange_calendars."""
    key = distribution.lower().replace("_", "-").replace(".", "-")
    return IMPORT_NAMES.get(key, key.replace("-", "_"))


def requirement_problem(requirement: str) -> str:
    """'' when the package imports at a version the requirement allows, else what is wrong."""
    distribution = distribution_name(requirement)
    try:
        importlib.import_module(import_name(distribution))
        installed = metadata.version(distribution)
    except ImportError:
        return f"{distribution} missing"
    except metadata.PackageNotFoundError:
        return ""  # importable from the path without metadata (a vendored copy): nothing to compare
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging is a dev dependency; without it only the import is checked
        return ""
    wanted = Requirement(requirement).specifier
    return (
        "" if wanted.contains(installed, prereleases=True) else f"{distribution} {installed} (wants {wanted})"
    )


def check_packages(requirements: list[str] | None = None) -> Check:
    """Every runtime package of requirements.txt imports, at a version in its range."""
    wanted = runtime_requirements() if requirements is None else requirements
    problems = [problem for problem in map(requirement_problem, wanted) if problem]
    if problems:
        return Check(
            "packages",
            FAIL,
            ", ".join(problems),
            "python3 -m pip install -r requirements.lock (or requirements.txt)",
        )
    names = ", ".join(distribution_name(r) for r in wanted)
    return Check("packages", OK, f"{len(wanted)} runtime packages import ({names})")


def check_settings() -> tuple[list[Check], object | None]:
    """The settings as main.py loads them, and a warning per `.env` key that no setting reads."""
    from config import ConfigError, load_settings, read_dotenv, unknown_keys

    dotenv = read_dotenv(".env", os.environ)  # once: a named pipe (1Password) gives its text once
    warnings = [w.removeprefix("warning: ") for w in unknown_keys(dotenv)]
    fix = "fix or remove the keys named above"
    checks = [Check(".env keys", WARN, "; ".join(warnings), fix)] if warnings else []
    try:
        settings = load_settings(dotenv)
    except ConfigError as exc:
        failed = Check("settings", FAIL, "; ".join(exc.problems), "fix the variables named above (.env)")
        return [failed, *checks], None
    fallback_problem = _fallback_problem(settings.alert_fallback_urls)
    if fallback_problem is not None:
        failed = Check(
            "settings", FAIL, fallback_problem, "fix ALERT_FALLBACK_URLS (.env): see apprise's URL list"
        )
        return [failed, *checks], None
    return [Check("settings", OK, "every variable valid"), *checks], settings


def _fallback_problem(urls: tuple[str, ...]) -> str | None:
    """What the daemon would refuse in ALERT_FALLBACK_URLS at start (Apprise reads them), else None."""
    if not urls:
        return None
    from alerts import AppriseFallback

    try:
        AppriseFallback(urls)
    except ValueError as exc:
        return str(exc)
    return None


def check_keys(settings) -> list[Check]:  # noqa: ANN001 - config.Settings, imported lazily
    """The Polygon key is required for the live daemon; the Pushover keys are optional (log-only alerts)."""
    from config import mask, pushover_key_warnings

    polygon = Check(
        "Polygon key",
        passed(bool(settings.polygon_api_key)),
        mask(settings.polygon_api_key),
        "set POLYGON_API_KEY (or MASSIVE_API_KEY) in .env; the demo needs none: python3 main.py --demo",
    )
    pushover_set = bool(settings.pushover_token and settings.pushover_user_key)
    # The same warning the daemon logs at start: a key not of Pushover's shape is a typo it will refuse.
    unusual = pushover_key_warnings(settings)
    pushover = Check(
        "Pushover keys",
        OK if pushover_set and not unusual else WARN,
        f"token {mask(settings.pushover_token)}, user {mask(settings.pushover_user_key)}",
        "; ".join(unusual)
        or "optional: without PUSHOVER_TOKEN and PUSHOVER_USER_KEY alerts only go to the log",
    )
    return [polygon, pushover]


def check_calendar(settings, now_ms: int) -> Check:  # noqa: ANN001
    from market_calendar import MarketCalendar, ny_date, ny_datetime

    calendar = MarketCalendar(settings.rules, settings.market_closed_dates)
    today = ny_date(now_ms)
    session = calendar.session(today)
    if session is None or now_ms >= session.close_ms:  # after today's close, the next one is tomorrow's
        session = calendar.next_session(today)
    closes = ny_datetime(session.close_ms).strftime("%H:%M")
    early = " (early close)" if session.early_close else ""
    return Check("market calendar", OK, f"next session {session.date} closes {closes} ET{early}")


def tape_budget(settings) -> str:  # noqa: ANN001
    """What recording costs on the disk, in words."""
    if not settings.record:
        return "recording off (RECORD=0)"
    days = settings.record_retention_days
    # Calendar days: about 5 sessions in 7 (holidays aside), each one tape.
    sessions = max(1, round(days * 5 / 7))
    kept = f"about {sessions * TAPE_DAY_BYTES / 1e6:.0f} MB ({sessions} sessions)" if days else "every tape"
    return f"a full day of tape takes about {TAPE_DAY_BYTES / 1e6:.0f} MB; RECORD_RETENTION_DAYS={days} keeps {kept}"


def disk_status(free: int) -> tuple[str, str]:
    """OK, WARN below 200 MB free, FAIL below 50 MB (Render's disk is 1 GB); with the fix to print."""
    if free < FAIL_FREE_BYTES:
        return FAIL, f"free at least {FAIL_FREE_BYTES / 1e6:.0f} MB: the journal and today's tape need room"
    if free < WARN_FREE_BYTES:
        return (
            WARN,
            f"under {WARN_FREE_BYTES / 1e6:.0f} MB free: lower RECORD_RETENTION_DAYS or grow the disk",
        )
    return OK, ""


def check_disk(settings, free_bytes: Callable[[Path], int] | None = None) -> Check:  # noqa: ANN001
    """DATA_DIR is writable, the journal opens, and there is room for the tapes."""
    from pnl_tracker import Journal, JournalError

    folder = Path(settings.data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".diagnose-write-test"
        probe.write_text("ok")
        probe.unlink()
        Journal(folder / "journal.sqlite3", check=True).close()
    except (OSError, JournalError) as exc:
        return Check("data folder", FAIL, f"{folder}: {exc}", "point DATA_DIR at a writable folder")
    free = (free_bytes or (lambda p: shutil.disk_usage(p).free))(folder)
    status, fix = disk_status(free)
    detail = f"{folder.resolve()} writable, journal opens, {free / 1e6:,.0f} MB free; {tape_budget(settings)}"
    return Check("data folder", status, detail, fix)


def check_polygon_rest(settings, today: date) -> Check:  # noqa: ANN001
    from clock import WallClock
    from polygon_client import PolygonRest, error_text

    rest = PolygonRest(settings.polygon_rest_url, settings.polygon_api_key, clock_ms=WallClock().now_ms,
                       max_attempts=2, timeout_s=10.0)  # fmt: skip
    answers = rest.chain_pages(settings.rules.underlying, today, spot=None)
    rest.close()
    status = answers[-1].status if answers else 0
    if status == 200:
        return Check("Polygon REST", OK, f"chain snapshot answered ({len(answers)} page(s))")
    hints = {401: "the key is wrong", 403: "the plan lacks options snapshots"}
    detail = f"HTTP {status}: {error_text(answers[-1].body) if answers else 'no answer'}"
    return Check("Polygon REST", FAIL, detail, hints.get(status, "check POLYGON_REST_URL and the network"))


def check_polygon_stream(settings) -> Check:  # noqa: ANN001
    async def authenticate() -> str:
        from websockets.asyncio.client import connect

        async with connect(settings.polygon_ws_url, open_timeout=10) as socket:
            await asyncio.wait_for(socket.recv(), 10)
            await socket.send(json.dumps({"action": "auth", "params": settings.polygon_api_key}))
            reply = json.loads(await asyncio.wait_for(socket.recv(), 10))
            return str(reply[0].get("status", "")) if reply else ""

    try:
        status = asyncio.run(authenticate())
    except (OSError, TimeoutError, ValueError) as exc:
        return Check("Polygon stream", FAIL, f"{type(exc).__name__}: {exc}", "check POLYGON_WS_URL")
    except Exception as exc:  # noqa: BLE001 - websockets raises many kinds; all mean "not reachable"
        return Check("Polygon stream", FAIL, type(exc).__name__, "check POLYGON_WS_URL and the plan")
    ok = status == "auth_success"
    return Check(
        "Polygon stream",
        passed(ok),
        f"auth answered {status!r}",
        "" if ok else "the key or plan lacks streaming",
    )


def check_pushover(settings) -> Check:  # noqa: ANN001
    import httpx

    url = settings.pushover_api_url.replace("messages.json", "users/validate.json")
    form = {"token": settings.pushover_token, "user": settings.pushover_user_key}
    try:
        answer = httpx.post(url, data=form, timeout=10.0)
        body = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        return Check(
            "Pushover keys valid", FAIL, type(exc).__name__, "check PUSHOVER_API_URL and the network"
        )
    ok = answer.status_code == 200 and body.get("status") == 1
    errors = "; ".join(body.get("errors", [])) if isinstance(body, dict) else ""
    return Check("Pushover keys valid", passed(ok), "validated" if ok else f"HTTP {answer.status_code} {errors}",
                 "" if ok else "copy the token and user key again from pushover.net")  # fmt: skip


def network_checks(settings, today: date) -> list[Check]:  # noqa: ANN001
    """Probe Polygon and Pushover, each only when its keys are set (a probe without keys proves nothing).

    A peer can echo a key in its error (a 401 body, a Pushover 400 naming the token): every detail and
    every log line of the probes goes through the settings' redactor.
    """
    from logs import configure_logging

    configure_logging("WARNING", "console", settings.secret_values())
    redact = settings.redactor()
    return [
        dataclasses.replace(check, detail=redact(check.detail), fix=redact(check.fix))
        for check in _probes(settings, today)
    ]


def _probes(settings, today: date) -> list[Check]:  # noqa: ANN001
    if settings.polygon_api_key:
        polygon = [check_polygon_rest(settings, today), check_polygon_stream(settings)]
    else:
        polygon = [
            Check(name, SKIP, "skipped: no POLYGON_API_KEY") for name in ("Polygon REST", "Polygon stream")
        ]
    if settings.pushover_token and settings.pushover_user_key:
        return [*polygon, check_pushover(settings)]
    return [*polygon, Check("Pushover keys valid", SKIP, "skipped: no PUSHOVER_TOKEN and PUSHOVER_USER_KEY")]


def run_checks(network: bool, now_ms: int) -> list[Check]:
    """Every check in order; later ones need the earlier ones (packages, then settings) to pass."""
    checks = [check_python(), check_packages()]
    if not checks[-1].ok:
        return checks
    settings_checks, settings = check_settings()
    checks += settings_checks
    if settings is None:
        return checks
    checks += check_keys(settings)
    checks += [check_calendar(settings, now_ms), check_disk(settings)]
    if network:
        from market_calendar import ny_date

        checks += network_checks(settings, ny_date(now_ms))
    return checks


def summary(checks: list[Check]) -> str:
    """`Checks: 5 ok, 1 warning, 2 skipped, 1 to fix.`"""
    counts = {status: sum(c.status == status for c in checks) for status in MARKS}
    parts = [f"{counts[OK]} ok"]
    parts += [f"{counts[WARN]} warning{'s' if counts[WARN] != 1 else ''}"] if counts[WARN] else []
    parts += [f"{counts[SKIP]} skipped"] if counts[SKIP] else []
    parts.append(f"{counts[FAIL]} to fix" if counts[FAIL] else "nothing to fix")
    return f"Checks: {', '.join(parts)}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--network", action="store_true", help="also check the Polygon key/plan and Pushover keys"
    )
    args = parser.parse_args(argv)
    python = check_python()
    if not python.ok:  # the project's own modules need 3.11: say so before importing them
        print(python.line())
        return 1
    from clock import WallClock

    checks = run_checks(args.network, WallClock().now_ms())
    for check in checks:
        print(check.line())
    print(f"\n{summary(checks)}")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    from cli_exit import run_quietly

    sys.exit(run_quietly(main))
