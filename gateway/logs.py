"""structlog loggers built from settings, without touching global configuration.

The level is a filter at the head of the chain, not structlog's filtering
wrapper, so that a reload (SIGHUP) can change it on the logger every part of
the app already holds (``set_level``).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

import structlog

from .config import LoggingSettings

Logger = Any  # structlog's bound loggers are dynamically typed
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}
_LEVELS |= {"exception": 40, "msg": 20}


class LevelFilter:
    """Drops events below the level; its ``level`` may change while the logger lives."""

    def __init__(self, level: str) -> None:
        self.level = _LEVELS[level.lower()]

    def __call__(self, logger: Any, method: str, event: Any) -> Any:
        if _LEVELS.get(method, 20) < self.level:
            raise structlog.DropEvent
        return event


def set_level(log: Logger, level: str) -> None:
    """Change the level of a logger ``make_logger`` built."""
    for processor in log._processors:
        if isinstance(processor, LevelFilter):
            processor.level = _LEVELS[level.lower()]


# One encoder for every line: json.dumps with a ``default`` builds a new one
# per call. Same output as json.dumps (structlog's default).
_ENCODER = json.JSONEncoder(default=repr)


def _json_line(event: dict[str, Any], **_: Any) -> str:
    return _ENCODER.encode(event)


def make_logger(settings: LoggingSettings, stream: TextIO | None = None) -> Logger:
    """JSON lines in production, a readable console format on a terminal."""
    out = sys.stderr if stream is None else stream
    console = settings.format == "console" or (settings.format == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if console
        else structlog.processors.JSONRenderer(serializer=_json_line)
    )
    return structlog.wrap_logger(
        structlog.WriteLogger(out),  # the line and its newline in one write (print: two)
        processors=[
            LevelFilter(settings.level),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    ).bind()  # the bound logger itself: its lazy proxy binds a new one on every call
