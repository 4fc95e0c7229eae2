"""The configuration: the settings (``settings``), read from the TOML file and
the environment and checked key by key (``load``), and the egress proxy as the
environment names it (``proxies``).

Part of the shared vocabulary: it imports nothing else of the gateway. It
holds what the file and the environment say; the server counts the cores for
``server.workers = "auto"``.
"""

from gateway.config.load import load_settings, read_file, settings_from_mapping
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
    bots_for,
    named_bots,
)

__all__ = [
    "ANY_BOT",
    "AUTO_WORKERS",
    "BUILT_IN_FRONTENDS",
    "TOKEN_ALGORITHMS",
    "AdmissionSettings",
    "BotSettings",
    "CircuitSettings",
    "ConfigError",
    "FrontendSettings",
    "Issuer",
    "LoggingSettings",
    "MetricsSettings",
    "PageSettings",
    "RedisSettings",
    "ResponsesSettings",
    "ResumeSettings",
    "ServerSettings",
    "Settings",
    "Tenant",
    "TracingSettings",
    "UpstreamSettings",
    "bots_for",
    "load_settings",
    "named_bots",
    "read_file",
    "settings_from_mapping",
]
