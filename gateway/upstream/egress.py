"""The way out to the upstream through a proxy: the ``CONNECT`` tunnel (which
proxy is ``gateway.config.proxies``'s choice).

An https upstream is reached through a ``CONNECT`` tunnel, with TLS verified
end to end for the upstream's own name: the proxy sees neither the key nor the
chat. Credentials in the proxy URL go out as ``Proxy-Authorization: Basic``
and are never logged (``Proxy.display`` leaves them out).
"""

from __future__ import annotations

import asyncio

import httptools

from gateway.config.proxies import Proxy

_CONNECT_HEAD_LIMIT = 16 * 1024


class ProxyError(OSError):
    """The proxy refused or broke the tunnel."""


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
