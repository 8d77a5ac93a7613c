"""Secrets never leave the process: the redactor, and each door it guards (logs, /health, alerts, diagnose).

An audit echoed the keys back from every peer it could fake: a WebSocket close reason, a REST error body
cut at 200 characters, a Pushover 400 naming the token, Apprise's debug lines. Each test here puts a
secret in such a place and reads what came out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx

from alerts import Notifier, PushoverClient
from events import Alert
from health import HealthServer
from pnl_tracker import Journal
from redaction import Redactor, channel_secrets, url_secrets
from sim.jsonhttp import JsonHandler, Reply
from sim.pushover_server import FakePushover

ROOT = Path(__file__).resolve().parents[1]
KEY = "SEKRETpolyKEY123"
TOKEN, USER = "SEKRETtok" + "a" * 21, "SEKRETusr" + "b" * 21


def test_a_whole_secret_and_one_cut_short_by_an_ellipsis_or_the_text_end_are_hidden() -> None:
    redact = Redactor.of([KEY, "", "abc"])  # empty and very short values are no secrets to look for
    assert redact.secrets == (KEY,)
    assert redact(f"closed 1008 policy: key {KEY}") == "closed 1008 policy: key ***"
    assert (
        redact('{"e": "HTTP 500: xx Bearer SEKRETpol...", "n": 1}')
        == '{"e": "HTTP 500: xx Bearer ***...", "n": 1}'
    )
    assert redact("ValueError: bad key SEKRETpo") == "ValueError: bad key ***"
    assert redact("SEKRETpolyKEY12… cut") == "***… cut"
    # Not a secret's start, or too little of it to tell: left alone.
    assert redact("plain text... and SEK...") == "plain text... and SEK..."
    assert Redactor.of([])("anything SEKRET...") == "anything SEKRET..."


def test_secret_urls_give_their_credentials_and_token_like_parts() -> None:
    assert url_secrets("tgram://123456789:SEKRETbotTOKENabc/987654321") >= {"SEKRETbotTOKENabc", "987654321"}
    assert url_secrets("ntfy://ntuser:SEKRETntpw@host.example/topicSEKRETtopic") == {
        "SEKRETntpw",
        "topicSEKRETtopic",
    }
    assert url_secrets("json://127.0.0.1:8080/x?-apikey=SEKRETparam&+X-Token=SEKREThdr&mode=plain") == {
        "SEKRETparam",
        "SEKREThdr",
    }
    # An endpoint's host, port and plain words stay readable.
    assert url_secrets("https://api.pushover.net:443/1/messages.json") == set()
    assert url_secrets("not a url") == set() and url_secrets("http://[bad") == set()


def test_a_log_line_loses_nested_and_foreign_secrets(capfd) -> None:
    import logging

    import structlog

    from logs import configure_logging

    configure_logging("DEBUG", "json", (KEY, "tgram://123456789:SEKRETbotTOKENabc/987654321"))
    try:
        structlog.get_logger("t").warning(
            "pulse", problems=[f"closed 1008 key {KEY}"], e="Bearer SEKRETpol..."
        )
        logging.getLogger("apprise").warning("POST https://api.telegram.org/bot1:SEKRETbotTOKENabc/send")
        logging.getLogger("apprise").debug("a debug line of apprise is never shown")
    finally:
        configure_logging("WARNING", "console")
    err = capfd.readouterr().err
    assert "SEKRET" not in err and err.count("***") == 3 and "never shown" not in err


def test_an_alert_channels_topic_and_chat_id_never_reach_the_log(capfd) -> None:
    """Apprise logs "Failed to send ntfy notification to topic 'X'" at WARNING: an ntfy topic is the host
    of `ntfy://X` (never hidden) or a plain word (not token-like), and it is the channel's whole key."""
    import logging

    from config import Settings
    from logs import configure_logging

    urls = (
        "ntfy://bobtopicsecret",
        "ntfys://ntfy.example.com/iwm-alerts-bob",
        "tgram://12345678:ABCdef/987654321",
    )
    configure_logging("DEBUG", "json", Settings(alert_fallback_urls=urls).secret_values())
    try:
        apprise = logging.getLogger("apprise")
        apprise.warning("Failed to send ntfy notification to topic 'bobtopicsecret'.")
        apprise.warning("Failed to send ntfy notification to topic 'iwm-alerts-bob'.")
        apprise.warning("Failed to send Telegram notification to 987654321: bot ABCdef refused")
        logging.getLogger("urllib3.connectionpool").debug('"POST /iwm-alerts-bob HTTP/1.1" 500')
    finally:
        configure_logging("WARNING", "console")
    err = capfd.readouterr().err
    assert (
        "bobtopic" not in err and "iwm-alerts" not in err and "987654321" not in err and "ABCdef" not in err
    )
    assert err.count("***") == 4 and "POST" not in err
    assert channel_secrets("ntfys://ntfy.example.com/t0picname") == {"t0picname"}, "the server's name stays"
    # A short word as a topic is not hidden: "status" hidden everywhere broke /health's keys.
    assert channel_secrets("ntfy://status") == channel_secrets("ntfys://ntfy.sh/trading") == set()


@contextmanager
def echo_server() -> Iterator[str]:
    """An HTTP peer that echoes the credentials it was sent, in its error bodies (GET 401, POST 400)."""

    class Handler(JsonHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self.send_reply(Reply(401, {"error": "x" * 180 + f" Bearer {self.path} was refused"}))

        def do_POST(self) -> None:  # noqa: N802
            form = self.rfile.read(int(self.headers["Content-Length"])).decode()
            self.send_reply(Reply(400, {"status": 0, "errors": [f"invalid: {form}"], "request": "r"}))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_diagnose_network_shows_no_key_a_peer_echoes(tmp_path) -> None:
    with echo_server() as url:
        env = {k: v for k, v in os.environ.items() if not k.endswith(("API_KEY", "TOKEN", "USER_KEY"))}
        env |= {
            "PYTHON_DOTENV_DISABLED": "1", "DATA_DIR": str(tmp_path / "data"), "POLYGON_API_KEY": KEY,
            "POLYGON_REST_URL": url, "POLYGON_WS_URL": url.replace("http", "ws"), "PUSHOVER_TOKEN": TOKEN,
            "PUSHOVER_USER_KEY": USER, "PUSHOVER_API_URL": f"{url}/1/messages.json",
        }  # fmt: skip
        done = subprocess.run([sys.executable, str(ROOT / "diagnose.py"), "--network"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    out = done.stdout + done.stderr
    assert "[FAIL] Polygon REST: HTTP 401" in out and "[FAIL] Pushover keys valid: HTTP 400" in out
    assert "SEKRET" not in out and "***" in out


def test_health_serves_no_secret_a_problem_text_carried_in() -> None:
    snapshot = {"status": "degraded", "problems": [f"stream not connected (closed 1008 key {KEY})"]}
    server = HealthServer("127.0.0.1", 0, lambda: snapshot, redact=Redactor.of([KEY])).start()
    try:
        body = httpx.get(f"http://127.0.0.1:{server.port}/health").text
    finally:
        server.stop()
    assert KEY not in body and json.loads(body)["problems"] == ["stream not connected (closed 1008 key ***)"]


def test_an_alert_quoting_a_peers_echo_reaches_the_phone_without_the_key(tmp_path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    text = f"Options quotes are not streaming (closed 1008 policy: key {KEY}). Marks come from REST."
    journal.record([Alert("FEED", "FEED:1", f"FEED {KEY}", text, 0, 1)])
    with FakePushover() as pushover:
        client = PushoverClient(TOKEN, USER, pushover.url)
        notifier = Notifier(journal, client, clock_ms=lambda: 2, redact=Redactor.of([KEY, TOKEN, USER]))
        assert notifier.drain_once() == 1
        (message,) = pushover.messages
    form = message.form
    assert form["title"] == "FEED ***" and "key ***)" in form["message"]
    assert KEY not in json.dumps({k: v for k, v in form.items() if k not in ("token", "user")})
    journal.close()


def test_a_history_fetch_error_and_its_cache_keep_no_echoed_key(tmp_path) -> None:
    from history import CachedAnswer, FetchError, HistoryClient

    class EchoingRest:
        def __init__(self, status: int) -> None:
            self.status = status

        def get(self, path: str) -> CachedAnswer:
            body = {"error": f"key {KEY} refused"} if self.status != 200 else {"results": [], "note": KEY}
            return CachedAnswer(path, self.status, body)

    redact = Redactor.of([KEY])
    try:
        HistoryClient(EchoingRest(401), tmp_path, redact).pages("/v2/aggs/x")
    except FetchError as exc:
        refused = str(exc)
    assert refused == "/v2/aggs/x: HTTP 401 key *** refused"
    HistoryClient(EchoingRest(200), tmp_path, redact).pages("/v2/aggs/y")
    import gzip

    cached = [gzip.decompress(f.read_bytes()).decode() for f in tmp_path.iterdir()]
    assert len(cached) == 1 and "***" in cached[0] and KEY not in cached[0]
