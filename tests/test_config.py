"""Settings: every variable documented, every problem reported at once, secrets masked, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from datetime import time
from pathlib import Path

import pytest
from dotenv import dotenv_values

from config import ConfigError, Rules, Settings, load_settings, settings_from_env

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "azGDORePK8gMaC0QOYAMyEEuzJnyUi"


def test_env_example_lists_every_setting_and_parses_to_the_defaults():
    example = dotenv_values(ROOT / ".env.example")
    names = {f.name.upper() for f in fields(Rules)} | {f.name.upper() for f in fields(Settings)} - {"RULES"}
    assert names <= set(example)
    parsed = settings_from_env({k: v for k, v in example.items() if v})
    assert parsed.rules == Rules()


def test_every_problem_is_reported_at_once_with_masked_secrets():
    with pytest.raises(ConfigError) as caught:
        settings_from_env(
            {
                "DELTA_MIN": "abc",
                "STOP_LOSS_PERCENT": "150",
                "NO_ENTRY_BEFORE": "9am",
                "PUSHOVER_TOKEN": "short-secret-value",
                "ENTRY_BLACKOUTS": "13:30-11:30",
                "CONTRACTS": "1.5",
                "CHAIN_MAX_AGE_SECONDS": "nan",
            }
        )
    problems = caught.value.problems
    assert sorted(p.split("=")[0] for p in problems) == [
        "CHAIN_MAX_AGE_SECONDS",
        "CONTRACTS",
        "DELTA_MIN",
        "ENTRY_BLACKOUTS",
        "NO_ENTRY_BEFORE",
        "PUSHOVER_TOKEN",
        "STOP_LOSS_PERCENT",
    ]
    assert "short-secret-value" not in str(caught.value)
    assert "shor…(18 chars)" in str(caught.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="DELTA_MIN=0.5 > DELTA_MAX=0.4"):
        settings_from_env({"DELTA_MIN": "0.5", "DELTA_MAX": "0.4"})


def test_values_parse_and_repr_masks_secrets():
    s = settings_from_env(
        {
            "ENTRY_BLACKOUTS": "11:30-13:30, 15:00-15:10",
            "PUSHOVER_TOKEN": TOKEN,
            "PUSHOVER_USER_KEY": TOKEN,
            "MASSIVE_API_KEY": "abcdefghijkl12345",
            "RECORD": "0",
            "MARKET_CLOSED_DATES": "2025-01-09",
            "RELATIVE_VOLUME_REQUIRED": "yes",
        }
    )
    assert s.rules.entry_blackouts == ((time(11, 30), time(13, 30)), (time(15), time(15, 10)))
    assert s.polygon_api_key == "abcdefghijkl12345" and s.record is False and s.rules.relative_volume_required
    assert TOKEN not in repr(s) and "abcdefghijkl12345" not in repr(s)


def test_environment_wins_over_dotenv(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CONTRACTS=3\nCOOLDOWN_SECONDS=90\n")
    settings = load_settings(env_file, environ={"CONTRACTS": "5"})
    assert (settings.rules.contracts, settings.rules.cooldown_seconds) == (5, 90.0)


def test_main_exits_2_naming_the_bad_variable(tmp_path):
    env = {**os.environ, "DELTA_MAX": "two", "POLYGON_API_KEY": "", "PYTHON_DOTENV_DISABLED": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "DELTA_MAX='two'" in done.stderr


def test_live_mode_without_key_exits_2_and_points_to_demo(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("API_KEY")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--demo" in done.stderr


def test_replay_cli_logs_alerts_and_uses_its_own_journal(demo_tape, tmp_path):
    env = {**os.environ, "PYTHON_DOTENV_DISABLED": "1", "DATA_DIR": str(tmp_path), "LOG_FORMAT": "json"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--replay", str(demo_tape)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        done.stderr.count("IWM 0DTE CALL — BUY") >= 2 or done.stderr.count("IWM 0DTE CALL \\u2014 BUY") >= 2
    )
    assert (tmp_path / "replay.sqlite3").is_file() and not (tmp_path / "journal.sqlite3").exists()
    assert '"still_pending": 0' in done.stderr


def test_pause_and_resume_switch_the_file_the_daemon_watches(tmp_path):
    env = {**os.environ, "PYTHON_DOTENV_DISABLED": "1", "DATA_DIR": str(tmp_path)}
    paused = subprocess.run([sys.executable, str(ROOT / "main.py"), "--pause"], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert (
        paused.returncode == 0
        and (tmp_path / "PAUSE").is_file()
        and "Exits and SELL alerts continue" in paused.stdout
    )
    resumed = subprocess.run([sys.executable, str(ROOT / "main.py"), "--resume"], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert resumed.returncode == 0 and not (tmp_path / "PAUSE").exists()
