"""Thin route handlers: each wires the stages of the request's path together."""

from __future__ import annotations

from aiohttp import web

from .chat import parse_chat_request
from .errors import Forbidden, PayloadTooLarge, UnsupportedMediaType
from .exchange import exchange_of
from .relay import Relay
from .state import ADMISSION, METRICS, SETTINGS, TENANTS, UPSTREAM


async def chatbot(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    ex = exchange_of(request)

    tenant = app[TENANTS].authenticate(request.headers.get("Authorization"))
    ex.tenant = tenant.name
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as 'Content-Type: application/json'")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"the body is larger than {settings.server.max_body_bytes} bytes"
        ) from None
    chat = parse_chat_request(raw, settings.server, settings.upstream.bot_slug)
    ex.bot = chat.bot
    if not tenant.may_use(chat.bot):
        raise Forbidden(f"this key may not use the bot {chat.bot!r}")

    deadline = ex.started + settings.upstream.total_timeout_s
    async with app[ADMISSION].slot():
        upstream = await app[UPSTREAM].send(chat, ex.request_id, deadline)
        if not chat.stream:
            body = await app[UPSTREAM].read_json(upstream, deadline)
            return web.Response(body=body, content_type="application/json")
        first_byte_by = ex.started + settings.upstream.first_byte_timeout_s
        metrics = app[METRICS]
        relay = Relay(request, upstream, ex, settings.upstream, metrics, deadline)
        live = metrics.active_streams.labels(tenant.name)
        live.inc()
        try:
            return await relay.run(first_byte_by)
        finally:
            live.dec()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].exposition()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )
