"""The listening site's connections, seen from the server's side of the socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiohttp
import pytest
import uvloop
from aiohttp import web

from gateway.server.edge import GatewaySite, HeaderDeadline, UvloopRequestHandler
from loadtest.harness import free_port

pytestmark = pytest.mark.process


async def nodelay_seen_by_a_handler() -> tuple[int, type[object]]:
    """TCP_NODELAY on the socket a request came in on, and the connection's
    aiohttp protocol class, through a GatewaySite on the running loop."""
    seen: dict[str, int] = {}
    protocols: list[type[object]] = []

    async def handler(request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        seen["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        deadline = transport.get_protocol()
        assert isinstance(deadline, HeaderDeadline)
        protocols.append(type(deadline._inner))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    site = GatewaySite(
        runner, "127.0.0.1", port, backlog=16, header_timeout_s=5, on_timeout=lambda: None,
        max_connections=10, on_refused=lambda: None,
    )  # fmt: skip
    await site.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/") as r,
        ):
            assert r.status == 200
    finally:
        await runner.cleanup()
    return seen["nodelay"], protocols[0]


@pytest.mark.parametrize(
    "loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"]
)
def test_client_sockets_have_nodelay_on_either_loop(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    # Small event writes must not wait for an ACK (Nagle): on uvloop the loop
    # set the option at accept, and aiohttp's own setting of it is skipped.
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        nodelay, protocol = runner.run(nodelay_seen_by_a_handler())
    assert nodelay != 0
    on_uvloop = loop_factory is uvloop.new_event_loop
    assert (protocol is UvloopRequestHandler) is on_uvloop, protocol
    assert issubclass(protocol, web.RequestHandler)
