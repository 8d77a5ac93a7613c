"""diagnose.py as a new user runs it: a checklist, masked secrets, exit 0 only when all pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from builders import at

from sim.market import SyntheticMarket, demo_script
from sim.polygon_server import FakePolygon, SyntheticSource
from sim.pushover_server import FakePushover

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
    assert "[FAIL] Pushover keys" in out and "[ OK ] data folder" in out and "2 to fix" in out


def test_bad_setting_is_named(tmp_path):
    done = diagnose([], {"PYTHON_DOTENV_DISABLED": "1", "DELTA_MIN": "0.9", "DELTA_MAX": "0.4"}, tmp_path)
    assert done.returncode == 1 and "[FAIL] settings: DELTA_MIN=0.9 > DELTA_MAX=0.4" in done.stdout


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
    assert KEY not in done.stdout and TOKEN not in done.stdout and "all good" in done.stdout


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
