"""Typed keys for everything the app owns: no global mutable state."""

from __future__ import annotations

from aiohttp import web

from .admission import Admission
from .auth import TenantDirectory
from .config import Settings
from .logs import Logger
from .metrics import Metrics
from .upstream import Upstream

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
ADMISSION = web.AppKey("admission", Admission)
TENANTS = web.AppKey("tenants", TenantDirectory)
UPSTREAM = web.AppKey("upstream", Upstream)
LOG = web.AppKey("log", Logger)
