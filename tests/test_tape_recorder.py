"""The daemon's tape thread: the engine never waits on a tape that does not keep up."""

from __future__ import annotations

import os
from pathlib import Path

from builders import at

from clock import SimClock
from config import Settings
from events import Received
from tape_recorder import TapeRecorder

ITEM_TEXT = "x" * 1000


def recorder_in(data_dir: Path, notices: list[tuple[str, str]], **options: object) -> TapeRecorder:
    settings = Settings(data_dir=data_dir)
    return TapeRecorder(
        settings, SimClock(at(10, 0), 1.0), lambda kind, text: notices.append((kind, text)), **options
    )  # type: ignore[arg-type]


def test_a_tape_thread_that_falls_behind_is_said_stuck_once_and_stops_taking_lines(tmp_path):
    """A disk that stopped answering while no decision waited on it: the queue grew with every frame."""
    notices: list[tuple[str, str]] = []
    recorder = recorder_in(tmp_path, notices, queue_bytes=10_000)  # its thread never runs: a hung disk
    for n in range(30):
        recorder.record(Received(at(10, 0) + n, "ws", ITEM_TEXT))
    assert recorder.problem == "the tape's disk is 0 MB behind" and not recorder.recording
    assert [kind for kind, _text in notices] == ["TAPE_FAILING"]
    assert len(recorder._queue) == 11, "lines after the stuck one are dropped, not queued"


def test_a_decision_waits_for_the_tape_at_most_its_hand_over_time(tmp_path):
    """A FIFO at the tape's path blocks its opening for ever: the hand-over gives up, the tape is stuck."""
    notices: list[tuple[str, str]] = []
    fifo = tmp_path / "tapes" / "2025-10-02.jsonl.gz"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    recorder = recorder_in(tmp_path, notices, hand_over_s=0.2)
    import threading

    threading.Thread(target=recorder.run, daemon=True).start()
    recorder.record(Received(at(10, 0), "ws", "[]"))
    recorder.hand_over()
    assert recorder.problem == "the tape's disk did not take a write within 0.2 s"
    assert [kind for kind, _text in notices] == ["TAPE_FAILING"]
    recorder.hand_over()  # stuck: no second wait, no second alert
    assert len(notices) == 1
