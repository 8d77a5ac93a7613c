"""The start-up's watchdog (start_watch.py) and what main.py does with a start that stands still."""

from __future__ import annotations

import threading
import time

from builders import at
from test_daemon import fakes, kinds, settings_for, start_daemon, stop_daemon, wait_for

from sim.market import SyntheticMarket, demo_script
from sim.pushover_server import FakePushover
from start_watch import StartWatch


def watching(limit_s: float) -> tuple[StartWatch, list[tuple[str, float]]]:
    said: list[tuple[str, float]] = []
    watch = StartWatch(limit_s, lambda step, limit: said.append((step, limit)))
    threading.Thread(target=watch.watch, args=(0.02,), daemon=True).start()
    return watch, said


def test_a_step_that_stands_still_is_said_once_by_name():
    watch, said = watching(0.2)
    watch.step("opening the journal")
    assert wait_for(lambda: said, 5)
    time.sleep(0.3)
    assert said == [("opening the journal", 0.2)]


def test_a_step_that_beats_is_waited_for_and_done_ends_the_watch():
    watch, said = watching(0.2)
    watch.step("warming up from today's tape")
    for _ in range(15):  # 0.75 s of a long warm-up that reads all along
        time.sleep(0.05)
        watch.beat()
    watch.done()
    time.sleep(0.4)
    assert said == [] and watch.is_done


class StepsSeen(StartWatch):
    def __init__(self) -> None:
        super().__init__(60.0, lambda _step, _limit: None)
        self.steps: list[str] = []

    def step(self, name: str) -> None:
        self.steps.append(name)
        super().step(name)


def test_the_daemon_names_each_step_of_its_start_and_hands_over_to_its_watchdog(tmp_path):
    market = SyntheticMarket(demo_script())
    watch = StepsSeen()
    with fakes(market, at(10, 2)) as (pushover, polygon, clock):
        daemon, stop, thread = start_daemon(
            settings_for(polygon, pushover, tmp_path), clock, start_watch=watch
        )
        try:
            assert wait_for(lambda: "START" in kinds(pushover), 30)
            assert wait_for(lambda: watch.is_done, 10)
        finally:
            stop_daemon(stop, thread)
    assert watch.steps == [
        "loading the market calendar",
        "taking the instance lock in DATA_DIR",
        "opening the journal",
        "warming up from today's tape",
        "reading the position and the P&L from the journal",
        "recording and announcing the start",
    ]
    assert daemon.start_watch is watch


def test_a_stuck_start_is_said_on_the_phone_and_ends_with_the_watchdogs_status(tmp_path, capsys):
    from config import Settings
    from main import start_stuck

    codes: list[int] = []
    with FakePushover() as pushover:
        settings = Settings(pushover_token="a" * 30, pushover_user_key="u" * 30, pushover_api_url=pushover.url,
                            data_dir=tmp_path)  # fmt: skip
        start_stuck(settings, "opening the journal", 60.0, exit_process=codes.append)
        start_stuck(settings, "opening the journal", 60.0, exit_process=codes.append)  # a restart: not again
    assert codes == [3, 3]
    (sent,) = pushover.messages
    assert sent.form["title"].endswith("NOT STARTED")
    assert "made no progress for 60 s while opening the journal" in sent.form["message"]
    assert (
        "Not started: the start made no progress for 60 s while opening the journal"
        in capsys.readouterr().err
    )
