"""Threads the system refuses (out of threads or memory): "can't start new thread" for real, from a stack
size no machine can map. The daemon sent START and then died with a traceback and no word to the phone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from test_daemon import wait_for

from config import Settings
from options_feed import OptionsFeed
from sim.pushover_server import FakePushover
from supervisor import Supervisor

UNMAPPABLE_STACK = 1 << 40  # a terabyte per thread: pthread_create fails with ENOMEM


@contextmanager
def threads_refused(for_s: float | None) -> Iterator[None]:
    """New threads are refused until `for_s` has passed (None: until the block ends)."""
    if for_s is not None:
        threading.Timer(for_s, threading.stack_size, args=(0,)).start()  # started while threads still start
    threading.stack_size(UNMAPPABLE_STACK)
    try:
        yield
    finally:
        threading.stack_size(0)


def test_a_thread_refused_for_a_moment_is_asked_for_again():
    stop = threading.Event()
    ran = threading.Event()
    supervisor = Supervisor(stop, on_crash=lambda _name, _error: None)
    with threads_refused(for_s=0.25):
        supervisor.spawn("poller", ran.set)
    assert wait_for(ran.is_set, 5)
    # Its worker returns at once, so the supervisor restarts it with back-off until stopped: stopped here,
    # or it logged "returned while the daemon runs" into later tests' closed streams for the whole run.
    stop.set()
    supervisor.join(5)


def test_a_thread_refused_for_good_is_a_clear_error():
    supervisor = Supervisor(threading.Event(), on_crash=lambda _name, _error: None)
    with (
        threads_refused(for_s=None),
        pytest.raises(RuntimeError, match="the system refused the poller thread"),
    ):
        supervisor.spawn("poller", lambda: None)


def test_an_options_stream_whose_thread_was_refused_is_started_again_next_time(tmp_path):
    """Its stream object was kept though its thread never ran: no options stream all session, unsaid."""
    from clock import SimClock

    feed = OptionsFeed(Settings(data_dir=tmp_path, polygon_api_key="k" * 20), SimClock(0, 1.0), lambda _i: None,
                       lambda _kind, _text: None)  # fmt: skip
    with threads_refused(for_s=None), pytest.raises(RuntimeError):
        feed.start()
    assert feed.stream is None
    feed.start()
    try:
        assert feed.stream is not None and feed.stream._thread is not None
    finally:
        feed.stream.stop(timeout=5)


def test_a_daemon_that_stops_on_an_error_says_so_on_the_phone(tmp_path):
    from main import notify_cannot_start

    with FakePushover() as pushover:
        settings = Settings(pushover_token="a" * 30, pushover_user_key="u" * 30, pushover_api_url=pushover.url,
                            data_dir=tmp_path)  # fmt: skip
        reason = "RuntimeError: the system refused the poller thread; the platform starts it again"
        notify_cannot_start(settings, reason, title="STOPPED")
    (sent,) = pushover.messages
    assert sent.form["title"].endswith("STOPPED") and sent.form["priority"] == "1"
    assert sent.form["message"] == f"The daemon stopped: {reason}."


def test_a_low_soft_limit_of_open_files_is_raised_toward_the_hard_one():
    """`ulimit -n 20` (soft): every chain request failed with "Too many open files", so no entry all day."""
    import resource
    import subprocess
    import sys
    from pathlib import Path

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 20 if hard == resource.RLIM_INFINITY else min(20, hard)
    code = "import main; print(main.raise_open_files_limit())"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], text=True,
                          capture_output=True, timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)))  # fmt: skip
    raised = int(done.stdout.strip())
    expected = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    assert raised == max(low, expected) and done.returncode == 0
