"""``chatiq-gateway`` / ``python -m gateway``: load the configuration, then serve
in this process or supervise workers. Besides: ``hash-key`` (tenant keys),
``check-config FILE`` (validate a file and print what it sets, no secrets),
``default-config`` (print the packaged default configuration), ``--version``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import secrets
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from gateway import build_note
from gateway.auth.tenants import hash_key
from gateway.config import ConfigError, Settings, load_settings
from gateway.config.proxies import proxy_display
from gateway.frontends import load_frontends
from gateway.logs import Logger, make_logger
from gateway.metrics import pin_worker_pid, version
from gateway.server.cpus import parse_workers, resolve_workers
from gateway.server.serve import Server
from gateway.server.workers import supervise


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


# The packaged default configuration (config/gateway.toml in a checkout links to it).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gateway.toml"
LOCAL_CONFIG = "config/gateway.toml"


def config_path(given: str | None) -> str:
    """The file to read: the one given, else config/gateway.toml where it is
    run from (a checkout), else the packaged default (an installed wheel)."""
    if given is not None:
        return given
    return LOCAL_CONFIG if Path(LOCAL_CONFIG).is_file() else str(DEFAULT_CONFIG)


def effective_settings(settings: Settings) -> dict[str, Any]:
    """What a configuration sets, every key, with no secret: the ChatIQ key as
    whether it is set, tenants by name and number of keys, never a hash."""
    shown: dict[str, Any] = {}
    for table in dataclasses.fields(Settings):
        value = getattr(settings, table.name)
        if table.name == "tenants":
            shown["tenants"] = [
                {**{k: v for k, v in dataclasses.asdict(t).items()
                    if k not in ("key_sha256", "more_keys_sha256")}, "keys": len(t.keys_sha256)}
                for t in value
            ]  # fmt: skip
        elif isinstance(value, tuple):
            shown[table.name] = [dataclasses.asdict(v) for v in value]
        else:
            shown[table.name] = dataclasses.asdict(value)
    upstream = shown["upstream"]
    upstream["api_key"] = "(set)" if settings.upstream.api_key else "(not set: CHATIQ_API_KEY)"
    upstream["proxy_url"] = proxy_display(settings.upstream.proxy_url)
    if settings.metrics.token_sha256:
        shown["metrics"]["token_sha256"] = "(set)"
    return shown


def check_config_command(argv: list[str]) -> int:
    """``chatiq-gateway check-config [FILE]``: 0 and the effective settings, or 2 and why."""
    parser = argparse.ArgumentParser(
        prog="chatiq-gateway check-config",
        description="Validate a configuration file as the gateway would (the environment "
        "applied), and print the settings it makes, as JSON, without secrets.",
    )
    parser.add_argument("file", nargs="?", help="the TOML file (default: as the gateway picks)")
    args = parser.parse_args(argv)
    path = config_path(args.file)
    try:
        settings = load_settings(path)
        load_frontends(settings)
    except ConfigError as e:
        print(f"chatiq-gateway: config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(effective_settings(settings), indent=2, default=str))
    print(f"chatiq-gateway: {path} is valid", file=sys.stderr)
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
    if argv[:1] == ["check-config"]:
        return check_config_command(argv[1:])
    if argv[:1] == ["default-config"]:
        sys.stdout.write(DEFAULT_CONFIG.read_text())
        return 0
    parser = argparse.ArgumentParser(
        prog="chatiq-gateway",
        description=__doc__,
        epilog="chatiq-gateway hash-key: a new tenant key and its hash for the config; "
        "check-config [FILE]: validate a file; default-config: print the packaged default.",
    )
    parser.add_argument(
        "--version", action="version", version=f"chatiq-gateway {version()} ({build_note()})"
    )
    parser.add_argument(
        "--config",
        help=f"TOML file (default: {LOCAL_CONFIG} if it is here, else the packaged default)",
    )
    parser.add_argument(
        "--workers", type=_workers, default=None,
        help="processes sharing the port (SO_REUSEPORT), or 'auto': one per core this "
        "process may use (affinity and cgroup quota; the production setting); "
        "default: server.workers, 1",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config = config_path(args.config)
    try:
        settings = load_settings(args.config)
        load_frontends(settings)  # a plugin that is missing or broken: one line, now
    except ConfigError as e:
        print(f"chatiq-gateway: config error: {e}", file=sys.stderr)
        return 2
    log = make_logger(settings.logging)
    cap = connection_cap(settings, raise_open_files_limit(), log)
    workers = args.workers if args.workers is not None else resolve_workers(settings.server.workers)
    if workers < 1:
        print("chatiq-gateway: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > 1 and not args.worker:
        return supervise(args.config, workers, settings.server.host, settings.server.port, log)
    pin_worker_pid()

    async def serve() -> None:  # the app is made on the loop that serves it
        server = Server(
            settings, log, config_path=args.config, max_connections=cap, shared_port=args.worker
        )
        await server.serve()

    try:
        run(serve(), settings.server.event_loop, log)
    except OSError as e:  # typically: the port is taken
        print(f"chatiq-gateway: cannot serve: {e}", file=sys.stderr)
        return 1
    return 0
