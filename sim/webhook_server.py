"""A fake JSON webhook on 127.0.0.1: the far end of an Apprise `json://` fallback URL, for tests.

Apprise's `json://host:port/path` posts `{"version", "title", "message", "type", ...}`; this server keeps
every such post and can be told to fail, so a test can see which alerts went by the fallback channel.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any

from sim.jsonhttp import JsonHandler, Reply

SHUTDOWN_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class WebhookPost:
    """One accepted post: its path and decoded JSON body."""

    path: str
    body: dict[str, Any]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakeWebhook) -> None:
        super().__init__(address, _Handler)
        self.fake = fake


class _Handler(JsonHandler):
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        self.send_reply(self.server.fake._accept(self.path, body if isinstance(body, dict) else {}))


class FakeWebhook:
    """Bound on construction (so `apprise_url` is known), served from start() to stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), self)
        bound_host, bound_port = self._server.server_address[:2]
        self.apprise_url = f"json://{bound_host}:{bound_port}/alerts"
        self._lock = threading.Lock()
        self._posts: list[WebhookPost] = []
        self._fail_status: int | None = None
        self.requests = 0  # every post, accepted or failed
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeWebhook:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> FakeWebhook:
        """Serve on a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(SHUTDOWN_POLL_S,), name="fake-webhook", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    @property
    def posts(self) -> list[WebhookPost]:
        """Accepted posts, oldest first."""
        with self._lock:
            return list(self._posts)

    def fail_with(self, status: int | None) -> None:
        """Answer every post with `status` (None: accept again)."""
        with self._lock:
            self._fail_status = status

    def _accept(self, path: str, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests += 1
            if self._fail_status is not None:
                return Reply(self._fail_status, {"error": "simulated failure"})
            self._posts.append(WebhookPost(path, body))
        return Reply(200, {"ok": True})
