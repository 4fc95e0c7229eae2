"""One request's record, and the middleware that opens it, renders its errors,
and closes it with its metrics and its one log line."""

from __future__ import annotations

import asyncio
import random
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import istr

from gateway.errors import GatewayError, MethodNotAllowed, NotFound, PayloadTooLarge
from gateway.logs import Logger
from gateway.metrics import Metrics, observe
from gateway.tracing import Trace, Tracing, gen_ai

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
NO_TENANT = "-"


# On every response: no MIME sniffing (a reply is never run as a script), no
# Referer carrying the page's URL to the images a reply links to, and a Server
# header without versions (aiohttp's names Python's and its own).
SAFETY_HEADERS = {
    hdrs.X_CONTENT_TYPE_OPTIONS: "nosniff",
    hdrs.REFERRER_POLICY: "no-referrer",
    hdrs.SERVER: "chatiq-gateway",
}


class RequestBoundary:
    """A connection's protocol that must hear when each request on it ends (the
    server's deadline on request heads: ``gateway.server.edge.HeaderDeadline``)."""

    __slots__ = ()

    def request_finished(self) -> None:
        raise NotImplementedError


def request_finished(request: web.Request) -> None:
    """Tell the request's connection that its next bytes start a new request head."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if isinstance(protocol, RequestBoundary):
        protocol.request_finished()


def release_body_buffer(request: web.Request) -> None:
    """Once a request's body is read to its end, its reader's empty deque (a
    64-slot block, ~650 bytes) is replaced by an empty tuple: aiohttp keeps the
    reader for the request's life, a held stream's too, and nothing is added
    to a reader past its end (aiohttp asserts as much; a tuple would raise
    rather than keep it). The attribute is aiohttp's own: where a version
    lacks it, nothing is done."""
    reader = request.content
    buffer = getattr(reader, "_buffer", None)
    if isinstance(buffer, deque) and not buffer and reader.is_eof():
        reader._buffer = ()  # type: ignore[assignment]


class ErrorRenderer(Protocol):
    """A frontend as the middleware sees it: a name, a prefix, its own error shape."""

    @property
    def name(self) -> str: ...

    @property
    def prefix(self) -> str: ...

    def error_response(self, err: GatewayError) -> web.Response: ...


@dataclass(slots=True)
class Exchange:
    request_id: str
    route: str
    started: float
    tenant: str = NO_TENANT
    user: str | None = None  # signed in by a token: the user, as [logging] user shows it
    user_id: str | None = field(default=None, repr=False)  # their stable id (never logged)
    frontend: str = "-"  # the route's frontend, for the log line
    bot: str | None = None
    bot_label: str = "-"  # bounded: see Metrics.bot_label
    status: int = 0
    streamed: bool = False
    ttft: float | None = None
    events: int = 0
    bytes_out: int = 0
    outcome: str = "ok"
    error: GatewayError | None = field(default=None, repr=False)
    # The code of ChatIQ's own error event, when its stream ended with one.
    upstream_error: str | None = None
    # A JSON-RPC request's method (MCP), for the log line; a tool call is also
    # counted as one (``tool_calls_total``).
    rpc_method: str | None = None
    # Traced: its spans (``gateway.tracing``); what only the trace records.
    trace: Trace | None = field(default=None, repr=False)
    conversation_id: str | None = None
    queue_wait: float | None = None

    @property
    def owner(self) -> str:
        """Whose what this request keeps is (``owner_of``)."""
        return owner_of(self.tenant, self.user_id)


def owner_of(tenant: str, user_id: str | None) -> str:
    """Whose a kept stream or response is: the tenant's, or one of its
    signed-in users' (another user of the tenant may not have it either)."""
    return tenant if user_id is None else f"{tenant}\x1fuser\x1f{user_id}"


EXCHANGE = web.RequestKey("exchange", Exchange)


class LateResponse(web.StreamResponse):
    """A response whose body runs after its handler returned: aiohttp calls
    ``prepare`` on every response a handler returns, and this one's runs the
    body (as aiohttp's ``FileResponse`` sends its file from there), then ends
    the exchange itself (``end_exchange``). So a long stream keeps neither its
    handler's coroutine nor the middleware's."""


# As the contract spells it (aiohttp's hdrs.X_REQUEST_ID is "X-Request-ID").
REQUEST_ID_HEADER = istr("X-Request-Id")


def exchange_of(request: web.Request) -> Exchange:
    return request[EXCHANGE]


def error_response(err: GatewayError) -> web.Response:
    response = web.Response(
        status=err.status,
        text=err.body_json(),
        content_type="application/json",
        headers=err.headers,
    )
    if err.closes_connection:
        response.force_close()
    return response


def _from_http_exception(e: web.HTTPException, method: str) -> GatewayError:
    if e.status == 404:
        return NotFound("no such route")
    if isinstance(e, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(
            f"method {method} is not allowed on this route", allowed=e.allowed_methods
        )
    if e.status == 413:
        return PayloadTooLarge("the body is too large")
    err = GatewayError(e.reason or "error")
    err.status = e.status
    err.code = re.sub(r"\W+", "_", (e.reason or "ERROR").upper())
    return err


def make_middleware(
    metrics: Metrics,
    log: Logger,
    frontends: Mapping[str, ErrorRenderer] | None = None,
    tracing: Tracing | None = None,
) -> Middleware:
    """``frontends``: each frontend route's frontend (filled as they are mounted),
    which renders that route's errors in its own shape. ``tracing``: a SERVER
    span for each frontend request, once it is started."""
    routes = {} if frontends is None else frontends
    by_prefix: list[ErrorRenderer] = []  # the longest prefix first, once routes are in

    def frontend_under(path: str) -> ErrorRenderer | None:
        """The frontend whose prefix holds ``path`` (an unmatched route)."""
        if not by_prefix:
            unique = {id(fe): fe for fe in routes.values()}.values()
            by_prefix.extend(sorted(unique, key=lambda fe: len(fe.prefix), reverse=True))
        for fe in by_prefix:
            if fe.prefix and (path == fe.prefix or path.startswith(fe.prefix + "/")):
                return fe
        return None

    # Request ids need to be unique, not secret: no system call for each (uuid4's).
    ids = random.Random()
    # The app's loop, found once: asking for the running loop is a getpid(2)
    # system call on Python 3.11.
    running: asyncio.AbstractEventLoop | None = None

    @web.middleware
    async def exchange_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal running
        if running is None:
            running = asyncio.get_running_loop()
        loop = running
        incoming = request.headers.get("X-Request-Id", "")
        resource = request.match_info.route.resource
        ex = Exchange(
            request_id=incoming if _REQUEST_ID.match(incoming) else f"{ids.getrandbits(128):032x}",
            route=resource.canonical if resource is not None else "unmatched",
            started=loop.time(),
        )
        request[EXCHANGE] = ex
        frontend = routes.get(ex.route)
        if frontend is not None:
            ex.frontend = frontend.name
            if tracing is not None and tracing.tracer is not None:
                ex.trace = tracing.begin(request, ex.route, ex.request_id)
        render = error_response if frontend is None else frontend.error_response
        try:
            response = await handler(request)
        except GatewayError as e:
            ex.error = e
            response = render(e)
        except web.HTTPException as e:
            ex.error = _from_http_exception(e, request.method)
            under = frontend_under(request.path) if resource is None else None
            if under is not None and e.status == 404:  # a route its clients may expect
                ex.error = NotFound(
                    f"no route {request.method} {request.path[:200]}: this gateway serves "
                    "chat, and not this part of the API"
                )
                log.info("unknown_route", request_id=ex.request_id, frontend=under.name,
                         method=request.method, path=request.path[:200])  # fmt: skip
                render = under.error_response
            response = render(ex.error)
        except asyncio.CancelledError:
            ex.outcome = "client_disconnect"
            ex.status = 200 if ex.streamed else 499  # nginx's "client closed request"
            _finish(ex, loop.time(), metrics, log, chat=frontend is not None)
            raise
        except Exception as e:
            log.error("unhandled_error", request_id=ex.request_id, error=type(e).__name__)
            ex.error = GatewayError("internal error")
            response = render(ex.error)
        if isinstance(response, LateResponse):  # it ends the exchange as its body ends
            return response
        ex.status = response.status
        _finish(ex, loop.time(), metrics, log, chat=frontend is not None)
        request_finished(request)
        return response

    return exchange_middleware


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer names its request id."""
    ex = request.get(EXCHANGE)
    if ex is not None:
        response.headers[REQUEST_ID_HEADER] = ex.request_id


def end_exchange(
    request: web.Request, ex: Exchange, status: int, now: float, metrics: Metrics, log: Logger
) -> None:
    """A chat ``LateResponse``'s end: the exchange's metrics and log line, as the
    middleware gives any other response's; the connection's next bytes start
    a new request head."""
    ex.status = status
    _finish(ex, now, metrics, log, chat=True)
    request_finished(request)


_CLIENT_LEFT = frozenset({"client_disconnect", "slow_client"})


def _outcome_label(ex: Exchange) -> str:
    """``requests_total``'s outcome: a few values, for error ratios that count the
    streams that failed after their 200 as well."""
    if ex.outcome in _CLIENT_LEFT:
        return "client_left"
    if ex.outcome == "handed_over":
        return "handed_over"
    if ex.upstream_error is not None or (ex.error is not None and ex.streamed):
        return "failed"
    # A failure answered with a 200 (an MCP tool's error result) counts as what it was.
    status = ex.error.status if ex.error is not None else ex.status
    if status >= 500:
        return "failed"
    return "rejected" if status >= 400 else "ok"


def _finish(ex: Exchange, now: float, metrics: Metrics, log: Logger, *, chat: bool) -> None:
    err = ex.error
    if err is not None:
        if ex.outcome == "ok":
            ex.outcome = err.code.lower()
        if err.reject_reason is not None:
            metrics.rejected.labels(err.reject_reason).inc()
    elif ex.upstream_error is not None and ex.outcome == "ok":
        ex.outcome = "upstream_error"
    outcome = _outcome_label(ex)
    metrics.request_counter(ex.route, ex.frontend, ex.tenant, ex.status, outcome).inc()
    if ex.outcome == "client_disconnect":
        metrics.client_disconnects.labels(ex.tenant).inc()
    duration = now - ex.started
    if ex.rpc_method == "tools/call":
        metrics.tool_calls.labels(ex.tenant, ex.bot_label, outcome).inc()
        metrics.tool_call_duration.labels(ex.tenant, ex.bot_label).observe(duration)
    if ex.streamed:
        series = metrics.stream_series(ex.tenant, ex.bot_label)
        if ex.trace is None:
            series.duration.observe(duration)
        else:
            observe(series.duration, duration, ex.trace.exemplar())
        series.events.inc(ex.events)
    trace = ex.trace
    ids = None
    if trace is not None:
        ids = trace.ids()
        trace.end(ex.status, partial(_span_attributes, ex), _error_type(ex), outcome == "failed")
    if not chat:
        log.debug("request", request_id=ex.request_id, route=ex.route, status=ex.status)
        return
    log.info(
        "request",
        request_id=ex.request_id,
        route=ex.route,
        frontend=ex.frontend,
        tenant=ex.tenant,
        **({} if ex.user is None else {"user": ex.user}),
        bot=ex.bot,
        status=ex.status,
        outcome=ex.outcome,
        **({} if ex.upstream_error is None else {"error_code": ex.upstream_error}),
        **({} if ex.rpc_method is None else {"rpc_method": ex.rpc_method}),
        ttft_ms=None if ex.ttft is None else round(ex.ttft * 1000, 1),
        events=ex.events,
        bytes=ex.bytes_out,
        duration_ms=round(duration * 1000, 1),
        **({} if ids is None else {"trace_id": ids[0], "span_id": ids[1]}),
    )


def first_token(ex: Exchange, now: float, metrics: Metrics) -> None:
    """The stream's first token: its time to it, observed (with the trace's
    exemplar) and marked on its span."""
    ex.ttft = now - ex.started
    histogram = metrics.stream_series(ex.tenant, ex.bot_label).time_to_first_token
    if ex.trace is None:
        histogram.observe(ex.ttft)
    else:
        observe(histogram, ex.ttft, ex.trace.exemplar())
        ex.trace.first_token(ex.ttft)


def _error_type(ex: Exchange) -> str | None:
    """The span's ``error.type``: the gateway's error code, or ChatIQ's."""
    if ex.error is not None:
        return ex.error.code
    if ex.upstream_error is not None:
        return f"upstream:{ex.upstream_error}"
    return None


def _span_attributes(ex: Exchange) -> dict[str, object]:
    """What the SERVER span says of the exchange (the GenAI conventions, and ours):
    names, ids, counts and times, never a message or a reply."""
    attributes: dict[str, object] = {
        "chatiq.tenant": ex.tenant,
        "chatiq.frontend": ex.frontend,
        "chatiq.outcome": ex.outcome,
    }
    if ex.bot is not None:
        attributes.update(gen_ai(ex.bot))
    if ex.conversation_id is not None:
        attributes["gen_ai.conversation.id"] = ex.conversation_id
    if ex.queue_wait is not None:
        attributes["chatiq.queue.wait_s"] = ex.queue_wait
    if ex.streamed:
        attributes["chatiq.stream.events"] = ex.events
    if ex.rpc_method is not None:
        attributes["mcp.method.name"] = ex.rpc_method
    return attributes
