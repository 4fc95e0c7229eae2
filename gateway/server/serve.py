"""One serving process: the app on its listening socket, signals, drain and stop."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable

from aiohttp import web

from gateway import build_note
from gateway.app import create_app, create_metrics_app, drain
from gateway.config import Settings
from gateway.config.proxies import proxy_display
from gateway.logs import Logger, server_logger
from gateway.metrics import Metrics
from gateway.server.edge import GatewaySite
from gateway.server.reload import reload_settings, remember_file
from gateway.server.tls import TLS, Certificates, tls_mode
from gateway.server.workers import watch_parent
from gateway.state import LIFECYCLE, METRICS

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


class Server:
    """One serving process, in three steps as uvicorn's ``Server`` has them:
    ``start_up`` (the app, signal handlers, then the listening sockets),
    ``run`` (until SIGTERM or SIGINT: then drain; a second one stops at once;
    SIGHUP reloads ``config_path``), ``shut_down`` (the sockets closed, the
    app cleaned up); ``serve`` takes the three in turn.

    The socket stays open while draining, so new requests get a clear 503
    rather than a refused connection.
    """

    def __init__(
        self,
        settings: Settings,
        log: Logger,
        *,
        config_path: str | None = None,
        max_connections: int | None = None,
        shared_port: bool = False,
    ) -> None:
        self.settings = settings
        self.log = log
        self.config_path = config_path
        self.max_connections = max_connections or settings.server.max_connections
        self.shared_port = shared_port  # a worker of a supervisor: SO_REUSEPORT
        self.app = create_app(settings, log=log)
        self.stop = asyncio.Event()  # the first SIGTERM or SIGINT
        self.hurry = asyncio.Event()  # the second: no more waiting for live streams
        self._runners: list[web.AppRunner] = []
        self._orphaned: asyncio.Task[None] | None = None
        self._reloads: set[asyncio.Task[bool]] = set()

    async def start_up(self) -> None:
        server = self.settings.server
        if self.config_path is not None:
            remember_file(self.app, self.config_path)
        if tls_mode(server) != "plain":
            self.app[TLS] = Certificates(server)
        runner = web.AppRunner(
            self.app, access_log=None, logger=server_logger(self.log), handler_cancellation=True,
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
        self._runners.append(runner)
        tune_gc()
        # Signals are handled before the port opens: a reload or a stop sent as soon
        # as the gateway answers must not meet the default action (which kills it).
        self._handle_signals()
        metrics = self.app[METRICS]
        site = GatewaySite(
            runner, server.host, server.port, backlog=server.backlog,
            header_timeout_s=server.header_timeout_s,
            on_timeout=metrics.rejected.labels("header_timeout").inc,
            max_connections=self.max_connections,
            on_refused=_refusal_reporter(metrics, self.log), reuse_port=self.shared_port,
            ssl_context=self.app[TLS].listening if TLS in self.app else None,
        )  # fmt: skip
        await site.start()
        if self.settings.metrics.port:
            await self._start_metrics_port()
        self.log.info(
            "listening",
            url=f"{'https' if TLS in self.app else 'http'}://{server.host}:{server.port}",
            tls=tls_mode(server),
            upstream=self.settings.upstream.url,
            proxy=proxy_display(self.settings.upstream.proxy_url),
            quotas="redis" if self.settings.redis.url else "local",
            tenants=len(self.settings.tenants),
            build=build_note(),
        )

    def _handle_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop)
        if self.shared_port:  # a worker: never outlive the supervisor
            self._orphaned = loop.create_task(
                watch_parent(lambda: on_orphaned(self.log, self.stop))
            )
        if self.config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_reload)

    def _on_reload(self) -> None:
        if self.stop.is_set() or self.config_path is None:
            return
        task = asyncio.create_task(reload_settings(self.app, self.config_path))
        self._reloads.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._reloads.discard)

    def _on_stop(self) -> None:
        if self.stop.is_set():  # the second one: no more waiting for live streams
            self.log.warning("stopping_now", live_streams=len(self.app[LIFECYCLE].streams))
            self.hurry.set()
        self.stop.set()

    async def _start_metrics_port(self) -> None:
        m = self.settings.metrics
        runner = web.AppRunner(
            create_metrics_app(self.app), access_log=None, logger=server_logger(self.log)
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, m.host, m.port, reuse_address=True, reuse_port=self.shared_port)
        await site.start()

    async def run(self) -> None:
        """Until the first stop signal; then the drain."""
        await self.stop.wait()
        await drain(self.app, self.settings.server.shutdown_grace_s, self.hurry)

    async def serve(self) -> None:
        """Start up, run until the drain is done, shut down."""
        try:
            await self.start_up()
            await self.run()
        finally:
            await self.shut_down()
        self.log.info("stopped")

    async def shut_down(self) -> None:
        if self._orphaned is not None:
            self._orphaned.cancel()
        for runner in self._runners:
            await runner.cleanup()


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
