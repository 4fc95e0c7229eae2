"""``chatiq-gateway`` / ``python -m gateway``: load the configuration, serve."""

from __future__ import annotations

import argparse
import sys

from aiohttp import web

from .app import create_app
from .config import ConfigError, load_settings
from .logs import make_logger


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatiq-gateway", description=__doc__)
    parser.add_argument(
        "--config", default="config/gateway.toml", help="TOML file (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        print(f"chatiq-gateway: config error: {e}", file=sys.stderr)
        return 2
    log = make_logger(settings.logging)
    app = create_app(settings, log=log)
    log.info(
        "listening",
        url=f"http://{settings.server.host}:{settings.server.port}",
        upstream=settings.upstream.url,
        tenants=len(settings.tenants),
    )
    web.run_app(
        app,
        host=settings.server.host,
        port=settings.server.port,
        access_log=None,
        handler_cancellation=True,
        print=None,
    )
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
