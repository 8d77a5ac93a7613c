"""Health: the snapshot served over real HTTP, 503 when stalled, and the heartbeat ping."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from health import HealthServer, Heartbeat, health_status


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_status_words():
    assert health_status(market_open=False, stalled=True) == "closed"
    assert health_status(market_open=True, stalled=False) == "ok"
    assert health_status(market_open=True, stalled=True) == "stalled"


def test_health_endpoint_serves_the_latest_snapshot_and_503_when_stalled():
    snapshot = {"status": "ok", "market_open": True, "late_bars": 0}
    server = HealthServer("127.0.0.1", 0, lambda: snapshot).start()
    try:
        url = f"http://127.0.0.1:{server.port}/health"
        assert get(url) == (200, snapshot)
        snapshot = {"status": "stalled", "market_open": True, "late_bars": 3}
        assert get(url) == (503, snapshot)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
        assert missing.value.code == 404
    finally:
        server.stop()


def test_idle_clients_are_capped_and_let_go_so_they_cannot_exhaust_threads_or_descriptors():
    """An audit held 249 idle connections open: each kept a thread and a descriptor for ever, and the
    REST client then failed with `Too many open files`."""
    snapshot = {"status": "ok"}
    server = HealthServer("127.0.0.1", 0, lambda: snapshot, client_timeout_s=0.5, max_clients=4).start()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]
    try:
        time.sleep(0.2)
        served = sum("process_request_thread" in t.name for t in threading.enumerate())
        refused = 0
        for conn in idle:
            conn.settimeout(2.0)
            try:
                refused += conn.recv(1) == b""  # closed by the server: beyond the cap, or idle too long
            except OSError:
                refused += 1
        assert refused == 12, "every idle client was closed: 8 at once, 4 after the client timeout"
        assert served <= 4
        assert get(f"http://127.0.0.1:{server.port}/health") == (200, snapshot)
    finally:
        for conn in idle:
            conn.close()
        server.stop()


def test_clients_trickling_a_request_are_cut_off_at_its_deadline_so_health_stays_reachable():
    """A byte every 0.3 s never trips a 0.5 s per-read timeout: sixteen such clients kept /health
    unreachable for as long as they trickled."""
    snapshot = {"status": "ok"}
    server = HealthServer("127.0.0.1", 0, lambda: snapshot, client_timeout_s=0.5, max_clients=2).start()
    tricklers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n" * 100:
                if stop.wait(0.3):
                    return
                conn.send(bytes([byte]))

    threads = [threading.Thread(target=trickle, args=(c,), daemon=True) for c in tricklers]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)  # past the whole-request deadline of twice the client timeout
        assert get(f"http://127.0.0.1:{server.port}/health") == (200, snapshot)
        for conn in tricklers:
            conn.settimeout(2.0)
            assert conn.recv(1024) == b"", "the trickler was cut off"
    finally:
        stop.set()
        for conn in tricklers:
            conn.close()
        server.stop()


class _Counter(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *_args: object) -> None:
        return


def test_a_probe_is_answered_at_once_while_every_slot_is_held_by_a_trickling_client():
    """Sixteen clients trickling a request answered nobody else until their deadline cut them off, and
    clients that reconnect as they are cut off kept /health unreachable for good."""
    snapshot = {"status": "ok"}
    server = HealthServer("127.0.0.1", 0, lambda: snapshot, client_timeout_s=5.0, max_clients=3).start()
    stop = threading.Event()
    held: list[socket.socket] = []

    def trickle_for_ever() -> None:
        while not stop.is_set():  # a new connection as soon as one is cut off
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", server.port)) as conn:
                held.append(conn)
                for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n" * 100:
                    if stop.wait(0.2):
                        return
                    conn.sendall(bytes([byte]))

    threads = [threading.Thread(target=trickle_for_ever, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 5
        while len(held) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # every slot held, far from the 10 s deadline
        for _ in range(5):
            started = time.monotonic()
            assert get(f"http://127.0.0.1:{server.port}/health") == (200, snapshot)
            assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
        server.stop()


def test_heartbeat_pings_at_most_once_per_interval_and_only_when_healthy():
    _Counter.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        beat = Heartbeat(f"http://127.0.0.1:{server.server_address[1]}/ping/abc", interval_s=60)
        beat.maybe_ping(1000.0, healthy=True)
        beat.maybe_ping(1030.0, healthy=True)
        beat.maybe_ping(1061.0, healthy=False)
        beat.maybe_ping(1062.0, healthy=True)
        assert _Counter.hits == ["/ping/abc", "/ping/abc"] and beat.pings == 2
    finally:
        server.shutdown()


class _Scripted(BaseHTTPRequestHandler):
    """Answers each GET with the next status of `statuses` (then 200)."""

    statuses: list[int] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        status = _Scripted.statuses.pop(0) if _Scripted.statuses else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return


def test_failing_heartbeat_pings_are_said_once_on_health_until_one_goes_through_again():
    from health import HEARTBEAT_FAILING, HEARTBEAT_RECOVERED

    _Scripted.statuses = [404, 500, 404, 500]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = f"http://127.0.0.1:{server.server_address[1]}/ping/SEKRETuuid"
    try:
        beat = Heartbeat(secret, interval_s=60)
        said = [beat.maybe_ping(1000.0 + 60 * n, healthy=True) for n in range(6)]
        _Scripted.statuses = [503, 503]
        said += [beat.maybe_ping(1400.0, healthy=True), beat.maybe_ping(1460.0, healthy=True)]
        problem_while_failing = beat.problem(1500.0)
        said.append(beat.maybe_ping(1520.0, healthy=True))
    finally:
        server.shutdown()
    assert said == [None, HEARTBEAT_FAILING, None, None, HEARTBEAT_RECOVERED, None, None, HEARTBEAT_FAILING,
                    HEARTBEAT_RECOVERED]  # fmt: skip
    assert problem_while_failing == (
        "heartbeat pings failing for 100 s (HTTPStatusError (HTTP 503)): the dead-man switch may page you"
    )
    assert beat.problem(1600.0) is None and "SEKRET" not in (problem_while_failing or "")


def _trickle(wfile: object, data: bytes) -> None:
    """Write `data` a byte every 0.1 s (a failing proxy); a client gone ends it."""
    try:
        for byte in data:
            wfile.write(bytes([byte]))  # type: ignore[attr-defined]
            wfile.flush()  # type: ignore[attr-defined]
            time.sleep(0.1)
    except OSError:
        return


class _Trickler(BaseHTTPRequestHandler):
    """Answers 200 and then its body one byte at a time, for ever."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        _trickle(self.wfile, b"x" * 100_000)

    def log_message(self, *_args: object) -> None:
        return


def _ping_in_a_thread(handler: type[BaseHTTPRequestHandler]) -> Heartbeat:
    """One ping against a local server with `handler`; asserts it ended within its 0.5 s deadline."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        beat = Heartbeat(f"http://127.0.0.1:{server.server_address[1]}/ping", timeout_s=0.5)
        done = threading.Thread(target=beat.maybe_ping, args=(1000.0, True), daemon=True)
        done.start()
        done.join(5.0)
        assert not done.is_alive(), "the ping ended at its deadline"
        return beat
    finally:
        server.shutdown()


class _TricklingStatus(_Trickler):
    """Answers its status line one byte at a time."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        _trickle(self.wfile, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def test_a_heartbeat_endpoint_that_trickles_its_answer_cannot_hold_the_heartbeat_thread():
    """Each read was under the 10 s timeout, so a trickling answer held the thread for good and /health
    said `failing` (a thread that stopped turning) long after the endpoint was fine again."""
    beat = _ping_in_a_thread(_TricklingStatus)
    assert (beat.pings, beat.failures) == (0, 1)


def test_a_heartbeat_reads_the_status_only_never_the_body():
    """A 200 is the ping taken; the body after it (here trickled for ever, or a decompression bomb)
    is never read, so it can neither hold the thread nor fill its memory."""
    beat = _ping_in_a_thread(_Trickler)
    assert (beat.pings, beat.failures) == (1, 0)


def test_a_client_gone_before_its_answer_is_one_log_line_not_a_traceback(capfd):
    """socketserver printed a BrokenPipeError traceback per client cut off or gone mid-answer."""
    from structlog.testing import capture_logs

    snapshot = {"status": "ok", "problems": ["x" * 20_000_000]}  # far more than the socket buffers hold
    server = HealthServer("127.0.0.1", 0, lambda: snapshot, client_timeout_s=0.5).start()
    try:
        with capture_logs() as logs:
            for _ in range(3):
                conn = socket.create_connection(("127.0.0.1", server.port))
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                conn.recv(10)
                conn.close()  # a reset while the server still writes
            time.sleep(0.5)
        assert get(f"http://127.0.0.1:{server.port}/health")[0] == 200
    finally:
        server.stop()
    assert "Traceback" not in capfd.readouterr().err
    assert {e["event"] for e in logs} <= {"health_client_dropped"}
