"""Health: the snapshot of DESIGN section 9, the optional `GET /health` endpoint and the heartbeat ping."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import structlog

from http_deadline import DeadlineTransport

VERSION = "1.0.0"
Snapshot = dict[str, Any]


UNHEALTHY = frozenset({"stalled", "failing"})


def health_status(
    *, market_open: bool, stalled: bool, failing: Sequence[str] = (), degraded: Sequence[str] = ()
) -> str:
    """One word for the daemon's state, worst first.

    failing: it cannot do its job (a thread down, no chain polls in session, alerts cannot reach the
    phone); stalled: no bars in session; degraded: it works around a problem (journal, tape, Pushover
    with a fallback); closed: outside the session; ok.
    """
    if failing:
        return "failing"
    if market_open and stalled:
        return "stalled"
    if degraded:
        return "degraded"
    return "ok" if market_open else "closed"


def http_status_for(snapshot: Snapshot) -> int:
    """503 while the daemon cannot do its job, so a probe or dead-man switch notices."""
    return 503 if snapshot.get("status") in UNHEALTHY else 200


# Idle or slow clients are dropped after this long, and no more than MAX_CLIENTS are served at once:
# each holds a thread and a file descriptor, and descriptors run out for the trading path's sockets too.
CLIENT_TIMEOUT_S = 5.0
MAX_CLIENTS = 16
MAKE_ROOM_WAIT_S = 0.5  # for the oldest client's thread to end once it is cut off
HEARTBEAT_TIMEOUT_S = 10.0  # a whole ping, answer included


class HealthServer:
    """Serves the latest published snapshot as JSON; never touches the engine itself."""

    def __init__(
        self,
        host: str,
        port: int,
        snapshot: Callable[[], Snapshot],
        *,
        client_timeout_s: float = CLIENT_TIMEOUT_S,
        max_clients: int = MAX_CLIENTS,
        redact: Callable[[str], str] = str,
    ) -> None:
        """`redact` takes the secrets out of the served JSON (whatever problem text carried one in)."""
        handler = _handler_for(snapshot, client_timeout_s, redact)
        # A whole request gets twice the per-read timeout: a client trickling a byte now and then never
        # hits the per-read one, and sixteen such clients shut everyone else out.
        self._server = _BoundedServer((host, port), handler, max_clients, 2 * client_timeout_s)
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def alive(self) -> bool:
        """Whether the serving thread still runs."""
        return self._thread.is_alive()

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _BoundedServer(ThreadingHTTPServer):
    """A thread per client, at most `max_clients` at once; one still connected after `deadline_s` is
    cut off. A client beyond the cap makes room by cutting off the oldest: a probe sends its request at
    once and is answered in a millisecond, so the oldest connection is the one holding a slot for
    nothing (sixteen clients trickling a request had answered nobody else until they were cut off)."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_clients: int,
        deadline_s: float,
    ) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_clients)
        self._deadline_s = deadline_s
        self._open: dict[Any, None] = {}  # the served connections, oldest first
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._cut_oldest()
            if not self._slots.acquire(timeout=MAKE_ROOM_WAIT_S):
                self.shutdown_request(request)
                return
        with self._open_lock:
            self._open[request] = None
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def _cut_oldest(self) -> None:
        with self._open_lock:
            oldest = next(iter(self._open), None)
        if oldest is not None:
            _cut_off(oldest)

    def _release(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line, not socketserver's traceback on stderr: a client cut off at its deadline, or gone
        before its answer, is the client's business (a broken pipe)."""
        kind = sys.exc_info()[0]
        structlog.get_logger("health").info(
            "health_client_dropped", error=kind.__name__ if kind else "unknown"
        )

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        cut = threading.Timer(self._deadline_s, _cut_off, (request,))
        cut.daemon = True
        cut.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            cut.cancel()
            self._release(request)


def _cut_off(connection: socket.socket) -> None:
    """End a client's connection from another thread: its handler's blocked read returns at once."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def _handler_for(
    snapshot: Callable[[], Snapshot], timeout_s: float, redact: Callable[[str], str]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Headers and body are separate writes: without TCP_NODELAY, Nagle plus delayed ACK adds ~40 ms.
        disable_nagle_algorithm = True
        timeout = timeout_s  # the socket's: an idle or trickling client is let go

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?")[0] != "/health":
                self.send_error(404)
                return
            body = snapshot()
            data = redact(json.dumps(body)).encode()
            self.send_response(http_status_for(body))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: object) -> None:
            return

    return Handler


# Failed pings in a row before they are said (one alert, /health degraded): one lost ping is a blip the
# dead-man switch's own grace absorbs; two (two minutes at the default interval) are a wrong URL or an outage.
HEARTBEAT_FAILS_TO_SAY = 2
HEARTBEAT_FAILING = "failing"
HEARTBEAT_RECOVERED = "recovered"


class Heartbeat:
    """Pings HEARTBEAT_URL (a dead-man switch) at most once per interval while healthy."""

    def __init__(
        self,
        url: str,
        *,
        interval_s: float = 60.0,
        timeout_s: float = HEARTBEAT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self.interval_s = interval_s
        # A deadline per ping, not per read: an endpoint trickling its answer held this thread for good.
        self._client = httpx.Client(
            timeout=timeout_s, transport=transport or DeadlineTransport(timeout_s, max_connections=1)
        )
        self._last: float | None = None
        self.pings = 0
        self.failures = 0
        self.failing_in_a_row = 0
        self.last_error: str | None = None  # the error type and HTTP status only: the URL is a secret
        self.failing_since: float | None = None  # monotonic time of the first failure in a row

    def maybe_ping(self, monotonic_now: float, healthy: bool) -> str | None:
        """Ping when due and healthy. Returns HEARTBEAT_FAILING when the pings have just failed
        HEARTBEAT_FAILS_TO_SAY times in a row, HEARTBEAT_RECOVERED at the first success after that,
        else None (each said once by the caller)."""
        if not self.url or not healthy:
            return None
        if self._last is not None and monotonic_now - self._last < self.interval_s:
            return None
        self._last = monotonic_now
        try:
            # Streamed and never read: the answer's status is all a ping needs, whatever its body holds.
            with self._client.stream("GET", self.url) as response:
                response.raise_for_status()
        except httpx.HTTPError as exc:
            return self._failed(exc, monotonic_now)
        self.pings += 1
        was_said = self.failing_in_a_row >= HEARTBEAT_FAILS_TO_SAY
        self.failing_in_a_row, self.last_error, self.failing_since = 0, None, None
        return HEARTBEAT_RECOVERED if was_said else None

    def _failed(self, exc: httpx.HTTPError, monotonic_now: float) -> str | None:
        self.failures += 1
        self.failing_in_a_row += 1
        status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
        self.last_error = type(exc).__name__ + ("" if status is None else f" (HTTP {status})")
        if self.failing_since is None:
            self.failing_since = monotonic_now
        # The URL itself is a secret (anyone holding it can fake liveness): log the error type only.
        structlog.get_logger("heartbeat").warning("heartbeat_failed", error=self.last_error)
        return HEARTBEAT_FAILING if self.failing_in_a_row == HEARTBEAT_FAILS_TO_SAY else None

    def problem(self, monotonic_now: float) -> str | None:
        """For /health once the failures have been said: what is wrong, without the URL."""
        if self.failing_in_a_row < HEARTBEAT_FAILS_TO_SAY or self.failing_since is None:
            return None
        since_s = monotonic_now - self.failing_since
        return f"heartbeat pings failing for {since_s:.0f} s ({self.last_error}): the dead-man switch may page you"
