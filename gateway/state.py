"""Typed keys for what the app owns that every layer reads: the settings in
force, the metrics, the log, the live streams' timers and the lifecycle. No
global mutable state: everything hangs off the ``web.Application``. The keys
of what a package owns (the upstream client, the quotas, the tenants, the
resumable streams) live in that package, beside their types."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.config import Settings
from gateway.logs import Logger
from gateway.metrics import Metrics
from gateway.timers import TimerHeap


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
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
LOG = web.AppKey("log", Logger)
TIMERS = web.AppKey("timers", TimerHeap)  # the live streams' timers
