"""The settings: one immutable object, every table of the file a frozen
dataclass. What they hold is what the file and the environment say, unresolved
(``server.workers = "auto"`` stays ``AUTO_WORKERS``; the server counts the
cores); ``gateway.config.load`` builds them and checks every value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ANY_BOT = "*"
AUTO_WORKERS = 0  # server.workers = "auto"


class ConfigError(Exception):
    """A configuration problem, worded for one line: ``<key>: <what is wrong>``."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    backlog: int = 2048  # pending connections the kernel queues (capped by net.core.somaxconn)
    # Processes sharing the port (SO_REUSEPORT); limits apply per process.
    # "auto" in the file (AUTO_WORKERS here; or --workers auto): one per core
    # this process may use, counted by the server as it starts.
    workers: int = 1
    header_timeout_s: float = 10.0  # each request head, from its first byte, else 408
    body_timeout_s: float = 30.0  # a request body must be in by then, else 408
    keepalive_timeout_s: float = 60.0  # idle client connections are closed after this
    # Client connections open at once; more are answered 503 and closed. Capped
    # at start by the open-files limit (each stream also holds an upstream socket).
    max_connections: int = 10000
    event_loop: str = "auto"  # "uvloop", "asyncio", or "auto" (uvloop when installed)
    max_body_bytes: int = 64 * 1024
    max_message_chars: int = 8000
    max_history_items: int = 100
    shutdown_grace_s: float = 30.0  # on SIGTERM, how long live streams may finish
    # Unknown keys from one address before it gets 429 for the rest of the minute (0: off).
    max_auth_failures_per_minute: int = 30
    static_dir: str = ""  # the page served at "/" ("": the bundled clients/web)
    cors_origins: tuple[str, ...] = ()  # pages elsewhere allowed to call the API
    # The gateway's origin as its clients reach it (behind a TLS proxy, say):
    # sign-in discovery names it. "": each request's own scheme and host.
    public_url: str = ""
    # TLS on the listening port (both files, PEM); with a client CA, mutual TLS.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # clients must present a certificate it signed
    # Sent with the page and its files: scripts and styles only from the
    # gateway itself (the page has no inline script), images from https (a
    # reply's attachments), requests only to the gateway, no framing.
    content_security_policy: str = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' https: data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: str = ""
    bot_slug: str = "default"
    # Bots offered to keys allowed every bot ("*"), in the page's picker and
    # /v1/models, beside the default; any other slug still works when named.
    bots: tuple[str, ...] = ()
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    total_timeout_s: float = 600.0
    max_connections: int = 2000
    max_event_bytes: int = 1 << 20
    max_json_bytes: int = 4 << 20
    keepalive_s: float = 15.0  # ": ping" comment while the upstream is silent mid-stream
    client_write_timeout_s: float = 30.0  # a client that reads nothing this long is dropped
    # Retries, only before any byte reached the client.
    max_retries: int = 2
    retry_budget_s: float = 10.0  # no retry starts later than this after the request
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    retry_after_cap_s: float = 10.0  # the most of an upstream's Retry-After that is honoured
    # The connection pool: idle connections are closed before common servers'
    # keep-alive timeouts (5 s for uvicorn and Node) close them under a request.
    pool_idle_s: float = 4.0
    connection_max_age_s: float = 60.0  # then a new connection (and a new DNS answer)
    max_head_bytes: int = 64 * 1024  # a larger response head is a protocol error
    # Egress: "" takes HTTPS_PROXY / HTTP_PROXY / ALL_PROXY / NO_PROXY from the
    # environment; "direct" uses no proxy. Credentials in it are never logged.
    proxy_url: str = field(default="", repr=False)
    ca_file: str = ""  # extra CA certificates (PEM) to trust for the upstream
    # Only from the environment (CHATIQ_API_KEY, or the file CHATIQ_API_KEY_FILE
    # names): never in the config file, never printed.
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class AdmissionSettings:
    max_streams: int = 1000
    max_queue: int = 1000
    queue_timeout_s: float = 10.0
    # Defaults for every tenant; a tenant may set its own. 0: no limit.
    tenant_max_streams: int = 100
    tenant_requests_per_minute: int = 600


@dataclass(frozen=True, slots=True)
class CircuitSettings:
    # One breaker per bot. It opens when, over the last window_s seconds, at
    # least min_requests requests ended and failure_rate of them failed (a
    # request's final outcome, after its retries).
    failure_rate: float = 0.5
    window_s: float = 30.0
    min_requests: int = 10
    cooldown_s: float = 10.0  # open this long, then half-open (with or without traffic)
    half_open_requests: int = 3  # probes let through half-open; all must succeed to close


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """``[redis]``: with a ``url``, tenant quotas are shared by every replica."""

    url: str = field(
        default="", repr=False
    )  # redis://[:password@]host:6379/0 (may hold a password)
    key_prefix: str = "chatiq-gateway"
    timeout_s: float = 0.25  # each round trip; slower counts as Redis being down
    lease_ttl_s: float = 15.0  # a dead replica's streams free their tenants' slots by then
    # Redis down: "local" quotas (each limit / expected_replicas, per process) or "reject" (503).
    on_error: str = "local"
    expected_replicas: int = 1
    warn_every_s: float = 30.0  # "Redis is down" at most this often in the log


@dataclass(frozen=True, slots=True)
class ResumeSettings:
    """``[resume]``: streams that outlive their connection, resumed with ``Last-Event-ID``."""

    # Streams may be resumable, and the resume route is mounted. Which streams
    # are: a tenant's with ``resumable = true``, and any request's with the
    # header ``X-Resumable: 1`` (``X-Resumable: 0`` opts out).
    enabled: bool = False
    detach_grace_s: float = 30.0  # nobody reading: the upstream is read this long, then cancelled
    retain_s: float = 60.0  # a finished stream can still be resumed this long
    max_stream_bytes: int = 256 * 1024  # events kept per stream; beyond, the oldest are let go
    max_retained: int = 1000  # finished streams kept at most (the oldest go first)
    retry_ms: int = 1000  # the ``retry:`` hint sent with a hand-over on shutdown


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool = True
    port: int = 0  # 0: /metrics on the main port; else only on this port
    host: str = "127.0.0.1"  # with a port of its own
    token_sha256: str = ""  # when set, /metrics needs "Authorization: Bearer <token>"


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """``[tracing]``: OpenTelemetry traces (the ``OTEL_*`` variables say the rest)."""

    enabled: bool = False  # also on when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str = "info"
    format: str = "auto"  # "json", "console", or "auto" (console on a terminal)
    # A signed-in user on each request's line: "claim" (as the token says),
    # "hash" (a digest that tells users apart), "none".
    user: str = "claim"


@dataclass(frozen=True, slots=True)
class PageSettings:
    """``[page]``: the chat page's single sign-on (OpenID Connect's authorization
    code flow with PKCE, in the browser; a public client, no secret)."""

    oidc_issuer: str = ""  # one of the [[issuers]]; "": the page asks for a key
    oidc_client_id: str = ""  # the page's client at that issuer
    oidc_scope: str = "openid"  # what the page asks for (and any scope the gateway's tokens need)


@dataclass(frozen=True, slots=True)
class ResponsesSettings:
    """``[responses]``: what the Responses API keeps of each response it gave out
    (``previous_response_id``, ``GET /v1/responses/{id}``)."""

    retain_s: float = 86400.0  # a response can be continued or read back this long
    max_stored: int = 10000  # responses kept per process (the oldest go first)


@dataclass(frozen=True, slots=True)
class BotSettings:
    """One ``[bots.<slug>]`` table: what the gateway says of a bot (its MCP tool's description)."""

    slug: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    """One ``[frontends.<name>]`` table: a wire format, mounted under ``prefix``."""

    name: str
    prefix: str | None  # None: the frontend's own default
    enabled: bool = True
    # Whatever else the table holds, for the frontend itself (a plugin's own keys).
    options: tuple[tuple[str, Any], ...] = ()


# The built-in frontends and where they mount by default (the contract's routes).
BUILT_IN_FRONTENDS = {"chatiq": "/api", "openai": "/v1", "ai-sdk": "/api/ui", "mcp": "/mcp"}


# The signature algorithms a token may use: asymmetric only (never "none",
# never an HMAC, whose secret a published key set would be).
TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                    "ES256", "ES384", "ES512", "EdDSA")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Issuer:
    """One ``[[issuers]]`` table: an identity provider whose JWTs sign callers in."""

    issuer: str  # its "iss"; discovery at {issuer}/.well-known/openid-configuration
    audience: str  # the "aud" its tokens for the gateway carry
    tenant: str = ""  # the tenant whose bots and quotas its tokens get
    tenant_claim: str = ""  # or: the claim whose value names the tenant
    user_claim: str = "sub"  # who the caller is
    jwks_url: str = ""  # its keys, instead of discovery
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway_s: float = 30.0  # clock skew allowed on exp, nbf and iat


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key_sha256: str  # "" (none in the file): only an issuer's tokens sign its callers in
    bots: tuple[str, ...]
    max_streams: int | None = None  # None: admission.tenant_max_streams
    requests_per_minute: int | None = None  # None: admission.tenant_requests_per_minute
    resumable: bool = False  # its streams are resumable (with [resume] enabled)
    # Each signed-in user's own share (tokens of an issuer; 0: no limit of their own).
    user_requests_per_minute: int = 0
    user_max_streams: int = 0
    # Further keys of the same tenant (one quota, one name in metrics): a new
    # key beside the old one while its apps move over, or a key for each app.
    more_keys_sha256: tuple[str, ...] = ()

    @property
    def keys_sha256(self) -> tuple[str, ...]:
        return tuple(k for k in (self.key_sha256, *self.more_keys_sha256) if k)

    def may_use(self, bot: str) -> bool:
        return ANY_BOT in self.bots or bot in self.bots


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    admission: AdmissionSettings = AdmissionSettings()
    circuit: CircuitSettings = CircuitSettings()
    redis: RedisSettings = RedisSettings()
    resume: ResumeSettings = ResumeSettings()
    responses: ResponsesSettings = ResponsesSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    tracing: TracingSettings = TracingSettings()
    page: PageSettings = PageSettings()
    tenants: tuple[Tenant, ...] = ()
    issuers: tuple[Issuer, ...] = ()
    bots: tuple[BotSettings, ...] = ()
    frontends: tuple[FrontendSettings, ...] = tuple(
        FrontendSettings(name, prefix) for name, prefix in BUILT_IN_FRONTENDS.items()
    )


def named_bots(settings: Settings) -> frozenset[str]:
    """Every bot the configuration names: the metrics' bounded set of bot labels."""
    named = {settings.upstream.bot_slug, *settings.upstream.bots}
    for tenant in settings.tenants:
        named.update(b for b in tenant.bots if b != ANY_BOT)
    return frozenset(named)


def bots_for(tenant: Tenant, settings: Settings) -> list[str]:
    """The bots a tenant's key may use, as clients list them: the ones it names,
    or for ``"*"`` the default first and then every bot the configuration names."""
    default = settings.upstream.bot_slug
    named = [b for b in tenant.bots if b != ANY_BOT]
    if ANY_BOT not in tenant.bots:
        return named
    offered = {*settings.upstream.bots, *(b for t in settings.tenants for b in t.bots)}
    return [default, *sorted(offered - {ANY_BOT, default})]
