"""The close's DAILY SUMMARY with its chart: the chart hook on a real tape, and a live rehearsal over real
sockets (fake Polygon and fake Pushover on 127.0.0.1) from 15:50 to just after the close."""

from __future__ import annotations

import io
import shutil
import sys
import threading
import time
from datetime import date

import pytest
from builders import at
from structlog.testing import capture_logs
from test_daemon import API_KEY, settings_for

from clock import SimClock
from config import Rules, Settings
from daemon import Daemon
from pnl_tracker import OutboxItem
from sim.market import SyntheticMarket, demo_script
from sim.polygon_server import FakePolygon, SyntheticSource
from sim.pushover_server import FakePushover, ReceivedMessage
from summary_chart import SUMMARY_PX, SummaryChart, summary_attachment, summary_date

SPEED = 40.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DAY = date(2025, 10, 2)


def item(kind: str, key: str) -> OutboxItem:
    return OutboxItem(1, key, kind, "title", "message", 0, at(16, 0), 0)


def decoded_size(png: bytes) -> tuple[int, int]:
    """(width, height) of the image as matplotlib decodes it."""
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png), format="png")
    return pixels.shape[1], pixels.shape[0]


def test_the_summary_date_comes_from_the_dedupe_key():
    assert summary_date("SUMMARY:2025-10-02") == DAY
    assert summary_date("SELL:2025-10-02-01") is None and summary_date("SUMMARY:today") is None


def test_the_chart_is_the_days_replay_drawn_small_and_only_for_summaries(demo_tape, tmp_path):
    tapes = tmp_path / "tapes"
    tapes.mkdir()
    shutil.copy(demo_tape, tapes / "2025-10-02.jsonl.gz")
    chart = SummaryChart(tmp_path, Rules())
    assert chart(item("SELL", "SELL:2025-10-02-01")) is None
    png = chart(item("SUMMARY", "SUMMARY:2025-10-02"))
    assert png is not None and png[:8] == PNG_SIGNATURE
    assert decoded_size(png) == SUMMARY_PX == (900, 500) and len(png) < 200_000
    assert chart(item("SUMMARY", "SUMMARY:2025-10-02")) is png  # a retried send draws nothing again


def test_without_a_tape_there_is_no_chart_and_a_warning(tmp_path):
    with capture_logs() as logs:
        assert SummaryChart(tmp_path, Rules())(item("SUMMARY", "SUMMARY:2025-10-03")) is None
    assert [(e["event"], e["reason"]) for e in logs] == [("summary_chart_skipped", "no tape")]


@pytest.mark.parametrize(
    "child",
    [["-c", "import sys; sys.exit(3)"], ["-c", "print('not a png')"]],
    ids=["exits 3", "no PNG"],
)
def test_a_chart_child_that_fails_costs_the_image_only(demo_tape, tmp_path, child):
    """The chart is drawn in a child process (its memory had stayed with the daemon, ~29 MB a day)."""
    tapes = tmp_path / "tapes"
    tapes.mkdir()
    shutil.copy(demo_tape, tapes / "2025-10-02.jsonl.gz")
    chart = SummaryChart(tmp_path, Rules(), child=[sys.executable, *child])
    with capture_logs() as logs:
        assert chart(item("SUMMARY", "SUMMARY:2025-10-02")) is None
    assert [e["event"] for e in logs] == ["summary_chart_failed"]


def test_daily_summary_0_gives_the_daemon_no_chart_hook(tmp_path):
    assert summary_attachment(Settings(data_dir=tmp_path)) is not None
    assert summary_attachment(Settings(rules=Rules(daily_summary=False), data_dir=tmp_path)) is None


def run_daemon(settings: Settings, clock: SimClock, until, timeout_s: float = 40) -> Daemon:
    """Run the daemon in a thread until `until()` holds (or the timeout), then stop it cleanly."""
    stop = threading.Event()
    daemon = Daemon(settings, clock, stop=stop)
    thread = threading.Thread(target=daemon.run, name="daemon-under-test")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until():
        time.sleep(0.05)
    stop.set()
    thread.join(15)
    assert not thread.is_alive(), "daemon did not stop within 15 s"
    return daemon


def summaries(pushover: FakePushover) -> list[ReceivedMessage]:
    return [m for m in pushover.messages if m.form["title"].endswith("DAILY SUMMARY")]


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return SyntheticMarket(demo_script())


def test_rehearsal_sends_one_daily_summary_with_the_chart_attached_across_a_restart(market, tmp_path):
    start, restart = at(15, 50), at(16, 1)
    with FakePushover() as pushover:
        with FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=start, speed=SPEED) as polygon:
            settings = settings_for(polygon, pushover, tmp_path)
            run_daemon(settings, SimClock(start, SPEED), until=lambda: bool(summaries(pushover)))
        (summary,) = summaries(pushover)
        assert summary.form["title"] == "IWM 0DTE — DAILY SUMMARY"
        assert summary.form["message"].startswith("2025-10-02 (Thu): ")
        assert "Day P&L: " in summary.form["message"] and "LIFETIME: " in summary.form["message"]
        png = summary.attachment
        assert png is not None and summary.attachment_type == "image/png"
        assert png[:8] == PNG_SIGNATURE and len(png) < 1_000_000
        assert decoded_size(png) == (900, 500)
        (tmp_path / "daily-summary.png").write_bytes(png)

        # A restart after the close on the same day decides the summary again; the outbox drops it.
        with FakePolygon(SyntheticSource(market), api_key=API_KEY, start_ms=restart, speed=SPEED) as polygon:
            settings = settings_for(polygon, pushover, tmp_path)
            started = time.monotonic()
            again = run_daemon(
                settings, SimClock(restart, SPEED), until=lambda: time.monotonic() - started > 3
            )
        assert again.engine.now_ms > restart + 60_000  # its engine ran well past the close
        assert [m.form["title"] for m in pushover.messages].count("IWM alerter — START") == 2
        assert len(summaries(pushover)) == 1


def test_the_chart_child_is_the_first_process_the_kernel_kills_when_memory_runs_out(tmp_path):
    """The child decodes the whole day's tape (360 MB for a day of 31-contract chains): on a 512 MB worker
    the kernel's choice between it and the daemon must fall on the chart."""
    import subprocess
    from pathlib import Path

    from summary_chart import volunteer_for_the_oom_killer

    script = (
        "from pathlib import Path\n"
        "from summary_chart import volunteer_for_the_oom_killer\n"
        "said = volunteer_for_the_oom_killer()\n"
        "adj = Path('/proc/self/oom_score_adj')\n"
        "print(said, adj.read_text().strip() if adj.exists() else None)\n"
    )
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert child.returncode == 0, child.stderr
    linux = Path("/proc/self/oom_score_adj").exists()
    assert child.stdout.strip() == ("True 1000" if linux else "False None")
    assert volunteer_for_the_oom_killer(tmp_path / "no-such-dir" / "oom_score_adj") is False
