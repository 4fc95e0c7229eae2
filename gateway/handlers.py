"""Thin route handlers: each wires the stages of the request's path together."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from .auth import authenticate, require_bearer
from .chat import parse_chat_request
from .errors import (
    Draining,
    Forbidden,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from .exchange import exchange_of
from .relay import Relay
from .state import (
    ADMISSION,
    BREAKERS,
    FAILED_KEYS,
    LIFECYCLE,
    METRICS,
    SETTINGS,
    TENANTS,
    UPSTREAM,
)


async def chatbot(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS].current
    lifecycle = app[LIFECYCLE]
    ex = exchange_of(request)

    tenant = authenticate(app[TENANTS], app[FAILED_KEYS], request)
    ex.tenant = tenant.name
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as 'Content-Type: application/json'")
    try:
        async with asyncio.timeout(settings.server.body_timeout_s):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {settings.server.body_timeout_s:g} s"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"the body is larger than {settings.server.max_body_bytes} bytes"
        ) from None
    chat = parse_chat_request(raw, settings.server, settings.upstream.bot_slug)
    metrics = app[METRICS]
    ex.bot, ex.bot_label = chat.bot, metrics.bot_label(chat.bot)
    if not tenant.may_use(chat.bot):
        raise Forbidden(f"this key may not use the bot {chat.bot!r}")
    if lifecycle.draining:
        raise Draining("the gateway is restarting; please retry", retry_after=1)

    deadline = ex.started + settings.upstream.total_timeout_s
    # The gateway's own time before the upstream call; the queue wait is not ours.
    metrics.overhead.labels("pre_upstream").observe(asyncio.get_running_loop().time() - ex.started)
    async with app[ADMISSION].slot(tenant.name):
        if not chat.stream:
            body = await app[UPSTREAM].complete(chat, ex.request_id, deadline)
            return web.Response(body=body, content_type="application/json")
        source, first = await app[UPSTREAM].open_stream(chat, ex.request_id, deadline)
        relay = Relay(request, source, ex, deadline)
        live = metrics.active_streams.labels(tenant.name, ex.bot_label)
        task = asyncio.current_task()
        assert task is not None
        live.inc()
        lifecycle.streams.add(task)
        try:
            return await relay.run(first)
        finally:
            lifecycle.streams.discard(task)
            live.dec()


OPENAPI = Path(__file__).with_name("openapi.json")


async def openapi(request: web.Request) -> web.FileResponse:
    """The API's OpenAPI 3.1 document (``gateway/openapi.json``)."""
    return web.FileResponse(OPENAPI, headers={"Content-Type": "application/json"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """503 only while draining. Not while a circuit is open: every replica shares
    the upstream, so pulling them out of a load balancer would turn a clean 503
    ``UPSTREAM_UNAVAILABLE`` into the balancer's own errors, and they would get
    no traffic to recover with."""
    circuits = request.app[BREAKERS].not_closed()
    if request.app[LIFECYCLE].draining:
        return web.json_response({"status": "draining", "circuits": circuits}, status=503)
    return web.json_response({"status": "ready", "circuits": circuits})


async def prometheus_metrics(request: web.Request) -> web.Response:
    token_sha256 = request.app[SETTINGS].current.metrics.token_sha256
    if token_sha256:
        require_bearer(token_sha256, request.headers.get("Authorization"))
    body = request.app[METRICS].exposition()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )
