"""The Pushover notifier over real sockets against the fake Pushover server, with a real journal."""

from __future__ import annotations

import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from alerts import (
    LOST_TRADE_FAILING_S,
    DeliveryHealth,
    Notifier,
    PushoverClient,
    SendResult,
    pushover_form,
    truncate,
)
from delivery import MemoryOutbox, WriteBehindJournal
from events import Alert
from pnl_tracker import Journal, OutboxItem
from sim.pushover_server import FakePushover
from sim.webhook_server import FakeWebhook

TOKEN = "aTestAppTokenForTheFakeServer1"
USER = "uTestUserKeyForTheFakeServer22"
AT_MS = 1_759_415_400_123
SENT_MS = 1_759_415_999_000
ROOT = Path(__file__).resolve().parents[1]


def alert(n: int, *, priority: int = 0, title: str | None = None, message: str | None = None) -> Alert:
    return Alert(
        kind="BUY" if n % 2 else "SELL",
        dedupe_key=f"K:{n}",
        title=title or f"IWM 0DTE CALL — alert {n}",
        message=message or f"message {n}\nline two",
        priority=priority,
        at_ms=AT_MS + n * 1_500,
    )


def outbox(journal: Journal) -> list[tuple[str, str, int, str | None, int | None]]:
    """(dedupe_key, status, attempts, last_error, sent_ms) per outbox row."""
    return [(r[1], r[7], r[8], r[9], r[10]) for r in journal.table_rows("outbox")]


def titles(server: FakePushover) -> list[str]:
    return [m.form["title"] for m in server.messages]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite3")
    yield j
    j.close()


@pytest.fixture
def server() -> Iterator[FakePushover]:
    with FakePushover() as fake:
        yield fake


def make_client(server: FakePushover, timeout: float = 2.0, token: str = TOKEN) -> PushoverClient:
    return PushoverClient(token, USER, server.url, timeout=timeout)


def make_notifier(journal: Journal, client: PushoverClient | None, **kwargs: object) -> Notifier:
    options: dict[object, object] = {"min_retry_s": 0.05, "max_retry_s": 0.2} | kwargs
    return Notifier(journal, client, clock_ms=lambda: SENT_MS, **options)  # type: ignore[arg-type]


def notifier_with_fallback(
    journal: Journal, server: FakePushover, hook: FakeWebhook, **kwargs: object
) -> Notifier:
    """A notifier on the fake Pushover whose fallback channel is the fake webhook `hook`."""
    from alerts import AppriseFallback

    return make_notifier(journal, make_client(server), fallback=AppriseFallback([hook.apprise_url]), **kwargs)


@contextmanager
def running(notifier: Notifier) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=notifier.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        notifier.wake()
        thread.join(timeout=5)
        assert not thread.is_alive()


class StepClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_happy_path_sends_in_outbox_order_with_exact_fields(journal: Journal, server: FakePushover) -> None:
    journal.record([alert(1), alert(2, priority=1), alert(3)])
    notifier = make_notifier(journal, make_client(server))

    with capture_logs() as logs:
        assert notifier.drain_once() == 3

    assert [m.form for m in server.messages] == [
        {
            "token": TOKEN,
            "user": USER,
            "title": f"IWM 0DTE CALL — alert {n}",
            "message": f"message {n}\nline two",
            "priority": str(priority),
            "timestamp": str((AT_MS + n * 1_500) // 1000),
        }
        for n, priority in ((1, 0), (2, 1), (3, 0))
    ]
    assert [m.form["timestamp"] for m in server.messages] == ["1759415401", "1759415403", "1759415404"]
    assert outbox(journal) == [(f"K:{n}", "sent", 1, None, SENT_MS) for n in (1, 2, 3)]
    sent = [e for e in logs if e["event"] == "pushover_sent"]
    assert [(e["dedupe_key"], e["remaining"], e["status"]) for e in sent] == [
        ("K:1", "9999", 200),
        ("K:2", "9998", 200),
        ("K:3", "9997", 200),
    ]
    assert [e["request_id"] for e in sent] == [m.request_id for m in server.messages]
    assert notifier.drain_once() == 0
    assert server.requests == 3


def test_emergency_priority_carries_retry_and_expire(journal: Journal, server: FakePushover) -> None:
    journal.record([alert(1, priority=2)])

    assert make_notifier(journal, make_client(server)).drain_once() == 1

    form = server.messages[0].form
    assert (form["priority"], form["retry"], form["expire"]) == ("2", "60", "3600")


def test_long_title_and_message_are_truncated_with_an_ellipsis(
    journal: Journal, server: FakePushover
) -> None:
    long_message = "".join(chr(ord("a") + i % 26) for i in range(2_000))
    journal.record([alert(1, title="T" * 300, message=long_message)])

    assert make_notifier(journal, make_client(server)).drain_once() == 1

    form = server.messages[0].form
    assert len(form["message"]) == 1024
    assert form["message"] == long_message[:1023] + "…"
    assert form["title"] == "T" * 249 + "…"
    assert truncate("x" * 1024, 1024) == "x" * 1024


def test_server_errors_are_retried_in_order_exactly_once_each(journal: Journal, server: FakePushover) -> None:
    server.fail_with(500, seconds=1.5)
    journal.record([alert(1), alert(2), alert(3)])
    notifier = make_notifier(journal, make_client(server), min_retry_s=0.2, max_retry_s=0.4)

    with running(notifier):
        for _ in range(20):
            notifier.wake()  # new alerts arriving during the outage must not shorten the back-off
            time.sleep(0.02)
        wait_until(lambda: journal.pending_count() == 0)

    assert titles(server) == [f"IWM 0DTE CALL — alert {n}" for n in (1, 2, 3)]
    history = server.history
    failed = [i for i, seen in enumerate(history) if seen.status == 500]
    assert failed and all(history[i].form["title"] == "IWM 0DTE CALL — alert 1" for i in failed)
    gaps = [history[i + 1].received_at - history[i].received_at for i in failed]
    assert min(gaps) >= 0.2
    first = outbox(journal)[0]
    assert first[:3] == ("K:1", "sent", len(failed) + 1)
    assert [row[1:3] for row in outbox(journal)[1:]] == [("sent", 1), ("sent", 1)]


def test_backoff_doubles_from_the_minimum_and_is_capped(journal: Journal, server: FakePushover) -> None:
    server.fail_with(500, count=3)
    journal.record([alert(1)])
    clock = StepClock()
    notifier = make_notifier(journal, make_client(server), min_retry_s=5.0, max_retry_s=12.0, monotonic=clock)

    assert notifier.drain_once() == 0
    for expected_delay in (5.0, 10.0, 12.0):
        assert notifier.retry_in_s() == expected_delay
        requests = server.requests
        clock.now += expected_delay - 0.001
        assert notifier.drain_once() == 0
        assert server.requests == requests
        clock.now += 0.001
        notifier.drain_once()
        assert server.requests == requests + 1

    assert titles(server) == ["IWM 0DTE CALL — alert 1"]
    assert notifier.retry_in_s() is None
    assert outbox(journal) == [("K:1", "sent", 4, None, SENT_MS)]


def test_a_pushover_down_for_minutes_is_asked_again_every_ten_seconds_at_most(
    journal: Journal, server: FakePushover
) -> None:
    """Retries doubled up to 60 s: a 25 s outage delivered the SELL 35 s after its decision."""
    server.fail_with(500, count=6)
    journal.record([alert(1)])
    clock = StepClock()
    notifier = Notifier(journal, make_client(server), clock_ms=lambda: SENT_MS, monotonic=clock)

    assert notifier.drain_once() == 0
    delays = []
    while notifier.retry_in_s() is not None:
        delays.append(notifier.retry_in_s())
        clock.now += delays[-1]
        notifier.drain_once()
    assert delays == [5.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    assert titles(server) == ["IWM 0DTE CALL — alert 1"]


def test_a_429_with_retry_after_is_a_rate_limit_asked_again_then_not_a_used_up_quota(
    journal: Journal, server: FakePushover
) -> None:
    """Any 429 held every alert for 5 minutes, though its Retry-After said 7 seconds."""
    server.fail_with(429, count=1, retry_after="7")
    journal.record([alert(1), alert(2)])
    clock = StepClock()
    notifier = make_notifier(journal, make_client(server), monotonic=clock, quota_retry_s=300.0)

    with capture_logs() as logs:
        assert notifier.drain_once() == 0
        clock.now += 6.9
        assert notifier.drain_once() == 0 and server.requests == 1  # not before it said
        assert "Retry-After" in (notifier.health().problem or "")
        clock.now += 0.2
        assert notifier.drain_once() == 2

    assert titles(server) == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
    events = [e["event"] for e in logs]
    assert events.count("pushover_rate_limited") == 1 and "pushover_quota_exhausted" not in events


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, None), ("7", 7.0), (" 12 ", 12.0), ("0", 5.0), ("-3", None), ("1e9", 300.0), ("nan", None),
     ("inf", None), ("soon", None), ("Wed, 02 Dec 2026 12:00:30 GMT", 30.0),
     ("Wed, 02 Dec 2026 11:00:00 GMT", 5.0)],
)  # fmt: skip
def test_retry_after_is_read_as_seconds_or_a_date_within_bounds(
    header: str | None, seconds: float | None
) -> None:
    from alerts import retry_after_s

    now_ms = 1_796_212_800_000  # 2026-12-02 12:00:00 UTC
    assert retry_after_s(header, now_ms) == seconds


@pytest.mark.parametrize("status", [400, 413])
def test_client_errors_are_never_retried_and_the_next_alert_goes(
    journal: Journal, server: FakePushover, status: int
) -> None:
    server.fail_with(status, count=2)  # the alert, and its resend as text alone
    journal.record([alert(1), alert(2)])
    notifier = make_notifier(journal, make_client(server))

    with capture_logs() as logs:
        assert notifier.drain_once() == 1
        assert notifier.drain_once() == 0

    assert server.requests == 3
    assert [seen.status for seen in server.history] == [status, status, 200]
    assert titles(server) == ["IWM 0DTE CALL — alert 2"]
    rows = outbox(journal)
    assert rows[0][:3] == ("K:1", "failed", 1)
    assert rows[0][3] is not None and rows[0][3].startswith(f"HTTP {status}: ")
    assert rows[1] == ("K:2", "sent", 1, None, SENT_MS)
    rejected = [e for e in logs if e["event"] in ("pushover_rejected", "pushover_rejected_for_good")]
    assert [(e["event"], e["dedupe_key"], e["status"]) for e in rejected] == [
        ("pushover_rejected", "K:1", status),
        ("pushover_rejected_for_good", "K:1", status),
    ]
    assert rejected[0]["request_id"] == server.history[0].request_id
    assert rejected[0]["remaining"] == "10000"
    assert notifier.disabled_reason is None


def trade_alert(kind: str, trade: str = "2025-10-02-1") -> Alert:
    return Alert(kind, f"{kind}:{trade}", f"IWM 0DTE CALL — {kind}", f"{kind} text", 1, AT_MS)


def test_a_message_pushover_refuses_for_its_sound_goes_as_text_alone(journal: Journal) -> None:
    """A 4xx about the message (here its sound) had lost the BUY for good; the SELL came alone."""
    forms: list[dict[str, str]] = []

    def refuse_sounds(request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        forms.append(form)
        if "sound" in form:
            return httpx.Response(400, json={"status": 0, "errors": ["sound is invalid"], "request": "r"})
        return httpx.Response(200, json={"status": 1, "request": "r"})

    client = PushoverClient(
        TOKEN,
        USER,
        "http://pushover.invalid/1/messages.json",
        transport=httpx.MockTransport(refuse_sounds),
        sound_for=lambda _kind: "cashregister",
    )
    journal.record([trade_alert("BUY")])
    assert make_notifier(journal, client).drain_once() == 1
    assert [("sound" in f, f["title"]) for f in forms] == [
        (True, "IWM 0DTE CALL — BUY"),
        (False, "IWM 0DTE CALL — BUY"),
    ]
    assert outbox(journal)[0][1] == "sent"


def refusing_buys(forms: list[dict[str, str]]) -> Callable[[httpx.Request], httpx.Response]:
    """A Pushover that refuses every BUY's message (`status: 0`) and takes the rest, keeping each form."""

    def answer(request: httpx.Request) -> httpx.Response:
        form = dict(httpx.QueryParams(request.content.decode()))
        forms.append(form)
        if form["title"].endswith("BUY"):
            return httpx.Response(200, json={"status": 0, "errors": ["message refused"], "request": "r"})
        return httpx.Response(200, json={"status": 1, "request": "r"})

    return answer


def test_a_buy_refused_for_good_is_named_on_its_sell_and_fails_health_for_a_while(journal: Journal) -> None:
    """The phone got a SELL for a BUY it never showed, and /health only said `degraded`."""
    now = [1000.0]
    forms: list[dict[str, str]] = []

    client = PushoverClient(TOKEN, USER, "http://pushover.invalid/1/messages.json",
                            transport=httpx.MockTransport(refusing_buys(forms)))  # fmt: skip
    notifier = make_notifier(journal, client, monotonic=lambda: now[0])
    journal.record([trade_alert("BUY"), trade_alert("SELL"), trade_alert("SELL", "2025-10-02-2")])
    assert notifier.drain_once() == 2
    sells = [f["message"] for f in forms if f["title"].endswith("SELL")]
    assert sells[0].startswith("Its BUY alert was not delivered (HTTP 200: message refused)")
    assert sells[1] == "SELL text", "another trade's SELL says nothing"
    health = notifier.health()
    assert health.lost_trade and health.gave_up is not None and "BUY" in health.gave_up
    now[0] += LOST_TRADE_FAILING_S
    assert not notifier.health().lost_trade and notifier.health().gave_up is not None


def test_a_buy_lost_before_a_restart_is_still_named_on_its_sell(journal: Journal) -> None:
    """The note lived in the notifier's memory: a restart between the lost BUY and its SELL dropped it."""
    forms: list[dict[str, str]] = []

    def client() -> PushoverClient:
        return PushoverClient(TOKEN, USER, "http://pushover.invalid/1/messages.json",
                              transport=httpx.MockTransport(refusing_buys(forms)))  # fmt: skip

    journal.record(
        [trade_alert("BUY"), trade_alert("BUY", "2025-10-02-2"), trade_alert("SELL", "2025-10-02-2")]
    )
    assert make_notifier(journal, client()).drain_once() == 1
    assert journal.lost_buys() == {"2025-10-02-1": "HTTP 200: message refused"}, "trade 2's SELL has left"
    after_restart = make_notifier(journal, client(), lost_buys=journal.lost_buys())
    journal.record([trade_alert("SELL")])
    assert after_restart.drain_once() == 1
    assert forms[-1]["message"].startswith("Its BUY alert was not delivered (HTTP 200: message refused)")
    assert journal.lost_buys() == {}


def test_unauthorised_disables_sending_and_keeps_alerts_pending(
    journal: Journal, server: FakePushover
) -> None:
    server.fail_with(401)
    journal.record([alert(1), alert(2), alert(3)])
    notifier = make_notifier(journal, make_client(server))

    with capture_logs() as logs:
        assert notifier.drain_once() == 0
        with running(notifier):
            notifier.wake()
            time.sleep(0.2)
        assert notifier.flush(0.2) == 0

    assert server.requests == 1
    assert journal.pending_count() == 3
    assert [row[:3] for row in outbox(journal)] == [
        ("K:1", "pending", 1),
        ("K:2", "pending", 0),
        ("K:3", "pending", 0),
    ]
    assert (
        notifier.disabled_reason == "Pushover refused the credentials: HTTP 401: application token is invalid"
    )
    disabled = [e for e in logs if e["event"] == "pushover_disabled"]
    assert len(disabled) == 1
    assert disabled[0]["log_level"] == "critical"
    assert disabled[0]["pending"] == 3
    assert disabled[0]["token"] == "aTes…(30 chars)"


def test_invalid_token_rejected_by_validation_also_disables(journal: Journal, server: FakePushover) -> None:
    journal.record([alert(1), alert(2)])
    notifier = make_notifier(journal, make_client(server, token="short"))

    assert notifier.drain_once() == 0

    assert [seen.status for seen in server.history] == [400]
    assert (
        notifier.disabled_reason == "Pushover refused the credentials: HTTP 400: application token is invalid"
    )
    assert journal.pending_count() == 2


def test_a_timed_out_alert_is_held_and_resent_as_a_possible_repeat_until_pushover_answers(
    journal: Journal, server: FakePushover
) -> None:
    """Two timeouts used to give an alert up for good: a minute of a silent Pushover lost a BUY and its
    SELL. Now it stays first, resent with the back-off and marked, until an answer comes; none is lost."""
    server.stall(1.2)
    journal.record([alert(1), alert(2)])
    notifier = make_notifier(journal, make_client(server, timeout=0.3), min_retry_s=0.05, max_retry_s=0.05)

    with capture_logs() as logs, running(notifier):
        wait_until(lambda: journal.pending_count() == 0)

    # History is in the order of the answers: held requests are all answered at the stall's end.
    first = sorted(m.form["title"] for m in server.history if "alert 1" in m.form["title"])
    assert len(first) >= 3, "tried again after the second timeout"
    assert first[0] == "IWM 0DTE CALL — alert 1" and "IWM 0DTE CALL — alert 1 (possible repeat)" in first
    # Alert 2 waited behind alert 1, so it never overtook it.
    delivered = [t.removesuffix(" (possible repeat)") for t in titles(server)]
    assert delivered == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
    assert [row[:2] for row in outbox(journal)] == [("K:1", "sent"), ("K:2", "sent")]
    said = [e for e in logs if e["event"] == "pushover_not_answering"]
    assert [e["dedupe_key"] for e in said] == ["K:1"], "said once, not at every retry"
    assert notifier.health() == DeliveryHealth("pushover", None, False, None)


@pytest.mark.parametrize("outbox_kind", ["journal", "memory"])
def test_once_a_send_got_no_answer_every_later_copy_is_a_possible_repeat_though_a_later_one_is_answered(
    journal: Journal, server: FakePushover, outbox_kind: str
) -> None:
    """The first request reached Pushover (its 200 came after the client gave up); a 500 to the second
    had cleared the mark, so the third, delivered, was a silent duplicate of the first (an audit's find:
    a hang, then a 503, then a 200). The mark stays until the alert is delivered, in either outbox."""
    server.slow(1.0)  # takes the first message at once, answers after the client gave up
    journal.record([alert(1)])
    writer = WriteBehindJournal(journal, clock_ms=lambda: 1_759_415_400_000)
    box: Journal | MemoryOutbox = (
        journal if outbox_kind == "journal" else MemoryOutbox(writer, journal.pending())
    )
    notifier = make_notifier(box, make_client(server, timeout=0.3), min_retry_s=0.05, max_retry_s=0.05)
    assert notifier.drain_once() == 0
    assert box.pending()[0].maybe_sent, "no answer: the outbox must know it may have arrived"
    server.slow(0.0)
    server.fail_with(500, count=1)
    time.sleep(0.1)
    assert notifier.drain_once() == 0  # answered 500: this copy did not arrive, the first still may have
    assert box.pending()[0].maybe_sent
    time.sleep(0.1)
    assert notifier.drain_once() == 1

    sent = [(m.status, m.form["title"]) for m in server.history]
    assert sent == [
        (200, "IWM 0DTE CALL — alert 1"),
        (500, "IWM 0DTE CALL — alert 1 (possible repeat)"),
        (200, "IWM 0DTE CALL — alert 1 (possible repeat)"),
    ]


def test_a_request_on_the_wire_is_recorded_before_its_answer_so_a_crash_cannot_make_it_new(
    journal: Journal, server: FakePushover
) -> None:
    journal.record([alert(1), alert(2)])
    server.slow(0.5)
    seen: list[bool] = []
    notifier = make_notifier(journal, make_client(server, timeout=2.0))
    thread = threading.Thread(target=notifier.drain_once)
    thread.start()
    wait_until(lambda: server.requests == 1)
    # While Pushover holds the answer, a second process opening the journal (a restart) sees it in flight.
    reopened = Journal(journal.path)
    seen = [item.maybe_sent for item in reopened.pending()]
    reopened.close()
    thread.join(5)
    assert seen == [True, False]
    assert journal.pending_count() == 0


def test_a_slow_answer_within_the_timeout_is_delivered_once(journal: Journal, server: FakePushover) -> None:
    server.slow(0.5)
    journal.record([alert(1), alert(2)])
    notifier = make_notifier(journal, make_client(server, timeout=2.0))

    assert notifier.drain_once() == 2

    assert titles(server) == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
    assert server.requests == 2


@pytest.mark.parametrize(
    ("status", "hold", "said"),
    [
        (429, {"quota_retry_s": 300.0}, "pushover_quota_exhausted"),
        (403, {"refused_retry_s": 60.0}, "pushover_refused"),
        (302, {"refused_retry_s": 60.0}, "pushover_refused"),  # a captive portal, or the wrong URL
    ],
)
def test_a_refusal_of_the_service_holds_the_queue_says_so_once_and_delivers_each_alert_once_after(
    journal: Journal, server: FakePushover, status: int, hold: dict[str, float], said: str
) -> None:
    # 429: the monthly quota is used up; 403: a proxy, a firewall or an IP block. Neither is this alert's fault.
    server.fail_with(status, count=2)
    journal.record([alert(1), alert(2)])
    clock = StepClock()
    notifier = make_notifier(journal, make_client(server), monotonic=clock, **hold)
    (retry_s,) = hold.values()

    with capture_logs() as logs:
        assert notifier.drain_once() == 0
        assert notifier.drain_once() == 0  # held: no request while refused
        assert server.requests == 1
        health = notifier.health()
        clock.now += retry_s
        assert notifier.drain_once() == 0  # still refused on the retry
        clock.now += retry_s
        assert notifier.drain_once() == 2

    assert health.blocked and str(status) in (health.problem or "")
    assert titles(server) == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
    assert [e["event"] for e in logs].count(said) == 1
    assert [r[1] for r in outbox(journal)] == ["sent", "sent"]
    assert notifier.health().problem is None


def test_quota_exhausted_sends_by_the_fallback_in_order(journal: Journal, server: FakePushover) -> None:
    server.fail_with(429)
    journal.record([alert(1), alert(2), alert(3)])
    with FakeWebhook() as hook:
        notifier = notifier_with_fallback(journal, server, hook)
        with capture_logs() as logs:
            assert notifier.drain_once() == 3
        posts = [p.body["title"] for p in hook.posts]

    assert posts == [f"IWM 0DTE CALL — alert {n}" for n in (1, 2, 3)]
    assert server.requests == 1  # Pushover asked once, then left alone while out of quota
    assert notifier.health().channel == "fallback" and not notifier.health().blocked
    assert "alerts go by the fallback until it is reset" in (notifier.health().problem or "")
    assert [e["event"] for e in logs].count("alert_sent_by_fallback") == 3
    assert [r[1] for r in outbox(journal)] == ["sent", "sent", "sent"]


@pytest.mark.parametrize("status", [400, 404, 413])
def test_a_message_pushover_rejects_goes_by_the_fallback_and_the_next_one_by_pushover(
    journal: Journal, server: FakePushover, status: int
) -> None:
    server.fail_with(status, count=1)
    journal.record([alert(1), alert(2)])
    with FakeWebhook() as hook:
        notifier = notifier_with_fallback(journal, server, hook)
        assert notifier.drain_once() == 2
        posts = [p.body["title"] for p in hook.posts]

    assert posts == [alert(1).title] and titles(server) == [alert(2).title]
    assert [r[1] for r in outbox(journal)] == ["sent", "sent"]


def test_a_408_is_a_request_pushover_never_processed_so_it_is_sent_again_plainly(
    journal: Journal, server: FakePushover
) -> None:
    server.fail_with(408, count=1)
    journal.record([alert(1)])
    notifier = make_notifier(journal, make_client(server))
    notifier.drain_once()
    wait_until(lambda: notifier.drain_once() == 1 or outbox(journal)[0][1] == "sent")
    assert titles(server) == [alert(1).title]  # not marked "(possible repeat)": it never arrived
    assert outbox(journal)[0][1] == "sent"


def test_bad_keys_with_a_fallback_keep_alerts_flowing(journal: Journal, server: FakePushover) -> None:
    server.fail_with(401)
    journal.record([alert(1), alert(2)])
    with FakeWebhook() as hook:
        notifier = notifier_with_fallback(journal, server, hook)
        assert notifier.drain_once() == 2
        posts = [p.body["message"] for p in hook.posts]

    assert posts == ["message 1\nline two", "message 2\nline two"]
    assert notifier.disabled_reason is not None


def test_pushover_down_over_a_minute_switches_to_the_fallback(journal: Journal, server: FakePushover) -> None:
    server.fail_with(500)
    journal.record([alert(1), alert(2)])
    clock = StepClock()
    with FakeWebhook() as hook:
        notifier = notifier_with_fallback(
            journal,
            server,
            hook,
            monotonic=clock,
            min_retry_s=5.0,
            max_retry_s=5.0,
        )
        assert notifier.drain_once() == 0
        clock.now += 30.0
        assert notifier.drain_once() == 0  # down for 30 s: Pushover retried, nothing by the fallback
        assert hook.posts == []
        clock.now += 31.0
        assert (
            notifier.drain_once() == 0
        )  # the retry fails too, 61 s down: the held item may go the other way
        clock.now += 1.0
        assert notifier.drain_once() == 2
        posts = [p.body["title"] for p in hook.posts]

    assert posts == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
    assert titles(server) == []


def test_the_fallback_failing_holds_the_queue_and_nothing_is_lost(
    journal: Journal, server: FakePushover
) -> None:
    server.fail_with(429)
    journal.record([alert(1), alert(2)])
    clock = StepClock()
    with FakeWebhook() as hook:
        hook.fail_with(500)
        notifier = notifier_with_fallback(journal, server, hook, monotonic=clock)
        assert notifier.drain_once() == 0
        health = notifier.health()
        hook.fail_with(None)
        for _ in range(5):  # idle turns before the fallback's retry time: no request, nothing sent
            clock.now += 0.009
            assert notifier.drain_once() == 0
        assert hook.requests == 1
        clock.now += 0.05
        assert notifier.drain_once() == 2
        posts = [p.body["title"] for p in hook.posts]

    assert posts == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
    assert health.blocked and "fallback is failing too" in (health.problem or "")
    assert not notifier.health().blocked and "failing too" not in (notifier.health().problem or "")


def test_a_dead_second_fallback_never_repeats_an_alert_on_the_working_one(
    journal: Journal, server: FakePushover
) -> None:
    from alerts import AppriseFallback

    server.fail_with(429)
    journal.record([alert(1), alert(2)])
    clock = StepClock()
    with FakeWebhook() as hook:
        dead = "json://127.0.0.1:9/alerts"  # port 9 (discard) is closed here: connection refused
        notifier = make_notifier(
            journal, make_client(server), fallback=AppriseFallback([hook.apprise_url, dead]), monotonic=clock
        )
        with capture_logs() as logs:
            assert notifier.drain_once() == 2
            for _ in range(3):
                clock.now += 1.0
                notifier.drain_once()
        posts = [p.body["title"] for p in hook.posts]

    assert posts == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
    partly = [e for e in logs if e["event"] == "fallback_partly_failed"]
    assert len(partly) == 2 and partly[0]["error"].startswith("refused or unreachable: json")
    assert [r[1] for r in outbox(journal)] == ["sent", "sent"]


def test_fallback_urls_apprise_cannot_read_are_refused_with_masked_text() -> None:
    from alerts import AppriseFallback

    with pytest.raises(ValueError) as refused:
        AppriseFallback(["notaurl-secretsecret"])
    assert "secretsecret" not in str(refused.value)


def test_without_keys_alerts_go_to_log_only_and_are_marked_sent(journal: Journal) -> None:
    journal.record([alert(1), alert(2)])
    seen: list[OutboxItem] = []
    notifier = make_notifier(journal, None, log_only=seen.append)

    assert notifier.drain_once() == 2

    assert [(i.dedupe_key, i.title, i.at_ms) for i in seen] == [
        ("K:1", "IWM 0DTE CALL — alert 1", AT_MS + 1_500),
        ("K:2", "IWM 0DTE CALL — alert 2", AT_MS + 3_000),
    ]
    assert outbox(journal) == [("K:1", "sent", 1, None, SENT_MS), ("K:2", "sent", 1, None, SENT_MS)]


def test_default_log_only_writes_title_and_message(journal: Journal) -> None:
    journal.record([alert(1)])

    with capture_logs() as logs:
        assert make_notifier(journal, None).drain_once() == 1

    assert [(e["event"], e["title"], e["message"]) for e in logs] == [
        ("alert", "IWM 0DTE CALL — alert 1", "message 1\nline two")
    ]


def test_flush_delivers_after_an_outage_within_its_deadline(journal: Journal, server: FakePushover) -> None:
    server.fail_with(500, count=2)
    journal.record([alert(1), alert(2)])
    notifier = make_notifier(journal, make_client(server))

    assert notifier.flush(5.0) == 2

    assert titles(server) == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
    assert journal.pending_count() == 0


@pytest.mark.parametrize("deadline_s", [7.0, 1.0])
def test_flush_waits_out_a_retry_after_that_ends_before_its_deadline_and_no_other(
    journal: Journal, server: FakePushover, deadline_s: float
) -> None:
    """`--replay --notify` said it would wait up to 60 s, then gave up at once on a 429 asking for 7 s
    (an audit's find). A hold that ends before the deadline is waited out; one that does not is not (a
    Retry-After holds 5 s at least)."""
    server.fail_with(429, count=1, retry_after="2")
    journal.record([alert(1), alert(2)])
    notifier = make_notifier(journal, make_client(server))
    started = time.monotonic()

    sent = notifier.flush(deadline_s)

    if deadline_s > 5:
        assert sent == 2 and titles(server) == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
    else:
        assert sent == 0 and server.requests == 1 and time.monotonic() - started < 0.4, "given up at once"
    assert journal.pending_count() == 2 - sent


def test_flush_gives_up_at_its_deadline_leaving_alerts_pending(
    journal: Journal, server: FakePushover
) -> None:
    server.fail_with(503)
    journal.record([alert(1)])
    notifier = make_notifier(journal, make_client(server), min_retry_s=0.1, max_retry_s=0.1)

    assert notifier.flush(0.35) == 0

    assert 1 <= server.requests <= 5
    assert outbox(journal)[0][:3] == ("K:1", "pending", server.requests)


def test_a_stop_sends_no_new_request_after_its_deadline_even_from_a_drain_under_way(
    journal: Journal, server: FakePushover
) -> None:
    """With a backlog and a slow Pushover the notifier thread's drain sent on for a minute after SIGTERM
    (past Render's 30 s kill); the stop's deadline now ends it after the request under way."""
    server.slow(0.4)
    journal.record([alert(n) for n in range(1, 9)])
    notifier = make_notifier(journal, make_client(server))
    with running(notifier):
        wait_until(lambda: server.requests >= 1)
        notifier.flush(0.5)
        requests = server.requests
        time.sleep(0.6)
        assert server.requests == requests, "no request after the deadline"
    assert 1 <= requests <= 4, "the deadline plus the request under way, not the backlog of 8"
    assert requests < 8 and journal.pending_count() == 8 - requests


def test_network_errors_are_retryable_and_never_show_the_keys(journal: Journal) -> None:
    closed = FakePushover()
    url = closed.url
    closed.stop()
    client = PushoverClient(TOKEN, USER, url, timeout=1.0)
    journal.record([alert(1)])
    item = journal.pending()[0]

    result = client.send(item)

    assert (result.ok, result.retry, result.status, result.request_id, result.remaining) == (
        False,
        True,
        None,
        None,
        None,
    )
    assert result.error.startswith("ConnectError: ")
    assert TOKEN not in repr(client) and USER not in repr(client)
    assert "aTes…(30 chars)" in repr(client)


def test_secrets_never_appear_in_logs_or_errors(journal: Journal, server: FakePushover) -> None:
    journal.record([alert(n) for n in range(1, 6)])
    server.fail_with(500, count=1)
    notifier = make_notifier(journal, make_client(server))
    results: list[SendResult] = []

    with capture_logs() as logs:
        notifier.flush(5.0)
        server.fail_with(400, count=1)
        journal.record([alert(6), alert(7)])
        notifier.drain_once()
        server.fail_with(429, count=1)
        journal.record([alert(9)])
        notifier.drain_once()
        notifier = make_notifier(journal, make_client(server))
        server.fail_with(401)
        journal.record([alert(8)])
        notifier.drain_once()
        results.append(make_client(server).send(journal.pending()[0]))

    text = repr(logs) + repr(results) + repr(journal.table_rows("outbox")) + repr(notifier.disabled_reason)
    assert {e["event"] for e in logs} >= {
        "pushover_sent",
        "pushover_retry",
        "pushover_rejected",
        "pushover_quota_exhausted",
        "pushover_disabled",
    }
    assert TOKEN not in text and USER not in text


def test_echoed_keys_in_an_error_body_are_masked(journal: Journal) -> None:
    def echo_keys(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"status": 0, "errors": [request.content.decode()], "request": "r-1"})

    client = PushoverClient(
        TOKEN, USER, "http://pushover.invalid/1/messages.json", transport=httpx.MockTransport(echo_keys)
    )
    journal.record([alert(1)])

    result = client.send(journal.pending()[0])

    assert (result.ok, result.retry, result.status, result.request_id) == (False, False, 400, "r-1")
    assert TOKEN not in result.error and USER not in result.error
    assert "token=aTes…(30 chars)" in result.error


def answering(response: httpx.Response) -> PushoverClient:
    """A client whose every request gets `response` (no socket: the classification alone is under test)."""
    return PushoverClient(
        TOKEN,
        USER,
        "http://pushover.invalid/1/messages.json",
        transport=httpx.MockTransport(lambda _r: response),
    )


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(200, json={"status": 1, "request": "r"}), (True, False, False)),
        (httpx.Response(200, json={"status": 0, "errors": ["x"], "request": "r"}), (False, False, False)),
        (httpx.Response(200, json={"status": "1", "request": "r"}), (True, False, False)),
        # A 200 whose JSON has no status was a refusal: each alert went twice, its SELL said "not delivered".
        (httpx.Response(200, json={"request": "r"}), (True, False, False)),
        (httpx.Response(200, json={}), (True, False, False)),
        (httpx.Response(200, json={"status": "0", "errors": ["x"]}), (False, False, False)),
        (httpx.Response(200, json={"errors": ["message cannot be blank"]}), (False, False, False)),
        (httpx.Response(200, text="<html>gateway</html>"), (False, True, False)),
        (
            httpx.Response(200, text="{not json", headers={"content-type": "application/json"}),
            (True, False, False),
        ),
        (httpx.Response(200, content=b""), (True, False, False)),
        (httpx.Response(502, text="<html>bad gateway</html>"), (False, True, False)),
        (httpx.Response(503, json={"status": 0, "errors": ["down"]}), (False, True, False)),
        (httpx.Response(302, headers={"Location": "/elsewhere"}), (False, True, False)),
        (httpx.Response(301, headers={"Location": "https://portal.example/login"}), (False, True, False)),
        (httpx.Response(404, json={"status": 0, "errors": ["not found"]}), (False, False, False)),
        (
            httpx.Response(
                400, json={"status": 0, "user": "invalid", "errors": ["user identifier is not a valid user"]}
            ),
            (False, False, True),
        ),
        (
            httpx.Response(400, json={"status": 0, "errors": ["device name is invalid"]}),
            (False, False, False),
        ),
        (httpx.Response(401, text="unauthorised"), (False, False, True)),
    ],
)
def test_answers_are_classified_like_pushover_asks(
    journal: Journal, response: httpx.Response, expected: tuple[bool, bool, bool]
) -> None:
    client = answering(response)
    journal.record([alert(1)])

    result = client.send(journal.pending()[0])

    assert (result.ok, result.retry, result.credentials_invalid) == expected


@pytest.mark.parametrize(
    ("response", "refused"),
    [
        (httpx.Response(403, json={"status": 0, "errors": ["forbidden"]}), True),
        (httpx.Response(403, text="<html>blocked</html>"), True),
        (httpx.Response(404, text="<html>not found</html>"), True),
        (httpx.Response(413, text="<html>413 Request Entity Too Large</html>"), False),
        (httpx.Response(431, text="<html>headers too large</html>"), False),
        (httpx.Response(307, headers={"Location": "https://portal.example/login"}), True),
        (httpx.Response(404, json={"status": 0, "errors": ["not found"]}), False),
        (httpx.Response(400, json={"status": 0, "errors": ["message cannot be blank"]}), False),
        (httpx.Response(429, json={"status": 0, "errors": ["quota"]}), False),
        (httpx.Response(401, text="unauthorised"), False),
    ],
)
def test_a_403_or_a_foreign_4xx_page_refuses_the_service_not_the_alert(
    journal: Journal, response: httpx.Response, refused: bool
) -> None:
    client = answering(response)
    journal.record([alert(1)])
    result = client.send(journal.pending()[0])
    assert result.refused_for_now is refused and not result.ok


def test_a_redirect_says_where_it_points_and_what_to_check(journal: Journal) -> None:
    client = answering(httpx.Response(301, headers={"Location": "https://portal.example/login"}))
    journal.record([alert(1)])
    result = client.send(journal.pending()[0])
    assert result.error == "HTTP 301: redirected to https://portal.example/login; check PUSHOVER_API_URL"


def test_an_alert_given_up_on_stays_in_health_with_its_error(journal: Journal) -> None:
    answer = httpx.Response(
        200, json={"status": 0, "errors": ["application is over its limit"], "request": "r"}
    )
    client = answering(answer)
    journal.record([alert(1), alert(2)])
    notifier = make_notifier(journal, client)
    assert notifier.health().gave_up is None

    assert notifier.drain_once() == 0

    assert [r[1] for r in outbox(journal)] == ["failed", "failed"]  # Pushover: never repeat such a request
    health = notifier.health()
    assert health.problem is None and not health.blocked
    assert (
        health.gave_up == "2 alert(s) not delivered, the last: SELL (HTTP 200: application is over its limit)"
    )


def test_form_for_an_item_is_exact() -> None:
    item = OutboxItem(7, "SELL:t1", "SELL", "title", "body", 1, 1_759_415_400_999, 0)

    assert pushover_form(item, TOKEN, USER) == {
        "token": TOKEN,
        "user": USER,
        "title": "title",
        "message": "body",
        "priority": "1",
        "timestamp": "1759415400",
    }


def test_fake_server_validates_like_pushover(server: FakePushover) -> None:
    with httpx.Client() as http:
        blank = http.post(server.url, data={"token": TOKEN, "user": USER, "message": ""})
        emergency = http.post(
            server.url, data={"token": TOKEN, "user": USER, "message": "m", "priority": "2"}
        )
        ok = http.post(server.url, json={"token": TOKEN, "user": USER, "message": "json body"})

    assert (blank.status_code, blank.json()["errors"], blank.json()["message"]) == (
        400,
        ["message cannot be blank"],
        "cannot be blank",
    )
    assert emergency.status_code == 400
    assert emergency.json()["retry"] == "invalid" and emergency.json()["expire"] == "invalid"
    assert (ok.status_code, ok.json()["status"], ok.headers["X-Limit-App-Remaining"]) == (200, 1, "9999")
    assert [m.form["message"] for m in server.messages] == ["json body"]
    assert server.requests == 3


def test_fake_server_runs_alone_from_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sim.pushover_server", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 0
    assert "--fail-500-for" in done.stdout and "--port" in done.stdout

    process = subprocess.Popen(
        [sys.executable, "-m", "sim.pushover_server", "--port", "0", "--fail-500-for", "30"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        url = banner.split("=", 1)[-1].strip()
        answer = httpx.post(url, data={"token": TOKEN, "user": USER, "message": "m\nline 2"}, timeout=5)
        assert banner.startswith("PUSHOVER_API_URL=http://127.0.0.1:")
        assert answer.status_code == 500
        assert process.stdout.readline() == "500 priority=0 title=''\n"
        assert [process.stdout.readline(), process.stdout.readline()] == ["    m\n", "    line 2\n"]
    finally:
        process.terminate()
        process.wait(timeout=5)


def test_pushover_down_for_30_seconds_with_production_delays_delivers_each_alert_once(
    journal: Journal, server: FakePushover
) -> None:
    """The real 5 s minimum retry and a 30 s outage: every alert arrives afterwards, once, in order."""
    journal.record([alert(n) for n in range(1, 6)])
    server.fail_with(500, seconds=30.0)
    notifier = Notifier(journal, make_client(server), clock_ms=lambda: SENT_MS)
    with running(notifier):
        journal.record([alert(6)])
        notifier.wake()
        wait_until(lambda: len(server.messages) == 6, timeout=75.0)
    assert titles(server) == [f"IWM 0DTE CALL — alert {n}" for n in range(1, 7)]
    failed_at = [m.received_at for m in server.history if m.status == 500]
    assert all(later - earlier >= 5.0 for earlier, later in zip(failed_at, failed_at[1:], strict=False))
    assert [row[1] for row in outbox(journal)] == ["sent"] * 6


def test_each_kind_carries_its_sound(journal: Journal, server: FakePushover) -> None:
    from alert_text import sound_for

    journal.record([alert(1), alert(2)])
    client = PushoverClient(TOKEN, USER, server.url, sound_for=lambda kind: sound_for(kind, {}))
    notifier = make_notifier(journal, client)
    assert notifier.drain_once() == 2
    assert [(m.form["title"][-7:], m.form.get("sound")) for m in server.messages] == [
        ("alert 1", sound_for("BUY")),
        ("alert 2", sound_for("SELL")),
    ]
    assert sound_for("BUY") and sound_for("BUY") != sound_for("SELL")


# Attachments: the daily summary's chart


def summary_alert() -> Alert:
    return Alert(
        "SUMMARY", "SUMMARY:2025-10-02", "IWM 0DTE — DAILY SUMMARY", "2025-10-02 (Thu): 0 trades", 0, AT_MS
    )


def small_chart_png() -> bytes:
    """A real day chart from report_charts, drawn small: 300 x 200 px."""
    from dataclasses import dataclass

    from report_charts import PricePoint, day_chart_png

    @dataclass(frozen=True, slots=True)
    class Day:
        session_date: str = "2025-10-02"
        reconstructed: bool = False
        trades: tuple = ()
        prices: tuple = tuple(PricePoint(AT_MS + s * 10_000, 240 + s / 100, 240 + s / 200) for s in range(30))
        marks: tuple = ()
        levels: tuple = ()
        pnl: float = 0.0

    return day_chart_png(Day(), (300, 200), 50)


def decoded_size(png: bytes) -> tuple[int, int]:
    """(width, height) as matplotlib decodes the image."""
    import io

    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png), format="png")
    return pixels.shape[1], pixels.shape[0]


def test_an_attachment_goes_as_multipart_with_the_png_intact_and_every_field_kept(
    journal: Journal, server: FakePushover
) -> None:
    png = small_chart_png()
    journal.record([alert(1), summary_alert()])
    asked: list[str] = []

    def chart_for(item: OutboxItem) -> bytes | None:
        asked.append(item.kind)
        return png if item.kind == "SUMMARY" else None

    client = PushoverClient(TOKEN, USER, server.url, attachment_for=chart_for)
    assert make_notifier(journal, client).drain_once() == 2
    buy, summary = server.messages
    assert asked == ["BUY", "SUMMARY"]
    assert (buy.attachment, buy.attachment_type) == (None, None)
    assert summary.form == {
        "token": TOKEN,
        "user": USER,
        "title": "IWM 0DTE — DAILY SUMMARY",
        "message": "2025-10-02 (Thu): 0 trades",
        "priority": "0",
        "timestamp": str(AT_MS // 1000),
    }
    assert summary.attachment == png and summary.attachment_type == "image/png"
    assert summary.attachment[:8] == b"\x89PNG\r\n\x1a\n"
    assert decoded_size(summary.attachment) == (300, 200)


@pytest.mark.parametrize("failure", ["raises", "returns None", "too large"])
def test_a_chart_that_fails_still_sends_the_text(
    journal: Journal, server: FakePushover, failure: str
) -> None:
    import alerts

    def chart_for(item: OutboxItem) -> bytes | None:
        if failure == "raises":
            raise RuntimeError("no chart today")
        return None if failure == "returns None" else b"\x89PNG" + bytes(alerts.ATTACHMENT_LIMIT)

    journal.record([summary_alert()])
    client = PushoverClient(TOKEN, USER, server.url, attachment_for=chart_for)
    with capture_logs() as logs:
        assert make_notifier(journal, client).drain_once() == 1
    (message,) = server.messages
    assert message.form["title"] == "IWM 0DTE — DAILY SUMMARY" and message.attachment is None
    assert outbox(journal) == [("SUMMARY:2025-10-02", "sent", 1, None, SENT_MS)]
    warned = {e["event"] for e in logs if e["log_level"] == "warning"}
    expected = {"raises": {"attachment_failed"}, "returns None": set(), "too large": {"attachment_too_large"}}
    assert warned == expected[failure]


def test_a_chart_a_proxy_refuses_as_too_large_goes_as_text_and_holds_nothing(
    journal: Journal, server: FakePushover
) -> None:
    """A proxy's 413 page (no Pushover JSON) was taken for a refusal of the whole service: the SUMMARY and
    every alert behind it (the next morning's BUY) were held and retried every minute for good."""
    server.proxy_body_limit = 20_000
    journal.record([summary_alert(), alert(1)])
    client = PushoverClient(TOKEN, USER, server.url, attachment_for=lambda _item: small_chart_png() * 20)
    notifier = make_notifier(journal, client)

    assert notifier.drain_once() == 2

    assert len(server.too_large) == 2  # the SUMMARY's chart, then the BUY's (the hook gives every item one)
    assert [(m.form["title"], m.attachment) for m in server.messages] == [
        ("IWM 0DTE — DAILY SUMMARY", None),
        (alert(1).title, None),
    ]
    assert [row[1] for row in outbox(journal)] == ["sent", "sent"]
    assert notifier.health().problem is None


def test_fake_server_takes_one_image_up_to_pushovers_limit(server: FakePushover) -> None:
    import base64

    from sim.pushover_server import ATTACHMENT_LIMIT

    fields = {"token": TOKEN, "user": USER, "message": "with image"}

    def image(size: int, kind: str = "image/png") -> dict[str, tuple[str, bytes, str]]:
        return {"attachment": ("a.png", bytes(size), kind)}

    with httpx.Client() as http:
        at_limit = http.post(server.url, data=fields, files=image(ATTACHMENT_LIMIT))
        over = http.post(server.url, data=fields, files=image(ATTACHMENT_LIMIT + 1))
        not_image = http.post(server.url, data=fields, files=image(4, "text/plain"))
        encoded = http.post(
            server.url,
            data=fields
            | {"attachment_base64": base64.b64encode(b"\x89PNG!").decode(), "attachment_type": "image/png"},
        )
    assert at_limit.status_code == 200 and encoded.status_code == 200
    assert (over.status_code, over.json()["attachment"]) == (400, "invalid")
    assert over.json()["errors"] == [f"attachment is too large ({ATTACHMENT_LIMIT} bytes maximum)"]
    assert not_image.status_code == 400
    first, last = server.messages
    assert len(first.attachment or b"") == ATTACHMENT_LIMIT and first.form == fields
    assert (last.attachment, last.attachment_type) == (b"\x89PNG!", "image/png")
    assert "attachment_base64" not in last.form


def test_an_alert_that_never_gets_an_answer_is_given_up_after_several_minutes_of_resends(
    journal: Journal, server: FakePushover
) -> None:
    """Held for good, one alert that can never be answered in time would hold every later one."""
    from alerts import GIVE_UP_TIMEOUTS

    server.stall(60.0)  # never answered within the client's timeout during this test
    journal.record([alert(1), alert(2)])
    notifier = make_notifier(journal, make_client(server, timeout=0.05), min_retry_s=0.01, max_retry_s=0.01)
    with capture_logs() as logs:
        for _ in range(GIVE_UP_TIMEOUTS * 3):
            notifier.drain_once()
            if outbox(journal)[0][1] == "failed":
                break
            time.sleep(0.02)
    rows = outbox(journal)
    assert rows[0][:2] == ("K:1", "failed") and "may have arrived" in (rows[0][3] or "")
    assert rows[1][1] in ("pending", "sending"), "alert 2 is next in line, not lost with it"
    assert [e["dedupe_key"] for e in logs if e["event"] == "pushover_timed_out_too_often"] == ["K:1"]
    gave_up = notifier.health().gave_up
    assert (
        gave_up
        == f"1 alert(s) not delivered, the last: BUY (no answer {GIVE_UP_TIMEOUTS} times, may have arrived)"
    )


def test_an_alert_leaving_well_after_its_decision_says_it_is_late(
    journal: Journal, server: FakePushover
) -> None:
    """Alerts held 300 s by a Pushover outage arrived with text identical to fresh ones."""
    now = [AT_MS + 29_000]
    journal.record([trade_alert("BUY")])
    notifier = Notifier(journal, make_client(server), clock_ms=lambda: now[0], late_after_ms=30_000)
    assert notifier.drain_once() == 1
    journal.record([trade_alert("SELL")])
    now[0] = AT_MS + 5 * 60_000
    assert notifier.drain_once() == 1
    buy, sell = server.messages
    assert buy.form["title"] == "IWM 0DTE CALL — BUY" and buy.form["message"] == "BUY text"
    assert sell.form["title"] == "IWM 0DTE CALL — SELL (5 min late)"
    assert sell.form["message"].startswith("Sent late: decided at 10:30:00, 5 min ago")
    assert sell.form["timestamp"] == str(AT_MS // 1000), "the phone still shows the decision's time"


class RecordingFallback:
    """A fallback channel that keeps each alert's title and takes every alert (or, `takes=False`, none)."""

    name = "fallback"

    def __init__(self, *, takes: bool = True) -> None:
        self.titles: list[str] = []
        self._takes = takes

    def send(self, item: OutboxItem) -> SendResult:
        self.titles.append(item.title)
        if self._takes:
            return SendResult(True, False, None, "", None, None)
        return SendResult(False, True, None, "webhook down", None, None)


def test_after_an_alert_went_by_the_fallback_for_timeouts_the_next_ones_follow_it_for_a_while(
    journal: Journal,
) -> None:
    """Each alert paid its own two 20 s timeouts on a Pushover that never answered: the SELL reached the
    fallback 95 s after its decision, 50 s after the fallback had carried the BUY."""
    from alerts import FALLBACK_AFTER_TIMEOUTS_S

    asked: list[str] = []

    def never_answers(request: httpx.Request) -> httpx.Response:
        asked.append(dict(httpx.QueryParams(request.content.decode()))["title"])
        raise httpx.ReadTimeout("no answer", request=request)

    client = PushoverClient(TOKEN, USER, "http://pushover.invalid/1/messages.json",
                            transport=httpx.MockTransport(never_answers))  # fmt: skip
    clock, fallback = StepClock(), RecordingFallback()
    notifier = make_notifier(journal, client, monotonic=clock, fallback=fallback, min_retry_s=5.0)
    journal.record([trade_alert("BUY"), trade_alert("SELL")])
    assert notifier.drain_once() == 0  # the first timeout: held, to be resent
    clock.now += 5.0
    assert notifier.drain_once() == 2  # the second: the BUY by the fallback, and the SELL straight after it
    assert len(asked) == 2 and [t.split(" — ")[-1] for t in fallback.titles] == ["BUY", "SELL"]
    clock.now += FALLBACK_AFTER_TIMEOUTS_S
    journal.record([trade_alert("BUY", "2025-10-02-2")])
    notifier.drain_once()
    assert len(asked) == 3, "Pushover is tried again once the window is over"


def test_an_alert_the_fallback_carries_after_pushovers_timeouts_is_marked_late_as_of_then(
    journal: Journal,
) -> None:
    """Lateness was judged before the Pushover attempt: a BUY that then took two 20 s timeouts reached
    the fallback 45 s after its decision without its "(N min late)"."""
    now_ms = [AT_MS + 5_000]

    def times_out(request: httpx.Request) -> httpx.Response:
        now_ms[0] += 20_000  # each attempt waits out its 20 s deadline
        raise httpx.ReadTimeout("no answer", request=request)

    client = PushoverClient(TOKEN, USER, "http://pushover.invalid/1/messages.json",
                            transport=httpx.MockTransport(times_out))  # fmt: skip
    clock, fallback = StepClock(), RecordingFallback()
    notifier = Notifier(journal, client, clock_ms=lambda: now_ms[0], monotonic=clock, fallback=fallback,
                        min_retry_s=5.0, late_after_ms=30_000)  # fmt: skip
    journal.record([trade_alert("BUY")])
    assert notifier.drain_once() == 0  # +25 s: the first timeout
    clock.now += 5.0
    assert notifier.drain_once() == 1  # +45 s: the second, then the fallback
    assert fallback.titles == ["IWM 0DTE CALL — BUY (1 min late)"]


def test_a_failing_fallback_ends_its_window_and_pushover_is_asked_again_on_its_back_off(
    journal: Journal,
) -> None:
    """With the fallback failing too, the 5-minute window had kept every alert from a Pushover that
    answered again (2 Pushover requests, 13 fallback attempts, BUY and SELL pending for 5 minutes)."""
    answers = iter(["timeout", "timeout"])

    def then_answers(request: httpx.Request) -> httpx.Response:
        if next(answers, "ok") == "timeout":
            raise httpx.ReadTimeout("no answer", request=request)
        return httpx.Response(200, json={"status": 1, "request": "r"})

    client = PushoverClient(TOKEN, USER, "http://pushover.invalid/1/messages.json",
                            transport=httpx.MockTransport(then_answers))  # fmt: skip
    clock, fallback = StepClock(), RecordingFallback(takes=False)
    notifier = make_notifier(journal, client, monotonic=clock, fallback=fallback, min_retry_s=5.0)
    journal.record([trade_alert("BUY"), trade_alert("SELL")])
    for _ in range(6):
        notifier.drain_once()
        clock.now += 20.0
    assert [r[1] for r in outbox(journal)] == ["sent", "sent"] and len(fallback.titles) == 1


def test_a_plain_resend_answered_with_a_refusal_of_the_service_holds_the_queue(journal: Journal) -> None:
    """The text-alone resend met a 429 (quota) and the alert was marked failed for good: every later
    alert was lost the same way until the quota reset."""
    answers = iter([
        httpx.Response(400, json={"status": 0, "errors": ["sound is invalid"], "request": "r"}),
        httpx.Response(429, json={"status": 0, "errors": ["quota"], "request": "r"}),
    ])  # fmt: skip
    client = PushoverClient(TOKEN, USER, "http://pushover.invalid/1/messages.json",
                            transport=httpx.MockTransport(lambda _r: next(answers)))  # fmt: skip
    notifier = make_notifier(journal, client)
    journal.record([trade_alert("BUY")])
    assert notifier.drain_once() == 0
    assert [r[1] for r in outbox(journal)] == ["pending"]
    assert notifier.health().blocked and not notifier.health().lost_trade


class ResettingServer:
    """An HTTP server that reads each whole request, then resets the connection: Pushover may have
    taken the message, and no answer comes back."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/1/messages.json"
        self.requests = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with connection:
                self._read_request(connection)
                self.requests += 1
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    @staticmethod
    def _read_request(connection: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += connection.recv(65536)

    def close(self) -> None:
        self._listener.close()


def test_resets_after_the_request_left_are_bounded_like_timeouts_so_later_alerts_go(
    journal: Journal,
) -> None:
    """A reset after the body left may follow a delivery: resent marked, then given up like timeouts
    (an audit's Pushover that reset every answer held the BUY and SELL behind START for good)."""
    from alerts import GIVE_UP_TIMEOUTS

    server = ResettingServer()
    journal.record([alert(1), alert(2)])
    client = PushoverClient(TOKEN, USER, server.url, timeout=2.0)
    notifier = make_notifier(journal, client, min_retry_s=0.01, max_retry_s=0.01)
    try:
        for _ in range(GIVE_UP_TIMEOUTS * 3):
            notifier.drain_once()
            if outbox(journal)[0][1] == "failed":
                break
            time.sleep(0.02)
    finally:
        server.close()
    rows = outbox(journal)
    assert rows[0][:2] == ("K:1", "failed") and "may have arrived" in (rows[0][3] or "")
    assert rows[1][1] in ("pending", "sending"), "alert 2 is next in line"
    assert server.requests in (GIVE_UP_TIMEOUTS, GIVE_UP_TIMEOUTS + 1)  # + alert 2's first try


def test_a_failing_fallback_does_not_push_back_pushovers_own_retry(
    journal: Journal, server: FakePushover
) -> None:
    server.fail_with(500)
    journal.record([alert(1), alert(2)])
    clock = StepClock()
    with FakeWebhook() as hook:
        hook.fail_with(500)
        notifier = notifier_with_fallback(
            journal,
            server,
            hook,
            monotonic=clock,
            min_retry_s=5.0,
            max_retry_s=60.0,
        )
        assert notifier.drain_once() == 0  # t=100: Pushover fails, its retry at 105
        clock.now = 161.0
        assert notifier.drain_once() == 0  # Pushover fails again (down 61 s), its retry at 171
        clock.now = 162.0
        assert notifier.drain_once() == 0  # the fallback's turn: it fails too
        assert hook.requests == 1
        server.recover()
        clock.now = 171.5
        assert notifier.drain_once() == 2  # Pushover's own retry time: it answers again

    assert titles(server) == ["IWM 0DTE CALL — alert 1", "IWM 0DTE CALL — alert 2"]
