"""A fake Pushover messages API on 127.0.0.1, for tests and rehearsals.

It validates requests the way Pushover does (30-character keys, message required, length limits,
emergency retry/expire, one image attachment of at most 5,242,880 bytes, sent as a multipart file
`attachment` or as `attachment_base64` with `attachment_type`), answers with Pushover-shaped JSON
and quota headers, and can be told to fail or stall. Run it alone with `python -m sim.pushover_server --port 8787`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

from sim.jsonhttp import JsonHandler, Reply

MESSAGES_PATH = "/1/messages.json"
VALIDATE_PATH = "/1/users/validate.json"
MONTHLY_LIMIT = 10_000
KEY_PATTERN = re.compile(r"[A-Za-z0-9]{30}")
TITLE_LIMIT = 250
MESSAGE_LIMIT = 1024
ATTACHMENT_LIMIT = 5_242_880
STALLED_STATUS = 503
TOO_LARGE_PAGE = "<html><head><title>413 Request Entity Too Large</title></head><body>nginx</body></html>"
SHUTDOWN_POLL_S = 0.05

FAILURE_ERRORS = {
    400: ["simulated bad request"],
    401: ["application token is invalid"],
    429: ["application has exceeded its monthly message limit"],
    500: ["simulated internal server error"],
}


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One request as the server saw it. `received_at` is `time.monotonic()` at arrival."""

    form: dict[str, str]
    received_at: float
    status: int = 200
    request_id: str = ""
    attachment: bytes | None = None
    attachment_type: str | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    """The image of a request: its bytes and the content type the client gave."""

    data: bytes
    content_type: str


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], fake: FakePushover) -> None:
        super().__init__(address, _Handler)
        self.fake = fake


class _Handler(JsonHandler):
    content_type = "application/json; charset=utf-8"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection)

    def finish(self) -> None:
        self.server.fake._untrack(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        limit = self.server.fake.proxy_body_limit
        if limit is not None and length > limit:
            self.server.fake._note_too_large(length)
            self.send_reply(Reply(413, None, html=TOO_LARGE_PAGE))
            return
        route = self.path.split("?")[0]
        form, attachment = parse_request(raw, self.headers.get("Content-Type", ""))
        if route == VALIDATE_PATH:
            self.send_reply(validate_keys(form))
            return
        if route != MESSAGES_PATH:
            self.send_reply(Reply(404, {"status": 0, "errors": ["not found"]}))
            return
        self.send_reply(self.server.fake._handle(form, attachment))

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_reply(Reply(405, {"status": 0, "errors": ["use POST"]}))


def parse_form(raw: bytes, content_type: str) -> dict[str, str]:
    """A form-encoded or JSON request body as a flat str->str mapping (last value wins)."""
    text = raw.decode("utf-8", errors="replace")
    if content_type.startswith("application/json"):
        try:
            decoded = json.loads(text)
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in decoded.items()} if isinstance(decoded, dict) else {}
    return {k: v[-1] for k, v in parse_qs(text, keep_blank_values=True).items()}


def parse_request(raw: bytes, content_type: str) -> tuple[dict[str, str], Attachment | None]:
    """A messages request's fields and its image, from any body Pushover takes: form-encoded, JSON, or
    multipart/form-data (the image as the file part `attachment`). `attachment_base64` with
    `attachment_type` is decoded into the image as well; undecodable base64 gives empty image bytes."""
    if content_type.lower().startswith("multipart/form-data"):
        form, attachment = parse_multipart(raw, content_type)
    else:
        form, attachment = parse_form(raw, content_type), None
    encoded = form.pop("attachment_base64", None)
    if encoded is not None and attachment is None:
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            data = b""
        attachment = Attachment(data, form.get("attachment_type", ""))
    return form, attachment


def parse_multipart(raw: bytes, content_type: str) -> tuple[dict[str, str], Attachment | None]:
    """A multipart/form-data body: text parts as fields (last value wins), the `attachment` part as the image."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", errors="replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + raw)
    form: dict[str, str] = {}
    attachment = None
    if not message.is_multipart():
        return form, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        if name == "attachment":
            attachment = Attachment(payload, part.get_content_type())
        else:
            form[name] = payload.decode(part.get_content_charset() or "utf-8", errors="replace")
    return form, attachment


def validate_keys(form: dict[str, str]) -> Reply:
    """`users/validate.json`: 200 with status 1 when token and user look valid, else 400 naming the bad one."""
    errors = [
        f"{name} is invalid" for name in ("token", "user") if not KEY_PATTERN.fullmatch(form.get(name, ""))
    ]
    if errors:
        return Reply(400, {"status": 0, "errors": errors, "request": str(uuid.uuid4())})
    return Reply(200, {"status": 1, "group": 0, "devices": ["phone"], "request": str(uuid.uuid4())})


def validation_errors(form: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Pushover's checks: the error texts and the `<param>: invalid` fields of a 400 body."""
    errors: list[str] = []
    fields: dict[str, str] = {}
    if not KEY_PATTERN.fullmatch(form.get("token", "")):
        errors.append("application token is invalid")
        fields["token"] = "invalid"
    if not KEY_PATTERN.fullmatch(form.get("user", "")):
        errors.append("user identifier is invalid")
        fields["user"] = "invalid"
    errors += _message_errors(form, fields)
    errors += _priority_errors(form, fields)
    if "timestamp" in form and not _is_int(form["timestamp"]):
        errors.append("timestamp is invalid")
        fields["timestamp"] = "invalid"
    return errors, fields


def attachment_errors(attachment: Attachment | None, fields: dict[str, str]) -> list[str]:
    """Pushover's limit: one image of at most ATTACHMENT_LIMIT bytes."""
    if attachment is None:
        return []
    if len(attachment.data) > ATTACHMENT_LIMIT:
        fields["attachment"] = "invalid"
        return [f"attachment is too large ({ATTACHMENT_LIMIT} bytes maximum)"]
    if not attachment.content_type.startswith("image/"):
        fields["attachment"] = "invalid"
        return ["attachment must be an image"]
    return []


def _message_errors(form: dict[str, str], fields: dict[str, str]) -> list[str]:
    errors = []
    message = form.get("message", "")
    if not message:
        errors.append("message cannot be blank")
        fields["message"] = "cannot be blank"
    elif len(message) > MESSAGE_LIMIT:
        errors.append(f"message is too long ({MESSAGE_LIMIT} characters maximum)")
        fields["message"] = "invalid"
    if len(form.get("title", "")) > TITLE_LIMIT:
        errors.append(f"title is too long ({TITLE_LIMIT} characters maximum)")
        fields["title"] = "invalid"
    return errors


def _priority_errors(form: dict[str, str], fields: dict[str, str]) -> list[str]:
    raw = form.get("priority", "0")
    if not _is_int(raw) or not -2 <= int(raw) <= 2:
        fields["priority"] = "invalid"
        return ["priority is invalid"]
    if int(raw) != 2:
        return []
    errors = []
    if not _is_int(form.get("retry", "")) or int(form["retry"]) < 30:
        errors.append("retry must be supplied with priority=2 and be at least 30 seconds")
        fields["retry"] = "invalid"
    if not _is_int(form.get("expire", "")) or int(form["expire"]) > 10800:
        errors.append("expire must be supplied with priority=2 and be at most 10800 seconds")
        fields["expire"] = "invalid"
    return errors


def _is_int(text: str) -> bool:
    return re.fullmatch(r"-?\d+", text) is not None


class FakePushover:
    """The fake API. Bound on construction (so `url` is known), served from start() to stop()."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, echo: Callable[[str], None] | None = None
    ) -> None:
        self._server = _Server((host, port), self)
        bound_host, bound_port = self._server.server_address[:2]
        self.url = f"http://{bound_host}:{bound_port}{MESSAGES_PATH}"
        self._echo = echo
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._history: list[ReceivedMessage] = []
        self._connections: set[socket.socket] = set()
        self._remaining = MONTHLY_LIMIT
        self._fail_status: int | None = None
        self._retry_after: str | None = None  # the Retry-After header of forced 429s
        self._fail_count: int | None = None
        self._fail_until: float | None = None
        self._stall_until: float | None = None
        self._slow_s = 0.0
        # A proxy in front of Pushover refusing larger request bodies with its own 413 page (nginx's
        # client_max_body_size); None: no proxy.
        self.proxy_body_limit: int | None = None
        self.too_large: list[int] = []

    def __enter__(self) -> FakePushover:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> FakePushover:
        """Serve on a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(SHUTDOWN_POLL_S,), name="fake-pushover", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release held requests and drop open keep-alive connections."""
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Messages accepted (answered 200), oldest first."""
        with self._lock:
            return [m for m in self._history if m.status == 200]

    @property
    def history(self) -> list[ReceivedMessage]:
        """Every request seen on the messages endpoint with the status it was answered, oldest first."""
        with self._lock:
            return list(self._history)

    @property
    def requests(self) -> int:
        """How many requests reached the messages endpoint, failed ones included."""
        with self._lock:
            return len(self._history)

    def fail_with(
        self,
        status: int,
        count: int | None = None,
        *,
        seconds: float | None = None,
        retry_after: str | None = None,
    ) -> None:
        """Answer `status` to the next `count` requests, or to all for `seconds`, else until recover();
        a 429 says `Retry-After: <retry_after>` when given (a rate limiter, not the month's quota)."""
        with self._lock:
            self._retry_after = retry_after
            self._fail_status = status
            self._fail_count = count
            self._fail_until = None if seconds is None else time.monotonic() + seconds

    def recover(self) -> None:
        """Stop failing and stalling."""
        with self._lock:
            self._fail_status = self._fail_count = self._fail_until = self._stall_until = None

    def slow(self, seconds: float) -> None:
        """Take `seconds` to answer each request, accepting it as usual (0 restores prompt answers).

        Like the real service on a bad day: the message is delivered at arrival, the answer comes late,
        so a client that gives up early and sends again causes a duplicate, which tests can count.
        """
        with self._lock:
            self._slow_s = seconds

    def stall(self, seconds: float) -> None:
        """Hold every request that arrives in the next `seconds` until then, and answer it 503.

        Held requests are never accepted, so a client that timed out and retried cannot cause a
        duplicate here (the real service might deliver a message whose answer was lost).
        """
        with self._lock:
            self._stall_until = time.monotonic() + seconds

    def _handle(self, form: dict[str, str], attachment: Attachment | None = None) -> Reply:
        arrived = time.monotonic()
        request_id = str(uuid.uuid4())
        with self._lock:
            stall_until = self._stall_until if self._stall_until and arrived < self._stall_until else None
        if stall_until is not None:
            self._stopping.wait(stall_until - arrived)
            status, body = STALLED_STATUS, {"status": 0, "errors": ["stalled"], "request": request_id}
        else:
            status, body = self._decide(form, attachment, arrived, request_id)
        data, kind = (attachment.data, attachment.content_type) if attachment is not None else (None, None)
        with self._lock:
            self._history.append(ReceivedMessage(form, arrived, status, request_id, data, kind))
            remaining = 0 if status == 429 else self._remaining
            slow_s = self._slow_s
            retry_after = self._retry_after if status == 429 else None
        if slow_s > 0:
            self._stopping.wait(slow_s)
        self._say(f"{status} priority={form.get('priority', '0')} title={form.get('title', '')!r}")
        for line in form.get("message", "").splitlines():
            self._say(f"    {line}")  # the alert as the phone shows it, under its title
        headers = limit_headers(remaining) + ((("Retry-After", retry_after),) if retry_after else ())
        return Reply(status, body, headers)

    def _decide(
        self, form: dict[str, str], attachment: Attachment | None, arrived: float, request_id: str
    ) -> tuple[int, dict[str, Any]]:
        forced = self._forced_status(arrived)
        if forced is not None:
            return forced, failure_body(forced, request_id)
        errors, fields = validation_errors(form)
        errors += attachment_errors(attachment, fields)
        if errors:
            return 400, {**fields, "errors": errors, "status": 0, "request": request_id}
        with self._lock:
            self._remaining = max(0, self._remaining - 1)
        body: dict[str, Any] = {"status": 1, "request": request_id}
        if form.get("priority") == "2":
            body["receipt"] = uuid.uuid4().hex[:30]
        return 200, body

    def _forced_status(self, now: float) -> int | None:
        with self._lock:
            status = self._fail_status
            if status is None:
                return None
            if self._fail_until is not None and now >= self._fail_until:
                self._fail_status = self._fail_until = None
                return None
            if self._fail_count is not None:
                self._fail_count -= 1
                if self._fail_count <= 0:
                    self._fail_status = self._fail_count = None
            return status

    def _note_too_large(self, length: int) -> None:
        with self._lock:
            self.too_large.append(length)

    def _track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _say(self, line: str) -> None:
        if self._echo is not None:
            self._echo(line)


def limit_headers(remaining: int) -> tuple[tuple[str, str], ...]:
    """The quota headers Pushover sends with every messages answer."""
    return (
        ("X-Limit-App-Limit", str(MONTHLY_LIMIT)),
        ("X-Limit-App-Remaining", str(remaining)),
        ("X-Limit-App-Reset", str(int(time.time()) + 30 * 86400)),
    )


def failure_body(status: int, request_id: str) -> dict[str, Any]:
    """A Pushover-like error body for a forced failure; 401 says the token is invalid."""
    body: dict[str, Any] = {
        "status": 0,
        "errors": FAILURE_ERRORS.get(status, [f"simulated HTTP {status}"]),
        "request": request_id,
    }
    if status == 401:
        body["token"] = "invalid"
    return body


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sim.pushover_server",
        description="A fake Pushover messages API. Point PUSHOVER_API_URL at the URL it prints.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8787, help="port to bind, 0 for any free one (default 8787)"
    )
    parser.add_argument(
        "--fail-500-for",
        type=float,
        metavar="SECONDS",
        default=0.0,
        help="answer HTTP 500 to every request for this many seconds after start",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted, printing one line per request (never the keys)."""
    args = parse_args(argv)
    fake = FakePushover(args.host, args.port, echo=lambda line: print(line, flush=True))
    if args.fail_500_for > 0:
        fake.fail_with(500, seconds=args.fail_500_for)
    with fake:
        print(f"PUSHOVER_API_URL={fake.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
