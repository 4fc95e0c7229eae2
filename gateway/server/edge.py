"""The listening socket: aiohttp's HTTP server, with a deadline on each request
head and a cap on open connections.

aiohttp waits as long as a client likes for the headers of a request, so a
client sending a byte a second (slowloris) could hold a connection, and many
of them every socket the process may open. Here every request head, the
first on a connection and each later one on a kept-alive connection, must
arrive within ``server.header_timeout_s`` of its first byte (of the
connection's opening, for the first), or the client gets a 408 in ChatIQ's
error shape and the connection is closed. The wrapper only looks at what
clients send (requests, not the streams going out), a few bytes at a time.

Beyond ``server.max_connections`` open connections, a new one gets a 503 in
ChatIQ's error shape at once and is closed, so the process never runs out
of file descriptors (after which the kernel would reset clients silently).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import uvloop
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol

from gateway.exchange import SAFETY_HEADERS, RequestBoundary

_BODY = json.dumps(
    {"error": {"code": "REQUEST_TIMEOUT", "message": "the request headers took too long"}}
).encode()


RESPONSE_408 = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


_FULL_BODY = json.dumps(
    {"error": {"code": "OVERLOADED", "message": "too many open connections; try again shortly"}}
).encode()


RESPONSE_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
    + str(len(_FULL_BODY)).encode()
    + b"\r\n\r\n"
    + _FULL_BODY
)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: answered 503 and closed, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(RESPONSE_503)
        transport.close()


class _NodelayAlreadySet(BaseProtocol):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)


class MessageQueue(list[Any]):
    """A connection's parsed requests waiting for their turn, where aiohttp keeps
    a deque: a deque allocates a 64-slot block (~650 bytes) as it is made, and
    every connection, each held stream's among them, kept it for its life. A
    list holds only what is queued: one request, unless a client pipelines."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class GatewayRequestHandler(web.RequestHandler):
    """aiohttp's request handler, its request queue a ``MessageQueue``, and its
    own error answers (a request it cannot parse) with ``SAFETY_HEADERS``."""

    __slots__ = ()

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        if isinstance(getattr(self, "_messages", None), deque):  # aiohttp's attribute
            self._messages = MessageQueue()  # type: ignore[assignment]

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        response.headers.update(SAFETY_HEADERS)
        return response


class UvloopRequestHandler(GatewayRequestHandler, _NodelayAlreadySet):
    """aiohttp's request handler without its ``tcp_nodelay``: uvloop sets
    TCP_NODELAY on every socket it accepts, and aiohttp's BaseProtocol would
    set it again through a socket object it has uvloop make for the purpose
    (two getsockname(2), a setsockopt(2) and an object, per connection).
    ``RequestHandler.connection_made`` calls the base class's, which this
    class's method order makes ``_NodelayAlreadySet``'s."""

    __slots__ = ()


def request_handler(server: web.Server, loop: asyncio.AbstractEventLoop) -> web.RequestHandler:
    """A new connection's aiohttp protocol, as ``server()`` makes it."""
    if isinstance(loop, uvloop.Loop):
        return UvloopRequestHandler(server, loop=loop, **server._kwargs)
    return GatewayRequestHandler(server, loop=loop, **server._kwargs)


def _stop_keepalive_timer(handler: web.RequestHandler) -> None:
    """aiohttp's keep-alive timer, armed when a connection opens or goes idle,
    only ever closes an idle connection: once a request's head is in, it would
    fire for nothing, and a held stream would keep it (~550 bytes). aiohttp arms
    a new one when the response ends, as it does after every response. (The
    attribute is aiohttp's own: where a version lacks it, nothing is done.)"""
    handle: asyncio.Handle | None = getattr(handler, "_keepalive_handle", None)
    if handle is not None:
        handle.cancel()
        handler._keepalive_handle = None


class HeaderDeadline(asyncio.Protocol, RequestBoundary):
    """Wraps aiohttp's protocol for one connection: a deadline on each request head."""

    # No __dict__: one of these per live stream.
    __slots__ = (
        "_between_requests",
        "_inner",
        "_loop",
        "_on_lost",
        "_on_timeout",
        "_tail",
        "_timeout_s",
        "_timer",
        "_transport",
    )

    def __init__(
        self,
        inner: web.RequestHandler,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
        on_timeout: Callable[[], None],
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._inner = inner
        self._loop = loop
        self._on_lost = on_lost
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, to find a head's end across reads
        self._between_requests = False  # a request was handled; no byte of the next yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._between_requests:  # the first byte of the next request's head
            self._between_requests = False
            self._arm()
        if self._timer is not None:
            seen = self._tail + data
            if seen.find(b"\r\n\r\n") >= 0:  # (``in`` would first try it as an int, and fail)
                self._timer.cancel()
                self._timer = None
                self._tail = b""
                _stop_keepalive_timer(self._inner)
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def request_finished(self) -> None:
        """The request was handled: what the client sends next is a new head."""
        self._between_requests = True

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self._timeout_s, self._expire)

    def eof_received(self) -> bool | None:
        self._inner.eof_received()
        return None  # (aiohttp's: the connection closes)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_lost()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _expire(self) -> None:
        self._timer = None
        self._on_timeout()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(RESPONSE_408)
            self._transport.close()


class GatewaySite(web.BaseSite):
    """A TCP site whose connections each get a :class:`HeaderDeadline`."""

    __slots__ = (
        "_header_timeout_s",
        "_host",
        "_max_connections",
        "_on_refused",
        "_on_timeout",
        "_open",
        "_port",
        "_reuse_port",
        "_ssl_context",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        backlog: int,
        header_timeout_s: float,
        on_timeout: Callable[[], None],
        max_connections: int,
        on_refused: Callable[[], None],
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._ssl_context = ssl_context
        self._max_connections = max_connections
        self._on_refused = on_refused
        self._open = 0
        self._reuse_port = reuse_port
        self._host = host
        self._port = port
        self._header_timeout_s = header_timeout_s
        self._on_timeout = on_timeout

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def connection() -> asyncio.Protocol:
            if self._open >= self._max_connections:
                self._on_refused()
                return _Refuse()
            self._open += 1
            return HeaderDeadline(
                request_handler(server, loop), loop, self._header_timeout_s, self._on_timeout,
                closed,
            )  # fmt: skip

        def closed() -> None:
            self._open -= 1

        self._server = await loop.create_server(
            connection, self._host, self._port, backlog=self._backlog,
            reuse_address=True, reuse_port=self._reuse_port, ssl=self._ssl_context,
        )  # fmt: skip
