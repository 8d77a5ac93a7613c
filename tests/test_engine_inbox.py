"""The engine's inbox: producers wait while the engine is behind, notices never wait, nothing is lost."""

from __future__ import annotations

import json
import threading
import time

from engine_inbox import EngineInbox
from events import Received
from polygon_client import Backoff, PolygonStream
from sim.polygon_server import FakePolygon, RecordedMarket

START_MS = 1_759_411_800_000  # 2025-10-02 09:30 New York
KEY = "testkey"


def flood_market(seconds: int) -> RecordedMarket:
    """One frame a second holding IWM's bar, for `seconds` seconds from the open."""
    frames = [
        (START_MS + i * 1000 + 200, [{"ev": "A", "sym": "IWM", "v": 100, "av": 100 * (i + 1), "vw": 240.0,
          "o": 240.0, "c": 240.0, "h": 240.0, "l": 240.0, "a": 240.0, "z": 1,
          "s": START_MS + i * 1000, "e": START_MS + i * 1000 + 1000}])
        for i in range(seconds)
    ]  # fmt: skip
    return RecordedMarket(frames, chains=[])


def test_a_producer_waits_at_the_limit_and_resumes_in_order_when_the_engine_drains() -> None:
    stop = threading.Event()
    held: list[int] = []
    inbox = EngineInbox(stop, limit=3, on_held=held.append)
    for i in range(3):
        inbox.put_data(i)
    producer = threading.Thread(target=lambda: [inbox.put_data(i) for i in range(3, 8)])
    producer.start()
    producer.join(0.2)
    assert producer.is_alive(), "the producer must wait while 3 items are waiting"
    assert inbox.qsize() == 3
    taken = []
    while len(taken) < 8:
        item = inbox.get(timeout=2.0)
        assert item is not None, f"items lost: got {taken}"
        taken.append(item)
    producer.join(2.0)
    assert not producer.is_alive()
    assert taken == list(range(8))
    assert held == [3], "the first hold is reported once, with the depth"
    assert inbox.holds >= 1
    assert inbox.held_s > 0


def test_a_producer_also_waits_at_the_byte_limit_and_one_frame_larger_than_it_still_goes_in() -> None:
    """Items alone bounded nothing: 10,000 frames of a megabyte each (a compressed flood) were 10 GB."""
    stop = threading.Event()
    inbox = EngineInbox(stop, limit=1000, byte_limit=1000)
    inbox.put_data(Received(1, "ws", "x" * 5000))  # alone, larger than the limit: taken
    producer = threading.Thread(target=inbox.put_data, args=(Received(2, "ws", b"y" * 10),))
    producer.start()
    producer.join(0.2)
    assert producer.is_alive() and inbox.qsize() == 1, "5000 bytes wait: the next frame waits too"
    first = inbox.get(timeout=1.0)
    producer.join(2.0)
    assert not producer.is_alive()
    second = inbox.get(timeout=1.0)
    assert [first.t, second.t] == [1, 2] and inbox.holds == 1  # type: ignore[union-attr]
    inbox.put_data(Received(3, "rest", {"results": []}))  # decoded answers count as no bytes
    inbox.put_data(Received(4, "ws", "z" * 999))
    assert inbox.qsize() == 2 and inbox.holds == 1


def test_notices_never_wait_even_at_the_limit() -> None:
    inbox = EngineInbox(threading.Event(), limit=2)
    inbox.put_data("bar 1")
    inbox.put_data("bar 2")
    inbox.put("journal failing")  # would deadlock the engine thread if it waited
    assert inbox.qsize() == 3
    assert [inbox.get(0.1) for _ in range(3)] == ["bar 1", "bar 2", "journal failing"]
    assert inbox.holds == 0


def test_a_held_producer_lets_go_when_the_daemon_stops() -> None:
    stop = threading.Event()
    inbox = EngineInbox(stop, limit=1)
    inbox.put_data("first")
    producer = threading.Thread(target=inbox.put_data, args=("never handled",))
    producer.start()
    producer.join(0.1)
    assert producer.is_alive()
    stop.set()
    producer.join(2.0)
    assert not producer.is_alive()
    assert inbox.qsize() == 1


def test_depth_max_is_the_deepest_backlog_the_engine_found() -> None:
    inbox = EngineInbox(threading.Event(), limit=100)
    for i in range(5):
        inbox.put_data(i)
    inbox.get(0.1)
    assert inbox.depth_max == 4
    assert inbox.get(0.01) == 1
    assert inbox.depth_max == 4
    for _ in range(3):
        inbox.get(0.01)
    assert inbox.get(0.01) is None


def test_a_stream_flooding_a_slow_engine_is_held_at_the_limit_and_loses_no_frame() -> None:
    # 3,600 simulated seconds served in about one wall second, to an engine that takes 1 ms an item.
    with FakePolygon(flood_market(3600), api_key=KEY, start_ms=START_MS, speed=3600.0) as fake:
        stop = threading.Event()
        inbox = EngineInbox(stop, limit=20)
        stream = PolygonStream(
            fake.ws_url,
            KEY,
            ["IWM", "SPY"],
            inbox.put_data,
            clock_ms=fake.now_ms,
            backoff=Backoff(initial_s=0.01, max_s=0.02),
        )
        stream.start()
        try:
            starts = bar_starts_taken(inbox, wanted=600)
        finally:
            stop.set()
            stream.stop(timeout=5.0)
    assert inbox.holds >= 1, "the flood never reached the limit: the test proves nothing"
    assert inbox.depth_max <= inbox.limit
    assert starts == list(range(starts[0], starts[0] + 600 * 1000, 1000)), "a held frame was lost"
    assert stream.reconnects == 0
    # No permessage-deflate offered: a few KB on the wire inflated to a megabyte a frame, past every bound.
    assert fake.ws_extensions_offered == [None]


def bar_starts_taken(inbox: EngineInbox, wanted: int) -> list[int]:
    """The IWM bar starts of the first `wanted` data frames, taken one per millisecond."""
    starts: list[int] = []
    deadline = time.monotonic() + 30.0
    while len(starts) < wanted and time.monotonic() < deadline:
        item = inbox.get(timeout=0.05)
        time.sleep(0.001)
        if isinstance(item, Received) and '"ev":"A"' in item.payload:
            starts.append(next(e["s"] for e in json.loads(item.payload) if e["sym"] == "IWM"))
    return starts


def test_a_frame_above_a_megabyte_is_taken_whole_without_a_redial() -> None:
    """websockets' default 1 MiB bound closed the socket (1009) on a burst of 10,000 option quotes in one
    frame, and every quote in it was lost (the peak of a giveback among them)."""
    burst = json.dumps([{"ev": "status", "status": "info", "message": "x" * 100}] * 12_000)
    assert len(burst) > 1 << 20
    with FakePolygon(flood_market(600), api_key=KEY, start_ms=START_MS, speed=20.0) as fake:
        stop = threading.Event()
        inbox = EngineInbox(stop)
        stream = PolygonStream(fake.ws_url, KEY, ["IWM", "SPY"], inbox.put_data, clock_ms=fake.now_ms,
                               backoff=Backoff(initial_s=0.01, max_s=0.02))  # fmt: skip
        stream.start()
        try:
            fake.send_garbage([burst])
            deadline, sizes = time.monotonic() + 20.0, []
            while time.monotonic() < deadline and max(sizes, default=0) < len(burst):
                item = inbox.get(timeout=0.05)
                if isinstance(item, Received) and isinstance(item.payload, str):
                    sizes.append(len(item.payload))
        finally:
            stop.set()
            stream.stop(timeout=5.0)
    assert max(sizes, default=0) == len(burst) and stream.reconnects == 0 and fake.ws_connections == 1
