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


def fifo_tape(data_dir: Path) -> Path:
    """Today's tape path made a FIFO: the tape thread blocks for ever opening it, as on a hung disk."""
    fifo = data_dir / "tapes" / "2025-10-02.jsonl.gz"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    return fifo


def test_a_tape_thread_silent_while_lines_wait_is_stuck_without_a_decision(tmp_path):
    """No decision waited on a hung disk while flat: /health said recording, and memory grew all session."""
    import threading
    import time

    notices: list[tuple[str, str]] = []
    fifo_tape(tmp_path)
    recorder = recorder_in(tmp_path, notices, idle_stuck_s=0.3)
    threading.Thread(target=recorder.run, daemon=True).start()
    recorder.record(Received(at(10, 0), "ws", "[]"))  # the thread takes it and blocks opening the tape
    time.sleep(0.5)
    recorder.record(Received(at(10, 0, 1), "rest", {"results": []}))
    recorder.record(Received(at(10, 0, 2), "rest", {"results": []}))
    assert (recorder.problem or "").startswith("the tape's disk has taken nothing for")
    assert [kind for kind, _text in notices] == ["TAPE_FAILING"] and not recorder.recording


def test_a_busy_tape_thread_is_waited_for_not_called_stuck(tmp_path):
    """A backlog (frames flooding in after a hold) takes the thread a while to write: it was called stuck
    after 0.5 s though it wrote all along, and the tape then rested five minutes around the exit."""
    import json
    import threading

    notices: list[tuple[str, str]] = []
    recorder = recorder_in(tmp_path, notices, hand_over_s=0.5)  # the backlog takes over 2 s to write
    frame = json.dumps([{"ev": "A", "sym": "IWM", "v": n, "c": 240.0 + n / 100, "s": n} for n in range(40)])
    for n in range(20_000):
        recorder.record(Received(at(10, 0) + n, "ws", frame))
    threading.Thread(target=recorder.run, daemon=True).start()
    recorder.hand_over()
    assert recorder.problem is None and notices == [] and recorder.recording
    recorder.close(timeout_s=30)


def test_a_process_held_longer_than_the_idle_limit_is_no_stuck_tape(tmp_path):
    """SIGSTOP held the tape thread with the rest: counted through the hold, its silence said a disk
    that never failed was stuck (a TAPE FAILING, a TAPE RECOVERED at once, and a gap in the tape)."""
    import threading
    import time

    notices: list[tuple[str, str]] = []
    recorder = recorder_in(tmp_path, notices, idle_stuck_s=0.3)
    time.sleep(0.5)  # the hold: the tape thread (not started yet) shows no life meanwhile
    recorder.resumed_after_hold()
    recorder.record(Received(at(10, 0), "ws", "[]"))
    recorder.record(Received(at(10, 0, 1), "ws", "[]"))
    assert recorder.problem is None and notices == [] and recorder.recording is False  # no tape open yet
    threading.Thread(target=recorder.run, daemon=True).start()
    recorder.hand_over()
    assert recorder.problem is None and notices == [] and recorder.recording
    recorder.close(timeout_s=10)
