"""``chatiq-gateway`` / ``python -m gateway``: load the configuration, serve, drain."""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import secrets
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from .app import create_app, create_metrics_app, drain
from .auth import hash_key
from .config import ConfigError, Settings, load_settings
from .cpus import parse_workers
from .edge import GatewaySite
from .egress import proxy_display
from .frontends import load_frontends
from .logs import Logger, make_logger, server_logger
from .metrics import Metrics, pin_worker_pid
from .reload import reload_settings
from .state import LIFECYCLE, METRICS
from .workers import supervise, watch_parent

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


def connection_cap(settings: Settings, open_files: int, log: Logger) -> int:
    """``server.max_connections``, lowered to what the open-files limit allows:
    each client connection is a file, and each stream holds an upstream one too."""
    wanted = settings.server.max_connections
    reserved = settings.admission.max_streams + 64  # upstream sockets, logs, the listener
    cap = max(16, min(wanted, open_files - reserved))
    if cap < wanted:
        log.warning(
            "open_files_limit_low", limit=open_files, max_connections=cap,
            fix=f"raise the open-files limit (ulimit -n, systemd LimitNOFILE) to at least "
            f"{wanted + reserved}, or lower server.max_connections",
        )  # fmt: skip
    return cap


def run(main: Coroutine[Any, Any, None], event_loop: str, log: Logger) -> None:
    """Run ``main`` on uvloop when asked or, for "auto", when it is installed."""
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise SystemExit(
                    "chatiq-gateway: server.event_loop is uvloop, which is not installed"
                ) from None
        else:
            log.info("event_loop", name="uvloop")
            uvloop.run(main)
            return
    asyncio.run(main)


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to the hard limit; return it.

    Every stream holds two sockets (client and upstream): the usual soft limit
    of 1024 would cap the gateway near 500 streams.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def hash_key_command(argv: list[str]) -> int:
    """``chatiq-gateway hash-key``: a new tenant key and its hash, or the hash of a key on stdin."""
    parser = argparse.ArgumentParser(
        prog="chatiq-gateway hash-key",
        description="Print a new tenant key and the key_sha256 line for the config; "
        "with --stdin, hash a key read from standard input (not from the command "
        "line, where shell history and ps would see it).",
    )
    parser.add_argument("--stdin", action="store_true", help="hash the key given on stdin")
    args = parser.parse_args(argv)
    if args.stdin:
        key = sys.stdin.readline().strip()
        if not key:
            print("chatiq-gateway hash-key: no key on stdin", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    key = secrets.token_urlsafe(32)
    print(f"key (give it to the tenant; it is not stored anywhere): {key}")
    print(f'config line: key_sha256 = "{hash_key(key)}"')
    return 0


def _workers(value: str) -> int:
    try:
        return parse_workers(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'auto', not {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-key"]:
        return hash_key_command(argv[1:])
    parser = argparse.ArgumentParser(
        prog="chatiq-gateway",
        description=__doc__,
        epilog="chatiq-gateway hash-key: a new tenant key and its hash for the config.",
    )
    parser.add_argument(
        "--config", default="config/gateway.toml", help="TOML file (default: %(default)s)"
    )
    parser.add_argument(
        "--workers", type=_workers, default=None,
        help="processes sharing the port (SO_REUSEPORT), or 'auto': one per core this "
        "process may use (affinity and cgroup quota; the production setting); "
        "default: server.workers, 1",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        load_frontends(settings)  # a plugin that is missing or broken: one line, now
    except ConfigError as e:
        print(f"chatiq-gateway: config error: {e}", file=sys.stderr)
        return 2
    log = make_logger(settings.logging)
    cap = connection_cap(settings, raise_open_files_limit(), log)
    workers = args.workers if args.workers is not None else settings.server.workers
    if workers < 1:
        print("chatiq-gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > 1 and not args.worker:
        return supervise(args.config, workers, settings.server.host, settings.server.port, log)
    pin_worker_pid()
    try:
        main_coro = serve(
            settings, log, config_path=args.config, max_connections=cap, shared_port=args.worker
        )
        run(main_coro, settings.server.event_loop, log)
    except OSError as e:  # typically: the port is taken
        print(f"chatiq-gateway: cannot serve: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
