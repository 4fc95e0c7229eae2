"""structlog loggers built from settings, without touching global configuration."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from .config import LoggingSettings

Logger = Any  # structlog's bound loggers are dynamically typed


def make_logger(settings: LoggingSettings, stream: TextIO | None = None) -> Logger:
    """JSON lines in production, a readable console format on a terminal."""
    out = sys.stderr if stream is None else stream
    console = settings.format == "console" or (settings.format == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    return structlog.wrap_logger(
        structlog.PrintLogger(out),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(settings.level.upper())
        ),
    )
