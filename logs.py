"""Logging set-up: structlog over the standard library, console on a terminal, JSON otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

from redaction import Redactor


def redact_rendered(redactor: Redactor):  # noqa: ANN201 - a structlog processor factory
    """The last processor: the rendered line without any secret, wherever in the event it was
    (nested in a list of problems, cut short in an error text, in a foreign library's message)."""

    def processor(_logger: object, _method: str, rendered: str) -> str:
        return redactor(rendered)

    return processor


def configure_logging(level: str = "INFO", fmt: str = "", secrets: tuple[str, ...] = ()) -> None:
    """Configure structlog once per process. `fmt` is console, json or '' (console on a TTY)."""
    use_json = fmt == "json" or (fmt == "" and not sys.stderr.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks never show frame locals: a frame that holds an API key would print it.
    renderer = (
        [
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False, use_rich=False)
            ),
            structlog.processors.JSONRenderer(),
        ]
        if use_json
        else [
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        ]
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *renderer,
            redact_rendered(Redactor.of(secrets)),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Apprise's debug lines spell out its URLs' tokens (a Telegram bot token in the request URL).
    # urllib3 (under Apprise's requests) names request paths, which hold an ntfy topic or a chat id.
    for noisy in ("httpx", "httpcore", "websockets", "apprise", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
