"""Loading the settings: built once from the TOML file, then the environment.

Every table of the file maps onto a frozen dataclass (``gateway.config.settings``);
the loader checks
names and types against the dataclass fields, so a typo or a wrong type stops
start-up with one line naming the key (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.config.proxies import DIRECT, parse_proxy, proxy_from_environment
from gateway.config.settings import (
    ANY_BOT,
    AUTO_WORKERS,
    BUILT_IN_FRONTENDS,
    TOKEN_ALGORITHMS,
    AdmissionSettings,
    BotSettings,
    CircuitSettings,
    ConfigError,
    FrontendSettings,
    Issuer,
    LoggingSettings,
    MetricsSettings,
    PageSettings,
    RedisSettings,
    ResponsesSettings,
    ResumeSettings,
    ServerSettings,
    Settings,
    Tenant,
    TracingSettings,
    UpstreamSettings,
)

_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")


_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


_BOT_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


_FILE_ONLY_TABLES: dict[str, type] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "admission": AdmissionSettings,
    "circuit": CircuitSettings,
    "redis": RedisSettings,
    "resume": ResumeSettings,
    "responses": ResponsesSettings,
    "metrics": MetricsSettings,
    "logging": LoggingSettings,
    "tracing": TracingSettings,
    "page": PageSettings,
}


_REPLACED = {
    "circuit.failure_threshold": "the circuit opens on circuit.failure_rate over "
    "circuit.window_s, once circuit.min_requests requests ended"
}


_ENV_ONLY = {
    "upstream.api_key": "set CHATIQ_API_KEY (or CHATIQ_API_KEY_FILE) in the environment instead"
}


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path``, apply the environment, validate; raise ``ConfigError``."""
    return settings_from_mapping(read_file(path), os.environ if environ is None else environ)


def read_file(path: str | Path, text: bytes | None = None) -> dict[str, Any]:
    """The file's TOML (or ``text``, read from it already); ``ConfigError`` if
    there is none or it is not TOML."""
    try:
        if text is None:
            text = Path(path).read_bytes()
        return tomllib.loads(text.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def settings_from_mapping(raw: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    arrays = {"tenants", "issuers", "frontends", "bots"}
    unknown = sorted(set(raw) - set(_FILE_ONLY_TABLES) - arrays)
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*_FILE_ONLY_TABLES, *arrays], 1, 0.5)
        spelled = {"tenants": "[[tenants]]", "issuers": "[[issuers]]",
                   "frontends": "[frontends.<name>]", "bots": "[bots.<slug>]"}  # fmt: skip
        hint = f" (did you mean {spelled.get(close[0], f'[{close[0]}]')}?)" if close else ""
        raise ConfigError(f"{unknown[0]}: unknown key{hint}")
    server = raw.get("server", {})
    workers = server.get("workers") if isinstance(server, dict) else None
    if isinstance(workers, str):
        if workers != "auto":
            raise ConfigError(f'server.workers: a whole number or "auto", not {workers!r}')
        raw = {**raw, "server": {**server, "workers": AUTO_WORKERS}}  # the server counts them
    elif isinstance(workers, int) and not isinstance(workers, bool) and workers < 1:
        raise ConfigError('server.workers: at least 1, or "auto"')
    tables = {name: _build(cls, raw.get(name, {}), name) for name, cls in _FILE_ONLY_TABLES.items()}
    tenants = _tenants(raw.get("tenants", []))
    issuers = _issuers(raw.get("issuers", []), tenants)
    frontends = _frontends(raw.get("frontends", {}))
    bots = _bots(raw.get("bots", {}))
    settings = Settings(tenants=tenants, issuers=issuers, bots=bots, frontends=frontends, **tables)
    settings = _apply_environment(settings, environ)
    _validate(settings)
    return settings


def _read_secret(name: str, path: str) -> str:
    """The first line of a secret file; errors name the variable, never the content."""
    try:
        with open(path, encoding="utf-8") as f:
            value = f.readline().strip()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read {path} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{name}: {path} is empty")
    return value


def _apply_environment(settings: Settings, environ: Mapping[str, str]) -> Settings:
    upstream: dict[str, Any] = {}
    server: dict[str, Any] = {}
    redis: dict[str, Any] = {}
    if environ.get("GATEWAY_REDIS_URL"):
        redis["url"] = environ["GATEWAY_REDIS_URL"]
    if "CHATIQ_API_URL" in environ:
        upstream["url"] = environ["CHATIQ_API_URL"]
    if environ.get("CHATIQ_API_KEY"):
        upstream["api_key"] = environ["CHATIQ_API_KEY"]
    elif environ.get("CHATIQ_API_KEY_FILE"):  # a container secret, mounted as a file
        upstream["api_key"] = _read_secret("CHATIQ_API_KEY_FILE", environ["CHATIQ_API_KEY_FILE"])
    if not settings.upstream.proxy_url:  # the file says nothing: the environment decides
        url = upstream.get("url", settings.upstream.url)
        upstream["proxy_url"] = proxy_from_environment(url, environ) or DIRECT
    if "CHATIQ_BOT_SLUG" in environ:
        upstream["bot_slug"] = environ["CHATIQ_BOT_SLUG"]
    if "GATEWAY_HOST" in environ:
        server["host"] = environ["GATEWAY_HOST"]
    if "GATEWAY_PORT" in environ:
        try:
            server["port"] = int(environ["GATEWAY_PORT"])
        except ValueError:
            raise ConfigError("GATEWAY_PORT: not a whole number") from None
    return dataclasses.replace(
        settings,
        upstream=dataclasses.replace(settings.upstream, **upstream),
        server=dataclasses.replace(settings.server, **server),
        redis=dataclasses.replace(settings.redis, **redis),
    )


def _build(cls: type, table: object, path: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{path}.{key}"
        if where in _REPLACED:
            raise ConfigError(f"{where}: no longer used; {_REPLACED[where]}")
        if where in _ENV_ONLY:
            raise ConfigError(f"{where}: not allowed in the file; {_ENV_ONLY[where]}")
        if key not in names:
            raise ConfigError(f"{where}: unknown key")
        values[key] = _coerce(hints[key], value, where)
    try:
        return cls(**values)
    except TypeError:
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        raise ConfigError(f"{path}.{missing[0]}: missing") from None


def _coerce(hint: Any, value: object, where: str) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value  # type: ignore[arg-type]
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value  # type: ignore[arg-type]
    elif isinstance(hint, types.UnionType):
        # X | None: TOML has no null, so a value present is an X.
        (arm,) = (a for a in typing.get_args(hint) if a is not type(None))
        return _coerce(arm, value, where)
    else:  # pragma: no cover - a field type the loader does not know
        raise ConfigError(f"{where}: unsupported type {hint!r}")
    if not ok:
        raise ConfigError(f"{where}: must be {_describe(hint)}, not {type(value).__name__}")
    return value


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[hint]


def _frontends(raw: object) -> tuple[FrontendSettings, ...]:
    """The built-ins with their defaults, as each ``[frontends.<name>]`` table
    changes them, and any other name there (a plugin's entry point)."""
    if not isinstance(raw, dict):
        raise ConfigError("frontends: must be a table of [frontends.<name>] tables")
    tables: dict[str, Any] = {name: {} for name in BUILT_IN_FRONTENDS} | raw
    frontends = []
    for name, table in tables.items():
        where = f"frontends.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: must be a table")
        table = dict(table)
        prefix = table.pop("prefix", BUILT_IN_FRONTENDS.get(name))
        enabled = table.pop("enabled", True)
        path = re.compile(r"(/[A-Za-z0-9._~-]+)*")
        if prefix is not None and (not isinstance(prefix, str) or not path.fullmatch(prefix)):
            raise ConfigError(f'{where}.prefix: must be a path like /v1 (or "" for the root)')
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}.enabled: must be true or false")
        frontends.append(FrontendSettings(name, prefix, enabled, tuple(sorted(table.items()))))
    return tuple(frontends)


def _bots(raw: object) -> tuple[BotSettings, ...]:
    """Each ``[bots.<slug>]`` table: what the gateway says of that bot."""
    if not isinstance(raw, dict):
        raise ConfigError("bots: must be a table of [bots.<slug>] tables")
    bots = []
    for slug, table in raw.items():
        where = f"bots.{slug}"
        if not _BOT_SLUG.match(slug):
            raise ConfigError(f"{where}: not a valid bot slug")
        if isinstance(table, dict) and "slug" in table:
            raise ConfigError(f"{where}.slug: unknown key (the table's name is the slug)")
        bots.append(
            _build(
                BotSettings, {**table, "slug": slug} if isinstance(table, dict) else table, where
            )
        )
    return tuple(bots)


def _tenants(raw: object) -> tuple[Tenant, ...]:
    if not isinstance(raw, list):
        raise ConfigError("tenants: must be an array of tables ([[tenants]])")
    # A tenant without a key is signed in to by an issuer's tokens only.
    tenants = tuple(
        _build(Tenant, {"key_sha256": "", **t} if isinstance(t, dict) else t, f"tenants[{i}]")
        for i, t in enumerate(raw)
    )
    seen_names: set[str] = set()
    seen_hashes: set[str] = set()
    for i, t in enumerate(tenants):
        where = f"tenants[{i}]"
        if not t.name or t.name in seen_names:
            raise ConfigError(f"{where}.name: empty or used twice")
        more = [("more_keys_sha256", key) for key in t.more_keys_sha256]
        first = [("key_sha256", t.key_sha256)] if t.key_sha256 or more else []
        for option, key in [*first, *more]:
            if not _SHA256_HEX.match(key):
                raise ConfigError(
                    f"{where}.{option}: must be 64 lowercase hex digits "
                    "(the SHA-256 of the key, never the key itself)"
                )
            if key in seen_hashes:
                raise ConfigError(
                    f"{where}.{option}: the same key is given twice (a key names one tenant)"
                )
            seen_hashes.add(key)
        if not t.bots:
            raise ConfigError(f'{where}.bots: must list at least one bot (or "*")')
        for bot in t.bots:
            if bot != ANY_BOT and not _BOT_SLUG.match(bot):
                raise ConfigError(f"{where}.bots: {bot!r} is not a valid bot slug")
        seen_names.add(t.name)
    return tenants


def _issuers(raw: object, tenants: tuple[Tenant, ...]) -> tuple[Issuer, ...]:
    if not isinstance(raw, list):
        raise ConfigError("issuers: must be an array of tables ([[issuers]])")
    issuers = tuple(_build(Issuer, t, f"issuers[{i}]") for i, t in enumerate(raw))
    names = {t.name for t in tenants}
    seen: set[str] = set()
    for i, issuer in enumerate(issuers):
        where = f"issuers[{i}]"
        _check_idp_url(issuer.issuer, f"{where}.issuer")
        if issuer.issuer in seen:
            raise ConfigError(f"{where}.issuer: given twice (an issuer has one table)")
        seen.add(issuer.issuer)
        if issuer.jwks_url:
            _check_idp_url(issuer.jwks_url, f"{where}.jwks_url")
        if not issuer.audience:
            raise ConfigError(f'{where}.audience: must name the gateway\'s audience ("aud")')
        if bool(issuer.tenant) == bool(issuer.tenant_claim):
            raise ConfigError(f"{where}: give one of tenant or tenant_claim")
        if issuer.tenant and issuer.tenant not in names:
            raise ConfigError(f"{where}.tenant: no [[tenants]] is named {issuer.tenant!r}")
        if not issuer.user_claim:
            raise ConfigError(f'{where}.user_claim: must name a claim ("sub" by default)')
        if not issuer.algorithms:
            raise ConfigError(f"{where}.algorithms: must list at least one")
        for algorithm in issuer.algorithms:
            if algorithm not in TOKEN_ALGORITHMS:
                raise ConfigError(
                    f"{where}.algorithms: {algorithm!r} is not allowed (asymmetric ones only, "
                    f"never none or an HMAC: {', '.join(TOKEN_ALGORITHMS)})"
                )
        if not 0 <= issuer.leeway_s <= 300:
            raise ConfigError(f"{where}.leeway_s: between 0 and 300 seconds")
    claimed = any(issuer.tenant_claim for issuer in issuers)  # any tenant may be named
    for i, tenant in enumerate(tenants):
        named = claimed or any(issuer.tenant == tenant.name for issuer in issuers)
        if not tenant.keys_sha256 and not named:
            raise ConfigError(
                f"tenants[{i}].key_sha256: missing (a tenant without a key must be "
                "an [[issuers]] table's tenant)"
            )
    return issuers


def _check_idp_url(url: str, where: str) -> None:
    """An identity provider's URL: https, or http to this machine only (its
    keys decide who may call, so they never come over a network in clear)."""
    parts = urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if not (parts.scheme == "https" or (parts.scheme == "http" and loopback)) or not parts.hostname:
        raise ConfigError(f"{where}: must be an https URL (http only to this machine), not {url!r}")
    if not _VISIBLE_ASCII.fullmatch(url):
        raise ConfigError(f"{where}: spaces and control characters are not allowed")


def _validate(s: Settings) -> None:
    url = urlsplit(s.upstream.url)
    if not s.upstream.url:
        raise ConfigError("upstream.url: missing (set it in the file or CHATIQ_API_URL)")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"upstream.url: must be an http(s) URL, not {s.upstream.url!r}")
    if url.hostname == "chatiq.io":  # it redirects to www., and no redirect is followed
        raise ConfigError(
            "upstream.url: chatiq.io redirects to www.chatiq.io, and the gateway never "
            "follows a redirect with the key; use https://www.chatiq.io/api/chat"
        )
    if not _VISIBLE_ASCII.fullmatch(s.upstream.url):
        raise ConfigError("upstream.url: spaces and control characters are not allowed")
    if s.upstream.api_key is not None and not _VISIBLE_ASCII.fullmatch(s.upstream.api_key):
        # It goes into a request header as it is: never with a line break in it.
        raise ConfigError("CHATIQ_API_KEY: only visible ASCII characters are allowed")
    if s.upstream.proxy_url != DIRECT:
        try:
            parse_proxy(s.upstream.proxy_url)
        except ValueError as e:
            raise ConfigError(f"upstream.proxy_url (or the *_PROXY variable): {e}") from None
        if not _VISIBLE_ASCII.fullmatch(s.upstream.proxy_url):
            raise ConfigError("upstream.proxy_url: spaces and control characters are not allowed")
    if s.upstream.ca_file and not Path(s.upstream.ca_file).is_file():
        raise ConfigError(f"upstream.ca_file: no such file {s.upstream.ca_file!r}")
    for bot in s.upstream.bots:
        if not _BOT_SLUG.match(bot):
            raise ConfigError(f"upstream.bots: {bot!r} is not a valid bot slug")
    if not _BOT_SLUG.match(s.upstream.bot_slug):
        raise ConfigError("upstream.bot_slug: not a valid bot slug")
    if not 0 <= s.server.port <= 65535:
        raise ConfigError("server.port: must be between 0 and 65535")
    if s.server.static_dir and not (Path(s.server.static_dir) / "index.html").is_file():
        raise ConfigError(f"server.static_dir: no index.html in {s.server.static_dir!r}")
    for origin in s.server.cors_origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise ConfigError(
                f"server.cors_origins: {origin!r} is not an origin like https://app.example.com"
            )
    tls = s.server
    if bool(tls.tls_cert_file) != bool(tls.tls_key_file):
        raise ConfigError("server.tls_cert_file and tls_key_file: give both, or neither")
    if tls.tls_client_ca_file and not tls.tls_cert_file:
        raise ConfigError("server.tls_client_ca_file: needs tls_cert_file and tls_key_file")
    for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
        value = getattr(tls, key)
        if value and not Path(value).is_file():
            raise ConfigError(f"server.{key}: no such file {value!r}")
    if s.server.public_url:
        parts = urlsplit(s.server.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
            raise ConfigError(
                f"server.public_url: {s.server.public_url!r} is not an origin like "
                "https://gateway.example.com"
            )
    if not 0 <= s.metrics.port <= 65535:
        raise ConfigError("metrics.port: must be between 0 (the main port) and 65535")
    if s.metrics.token_sha256 and not _SHA256_HEX.match(s.metrics.token_sha256):
        raise ConfigError(
            "metrics.token_sha256: must be 64 lowercase hex digits (the SHA-256 of the token)"
        )
    positive = {
        "server.max_body_bytes": s.server.max_body_bytes,
        "server.max_message_chars": s.server.max_message_chars,
        "upstream.connect_timeout_s": s.upstream.connect_timeout_s,
        "upstream.first_byte_timeout_s": s.upstream.first_byte_timeout_s,
        "upstream.idle_timeout_s": s.upstream.idle_timeout_s,
        "upstream.total_timeout_s": s.upstream.total_timeout_s,
        "upstream.max_connections": s.upstream.max_connections,
        "upstream.max_event_bytes": s.upstream.max_event_bytes,
        "upstream.max_json_bytes": s.upstream.max_json_bytes,
        "upstream.pool_idle_s": s.upstream.pool_idle_s,
        "upstream.connection_max_age_s": s.upstream.connection_max_age_s,
        "upstream.max_head_bytes": s.upstream.max_head_bytes,
        "admission.max_streams": s.admission.max_streams,
        "server.backlog": s.server.backlog,
        "server.header_timeout_s": s.server.header_timeout_s,
        "server.body_timeout_s": s.server.body_timeout_s,
        "server.keepalive_timeout_s": s.server.keepalive_timeout_s,
        "server.max_connections": s.server.max_connections,
        "upstream.keepalive_s": s.upstream.keepalive_s,
        "upstream.client_write_timeout_s": s.upstream.client_write_timeout_s,
        "upstream.backoff_base_s": s.upstream.backoff_base_s,
        "circuit.window_s": s.circuit.window_s,
        "circuit.min_requests": s.circuit.min_requests,
        "circuit.half_open_requests": s.circuit.half_open_requests,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
    not_negative = {
        "server.max_history_items": s.server.max_history_items,
        "server.max_auth_failures_per_minute": s.server.max_auth_failures_per_minute,
        "admission.max_queue": s.admission.max_queue,
        "admission.queue_timeout_s": s.admission.queue_timeout_s,
        "admission.tenant_max_streams": s.admission.tenant_max_streams,
        "admission.tenant_requests_per_minute": s.admission.tenant_requests_per_minute,
        "server.shutdown_grace_s": s.server.shutdown_grace_s,
        "upstream.max_retries": s.upstream.max_retries,
        "upstream.retry_budget_s": s.upstream.retry_budget_s,
        "upstream.backoff_max_s": s.upstream.backoff_max_s,
        "upstream.retry_after_cap_s": s.upstream.retry_after_cap_s,
        "circuit.cooldown_s": s.circuit.cooldown_s,
        **{f"tenants.{t.name}.max_streams": t.max_streams or 0 for t in s.tenants},
        **{f"tenants.{t.name}.requests_per_minute": t.requests_per_minute or 0 for t in s.tenants},
        **{f"tenants.{t.name}.user_max_streams": t.user_max_streams for t in s.tenants},
        **{
            f"tenants.{t.name}.user_requests_per_minute": t.user_requests_per_minute
            for t in s.tenants
        },
    }
    for key, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
    r = s.resume
    if min(r.detach_grace_s, r.retain_s) <= 0 or min(r.max_stream_bytes, r.retry_ms) <= 0:
        raise ConfigError(
            "resume: detach_grace_s, retain_s, max_stream_bytes and retry_ms must be above 0"
        )
    if r.max_retained < 0:
        raise ConfigError("resume.max_retained: must be 0 or more")
    if s.redis.url and urlsplit(s.redis.url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("redis.url: must be a redis://, rediss:// or unix:// URL")
    if s.redis.on_error not in ("local", "reject"):
        raise ConfigError("redis.on_error: must be local or reject")
    if s.redis.expected_replicas < 1 or s.redis.timeout_s <= 0 or s.redis.lease_ttl_s <= 0:
        raise ConfigError(
            "redis: expected_replicas must be at least 1, timeout_s and lease_ttl_s above 0"
        )
    if s.admission.max_streams > s.upstream.max_connections:
        # Each admitted stream needs an upstream connection: the rest would wait
        # on the pool, unseen by the admission queue and its limits.
        raise ConfigError(
            f"admission.max_streams ({s.admission.max_streams}) is above "
            f"upstream.max_connections ({s.upstream.max_connections}): raise the pool "
            "or lower max_streams"
        )
    if not 0 < s.circuit.failure_rate <= 1:
        raise ConfigError("circuit.failure_rate: must be a share above 0 and at most 1 (0.5: half)")
    if s.logging.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("logging.level: must be debug, info, warning or error")
    if s.logging.format not in ("json", "console", "auto"):
        raise ConfigError("logging.format: must be json, console or auto")
    page = s.page
    if bool(page.oidc_issuer) != bool(page.oidc_client_id):
        raise ConfigError("page: give both oidc_issuer and oidc_client_id, or neither")
    if page.oidc_issuer and page.oidc_issuer not in {i.issuer for i in s.issuers}:
        raise ConfigError(
            "page.oidc_issuer: must be one of the [[issuers]] (the gateway checks the "
            "tokens the page signs in with against it)"
        )
    if page.oidc_issuer and not _VISIBLE_ASCII.fullmatch(
        page.oidc_client_id + page.oidc_scope.replace(" ", "")
    ):
        raise ConfigError("page: oidc_client_id and oidc_scope: visible ASCII only")
    if s.logging.user not in ("claim", "hash", "none"):
        raise ConfigError("logging.user: must be claim, hash or none")
    if s.server.event_loop not in ("auto", "uvloop", "asyncio"):
        raise ConfigError("server.event_loop: must be auto, uvloop or asyncio")
