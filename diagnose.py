"""`python diagnose.py [--network]`: set-up checks for a new user, printed as a checklist.

Offline it checks Python, packages, settings, the market calendar and the data folder. With
`--network` it also asks Polygon for today's chain (key and plan), authenticates on the stream and
validates the Pushover keys. Exit status 0 only when every check passes. Secrets are masked.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

REQUIRED_PACKAGES = (
    "exchange_calendars",
    "websockets",
    "httpx",
    "structlog",
    "dotenv",
    "numpy",
    "matplotlib",
)
MIN_FREE_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "[ OK ]" if self.ok else "[FAIL]"
        text = f"{mark} {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text}\n       -> {self.fix}"


def check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    ok = sys.version_info >= (3, 11)
    return Check("Python", ok, version, "" if ok else "install Python 3.11 or newer")


def check_packages() -> Check:
    missing = []
    for name in REQUIRED_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        return Check(
            "packages", False, f"missing {', '.join(missing)}", "python3 -m pip install -r requirements.txt"
        )
    return Check("packages", True, f"{len(REQUIRED_PACKAGES)} required packages import")


def check_settings() -> tuple[Check, object | None]:
    from config import ConfigError, load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        return Check("settings", False, "; ".join(exc.problems), "fix the variables named above (.env)"), None
    return Check("settings", True, "every variable valid"), settings


def check_keys(settings) -> list[Check]:  # noqa: ANN001 - config.Settings, imported lazily
    from config import mask

    polygon = Check(
        "Polygon key",
        bool(settings.polygon_api_key),
        mask(settings.polygon_api_key),
        "set POLYGON_API_KEY (or MASSIVE_API_KEY) in .env; the demo needs none: python main.py --demo",
    )
    pushover_set = bool(settings.pushover_token and settings.pushover_user_key)
    pushover = Check(
        "Pushover keys",
        pushover_set,
        f"token {mask(settings.pushover_token)}, user {mask(settings.pushover_user_key)}",
        "set PUSHOVER_TOKEN and PUSHOVER_USER_KEY; without them alerts only go to the log",
    )
    return [polygon, pushover]


def check_calendar(settings, today: date) -> Check:  # noqa: ANN001
    from market_calendar import MarketCalendar, ny_datetime

    calendar = MarketCalendar(settings.rules, settings.market_closed_dates)
    session = calendar.session(today) or calendar.next_session(today)
    closes = ny_datetime(session.close_ms).strftime("%H:%M")
    early = " (early close)" if session.early_close else ""
    return Check("market calendar", True, f"next session {session.date} closes {closes} ET{early}")


def check_disk(settings) -> Check:  # noqa: ANN001
    from pnl_tracker import Journal, JournalError

    folder = Path(settings.data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".diagnose-write-test"
        probe.write_text("ok")
        probe.unlink()
        Journal(folder / "journal.sqlite3").close()
    except (OSError, JournalError) as exc:
        return Check("data folder", False, f"{folder}: {exc}", "point DATA_DIR at a writable folder")
    free = shutil.disk_usage(folder).free
    ok = free >= MIN_FREE_BYTES
    detail = f"{folder.resolve()} writable, journal opens, {free / 1e9:.1f} GB free"
    return Check("data folder", ok, detail, "" if ok else "free at least 1 GB for tapes")


def check_polygon_rest(settings, today: date) -> Check:  # noqa: ANN001
    from clock import WallClock
    from polygon_client import PolygonRest, error_text

    rest = PolygonRest(settings.polygon_rest_url, settings.polygon_api_key, clock_ms=WallClock().now_ms,
                       max_attempts=2, timeout_s=10.0)  # fmt: skip
    answers = rest.chain_pages(settings.rules.underlying, today, spot=None)
    rest.close()
    status = answers[-1].status if answers else 0
    if status == 200:
        return Check("Polygon REST", True, f"chain snapshot answered ({len(answers)} page(s))")
    hints = {401: "the key is wrong", 403: "the plan lacks options snapshots"}
    detail = f"HTTP {status}: {error_text(answers[-1].body) if answers else 'no answer'}"
    return Check("Polygon REST", False, detail, hints.get(status, "check POLYGON_REST_URL and the network"))


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
        return Check("Polygon stream", False, f"{type(exc).__name__}: {exc}", "check POLYGON_WS_URL")
    except Exception as exc:  # noqa: BLE001 - websockets raises many kinds; all mean "not reachable"
        return Check("Polygon stream", False, type(exc).__name__, "check POLYGON_WS_URL and the plan")
    ok = status == "auth_success"
    return Check(
        "Polygon stream", ok, f"auth answered {status!r}", "" if ok else "the key or plan lacks streaming"
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
            "Pushover keys valid", False, type(exc).__name__, "check PUSHOVER_API_URL and the network"
        )
    ok = answer.status_code == 200 and body.get("status") == 1
    errors = "; ".join(body.get("errors", [])) if isinstance(body, dict) else ""
    return Check("Pushover keys valid", ok, "validated" if ok else f"HTTP {answer.status_code} {errors}",
                 "" if ok else "copy the token and user key again from pushover.net")  # fmt: skip


def run_checks(network: bool, today: date) -> list[Check]:
    checks = [check_python(), check_packages()]
    if not checks[-1].ok:
        return checks
    settings_check, settings = check_settings()
    checks.append(settings_check)
    if settings is None:
        return checks
    checks += check_keys(settings)
    checks += [check_calendar(settings, today), check_disk(settings)]
    if network:
        online: list[Callable[[], Check]] = [
            lambda: check_polygon_rest(settings, today),
            lambda: check_polygon_stream(settings),
            lambda: check_pushover(settings),
        ]
        checks += [probe() for probe in online]
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--network", action="store_true", help="also check the Polygon key/plan and Pushover keys"
    )
    args = parser.parse_args(argv)
    from clock import WallClock
    from market_calendar import ny_date

    checks = run_checks(args.network, ny_date(WallClock().now_ms()))
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    verdict = "all good" if not failed else f"{len(failed)} to fix"
    print(f"\nChecks: {len(checks) - len(failed)} ok, {verdict}.")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
