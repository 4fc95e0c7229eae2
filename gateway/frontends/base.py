"""What a frontend is: a wire format, and nothing else.

A frontend turns its own request body into the gateway's one neutral
``ChatRequest`` (message, history, bot, conversation id, stream flag), and
the upstream's events, answers and the gateway's errors into its own wire
format. Everything else (auth, tenant and bot checks, admission and quotas,
retries, the breaker, timeouts, backpressure, metrics, logs, drain,
cancellation when the client leaves) is the shared pipeline's
(``gateway.pipeline.serve_chat``), the same for every frontend.

Third-party frontends subclass ``Frontend`` and register in the entry-point
group ``chatiq_gateway.frontends`` (see docs/frontends.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from aiohttp import web

from gateway.chat import (
    ChatRequest,
    DispatchHandler,
    Dispatching,
    ForTenant,
    Prepare,
    ServedByThePipeline,
    StreamEncoder,
    TenantHandler,
    WireFormat,
    served_by_the_pipeline,
)
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.exchange import Exchange

__all__ = ["Frontend", "StreamEncoder"]


class Frontend:
    """A wire format, mounted under ``prefix``. Subclass and override."""

    name: ClassVar[str]
    default_prefix: ClassVar[str] = ""
    # Its streams may be resumable ([resume]): its clients can reconnect with
    # Last-Event-ID, and its encoding has no state a resumed reader would miss.
    resumable: ClassVar[bool] = False
    # Where its clients resume a chat's latest stream by the chat's own id
    # (under its prefix, with a {chat_id}); None: only by stream id.
    resume_path: ClassVar[str | None] = None
    # Its clients discover how to sign in (RFC 9728, as MCP clients do): with
    # [[issuers]], its prefix has protected-resource metadata of its own.
    protected_resource: ClassVar[bool] = False

    def __init__(self, prefix: str | None = None, options: Mapping[str, Any] | None = None) -> None:
        self.prefix = self.default_prefix if prefix is None else prefix
        self.options = dict(options or {})

    def routes(self) -> Iterable[web.RouteDef]:
        """Its routes: ``self.chat_route(path)`` for each chat route, and any others."""
        raise NotImplementedError

    # An async hook the pipeline calls once the caller is known, before the
    # upstream call (``gateway.chat.Prepare``); None: none.
    prepare: Prepare | None = None

    def chat_route(self, path: str, wire: WireFormat | None = None) -> web.RouteDef:
        """``POST {prefix}{path}``, served by the shared pipeline with this frontend,
        or with ``wire``, a wire format of its own (the app binds it: a frontend
        does not import the pipeline)."""
        handler = served_by_the_pipeline if wire is None else ServedByThePipeline(wire)
        return web.post(f"{self.prefix}{path}", handler)

    def tenant_route(self, method: str, path: str, handler: TenantHandler) -> web.RouteDef:
        """``{method} {prefix}{path}`` for callers with a tenant key: the app
        authenticates the request and calls ``handler(request, tenant, settings)``."""
        return web.route(method, f"{self.prefix}{path}", ForTenant(handler))

    def dispatch_route(self, method: str, path: str, handler: DispatchHandler) -> web.RouteDef:
        """``{method} {prefix}{path}`` for a protocol that reads its own requests
        (one route, many methods): the app calls ``handler(request, pipeline,
        settings)``, and ``pipeline`` authenticates and serves the chats among them."""
        return web.route(method, f"{self.prefix}{path}", Dispatching(handler))

    def parse(self, raw: bytes, settings: Settings) -> ChatRequest:
        """The request body, as the neutral chat request; ``InvalidRequest`` if bad."""
        raise NotImplementedError

    def encoder(self, chat: ChatRequest, ex: Exchange) -> StreamEncoder | None:
        """How a stream goes out; None: the upstream's own bytes, untouched."""
        raise NotImplementedError

    def completion(self, body: bytes, chat: ChatRequest, ex: Exchange) -> web.Response:
        """A non-streaming answer, from ChatIQ's JSON (``response``, ``conversationId``)."""
        raise NotImplementedError

    def error_response(self, err: GatewayError) -> web.Response:
        """An error before the stream started, in the frontend's own shape."""
        raise NotImplementedError
