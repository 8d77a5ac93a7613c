"""Whole-request deadlines against a real socket that trickles its answer (issue 1's kind: a hung alert)."""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from alerts import PushoverClient
from http_deadline import DeadlineTransport
from pnl_tracker import OutboxItem
from polygon_client import MAX_BODY_BYTES, NETWORK_ERROR_STATUS, PolygonRest

BODY = b'{"status":1,"request":"r1"}'
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)


@contextmanager
def server(answer: bytes, *, trickle_from: int, gap_s: float) -> Iterator[tuple[str, list[int]]]:
    """A one-thread HTTP peer: reads a request, sends `answer` whole up to `trickle_from`, then a byte
    per `gap_s`; keeps the connection for the next request. Yields its URL and the requests seen."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    while not stop.is_set() and b"\r\n\r\n" in _read_request(conn):
                        seen.append(1)
                        conn.sendall(answer[:trickle_from])
                        for i in range(trickle_from, len(answer)):
                            if stop.wait(gap_s):
                                return
                            conn.sendall(answer[i : i + 1])
                except OSError:
                    continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/1/messages.json", seen
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lengths = [
        v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")) if k.lower() == b"content-length"
    ]
    length = int(lengths[0]) if lengths else 0
    while len(rest) < length:
        rest += conn.recv(65536)
    return data


def timed_post(client: httpx.Client, url: str) -> tuple[float, httpx.Response | Exception]:
    started = time.monotonic()
    try:
        result: httpx.Response | Exception = client.post(url, data={"a": "1"})
    except httpx.HTTPError as exc:
        result = exc
    return time.monotonic() - started, result


@pytest.mark.parametrize("trickle_from", [len(HEAD), 3], ids=["body", "status-line"])
def test_an_answer_trickled_a_byte_at_a_time_ends_at_the_deadline(trickle_from):
    with (
        server(HEAD + BODY, trickle_from=trickle_from, gap_s=0.15) as (url, _seen),
        httpx.Client(transport=DeadlineTransport(1.0), timeout=30.0) as client,
    ):
        elapsed, result = timed_post(client, url)
    assert isinstance(result, httpx.ReadTimeout), result
    assert 0.9 <= elapsed < 2.5  # each read waited under the 30 s per-read timeout; the whole ended at 1 s


def test_without_the_deadline_the_same_answer_outlives_it():
    """The fault the transport exists for: httpx's own timeouts are per read."""
    with (
        server(HEAD + BODY, trickle_from=len(HEAD), gap_s=0.08) as (url, _seen),
        httpx.Client(timeout=1.0) as client,
    ):
        elapsed, result = timed_post(client, url)
    assert isinstance(result, httpx.Response) and result.json()["status"] == 1 and elapsed > 1.5


def test_each_request_gets_its_own_deadline_on_a_reused_connection():
    with (
        server(HEAD + BODY, trickle_from=len(HEAD) + len(BODY) - 5, gap_s=0.12) as (url, seen),
        httpx.Client(transport=DeadlineTransport(1.0), timeout=5.0) as client,
    ):
        results = [timed_post(client, url) for _ in range(3)]  # 0.6 s each: 1.8 s in all
    assert [r.json()["request"] for _t, r in results] == ["r1", "r1", "r1"]  # type: ignore[union-attr]
    assert len(seen) == 3


def test_a_refused_connection_is_httpx_connect_error():
    port = socket.create_server(("127.0.0.1", 0))
    address = port.getsockname()[1]
    port.close()
    with httpx.Client(transport=DeadlineTransport(1.0)) as client:
        _elapsed, result = timed_post(client, f"http://127.0.0.1:{address}/")
    assert isinstance(result, httpx.ConnectError)


def test_pushover_trickling_its_answer_costs_one_timed_out_try_not_the_notifier():
    item = OutboxItem(7, "SELL:t1", "SELL", "title", "body", 1, 1_759_415_400_999, 0)
    with server(HEAD + BODY, trickle_from=len(HEAD), gap_s=0.3) as (url, _seen):
        client = PushoverClient("t" * 30, "u" * 30, url, deadline_s=1.0)
        started = time.monotonic()
        result = client.send(item)
        elapsed = time.monotonic() - started
        client.close()
    assert (result.ok, result.retry, result.timed_out) == (False, True, True)
    assert elapsed < 2.5 and "t" * 30 not in result.error


def gzip_answer(status: str, body: bytes) -> bytes:
    """An HTTP answer whose body is `body` gzipped, with the Content-Encoding that makes httpx inflate it."""
    packed = gzip.compress(body, compresslevel=9)
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {len(packed)}\r\n\r\n"
    )
    return head.encode() + packed


def test_a_rest_answer_inflating_past_the_cap_is_refused_once_not_held_in_memory():
    """A 2 MB gzip answer inflating to 2 GB had taken a daemon to 1.5 GB within the request's deadline."""
    bomb = gzip_answer("200 OK", b"[" + b"0," * (MAX_BODY_BYTES // 2) + b"0]")
    assert len(bomb) < MAX_BODY_BYTES // 100
    with server(bomb, trickle_from=len(bomb), gap_s=0.0) as (url, seen):
        rest = PolygonRest(url.rsplit("/1/", 1)[0], "k" * 20, clock_ms=lambda: 1, sleep=lambda _s: None)
        answer = rest.get("/v3/snapshot/options/IWM")
        rest.close()
    assert answer.status == NETWORK_ERROR_STATUS and "larger than 32 MiB" in answer.body["error"]
    assert len(seen) == 1, "the same flood is not asked for again"
    assert "larger than 32 MiB" in (rest.last_error or "")


@pytest.mark.parametrize(
    "answer",
    [
        gzip_answer("200 OK", b'{"status":1,"request":"' + b"x" * (1 << 20) + b'"}'),
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n\r\nnot gzip!",
    ],
    ids=["inflates past the cap", "broken gzip"],
)
def test_a_pushover_200_whose_body_cannot_be_read_counts_as_delivered(answer):
    """Pushover answers 200 only once it has the message: sending it again would repeat the alert.
    A broken gzip had raised out of the read (a retry: the same BUY twice)."""
    item = OutboxItem(7, "BUY:t1", "BUY", "title", "body", 1, 1_759_415_400_999, 0)
    with server(answer, trickle_from=len(answer), gap_s=0.0) as (url, seen):
        client = PushoverClient("t" * 30, "u" * 30, url, deadline_s=5.0)
        result = client.send(item)
        client.close()
    assert (result.ok, result.retry, result.status) == (True, False, 200)
    assert len(seen) == 1


def coded_answer(codings: list[str], body: bytes) -> bytes:
    """An HTTP 200 whose body is coded by each of `codings` in turn, with the header that says so."""
    packed = body
    for coding in codings:
        packed = gzip.compress(packed, compresslevel=9) if "gzip" in coding else zlib.compress(packed, 9)
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: {', '.join(codings)}\r\n"
        f"Content-Length: {len(packed)}\r\n\r\n"
    )
    return head.encode() + packed


@pytest.mark.parametrize("codings", [["gzip", "gzip"], ["deflate"], ["deflate", "gzip"]])
def test_every_coding_stacked_or_not_is_inflated_within_the_cap(codings):
    """Only a single gzip was inflated piece by piece: "gzip, gzip" (a 1.8 KB body) took the daemon past
    2 GB through httpx's own decoding, which inflates a whole network chunk at once."""
    import tracemalloc

    bomb = coded_answer(codings, b" " * (4 * MAX_BODY_BYTES))
    with server(bomb, trickle_from=len(bomb), gap_s=0.0) as (url, seen):
        rest = PolygonRest(url.rsplit("/1/", 1)[0], "k" * 20, clock_ms=lambda: 1, sleep=lambda _s: None)
        tracemalloc.start()
        answer = rest.get("/v3/snapshot/options/IWM")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rest.close()
    assert answer.status == NETWORK_ERROR_STATUS and "larger than 32 MiB" in answer.body["error"]
    assert len(seen) == 1
    assert peak < 3 * MAX_BODY_BYTES, f"{peak >> 20} MiB held to refuse it"


@pytest.mark.parametrize("codings", [["gzip", "gzip"], ["deflate"], ["x-gzip"]])
def test_a_small_coded_answer_reads_as_its_json(codings):
    answer = coded_answer(codings, b'{"status":"OK","results":[]}')
    with server(answer, trickle_from=len(answer), gap_s=0.0) as (url, _seen):
        rest = PolygonRest(url.rsplit("/1/", 1)[0], "k" * 20, clock_ms=lambda: 1, sleep=lambda _s: None)
        got = rest.get("/v3/snapshot/options/IWM")
        rest.close()
    assert (got.status, got.body) == (200, {"status": "OK", "results": []})


def test_a_raw_deflate_body_and_an_unasked_coding():
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = raw.compress(b'{"status":1,"request":"r"}') + raw.flush()
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: {len(packed)}\r\n\r\n"
    unasked = b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\nxxxx"
    item = OutboxItem(7, "BUY:t1", "BUY", "title", "body", 1, 1_759_415_400_999, 0)
    for answer, request_id in ((head.encode() + packed, "r"), (unasked, None)):
        with server(answer, trickle_from=len(answer), gap_s=0.0) as (url, _seen):
            client = PushoverClient("t" * 30, "u" * 30, url, deadline_s=5.0)
            result = client.send(item)
            client.close()
        # A 200 is delivered either way; only the readable one names Pushover's request id.
        assert (result.ok, result.request_id) == (True, request_id)


def test_a_name_lookup_that_never_answers_ends_at_the_deadline():
    """`getaddrinfo` has no timeout: a resolver that never answered held each Pushover request 90 s past its
    20 s deadline, /health said ok meanwhile, and the daemon's stop waited behind it."""
    import socket as sockets

    import httpcore

    from http_deadline import resolve

    never = threading.Event()

    def hung(*_args: object, **_kwargs: object) -> list:
        never.wait(30)
        return []

    with pytest.raises(httpcore.ConnectTimeout, match="looking up api.pushover.net took more than 0.3 s"):
        resolve("api.pushover.net", 443, 0.3, lookup=hung)
    assert not never.is_set(), "it returned while the lookup was still hung"
    slots = threading.BoundedSemaphore(1)
    with pytest.raises(httpcore.ConnectTimeout):
        resolve("api.pushover.net", 443, 0.1, lookup=hung, slots=slots)
    with pytest.raises(httpcore.ConnectTimeout, match="earlier lookups still wait"):
        resolve("api.pushover.net", 443, 0.1, lookup=hung, slots=slots)  # no second thread piled up
    never.set()
    assert resolve("127.0.0.1", 80, 1.0) == ["127.0.0.1"] and resolve("::1", 80, 1.0) == ["::1"]
    assert resolve("localhost", 80, 5.0), "a name the system knows (/etc/hosts) still resolves"

    def unknown(*_args: object, **_kwargs: object) -> list:
        raise sockets.gaierror(-2, "Name or service not known")

    with pytest.raises(httpcore.ConnectError, match="looking up nowhere.invalid: .*not known"):
        resolve("nowhere.invalid", 80, 1.0, lookup=unknown)
