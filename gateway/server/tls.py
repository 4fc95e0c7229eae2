"""TLS on the listening port (``[server] tls_cert_file``, ``tls_key_file``,
and ``tls_client_ca_file`` for mutual TLS): TLS 1.2 at least, certificates
read again on SIGHUP. A reload swaps the context new connections get (each
handshake picks the current one); a connection that is open keeps the
certificate it was opened with, so no stream is dropped."""

from __future__ import annotations

import ssl

from aiohttp import web

from gateway.config import ConfigError, ServerSettings

TLS_KEYS = ("tls_cert_file", "tls_key_file", "tls_client_ca_file")


def tls_mode(server: ServerSettings) -> str:
    """What the listener speaks: a change of it needs a restart (files may change on reload)."""
    if not server.tls_cert_file:
        return "plain"
    return "mutual" if server.tls_client_ca_file else "tls"


def make_context(server: ServerSettings) -> ssl.SSLContext:
    """The context for these files; ``ConfigError`` naming the one that fails."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"server.tls_cert_file / tls_key_file: cannot load them ({_reason(e)})"
        ) from None
    if server.tls_client_ca_file:
        try:
            context.load_verify_locations(server.tls_client_ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"server.tls_client_ca_file: cannot load it ({_reason(e)})") from None
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no request
    return context


class Certificates:
    """The listener's TLS: ``listening`` is the context the socket was opened
    with; each handshake switches to ``current``, which a reload replaces."""

    def __init__(self, server: ServerSettings) -> None:
        self.current = make_context(server)
        self.listening = make_context(server)
        self.listening.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self.current


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or str(error)
    return getattr(error, "strerror", None) or str(error)


TLS = web.AppKey("tls", Certificates)  # on the app, when the listener speaks TLS
