"""The ``mcp`` frontend: a Model Context Protocol server at ``{prefix}`` (``/mcp``)
over Streamable HTTP, whose tools are the bots the caller's key may use.

- ``POST``: one JSON-RPC message. A request is answered with
  ``application/json``, or a ``tools/call`` with a ``text/event-stream`` of
  its progress notifications and its result (when the client accepts one);
  a notification with ``202``. Every request needs the tenant key
  or a token (``Authorization: Bearer``); without one, or with a wrong one,
  ``401`` with ``WWW-Authenticate: Bearer``, which with ``[[issuers]]`` names
  the protected-resource metadata where an MCP client finds how to sign in.
- Sessions: ``initialize`` (the handshake era) answers with a signed
  ``Mcp-Session-Id`` that any replica checks on its own
  (``gateway.frontends.mcp.sessions``); a request with an id that is not this
  key's, has ended or expired gets ``404`` (the client opens a new session). A
  request without one is served too: nothing here needs a session. The
  per-request era has no sessions.
- ``DELETE`` ends the session; ``GET`` is ``405``: this server sends nothing
  unasked (its tool list changes only with the configuration).
- ``Origin``, when a browser sends one, must be one of ``[server] cors_origins``
  (``403`` otherwise): a page elsewhere cannot drive the server through a
  user's browser (DNS rebinding).
- A ``tools/call`` runs the shared pipeline: quotas, admission, retries, the
  breaker, timeouts, drain, metrics. Its failures (a quota, an upstream
  error) are results with ``isError``, which the model reads; an unknown tool
  is a JSON-RPC error. ``notifications/cancelled``, or the client hanging
  up, cancels the upstream call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from gateway.chat import Pipeline
from gateway.config import ConfigError, Settings, Tenant
from gateway.conversations.tool_calls import TOOL_CALLS
from gateway.errors import Forbidden, GatewayError, InvalidRequest, MethodNotAllowed, NotFound
from gateway.exchange import exchange_of
from gateway.frontends.base import Frontend
from gateway.frontends.mcp.protocol import (
    ALL_VERSIONS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PROTOCOL_VERSION_HEADER,
    SERVER_INFO,
    SESSION_HEADER,
    VERSION_WITHOUT_HEADER,
    Message,
    RpcError,
    error,
    handshake_version,
    http_error_response,
    is_per_request,
    per_request_version,
    read_message,
    result,
)
from gateway.frontends.mcp.sessions import Session, Sessions, session_secret
from gateway.frontends.mcp.tools import (
    ToolCallFormat,
    ToolResult,
    bot_of,
    chat_of,
    list_tools,
    stamp,
)

INSTRUCTIONS = (
    "Each tool asks one of the company's ChatIQ bots, which answer from their team's "
    "documents. Ask in the user's words; to ask a follow-up, pass the conversation_id "
    "of the answer it follows."
)
CAPABILITIES = {"tools": {"listChanged": False}}
DEFAULT_SESSION_MAX_AGE_S = 7 * 86400.0


class MCPFrontend(Frontend):
    name = "mcp"
    default_prefix = "/mcp"
    protected_resource = True  # MCP clients discover how to sign in (RFC 9728)

    def __init__(self, prefix: str | None = None, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(prefix, options)
        if not self.prefix:
            raise ConfigError(
                'frontends.mcp.prefix: the MCP server needs a path of its own, like "/mcp"'
            )
        options = dict(self.options)
        max_age = options.pop("session_max_age_s", DEFAULT_SESSION_MAX_AGE_S)
        if isinstance(max_age, bool) or not isinstance(max_age, int | float) or max_age <= 0:
            raise ConfigError(
                "frontends.mcp.session_max_age_s: must be a positive number of seconds"
            )
        if options:
            raise ConfigError(f"frontends.mcp.{sorted(options)[0]}: unknown key")
        self.sessions = Sessions(float(max_age))
        self.tool_calls = ToolCallFormat(self.name, self.prefix)
        self._secret: tuple[str | None, bytes] | None = None

    def routes(self) -> Iterable[web.RouteDef]:
        return [
            self.dispatch_route("POST", "", self._post),
            self.dispatch_route("DELETE", "", self._delete),
            web.get(self.prefix, _no_server_stream, allow_head=False),
        ]

    def error_response(self, err: GatewayError) -> web.Response:
        return http_error_response(err)

    # POST

    async def _post(
        self, request: web.Request, pipeline: Pipeline, settings: Settings
    ) -> web.StreamResponse:
        check_origin(request, settings)
        tenant = await pipeline.authenticate(request)
        try:
            message = read_message(await pipeline.read_body(request))
        except RpcError as e:
            return _json(error(None, e), e.status(per_request=False))
        try:
            modern = per_request_version(message, request.headers)
            session = None if modern else self._session(request, tenant, settings, message)
        except RpcError as e:
            return _json(error(message.id, e), e.status(is_per_request(message, request.headers)))
        exchange_of(request).rpc_method = None if message.method is None else message.method[:64]
        if not message.is_request:
            cancelled = message.params.get("requestId")
            if (
                message.method == "notifications/cancelled"
                and session is not None
                and isinstance(cancelled, int | str)
                and not isinstance(cancelled, bool)
            ):
                request.app[TOOL_CALLS].cancel(session.id, cancelled)
            return web.Response(status=202)
        assert message.id is not None and message.method is not None
        try:
            if message.method == "tools/call":
                return await self._call(
                    request, pipeline, tenant, settings, message, modern, session
                )
            value = self._answer(message, tenant, settings, modern)
        except RpcError as e:
            return _json(error(message.id, e), e.status(modern is not None))
        headers = {}
        if message.method == "initialize":
            version = value["protocolVersion"]
            headers[SESSION_HEADER] = self.sessions.issue(self._key(settings), tenant.name, version)
        return _json(result(message.id, stamp(value) if modern else value), 200, headers)

    def _session(
        self, request: web.Request, tenant: Tenant, settings: Settings, message: Message
    ) -> Session | None:
        """A handshake-era request's session: None without one (served all the
        same); ``NotFound`` for an id that is not, or no longer, a session."""
        version = request.headers.get(PROTOCOL_VERSION_HEADER)
        if message.method != "initialize" and version is not None and version not in ALL_VERSIONS:
            raise RpcError(
                INVALID_REQUEST,
                f"unsupported {PROTOCOL_VERSION_HEADER} {version[:40]!r} "
                f"(served: {', '.join(ALL_VERSIONS)})",
            )
        session_id = request.headers.get(SESSION_HEADER)
        if session_id is None or message.method == "initialize":
            return None
        session = self.sessions.check(self._key(settings), session_id, tenant.name)
        if session is None or request.app[TOOL_CALLS].has_ended(session_id):
            raise NotFound(
                "no such session (ended, expired, or another key's): initialize a new one"
            )
        return session

    def _answer(
        self, message: Message, tenant: Tenant, settings: Settings, modern: str | None
    ) -> dict[str, Any]:
        method = message.method
        if method == "initialize":
            requested = message.params.get("protocolVersion")
            return {
                "protocolVersion": handshake_version(requested),
                "capabilities": CAPABILITIES,
                "serverInfo": SERVER_INFO,
                "instructions": INSTRUCTIONS,
            }
        if method == "server/discover":
            return {
                "supportedVersions": list(ALL_VERSIONS),
                "capabilities": CAPABILITIES,
                "instructions": INSTRUCTIONS,
                "ttlMs": 0,
                "cacheScope": "private",
            }
        if method == "tools/list":
            value: dict[str, Any] = {"tools": list_tools(tenant, settings)}
            if modern:  # the list depends on the key: a client may not share it
                value |= {"ttlMs": 0, "cacheScope": "private"}
            return value
        if method == "ping":
            return {}
        raise RpcError(METHOD_NOT_FOUND, f"no method {method!r} here: this server offers tools")

    async def _call(
        self,
        request: web.Request,
        pipeline: Pipeline,
        tenant: Tenant,
        settings: Settings,
        message: Message,
        modern: str | None,
        session: Session | None,
    ) -> web.StreamResponse:
        assert message.id is not None
        bot = bot_of(message.params.get("name"), tenant, settings)
        version = modern or (
            session.version if session else request.headers.get(PROTOCOL_VERSION_HEADER)
        )
        extras = {
            "rpc_id": message.id,
            "progress_token": message.meta.get("progressToken"),
            "per_request": modern is not None,
            "links": (version or VERSION_WITHOUT_HEADER) != "2025-03-26",
        }
        ex = exchange_of(request)
        ex.bot = bot
        try:
            chat = chat_of(message.params, bot, settings, _accepts_events(request), extras)
        except InvalidRequest as e:  # the model may correct its arguments
            ex.error = e
            return _json(ToolResult(extras).failed(e), 200)
        task = asyncio.current_task()
        if session is not None and task is not None:  # what notifications/cancelled names
            request.app[TOOL_CALLS].running(session.id, message.id, task)
        try:
            return await pipeline.serve(request, tenant, chat, self.tool_calls)
        except GatewayError as e:  # before the stream: a result the model reads
            ex.error = e
            return _json(ToolResult(extras).failed(e), 200)

    # DELETE

    async def _delete(
        self, request: web.Request, pipeline: Pipeline, settings: Settings
    ) -> web.StreamResponse:
        check_origin(request, settings)
        tenant = await pipeline.authenticate(request)
        session_id = request.headers.get(SESSION_HEADER)
        if session_id is None:
            raise InvalidRequest(f"name the session to end in {SESSION_HEADER}")
        session = self.sessions.check(self._key(settings), session_id, tenant.name)
        calls = request.app[TOOL_CALLS]
        if session is None or calls.has_ended(session_id):
            raise NotFound("no such session (ended, expired, or another key's)")
        calls.end(session.id, session.expires_at)
        return web.Response(status=204)

    def _key(self, settings: Settings) -> bytes:
        upstream_key = settings.upstream.api_key
        if self._secret is None or self._secret[0] != upstream_key:
            self._secret = (upstream_key, session_secret(upstream_key))
        return self._secret[1]


async def _no_server_stream(request: web.Request) -> web.StreamResponse:
    raise MethodNotAllowed(
        "this server sends nothing unasked: there is no stream to open with GET",
        allowed=("POST", "DELETE"),
    )


def check_origin(request: web.Request, settings: Settings) -> None:
    origin = request.headers.get("Origin")
    if origin is not None and origin not in settings.server.cors_origins:
        raise Forbidden(f"origin {origin[:100]!r} is not allowed ([server] cors_origins)")


def _accepts_events(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return bool(types & {"text/event-stream", "text/*", "*/*"})


def _json(body: bytes, status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)
