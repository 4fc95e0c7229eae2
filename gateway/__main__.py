"""``chatiq-gateway`` / ``python -m gateway``: load the configuration, serve, drain."""

from __future__ import annotations

import argparse
import asyncio
import resource
import secrets
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from .app import create_app, create_metrics_app, drain
from .auth import hash_key
from .config import ConfigError, Settings, load_settings
from .edge import GatewaySite
from .egress import proxy_display
from .logs import Logger, make_logger
from .state import METRICS
from .workers import supervise


async def serve(settings: Settings, log: Logger, *, shared_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then drain and stop.

    The socket stays open while draining, so new requests get a clear 503
    rather than a refused connection.
    """
    app = create_app(settings, log=log)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5)
    await runner.setup()
    server = settings.server
    rejected = app[METRICS].rejected.labels("header_timeout")
    site = GatewaySite(
        runner, server.host, server.port, backlog=server.backlog,
        header_timeout_s=server.header_timeout_s, on_timeout=rejected.inc,
        reuse_port=shared_port,
    )  # fmt: skip
    await site.start()
    runners = [runner]
    if settings.metrics.port:
        metrics_runner = web.AppRunner(create_metrics_app(app), access_log=None)
        await metrics_runner.setup()
        m = settings.metrics
        await web.TCPSite(
            metrics_runner, m.host, m.port, reuse_address=True, reuse_port=shared_port
        ).start()
        runners.append(metrics_runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "listening",
        url=f"http://{settings.server.host}:{settings.server.port}",
        upstream=settings.upstream.url,
        proxy=proxy_display(settings.upstream.proxy_url),
        tenants=len(settings.tenants),
    )
    try:
        await stop.wait()
        await drain(app, settings.server.shutdown_grace_s)
    finally:
        for r in runners:
            await r.cleanup()
    log.info("stopped")


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
        "--workers", type=int, default=None,
        help="processes sharing the port (SO_REUSEPORT); default: server.workers, 1",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"chatiq-gateway: config error: {e}", file=sys.stderr)
        return 2
    log = make_logger(settings.logging)
    open_files = raise_open_files_limit()
    a = settings.admission
    needed = 2 * a.max_streams + a.max_queue + 64  # two sockets a stream, one a queued client
    if open_files < needed:
        log.warning("open_files_limit_low", limit=open_files, needed=needed)
    workers = args.workers if args.workers is not None else settings.server.workers
    if workers < 1:
        print("chatiq-gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > 1 and not args.worker:
        return supervise(args.config, workers, log)
    try:
        run(serve(settings, log, shared_port=args.worker), settings.server.event_loop, log)
    except OSError as e:  # typically: the port is taken
        print(f"chatiq-gateway: cannot serve: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
