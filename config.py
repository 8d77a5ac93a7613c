"""Settings from the environment and `.env`, validated all at once.

`Rules` holds every trading parameter of DESIGN section 4 (the pure core needs only these);
`Settings` adds the I/O side of section 5. Each field's environment variable is its name in
upper case. A bad value never starts the daemon: `load_settings` raises `ConfigError`
naming every bad variable, its (masked) value and what is expected.
"""

from __future__ import annotations

import difflib
import io
import ipaddress
import logging
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import date, time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv_file import DotenvFile
from redaction import Redactor, channel_secrets, url_secrets

SECRET_NAMES = frozenset(
    {"POLYGON_API_KEY", "PUSHOVER_TOKEN", "PUSHOVER_USER_KEY", "HEARTBEAT_URL", "ALERT_FALLBACK_URLS"}
)

OPEN, CLOSE = time(9, 30), time(16, 0)  # the regular session, New York time
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TICKER = re.compile(r"[A-Z.]{1,10}")
# ASCII digits only: int() and float() also take other scripts' digits (`١٠`) and underscores (`1_000`).
KEY_MAX_CHARS = 256
# Printable ASCII without spaces, quotes or backslashes: what a pasted key can hold.
KEY_TEXT = re.compile(rf"[!#-&(-\[\]-_a-~]{{1,{KEY_MAX_CHARS}}}")
WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
DECIMAL_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# Variables that no field is named after but that the loader reads all the same.
EXTRA_NAMES = frozenset({"MASSIVE_API_KEY"})
MIN_SHOWN_SECRET = 8  # a secret value shorter than this is not looked for inside other values
# Names under DATA_DIR that several commands share. They live here, not with the code that acts on
# them, so that a short command (`--status`, `--pause`) need not import the daemon (httpx, websockets).
PAUSE_FILE = "PAUSE"  # present: the running daemon takes no new entries
CALENDAR_CACHE_DIR = "calendar"  # market_calendar's per-year session tables


def _num(default: float, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"lo": lo, "hi": hi})


@dataclass(frozen=True, slots=True)
class Rules:
    """Trading parameters (DESIGN section 4). Defaults are the documented ones."""

    vwap_window_seconds: int = _num(60, 1, 3600)
    vwap_rising_seconds: int = _num(30, 1, 3600)
    vwap_rising_min_points: int = _num(10, 2, 3600)
    volume_percentile: float = _num(95.0, 0, 100)
    volume_window_seconds: int = _num(1200, 1, 23400)
    volume_min_bars: int = _num(60, 1, 23400)
    momentum_window_seconds: int = _num(30, 2, 3600)
    momentum_min_pct_per_sec: float = _num(0.0, -100, 100)
    no_entry_before: time = time(9, 35)
    no_entry_after: time = time(15, 30)
    chain_max_age_seconds: float = _num(60.0, 0, 86400)
    cooldown_seconds: float = _num(60.0, 0, 86400)
    delta_min: float = _num(0.30, 0, 1)
    delta_max: float = _num(0.45, 0, 1)
    max_spread_percent: float = _num(4.0, 0, 1000)
    min_option_volume: float = _num(100.0, 0, None)
    min_open_interest: float = _num(100.0, 0, None)
    min_nbbo_size: float = _num(10.0, 0, None)
    max_quote_age_seconds: float = _num(30.0, 0, 86400)
    position_poll_seconds: float = _num(2.0, 0.2, 3600)
    hard_time_stop: time = time(15, 55)
    stop_loss_percent: float = _num(15.0, 0, 100)
    max_giveback_percent: float = _num(30.0, 0, 100)
    tighten_giveback_percent: float = _num(20.0, 0, 100)
    vwap_exit_blocks: int = _num(2, 1, 1000)
    vwap_block_seconds: int = _num(30, 1, 3600)
    contracts: int = _num(1, 1, 10000)
    critical_loss_threshold: float = _num(-500.0, None, 0)  # a loss: +500 alerted after every win
    leadership_window_seconds: int = _num(300, 1, 23400)
    spy_iwm_lag_threshold: float = _num(0.20, 0, None)
    relative_volume_window_seconds: int = _num(60, 1, 3600)
    volume_profile_days: int = _num(10, 1, 60)
    relative_volume_min: float = _num(1.5, 0, None)
    relative_volume_required: bool = False
    max_trades_per_day: int = _num(4, 0, 1000)
    max_consecutive_losses: int = _num(2, 0, 1000)
    daily_loss_limit: float = _num(300.0, 0, None)
    entry_blackouts: tuple[tuple[time, time], ...] = ()
    stall_seconds: float = _num(5.0, 1, 3600)
    stall_alert_seconds: float = _num(30.0, 1, 86400)
    underlying: str = "IWM"
    benchmark: str = "SPY"
    # Not a trading rule, but the engine decides the close's SUMMARY alert, and every engine (live,
    # replay, demo) is built from Rules: here it reaches them all without new wiring. 0 opts out.
    daily_summary: bool = True


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon reads from its environment. Secrets are masked in `repr`."""

    rules: Rules = field(default_factory=Rules)
    polygon_api_key: str = field(default="", repr=False)
    polygon_ws_url: str = "wss://socket.massive.com/stocks"
    polygon_rest_url: str = "https://api.massive.com"
    polygon_options_ws_url: str = ""
    options_stream: str = "auto"
    pushover_token: str = field(default="", repr=False)
    pushover_user_key: str = field(default="", repr=False)
    pushover_api_url: str = "https://api.pushover.net/1/messages.json"
    data_dir: Path = Path("./data")
    record: bool = True
    record_retention_days: int = _num(20, 0, 100000)
    chain_poll_seconds: float = _num(10.0, 0.2, 3600)
    health_port: int | None = None
    health_host: str = "127.0.0.1"
    heartbeat_url: str = field(default="", repr=False)
    watchdog_seconds: float = _num(60.0, 5, 86400)
    log_level: str = "INFO"
    log_format: str = ""
    sim_clock_start: str = ""
    sim_clock_speed: float = _num(1.0, 0.01, 100000)
    market_closed_dates: tuple[date, ...] = ()
    stream_silence_seconds: float = _num(15.0, 1, 3600)
    alert_fallback_urls: tuple[str, ...] = field(default=(), repr=False)
    # Pushover priority (-2..2) and sound per alert kind; defaults mirror alert_text.DEFAULT_DELIVERY.
    # A sound is one of alert_text.PUSHOVER_SOUNDS ("none" = silent) or empty for the phone's default.
    alert_priority_buy: int = _num(1, -2, 2)
    alert_sound_buy: str = "cashregister"
    alert_priority_sell: int = _num(1, -2, 2)
    alert_sound_sell: str = "siren"
    alert_priority_start: int = _num(0, -2, 2)
    alert_sound_start: str = ""
    alert_priority_stall: int = _num(0, -2, 2)
    alert_sound_stall: str = ""
    alert_priority_recovered: int = _num(0, -2, 2)
    alert_sound_recovered: str = ""
    alert_priority_feed_error: int = _num(0, -2, 2)
    alert_sound_feed_error: str = ""
    alert_priority_critical_loss: int = _num(2, -2, 2)
    alert_sound_critical_loss: str = "persistent"
    alert_priority_summary: int = _num(0, -2, 2)
    alert_sound_summary: str = ""

    def secret_values(self) -> tuple[str, ...]:
        """Every value no output may show: the keys, the secret URLs, and credentials inside endpoint
        URLs (for `redaction.Redactor`: the endpoints themselves stay readable in logs)."""
        keys = (self.polygon_api_key, self.pushover_token, self.pushover_user_key, self.heartbeat_url)
        in_endpoints = (part for name in ENDPOINT_SCHEMES for part in url_secrets(getattr(self, name)))
        in_channels = (part for url in self.alert_fallback_urls for part in sorted(channel_secrets(url)))
        return tuple(v for v in (*keys, *self.alert_fallback_urls, *in_endpoints, *in_channels) if v)

    def redactor(self) -> Redactor:
        """What takes these settings' secrets out of a text before it leaves the process."""
        return Redactor.of(self.secret_values())

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        secrets = {
            name: mask(getattr(self, name))
            for name in ("polygon_api_key", "pushover_token", "pushover_user_key", "heartbeat_url")
        }
        secrets["alert_fallback_urls"] = tuple(mask(url) for url in self.alert_fallback_urls)
        # A URL may carry credentials (user:password@, ?token=): shown redacted, like the keys.
        endpoints = {name: _redacted_url(getattr(self, name)) for name in ENDPOINT_SCHEMES if name in shown}
        return f"Settings({shown | endpoints | secrets})"


class ConfigError(ValueError):
    """Raised with one line per bad variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def mask(secret: str) -> str:
    """Show only enough of a secret to tell two apart: `abcd…(32 chars)`."""
    if not secret:
        return "(unset)"
    if len(secret) <= 8:
        return "****"
    return f"{secret[:4]}…({len(secret)} chars)"


# A word shaped like an API key or token: 16 or more letters and digits (both), no separator a number,
# time, path or URL would have. In a problem line it is masked: most likely a key on the wrong line.
_KEY_SHAPED_WORD = re.compile(
    r"(?<![A-Za-z0-9_-])(?=[A-Za-z_-]*[0-9])(?=[0-9_-]*[A-Za-z])[A-Za-z0-9_-]{16,}(?![A-Za-z0-9_-])"
)


def _shown(name: str, raw: str) -> str:
    return mask(raw) if name in SECRET_NAMES else repr(raw)


def parse_clock(raw: str) -> time:
    """Parse `HH:MM` (or `HH:MM:SS`) New York wall-clock time."""
    match = re.fullmatch(r"([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?", raw.strip())
    if not match:
        raise ValueError("expected HH:MM")
    hour, minute, second = (int(g) if g else 0 for g in match.groups())
    return time(hour, minute, second)


def parse_blackouts(raw: str) -> tuple[tuple[time, time], ...]:
    """Parse `11:30-13:30,15:00-15:10` into ordered (start, end) pairs."""
    spans = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        start_raw, sep, end_raw = part.partition("-")
        if not sep:
            raise ValueError("expected HH:MM-HH:MM[,HH:MM-HH:MM...]")
        start, end = parse_clock(start_raw), parse_clock(end_raw)
        if end <= start:
            raise ValueError(f"window {part!r} ends before it starts")
        spans.append((start, end))
    return tuple(spans)


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected 1/0, true/false, yes/no")


def parse_urls(raw: str) -> tuple[str, ...]:
    """Comma-separated URLs (Apprise notation such as `ntfy://topic`, `tgram://bot/chat`)."""
    urls = tuple(p.strip() for p in raw.split(",") if p.strip())
    for url in urls:
        if "://" not in url:
            raise ValueError("expected comma-separated URLs such as ntfy://topic or mailto://user:pass@host")
        if _has_space_or_control(url):
            raise ValueError("expected URLs without spaces or control characters (a stray newline or \\r?)")
    return urls


def parse_dates(raw: str) -> tuple[date, ...]:
    try:
        return tuple(date.fromisoformat(p.strip()) for p in raw.split(",") if p.strip())
    except ValueError:
        raise ValueError(
            "expected dates as YYYY-MM-DD, comma-separated (e.g. 2025-11-27,2025-12-25)"
        ) from None


def _parse_number(raw: str, kind: type, lo: float | None, hi: float | None) -> float | int:
    expected = "expected a whole number" if kind is int else "expected a number"
    if not (WHOLE_NUMBER if kind is int else DECIMAL_NUMBER).fullmatch(raw):
        foreign = any(c == "_" or (c.isdigit() and not c.isascii()) for c in raw)
        raise ValueError(f"{expected} in digits 0-9, without underscores" if foreign else expected)
    try:
        value = int(raw) if kind is int else float(raw)
    except ValueError:  # more digits than int() converts
        raise ValueError(expected) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("expected a finite number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"expected {_range_text(lo, hi)}")
    return value


def _range_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"a number between {lo:g} and {hi:g}"
    return f"a number at least {lo:g}" if lo is not None else f"a number at most {hi:g}"


def _optional_int(raw: str) -> int | None:
    """A whole number, or None for an empty value."""
    return _parse_number(raw.strip(), int, None, None) if raw.strip() else None  # type: ignore[return-value]


# The longest file name and path Linux opens (NAME_MAX, PATH_MAX): a longer DATA_DIR raised ENAMETOOLONG
# from the first `exists()` of every command, a traceback.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095


def _refuse_pasted_path(text: str) -> None:
    """Quotes around a path, or an invisible character in it, come from pasting (a dashboard keeps the
    quotes a .env would strip): `"/var/data"` was taken as a folder named with its quotes under the working
    folder, which a deploy wipes, and the lifetime P&L and an open position went with it (an audit's find)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        raise ValueError(f"expected a folder path without quotes around it: {text[1:-1]}")
    invisible = sorted(
        {f"U+{ord(char):04X}" for char in text if unicodedata.category(char) in ("Cf", "Zl", "Zp")}
    )
    if invisible or any(unicodedata.category(char) == "Zs" and char != " " for char in text):
        found = ", ".join(invisible) or "a space that is not a plain one"
        raise ValueError(
            f"expected a folder path; this one holds an invisible character ({found}), pasted with it"
        )


def _folder_path(raw: str) -> Path:
    """A path as given; an empty value is refused (Path("") is the current folder, not the default)."""
    if not raw.strip():
        raise ValueError("expected a folder path, not an empty value (leave it unset for the default ./data)")
    if any(ord(char) < 32 for char in raw.strip()):
        raise ValueError(
            "expected a folder path; this one holds a control character (a NUL, a tab, a newline)"
        )
    _refuse_pasted_path(raw.strip())
    # `~` is the shell's: a .env or a service's settings pass it as is, and a folder named `~` was made.
    path = Path(raw.strip()).expanduser()
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > MAX_NAME_BYTES or len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise ValueError(
            f"expected a folder path the system can open: names of at most {MAX_NAME_BYTES} bytes, "
            f"{MAX_PATH_BYTES} in all"
        )
    return path


def _parse_value(annotation: str, raw: str, meta: Mapping[str, Any]) -> Any:
    parsers: dict[str, Any] = {
        "time": parse_clock,
        "bool": parse_bool,
        "str": str.strip,
        "Path": _folder_path,
        "tuple[tuple[time, time], ...]": parse_blackouts,
        "tuple[date, ...]": parse_dates,
        "tuple[str, ...]": parse_urls,
        "int | None": _optional_int,
    }
    if annotation in ("int", "float"):
        kind = int if annotation == "int" else float
        return _parse_number(raw.strip(), kind, meta.get("lo"), meta.get("hi"))
    return parsers[annotation](raw)


def _read_fields(cls: type, env: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name == "rules":
            continue
        name = f.name.upper()
        if name not in env or (str(f.type) == "bool" and not env[name].strip()):
            continue  # a blank switch (`RECORD=` in .env) is its default, as in .env.example; never "off"
        try:
            values[f.name] = _parse_value(str(f.type), env[name], f.metadata)
        except (ValueError, KeyError) as exc:
            problems.append(f"{name}={_shown(name, env[name])}: {exc}")
    return values


def _normalised(values: dict[str, Any]) -> dict[str, Any]:
    """Case-fold the values whose case carries no meaning: tickers and log levels upper, log format and
    the options stream's switch lower."""
    for name in ("underlying", "benchmark", "log_level"):
        if name in values:
            values[name] = values[name].upper()
    for name in ("log_format", "options_stream"):
        if name in values:
            values[name] = values[name].lower()
    return values


def _hhmm(value: time) -> str:
    """HH:MM (HH:MM:SS when it has seconds), as the user wrote it."""
    return value.isoformat(timespec="seconds" if value.second else "minutes")


def _time_checks(rules: Rules) -> list[str]:
    """The entry window and the time stop must fit, in order, inside the regular session."""
    first, last, stop_at = rules.no_entry_before, rules.no_entry_after, rules.hard_time_stop
    before, after, stop = _hhmm(first), _hhmm(last), _hhmm(stop_at)
    opens, closes = "(the market opens 09:30)", "(the market closes 16:00)"
    checks = [
        (first < OPEN, f"NO_ENTRY_BEFORE={before}: expected 09:30 or later {opens}"),
        (first >= last, f"NO_ENTRY_BEFORE={before}: expected earlier than NO_ENTRY_AFTER={after}"),
        (last > CLOSE, f"NO_ENTRY_AFTER={after}: expected 16:00 or earlier {closes}"),
        (last > stop_at, f"NO_ENTRY_AFTER={after}: expected no later than HARD_TIME_STOP={stop}"),
        (stop_at <= OPEN, f"HARD_TIME_STOP={stop}: expected later than 09:30 {opens}"),
        (stop_at > CLOSE, f"HARD_TIME_STOP={stop}: expected 16:00 or earlier {closes}"),
        (stop_at <= first, f"HARD_TIME_STOP={stop}: expected later than NO_ENTRY_BEFORE={before}"),
    ]
    return [message for failed, message in checks if failed]


def _symbol_checks(rules: Rules) -> list[str]:
    """Tickers are upper-cased on reading; here they must look like one and name two instruments."""
    problems = [
        f"{name}={value!r}: expected a ticker of 1-10 letters or dots, such as {example}"
        for name, value, example in (
            ("UNDERLYING", rules.underlying, "IWM"),
            ("BENCHMARK", rules.benchmark, "SPY"),
        )
        if not TICKER.fullmatch(value)
    ]
    if rules.underlying and rules.underlying == rules.benchmark:
        problems.append(
            f"BENCHMARK={rules.benchmark!r}: expected a different ticker from UNDERLYING={rules.underlying!r}"
            " (the leadership filter compares the two)"
        )
    return problems


def _logging_checks(settings: Settings) -> list[str]:
    problems = []
    if settings.log_level not in LOG_LEVELS:
        expected = f"expected one of {', '.join(LOG_LEVELS)} (any case)"
        problems.append(f"LOG_LEVEL={settings.log_level!r}: {expected}")
    if settings.log_format not in ("", "console", "json"):
        problems.append(f"LOG_FORMAT={settings.log_format!r}: expected console or json (or empty: console on a"
                        " terminal, json otherwise)")  # fmt: skip
    if settings.options_stream not in ("auto", "off"):
        problems.append(f"OPTIONS_STREAM={settings.options_stream!r}: expected auto or off")
    return problems


def _window_checks(rules: Rules) -> list[str]:
    """Windows too short for the points they must hold: with one bar a second the entry could never fire."""
    problems = []
    rising, points = rules.vwap_rising_seconds, rules.vwap_rising_min_points
    if points > rising:
        # The slope window (now - VWAP_RISING_SECONDS, now] holds at most one VWAP point per second.
        problems.append(
            f"VWAP_RISING_MIN_POINTS={points} > VWAP_RISING_SECONDS={rising}: the slope window holds at most"
            f" {rising} points (one a second), so VWAP is never rising and no entry can fire"
        )
    window, bars = rules.volume_window_seconds, rules.volume_min_bars
    if bars >= window:
        # The surge compares a bar with the bars before it in (now - VOLUME_WINDOW_SECONDS, now): one fewer.
        problems.append(
            f"VOLUME_MIN_BARS={bars} >= VOLUME_WINDOW_SECONDS={window}: the window holds at most {window - 1}"
            " earlier bars (one a second), so no volume surge and no entry can fire"
        )
    return problems


def _zero_checks(rules: Rules) -> list[str]:
    """Zeros that read like "off" (as 0 is for the protections) but make every trade sell at its first
    check, or keep every entry from firing."""
    problems = []
    if rules.stop_loss_percent == 0:
        problems.append(
            "STOP_LOSS_PERCENT=0 sells every trade at its first check (the mid is at or below the ask paid);"
            " 100 is the widest stop"
        )
    if rules.max_giveback_percent == 0:
        problems.append(
            "MAX_GIVEBACK_PERCENT=0 sells every trade at its first check; 100 is the widest giveback"
        )
    for name, seconds in (
        ("CHAIN_MAX_AGE_SECONDS", rules.chain_max_age_seconds),
        ("MAX_QUOTE_AGE_SECONDS", rules.max_quote_age_seconds),
    ):
        if seconds == 0:
            problems.append(
                f"{name}=0: no chain or quote is ever that fresh at a signal, so no entry can fire"
            )
    return problems


def _key_checks(settings: Settings, key_name: str) -> list[str]:
    """The keys' shapes, reported under `key_name`: the variable the market data key was read from.

    Only what no key can be is refused (a space, a quote, a control or non-ASCII character, more than
    KEY_MAX_CHARS): the services themselves judge the rest, and the daemon reports their refusal
    (FEED ERROR for Polygon, a disabled notifier for Pushover) without stopping.
    """
    named = (
        ("PUSHOVER_TOKEN", settings.pushover_token),
        ("PUSHOVER_USER_KEY", settings.pushover_user_key),
        (key_name, settings.polygon_api_key),
    )
    return [
        f"{name}={mask(value)}: malformed key (expected up to {KEY_MAX_CHARS} printable ASCII characters,"
        " no spaces or quotes)"
        for name, value in named
        if value and not KEY_TEXT.fullmatch(value)
    ]


# The shape of the keys Pushover issues (its API docs): an application token and a user or group key are each
# 30 letters and digits. Another shape is only warned about: fakes and test plans use shorter keys.
PUSHOVER_KEY_SHAPE = re.compile(r"[A-Za-z0-9]{30}")


def pushover_key_warnings(settings: Settings) -> list[str]:
    """One warning per Pushover key not of the shape Pushover issues: a typo Pushover will refuse."""
    named = (("PUSHOVER_TOKEN", settings.pushover_token), ("PUSHOVER_USER_KEY", settings.pushover_user_key))
    return [
        f"{name}={mask(value)} is not 30 letters and digits, the shape of every key Pushover issues: "
        "Pushover will likely refuse it, and alerts then go by ALERT_FALLBACK_URLS or to the log only"
        for name, value in named
        if value and not PUSHOVER_KEY_SHAPE.fullmatch(value)
    ]


def _health_host_problem(host: str) -> str | None:
    """HEALTH_HOST must be an address the health server can bind: IPv4 (it listens on IPv4 only) or localhost."""
    expected = "expected an IPv4 address such as 127.0.0.1 (0.0.0.0 for every interface) or localhost"
    if host.lower() == "localhost":
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"HEALTH_HOST={host!r}: {expected}"
    if address.version != 4:
        return f"HEALTH_HOST={host!r}: {expected}; the health server listens on IPv4 only"
    return None


def apprise_channels(urls: Sequence[str]) -> list[tuple[str, Any]]:
    """Each fallback URL with its Apprise channel, or None when Apprise cannot use it: it refuses it, or
    takes it while warning that a part of it is ignored (an ntfy topic with a `!`: a channel that
    delivers nothing). Apprise's own lines are held back meanwhile: they quote the URL, and logging may
    not be set up yet."""
    import apprise  # only when a fallback is configured: it loads many plugins

    logger = logging.getLogger("apprise")
    heard = _Heard(logging.WARNING)
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(heard)
    try:
        channels: list[tuple[str, Any]] = []
        for url in urls:
            heard.count = 0
            channel = apprise.Apprise()
            usable = channel.add(url) and not heard.count
            channels.append((url, channel if usable else None))
        return channels
    finally:
        logger.removeHandler(heard)
        logger.propagate = propagate


class _Heard(logging.Handler):
    """Counts the records it is given, and writes none."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def _pushover_pair_checks(settings: Settings, said: list[str]) -> list[str]:
    """One Pushover key without the other is a mistake (an unclosed quote in .env swallows the next
    line), not a choice: it had started with every alert going to the log only, said in one log line.
    Not said of a key whose own value is already a problem in `said` (one problem per variable)."""
    keys = {"PUSHOVER_TOKEN": settings.pushover_token, "PUSHOVER_USER_KEY": settings.pushover_user_key}
    missing = [name for name, value in keys.items() if not value]
    if len(missing) != 1:
        return []
    given = next(name for name in keys if name not in missing)
    if any(problem.startswith(f"{given}=") for problem in said):
        return []
    return [f"{given} is set but {missing[0]} is not: set both, or neither (alerts then go to the log only)"]


def _fallback_checks(urls: Sequence[str]) -> list[str]:
    refused = [url for url, channel in apprise_channels(urls) if channel is None] if urls else []
    if not refused:
        return []
    shown = ", ".join(mask(url) for url in refused)
    return [f"ALERT_FALLBACK_URLS={shown}: Apprise cannot use it (it refuses the URL, or ignores part of it)"]


def _cross_checks(rules: Rules, settings: Settings, key_name: str = "POLYGON_API_KEY") -> list[str]:
    problems = _time_checks(rules) + _symbol_checks(rules) + _window_checks(rules) + _zero_checks(rules)
    problems += _logging_checks(settings)
    if rules.delta_min > rules.delta_max:
        problems.append(
            f"DELTA_MIN={rules.delta_min} > DELTA_MAX={rules.delta_max}: the band must be min <= max"
        )
    if rules.tighten_giveback_percent > rules.max_giveback_percent:
        tighten, most = rules.tighten_giveback_percent, rules.max_giveback_percent
        problems.append(
            f"TIGHTEN_GIVEBACK_PERCENT must not exceed MAX_GIVEBACK_PERCENT ({tighten:g} > {most:g})"
        )
    problems += _key_checks(settings, key_name)
    problems += _pushover_pair_checks(settings, problems)
    problems += _fallback_checks(settings.alert_fallback_urls)
    if settings.health_port is not None and not 0 <= settings.health_port <= 65535:
        problems.append(f"HEALTH_PORT={settings.health_port}: expected a port 0-65535")
    host_problem = _health_host_problem(settings.health_host)
    problems += [host_problem] if host_problem else []
    problems += _endpoint_checks(settings) + _sim_clock_checks(settings)
    from alert_text import delivery_overrides, delivery_problems  # alert_text imports config

    problems += delivery_problems(delivery_overrides(settings))
    return problems


# Each endpoint setting and the URL schemes it can use ("" allowed where the setting is optional).
ENDPOINT_SCHEMES = {
    "polygon_ws_url": ("wss", "ws"),
    "polygon_rest_url": ("https", "http"),
    "polygon_options_ws_url": ("wss", "ws", ""),
    "pushover_api_url": ("https", "http"),
    "heartbeat_url": ("https", "http", ""),
}


def _endpoint_checks(settings: Settings) -> list[str]:
    """Every endpoint is a URL of a scheme it can use, with a host and a valid port (credentials masked)."""
    problems = []
    for name, schemes in ENDPOINT_SCHEMES.items():
        value = getattr(settings, name)
        if not value and "" in schemes:
            continue
        problem = _endpoint_problem(value, schemes)
        if problem is not None:
            # The whole heartbeat URL is the secret (a ping UUID in its path); elsewhere only the credentials.
            shown = mask(value) if name == "heartbeat_url" else repr(_redacted_url(value))
            problems.append(f"{name.upper()}={shown}: {problem}")
    return problems


def _endpoint_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """What is wrong with one endpoint URL, or None. The text never quotes the value: it may hold a password."""
    wanted = " or ".join(f"{scheme}://" for scheme in schemes if scheme)
    expected = f"expected a URL starting with {wanted}, with a host"
    if _has_space_or_control(value):
        # httpx refuses a control character with a traceback at start; a space fails every request.
        return f"{expected}, and no space or control character (a stray newline or \\r from an editor?)"
    try:
        parts = urlsplit(value)
    except ValueError:  # an unbalanced [ or ] around the host, or a host that is not an address in []
        return f"{expected} (this one cannot be parsed: check the [ ] around an IPv6 host)"
    if parts.scheme not in schemes or not parts.hostname:
        return expected
    try:
        port = parts.port
    except ValueError:  # not a number, or outside 0-65535 (httpx would wrap it round to another port)
        port = -1
    if port is not None and not 1 <= port <= 65535:
        return "expected a port from 1 to 65535 after the host (or none, for the scheme's default)"
    return None


def _has_space_or_control(value: str) -> bool:
    """Whether a URL holds whitespace or a control character (none belongs in one unescaped)."""
    return any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in value)


def _redacted_url(value: str) -> str:
    """The URL with its user:password and its query and fragment values replaced by `****`.

    Works on the text rather than on `urlsplit`, which refuses some malformed URLs and splits others at a
    `?`, `#` or `/` inside a password; everything up to the last `@` is taken as userinfo.
    """
    head, at, tail = value.rpartition("@")
    if at:
        scheme, sep, _ = head.partition("://")
        value = f"{scheme}{sep}****@{tail}" if sep else f"****@{tail}"
    rest, hash_mark, fragment = value.partition("#")
    base, question, query = rest.partition("?")
    masked = "&".join(
        f"{part.partition('=')[0]}=****" if "=" in part else "****" for part in query.split("&") if part
    )
    return f"{base}{question}{masked}{hash_mark}{'****' if fragment else ''}"


def _sim_clock_checks(settings: Settings) -> list[str]:
    if not settings.sim_clock_start:
        return []
    from clock import parse_instant

    try:
        at_ms = parse_instant(settings.sim_clock_start)
    except (ValueError, OverflowError):
        return [f"SIM_CLOCK_START={settings.sim_clock_start!r}: expected an instant with its UTC offset,"
                " e.g. 2025-10-02T09:25:00-04:00"]  # fmt: skip
    if not 0 <= at_ms < SIM_CLOCK_END_MS:
        # Year 1 or 9999 passed, then every date sum of the session code overflowed (a traceback).
        return [f"SIM_CLOCK_START={settings.sim_clock_start!r}: expected an instant from 1970 to 2099"]
    return []


SIM_CLOCK_END_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z


def data_dir_problem(data_dir: Path) -> str | None:
    """Create DATA_DIR if missing; None when it is a folder this process can write, else what is wrong."""
    try:
        return _data_dir_problem(data_dir)
    except OSError as exc:  # a look at the path itself failed (a name too long, a folder not searchable)
        return f"DATA_DIR={str(data_dir)!r}: cannot be looked at ({exc.strerror or exc})"


def _data_dir_problem(data_dir: Path) -> str | None:
    if data_dir.exists() and not data_dir.is_dir():
        return f"DATA_DIR={str(data_dir)!r}: is a file, not a folder"
    if data_dir.is_symlink() and not data_dir.exists():
        # Not created at the link's target: a volume that is not mounted would lose the journal with
        # the container.
        target = os.readlink(data_dir)
        return (
            f"DATA_DIR={str(data_dir)!r}: is a symbolic link to {target!r}, which does not exist "
            "(a volume not mounted?)"
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"DATA_DIR={str(data_dir)!r}: cannot be created as a folder ({exc.strerror or exc})"
    if not os.access(data_dir, os.W_OK | os.X_OK):
        return unwritable_why(data_dir, os.statvfs(data_dir).f_flag)
    return None


def unwritable_why(data_dir: Path, mount_flags: int) -> str:
    """Why a DATA_DIR cannot be written, given its filesystem's `statvfs` flags: a read-only filesystem
    (what ext4 does to a failing disk, errors=remount-ro) is no permission to fix with chmod."""
    if mount_flags & os.ST_RDONLY:
        return (
            f"DATA_DIR={str(data_dir)!r}: is on a read-only filesystem (a failing disk remounted read-only, "
            "or a volume mounted read-only); the journal in it can be read, not written"
        )
    return f"DATA_DIR={str(data_dir)!r}: this user cannot write in it"


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Build `Settings` from a mapping; raise `ConfigError` listing every problem."""
    env = dict(env)
    key_name = "POLYGON_API_KEY"
    if not env.get("POLYGON_API_KEY") and env.get("MASSIVE_API_KEY"):
        env["POLYGON_API_KEY"] = env["MASSIVE_API_KEY"]
        key_name = "MASSIVE_API_KEY"  # a problem with the key names the variable the user set
    problems: list[str] = []
    rules = Rules(**_normalised(_read_fields(Rules, env, problems)))
    settings = Settings(rules=rules, **_normalised(_read_fields(Settings, env, problems)))
    problems += _cross_checks(rules, settings, key_name)
    if problems:
        raise ConfigError(_without_secrets(problems, env))
    return settings


def known_names() -> frozenset[str]:
    """Every variable a setting reads: the field names of `Rules` and `Settings` upper-cased, and the aliases."""
    names = {f.name.upper() for cls in (Rules, Settings) for f in fields(cls) if f.name != "rules"}
    return frozenset(names | EXTRA_NAMES)


def unknown_keys(env_file: str | Path | DotenvFile | None = ".env") -> list[str]:
    """One warning per key of `env_file` that no setting reads, naming the nearest known variable.

    Only the file is looked at: the process environment holds many unrelated variables. Never raises:
    a file that cannot be read or decoded is `load_settings`'s to report.
    """
    dotenv = read_dotenv(env_file, os.environ)
    if dotenv is None or dotenv.text is None:
        return []
    from dotenv.parser import parse_stream

    text = dotenv.text
    known = known_names()
    name = dotenv.path.name
    warnings = _unreadable_lines(dotenv.path, text)
    said: set[str] = set()
    set_on: dict[str, int] = {}  # a known key -> the line that set it first
    for binding in parse_stream(io.StringIO(text)):
        key = binding.key
        if key in known and binding.value is not None:
            first = set_on.setdefault(key, binding.original.line)
            if first != binding.original.line and key not in said:
                said.add(key)
                warnings.append(
                    f"warning: {name} sets {key} on line {first} and again on line {binding.original.line};"
                    " the last one is used"
                )
            continue
        if key is None or key in known or key in said or _undecodable(key) or _undecodable(binding.value):
            continue
        said.add(key)
        nearest = difflib.get_close_matches(key.upper(), sorted(known), n=1)
        if binding.value is None or not (nearest or _ENV_NAME.fullmatch(key)):
            # A key pasted on a line of its own reads as a NAME (`KEY==`, base64's padding, as NAME=value):
            # only a name shaped like a variable, or near one, is shown.
            warnings.append(
                f"warning: {name} line {binding.original.line} is not NAME=value; it is ignored"
                " (the line is not shown: it may hold a key)"
            )
            continue
        hint = f"; did you mean {nearest[0]}?" if nearest else " (see .env.example for every variable)"
        warnings.append(f"warning: {name} sets {key}, which no setting reads{hint}")
    return warnings


# What an environment variable's name looks like (upper case, as every setting's); a .env "name" of another
# shape, unless near a setting's (`log_level`), is a pasted value.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def dotenv_disabled(environ: Mapping[str, str]) -> bool:
    """Whether `PYTHON_DOTENV_DISABLED` (python-dotenv's own switch) says to read no `.env` file."""
    return environ.get("PYTHON_DOTENV_DISABLED", "").strip().lower() in ("1", "true", "t", "yes", "y")


def read_dotenv(env_file: str | Path | DotenvFile | None, environ: Mapping[str, str]) -> DotenvFile | None:
    """`env_file` read now (a `DotenvFile` is already read), or None when `.env` files are switched off.

    A command reads its `.env` once and passes the `DotenvFile` on: a named pipe gives its text once."""
    if env_file is None or dotenv_disabled(environ):
        return None
    return env_file if isinstance(env_file, DotenvFile) else DotenvFile.read(env_file)


def _undecodable(text: str | None) -> bool:
    """Whether `text` holds a byte `DotenvFile.read` could not decode."""
    return text is not None and any("\udc80" <= char <= "\udcff" for char in text)


def _unreadable_lines(env_file: Path, text: str) -> list[str]:
    """One warning per line of the file python-dotenv cannot parse (its text is not shown: it may hold a key)."""
    from dotenv.parser import parse_stream

    bad = [binding.original.line for binding in parse_stream(io.StringIO(text)) if binding.error]
    return [
        f"warning: {env_file.name} line {line} cannot be read (expected NAME=value); it is ignored"
        for line in bad
    ]


def _undecodable_lines(env_file: Path, text: str) -> list[str]:
    """One problem per setting of the file whose name or value is not UTF-8 (a comment's bytes do no harm).

    A problem, not a warning: the setting cannot be read as written, and falling back to its default
    would trade on a value the user did not choose. The value is never shown: it may hold a key.
    """
    if not _undecodable(text):
        return []
    from dotenv.parser import parse_stream

    problems = []
    for binding in parse_stream(io.StringIO(text)):
        if binding.key is None or not (_undecodable(binding.key) or _undecodable(binding.value)):
            continue
        named = "" if _undecodable(binding.key) else f" ({binding.key})"
        problems.append(
            f"{env_file.name} line {binding.original.line}{named}: not valid UTF-8 text;"
            " save the file as UTF-8 (the line is not shown: it may hold a key)"
        )
    return problems


def _dotenv_values(text: str) -> dict[str, str | None]:
    """The values of a `.env` text, less those holding undecodable bytes (`_undecodable_lines` names them).

    python-dotenv's own log line per unreadable line is silenced: `unknown_keys` names those lines.
    """
    import logging

    from dotenv import dotenv_values

    dotenv_log = logging.getLogger("dotenv.main")
    was_disabled, dotenv_log.disabled = dotenv_log.disabled, True
    try:
        values = dotenv_values(stream=io.StringIO(text))
    finally:
        dotenv_log.disabled = was_disabled
    # Interpolation (${NAME}) can carry a bad byte into another value: dropped as well, never printed.
    return {k: v for k, v in values.items() if not (_undecodable(k) or _undecodable(v))}


def load_settings(
    env_file: str | Path | DotenvFile | None = ".env", environ: Mapping[str, str] | None = None
) -> Settings:
    """Read `.env` (never overriding the real environment) and the environment into `Settings`.

    Raise `ConfigError` listing every problem, those of the file itself (unreadable, not UTF-8) first.
    """
    merged: dict[str, str] = {}
    problems: list[str] = []
    dotenv = read_dotenv(env_file, os.environ if environ is None else environ)
    if dotenv is not None and dotenv.problem is not None:
        problems.append(dotenv.problem)
    elif dotenv is not None and dotenv.text is not None:
        problems += _undecodable_lines(dotenv.path, dotenv.text)
        merged.update({k: v for k, v in _dotenv_values(dotenv.text).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    try:
        settings = settings_from_env(merged)
    except ConfigError as exc:
        raise ConfigError(_without_secrets(problems, merged) + exc.problems) from None
    if problems:
        raise ConfigError(_without_secrets(problems, merged))
    return settings


def _without_secrets(problems: list[str], env: Mapping[str, str]) -> list[str]:
    """Problem lines with every secret of `env` and every key-shaped word masked: a key pasted on the
    wrong line (STOP_LOSS_PERCENT=<key>, PUSHOVER_API_URL=<token>) was printed whole, to Render's logs."""
    secrets = {env.get(name, "").strip() for name in (*SECRET_NAMES, *EXTRA_NAMES)}
    secrets = {secret for secret in secrets if len(secret) >= MIN_SHOWN_SECRET}

    def scrub(line: str) -> str:
        for secret in secrets:
            line = line.replace(secret, mask(secret))
        return _KEY_SHAPED_WORD.sub(lambda found: mask(found.group()), line)

    return [scrub(line) for line in problems]
