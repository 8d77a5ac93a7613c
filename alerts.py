"""The Pushover notifier: drains the journal outbox to the phone (DESIGN sections 1 and 8).

The engine commits alerts to the outbox before any network call; this module only delivers them,
at least once and in outbox order. Pushover's rules (reference/platform.md section 2): 4xx is never
retried, 5xx and network failures are retried no sooner than 5 s apart, and a bad token or user key
trips a breaker instead of a retry loop, because repeated 4xx get the sender's IP blocked.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx
import structlog

from config import mask

if TYPE_CHECKING:
    from pnl_tracker import Journal, OutboxItem

TITLE_LIMIT = 250
MESSAGE_LIMIT = 1024
ELLIPSIS = "…"
EMERGENCY_PRIORITY = 2
EMERGENCY_RETRY_S = 60
EMERGENCY_EXPIRE_S = 3600
LOW_QUOTA_WARNING = 1000
ERROR_TEXT_LIMIT = 300
BATCH_SIZE = 50
STOP_POLL_S = 0.5

_CREDENTIAL_ERROR = re.compile(r"\b(token|user)\b.*\b(invalid|not a valid)\b", re.IGNORECASE)

log = structlog.get_logger("alerts")


@dataclass(frozen=True, slots=True)
class SendResult:
    """What one Pushover request came to.

    `retry` says whether the same request may succeed later (5xx, timeout, network error).
    `credentials_invalid` says the token or user key was refused: retrying anything is pointless.
    """

    ok: bool
    retry: bool
    status: int | None
    error: str
    request_id: str | None
    remaining: str | None
    credentials_invalid: bool = False


def truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending in an ellipsis when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - len(ELLIPSIS)] + ELLIPSIS


def pushover_form(item: OutboxItem, token: str, user: str) -> dict[str, str]:
    """The form fields of one messages.json request for an outbox item."""
    form = {
        "token": token,
        "user": user,
        "title": truncate(item.title, TITLE_LIMIT),
        "message": truncate(item.message, MESSAGE_LIMIT),
        "priority": str(item.priority),
        # The decision's engine time, so a retried or replayed alert shows when it was decided.
        "timestamp": str(item.at_ms // 1000),
    }
    if item.priority == EMERGENCY_PRIORITY:
        form["retry"] = str(EMERGENCY_RETRY_S)
        form["expire"] = str(EMERGENCY_EXPIRE_S)
    return form


def credentials_rejected(status: int, body: dict[str, Any] | None) -> bool:
    """True when Pushover says the token or user key is wrong (401, or a 4xx naming either as invalid)."""
    if status == 401:
        return True
    if body is None or not 400 <= status < 500:
        return False
    if body.get("token") == "invalid" or body.get("user") == "invalid":
        return True
    return any(_CREDENTIAL_ERROR.search(str(error)) for error in _errors_of(body))


def _errors_of(body: dict[str, Any]) -> list[str]:
    errors = body.get("errors")
    if isinstance(errors, list):
        return [str(e) for e in errors]
    return [str(errors)] if errors else []


def _json_body(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _error_text(status: int, body: dict[str, Any] | None) -> str:
    if body is None:
        return f"HTTP {status} (no JSON body)"
    errors = _errors_of(body)
    return f"HTTP {status}: {'; '.join(errors)}" if errors else f"HTTP {status}"


def _should_retry(status: int, body: dict[str, Any] | None) -> bool:
    # Pushover: 4xx, or a 200 whose status is not 1, will never work; anything else may.
    if 400 <= status < 500:
        return False
    return not (status == 200 and body is not None)


class PushoverClient:
    """One keep-alive connection to the Pushover messages API. Never exposes the keys."""

    def __init__(
        self,
        token: str,
        user: str,
        api_url: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._token = token
        self._user = user
        self._api_url = api_url
        # One client, so bursts reuse one connection (Pushover allows at most two).
        self._http = httpx.Client(transport=transport, timeout=timeout)

    def __repr__(self) -> str:
        return f"PushoverClient(api_url={self._api_url!r}, {self.masked_keys()})"

    def masked_keys(self) -> dict[str, str]:
        """The token and user key in masked form, for log lines."""
        return {"token": mask(self._token), "user": mask(self._user)}

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def send(self, item: OutboxItem) -> SendResult:
        """POST one outbox item; classify the answer. Never raises for HTTP or network failures."""
        try:
            response = self._http.post(self._api_url, data=pushover_form(item, self._token, self._user))
        except httpx.TimeoutException as exc:
            return self._failure(f"timeout ({type(exc).__name__})")
        except httpx.HTTPError as exc:
            return self._failure(f"{type(exc).__name__}: {exc}")
        return self._classify(response)

    def _failure(self, error: str) -> SendResult:
        return SendResult(False, True, None, self._scrub(error), None, None)

    def _classify(self, response: httpx.Response) -> SendResult:
        status = response.status_code
        body = _json_body(response)
        request_id = body.get("request") if body is not None else None
        remaining = response.headers.get("X-Limit-App-Remaining")
        common = {
            "status": status,
            "request_id": None if request_id is None else str(request_id),
            "remaining": remaining,
        }
        if status == 200 and body is not None and body.get("status") == 1:
            return SendResult(ok=True, retry=False, error="", **common)
        return SendResult(
            ok=False,
            retry=_should_retry(status, body),
            error=self._scrub(_error_text(status, body)),
            credentials_invalid=credentials_rejected(status, body),
            **common,
        )

    def _scrub(self, text: str) -> str:
        # Belt and braces: an echoing proxy or odd error page must not leak the keys.
        for secret in (self._token, self._user):
            if secret:
                text = text.replace(secret, mask(secret))
        return truncate(text, ERROR_TEXT_LIMIT)


def log_alert(item: OutboxItem) -> None:
    """The no-keys sink: one structlog line per alert."""
    log.info("alert", kind=item.kind, dedupe_key=item.dedupe_key, title=item.title, message=item.message)


def wait_on(event: threading.Event, timeout: float) -> bool:
    """Block until `event` is set or `timeout` seconds pass; True if it was set."""
    return event.wait(timeout)


Outcome = Literal["sent", "failed", "stop"]


class Notifier:
    """Drains the journal outbox in order, at-least-once, on its own thread.

    A retryable failure stops the drain so that nothing overtakes the failed item (a BUY must never
    arrive after its SELL); the same item is retried after an exponential back-off between
    `min_retry_s` and `max_retry_s`, measured on `monotonic`. `clock_ms` stamps `sent_ms`.
    """

    def __init__(
        self,
        journal: Journal,
        client: PushoverClient | None,
        *,
        clock_ms: Callable[[], int],
        min_retry_s: float = 5.0,
        max_retry_s: float = 60.0,
        wait: Callable[[threading.Event, float], bool] | None = None,
        log_only: Callable[[OutboxItem], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._journal = journal
        self._client = client
        self._clock_ms = clock_ms
        self._min_retry_s = min_retry_s
        self._max_retry_s = max(max_retry_s, min_retry_s)
        self._wait = wait or wait_on
        self._log_only = log_only or log_alert
        self._monotonic = monotonic
        self._wake = threading.Event()
        # Serialises drains, so a shutdown flush and the notifier thread never send the same item twice.
        self._drain_lock = threading.Lock()
        self._failures = 0
        self._retry_at: float | None = None
        self._disabled_reason: str | None = None

    @property
    def disabled_reason(self) -> str | None:
        """Why sending stopped for the rest of the process (bad token or user key), else None."""
        return self._disabled_reason

    def wake(self) -> None:
        """Ask the notifier thread to drain now (after the engine commits new alerts, or on stop)."""
        self._wake.set()

    def retry_in_s(self) -> float | None:
        """Seconds until the held-back item may be retried; None when not backing off."""
        if self._retry_at is None:
            return None
        return max(0.0, self._retry_at - self._monotonic())

    def drain_once(self) -> int:
        """Send every pending item in order until one must be retried; return how many were sent.

        Returns 0 at once while backing off or disabled, so a wake() never shortens the retry delay.
        """
        with self._drain_lock:
            if self._disabled_reason is not None or self._backing_off():
                return 0
            sent = 0
            while batch := self._journal.pending(BATCH_SIZE):
                for item in batch:
                    outcome = self._deliver(item)
                    if outcome == "stop":
                        return sent
                    if outcome == "sent":
                        sent += 1
            return sent

    def run(self, stop: threading.Event) -> None:
        """Drain, then wait for wake() or the retry delay; return when `stop` is set.

        `stop` is noticed within STOP_POLL_S, or at once if wake() follows stop.set().
        """
        while not stop.is_set():
            self._wake.clear()
            self._drain_guarded()
            if stop.is_set():
                return
            self._wait(self._wake, self._idle_wait_s())

    def flush(self, deadline_s: float) -> int:
        """On shutdown: keep draining until the outbox is empty or `deadline_s` seconds have passed.

        Honours the retry delay; a request already under way may overrun the deadline by the client
        timeout. Returns how many items were sent.
        """
        end = self._monotonic() + deadline_s
        pause = threading.Event()
        sent = 0
        while True:
            sent += self._drain_guarded()
            remaining = end - self._monotonic()
            if self._disabled_reason is not None or remaining <= 0 or self._journal.pending_count() == 0:
                return sent
            self._wait(pause, min(remaining, self.retry_in_s() or STOP_POLL_S))

    def _drain_guarded(self) -> int:
        try:
            return self.drain_once()
        except Exception:
            # A journal error must not kill the thread; back off as after a failed send.
            log.exception("notifier_drain_failed")
            self._schedule_retry()
            return 0

    def _idle_wait_s(self) -> float:
        until_retry = self.retry_in_s()
        return STOP_POLL_S if until_retry is None else min(STOP_POLL_S, until_retry)

    def _backing_off(self) -> bool:
        return self._retry_at is not None and self._monotonic() < self._retry_at

    def _deliver(self, item: OutboxItem) -> Outcome:
        if self._client is None:
            self._log_only(item)
            self._journal.mark_sent(item.id, self._clock_ms())
            return "sent"
        result = self._client.send(item)
        if result.ok:
            self._on_sent(item, result)
            return "sent"
        if result.credentials_invalid:
            self._disable(item, result)
            return "stop"
        if result.retry:
            self._on_retryable(item, result)
            return "stop"
        self._on_rejected(item, result)
        return "failed"

    def _on_sent(self, item: OutboxItem, result: SendResult) -> None:
        self._journal.mark_sent(item.id, self._clock_ms())
        self._failures = 0
        self._retry_at = None
        log.info("pushover_sent", **_fields(item, result))
        _warn_if_quota_low(result.remaining)

    def _on_retryable(self, item: OutboxItem, result: SendResult) -> None:
        self._journal.mark_attempt(item.id, result.error)
        delay = self._schedule_retry()
        log.warning("pushover_retry", retry_in_s=round(delay, 3), error=result.error, **_fields(item, result))

    def _on_rejected(self, item: OutboxItem, result: SendResult) -> None:
        self._journal.mark_failed(item.id, result.error)
        log.error("pushover_rejected", error=result.error, **_fields(item, result))
        _warn_if_quota_low(result.remaining)

    def _disable(self, item: OutboxItem, result: SendResult) -> None:
        # The item stays pending (an attempt, not a failure) so a restart with fixed keys sends it
        # before everything queued behind it, keeping BUY before SELL.
        self._journal.mark_attempt(item.id, result.error)
        self._disabled_reason = f"Pushover refused the credentials: {result.error}"
        keys = self._client.masked_keys() if self._client is not None else {}
        log.critical(
            "pushover_disabled",
            reason=self._disabled_reason,
            action="fix PUSHOVER_TOKEN / PUSHOVER_USER_KEY and restart; alerts stay queued until then",
            pending=self._journal.pending_count(),
            **keys,
            **_fields(item, result),
        )

    def _schedule_retry(self) -> float:
        self._failures += 1
        # The exponent is capped so hours of outage cannot overflow the float.
        doublings = min(self._failures - 1, 32)
        delay = min(self._max_retry_s, self._min_retry_s * 2**doublings)
        self._retry_at = self._monotonic() + delay
        return delay


def _fields(item: OutboxItem, result: SendResult) -> dict[str, Any]:
    return {
        "alert_id": item.id,
        "dedupe_key": item.dedupe_key,
        "kind": item.kind,
        "attempt": item.attempts + 1,
        "status": result.status,
        "request_id": result.request_id,
        "remaining": result.remaining,
    }


def _warn_if_quota_low(remaining: str | None) -> None:
    try:
        left = int(remaining) if remaining is not None else None
    except ValueError:
        return
    if left is not None and left < LOW_QUOTA_WARNING:
        log.warning("pushover_quota_low", remaining=left)
