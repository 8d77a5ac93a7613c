"""Settings: every variable documented, every problem reported at once, secrets masked, exit status 2."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import fields
from datetime import time
from pathlib import Path

import pytest
from dotenv import dotenv_values

from config import (
    ConfigError,
    Rules,
    Settings,
    known_names,
    load_settings,
    pushover_key_warnings,
    settings_from_env,
    unknown_keys,
)
from dotenv_file import DotenvFile

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
                "PUSHOVER_TOKEN": "short-secret value",
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
    assert "short-secret value" not in str(caught.value)
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


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"HARD_TIME_STOP": "09:00"}, "HARD_TIME_STOP=09:00: expected later than 09:30"),
        ({"HARD_TIME_STOP": "09:00"}, "HARD_TIME_STOP=09:00: expected later than NO_ENTRY_BEFORE=09:35"),
        ({"HARD_TIME_STOP": "16:05"}, "HARD_TIME_STOP=16:05: expected 16:00 or earlier"),
        ({"NO_ENTRY_AFTER": "16:30"}, "NO_ENTRY_AFTER=16:30: expected 16:00 or earlier"),
        ({"NO_ENTRY_AFTER": "15:58"}, "NO_ENTRY_AFTER=15:58: expected no later than HARD_TIME_STOP=15:55"),
        ({"NO_ENTRY_BEFORE": "09:00"}, "NO_ENTRY_BEFORE=09:00: expected 09:30 or later"),
        ({"NO_ENTRY_BEFORE": "15:40"}, "NO_ENTRY_BEFORE=15:40: expected earlier than NO_ENTRY_AFTER=15:30"),
        (
            {"NO_ENTRY_AFTER": "16:00:30", "HARD_TIME_STOP": "16:00"},
            "NO_ENTRY_AFTER=16:00:30: expected 16:00",
        ),
        ({"BENCHMARK": "iwm"}, "BENCHMARK='IWM': expected a different ticker from UNDERLYING='IWM'"),
        ({"UNDERLYING": ""}, "UNDERLYING='': expected a ticker of 1-10 letters or dots"),
        ({"BENCHMARK": "SPY 500"}, "BENCHMARK='SPY 500': expected a ticker"),
        ({"UNDERLYING": "ABCDEFGHIJK"}, "UNDERLYING='ABCDEFGHIJK': expected a ticker"),
        (
            {"LOG_LEVEL": "CHATTY"},
            "LOG_LEVEL='CHATTY': expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml': expected console or json"),
    ],
)
def test_times_symbols_and_logging_are_checked_with_what_is_expected(env, expected):
    with pytest.raises(ConfigError) as caught:
        settings_from_env(env)
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value.problems


def test_every_contradiction_is_listed_at_once():
    with pytest.raises(ConfigError) as caught:
        settings_from_env(
            {"HARD_TIME_STOP": "09:00", "NO_ENTRY_AFTER": "16:30", "UNDERLYING": "", "LOG_LEVEL": "CHATTY"}
        )
    named = {problem.split("=")[0] for problem in caught.value.problems}
    assert named == {"HARD_TIME_STOP", "NO_ENTRY_AFTER", "UNDERLYING", "LOG_LEVEL"}


def test_edges_of_the_session_are_accepted_and_case_is_normalised():
    s = settings_from_env(
        {
            "NO_ENTRY_BEFORE": "09:30",
            "NO_ENTRY_AFTER": "16:00",
            "HARD_TIME_STOP": "16:00",
            "UNDERLYING": " brk.b ",
            "BENCHMARK": "qqq",
            "LOG_LEVEL": "warning",
            "LOG_FORMAT": "JSON",
            "OPTIONS_STREAM": "OFF",  # refused as not "auto or off"
        }
    )
    assert s.options_stream == "off"
    assert (s.rules.no_entry_before, s.rules.no_entry_after, s.rules.hard_time_stop) == (
        time(9, 30),
        time(16),
        time(16),
    )
    assert (s.rules.underlying, s.rules.benchmark, s.log_level, s.log_format) == (
        "BRK.B",
        "QQQ",
        "WARNING",
        "json",
    )


def test_unknown_dotenv_keys_name_the_nearest_variable(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "STOP_LOS_PERCENT=10\nCONTRACTS=2\nMASSIVE_API_KEY=abcdefghijkl\nlog_level=debug\nZZZ_QQQ=1\n"
    )
    assert unknown_keys(env_file) == [
        "warning: .env sets STOP_LOS_PERCENT, which no setting reads; did you mean STOP_LOSS_PERCENT?",
        "warning: .env sets log_level, which no setting reads; did you mean LOG_LEVEL?",
        "warning: .env sets ZZZ_QQQ, which no setting reads (see .env.example for every variable)",
    ]
    # The misspelled key is ignored, not applied: the default stop stays.
    assert load_settings(env_file, environ={}).rules.stop_loss_percent == 15.0


def test_a_setting_given_twice_in_dotenv_is_named_with_both_lines_and_the_last_wins(tmp_path):
    """The first value was dropped without a word."""
    env_file = tmp_path / ".env"
    env_file.write_text("STOP_LOSS_PERCENT=abc\nCONTRACTS=2\nSTOP_LOSS_PERCENT=12\nSTOP_LOSS_PERCENT=13\n")
    assert unknown_keys(env_file) == [
        "warning: .env sets STOP_LOSS_PERCENT on line 1 and again on line 3; the last one is used"
    ]
    assert load_settings(env_file, environ={}).rules.stop_loss_percent == 13.0


def test_a_key_pasted_on_a_line_of_its_own_is_never_printed(tmp_path):
    """python-dotenv reads a line without `=` as a NAME: the unknown-key warning printed the pasted key."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        "CONTRACTS=2\nSECRETpoly123456789\nPUSHOVER_TOKEN:SECRETtoken9876\nSECRETpoly123456789\n"
        "SECRETbase64Padded==\n"
    )
    warnings = unknown_keys(env_file)
    assert warnings == [
        f"warning: .env line {n} is not NAME=value; it is ignored (the line is not shown: it may hold a key)"
        for n in (2, 3, 5)
    ]
    assert not any("SECRET" in w for w in warnings)


def test_unknown_keys_ignore_the_process_environment_and_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STOP_LOS_PERCENT", "10")
    assert unknown_keys(tmp_path / "absent.env") == [] and unknown_keys(None) == []
    (tmp_path / ".env").write_text("CONTRACTS=2\n")
    assert unknown_keys(tmp_path / ".env") == []


def test_known_names_cover_every_field_and_the_massive_alias():
    names = known_names()
    assert {"STOP_LOSS_PERCENT", "LOG_LEVEL", "POLYGON_API_KEY", "MASSIVE_API_KEY", "UNDERLYING"} <= names
    assert "RULES" not in names
    assert len(names) == len(fields(Rules)) + len(fields(Settings)) - 1 + 1


def test_an_unknown_pushover_sound_stops_start_up():
    from config import ConfigError, settings_from_env

    with pytest.raises(ConfigError) as refused:
        settings_from_env({"ALERT_SOUND_SELL": "kazoo"})
    assert any(p.startswith("ALERT_SOUND_SELL='kazoo'") for p in refused.value.problems)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"DAILY_LOSS_LIMIT": "-300"}, "DAILY_LOSS_LIMIT='-300': expected a number at least 0"),
        ({"MAX_GIVEBACK_PERCENT": "150"}, "MAX_GIVEBACK_PERCENT='150': expected a number between 0 and 100"),
        ({"HEALTH_PORT": "abc"}, "HEALTH_PORT='abc': expected a whole number"),
        ({"MARKET_CLOSED_DATES": "bad"}, "MARKET_CLOSED_DATES='bad': expected dates as YYYY-MM-DD"),
        ({"SIM_CLOCK_START": "bad"}, "SIM_CLOCK_START='bad': expected an instant with its UTC offset"),
        ({"SIM_CLOCK_START": "2025-10-02T09:25:00"}, "SIM_CLOCK_START='2025-10-02T09:25:00': expected an"),
        (
            {"PUSHOVER_API_URL": "notaurl"},
            "PUSHOVER_API_URL='notaurl': expected a URL starting with https://",
        ),
        (
            {"POLYGON_WS_URL": "https://x.test"},
            "POLYGON_WS_URL='https://x.test': expected a URL starting with wss://",
        ),
        (
            {"POLYGON_REST_URL": "http://"},
            "POLYGON_REST_URL='http://': expected a URL starting with https://",
        ),
    ],
)
def test_a_bad_value_says_what_is_expected_in_plain_words(env, expected):
    with pytest.raises(ConfigError) as caught:
        settings_from_env(env)
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value.problems
    assert not any("None" in problem or "literal" in problem for problem in caught.value.problems)


@pytest.mark.parametrize("instant", ["9999-12-31T23:59:59+00:00", "0001-01-01T00:00:00+00:00"])
def test_a_sim_clock_outside_1970_to_2099_is_refused_not_a_traceback(tmp_path, instant):
    """Both passed the check, then `--status` ended in `OverflowError: date value out of range`."""
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"SIM_CLOCK_START": instant})
    assert caught.value.problems == [f"SIM_CLOCK_START={instant!r}: expected an instant from 1970 to 2099"]
    env = {"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "d"), "SIM_CLOCK_START": instant}
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--status"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_a_bad_sim_clock_is_listed_with_the_other_problems_and_a_heartbeat_url_stays_masked():
    secret = "hc-ping.example/very-secret-uuid"
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"SIM_CLOCK_START": "bad", "STOP_LOSS_PERCENT": "abc", "HEARTBEAT_URL": secret})
    names = [problem.split("=")[0] for problem in caught.value.problems]
    assert {"SIM_CLOCK_START", "STOP_LOSS_PERCENT", "HEARTBEAT_URL"} <= set(names)
    assert not any(secret in problem for problem in caught.value.problems)


def test_local_endpoints_and_empty_optional_ones_are_accepted():
    settings = settings_from_env(
        {
            "POLYGON_WS_URL": "ws://127.0.0.1:8765/stocks",
            "PUSHOVER_API_URL": "http://127.0.0.1:9/1/messages.json",
            "POLYGON_OPTIONS_WS_URL": "",
            "HEARTBEAT_URL": "",
            "HEALTH_PORT": "",
        }  # fmt: skip
    )
    assert settings.polygon_ws_url == "ws://127.0.0.1:8765/stocks" and settings.health_port is None


def test_an_unreadable_dotenv_line_is_named_once_by_number_never_by_its_text(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("STOP_LOSS_PERCENT=15\nPUSHOVER_TOKEN azGDORePK8gMaC0QOYAMyEEuzJnyUi\nCONTRACTS=2\n")
    warnings = unknown_keys(env_file)
    assert warnings == ["warning: .env line 2 cannot be read (expected NAME=value); it is ignored"]
    settings = load_settings(env_file, environ={})
    assert settings.rules.stop_loss_percent == 15 and settings.rules.contracts == 2
    env = {"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "d")}
    command = [sys.executable, str(ROOT / "main.py"), "--status"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
    assert done.stderr.count("line 2") == 1 and TOKEN not in done.stderr + done.stdout


# --- Endpoints: every malformed URL listed (never a traceback), ports checked, credentials never shown ---

ENDPOINTS = (
    "POLYGON_REST_URL",
    "POLYGON_WS_URL",
    "POLYGON_OPTIONS_WS_URL",
    "PUSHOVER_API_URL",
    "HEARTBEAT_URL",
)


@pytest.mark.parametrize("name", ENDPOINTS)
def test_an_unparseable_endpoint_is_listed_with_the_other_problems(name):
    with pytest.raises(ConfigError) as caught:
        settings_from_env({name: "http://[::1", "DELTA_MAX": "two"})
    named = {problem.split("=")[0] for problem in caught.value.problems}
    assert named == {name, "DELTA_MAX"}, caught.value.problems


def test_every_unparseable_endpoint_is_listed_at_once():
    with pytest.raises(ConfigError) as caught:
        settings_from_env({name: "ws://[::1" for name in ENDPOINTS})
    assert sorted(problem.split("=")[0] for problem in caught.value.problems) == sorted(ENDPOINTS)


def test_main_reports_an_unparseable_endpoint_with_exit_2_not_a_traceback(tmp_path):
    env = {"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "d"), "POLYGON_REST_URL": "http://[::1"}
    command = [sys.executable, str(ROOT / "main.py"), "--status"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "POLYGON_REST_URL='http://[::1': expected a URL" in done.stderr


@pytest.mark.parametrize("port", ["99999", "65536", "0", "abc", "-1"])
@pytest.mark.parametrize("name", ["POLYGON_REST_URL", "PUSHOVER_API_URL", "POLYGON_WS_URL"])
def test_an_endpoint_port_outside_1_to_65535_is_refused(name, port):
    scheme = "ws" if "WS" in name else "http"
    with pytest.raises(ConfigError) as caught:
        settings_from_env({name: f"{scheme}://127.0.0.1:{port}/x"})
    assert caught.value.problems == [
        f"{name}='{scheme}://127.0.0.1:{port}/x': expected a port from 1 to 65535 after the host"
        " (or none, for the scheme's default)"
    ]


def test_endpoint_ports_at_the_edges_are_accepted():
    settings = settings_from_env(
        {"POLYGON_REST_URL": "http://127.0.0.1:1", "POLYGON_WS_URL": "ws://[::1]:65535/stocks"}
    )
    assert settings.polygon_rest_url == "http://127.0.0.1:1"


@pytest.mark.parametrize(
    "name, value",
    [
        ("POLYGON_REST_URL", "htps://user:PLANTEDpw@api.massive.com"),
        ("POLYGON_REST_URL", "https://PLANTEDuser@api.massive.com:99999"),
        ("PUSHOVER_API_URL", "https//x?token=PLANTEDtok"),
        ("PUSHOVER_API_URL", "https//x?a=1&token=PLANTEDtok&PLANTEDflag#PLANTEDfragment"),
        ("POLYGON_WS_URL", "wss://user:PLANTED/pw@[::1"),
        ("POLYGON_OPTIONS_WS_URL", "wss://user:PLANTED?pw@h:0/options"),
        ("HEARTBEAT_URL", "hc-ping.example/PLANTED-uuid"),
    ],
)
def test_credentials_in_an_endpoint_never_appear_in_the_problem(name, value):
    with pytest.raises(ConfigError) as caught:
        settings_from_env({name: value, "STOP_LOSS_PERCENT": "abc"})
    assert {problem.split("=")[0] for problem in caught.value.problems} == {name, "STOP_LOSS_PERCENT"}
    assert "PLANTED" not in str(caught.value)


def test_a_masked_endpoint_still_shows_its_shape():
    with pytest.raises(ConfigError) as caught:
        settings_from_env(
            {"POLYGON_REST_URL": "htps://user:pw@api.massive.com", "PUSHOVER_API_URL": "https//x?token=t"}
        )
    shown = [problem.split(": ")[0] for problem in caught.value.problems]
    assert shown == [
        "POLYGON_REST_URL='htps://****@api.massive.com'",
        "PUSHOVER_API_URL='https//x?token=****'",
    ]


# --- HEALTH_HOST ---


@pytest.mark.parametrize("host", ["nan", "", "::1", "127.1", "example.com", "١٢٧.0.0.1"])
def test_a_health_host_the_server_cannot_bind_is_refused(host):
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"HEALTH_HOST": host})
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(
        f"HEALTH_HOST={host!r}: expected an IPv4 address such as 127.0.0.1"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "localhost", "8.8.8.8"])
def test_an_ipv4_health_host_or_localhost_is_accepted(host):
    # 8.8.8.8 is well-formed but not this machine's: binding it fails at run time, not here.
    assert settings_from_env({"HEALTH_HOST": host}).health_host == host


# --- .env that is not UTF-8 ---


def test_a_dotenv_value_that_is_not_utf8_is_a_config_problem_naming_the_line(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_bytes(
        b"# caf\xe9: a comment's bytes do no harm\nCONTRACTS=2\nPUSHOVER_TOKEN=PLANT\xff\xfeED\n"
    )
    assert unknown_keys(env_file) == []  # never raises; the problem is load_settings'
    with pytest.raises(ConfigError) as caught:
        load_settings(env_file, environ={"DELTA_MAX": "two"})
    assert caught.value.problems[0] == (
        ".env line 3 (PUSHOVER_TOKEN): not valid UTF-8 text; save the file as UTF-8"
        " (the line is not shown: it may hold a key)"
    )
    assert caught.value.problems[1].startswith("DELTA_MAX='two'") and len(caught.value.problems) == 2
    assert "PLANT" not in str(caught.value)


def test_a_dotenv_name_that_is_not_utf8_is_named_by_its_line_only(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"CONTRACTS=2\nSTOP_\xffLOSS=10\n")
    assert unknown_keys(env_file) == []
    with pytest.raises(ConfigError) as caught:
        load_settings(env_file, environ={})
    assert caught.value.problems == [
        ".env line 2: not valid UTF-8 text; save the file as UTF-8 (the line is not shown: it may hold a key)"
    ]


def test_a_dotenv_with_only_a_non_utf8_comment_loads(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_bytes(b"# r\xe9glages\nCONTRACTS=3\n")
    assert unknown_keys(env_file) == [] and load_settings(env_file, environ={}).rules.contracts == 3


@pytest.mark.parametrize("script", ["main.py", "diagnose.py"])
def test_main_and_diagnose_report_a_non_utf8_dotenv_without_a_traceback(tmp_path, script):
    (tmp_path / ".env").write_bytes(b"CONTRACTS=2\nPUSHOVER_TOKEN=azGDORePK8gMaC0QOYAMyEEuzJnyU\xe9\n")
    env = {"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "d")}
    command = [sys.executable, str(ROOT / script), *(["--status"] if script == "main.py" else [])]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
    output = done.stdout + done.stderr
    assert "Traceback" not in output and ".env line 2 (PUSHOVER_TOKEN): not valid UTF-8" in output
    assert "azGDORePK8gMaC0QOYAMyEEuzJnyU" not in output
    if script == "main.py":
        assert done.returncode == 2


# --- Messages name the variable and give the values ---


def test_the_giveback_contradiction_gives_both_values():
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"TIGHTEN_GIVEBACK_PERCENT": "40", "MAX_GIVEBACK_PERCENT": "25.5"})
    assert caught.value.problems == [
        "TIGHTEN_GIVEBACK_PERCENT must not exceed MAX_GIVEBACK_PERCENT (40 > 25.5)"
    ]


@pytest.mark.parametrize("name", ["MASSIVE_API_KEY", "POLYGON_API_KEY"])
def test_a_malformed_key_is_reported_under_the_variable_that_was_set(name):
    with pytest.raises(ConfigError) as caught:
        settings_from_env({name: "bad key with spaces"})
    assert [problem.split("=")[0] for problem in caught.value.problems] == [name]
    assert "bad key with spaces" not in str(caught.value)


@pytest.mark.parametrize("key", ["x", "test", "testkey", "tok-en_1", "azGDORePK8gMaC0QOYAMyEEuzJnyUi"])
def test_any_key_a_service_could_issue_is_accepted_and_judged_by_the_service(key):
    # Fakes and test plans use short keys; a wrong real key is refused by the service, said at run time.
    settings = settings_from_env({"POLYGON_API_KEY": key, "PUSHOVER_TOKEN": key, "PUSHOVER_USER_KEY": key})
    assert settings.polygon_api_key == settings.pushover_token == settings.pushover_user_key == key


@pytest.mark.parametrize("key", ["two words", 'quo"te', "it's", "back\\slash", "caf\u00e9", "x" * 257])
def test_a_key_no_service_could_issue_is_refused_without_showing_it(key):
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"PUSHOVER_USER_KEY": key})
    assert [p.split("=")[0] for p in caught.value.problems] == ["PUSHOVER_USER_KEY"]
    assert key not in str(caught.value)


# --- Windows that can never hold the points an entry needs ---


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {"VWAP_RISING_SECONDS": "10", "VWAP_RISING_MIN_POINTS": "11"},
            "VWAP_RISING_MIN_POINTS=11 > VWAP_RISING_SECONDS=10: the slope window holds at most 10 points",
        ),
        (
            {"VOLUME_WINDOW_SECONDS": "60", "VOLUME_MIN_BARS": "60"},
            "VOLUME_MIN_BARS=60 >= VOLUME_WINDOW_SECONDS=60: the window holds at most 59 earlier bars",
        ),
        (
            {"VOLUME_WINDOW_SECONDS": "30"},
            "VOLUME_MIN_BARS=60 >= VOLUME_WINDOW_SECONDS=30: the window holds at most 29 earlier bars",
        ),
    ],
)
def test_a_window_too_short_for_its_minimum_is_refused(env, expected):
    with pytest.raises(ConfigError) as caught:
        settings_from_env(env)
    assert [problem.startswith(expected) for problem in caught.value.problems] == [True], (
        caught.value.problems
    )


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"STOP_LOSS_PERCENT": "0"}, "STOP_LOSS_PERCENT=0 sells every trade at its first check"),
        (
            {"MAX_GIVEBACK_PERCENT": "0", "TIGHTEN_GIVEBACK_PERCENT": "0"},
            "MAX_GIVEBACK_PERCENT=0 sells every trade at its first check",
        ),
        ({"CHAIN_MAX_AGE_SECONDS": "0"}, "CHAIN_MAX_AGE_SECONDS=0: no chain or quote is ever that fresh"),
        ({"MAX_QUOTE_AGE_SECONDS": "0"}, "MAX_QUOTE_AGE_SECONDS=0: no chain or quote is ever that fresh"),
    ],
)
def test_a_zero_that_would_sell_at_once_or_never_enter_is_refused(env, expected):
    """0 disables the protections, so users try it here too: every trade sold at its first check."""
    with pytest.raises(ConfigError) as caught:
        settings_from_env(env)
    assert [problem.startswith(expected) for problem in caught.value.problems] == [True]
    settings_from_env({name: "0.5" for name in env})  # any other value is the user's to choose


def test_the_window_limits_are_exactly_what_the_features_can_reach():
    from events import Bar
    from signals import FeatureEngine

    env = {"VWAP_RISING_SECONDS": "10", "VWAP_RISING_MIN_POINTS": "10"}
    rules = settings_from_env({**env, "VOLUME_WINDOW_SECONDS": "60", "VOLUME_MIN_BARS": "59"}).rules
    features = FeatureEngine(rules)
    seen = []
    for i in range(120):  # one bar a second, rising, each with more volume than the last
        price = 100 + i * 0.01
        bar = Bar("IWM", i * 1000, i * 1000 + 1000, price, price, price, price, 1000 + i, None, None, None, 0)
        seen.append(features.update(bar))
    assert max(f.vwap_points for f in seen) == 10 and any(f.vwap_rising for f in seen)
    assert max(f.volume_bars for f in seen) == 59 and any(f.volume_surge for f in seen)


# --- Numbers: ASCII digits only ---


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"CONTRACTS": "١٠"}, "CONTRACTS='١٠': expected a whole number in digits 0-9, without underscores"),
        ({"COOLDOWN_SECONDS": "1_000"}, "COOLDOWN_SECONDS='1_000': expected a number in digits 0-9"),
        ({"HEALTH_PORT": "٨٠٨٠"}, "HEALTH_PORT='٨٠٨٠': expected a whole number in digits 0-9"),
        ({"DELTA_MIN": "0.٣"}, "DELTA_MIN='0.٣': expected a number in digits 0-9"),
        ({"NO_ENTRY_BEFORE": "٠٩:٤٥"}, "NO_ENTRY_BEFORE='٠٩:٤٥': expected HH:MM"),
        ({"CHAIN_MAX_AGE_SECONDS": "inf"}, "CHAIN_MAX_AGE_SECONDS='inf': expected a number"),
        ({"CHAIN_MAX_AGE_SECONDS": "1e999"}, "CHAIN_MAX_AGE_SECONDS='1e999': expected a finite number"),
    ],
)
def test_numbers_take_ascii_digits_only(env, expected):
    with pytest.raises(ConfigError) as caught:
        settings_from_env(env)
    assert [problem.startswith(expected) for problem in caught.value.problems] == [True], (
        caught.value.problems
    )


def test_plain_number_spellings_still_parse():
    settings = settings_from_env(
        {
            "CONTRACTS": " +3 ",
            "COOLDOWN_SECONDS": "1e2",
            "DELTA_MIN": ".25",
            "DELTA_MAX": "0.40",
            "HEALTH_PORT": "8080",
        }
    )
    rules = settings.rules
    assert (rules.contracts, rules.cooldown_seconds, rules.delta_min, rules.delta_max) == (
        3,
        100.0,
        0.25,
        0.4,
    )
    assert settings.health_port == 8080


def test_the_settings_repr_never_shows_credentials_inside_an_endpoint_url():
    settings = settings_from_env(
        {
            "POLYGON_REST_URL": "https://user:PLANTEDpw@api.massive.com",
            "PUSHOVER_API_URL": "https://api.pushover.net/1/messages.json?token=PLANTEDtok",
            "POLYGON_API_KEY": "PLANTEDkey123",
        }
    )
    shown = repr(settings)
    assert "PLANTED" not in shown and "api.massive.com" in shown and "messages.json" in shown


@pytest.mark.parametrize(("token", "warned"), [("azGDORePK8gMaC0QOYAMyEEuzJnyUi", False), ("short", True),
                                                ("azGDORePK8gMaC0QOYAMyEEuzJnyU!", True)])  # fmt: skip
def test_a_pushover_key_not_of_pushovers_shape_is_warned_about_never_shown(token, warned):
    settings = settings_from_env(
        {"PUSHOVER_TOKEN": token, "PUSHOVER_USER_KEY": "uQiRzpo4DXghDmr9QzzfQu27cmVRsG"}
    )
    warnings = pushover_key_warnings(settings)
    assert [w.split("=")[0] for w in warnings] == (["PUSHOVER_TOKEN"] if warned else [])
    assert all(token not in w for w in warnings)


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_data_dir_is_refused_rather_than_meaning_the_current_folder(value):
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"DATA_DIR": value})
    assert [p.split("=")[0] for p in caught.value.problems] == ["DATA_DIR"]
    assert "unset it" in str(caught.value) or "leave it unset" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ('"/var/data"', "without quotes around it"),
        ("'/var/data'", "without quotes around it"),
        ("/var/data\u200b", "invisible character (U+200B)"),
        ("/var/\ufeffdata", "invisible character (U+FEFF)"),
        ("/var/da\u00a0ta", "a space that is not a plain one"),
    ],
)
def test_a_pasted_data_dir_with_quotes_or_an_invisible_character_is_refused(value: str, said: str) -> None:
    """A dashboard keeps the quotes a .env strips: "/var/data" became a folder named with its quotes under
    the working folder, which a deploy wipes with the lifetime P&L and an open position (an audit's find)."""
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"DATA_DIR": value})
    assert [p.split("=")[0] for p in caught.value.problems] == ["DATA_DIR"] and said in str(caught.value)
    assert settings_from_env({"DATA_DIR": " /var/data "}).data_dir == Path("/var/data")


@pytest.mark.parametrize("name", ["STOP_LOSS_PERCENT", "PUSHOVER_API_URL", "NO_ENTRY_AFTER", "UNDERLYING"])
def test_a_key_pasted_on_the_wrong_line_is_masked_in_the_problem(name: str) -> None:
    """The refused value was printed whole, to the terminal and to Render's logs."""
    with pytest.raises(ConfigError) as caught:
        settings_from_env({name: TOKEN})
    shown = str(caught.value).lower()  # a ticker is upper-cased before it is checked
    assert TOKEN.lower() not in shown and f"{name.lower()}='azgd…(30 chars)'" in shown


def test_a_secret_set_elsewhere_is_masked_inside_another_refused_value() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"POLYGON_API_KEY": "short-key-1", "STOP_LOSS_PERCENT": "x short-key-1"})
    assert "short-key-1" not in str(caught.value)


def test_ordinary_refused_values_are_still_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"STOP_LOSS_PERCENT": "fifteen", "SIM_CLOCK_START": "2025-10-02T09:30:00"})
    assert "STOP_LOSS_PERCENT='fifteen'" in str(caught.value)
    assert "SIM_CLOCK_START='2025-10-02T09:30:00'" in str(caught.value)


@pytest.mark.parametrize(("name", "value"), [("DATA_DIR", "data\x00dir"), ("CRITICAL_LOSS_THRESHOLD", "500")])
def test_values_that_cannot_mean_what_they_say_are_refused(name: str, value: str) -> None:
    """A NUL in DATA_DIR was a traceback; a positive loss threshold sent CRITICAL LOSS after a win."""
    with pytest.raises(ConfigError) as caught:
        settings_from_env({name: value})
    assert str(caught.value).startswith(f"{name}=")


def test_python_dotenv_disabled_keeps_the_env_file_unread(tmp_path: Path) -> None:
    """python-dotenv's own switch (set by the tests, and on Render if one likes) was ignored."""
    env_file = tmp_path / ".env"
    env_file.write_text("STOP_LOSS_PERCENT=10\n")
    assert load_settings(env_file, environ={}).rules.stop_loss_percent == 10
    off = load_settings(env_file, environ={"PYTHON_DOTENV_DISABLED": "true"})
    assert off.rules.stop_loss_percent == Rules().stop_loss_percent


# --- A .env that is a named pipe (1Password Environments mounts one) ---


def write_into_pipe(pipe: Path, text: str) -> threading.Thread:
    """A writer that, like a secret manager, opens the pipe once, writes the file and closes it."""

    def write() -> None:
        with open(pipe, "w", encoding="utf-8") as out:  # waits for the reader, as a secret manager does
            out.write(text)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


@pytest.mark.parametrize("script", ["main.py", "diagnose.py"])
def test_a_dotenv_named_pipe_is_read_once_as_a_secret_manager_serves_it(tmp_path, script):
    """1Password's mounted .env is a FIFO: it was skipped as "not a file", so the daemon said the key was not
    set. The writer gives the text once: a second read would wait for a writer that never comes."""
    pipe = tmp_path / ".env"
    os.mkfifo(pipe)
    writer = write_into_pipe(pipe, "STOP_LOSS_PERCENT=abc\nPUSHOVER_TOKNE=x\n")
    env = {"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "d")}
    command = [sys.executable, str(ROOT / script), *(["--status"] if script == "main.py" else [])]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=25)
    writer.join(5)
    output = done.stdout + done.stderr
    assert "STOP_LOSS_PERCENT" in output and "PUSHOVER_TOKNE" in output and "named pipe" not in output
    assert "Traceback" not in output and not writer.is_alive()


def test_a_dotenv_named_pipe_whose_writer_never_comes_is_a_clear_problem_not_a_hang(tmp_path):
    pipe = tmp_path / ".env"
    os.mkfifo(pipe)
    dotenv = DotenvFile.read(pipe, pipe_wait_s=0.3)
    assert dotenv.text is None and "named pipe" in (dotenv.problem or "") and "0.3 s" in dotenv.problem
    with pytest.raises(ConfigError) as caught:
        load_settings(dotenv, environ={})
    assert caught.value.problems == [dotenv.problem]


def test_a_dotenv_named_pipe_that_never_ends_is_refused_past_a_megabyte(tmp_path):
    pipe = tmp_path / ".env"
    os.mkfifo(pipe)

    def flood() -> None:
        with contextlib.suppress(BrokenPipeError), open(pipe, "wb") as out:
            while True:
                out.write(b"# " + b"x" * 4094 + b"\n")

    threading.Thread(target=flood, daemon=True).start()
    dotenv = DotenvFile.read(pipe, pipe_wait_s=10)
    assert dotenv.text is None and "not a settings file" in (dotenv.problem or "")


def test_a_dotenv_folder_is_a_virtual_environment_not_settings(tmp_path):
    (tmp_path / ".env" / "bin").mkdir(parents=True)  # python -m venv .env
    assert load_settings(tmp_path / ".env", environ={}).rules == Rules()
    assert unknown_keys(tmp_path / ".env") == []


@pytest.mark.parametrize("name", ENDPOINTS)
@pytest.mark.parametrize("tail", ["\x07", "\r", "\n", " x", "\x7f"])
def test_an_endpoint_with_a_space_or_a_control_character_is_refused(name, tail):
    """A POLYGON_REST_URL ending in a control character passed the checks, then httpx refused it with a
    traceback at start; a space passed too, and every request failed on a host with %20 in it."""
    scheme = "wss" if name.endswith("WS_URL") else "https"
    with pytest.raises(ConfigError) as caught:
        settings_from_env({name: f"{scheme}://api.example.com{tail}/v1"})  # an end's blanks are trimmed
    assert [problem.split("=")[0] for problem in caught.value.problems] == [name]
    assert "no space or control character" in caught.value.problems[0]


def test_a_fallback_url_with_a_control_character_is_refused_without_showing_it():
    """Apprise logged such a URL's topic in clear ("topic (SECRET\\u0007) is invalid"): the JSON line
    escaped the control character, so the redaction of the plain secret missed it."""
    secret = "ntfy://SECRETfallbackTOPIC\x07"
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"ALERT_FALLBACK_URLS": f"ntfy://fine-topic,{secret}"})
    (problem,) = caught.value.problems
    assert problem.startswith("ALERT_FALLBACK_URLS=") and "control characters" in problem
    assert "SECRETfallback" not in problem


def test_a_secret_is_redacted_as_a_json_line_escapes_it():
    from redaction import Redactor

    redact = Redactor.of(['SECRET"quoted\x07topic'])
    line = json.dumps({"event": 'topic (SECRET"quoted\x07topic) is invalid'})
    assert "SECRET" not in redact(line) and "***" in redact(line)


@pytest.mark.parametrize("name", ["RECORD", "DAILY_SUMMARY", "RELATIVE_VOLUME_REQUIRED"])
@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_switch_is_its_default_not_off(name, blank):
    """`RECORD=` left blank in .env turned recording (and replays, the summary chart) off without a word."""
    default = getattr(Settings(), name.lower(), None)
    if default is None:
        default = getattr(Rules(), name.lower())
    settings = settings_from_env({name: blank})
    value = getattr(settings, name.lower(), None)
    assert (value if value is not None else getattr(settings.rules, name.lower())) == default


def test_a_data_dir_under_home_is_expanded_not_made_as_a_folder_named_tilde():
    settings = settings_from_env({"DATA_DIR": "~/alerter-data"})
    assert settings.data_dir == Path.home() / "alerter-data"


@pytest.mark.parametrize("command", [["--status"], ["--pause"], []])
def test_a_data_dir_too_long_for_the_system_is_one_line_not_a_traceback(tmp_path, command):
    """A DATA_DIR with a 300-character name made `Path.exists()` raise ENAMETOOLONG: a traceback, exit 1."""
    env = {"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / ("y" * 300)), "POLYGON_API_KEY": "k" * 32}
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *command],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "DATA_DIR=" in done.stderr and "names of at most 255 bytes" in done.stderr


def test_a_fallback_url_apprise_takes_but_partly_ignores_is_refused_with_the_other_problems(capfd):
    """`ntfy://topic!x`: Apprise logged "topic ... is invalid and will be ignored" (quoting it) and the
    daemon started with a fallback that delivers nothing; `bogus://` was refused only after every other
    problem was fixed, with the journal already created."""
    urls = "ntfy://good-topic,ntfy://SECRETfb!topic,bogus://SECRETfallbackTOPIC"
    with pytest.raises(ConfigError) as caught:
        settings_from_env({"ALERT_FALLBACK_URLS": urls, "STOP_LOSS_PERCENT": "abc"})
    named = [problem.split("=")[0] for problem in caught.value.problems]
    assert named == ["STOP_LOSS_PERCENT", "ALERT_FALLBACK_URLS"]
    problem = caught.value.problems[1]
    assert "ntfy…(21 chars), bogu…(27 chars): Apprise cannot use it" in problem
    captured = capfd.readouterr()
    assert "SECRET" not in problem + captured.out + captured.err
    assert settings_from_env({"ALERT_FALLBACK_URLS": "ntfy://good-topic"}).alert_fallback_urls


@pytest.mark.parametrize(
    "given, missing", [("PUSHOVER_TOKEN", "PUSHOVER_USER_KEY"), ("PUSHOVER_USER_KEY", "PUSHOVER_TOKEN")]
)
def test_one_pushover_key_without_the_other_is_a_problem_not_log_only_alerts(given, missing):
    """An unclosed quote in .env swallowed the user key's line: the daemon started with every alert
    going to the log only, said in one JSON warning among the start-up lines."""
    with pytest.raises(ConfigError) as caught:
        settings_from_env({given: TOKEN})
    assert caught.value.problems == [
        f"{given} is set but {missing} is not: set both, or neither (alerts then go to the log only)"
    ]
    assert TOKEN not in str(caught.value)
    assert settings_from_env({}).pushover_token == ""


def test_a_read_only_filesystem_is_named_as_such_not_as_a_permission_to_fix() -> None:
    """A disk ext4 remounted read-only was reported "this user cannot write in it": a user holding a
    position was sent to chmod instead of the disk (an audit's find)."""
    from config import unwritable_why

    read_only = unwritable_why(Path("/var/data"), os.ST_RDONLY | os.ST_NOSUID)
    assert read_only.startswith("DATA_DIR='/var/data': is on a read-only filesystem (a failing disk")
    assert (
        unwritable_why(Path("/var/data"), os.ST_NOSUID)
        == "DATA_DIR='/var/data': this user cannot write in it"
    )
