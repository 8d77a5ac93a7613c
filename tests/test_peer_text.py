"""Peer answers that are hostile as text: a lone surrogate (JSON's "\\ud800", which no UTF-8 writer takes),
answers nested deeper than Python recurses, and REST paths or page links that do not parse.

Pushover is a scripted HTTP server on a real socket; the journal is a real SQLite file behind the daemon's
write-behind writer and in-memory outbox.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from test_alerts import TOKEN, USER, alert

from alerts import Notifier, PushoverClient
from delivery import MemoryOutbox, WriteBehindJournal
from events import Alert
from feed import FeedDecoder
from pnl_tracker import Journal, JournalError
from tape import RawJson

SURROGATE_ERROR = b'{"status":0,"errors":["token \\ud800 is odd"],"request":"r1"}'
DEEP = b"[" * 100_000 + b"]" * 100_000
OK = b'{"status":1,"request":"ok"}'


class ScriptedPushover:
    """Answers each POST with the next (status, body) of its script, then 200 OK; counts the requests."""

    def __init__(self, script: list[tuple[int, bytes]]) -> None:
        self.script = list(script)
        self.titles: list[str] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}/1/messages.json"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            with connection:
                self._answer(connection)

    def _answer(self, connection: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += connection.recv(65536)
        head, _, body = request.partition(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        while len(body) < length:
            body += connection.recv(65536)
        self.titles.append(parse_qs(body.decode())["title"][0])
        status, answer = self.script.pop(0) if self.script else (200, OK)
        connection.sendall(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + answer
        )

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def daemon_outbox(tmp_path: Path) -> Iterator[tuple[Journal, WriteBehindJournal, MemoryOutbox]]:
    journal = Journal(tmp_path / "journal.sqlite3")
    writer = WriteBehindJournal(
        journal,
        clock_ms=lambda: 1,
        on_failing=lambda _e: None,
        on_recovered=lambda _n: None,
        retry_every_s=0.0,
    )
    yield journal, writer, MemoryOutbox(writer)
    journal.close()


def notifier_for(outbox: MemoryOutbox, pushover: ScriptedPushover) -> Notifier:
    client = PushoverClient(TOKEN, USER, pushover.url, timeout=2.0)
    return Notifier(outbox, client, clock_ms=lambda: 5, min_retry_s=0.0, max_retry_s=0.0)  # type: ignore[arg-type]


def queue(writer: WriteBehindJournal, outbox: MemoryOutbox, *alerts: Alert) -> None:
    for each in alerts:
        outbox.add(writer.record([each]))


def test_an_error_text_no_utf8_writer_takes_never_blocks_the_alerts_behind_it(daemon_outbox) -> None:
    journal, writer, outbox = daemon_outbox
    pushover = ScriptedPushover([(400, SURROGATE_ERROR), (400, SURROGATE_ERROR)])
    notifier = notifier_for(outbox, pushover)
    queue(writer, outbox, alert(1))
    notifier.drain_once()  # refused with the odd text, and as text alone: failed, recorded
    queue(writer, outbox, alert(2), alert(3))
    while notifier.drain_once():
        pass
    pushover.close()
    assert pushover.titles == [alert(n).title for n in (1, 1, 2, 3)]
    assert not writer.health().failing
    rows = {r[1]: (r[7], r[9]) for r in journal.table_rows("outbox")}
    assert rows["K:2"][0] == rows["K:3"][0] == "sent"
    assert rows["K:1"][0] == "failed" and "token \ufffd" in rows["K:1"][1]


@pytest.mark.parametrize(("status", "sent_once"), [(200, True), (500, False)])
def test_an_answer_nested_too_deep_is_read_as_no_json_never_an_unmarked_repeat(
    daemon_outbox, status, sent_once
):
    _journal, writer, outbox = daemon_outbox
    pushover = ScriptedPushover([(status, DEEP)])
    notifier = notifier_for(outbox, pushover)
    queue(writer, outbox, alert(1), alert(2))
    for _ in range(4):
        notifier.drain_once()
    pushover.close()
    if sent_once:  # Pushover answers 200 only once it took the message: counted as delivered
        assert pushover.titles == [alert(1).title, alert(2).title]
    else:  # a 5xx is retried, and nothing else goes first
        assert pushover.titles == [alert(1).title, alert(1).title, alert(2).title]
    assert outbox.pending_count() == 0


def test_the_journal_stores_text_with_lone_surrogates_and_refuses_unbindable_values_as_journal_errors(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    odd = Alert("SYSTEM", "SYSTEM:odd", "IWM alerter \udc80", "REST said \ud800", 0, 1)
    assert journal.record([odd]) == [odd]
    journal.mark_outcome("SYSTEM:odd", "failed", "HTTP 400: \udfff", None)
    (row,) = journal.table_rows("outbox")
    assert "\ufffd" in row[3] and "\ufffd" in row[4] and "\ufffd" in row[9]
    with pytest.raises(JournalError):
        journal.record([Alert("SYSTEM", "SYSTEM:big", "t", "m", 2**70, 1)])
    assert len(journal.table_rows("outbox")) == 1
    journal.close()


def test_a_value_the_journal_refuses_puts_the_writer_in_failing_mode_and_the_alert_still_goes(daemon_outbox):
    _journal, writer, _outbox = daemon_outbox
    unbindable = Alert("SYSTEM", "SYSTEM:big", "t", "m", 2**70, 1)
    assert writer.record([unbindable]) == [unbindable]
    assert writer.health().failing


@pytest.mark.parametrize(
    "path",
    [
        "//[x/v3/snapshot/options/IWM?cursor=2",  # not a URL: "Invalid IPv6 URL"
        "/v2/aggs/ticker/IWM/range/x/second/2025-10-02/2025-10-02",  # the multiplier is not a number
        "/v2/aggs/ticker/IWM/range/" + "9" * 5000 + "/second/2025-10-02/2025-10-02",
    ],
    ids=["not-a-url", "multiplier-not-a-number", "multiplier-5000-digits"],
)
def test_a_rest_answer_whose_path_does_not_parse_is_a_counted_rest_error(path: str) -> None:
    decoder = FeedDecoder("IWM", "SPY")
    assert decoder.rest(1, path, 200, {"results": [], "status": "OK"}) == []
    assert decoder.counters.rest_errors == 1


def test_a_taped_chain_page_whose_link_json_cannot_read_is_a_failed_answer_as_live() -> None:
    page = RawJson(b'{"results":[],"next_url":"https://api.polygon.io/v3/x?cursor=\\q"}')
    assert page.top_level_string("next_url") is None and not page.is_object()
    decoder = FeedDecoder("IWM", "SPY")
    taped = RawJson(b'{"results":[],"next_url":"https://api.polygon.io/v3/x?cursor=\\q"}')
    assert decoder.rest(1, "/v3/snapshot/options/IWM?limit=250", 200, taped) == []
    assert decoder.counters.rest_errors == 1  # as the live decoder counts a body that is no JSON
