"""The way out to the upstream: which proxy (if any), and the CONNECT tunnel.

The proxy comes from ``upstream.proxy_url`` when set (``"direct"``: none),
else from the environment as curl and requests read it: ``https_proxy`` /
``HTTPS_PROXY`` for an https upstream, ``http_proxy`` / ``HTTP_PROXY`` for
http, then ``all_proxy`` / ``ALL_PROXY`` (lower case first), unless
``no_proxy`` / ``NO_PROXY`` names the host (``*``, a name and its
subdomains, an address, or an address range like ``10.0.0.0/8``).

An https upstream is reached through a ``CONNECT`` tunnel, with TLS verified
end to end for the upstream's own name: the proxy sees neither the key nor the
chat. Credentials in the proxy URL go out as ``Proxy-Authorization: Basic``
and are never logged (``Proxy.display`` leaves them out).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import httptools

DIRECT = "direct"
_CONNECT_HEAD_LIMIT = 16 * 1024


class ProxyError(OSError):
    """The proxy refused or broke the tunnel."""


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)  # Proxy-Authorization

    @property
    def display(self) -> str:
        """For logs: where it is, never who logs in."""
        return f"http://{self.host}:{self.port}"


def parse_proxy(url: str) -> Proxy:
    """An ``http://[user:pass@]host[:port]`` proxy URL; ``ValueError`` says what is wrong."""
    if "://" not in url:
        url = "http://" + url  # curl's default scheme for a proxy
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// proxies are supported, not {parts.scheme}://")
    if not parts.hostname:
        raise ValueError("the proxy URL names no host")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("the proxy URL's port is not a number") from None
    authorization = None
    if parts.username is not None:
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(user_pass.encode()).decode("ascii")
    return Proxy(parts.hostname, port, authorization)


def proxy_display(proxy_url: str) -> str:
    """A proxy setting for a log line: where, never who."""
    if not proxy_url or proxy_url == DIRECT:
        return DIRECT
    try:
        return parse_proxy(proxy_url).display
    except ValueError:
        return "invalid"


def proxy_from_environment(upstream_url: str, environ: Mapping[str, str]) -> str:
    """The proxy URL the environment gives for ``upstream_url``; "" for none."""

    def variable(name: str) -> str:
        return environ.get(name.lower()) or environ.get(name.upper()) or ""

    parts = urlsplit(upstream_url)
    scheme_proxy = "https_proxy" if parts.scheme == "https" else "http_proxy"
    proxy = variable(scheme_proxy) or variable("all_proxy")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not proxy or _bypassed(parts.hostname or "", port, variable("no_proxy")):
        return ""
    return proxy


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``no_proxy`` names the host: ``*``; a name, which covers its
    subdomains (a leading dot changes nothing); ``name:port``; an address; or
    an address range (``10.0.0.0/8``)."""
    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        if not entry:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
                continue
            except ValueError:
                pass
        name, colon, entry_port = entry.rpartition(":") if entry.count(":") == 1 else ("", "", "")
        if colon:
            if entry_port != str(port):
                continue
            entry = name
        entry = entry.lstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


class _ConnectReply(asyncio.Protocol):
    """Reads the proxy's answer to ``CONNECT``; nothing else is expected before TLS."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._size = 0

    def data_received(self, data: bytes) -> None:
        self._size += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._settle(ProxyError("the proxy's answer to CONNECT is not HTTP"))
        if self._size > _CONNECT_HEAD_LIMIT:
            self._settle(ProxyError("the proxy's answer to CONNECT is too large"))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # interim
        if not self.answer.done():
            self.answer.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(ProxyError("the proxy closed the connection during CONNECT"))

    def _settle(self, error: ProxyError) -> None:
        if not self.answer.done():
            self.answer.set_exception(error)


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, authority: str
) -> asyncio.Transport:
    """A TCP connection to ``authority`` (host:port) through the proxy's CONNECT."""
    transport, reply = await loop.create_connection(_ConnectReply, proxy.host, proxy.port)
    try:
        head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        if proxy.authorization:
            head += f"Proxy-Authorization: {proxy.authorization}\r\n"
        transport.write((head + "\r\n").encode("latin-1"))
        status = await reply.answer
        if status != 200:
            hint = " (check the proxy's user and password)" if status in (401, 407) else ""
            raise ProxyError(f"the proxy answered CONNECT with HTTP {status}{hint}")
    except BaseException:
        transport.close()
        raise
    return transport
