"""diagnose.py as a new user runs it: a checklist, masked secrets, exit 0 unless a check fails."""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from builders import at

from config import settings_from_env
from diagnose import (
    FAIL,
    FAIL_FREE_BYTES,
    FALLBACK_REQUIREMENTS,
    OK,
    TAPE_DAY_BYTES,
    WARN,
    WARN_FREE_BYTES,
    check_disk,
    check_packages,
    disk_status,
    distribution_name,
    import_name,
    runtime_requirements,
)
from sim.market import SyntheticMarket, demo_script
from sim.polygon_server import FakePolygon, SyntheticSource
from sim.pushover_server import FakePushover
from tape import TapeWriter
from tape_recorder import FLUSH_SECONDS as TAPE_FLUSH_SECONDS

ROOT = Path(__file__).resolve().parents[1]
KEY, TOKEN, USER = "testkey1234", "t" * 30, "u" * 30


def diagnose(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))}
    return subprocess.run([sys.executable, str(ROOT / "diagnose.py"), *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_fresh_checkout_without_keys_fails_with_a_clear_checklist(tmp_path):
    done = diagnose([], {"PYTHON_DOTENV_DISABLED": "1", "DATA_DIR": str(tmp_path / "data")}, tmp_path)
    assert done.returncode == 1
    out = done.stdout
    assert "[ OK ] Python" in out and "[ OK ] packages" in out and "[ OK ] settings" in out
    assert "[FAIL] Polygon key: (unset)" in out and "-> set POLYGON_API_KEY" in out
    # The README calls the Pushover keys optional: a warning, not a failure.
    assert "[WARN] Pushover keys" in out and "-> optional:" in out
    assert "[ OK ] data folder" in out and "a full day of tape takes about 10 MB" in out
    assert out.rstrip().endswith("Checks: 5 ok, 1 warning, 1 to fix.")


def test_polygon_key_without_pushover_passes_with_a_warning(tmp_path):
    done = diagnose([], {"DATA_DIR": str(tmp_path / "data"), "POLYGON_API_KEY": KEY}, tmp_path)
    assert done.returncode == 0, done.stdout
    assert "[WARN] Pushover keys" in done.stdout and "[FAIL]" not in done.stdout
    assert KEY not in done.stdout and "1 warning, nothing to fix" in done.stdout


def test_a_pushover_key_not_of_pushovers_shape_is_a_warning_as_the_daemon_logs_it(tmp_path):
    """diagnose said OK to a token the daemon warns about at start ("Pushover will likely refuse it")."""
    env = {"DATA_DIR": str(tmp_path / "data"), "POLYGON_API_KEY": KEY, "PUSHOVER_TOKEN": "short123",
           "PUSHOVER_USER_KEY": USER, "PYTHON_DOTENV_DISABLED": "1"}  # fmt: skip
    done = diagnose([], env, tmp_path)
    assert done.returncode == 0, done.stdout
    assert "[WARN] Pushover keys" in done.stdout and "PUSHOVER_TOKEN=" in done.stdout
    assert "not 30 letters and digits" in done.stdout and "short123" not in done.stdout


def test_chatty_log_level_is_invalid(tmp_path):
    done = diagnose([], {"DATA_DIR": str(tmp_path / "data"), "LOG_LEVEL": "CHATTY"}, tmp_path)
    assert done.returncode == 1
    assert "[FAIL] settings: LOG_LEVEL='CHATTY': expected one of DEBUG, INFO" in done.stdout


def test_misspelled_dotenv_key_is_a_warning_with_the_nearest_name(tmp_path):
    (tmp_path / ".env").write_text(f"STOP_LOS_PERCENT=10\nPOLYGON_API_KEY={KEY}\nDATA_DIR={tmp_path / 'd'}\n")
    done = diagnose([], {}, tmp_path)
    assert done.returncode == 0, done.stdout
    assert (
        "[WARN] .env keys: .env sets STOP_LOS_PERCENT, which no setting reads; did you mean STOP_LOSS_PERCENT?"
        in done.stdout
    )


def test_network_without_keys_probes_nothing_and_says_skipped(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        env = {
            "DATA_DIR": str(tmp_path / "data"), "POLYGON_REST_URL": f"http://127.0.0.1:{port}",
            "POLYGON_WS_URL": f"ws://127.0.0.1:{port}/stocks",
            "PUSHOVER_API_URL": f"http://127.0.0.1:{port}/1/messages.json",
        }  # fmt: skip
        done = diagnose(["--network"], env, tmp_path)
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody connected
    out = done.stdout
    assert "[ -- ] Polygon REST: skipped: no POLYGON_API_KEY" in out
    assert "[ -- ] Polygon stream: skipped: no POLYGON_API_KEY" in out
    assert "[ -- ] Pushover keys valid: skipped: no PUSHOVER_TOKEN and PUSHOVER_USER_KEY" in out
    assert "599" not in out and "3 skipped" in out and done.returncode == 1


def test_bad_setting_is_named(tmp_path):
    done = diagnose([], {"PYTHON_DOTENV_DISABLED": "1", "DELTA_MIN": "0.9", "DELTA_MAX": "0.4"}, tmp_path)
    assert done.returncode == 1 and "[FAIL] settings: DELTA_MIN=0.9 > DELTA_MAX=0.4" in done.stdout


@pytest.mark.parametrize(
    "env, named",
    [
        (
            {"ALERT_FALLBACK_URLS": "notascheme://secret-topic-x"},
            "ALERT_FALLBACK_URLS=nota…(27 chars): Apprise cannot use it",
        ),
        ({"SIM_CLOCK_START": "bad"}, "SIM_CLOCK_START='bad'"),
    ],  # fmt: skip
)
def test_what_the_daemon_refuses_at_start_diagnose_fails_too(tmp_path, env, named):
    done = diagnose([], {"POLYGON_API_KEY": KEY, "DATA_DIR": str(tmp_path / "data"), **env}, tmp_path)
    assert done.returncode == 1
    assert "[FAIL] settings: " + named in done.stdout
    assert "secret-topic-x" not in done.stdout + done.stderr


def test_network_checks_pass_against_the_fakes(tmp_path):
    market = SyntheticMarket(demo_script())
    with (
        FakePushover() as pushover,
        FakePolygon(SyntheticSource(market), api_key=KEY, start_ms=at(10, 0), speed=1.0) as polygon,
    ):
        env = {
            "PYTHON_DOTENV_DISABLED": "1", "DATA_DIR": str(tmp_path / "data"), "POLYGON_API_KEY": KEY,
            "POLYGON_WS_URL": polygon.ws_url, "POLYGON_REST_URL": polygon.rest_url, "PUSHOVER_TOKEN": TOKEN,
            "PUSHOVER_USER_KEY": USER, "PUSHOVER_API_URL": pushover.url,
        }  # fmt: skip
        done = diagnose(["--network"], env, tmp_path)
        assert polygon.auth_attempts >= 1
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("Polygon REST", "Polygon stream", "Pushover keys valid"):
        assert f"[ OK ] {name}" in done.stdout
    assert KEY not in done.stdout and TOKEN not in done.stdout and "nothing to fix" in done.stdout


def test_network_check_reports_a_wrong_key(tmp_path):
    market = SyntheticMarket(demo_script())
    with (
        FakePushover() as pushover,
        FakePolygon(
            SyntheticSource(market), api_key="anotherkey99", start_ms=at(10, 0), speed=1.0
        ) as polygon,
    ):
        env = {
            "PYTHON_DOTENV_DISABLED": "1", "DATA_DIR": str(tmp_path / "data"), "POLYGON_API_KEY": KEY,
            "POLYGON_WS_URL": polygon.ws_url, "POLYGON_REST_URL": polygon.rest_url, "PUSHOVER_TOKEN": TOKEN,
            "PUSHOVER_USER_KEY": USER, "PUSHOVER_API_URL": pushover.url,
        }  # fmt: skip
        done = diagnose(["--network"], env, tmp_path)
    assert done.returncode == 1
    assert "[FAIL] Polygon REST: HTTP 401" in done.stdout and "the key is wrong" in done.stdout
    assert "[FAIL] Polygon stream" in done.stdout


def test_packages_are_read_from_requirements_with_their_import_names():
    requirements = runtime_requirements(ROOT / "requirements.txt")
    names = [distribution_name(r) for r in requirements]
    listed = re.findall(r"^([A-Za-z0-9._-]+)", (ROOT / "requirements.txt").read_text(), flags=re.M)
    assert names == listed and "orjson" in names and "python-dotenv" in names
    assert (
        import_name("python-dotenv") == "dotenv" and import_name("exchange-calendars") == "exchange_calendars"
    )
    check = check_packages(requirements)
    assert check.status == OK and f"{len(listed)} runtime packages import" in check.detail


def test_missing_and_out_of_range_packages_fail_by_name(tmp_path):
    assert runtime_requirements(tmp_path / "absent.txt") == list(FALLBACK_REQUIREMENTS)
    check = check_packages(["numpy<1", "surely-not-installed-pkg>=1", "httpx"])
    assert check.status == FAIL
    assert "surely-not-installed-pkg missing" in check.detail and re.search(
        r"numpy \S+ \(wants <1\)", check.detail
    )
    assert "httpx" not in check.detail and "-> python3 -m pip install -r requirements.lock" in check.line()


def render_disk_bytes() -> int:
    """The size of the disk render.yaml gives the worker."""
    size_gb = re.search(r"^\s*sizeGB:\s*(\d+)\s*$", (ROOT / "render.yaml").read_text(), flags=re.M)
    assert size_gb is not None
    return int(size_gb.group(1)) * 10**9


def test_disk_thresholds_fit_the_render_disk():
    disk = render_disk_bytes()
    settings = settings_from_env({})
    # An empty Render disk passes with room to spare, and the default retention fits beside the warning margin.
    assert disk_status(disk)[0] == OK and FAIL_FREE_BYTES < WARN_FREE_BYTES <= disk / 4
    assert settings.record_retention_days * TAPE_DAY_BYTES + WARN_FREE_BYTES <= disk / 2


@pytest.mark.parametrize(
    "free, status",
    [(10**9, OK), (WARN_FREE_BYTES, OK), (WARN_FREE_BYTES - 1, WARN), (FAIL_FREE_BYTES - 1, FAIL)],
)
def test_disk_check_warns_then_fails_as_space_runs_out(tmp_path, free, status):
    settings = settings_from_env({"DATA_DIR": str(tmp_path / "data")})
    check = check_disk(settings, free_bytes=lambda _folder: free)
    assert check.status == status and (check.ok is (status != FAIL))
    assert f"{free / 1e6:,.0f} MB free" in check.detail and (tmp_path / "data" / "journal.sqlite3").is_file()


def test_tape_budget_matches_a_measured_synthetic_day(demo_tape, tmp_path):
    """Re-record the synthetic full day as the daemon records (TapeWriter defaults, a member every 5 s)."""
    with gzip.open(demo_tape, "rt") as source:
        lines = [json.loads(line) for line in source]
    meta = lines[0]["meta"]
    path = tmp_path / "day.jsonl.gz"
    with TapeWriter(
        path, underlying=meta["underlying"], benchmark=meta["benchmark"], start_ms=lines[0]["t"]
    ) as tape:
        flushed = lines[0]["t"]
        for line in lines[1:]:
            if "ws" in line:
                tape.write_ws(line["t"], line["ws"])
            elif "rest" in line:
                tape.write_rest(line["t"], line["rest"], line["status"], line["body"])
            else:
                tape.write_control(line["t"], line["control"])
            if line["t"] - flushed >= TAPE_FLUSH_SECONDS * 1000:
                tape.flush()
                flushed = line["t"]
    assert (lines[-1]["t"] - lines[0]["t"]) / 3_600_000 > 6.5  # a full session
    measured = path.stat().st_size
    assert 0.7 * TAPE_DAY_BYTES <= measured <= 1.3 * TAPE_DAY_BYTES, measured


def test_the_calendar_check_names_tomorrow_once_today_s_session_has_closed():
    """At 16:45 it said "next session <today> closes 16:00", a session already over."""
    import datetime

    from config import Settings
    from diagnose import check_calendar
    from market_calendar import ny_ms

    day = datetime.date(2025, 10, 2)
    during = check_calendar(Settings(), ny_ms(day, datetime.time(10, 0))).line()
    after = check_calendar(Settings(), ny_ms(day, datetime.time(16, 45))).line()
    assert "next session 2025-10-02 closes 16:00 ET" in during
    assert "next session 2025-10-03 closes 16:00 ET" in after


def test_a_c_locale_without_utf8_mode_replaces_what_it_cannot_print(tmp_path):
    """LC_ALL=C with UTF-8 mode off gives stdout `surrogateescape`, which the streams' guard skipped: the
    masked key's ellipsis ended diagnose.py with a traceback (a new user's audit)."""
    env = dict(LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0", PYTHONUTF8="0", PYTHONIOENCODING="",
               PYTHON_DOTENV_DISABLED="1", POLYGON_API_KEY="abcdefghijklmnopqrstuvwxyz",
               DATA_DIR=str(tmp_path / "d"))  # fmt: skip
    done = diagnose([], env, tmp_path)
    assert "Traceback" not in done.stderr and "Polygon" in done.stdout, done.stderr[-2000:]
