"""``create_app(settings)``: the routes, the state they share, and its lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from . import handlers
from .admission import Admission
from .auth import TenantDirectory
from .config import Settings
from .exchange import add_request_id, make_middleware
from .logs import Logger, make_logger
from .metrics import Metrics
from .state import ADMISSION, LOG, METRICS, SETTINGS, TENANTS, UPSTREAM
from .upstream import Upstream


def create_app(settings: Settings, *, log: Logger | None = None) -> web.Application:
    log = make_logger(settings.logging) if log is None else log
    metrics = Metrics()
    admission = Admission(
        settings.admission.max_streams,
        settings.admission.max_queue,
        settings.admission.queue_timeout_s,
    )
    metrics.queue_depth.set_function(lambda: admission.queued)

    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[make_middleware(metrics, log)],
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[ADMISSION] = admission
    app[TENANTS] = TenantDirectory(settings.tenants)
    app[LOG] = log
    app.on_response_prepare.append(add_request_id)
    app.cleanup_ctx.append(_upstream_client)

    app.router.add_post("/api/chatbot", handlers.chatbot)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    return app


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession for the app's whole life."""
    settings = app[SETTINGS].upstream
    connector = aiohttp.TCPConnector(
        limit=settings.max_connections, limit_per_host=settings.max_connections
    )
    async with aiohttp.ClientSession(
        connector=connector, trust_env=False, auto_decompress=True
    ) as session:
        app[UPSTREAM] = Upstream(settings, session, app[METRICS])
        yield
