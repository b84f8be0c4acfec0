"""Logging setup: structlog, JSON lines off a TTY (containers), readable console on one.

Configure once per entry point; bind `session_id` with `bind_session` so every line about a
session carries it, across awaits and executor hops (contextvars).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from rawwave.settings import Settings


def configure_logging(settings: Settings) -> None:
    """Route structlog (and stdlib logging) to stderr in the format the settings ask for."""
    level = getattr(logging, settings.log_level.upper())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if _wants_console(settings)
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    """Resolve sys.stderr at each log call, not at configure time: it may be replaced (tests, daemons)."""
    return structlog.PrintLogger(sys.stderr)


def _wants_console(settings: Settings) -> bool:
    if settings.log_format == "auto":
        return sys.stderr.isatty()
    return settings.log_format == "console"


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


@contextmanager
def bind_session(session_id: str) -> Iterator[None]:
    """Every log line inside carries `session_id` (contextvars: safe across tasks and threads)."""
    with structlog.contextvars.bound_contextvars(session_id=session_id):
        yield
