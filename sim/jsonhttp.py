"""What the fake HTTP servers share: a JSON reply value and a request handler that sends it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer of a fake: status, JSON body, extra headers; `html`, when given, is sent instead of
    the JSON (a proxy's or a load balancer's error page)."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()
    html: str | None = None


class JsonHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with TCP_NODELAY (headers and body are separate writes: Nagle plus delayed ACK add ~40 ms)."""

    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    content_type = "application/json"

    def send_reply(self, reply: Reply) -> None:
        """Write the answer; a client that already gave up (timed out) just closes the connection."""
        if reply.html is None:
            payload, content_type = json.dumps(reply.body, separators=(",", ":")).encode(), self.content_type
        else:
            payload, content_type = reply.html.encode(), "text/html"
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        return
