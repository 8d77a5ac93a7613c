"""Logging set-up: structlog over the standard library, console on a terminal, JSON otherwise."""

from __future__ import annotations

import logging
import sys

import structlog


def redact_secrets(secrets: tuple[str, ...]):  # noqa: ANN201 - a structlog processor factory
    """A structlog processor that replaces any known secret value inside string fields."""
    live = tuple(s for s in secrets if s)

    def processor(_logger: object, _method: str, event_dict: dict) -> dict:
        if not live:
            return event_dict
        for key, value in event_dict.items():
            if isinstance(value, str):
                for secret in live:
                    if secret in value:
                        value = value.replace(secret, "***")
                event_dict[key] = value
        return event_dict

    return processor


def configure_logging(level: str = "INFO", fmt: str = "", secrets: tuple[str, ...] = ()) -> None:
    """Configure structlog once per process. `fmt` is console, json or '' (console on a TTY)."""
    use_json = fmt == "json" or (fmt == "" and not sys.stderr.isatty())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets(secrets),
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
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
