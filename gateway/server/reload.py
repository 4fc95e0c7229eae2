"""SIGHUP: read the configuration file again and apply what may change live.

Like nginx: the file is read and checked whole; if it is invalid nothing
changes and one line says why. A file still being written is refused too:
it must read the same twice, ``SETTLE_S`` apart, hold a tenant, keep
every table the running configuration's file had (a file cut short drops
the tables after the cut, and their keys would fall back to defaults), and
not be that file cut inside a table (a tenant whose limits were cut off).

If it is valid, tenants and their keys, bots, quotas and limits, timeouts,
retries, breaker thresholds and the log level apply to requests from now on,
while live streams go on with what they had.
What is bound at start (the listening address, workers, the upstream's
address, proxy and pool size, the metrics port) keeps its old value and is
named in a warning until a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.app import export_breaker_series
from gateway.auth.tenants import FAILED_KEYS, TENANTS
from gateway.auth.tokens import TOKENS
from gateway.config import ConfigError, Settings, named_bots, read_file, settings_from_mapping
from gateway.logs import set_level
from gateway.quotas.admission import ADMISSION
from gateway.resume.streams import RESUMABLE
from gateway.server.tls import TLS, TLS_KEYS, make_context, tls_mode
from gateway.state import LOG, METRICS, SETTINGS
from gateway.upstream.breaker import BREAKERS
from gateway.upstream.client import UPSTREAM

RESTART_ONLY = (
    "server.host",
    "server.port",
    "server.workers",
    "server.backlog",
    "server.event_loop",
    "server.header_timeout_s",
    "server.keepalive_timeout_s",
    "server.max_connections",
    "server.static_dir",
    "upstream.url",
    "upstream.max_connections",
    "upstream.proxy_url",
    "upstream.ca_file",
    "redis.url",
    "redis.key_prefix",
    "redis.timeout_s",
    "redis.lease_ttl_s",
    "redis.on_error",
    "redis.expected_replicas",
    "resume.enabled",
    "responses.retain_s",
    "responses.max_stored",
    "metrics.enabled",
    "metrics.port",
    "metrics.host",
    "logging.format",
)


SETTLE_S = 0.2  # a file must read the same this far apart: no writer is at it


@dataclasses.dataclass(frozen=True)
class LoadedFile:
    """The file the running configuration came from."""

    text: bytes
    tables: frozenset[str]  # its top-level tables


@dataclasses.dataclass
class RunningFile:
    """The app's own record of its file, changed by each reload (an app's keys
    are set before it starts, never after)."""

    loaded: LoadedFile = LoadedFile(b"", frozenset())


RUNNING_FILE = web.AppKey("running_file", RunningFile)


def remember_file(app: web.Application, path: str | Path) -> None:
    """Before the app starts: the file the running configuration came from."""
    text = Path(path).read_bytes()
    app[RUNNING_FILE] = RunningFile(LoadedFile(text, frozenset(read_file(path, text))))


async def read_settled(path: str | Path) -> tuple[bytes, dict[str, Any]]:
    """The file and its TOML, once it reads the same twice, ``SETTLE_S`` apart."""
    first = _read(path)
    await asyncio.sleep(SETTLE_S)
    text = _read(path)
    if text is None:  # gone or unreadable: read_file says which
        return b"", read_file(path)
    if text != first:
        raise ConfigError(f"{path}: it changed while it was read (still being written?)")
    return text, read_file(path, text)


def _read(path: str | Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def complete(raw: dict[str, Any], new: Settings, text: bytes, running: LoadedFile) -> None:
    """``ConfigError`` unless the file is a whole configuration: every table of
    the file the running one came from, a tenant, and not that file cut short
    inside a table."""
    missing = sorted(running.tables - set(raw))
    if missing:
        table = "[[tenants]]" if missing[0] == "tenants" else f"[{missing[0]}]"
        raise ConfigError(
            f"{table}: the running configuration's file has it and this one has not (a file "
            "cut short?); a reload never drops a table: restart for that"
        )
    if not new.tenants:
        raise ConfigError("[[tenants]]: none, so every key would get 401")
    if _cut_inside_a_table(text, running.text):
        raise ConfigError(
            "it is the running configuration's file cut short inside a table, whose "
            "settings after the cut would fall back to defaults (a file cut short?)"
        )


def _cut_inside_a_table(text: bytes, running: bytes) -> bool:
    """Whether ``text`` is ``running`` cut where a table goes on: within a line, or
    before a key line of the table the cut is in. A cut between tables (after a
    whole tenant) is what deleting the last tenants makes, and is taken as such."""
    rest = running[len(text) :]
    if not running.startswith(text) or not rest.strip():
        return False
    if text and not text.endswith(b"\n"):
        return True
    for line in rest.splitlines():
        line = line.strip()
        if line and not line.startswith(b"#"):
            return not line.startswith(b"[")
    return False


async def reload_settings(app: web.Application, path: str | Path) -> bool:
    """Reload ``path`` into the running app; False (and nothing changed) if invalid."""
    log, metrics = app[LOG], app[METRICS]
    old = app[SETTINGS].current
    tls: ssl.SSLContext | None = None
    try:
        text, raw = await read_settled(path)
        new = settings_from_mapping(raw, os.environ)
        complete(raw, new, text, app.get(RUNNING_FILE, RunningFile()).loaded)
        if TLS in app and tls_mode(new.server) == tls_mode(old.server):
            tls = make_context(new.server)  # the files read again: new connections get them
    except ConfigError as e:
        metrics.config_reloads.labels("invalid").inc()
        log.error("config_reload_failed", error=str(e), kept="the running configuration")
        return False
    held = [key for key in RESTART_ONLY if _get(new, key) != _get(old, key)]
    if tls_mode(new.server) != tls_mode(old.server):  # the listener's kind: TLS, mutual TLS
        held += [f"server.{key}" for key in TLS_KEYS]
    if new.frontends != old.frontends:  # routes are mounted once
        held.append("frontends")
        new = dataclasses.replace(new, frontends=old.frontends)
    if held:
        log.warning("config_reload_needs_restart", keys=held)
        for key in held:
            if key != "frontends":
                new = _put(new, key, _get(old, key))
    # Said before it applies: the new log level may be quieter than info.
    log.info("config_reloaded", changed=_changed_keys(old, new), tenants=len(new.tenants))
    apply_settings(app, new)
    if tls is not None:
        app[TLS].current = tls
    if RUNNING_FILE in app:
        app[RUNNING_FILE].loaded = LoadedFile(text, frozenset(raw))
    metrics.config_reloads.labels("ok").inc()
    if app[TOKENS].active:
        await app[TOKENS].start()  # a new issuer's keys (and the others' again)
    return True


def apply_settings(app: web.Application, new: Settings) -> None:
    app[SETTINGS].current = new
    app[TENANTS].replace(new.tenants)
    app[FAILED_KEYS].limit = new.server.max_auth_failures_per_minute
    app[TOKENS].replace(new.issuers)
    app[TOKENS].user_logged = new.logging.user
    app[ADMISSION].reconfigure(new.admission, new.tenants)
    bots = named_bots(new)
    app[METRICS].name_bots(bots)
    app[METRICS].export_known([t.name for t in new.tenants])  # a new tenant's series at 0
    export_breaker_series(app[METRICS], app[BREAKERS].reconfigure(new.circuit, bots))
    app[UPSTREAM].reconfigure(new.upstream)
    set_level(app[LOG], new.logging.level)
    if RESUMABLE in app:
        app[RESUMABLE].settings = new.resume


def _get(settings: Settings, key: str) -> Any:
    table, name = key.split(".")
    return getattr(getattr(settings, table), name)


def _put(settings: Settings, key: str, value: Any) -> Settings:
    table, name = key.split(".")
    return dataclasses.replace(
        settings, **{table: dataclasses.replace(getattr(settings, table), **{name: value})}
    )


def _changed_keys(old: Settings, new: Settings) -> list[str]:
    """The names of what changed (never the values: a key or a hash may be among them)."""
    changed = []
    for table in dataclasses.fields(Settings):
        before, after = getattr(old, table.name), getattr(new, table.name)
        if isinstance(before, tuple) or before == after:  # [[tenants]], [[issuers]], ...
            if before != after:
                changed.append(table.name)
            continue
        changed += [
            f"{table.name}.{f.name}"
            for f in dataclasses.fields(before)
            if getattr(before, f.name) != getattr(after, f.name)
        ]
    return changed
