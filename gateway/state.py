"""Typed keys for everything the app owns: no global mutable state."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .admission import Admission
from .auth import FailedKeyThrottle, TenantDirectory
from .breaker import Breakers
from .config import Settings
from .logs import Logger
from .metrics import Metrics
from .resume.streams import ResumableStreams
from .timers import TimerHeap
from .upstream import Upstream


class LiveSettings:
    """The settings in force. A reload (SIGHUP) replaces them as a whole, so a
    request reads one consistent version; what it already holds stays as it was."""

    __slots__ = ("current",)

    def __init__(self, settings: Settings) -> None:
        self.current = settings


class Lifecycle:
    """Whether the app is draining for shutdown, and the live streams' tasks."""

    def __init__(self) -> None:
        self.draining = False
        self.streams: set[asyncio.Task[object]] = set()


SETTINGS = web.AppKey("settings", LiveSettings)
METRICS = web.AppKey("metrics", Metrics)
ADMISSION = web.AppKey("admission", Admission)
TENANTS = web.AppKey("tenants", TenantDirectory)
FAILED_KEYS = web.AppKey("failed_keys", FailedKeyThrottle)
UPSTREAM = web.AppKey("upstream", Upstream)
BREAKERS = web.AppKey("breakers", Breakers)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
LOG = web.AppKey("log", Logger)
RESUMABLE = web.AppKey("resumable", ResumableStreams)
TIMERS = web.AppKey("timers", TimerHeap)  # the live streams' timers
