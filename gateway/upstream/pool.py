"""Keep-alive connections to the upstream's origin: at most ``max_connections``
open, none kept past ``pool_idle_s`` idle or ``connection_max_age_s`` old, DNS
resolved again every few seconds, TLS with the private CA when one is set,
and through the egress proxy when one is configured.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from gateway.config import UpstreamSettings
from gateway.config.proxies import DIRECT, Proxy, parse_proxy
from gateway.upstream.connection import READ_BYTES, Connection
from gateway.upstream.egress import open_tunnel

_DNS_TTL_S = 10.0


class Pool:
    """Keep-alive connections to one origin, at most ``max_connections`` open."""

    def __init__(
        self, settings: UpstreamSettings, on_wait: Callable[[float], None] = lambda s: None
    ) -> None:
        self._on_wait = on_wait  # seconds a request waited for a connection slot
        # Made in the loop it serves; kept, as asking for it costs a system call
        # (getpid, in Python 3.11's asyncio) each time.
        self.loop = asyncio.get_running_loop()
        parts = urlsplit(settings.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = parts.port is None or parts.port == (443 if self.https else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default_port else f"{host}:{self.port}"
        # For a trace: no query (it might hold a token), no user or password.
        self.url = f"{parts.scheme}://{self.authority}{parts.path or '/'}"
        proxy_url = "" if settings.proxy_url == DIRECT else settings.proxy_url
        self.proxy: Proxy | None = parse_proxy(proxy_url) if proxy_url else None
        # A plain-http request through a proxy names the whole URL (RFC 9112 3.2.2).
        plain_proxy = self.proxy is not None and not self.https
        self.request_target = f"http://{self.authority}{path}" if plain_proxy else path
        self.proxy_authorization = self.proxy.authorization if plain_proxy and self.proxy else None
        self.reconfigure(settings)
        self._ssl = _tls_context(settings.ca_file) if self.https else None
        # Every connection reads into this and it is parsed before the next read.
        self.read_buffer = memoryview(bytearray(READ_BYTES))
        # Idle connections, the most recently used last (a dict: a closed one
        # leaves in O(1)).
        self._idle: dict[Connection, None] = {}
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._waiting = 0  # requests waiting for a slot
        self._open: set[Connection] = set()
        self._addresses: tuple[list[str], float] | None = None  # resolved, and until when

    def reconfigure(self, settings: UpstreamSettings) -> None:
        """The limits a reload may change (the address, proxy and size need a restart)."""
        self.idle_s = settings.pool_idle_s
        self.max_age_s = settings.connection_max_age_s
        self.max_head_bytes = settings.max_head_bytes
        self._dns_ttl_s = min(_DNS_TTL_S, self.max_age_s / 10)  # a DNS change: max age + 10%

    async def acquire(self, connect_timeout_s: float, *, fresh: bool = False) -> Connection:
        """An idle connection (unless ``fresh``), or a new one (``TimeoutError`` if
        connecting takes too long)."""
        loop = self.loop
        now = loop.time()
        while self._idle and not fresh:
            conn, _ = self._idle.popitem()  # the most recently used
            if self._reusable(conn, now):
                conn.reused = True
                self._on_wait(0.0)
                return conn
            self._close(conn)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._on_wait(loop.time() - now)
        try:
            async with asyncio.timeout(connect_timeout_s):
                conn = await self._connect(loop)
        except BaseException:
            self._slots.release()
            raise
        self._open.add(conn)
        return conn

    def _reusable(self, conn: Connection, now: float) -> bool:
        transport = conn.transport
        return (
            transport is not None
            and not transport.is_closing()
            and now - conn.idle_since < min(conn.idle_limit_s, self.idle_s)
            and now - conn.created < self.max_age_s
        )

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> Connection:
        """A new connection: through the proxy, or to the first of the host's
        addresses that answers."""
        if self.proxy is not None:
            return await self._connect_via_proxy(loop, self.proxy)
        failure: OSError | None = None
        for address in await self._resolve(loop):
            try:
                _, conn = await loop.create_connection(
                    lambda: Connection(self),
                    address,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
                return conn
            except OSError as e:  # e.g. an IPv6 address on a host without IPv6
                failure = e
        assert failure is not None
        raise failure

    async def _connect_via_proxy(self, loop: asyncio.AbstractEventLoop, proxy: Proxy) -> Connection:
        if self._ssl is None:  # plain http: requests go to the proxy in absolute form
            _, conn = await loop.create_connection(lambda: Connection(self), proxy.host, proxy.port)
            return conn
        tunnel = await open_tunnel(loop, proxy, f"{self.host}:{self.port}")
        conn = Connection(self)
        try:  # TLS with the upstream itself, inside the tunnel: verified for its name
            transport = await loop.start_tls(tunnel, conn, self._ssl, server_hostname=self.host)
        except BaseException:
            tunnel.close()
            raise
        assert transport is not None
        conn.connection_made(transport)
        return conn

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        """The host's addresses, cached briefly: a burst of new streams asks once."""
        if self._addresses is not None and loop.time() < self._addresses[1]:
            return self._addresses[0]
        addresses = await self.lookup(self.host, self.port)
        if not addresses:
            raise OSError(f"no address for {self.host}")
        self._addresses = (addresses, loop.time() + self._dns_ttl_s)
        return addresses

    async def preflight(self, timeout_s: float = 5.0) -> str | None:
        """What would stop the first request, said at start: a proxy that does not
        answer, or a host name that does not resolve; None when both look fine."""
        try:
            async with asyncio.timeout(timeout_s):
                if self.proxy is not None:
                    _, writer = await asyncio.open_connection(self.proxy.host, self.proxy.port)
                    writer.close()
                else:
                    await self._resolve(asyncio.get_running_loop())
        except (OSError, TimeoutError) as e:
            where = f"the proxy {self.proxy.display}" if self.proxy else f"the host {self.host!r}"
            return f"{where}: {e or 'no answer in time'}"
        return None

    async def lookup(self, host: str, port: int) -> list[str]:
        """The system resolver's addresses for ``host`` (tests replace this)."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def put(self, conn: Connection) -> None:
        now = self.loop.time()
        # Kept idle like any open connection (at most max_connections in all), but
        # closed when requests wait for a slot: its slot is theirs.
        if self._waiting or now - conn.created >= self.max_age_s:
            self._close(conn)
            return
        conn.idle_since = now
        self._idle[conn] = None

    @staticmethod
    def _close(conn: Connection) -> None:
        """Closed; ``lost`` gives its slot back once the transport is gone."""
        if conn.transport is not None:
            conn.transport.close()

    def lost(self, conn: Connection) -> None:
        if conn in self._open:
            self._open.discard(conn)
            self._slots.release()
        self._idle.pop(conn, None)

    def close(self) -> None:
        for conn in list(self._open):
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


def _tls_context(ca_file: str) -> ssl.SSLContext:
    """The system's trust store (which honours SSL_CERT_FILE and SSL_CERT_DIR),
    plus ``ca_file`` when set (a private CA, a TLS-inspecting proxy)."""
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context
