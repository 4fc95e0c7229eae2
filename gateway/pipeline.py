"""The one path every chat request takes, whatever its frontend:

    client -> auth -> frontend.parse -> bot check -> admission -> upstream -> relay -> client

Auth, the bot check, admission and quotas, retries and the breaker (in the
upstream client), timeouts, backpressure, drain and cancellation are the
same for every frontend; the frontend only reads its body and writes its
own answers (``gateway.frontends.base``). The app binds each frontend's
chat routes (and its routes for a tenant) here with ``bind``.
"""

from __future__ import annotations

import asyncio
from functools import partial

from aiohttp import web

from gateway.auth.discovery import metadata_url
from gateway.auth.tenants import tenant_of
from gateway.chat import (
    ChatRequest,
    DispatchHandler,
    Dispatching,
    ForTenant,
    ServedByThePipeline,
    TenantHandler,
    WireFormat,
    served_by_the_pipeline,
)
from gateway.config import ANY_BOT, Tenant, named_bots
from gateway.errors import (
    Draining,
    Forbidden,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    UnknownBot,
    UnsupportedMediaType,
)
from gateway.exchange import exchange_of, release_body_buffer
from gateway.quotas.admission import ADMISSION
from gateway.relay import Relay
from gateway.resume.serve import serve_resumable, wants_resumable
from gateway.state import LIFECYCLE, METRICS, SETTINGS
from gateway.upstream.client import UPSTREAM


async def read_body(request: web.Request) -> bytes:
    """The request's JSON body, within ``server.body_timeout_s`` and ``max_body_bytes``."""
    server = request.app[SETTINGS].current.server
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as 'Content-Type: application/json'")
    try:
        if request.content.is_eof():  # it came with the head (most do): no timer needed
            body = await request.read()
        else:
            async with asyncio.timeout(server.body_timeout_s):
                body = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {server.body_timeout_s:g} s"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body is larger than {server.max_body_bytes} bytes") from None
    release_body_buffer(request)
    return body


async def serve_chat(request: web.Request, frontend: WireFormat) -> web.StreamResponse:
    tenant = await tenant_of(request)
    chat = frontend.parse(await read_body(request), request.app[SETTINGS].current)
    return await serve_parsed(request, tenant, chat, frontend)


async def serve_parsed(
    request: web.Request, tenant: Tenant, chat: ChatRequest, frontend: WireFormat
) -> web.StreamResponse:
    """A chat from the bot check on: admission, the upstream, the relay."""
    app = request.app
    settings = app[SETTINGS].current
    lifecycle = app[LIFECYCLE]
    ex = exchange_of(request)
    metrics = app[METRICS]
    ex.bot, ex.bot_label = chat.bot, metrics.bot_label(chat.bot)
    ex.conversation_id = chat.conversation_id
    if not tenant.may_use(chat.bot):
        if ANY_BOT not in tenant.bots and chat.bot not in named_bots(settings):
            raise UnknownBot(f"no bot {chat.bot!r} for this key")
        raise Forbidden(f"this key may not use the bot {chat.bot!r}")
    if lifecycle.draining:
        raise Draining("the gateway is restarting; please retry", retry_after=1)
    if frontend.prepare is not None:
        chat = await frontend.prepare(request, tenant, chat)

    deadline = ex.started + settings.upstream.total_timeout_s
    # The gateway's own time before the upstream call; the queue wait is not ours.
    upstream = app[UPSTREAM]
    metrics.pre_upstream.observe(upstream.loop.time() - ex.started)
    if wants_resumable(request, tenant, frontend, settings) and chat.stream:
        return await serve_resumable(request, frontend, chat, ex, deadline)
    slot = app[ADMISSION].slot(tenant.name, ex.user_id)
    trace = ex.trace
    if trace is None:
        await slot.take()
    else:
        queued = upstream.loop.time()
        await slot.take()
        ex.queue_wait = upstream.loop.time() - queued
    relay: Relay | None = None
    try:
        if not chat.stream:
            body = await upstream.complete(chat, ex.request_id, deadline, trace)
            return frontend.completion(body, chat, ex)
        source, first = await upstream.open_stream(chat, ex.request_id, deadline, trace)
        encoder = frontend.encoder(chat, ex)
        relay = Relay(request, source, first, ex, deadline, encoder, slot)
        # The stream runs once this handler returned (see Relay.run).
        return relay.response
    finally:
        if relay is None:  # else the stream has the slot, and gives it back as it ends
            slot.give_back()


def bind(route: web.RouteDef, frontend: WireFormat) -> web.RouteDef:
    """A frontend's route, served: a chat route by ``serve_chat`` with the
    frontend, a tenant route by its handler once the caller is authenticated,
    any other as it is."""
    if route.handler is served_by_the_pipeline:
        # A partial, not a closure awaiting it: one coroutine frame fewer a stream.
        return web.post(route.path, partial(serve_chat, frontend=frontend), **route.kwargs)
    if isinstance(route.handler, ServedByThePipeline):
        wire = route.handler.wire
        return web.post(route.path, partial(serve_chat, frontend=wire), **route.kwargs)
    if isinstance(route.handler, Dispatching):
        signs_in = getattr(frontend, "protected_resource", False)
        pipeline = SharedPipeline(frontend.prefix if signs_in else None)
        return web.route(
            route.method, route.path,
            partial(serve_dispatching, handler=route.handler.handler, pipeline=pipeline),
            **route.kwargs,
        )  # fmt: skip
    if isinstance(route.handler, ForTenant):
        return web.route(
            route.method, route.path, partial(serve_for_tenant, handler=route.handler.handler),
            **route.kwargs,
        )  # fmt: skip
    return route


class SharedPipeline:
    """The pipeline as a ``Dispatching`` route's handler uses it (``gateway.chat.Pipeline``).
    ``protected``: the prefix of a frontend whose clients discover how to sign
    in (RFC 9728); a 401 there names its metadata, when there are issuers."""

    __slots__ = ("protected",)

    def __init__(self, protected: str | None = None) -> None:
        self.protected = protected

    async def authenticate(self, request: web.Request) -> Tenant:
        try:
            return await tenant_of(request)
        except Unauthorized as e:
            settings = request.app[SETTINGS].current
            if self.protected is not None and settings.issuers:
                e.resource_metadata = metadata_url(request, settings, self.protected)
            raise

    async def read_body(self, request: web.Request) -> bytes:
        return await read_body(request)

    async def serve(
        self, request: web.Request, tenant: Tenant, chat: ChatRequest, wire: WireFormat
    ) -> web.StreamResponse:
        return await serve_parsed(request, tenant, chat, wire)


async def serve_dispatching(
    request: web.Request, handler: DispatchHandler, pipeline: SharedPipeline
) -> web.StreamResponse:
    return await handler(request, pipeline, request.app[SETTINGS].current)


async def serve_for_tenant(request: web.Request, handler: TenantHandler) -> web.StreamResponse:
    tenant = await tenant_of(request)
    return await handler(request, tenant, request.app[SETTINGS].current)
