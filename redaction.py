"""Secrets out of every text that leaves the process: log lines, /health, --status, alerts, diagnose.

Peers echo what they were sent (a WebSocket close reason, a REST error body, a Pushover 400 naming the
token), and such text travels far: into `last_error`, /health problems, FEED alerts, the journal. So
the secrets are taken out where text leaves, whatever path it took, not at each place it was made.

A `Redactor` knows the secret values (the API keys and tokens) and the secret parts of secret URLs
(the heartbeat URL, fallback URLs: their password and their long, token-like path segments and query
values). It also hides a secret cut short at the end of a text (an error cut to 200 characters
before anyone redacted it), which plain replacement would let through.

Peer text can also be text no file or socket can carry: JSON's `"\\ud800"` escape decodes to a lone surrogate,
which every UTF-8 encoder (SQLite, httpx's form, a log stream) refuses. `valid_text` makes such text
writable, and every redaction applies it first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

REDACTED = "***"
# Shorter values are not hidden: a one-letter test key would blank every such letter of every line.
MIN_SECRET_CHARS = 4
# A URL's path segment or query value is a token when it is this long and holds a digit, or twice as long.
MIN_TOKEN_CHARS = 8
# A text ending in at least this much of a secret's start (and perhaps "..."): a secret cut short.
MIN_CUT_CHARS = 4
_ELLIPSES = ("...", "…")
# A query parameter whose name holds one of these carries a credential, whatever its value looks like.
_CREDENTIAL_WORDS = ("key", "token", "secret", "pass", "auth", "sig", "pw")


def url_secrets(value: str) -> set[str]:
    """The secret parts of a URL-like value: its password, a token where its port would be (Apprise's
    `tgram://bot_id:token`), and its token-like user name, path segments and query values (nothing for
    a value without `://` or one that does not parse)."""
    if "://" not in value:
        return set()
    try:
        parts = urlsplit(value)
        query = parse_qsl(parts.query, keep_blank_values=False)
    except ValueError:
        return set()
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    _host, _, port = hostport.partition(":")
    found = {password, unquote(password)} if password else set()
    if port and not port.isdigit():
        found.add(port)
    pieces = [unquote(user)] + [unquote(segment) for segment in parts.path.split("/")]
    found.update(piece for piece in pieces + [v for _k, v in query] if _token_like(piece))
    found.update(v for k, v in query if any(word in k.lower() for word in _CREDENTIAL_WORDS))
    return {secret for secret in found if len(secret) >= MIN_SECRET_CHARS}


# An alert channel's part this long is hidden whatever its shape. Shorter ones are not: a topic `status` or
# `trading` hidden everywhere took the words (and /health's keys) out of every text that leaves.
MIN_CHANNEL_CHARS = 8


def channel_secrets(value: str) -> set[str]:
    """An alert channel's URL (Apprise's: `ntfy://TOPIC`, `tgram://BOT_TOKEN/CHAT_ID`) is a credential in
    every part, whatever its shape: whoever holds a topic or a chat id reads the alerts and can post false
    ones. Its parts beyond `url_secrets`, of MIN_CHANNEL_CHARS or more: its user, a host that names no
    server (no dot, not localhost, not an IP address) and every path segment."""
    if "://" not in value:
        return set()
    try:
        parts = urlsplit(value)
    except ValueError:
        return set()
    userinfo, _, hostport = parts.netloc.rpartition("@")
    host = hostport.partition(":")[0]
    found = url_secrets(value) | {unquote(userinfo.partition(":")[0])}
    if "." not in host and host.lower() != "localhost" and not host.startswith("["):
        found.add(unquote(host))
    found.update(unquote(segment) for segment in parts.path.split("/"))
    return {secret for secret in found if len(secret) >= MIN_CHANNEL_CHARS} | url_secrets(value)


def _token_like(piece: str) -> bool:
    long_enough = len(piece) >= MIN_TOKEN_CHARS
    return (long_enough and any(c.isdigit() for c in piece)) or len(piece) >= 2 * MIN_TOKEN_CHARS


def valid_text(text: str) -> str:
    """`text` with each lone surrogate (undecodable peer text) replaced by U+FFFD; other text unchanged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


@dataclass(frozen=True, slots=True)
class Redactor:
    """Replaces known secrets in text with `***`; calling it on text without one returns it unchanged."""

    secrets: tuple[str, ...] = ()

    @classmethod
    def of(cls, values: Iterable[str]) -> Redactor:
        """A redactor of `values` (empty ones skipped) and of the secret parts of those that are URLs."""
        found: set[str] = set()
        for value in values:
            if value and len(value) >= MIN_SECRET_CHARS:
                found.add(value)
                found.update(url_secrets(value))
        # As a JSON line spells them: a secret with a control character or a quote was written escaped
        # (`\u0007`) by the JSON renderer, and went out whole past the plain form.
        found.update({escaped for secret in found if (escaped := json.dumps(secret)[1:-1]) != secret})
        # Longest first, so a URL goes whole before its own parts are looked for.
        return cls(tuple(sorted(found, key=lambda s: (-len(s), s))))

    def __call__(self, text: str) -> str:
        """`text` without any secret, whole or cut short at its end (and writable: `valid_text`)."""
        text = valid_text(text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return self._without_cut_tail(text) if self.secrets else text

    def _without_cut_tail(self, text: str) -> str:
        """`text` with a secret's start that runs into "..." (or the text's end) hidden."""
        ends = [len(text)] + [i for e in _ELLIPSES for i in _occurrences(text, e)]
        for end in sorted(set(ends), reverse=True):  # from the back, so earlier indexes stay valid
            cut = self._cut_secret_before(text, end)
            if cut:
                text = text[: end - cut] + REDACTED + text[end:]
        return text

    def _cut_secret_before(self, text: str, end: int) -> int:
        """How many characters before `end` are the start of a secret (at least MIN_CUT_CHARS), or 0."""
        tail = text[max(0, end - MIN_CUT_CHARS) : end]
        if len(tail) < MIN_CUT_CHARS:
            return 0
        for secret in self.secrets:
            if tail not in secret:
                continue
            for cut in range(len(secret) - 1, MIN_CUT_CHARS - 1, -1):
                if text.startswith(secret[:cut], end - cut):
                    return cut
        return 0


def _occurrences(text: str, needle: str) -> list[int]:
    found, at = [], text.find(needle)
    while at != -1:
        found.append(at)
        at = text.find(needle, at + len(needle))
    return found
