"""The Pushover notifier: drains the journal outbox to the phone (DESIGN sections 1 and 8).

The engine commits alerts to the outbox before any network call; this module only delivers them,
at least once and in outbox order. Pushover's rules (reference/platform.md section 2): 4xx is never
retried, 5xx and network failures are retried no sooner than 5 s apart, and a bad token or user key
trips a breaker instead of a retry loop, because repeated 4xx get the sender's IP blocked.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

import structlog

from alert_text import buy_not_delivered, delivery_overrides, possible_repeat, sent_late, sound_for
from config import apprise_channels, mask
from redaction import valid_text
from retry_after import retry_after_seconds

if TYPE_CHECKING:
    import httpx

    from config import Settings
    from http_deadline import CappedBody
    from pnl_tracker import OutboxItem

TITLE_LIMIT = 250
MESSAGE_LIMIT = 1024
ELLIPSIS = "…"
EMERGENCY_PRIORITY = 2
EMERGENCY_RETRY_S = 60
EMERGENCY_EXPIRE_S = 3600
LOW_QUOTA_WARNING = 1000
ERROR_TEXT_LIMIT = 300
# Bytes of Pushover's answer read (decoded): its JSON is a few hundred; more is someone else's flood.
ANSWER_LIMIT = 64 << 10
# The live daemon marks an alert late when it leaves this long after its decision (a Pushover outage).
LATE_AFTER_MS = 30_000
BATCH_SIZE = 50
STOP_POLL_S = 0.5
# Pushover usually answers in well under a second; a slow answer is still an answer, so reads may take
# 20 s before the request counts as timed out (and then it may have been delivered). Plain numbers, made
# into an httpx.Timeout with the client: httpx is imported only by a process that sends.
SEND_TIMEOUT_S = 20.0
CONNECT_TIMEOUT_S = 5.0
# The whole request, however slowly Pushover (or a proxy in the way) trickles its answer.
REQUEST_DEADLINE_S = 20.0
DOWN_BEFORE_FALLBACK_S = 60.0
QUOTA_RETRY_S = 300.0
# A 429 that says when to come back (`Retry-After`) is a rate limiter (a proxy's, or Pushover's own), not
# the month's quota: asked again then, within these bounds (Pushover: no sooner than 5 s).
RETRY_AFTER_BOUNDS_S = (5.0, QUOTA_RETRY_S)
# Retries of a failing Pushover (5xx, no answer) double from 5 s up to this: an alert leaves at most this
# long after Pushover answers again (with 60 s, a 25 s outage delivered a SELL 35 s after its decision).
MAX_RETRY_S = 10.0
# A 403, or a 4xx page that is not Pushover's JSON (a proxy, a firewall, Pushover's block of an IP that
# sent many bad requests): the whole service refuses for now, so the queue is held, not dropped.
REFUSED_RETRY_S = 60.0
# Timeouts of one alert before it goes by the fallback; without one it is resent (marked possible repeat)
# with the back-off until GIVE_UP_TIMEOUTS, several minutes: a Pushover that takes requests and never
# answers for a while loses nothing, and one alert that never gets an answer cannot hold the rest for good.
MAX_TIMEOUTS = 2
GIVE_UP_TIMEOUTS = 8
# Once an alert went by the fallback because Pushover took requests and never answered, the next ones go
# that way too for this long before Pushover is tried again: each alert had paid its own two timeouts
# (a SELL arrived 95 s after its decision while the fallback worked).
FALLBACK_AFTER_TIMEOUTS_S = 300.0
# After a BUY or SELL could not be delivered, /health says `failing` this long: the heartbeat's pings stop,
# so a dead-man switch pages the user about the alert the phone never showed.
LOST_TRADE_FAILING_S = 900.0
TRADE_KINDS = frozenset({"BUY", "SELL"})
# Pushover takes one image per message, at most this many bytes (reference/platform.md section 2).
ATTACHMENT_LIMIT = 5_242_880
ATTACHMENT_NAME = "chart.png"
ATTACHMENT_TYPE = "image/png"

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
    timed_out: bool = False
    quota_exhausted: bool = False
    refused_for_now: bool = False
    retry_after_s: float | None = None  # a 429's Retry-After (a rate limit, not the quota), in seconds


def truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending in an ellipsis when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - len(ELLIPSIS)] + ELLIPSIS


def pushover_form(item: OutboxItem, token: str, user: str, sound: str | None = None) -> dict[str, str]:
    """The form fields of one messages.json request for an outbox item (`sound`: a Pushover sound name)."""
    form = {
        "token": token,
        "user": user,
        "title": truncate(item.title, TITLE_LIMIT),
        "message": truncate(item.message, MESSAGE_LIMIT),
        "priority": str(item.priority),
        # The decision's engine time, so a retried or replayed alert shows when it was decided.
        "timestamp": str(item.at_ms // 1000),
    }
    if sound:
        form["sound"] = sound
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
        return [_text_of(e) for e in errors]
    return [_text_of(errors)] if errors else []


def _text_of(value: object) -> str:
    """A peer's error value as text; a value too deep to print is named by its type."""
    try:
        return str(value)[:ERROR_TEXT_LIMIT] if not isinstance(value, str) else value
    except RecursionError:
        return f"<{type(value).__name__} nested too deep>"


def _json_body(answer: CappedBody) -> dict[str, Any] | None:
    if not answer.complete:  # an answer past ANSWER_LIMIT is nobody's JSON
        return None
    try:
        body = json.loads(answer.content)
    except (ValueError, RecursionError):  # RecursionError: an answer nested deeper than Python recurses
        return None
    return body if isinstance(body, dict) else None


def _error_text(status: int, body: dict[str, Any] | None) -> str:
    if body is None:
        return f"HTTP {status} (no JSON body)"
    errors = _errors_of(body)
    return f"HTTP {status}: {'; '.join(errors)}" if errors else f"HTTP {status}"


def _read_answer(response: httpx.Response) -> CappedBody:
    """Pushover's answer up to ANSWER_LIMIT; a body that cannot be decoded (a broken gzip) is read as
    no body, so a 200 still counts as delivered instead of being sent again."""
    import httpx

    from http_deadline import CappedBody, read_capped

    try:
        return read_capped(response, ANSWER_LIMIT)
    except httpx.DecodingError:
        return CappedBody(b"", complete=False)


def _is_html(response: httpx.Response, answer: CappedBody) -> bool:
    content_type = response.headers.get("content-type", "")
    return "html" in content_type.lower() or answer.content.lstrip()[:1] == b"<"


# 4xx answers that say the request was not processed at all, rather than that it is wrong: retried.
TRANSIENT_4XX = frozenset({408, 425})
# 4xx answers about this request's size, whoever sends them (a proxy's 413 page has no Pushover JSON): this
# message is refused, not the service, so it goes on as text alone and cannot hold the queue (a day's chart
# refused by a proxy held every later alert, retried every minute for good).
TOO_LARGE_4XX = frozenset({413, 414, 431})


def refused_for_now(status: int, body: dict[str, Any] | None) -> bool:
    """An answer that refuses the service rather than this message: 403, a 4xx without Pushover's JSON, or
    a redirect (Pushover never sends one: PUSHOVER_API_URL is not its messages URL, or a captive portal)."""
    if 300 <= status < 400:
        return True
    if not 400 <= status < 500 or status in (401, 429) or status in TRANSIENT_4XX | TOO_LARGE_4XX:
        return False
    return status == 403 or body is None


def retry_after_s(header: str | None, now_ms: int) -> float | None:
    """A 429's Retry-After (seconds or an HTTP date) as seconds within RETRY_AFTER_BOUNDS_S; None when
    absent or unreadable (the 429 is then the month's quota)."""
    seconds = retry_after_seconds(header, now_ms)
    if seconds is None:
        return None
    low, high = RETRY_AFTER_BOUNDS_S
    return min(max(seconds, low), high)


def refuses_in_a_200(body: dict[str, Any]) -> bool:
    """Whether a 200's JSON is Pushover's refusal of the message: `status` 0 (or "0"), or errors and no
    status at all. Any other 200 means it took the message."""
    if "status" in body:
        return body["status"] not in (1, "1", True)
    return bool(body.get("errors"))


def _should_retry(status: int, body: dict[str, Any] | None) -> bool:
    # Pushover: 4xx, or a 200 whose status is not 1, will never work; anything else may.
    if status in TRANSIENT_4XX:
        return True
    if 400 <= status < 500:
        return False
    return not (status == 200 and body is not None)


class PushoverClient:
    """One keep-alive connection to the Pushover messages API. Never exposes the keys."""

    @classmethod
    def for_settings(
        cls, settings: Settings, attachment_for: Callable[[OutboxItem], bytes | None] | None = None
    ) -> PushoverClient:
        """The client of `settings`: its keys, API URL and the ALERT_SOUND_* of each kind (live and
        `--replay --notify` alike)."""
        overrides = delivery_overrides(settings)
        return cls(
            settings.pushover_token,
            settings.pushover_user_key,
            settings.pushover_api_url,
            sound_for=lambda kind: sound_for(kind, overrides),
            attachment_for=attachment_for,
        )

    def __init__(
        self,
        token: str,
        user: str,
        api_url: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: httpx.Timeout | float | None = None,
        deadline_s: float = REQUEST_DEADLINE_S,
        sound_for: Callable[[str], str | None] = lambda _kind: None,
        attachment_for: Callable[[OutboxItem], bytes | None] | None = None,
    ) -> None:
        """`attachment_for`, when given, is asked for each item's image (PNG bytes, or None for none);
        with an image the request goes as multipart/form-data with the image as `attachment`.
        `timeout` defaults to SEND_TIMEOUT_S per read and CONNECT_TIMEOUT_S to connect; without a
        `transport` of the caller's, each whole request also ends within `deadline_s`."""
        import httpx  # here, not at the top: a command that never sends (--status, --replay without --notify) skips it

        from http_deadline import DeadlineTransport

        self._sound_for = sound_for
        self._attachment_for = attachment_for
        self._token = token
        self._user = user
        self._api_url = api_url
        # One client, so bursts reuse one connection (Pushover allows at most two).
        if timeout is None:
            timeout = httpx.Timeout(SEND_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        transport = transport or DeadlineTransport(deadline_s, max_connections=2)
        self._http = httpx.Client(transport=transport, timeout=timeout)

    def __repr__(self) -> str:
        return f"PushoverClient(api_url={self._api_url!r}, {self.masked_keys()})"

    def masked_keys(self) -> dict[str, str]:
        """The token and user key in masked form, for log lines."""
        return {"token": mask(self._token), "user": mask(self._user)}

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def send(
        self, item: OutboxItem, on_leaving: Callable[[], None] | None = None, *, plain: bool = False
    ) -> SendResult:
        """POST one outbox item; classify the answer. Never raises for HTTP or network failures.

        `on_leaving` is called once the request's headers are on the wire, just before its body: from
        then until the answer, Pushover may take the message though we never learn it did. `plain` sends
        the text alone: no sound, no image, at most high priority (what a refused message retries as).
        """
        if plain:
            item = replace(item, priority=min(item.priority, 1))
        form = pushover_form(item, self._token, self._user, None if plain else self._sound_for(item.kind))
        import httpx  # already loaded by __init__; a dictionary lookup here

        image = None if plain else self._attachment(item)
        files = None if image is None else {"attachment": (ATTACHMENT_NAME, image, ATTACHMENT_TYPE)}
        extensions = {} if on_leaving is None else {"trace": _on_body_started(on_leaving)}
        try:
            with self._http.stream(
                "POST", self._api_url, data=form, files=files, extensions=extensions
            ) as response:
                answer = _read_answer(response)
        except httpx.TimeoutException as exc:
            # A read timeout may come after Pushover took the message: the caller must not retry blindly.
            read = isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout)
            return self._failure(f"timeout ({type(exc).__name__})", timed_out=read)
        except httpx.HTTPError as exc:
            return self._failure(f"{type(exc).__name__}: {exc}")
        return self._classify(response, answer)

    def _attachment(self, item: OutboxItem) -> bytes | None:
        """The item's image, or None: an image that cannot be made, or that Pushover would refuse
        (a 4xx is never retried), costs the image only, never the alert."""
        if self._attachment_for is None:
            return None
        try:
            image = self._attachment_for(item)
        except Exception as exc:  # a chart bug must not keep the text from the phone
            log.warning(
                "attachment_failed", kind=item.kind, dedupe_key=item.dedupe_key, error=repr(exc)[:200]
            )
            return None
        if image is not None and len(image) > ATTACHMENT_LIMIT:
            log.warning(
                "attachment_too_large", dedupe_key=item.dedupe_key, size=len(image), limit=ATTACHMENT_LIMIT
            )
            return None
        return image

    def _failure(self, error: str, *, timed_out: bool = False) -> SendResult:
        return SendResult(False, True, None, self._scrub(error), None, None, timed_out=timed_out)

    def _classify(self, response: httpx.Response, answer: CappedBody) -> SendResult:
        status = response.status_code
        body = _json_body(answer)
        request_id = body.get("request") if body is not None else None
        remaining = response.headers.get("X-Limit-App-Remaining")
        common = {
            "status": status,
            "request_id": None if request_id is None else str(request_id),
            "remaining": remaining,
        }
        if status == 200 and body is None and not _is_html(response, answer):
            # Pushover answers 200 only once it has taken the message: sending it again would repeat it.
            # (An HTML page is someone else's, a captive portal or a gateway: that one is retried.)
            log.warning("pushover_answer_unreadable", status=status, meaning="HTTP 200: counted as delivered")
            return SendResult(ok=True, retry=False, error="", **common)
        # Pushover's status is the number 1; a "1" (a proxy re-encoding the JSON) is the same answer:
        # read as a refusal, each alert went again as text alone, unmarked, and the phone showed it twice.
        if status == 200 and body is not None and body.get("status") in (1, "1"):
            return SendResult(ok=True, retry=False, error="", **common)
        if status == 200 and body is not None and not refuses_in_a_200(body):
            # A 200 whose JSON says no refusal (no `status` at all): taken like an unreadable 200. Read as a
            # refusal, each alert went twice, unmarked, and each SELL said its BUY was not delivered.
            log.warning("pushover_answer_unreadable", status=status, meaning="HTTP 200: counted as delivered")
            return SendResult(ok=True, retry=False, error="", **common)
        error = _error_text(status, body)
        if 300 <= status < 400:
            where = response.headers.get("Location") or "nowhere"
            error = f"HTTP {status}: redirected to {where}; check PUSHOVER_API_URL"
        header = response.headers.get("Retry-After") if status == 429 else None
        rate_limit_s = retry_after_s(header, time.time_ns() // 1_000_000)
        return SendResult(
            ok=False,
            retry=_should_retry(status, body),
            error=self._scrub(truncate(error, ERROR_TEXT_LIMIT)),
            credentials_invalid=credentials_rejected(status, body),
            quota_exhausted=status == 429 and rate_limit_s is None,
            refused_for_now=refused_for_now(status, body),
            retry_after_s=rate_limit_s,
            **common,
        )

    def _scrub(self, text: str) -> str:
        # Belt and braces: an echoing proxy or odd error page must not leak the keys.
        text = valid_text(text)
        for secret in (self._token, self._user):
            if secret:
                text = text.replace(secret, mask(secret))
        return truncate(text, ERROR_TEXT_LIMIT)


def _on_body_started(call: Callable[[], None]) -> Callable[[str, dict[str, Any]], None]:
    """An httpcore trace hook that calls `call` when a request's body starts to go out."""

    def trace(event: str, _info: dict[str, Any]) -> None:
        if event.endswith("send_request_body.started"):
            call()

    return trace


class Outbox(Protocol):
    """What the notifier drains: the journal's outbox, or the live daemon's in-memory one."""

    def pending(self, limit: int = ...) -> list[OutboxItem]: ...

    def pending_count(self) -> int: ...

    def mark_sent(self, item_id: int, sent_ms: int) -> None: ...

    def mark_attempt(self, item_id: int, error: str, *, maybe_sent: bool = False) -> None: ...

    def mark_in_flight(self, item_id: int) -> None: ...

    def mark_failed(self, item_id: int, error: str) -> None: ...


def log_alert(item: OutboxItem) -> None:
    """The no-keys sink: one structlog line per alert."""
    log.info("alert", kind=item.kind, dedupe_key=item.dedupe_key, title=item.title, message=item.message)


def wait_on(event: threading.Event, timeout: float) -> bool:
    """Block until `event` is set or `timeout` seconds pass; True if it was set."""
    return event.wait(timeout)


Outcome = Literal["sent", "failed", "stop"]
Route = Literal["pushover", "fallback", "hold"]


class FallbackChannel(Protocol):
    """A second way to reach the phone (ALERT_FALLBACK_URLS), used when Pushover cannot deliver."""

    name: str

    def send(self, item: OutboxItem) -> SendResult: ...


class AppriseFallback:
    """Every service Apprise knows (ntfy, Telegram, e-mail, ...), from a list of Apprise URLs.

    Each URL is its own channel: an alert that reached one of them has reached the phone, so a dead
    second channel never makes the working one send the same alert again on the retry.
    """

    name = "fallback"

    def __init__(self, urls: Sequence[str]) -> None:
        channels = apprise_channels(urls)
        refused = [url for url, channel in channels if channel is None]
        if refused:  # the settings refuse them first; said here too for a direct caller
            shown = ", ".join(mask(url) for url in refused)
            raise ValueError(f"ALERT_FALLBACK_URLS: Apprise cannot use {shown}")
        self._channels: list[tuple[str, Any]] = [(mask(url), channel) for url, channel in channels]
        self._secrets = tuple(urls)

    def send(self, item: OutboxItem) -> SendResult:
        """Send one alert through every fallback URL; ok when at least one of them took it."""
        failed = [shown for shown, channel in self._channels if not self._notify(channel, item)]
        ok = len(failed) < len(self._channels)
        if not failed:
            return SendResult(True, False, None, "", None, None)
        error = self._scrub(f"refused or unreachable: {', '.join(failed)}")
        if ok:
            log.warning("fallback_partly_failed", dedupe_key=item.dedupe_key, error=error)
        return SendResult(ok, not ok, None, "" if ok else error, None, None)

    def _notify(self, channel: Any, item: OutboxItem) -> bool:
        try:
            return bool(channel.notify(title=item.title, body=item.message))
        except Exception as exc:  # a plugin bug must not take the notifier down
            log.error("fallback_channel_error", error=self._scrub(f"{type(exc).__name__}: {exc}"))
            return False

    def _scrub(self, text: str) -> str:
        text = valid_text(text)
        for url in self._secrets:
            text = text.replace(url, mask(url))
        return truncate(text, ERROR_TEXT_LIMIT)


@dataclass(frozen=True, slots=True)
class DeliveryHealth:
    """What `/health` says about the way to the phone. `blocked`: alerts cannot reach the phone now."""

    channel: str
    problem: str | None
    blocked: bool
    gave_up: str | None = None  # alerts this process stopped trying to send, and the last one's error
    lost_trade: bool = False  # a BUY or SELL among them, within LOST_TRADE_FAILING_S


class Notifier:
    """Drains an outbox in order on its own thread: each alert reaches the phone once.

    A retryable failure stops the drain so that nothing overtakes the failed item (a BUY must never
    arrive after its SELL); the same item is retried after an exponential back-off between
    `min_retry_s` and `max_retry_s`, measured on `monotonic`. `clock_ms` stamps `sent_ms`.

    A request that timed out may have been delivered: its resend is titled "(possible repeat)", and after
    `MAX_TIMEOUTS` timeouts it goes by the fallback if there is one; without one it is resent with the
    back-off for several minutes (`GIVE_UP_TIMEOUTS`) before the queue moves on. A 429 (the app's monthly
    quota is used up) holds the queue and retries every `QUOTA_RETRY_S` (after its `Retry-After`, when it
    gives one: a rate limiter); a 403 or a 4xx page that is not
    Pushover's (a proxy, an IP block) every `REFUSED_RETRY_S`. A 200 counts as delivered even when its
    body cannot be read. With a `fallback`, alerts go that way instead while Pushover refuses the keys,
    is out of quota or refuses the service, has been down for `DOWN_BEFORE_FALLBACK_S`, or timed out
    twice. `redact` takes the secrets out of every title and message before it leaves, by any route.
    An alert that leaves more than `late_after_ms` after its decision is titled and marked as late.
    """

    def __init__(
        self,
        journal: Outbox,
        client: PushoverClient | None,
        *,
        clock_ms: Callable[[], int],
        min_retry_s: float = 5.0,
        max_retry_s: float = MAX_RETRY_S,
        wait: Callable[[threading.Event, float], bool] | None = None,
        log_only: Callable[[OutboxItem], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        fallback: FallbackChannel | None = None,
        down_before_fallback_s: float = DOWN_BEFORE_FALLBACK_S,
        quota_retry_s: float = QUOTA_RETRY_S,
        refused_retry_s: float = REFUSED_RETRY_S,
        redact: Callable[[str], str] = valid_text,
        late_after_ms: int | None = None,
        lost_buys: Mapping[str, str] | None = None,
    ) -> None:
        self._journal = journal
        # An alert leaving this long after its decision says so (None: never, as in a replay's --notify,
        # whose decisions are as old as its tape).
        self._late_after_ms = late_after_ms
        self._redact = redact
        self._client = client
        self._fallback = fallback
        self._clock_ms = clock_ms
        self._min_retry_s = min_retry_s
        self._max_retry_s = max(max_retry_s, min_retry_s)
        self._down_before_fallback_s = down_before_fallback_s
        self._quota_retry_s = quota_retry_s
        self._refused_retry_s = refused_retry_s
        self._wait = wait or wait_on
        self._log_only = log_only or log_alert
        self._monotonic = monotonic
        self._wake = threading.Event()
        # Serialises drains, so a shutdown flush and the notifier thread never send the same item twice.
        self._drain_lock = threading.Lock()
        self._flush_end: float | None = None  # a stop's deadline (monotonic): no new request after it
        self._failures = 0
        self._retry_at: float | None = None
        self._down_since: float | None = None
        # While Pushover refuses the service (quota used up, 403): until when, and what to say.
        self._held_until: float | None = None
        self._held_problem = ""
        self._timeouts: dict[str, int] = {}
        self._fallback_first_until: float | None = None  # see FALLBACK_AFTER_TIMEOUTS_S
        self._disabled_reason: str | None = None
        self._gave_up: list[str] = []  # "KIND (error)" of each alert given up on, for /health
        self._lost_trade_at: float | None = None  # monotonic time a BUY or SELL was last given up on
        # Trade id -> why its BUY never reached the phone (seeded from the journal after a restart).
        self._lost_buys: dict[str, str] = dict(lost_buys or {})
        # The fallback's own back-off: a failing fallback is retried on its schedule, not every turn.
        self._fallback_failures = 0
        self._fallback_retry_at: float | None = None
        self._fallback_error: str | None = None

    @property
    def disabled_reason(self) -> str | None:
        """Why sending through Pushover stopped for the rest of the process (bad keys), else None."""
        return self._disabled_reason

    def health(self) -> DeliveryHealth:
        """Which channel alerts take now and what, if anything, is wrong with Pushover."""
        if self._client is None:
            return DeliveryHealth("log", None, False)
        gave_up = self._gave_up_text()
        lost = (
            self._lost_trade_at is not None and self._monotonic() - self._lost_trade_at < LOST_TRADE_FAILING_S
        )
        problem = self._problem()
        if problem is None:
            return DeliveryHealth("pushover", None, False, gave_up, lost)
        if self._fallback is None:
            return DeliveryHealth("pushover", problem, self._cannot_deliver(), gave_up, lost)
        if self._fallback_error is None:
            return DeliveryHealth("fallback", problem, False, gave_up, lost)
        problem = f"{problem}; the fallback is failing too ({self._fallback_error})"
        return DeliveryHealth("fallback", problem, self._cannot_deliver(), gave_up, lost)

    def _gave_up_text(self) -> str | None:
        if not self._gave_up:
            return None
        return f"{len(self._gave_up)} alert(s) not delivered, the last: {self._gave_up[-1]}"

    def _problem(self) -> str | None:
        if self._disabled_reason is not None:
            return self._disabled_reason
        if self._held_until is not None:
            return self._held_problem
        down = self._down_for_s()
        if down is not None:
            return f"Pushover failing for {down:.0f} s"
        return None

    def _cannot_deliver(self) -> bool:
        down = self._down_for_s()
        long_down = down is not None and down >= self._down_before_fallback_s
        return self._disabled_reason is not None or self._held_until is not None or long_down

    def _down_for_s(self) -> float | None:
        return None if self._down_since is None else self._monotonic() - self._down_since

    def wake(self) -> None:
        """Ask the notifier thread to drain now (after the engine commits new alerts, or on stop)."""
        self._wake.set()

    def retry_in_s(self) -> float | None:
        """Seconds until the held-back item may be retried; None when not backing off."""
        if self._retry_at is None:
            return None
        return max(0.0, self._retry_at - self._monotonic())

    def drain_once(self) -> int:
        """Send every pending item in order until one must wait; return how many were sent.

        Returns 0 at once while Pushover must be waited for, so a wake() never shortens the retry delay.
        """
        with self._drain_lock:
            sent = 0
            while batch := self._journal.pending(BATCH_SIZE):
                for item in batch:
                    if self._flush_end is not None and self._monotonic() >= self._flush_end:
                        return sent  # a stop's deadline has passed: the rest goes after the restart
                    outcome = self._deliver(item)
                    if outcome == "stop":
                        return sent
                    if outcome == "sent":
                        sent += 1
            return sent

    def run(self, stop: threading.Event, beat: Callable[[], None] = lambda: None) -> None:
        """Drain, then wait for wake() or the retry delay; return when `stop` is set.

        `stop` is noticed within STOP_POLL_S, or at once if wake() follows stop.set(). `beat` is called
        on every turn, so a supervisor can tell a waiting notifier from a stuck one.
        """
        while not stop.is_set():
            beat()
            self._wake.clear()
            self._drain_guarded()
            if stop.is_set():
                return
            self._wait(self._wake, self._idle_wait_s())

    def flush(self, deadline_s: float) -> int:
        """On shutdown: keep draining until the outbox is empty or `deadline_s` seconds have passed.

        Honours the retry delay; no request starts after the deadline, on any thread, so only one
        already under way may overrun it (by the client timeout at most). Returns how many items were sent.
        """
        end = self._monotonic() + deadline_s
        # Seen by a drain already under way on the notifier thread too: with a slow Pushover and a
        # backlog it used to send on for a minute, past Render's 30 s before the kill.
        self._flush_end = end
        pause = threading.Event()
        sent = 0
        while True:
            sent += self._drain_guarded()
            remaining = end - self._monotonic()
            if remaining <= 0 or self._journal.pending_count() == 0 or self._refused_without_fallback(end):
                return sent
            self._wait(pause, min(remaining, self.retry_in_s() or STOP_POLL_S))

    def _refused_without_fallback(self, end: float) -> bool:
        """Whether waiting until `end` cannot help: Pushover refuses (or holds the queue past `end`) and
        nothing else can send. A `Retry-After` of 7 s inside a 60 s flush is waited out, not given up on."""
        held_past_end = self._held_until is not None and self._held_until >= end
        refused = self._disabled_reason is not None or held_past_end
        return refused and self._fallback is None

    def _drain_guarded(self) -> int:
        try:
            return self.drain_once()
        except Exception:
            # An outbox error must not kill the thread; back off as after a failed send.
            log.exception("notifier_drain_failed")
            self._schedule_retry()
            return 0

    def _idle_wait_s(self) -> float:
        until_retry = self.retry_in_s()
        return STOP_POLL_S if until_retry is None else min(STOP_POLL_S, until_retry)

    def _route(self) -> Route:
        """Where the next item goes: Pushover, the fallback, or nowhere yet."""
        now = self._monotonic()
        held = self._held_until is not None and now < self._held_until
        refused = self._disabled_reason is not None or held
        timing_out = self._fallback_first_until is not None and now < self._fallback_first_until
        if refused or timing_out:
            return self._fallback_route(now)
        if self._retry_at is not None and now < self._retry_at:
            down = self._down_for_s()
            if down is not None and down >= self._down_before_fallback_s:
                return self._fallback_route(now)
            return "hold"
        return "pushover"

    def _fallback_route(self, now: float) -> Route:
        """The fallback, unless there is none or it failed and its retry time has not come."""
        if self._fallback is None:
            return "hold"
        waiting = self._fallback_retry_at is not None and now < self._fallback_retry_at
        return "hold" if waiting else "fallback"

    def _deliver(self, item: OutboxItem) -> Outcome:
        if self._client is None:
            self._log_only(self._dressed(item))
            self._journal.mark_sent(item.id, self._clock_ms())
            return "sent"
        route = self._route()
        if route == "hold":
            return "stop"
        if route == "fallback":
            return self._via_fallback(item)
        return self._via_pushover(item)

    def _dressed(self, item: OutboxItem) -> OutboxItem:
        """The item as it leaves now, by any route: its notes added as of this moment (a lost BUY, a
        possible repeat, lateness) and no secret in it (a notice can quote a peer that echoed a key)."""
        title, message = item.title, item.message
        lost_buy = self._lost_buys.get(trade_id_of(item)) if item.kind == "SELL" else None
        if lost_buy is not None:
            message = buy_not_delivered(message, lost_buy)
        if item.maybe_sent:
            title, message = possible_repeat(title, message, item.at_ms)
        now_ms = self._clock_ms()
        if self._late_after_ms is not None and now_ms - item.at_ms > self._late_after_ms:
            title, message = sent_late(title, message, item.at_ms, now_ms)
        return replace(item, title=self._redact(title), message=self._redact(message))

    def _via_pushover(self, item: OutboxItem, *, plain: bool = False) -> Outcome:
        """Send `item` to Pushover and act on the answer. A message Pushover refuses (a 4xx of its own, a
        `status: 0`) goes by the fallback if there is one, else once more as text alone (`plain`: no
        sound, no image), which Pushover takes when its refusal was about those."""
        result, left = self._send(item, plain)
        if result.ok:
            self._on_sent(item, result)
            return "sent"
        refusal = self._on_refusal(item, result)
        if refusal is not None:
            return refusal
        # A request that left and got no answer (a timeout, or a reset after Pushover took it) may have
        # arrived: both count towards the same bound, or resets could hold every later alert for good.
        unanswered = result.timed_out or (left and result.retry and result.status is None)
        if unanswered and self._timed_out_too_often(item):
            if self._fallback is not None:
                log.warning(
                    "pushover_timed_out_twice",
                    action=f"sending by the fallback, and the next alerts for {FALLBACK_AFTER_TIMEOUTS_S:.0f} s",
                    **_fields(item, result),
                )
                self._fallback_first_until = self._monotonic() + FALLBACK_AFTER_TIMEOUTS_S
                return self._via_fallback(item)
            if self._timeouts[item.dedupe_key] >= GIVE_UP_TIMEOUTS:
                return self._give_up_after_timeouts(item, result)
        if result.retry:
            # No HTTP answer to a request that left: it may have arrived; the retry says so.
            self._on_retryable(item, result, maybe_sent=bool(left) and result.status is None)
            return "stop"
        if self._fallback is None and not plain:
            log.warning("pushover_rejected", error=result.error, action="sending it once more as text alone",
                        **_fields(item, result))  # fmt: skip
            return self._via_pushover(item, plain=True)
        if self._fallback is not None:
            log.error("pushover_rejected", error=result.error, action="sending by the fallback",
                      **_fields(item, result))  # fmt: skip
            return self._via_fallback(item)
        self._on_rejected(item, result)
        return "failed"

    def _send(self, item: OutboxItem, plain: bool) -> tuple[SendResult, bool]:
        """One request to Pushover with the item as it leaves now; whether the request had left."""
        assert self._client is not None
        left: list[bool] = []
        try:
            result = self._client.send(self._dressed(item), lambda: self._leaving(item, left), plain=plain)
        except Exception as exc:  # noqa: BLE001 - a bug reading the answer: the request may have arrived
            result = _unexpected_failure("pushover_send_failed", item, exc)
        return result, bool(left)

    def _on_refusal(self, item: OutboxItem, result: SendResult) -> Outcome | None:
        """Pushover refusing the keys, the quota or the service (not this alert): the queue is held, or
        goes by the fallback. None for any other answer."""
        if result.credentials_invalid:
            self._disable(item, result)
        elif result.retry_after_s is not None:
            self._on_rate_limited(item, result, result.retry_after_s)
        elif result.quota_exhausted:
            self._on_quota(item, result)
        elif result.refused_for_now:
            self._on_refused_for_now(item, result)
        else:
            return None
        return self._via_fallback(item) if self._fallback is not None else "stop"

    def _via_fallback(self, item: OutboxItem) -> Outcome:
        assert self._fallback is not None
        try:
            result = self._fallback.send(self._dressed(item))
        except Exception as exc:  # noqa: BLE001 - a fallback bug must not hold the queue unmarked
            result = _unexpected_failure("fallback_send_failed", item, exc)
        if not result.ok:
            # Only the fallback's own back-off grows: Pushover keeps its retry time (pushing it out too
            # kept alerts from a Pushover that had answered again for two more minutes).
            # A failing fallback must not keep alerts from a Pushover that may answer again.
            self._fallback_first_until = None
            self._fallback_failures += 1
            delay = self._backoff_s(self._fallback_failures)
            self._fallback_retry_at = self._monotonic() + delay
            self._fallback_error = result.error
            log.error(
                "fallback_failed", error=result.error, retry_in_s=round(delay, 3), **_fields(item, result)
            )
            return "stop"
        self._fallback_failures, self._fallback_retry_at, self._fallback_error = 0, None, None
        self._timeouts.pop(item.dedupe_key, None)
        self._journal.mark_sent(item.id, self._clock_ms())
        log.warning("alert_sent_by_fallback", reason=self._problem(), **_fields(item, result))
        return "sent"

    def _on_sent(self, item: OutboxItem, result: SendResult) -> None:
        self._journal.mark_sent(item.id, self._clock_ms())
        if self._down_since is not None:
            log.info("pushover_recovered", down_s=round(self._monotonic() - self._down_since, 1))
        self._failures = 0
        self._retry_at = None
        self._down_since = None
        self._held_until = None
        self._fallback_first_until = None
        self._timeouts.pop(item.dedupe_key, None)
        log.info("pushover_sent", **_fields(item, result))
        _warn_if_quota_low(result.remaining)

    def _leaving(self, item: OutboxItem, left: list[bool]) -> None:
        """The request is on the wire: say so durably first (a crash before the answer must not make
        the restart resend it as new). Runs inside the HTTP client, so it must never raise."""
        left.append(True)
        try:
            self._journal.mark_in_flight(item.id)
        except Exception as exc:
            log.error("outbox_in_flight_not_recorded", dedupe_key=item.dedupe_key, error=str(exc)[:200])

    def _on_retryable(self, item: OutboxItem, result: SendResult, *, maybe_sent: bool = False) -> None:
        self._attempted(item, result, maybe_sent=maybe_sent)
        if self._down_since is None:
            self._down_since = self._monotonic()
        delay = self._schedule_retry()
        log.warning("pushover_retry", retry_in_s=round(delay, 3), error=result.error, **_fields(item, result))

    def _timed_out_too_often(self, item: OutboxItem) -> bool:
        """Count a timeout of `item`; whether it has now timed out MAX_TIMEOUTS times or more.

        Without a fallback such an item stays first and is resent with the back-off, each resend titled
        "(possible repeat)", until GIVE_UP_TIMEOUTS. A copy too many, marked as such, costs less than a
        SELL that never arrives (an audit's one-minute outage of a silent Pushover lost both the BUY and
        the SELL when the queue moved on after two).
        """
        count = self._timeouts.get(item.dedupe_key, 0) + 1
        self._timeouts[item.dedupe_key] = count
        if count == MAX_TIMEOUTS and self._fallback is None:
            log.error(
                "pushover_not_answering",
                action="held first in the queue and sent again, marked possible repeat, for several minutes",
                dedupe_key=item.dedupe_key,
                timeouts=count,
            )
        return count >= MAX_TIMEOUTS

    def _give_up_after_timeouts(self, item: OutboxItem, result: SendResult) -> Outcome:
        # Bounded, so that one alert that can never get an answer in time (a chart on a slow link)
        # cannot hold every later alert for good; several minutes of resends cover a Pushover outage.
        self._timeouts.pop(item.dedupe_key, None)
        why = f"no answer {GIVE_UP_TIMEOUTS} times, may have arrived"
        self._journal.mark_failed(item.id, f"{result.error}; {why}")
        self._note_given_up(item, why)
        log.error(
            "pushover_timed_out_too_often",
            action="moving on: the alert may or may not have reached the phone",
            **_fields(item, result),
        )
        return "failed"

    def _attempted(self, item: OutboxItem, result: SendResult, *, maybe_sent: bool = False) -> None:
        """An attempt that failed and will be retried. Once an attempt got no answer the alert may be on
        the phone, whatever later attempts answer: the flag stays until it is delivered. A hang, then a
        503, had sent the copy that got through untitled, a silent duplicate (an audit's find)."""
        self._journal.mark_attempt(item.id, result.error, maybe_sent=maybe_sent or item.maybe_sent)

    def _hold(self, item: OutboxItem, result: SendResult, retry_s: float, problem: str) -> bool:
        """Keep the queue (this item first) for `retry_s`; whether this starts a hold."""
        self._attempted(item, result)
        first = self._held_until is None
        self._held_until = self._monotonic() + retry_s
        self._held_problem = problem
        return first

    def _on_refused_for_now(self, item: OutboxItem, result: SendResult) -> None:
        every = f"{self._refused_retry_s:.0f} s"
        problem = f"Pushover refused the service ({result.error}): {self._held_or_by_fallback()}, retried every {every}"
        if self._hold(item, result, self._refused_retry_s, problem):
            log.critical(
                "pushover_refused",
                meaning="a 403 or a non-Pushover error page: a proxy, a firewall or an IP block, not this alert",
                action="alerts go by ALERT_FALLBACK_URLS"
                if self._fallback is not None
                else "alerts are held",
                **_fields(item, result),
            )

    def _held_or_by_fallback(self) -> str:
        return "alerts go by the fallback" if self._fallback is not None else "alerts held"

    def _on_quota(self, item: OutboxItem, result: SendResult) -> None:
        held = self._held_or_by_fallback()
        problem = f"Pushover message quota used up (HTTP 429): {held} until it is reset or raised"
        if self._hold(item, result, self._quota_retry_s, problem):
            log.critical(
                "pushover_quota_exhausted",
                meaning="Pushover's monthly message limit for this app is used up; it resets on the 1st",
                action=(
                    "alerts go by ALERT_FALLBACK_URLS"
                    if self._fallback is not None
                    else "alerts are held and retried every 5 min; raise the limit or set ALERT_FALLBACK_URLS"
                ),
                **_fields(item, result),
            )

    def _on_rate_limited(self, item: OutboxItem, result: SendResult, retry_s: float) -> None:
        problem = (
            f"Pushover asked to wait {retry_s:g} s (HTTP 429 with Retry-After): {self._held_or_by_fallback()}"
        )
        if self._hold(item, result, retry_s, problem):
            log.error("pushover_rate_limited", retry_after_s=retry_s, **_fields(item, result))

    def _on_rejected(self, item: OutboxItem, result: SendResult) -> None:
        self._journal.mark_failed(item.id, result.error)
        self._note_given_up(item, result.error)
        log.error("pushover_rejected_for_good", error=result.error, **_fields(item, result))
        _warn_if_quota_low(result.remaining)

    def _note_given_up(self, item: OutboxItem, why: str) -> None:
        """Remember an alert given up on: for /health, and, for a BUY, for the note on its SELL."""
        self._gave_up.append(f"{item.kind} ({why})")
        if item.kind in TRADE_KINDS:
            self._lost_trade_at = self._monotonic()
        if item.kind == "BUY":
            self._lost_buys[trade_id_of(item)] = why

    def _disable(self, item: OutboxItem, result: SendResult) -> None:
        # The item stays pending (an attempt, not a failure) so a restart with fixed keys sends it
        # before everything queued behind it, keeping BUY before SELL.
        self._attempted(item, result)
        self._disabled_reason = f"Pushover refused the credentials: {result.error}"
        keys = self._client.masked_keys() if self._client is not None else {}
        action = (
            "alerts go by ALERT_FALLBACK_URLS; fix PUSHOVER_TOKEN / PUSHOVER_USER_KEY and restart"
            if self._fallback is not None
            else "fix PUSHOVER_TOKEN / PUSHOVER_USER_KEY and restart; alerts stay queued until then"
        )
        log.critical(
            "pushover_disabled",
            reason=self._disabled_reason,
            action=action,
            pending=self._journal.pending_count(),
            **keys,
            **_fields(item, result),
        )

    def _schedule_retry(self) -> float:
        self._failures += 1
        delay = self._backoff_s(self._failures)
        self._retry_at = self._monotonic() + delay
        return delay

    def _backoff_s(self, failures: int) -> float:
        # The exponent is capped so hours of outage cannot overflow the float.
        doublings = min(failures - 1, 32)
        return min(self._max_retry_s, self._min_retry_s * 2**doublings)


def trade_id_of(item: OutboxItem) -> str:
    """The trade id of a BUY or SELL outbox item (its dedupe key is `KIND:<trade id>`)."""
    return item.dedupe_key.partition(":")[2]


def _unexpected_failure(event: str, item: OutboxItem, exc: Exception) -> SendResult:
    """A send that raised (logged with its traceback) as a retryable failure of its channel."""
    log.exception(event, dedupe_key=item.dedupe_key)
    return SendResult(False, True, None, f"unexpected {type(exc).__name__}", None, None)


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
