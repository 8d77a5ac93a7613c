"""The command line as a person types it: bad values end in argparse's usage line (exit 2), bad settings
list every problem (exit 2), `.env` typos are named, and a closed stdout ends the run quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_exit import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from main import parse_args, parse_speed

ROOT = Path(__file__).resolve().parents[1]


def run_main(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """main.py in a fresh process, without the caller's keys or `.env`, plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env={**base, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("raw, expected", [("max", None), ("MAX", None), ("10", 10.0), ("0.5", 0.5)])
def test_speed_accepts_max_and_positive_factors(raw, expected):
    assert parse_speed(raw) == expected
    assert parse_args(["--replay", "t.jsonl.gz", "--speed", raw]).speed == expected


def test_speed_defaults_to_max():
    assert parse_args(["--replay", "t.jsonl.gz"]).speed is None


@pytest.mark.parametrize("raw", ["fast", "0", "-3", "nan", "inf", "", "1e-20", "0.009"])
def test_bad_speed_exits_2_with_the_usage_line(raw, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(["--replay", "t.jsonl.gz", "--speed", raw])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python3 main.py") and "argument --speed" in err and "'max'" in err


def test_speed_fast_in_a_real_process_is_a_usage_error_not_a_traceback(tmp_path):
    done = run_main(["--replay", "x.jsonl.gz", "--speed", "fast"], tmp_path)
    assert done.returncode == 2
    assert "usage: python3 main.py" in done.stderr and "Traceback" not in done.stderr
    assert "'fast' is neither a number >= 0.01 (such as 10) nor 'max'" in done.stderr


def test_replay_of_a_missing_tape_exits_2(tmp_path):
    done = run_main(["--replay", str(tmp_path / "nope.jsonl.gz")], tmp_path, DATA_DIR=str(tmp_path / "d"))
    assert done.returncode == 2 and "nope.jsonl.gz" in done.stderr and "Traceback" not in done.stderr
    folder = run_main(["--replay", str(tmp_path)], tmp_path, DATA_DIR=str(tmp_path / "d"))
    assert folder.returncode == 2 and "is a folder: --replay takes one tape file" in folder.stderr


def test_replay_of_a_named_pipe_or_a_device_says_it_is_not_a_regular_file(tmp_path):
    """Both said "No such tape", of a file that is there."""
    pipe = tmp_path / "pipe.jsonl.gz"
    os.mkfifo(pipe)
    device = tmp_path / "zero.jsonl.gz"
    device.symlink_to("/dev/zero")
    for tape in (pipe, device):
        done = run_main(["--replay", str(tape)], tmp_path, DATA_DIR=str(tmp_path / "d"))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"{tape} is not a regular file: --replay takes one tape file" in done.stderr


@pytest.mark.parametrize(
    "argv, said",
    [
        (["--synthetic", "1", "--workers", "0"], "--workers needs at least 1 process (got 0)"),
        (["--synthetic", "1", "--workers", "-3"], "--workers needs at least 1 process (got -3)"),
        (["--synthetic", "100000"], "--synthetic needs 1 <= N <= 5040"),
        (["--fetch", "2025-10-31", "--to", "2025-10-02"], "--to 2025-10-02 is before --fetch 2025-10-31"),
    ],
)
def test_backtest_arguments_that_cannot_work_are_usage_errors(argv, said, capsys):
    """A negative process count ran (exit 0); 100000 days sat silent for minutes; an end before the start
    was only refused for want of a key."""
    from backtest import parse_args as backtest_args

    with pytest.raises(SystemExit) as caught:
        backtest_args(argv)
    assert caught.value.code == 2 and said in capsys.readouterr().err


def test_bad_log_level_and_contradicting_settings_exit_2_listing_each(tmp_path):
    done = run_main([], tmp_path, LOG_LEVEL="CHATTY", LOG_FORMAT="xml", HARD_TIME_STOP="09:00",
                    NO_ENTRY_AFTER="16:30", UNDERLYING="SPY", BENCHMARK="spy")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("  - ")]
    named = {line[4:].split("=")[0] for line in lines}
    assert named == {"LOG_LEVEL", "LOG_FORMAT", "HARD_TIME_STOP", "NO_ENTRY_AFTER", "BENCHMARK"}
    assert "LOG_LEVEL='CHATTY': expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in done.stderr


def test_lower_case_log_level_is_accepted(tmp_path):
    done = run_main(["--pause"], tmp_path, LOG_LEVEL="debug", DATA_DIR=str(tmp_path / "d"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "d" / "PAUSE").is_file()


def test_misspelled_dotenv_key_is_named_with_the_nearest_variable(tmp_path):
    (tmp_path / ".env").write_text(f"STOP_LOS_PERCENT=10\nDATA_DIR={tmp_path / 'd'}\n")
    done = run_main(["--pause"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        "warning: .env sets STOP_LOS_PERCENT, which no setting reads; did you mean STOP_LOSS_PERCENT?"
        in done.stderr
    )
    assert "DATA_DIR" not in done.stderr and (tmp_path / "d" / "PAUSE").is_file()


def test_demo_into_a_pipe_closed_early_ends_quietly(tmp_path):
    # Unbuffered, so the second line already meets the closed pipe (buffered, the demo's 8 kB
    # of text could all fit in one write made before the reader goes away).
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--demo"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    assert first.startswith(b"IWM 0DTE Momentum Alerter")
    assert code == EXIT_BROKEN_PIPE == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.parametrize(
    "command",
    [["main.py", "--demo"], ["backtest.py", "--synthetic", "2", "--seed", "9", "--workers", "2"]],
    ids=["demo", "backtest-with-a-pool"],
)
def test_ctrl_c_ends_a_run_with_one_line_and_status_130(tmp_path, command):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DATA_DIR": str(tmp_path / "data")}
    # Its own process group, as a terminal's foreground job: Ctrl-C reaches the pool workers too.
    with subprocess.Popen([sys.executable, str(ROOT / command[0]), *command[1:]], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as proc:  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline() if command[0] == "main.py" else time.sleep(4.0)
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED == 130, err
    assert "Traceback" not in err.decode() and err.decode().strip().endswith("Interrupted.")


def test_ctrl_c_works_though_the_parent_left_sigint_blocked(tmp_path):
    """A signal mask is inherited through exec: started by a process whose thread had SIGINT blocked (as
    multiprocessing does around its spawns), the demo ignored Ctrl-C, ran to its end and exited 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DATA_DIR": str(tmp_path / "data")}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--demo"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    with proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.decode().strip().endswith("Interrupted.")


def test_a_ctrl_c_a_library_swallowed_still_ends_the_run_as_interrupted(tmp_path):
    """numpy's lazy `numpy.random` import swallowed the KeyboardInterrupt of a Ctrl-C that landed inside it:
    the demo ran on to its end and exited 0, silent (one CI run in ten, under load)."""
    swallowing = (
        "import os, signal, sys\n"
        "from cli_exit import run_quietly\n"
        "def run():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        sum(range(10**6))\n"
        "    except KeyboardInterrupt:\n"
        "        pass\n"
        "    return 0\n"
        "sys.exit(run_quietly(run))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", swallowing], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == EXIT_INTERRUPTED and done.stderr.strip() == "Interrupted."


def test_buffered_output_into_a_pipe_already_closed_ends_quietly_with_141(tmp_path):
    # Short, buffered output (the --status text fits one buffer) is written only when the process ends.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"DATA_DIR": str(tmp_path / "d")}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--status"], cwd=tmp_path, env=env,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == EXIT_BROKEN_PIPE and done.stderr == ""


def test_demo_piped_into_head_prints_one_line_and_no_traceback(tmp_path):
    script = f"set -o pipefail; PYTHONUNBUFFERED=1 '{sys.executable}' '{ROOT / 'main.py'}' --demo | head -1"
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("IWM 0DTE Momentum Alerter")
    assert done.returncode == 141 and done.stderr == ""


@pytest.mark.parametrize("args", [[], ["--replay", "t.jsonl.gz"], ["--pause"]])
@pytest.mark.parametrize("where", ["a-file", "a-file/data"])
def test_an_unusable_data_dir_is_one_line_and_exit_2_not_a_traceback(tmp_path, args, where):
    (tmp_path / "a-file").write_text("not a folder\n")
    done = run_main(args, tmp_path, DATA_DIR=str(tmp_path / where), POLYGON_API_KEY="abcdefgh12345")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "DATA_DIR=" in done.stderr
    assert "abcdefgh12345" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--status", "--notify"], "--notify"),
        (["--status", "--speed", "10"], "--speed"),
        (["--demo", "--speed=5"], "--speed"),
        (["--fresh"], "--fresh"),
    ],  # fmt: skip
)
def test_a_replay_flag_without_replay_is_a_usage_error_not_ignored(argv, flag, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(argv)
    assert caught.value.code == 2
    assert f"{flag} goes with --replay TAPE" in capsys.readouterr().err


@pytest.mark.parametrize("flag, action", [("--pause", "pause entries"), ("--resume", "allow entries again")])
def test_pause_and_resume_that_cannot_touch_the_switch_exit_2_with_one_line(tmp_path, flag, action):
    data_dir = tmp_path / "d"
    (data_dir / "PAUSE").mkdir(parents=True)  # a folder where the switch file goes
    done = run_main([flag], tmp_path, DATA_DIR=str(data_dir))
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"Could not {action}: {data_dir / 'PAUSE'}: Is a directory")
    assert "remove that folder yourself" in done.stderr and (data_dir / "PAUSE").is_dir()


def test_an_older_python_stops_every_command_with_one_line_before_any_other_import(tmp_path):
    """Python 3.10 died in a traceback about `datetime.UTC` while importing the configuration (main.py,
    backtest.py and diagnose.py import the check first; the next test holds them to it)."""
    pretend_310 = (
        "import runpy, sys; sys.version_info = (3, 10, 13, 'final', 0); "
        f"sys.argv = ['main.py', '--demo']; runpy.run_path({str(ROOT / 'main.py')!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", pretend_310], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"The alerter needs Python 3.11 or newer; {sys.executable} is Python 3.10.13. "
        "Run it with a newer python3 (and install the requirements with that one).\n"
    )
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", ["main.py", "backtest.py", "diagnose.py"])
def test_the_python_check_is_each_command_s_first_import(command):
    import ast

    tree = ast.parse((ROOT / command).read_text(encoding="utf-8"))
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    names = [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in imports]
    assert names[:2] == ["__future__", "requires_python"]


def test_the_python_check_passes_3_11_and_later():
    from requires_python import too_old

    assert too_old((3, 11, 0), "python3") is None and too_old((3, 14, 1), "python3") is None
    assert (too_old((3, 10, 13), "py") or "").startswith("The alerter needs Python 3.11 or newer; py is")


def test_a_live_start_refused_for_its_data_dir_tells_the_phone(tmp_path):
    """A daemon holding a position that cannot start again (DATA_DIR read-only, gone, a file) went silent:
    only stderr said so, and nobody reads a worker's stderr."""
    from sim.pushover_server import FakePushover

    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("a file where DATA_DIR should be")
    with FakePushover() as pushover:
        done = run_main([], tmp_path, DATA_DIR=str(not_a_folder), POLYGON_API_KEY="k" * 20,
                        PUSHOVER_TOKEN="t" * 30, PUSHOVER_USER_KEY="u" * 30, PUSHOVER_API_URL=pushover.url,
                        PYTHON_DOTENV_DISABLED="1")  # fmt: skip
        messages = pushover.messages
    assert done.returncode == 2 and "Nothing started" in done.stderr
    assert [m.form["title"] for m in messages] == ["IWM alerter — NOT STARTED"]
    assert str(not_a_folder) in messages[0].form["message"]
    # Render restarts a worker that exits: the same reason is not sent again at every attempt.
    with FakePushover() as pushover:
        again = run_main([], tmp_path, DATA_DIR=str(not_a_folder), POLYGON_API_KEY="k" * 20,
                         PUSHOVER_TOKEN="t" * 30, PUSHOVER_USER_KEY="u" * 30, PUSHOVER_API_URL=pushover.url,
                         PYTHON_DOTENV_DISABLED="1")  # fmt: skip
        assert again.returncode == 2 and pushover.messages == [] and "not sent again" in again.stderr
    from journal_rescue import in_temp

    in_temp(not_a_folder, "not_started").unlink()


def test_a_not_started_pushover_refused_is_sent_again_at_the_next_start(tmp_path):
    """The once-an-hour throttle counted a send Pushover answered 500: no NOT STARTED reached the phone for an
    hour, and stderr said it "was sent"."""
    from journal_rescue import in_temp
    from sim.pushover_server import FakePushover

    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("a file where DATA_DIR should be")
    env = dict(DATA_DIR=str(not_a_folder), POLYGON_API_KEY="k" * 20, PUSHOVER_TOKEN="t" * 30,
               PUSHOVER_USER_KEY="u" * 30, PYTHON_DOTENV_DISABLED="1")  # fmt: skip
    try:
        with FakePushover() as pushover:
            pushover.fail_with(500)
            done = run_main([], tmp_path, PUSHOVER_API_URL=pushover.url, **env)
        assert done.returncode == 2 and "NOT STARTED could not be sent to Pushover" in done.stderr
        with FakePushover() as pushover:
            again = run_main([], tmp_path, PUSHOVER_API_URL=pushover.url, **env)
            titles = [m.form["title"] for m in pushover.messages]
        assert again.returncode == 2 and titles == ["IWM alerter — NOT STARTED"], again.stderr
    finally:
        in_temp(not_a_folder, "not_started").unlink(missing_ok=True)


def test_a_not_started_is_remembered_on_the_data_disk_which_outlives_a_wiped_temp_folder(tmp_path):
    """The once-an-hour memory lived in the temporary folder, which a Render restart wipes: a priority-1
    NOT STARTED came at every restart of a worker with a damaged journal (an audit's find)."""
    from sim.pushover_server import FakePushover

    data = tmp_path / "data"
    data.mkdir()
    (data / "journal.sqlite3").write_bytes(b"not a database, " * 512)
    env = dict(DATA_DIR=str(data), POLYGON_API_KEY="k" * 20, PUSHOVER_TOKEN="t" * 30,
               PUSHOVER_USER_KEY="u" * 30, PYTHON_DOTENV_DISABLED="1")  # fmt: skip
    titles = []
    for restart in range(3):
        fresh_temp = tmp_path / f"tmp{restart}"
        fresh_temp.mkdir()
        with FakePushover() as pushover:
            done = run_main([], tmp_path, PUSHOVER_API_URL=pushover.url, TMPDIR=str(fresh_temp), **env)
            titles += [m.form["title"] for m in pushover.messages]
        assert done.returncode != 0
    assert titles == ["IWM alerter — NOT STARTED"], titles


def test_a_journal_sqlite_cannot_open_is_never_called_damaged():
    """SQLite's "unable to open database file" (no inode left for the -wal file, no permission) had the
    advice to move the journal aside, which throws away the open position and the lifetime P&L."""
    from main import bad_journal_advice

    advice = bad_journal_advice(
        Path("/d/journal.sqlite3"), OSError("cannot open journal: unable to open database file")
    )
    assert "Do not move it aside" in advice and "mv " not in advice


def test_the_instance_lock_holds_when_the_disk_refuses_the_pid(tmp_path):
    """The PID only names the holder; a full disk refusing it had kept the daemon from starting."""
    limited = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
        "from instance_lock import InstanceLock\n"
        "lock = InstanceLock(Path(sys.argv[1])).acquire()\n"
        "print(lock.path.stat().st_size)\n"
    )
    done = subprocess.run([sys.executable, "-c", limited, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "0\n", "")


@pytest.mark.parametrize(
    "script, redirect",
    [
        ("main.py --status", "2>&-"),  # stderr closed: Python leaves sys.stderr None
        ("main.py --status", ">&-"),  # stdout closed
        ("backtest.py --synthetic 1 --no-charts --out report", "2>&-"),
        ("diagnose.py", ">&-"),
    ],
)
def test_a_closed_standard_stream_is_not_a_crash(tmp_path, script, redirect):
    """`2>&-` ended --status, --demo and the daemon itself at once with status 1 and no word (stderr.isatty()
    on None); `>&-` turned the daemon's clean stop into status 1 (stdout.flush() on None)."""
    command, *args = script.split()
    line = f"'{sys.executable}' '{ROOT / command}' {' '.join(args)} {redirect}; echo \"status=$?\" >&3"
    env = {k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))}
    env |= {"DATA_DIR": str(tmp_path / "d"), "PYTHON_DOTENV_DISABLED": "1"}
    done = subprocess.run(["bash", "-c", f"exec 3>&1; ( {line} )"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert "status=0" in done.stdout or (command == "diagnose.py" and "status=1" in done.stdout)
    assert "Traceback" not in done.stdout + done.stderr


def test_text_the_output_cannot_encode_is_replaced_and_a_full_output_is_one_line(tmp_path):
    """PYTHONIOENCODING=ascii: the demo died on its first dash, --status on a DATA_DIR named in Latin-1.
    stdout on a full device (`> /dev/full`): a traceback from every command."""
    latin = tmp_path / os.fsdecode(b"donn\xe9es")
    demo = run_main(["--demo"], tmp_path, PYTHONIOENCODING="ascii", PYTHON_DOTENV_DISABLED="1",
                    DATA_DIR=str(tmp_path / "demo"))  # fmt: skip
    assert demo.returncode == 0 and "Traceback" not in demo.stderr and "Guard rails" in demo.stdout
    status = run_main(["--status"], tmp_path, PYTHONIOENCODING="ascii", PYTHON_DOTENV_DISABLED="1",
                      DATA_DIR=str(latin))  # fmt: skip
    assert (
        status.returncode == 0 and "Traceback" not in status.stderr and "es/journal.sqlite3" in status.stdout
    )
    env = {**os.environ, "DATA_DIR": str(tmp_path / "d"), "PYTHON_DOTENV_DISABLED": "1"}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--status"], cwd=tmp_path, stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "Stopped: No space left on device (standard output)." in done.stderr
