"""One serving process: the app on its listening socket, signals, drain and stop."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable

from aiohttp import web

from gateway.app import create_app, create_metrics_app, drain
from gateway.config import Settings
from gateway.logs import Logger, server_logger
from gateway.metrics import Metrics
from gateway.server.edge import GatewaySite
from gateway.server.reload import reload_settings
from gateway.server.workers import watch_parent
from gateway.state import LIFECYCLE, METRICS
from gateway.upstream.egress import proxy_display

LINGER_S = 2.0


# Young objects collected every this many allocations (Python's default: 700).
# Each stream allocates a few hundred short-lived objects, mostly freed by
# reference counting; at the default, thousands of live streams made the
# collector run every few streams and walk their objects. 10% less CPU a
# stream at 1,000 streams; cyclic garbage waits at most this many allocations.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Once the app is built: what exists now lives as long as the process, so
    the collector stops walking it (``gc.freeze``), and collects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)


async def serve(
    settings: Settings,
    log: Logger,
    *,
    config_path: str | None = None,
    max_connections: int | None = None,
    shared_port: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and stop; a second one stops at
    once. SIGHUP reloads ``config_path``.

    The socket stays open while draining, so new requests get a clear 503
    rather than a refused connection.
    """
    app = create_app(settings, log=log)
    server = settings.server
    runner = web.AppRunner(
        app, access_log=None, logger=server_logger(log), handler_cancellation=True,
        shutdown_timeout=5,
        keepalive_timeout=server.keepalive_timeout_s,
        # After an early answer (408, 413) the rest of a body is read and dropped
        # this long, so the client sees the answer, then the connection closes.
        lingering_time=LINGER_S,
        # No SO_KEEPALIVE on client sockets (two system calls a connection): its
        # probes start after two idle hours; idle connections close after
        # keepalive_timeout_s, and a silent stream pings every upstream.keepalive_s.
        tcp_keepalive=False,
    )  # fmt: skip
    await runner.setup()
    tune_gc()
    # Signals are handled before the port opens: a reload or a stop sent as soon
    # as the gateway answers must not meet the default action (which kills it).
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_stop() -> None:
        if stop.is_set():  # the second one: no more waiting for live streams
            log.warning("stopping_now", live_streams=len(app[LIFECYCLE].streams))
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    if shared_port:  # a worker: never outlive the supervisor
        orphaned = loop.create_task(watch_parent(lambda: on_orphaned(log, stop)))
    if config_path is not None:
        loop.add_signal_handler(
            signal.SIGHUP, lambda: stop.is_set() or reload_settings(app, config_path)
        )
    metrics = app[METRICS]
    site = GatewaySite(
        runner, server.host, server.port, backlog=server.backlog,
        header_timeout_s=server.header_timeout_s,
        on_timeout=metrics.rejected.labels("header_timeout").inc,
        max_connections=max_connections or server.max_connections,
        on_refused=_refusal_reporter(metrics, log), reuse_port=shared_port,
    )  # fmt: skip
    await site.start()
    runners = [runner]
    if settings.metrics.port:
        metrics_runner = web.AppRunner(
            create_metrics_app(app), access_log=None, logger=server_logger(log)
        )
        await metrics_runner.setup()
        m = settings.metrics
        await web.TCPSite(
            metrics_runner, m.host, m.port, reuse_address=True, reuse_port=shared_port
        ).start()
        runners.append(metrics_runner)
    log.info(
        "listening",
        url=f"http://{settings.server.host}:{settings.server.port}",
        upstream=settings.upstream.url,
        proxy=proxy_display(settings.upstream.proxy_url),
        quotas="redis" if settings.redis.url else "local",
        tenants=len(settings.tenants),
    )
    try:
        await stop.wait()
        await drain(app, settings.server.shutdown_grace_s, hurry)
    finally:
        if shared_port:
            orphaned.cancel()
        for r in runners:
            await r.cleanup()
    log.info("stopped")


def on_orphaned(log: Logger, stop: asyncio.Event) -> None:
    log.warning("supervisor_gone", action="draining")
    stop.set()


def _refusal_reporter(metrics: Metrics, log: Logger) -> Callable[[], None]:
    """Counts refused connections; says so in the log at most once a second."""
    refused = metrics.rejected.labels("connections")
    last_said, unsaid = 0.0, 0

    def report() -> None:
        nonlocal last_said, unsaid
        refused.inc()
        unsaid += 1
        now = time.monotonic()
        if now - last_said >= 1.0:
            log.warning("connections_refused", refused=unsaid, why="server.max_connections")
            last_said, unsaid = now, 0

    return report
