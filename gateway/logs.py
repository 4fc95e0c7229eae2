"""structlog loggers built from settings, without touching global configuration.

The level is a filter at the head of the chain, not structlog's filtering
wrapper, so that a reload (SIGHUP) can change it on the logger every part of
the app already holds (``set_level``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import traceback
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from gateway.config import LoggingSettings

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


# json.dumps's own C encoder, made once (JSONEncoder.encode makes one per
# call): the same text, with repr() for what JSON has no form for. Its
# arguments: markers (the circular check), default, the string encoder,
# indent, key and item separators, sort_keys, skipkeys, allow_nan.
_ENCODE = c_make_encoder({}, repr, encode_basestring_ascii, None, ": ", ", ", False, False, True)


def _json_line(event: dict[str, Any], **_: Any) -> str:
    return "".join(_ENCODE(event, 0))


class UtcStamper:
    """``timestamp`` as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes
    it (``2026-11-26T06:00:00.123456Z``), the date and the time of day
    formatted once a second rather than on every line."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, logger: Any, method: str, event: Any) -> Any:
        second, micro = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # As datetime.isoformat: no fraction when it is zero.
        event["timestamp"] = f"{self._text}.{micro:06d}Z" if micro else f"{self._text}Z"
        return event


class ServerErrors(logging.Handler):
    """aiohttp's own error reports, as one line each of the gateway's log rather
    than a traceback on stderr (which breaks a log of JSON lines).

    A request aiohttp could not parse is routine (scanners, broken clients): an
    info line with the status and the reason, none of the request's bytes (a
    header might hold a key). Anything else is a bug: an error line with the
    traceback as one field.
    """

    def __init__(self, log: Logger) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            self._log.info("bad_request", status=error.code, error=_reason(error))
        elif error is not None:
            self._log.error("server_error", **_traceback(error))
        else:
            self._log.error("server_error", message=record.getMessage())


def _traceback(error: BaseException) -> dict[str, str]:
    return {
        "error": type(error).__name__,
        "traceback": "".join(traceback.format_exception(error)),
    }


def loop_error_reporter(log: Logger) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """For ``loop.set_exception_handler``: what the loop reports (a callback or a
    task that failed, and nobody heard of it) as one error line, the traceback
    a field, rather than a multi-line report on stderr."""

    def report(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        details = _traceback(error) if isinstance(error, BaseException) else {}
        log.error("loop_error", message=str(context.get("message", ""))[:200], **details)

    return report


def _reason(error: HttpProcessingError) -> str:
    """What was wrong with a request, without its bytes: llhttp's own words (its
    messages quote the bytes after a blank line), else the error's class (the
    others quote them in the first line)."""
    head, blank, _ = error.message.partition("\n\n")
    if blank:
        return head.splitlines()[-1].strip().rstrip(":")
    return type(error).__name__


def server_logger(log: Logger) -> logging.Logger:
    """The logger for aiohttp's request handlers (``AppRunner(logger=...)``): a
    logger of its own, not one of the logging module's (no global state)."""
    logger = logging.Logger("aiohttp.server", logging.INFO)  # BadHttpMethod's debug: dropped
    logger.addHandler(ServerErrors(log))
    return logger


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
            UtcStamper(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    ).bind()  # the bound logger itself: its lazy proxy binds a new one on every call
