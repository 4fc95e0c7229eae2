"""``create_app(settings)``: the routes, the state they share, and its lifecycle."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.auth import discovery
from gateway.auth.tenants import FAILED_KEYS, TENANTS, FailedKeyThrottle, TenantDirectory
from gateway.auth.tokens import TOKENS, TokenVerifier, user_secret
from gateway.config import Settings, named_bots
from gateway.conversations.store import RESPONSE_STORE, RedisResponseStore, ResponseStore
from gateway.conversations.tool_calls import TOOL_CALLS, RedisToolCalls, ToolCalls
from gateway.exchange import add_request_id, make_middleware
from gateway.frontends import Frontend, load_frontends
from gateway.frontends.chatiq import ChatIQFrontend
from gateway.logs import Logger, loop_error_reporter, make_logger
from gateway.metrics import Metrics, version
from gateway.pipeline import bind
from gateway.quotas.admission import ADMISSION, Admission
from gateway.quotas.shared import SharedQuotas
from gateway.resume.redis_log import RedisStreams
from gateway.resume.serve import resume_chat_route, resume_stream
from gateway.resume.streams import RESUMABLE, ResumableStreams
from gateway.routes import ops, page
from gateway.state import LIFECYCLE, LOG, METRICS, SETTINGS, TIMERS, Lifecycle, LiveSettings
from gateway.timers import TimerHeap
from gateway.tracing import TRACING, Tracing
from gateway.upstream.breaker import BREAKERS, Breakers, OnTransition, State
from gateway.upstream.client import UPSTREAM, Upstream
from gateway.upstream.pool import Pool


def create_app(settings: Settings, *, log: Logger | None = None) -> web.Application:
    log = make_logger(settings.logging) if log is None else log
    metrics = Metrics(named_bots(settings), enabled=settings.metrics.enabled)
    admission = Admission(settings.admission, settings.tenants)
    if not metrics.multiprocess:
        metrics.queue_depth.set_function(lambda: admission.queued)
    bots = named_bots(settings)
    breakers = Breakers(settings.circuit, bots, metrics.bot_label, _breaker_reporter(metrics, log))
    export_breaker_series(metrics, [breaker.bot for breaker in breakers])
    for result in ("ok", "invalid"):
        metrics.config_reloads.labels(result)

    frontend_of_route: dict[str, Frontend] = {}  # filled as the frontends mount, below
    tracing = Tracing()  # started with the app (in each worker), if tracing is on
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        middlewares=[make_middleware(metrics, log, frontend_of_route, tracing)],
    )
    app[TRACING] = tracing
    app[SETTINGS] = LiveSettings(settings)
    app[METRICS] = metrics
    app[ADMISSION] = admission
    app[TENANTS] = TenantDirectory(settings.tenants)
    app[FAILED_KEYS] = FailedKeyThrottle(settings.server.max_auth_failures_per_minute)
    app[TOKENS] = TokenVerifier(
        settings.issuers, log, settings.logging.user, user_secret(settings.upstream.api_key)
    )
    app[BREAKERS] = breakers
    app[LIFECYCLE] = Lifecycle()
    app[TIMERS] = TimerHeap()
    app[LOG] = log
    app[RESPONSE_STORE] = (
        RedisResponseStore(settings.responses, settings.redis, log)
        if settings.redis.url
        else ResponseStore(settings.responses)
    )
    app[TOOL_CALLS] = RedisToolCalls(settings.redis, log) if settings.redis.url else ToolCalls()
    app.on_response_prepare.append(add_request_id)
    app.cleanup_ctx.append(_loop_errors)
    app.cleanup_ctx.append(_tracing)
    app.cleanup_ctx.append(_issuer_keys)
    app.cleanup_ctx.append(_upstream_client)
    app.cleanup_ctx.append(_fleet_quotas)
    app.cleanup_ctx.append(_response_store)
    app.cleanup_ctx.append(_tool_calls)
    if metrics.multiprocess:
        app.cleanup_ctx.append(_publish_queue_depth)

    for frontend in load_frontends(settings):
        for route in frontend.routes():
            assert isinstance(route, web.RouteDef)
            route = bind(route, frontend)
            app.router.add_routes([route])
            frontend_of_route[route.path] = frontend
    if settings.resume.enabled:
        _mount_resume(app, frontend_of_route)
    chat_routes = [(path, fe.name) for path, fe in frontend_of_route.items()]
    metrics.export_known([t.name for t in settings.tenants], chat_routes)
    app.router.add_get("/healthz", ops.healthz)
    app.router.add_get("/readyz", ops.readyz)
    app.router.add_get("/openapi.json", ops.openapi)
    if settings.metrics.port == 0:
        app.router.add_get("/metrics", ops.prometheus_metrics)
    page.add_routes(app, settings, chat_routes=list(frontend_of_route))
    signs_in = {fe.prefix for fe in frontend_of_route.values() if fe.protected_resource}
    discovery.add_routes(app, settings, sorted(signs_in))
    return app


def _mount_resume(app: web.Application, frontend_of_route: dict[str, Frontend]) -> None:
    """``GET {native prefix}/chatbot/streams/{stream_id}`` and the streams it serves."""
    by_name = {fe.name: fe for fe in frontend_of_route.values()}
    settings = app[SETTINGS].current
    app[RESUMABLE] = ResumableStreams(settings.resume, app[METRICS], app[LOG], by_name)
    native = by_name.get("chatiq")
    prefix = native.prefix if native is not None else "/api"
    path = f"{prefix}/chatbot/streams/{{stream_id}}"
    app.router.add_get(path, resume_stream, allow_head=False)
    frontend_of_route[path] = native if native is not None else ChatIQFrontend(prefix)
    for frontend in by_name.values():
        if frontend.resumable and frontend.resume_path is not None:
            route = resume_chat_route(frontend)
            app.router.add_routes([route])
            frontend_of_route[route.path] = frontend
    app.cleanup_ctx.append(_resumable_streams)


async def _loop_errors(app: web.Application) -> AsyncIterator[None]:
    """While the app runs, its loop's error reports are the app's log lines."""
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    loop.set_exception_handler(loop_error_reporter(app[LOG]))
    yield
    loop.set_exception_handler(before)


async def _issuer_keys(app: web.Application) -> AsyncIterator[None]:
    """The issuers' keys, fetched before the first request is taken."""
    tokens = app[TOKENS]
    if tokens.active:
        await tokens.start()
    yield
    await tokens.close()


def create_metrics_app(app: web.Application) -> web.Application:
    """``/metrics`` alone, for a port of its own (it names the tenants)."""
    metrics_app = web.Application(middlewares=[make_middleware(app[METRICS], app[LOG])])
    metrics_app[SETTINGS] = app[SETTINGS]
    metrics_app[METRICS] = app[METRICS]
    metrics_app.router.add_get("/metrics", ops.prometheus_metrics)
    return metrics_app


def export_breaker_series(metrics: Metrics, bots: list[str]) -> None:
    """Every breaker series from the start, so that rate() sees the first change."""
    for bot in bots:
        metrics.circuit_state.labels(bot).set(0)
        for state in State:
            metrics.circuit_transitions.labels(bot, state.label)


def _breaker_reporter(metrics: Metrics, log: Logger) -> OnTransition:
    def report(bot: str, to: State, why: dict[str, object]) -> None:
        metrics.circuit_state.labels(bot).set(to.value)
        metrics.circuit_transitions.labels(bot, to.label).inc()
        log.warning(f"circuit_{to.label}", bot=bot, **why)

    return report


async def drain(app: web.Application, grace_s: float, hurry: asyncio.Event | None = None) -> None:
    """Stop taking streams, let live ones finish for ``grace_s`` (or until
    ``hurry`` is set: a second signal), then end the rest.

    Streams still live at the end get an error event and ``[DONE]``.
    """
    lifecycle = app[LIFECYCLE]
    lifecycle.draining = True
    log = app[LOG]
    if RESUMABLE in app and app[RESUMABLE].remote is not None:
        app[RESUMABLE].hand_over()  # their clients resume on other replicas
    log.info("draining", live_streams=len(lifecycle.streams), grace_s=grace_s)
    loop = asyncio.get_running_loop()
    until = loop.time() + grace_s
    while lifecycle.streams and loop.time() < until and not (hurry and hurry.is_set()):
        await asyncio.sleep(0.05)
    cut = list(lifecycle.streams)
    for task in cut:
        task.cancel()
    if cut:
        await asyncio.wait(cut, timeout=5)
    log.info("drained", streams_ended_early=len(cut))


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    """With tracing on, the SDK's exporter for the app's life; what is batched
    goes out at the end (for two seconds at most, in a thread: the loop runs on)."""
    tracing = app[TRACING]
    tracing.start(app[SETTINGS].current.tracing, version(), app[LOG], os.environ)
    yield
    await asyncio.to_thread(tracing.shutdown)


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    """One pool of upstream connections for the app's whole life."""
    settings = app[SETTINGS].current.upstream
    pool = Pool(settings, on_wait=app[METRICS].upstream_pool_wait.observe)
    app[UPSTREAM] = Upstream(settings, pool, app[METRICS], app[BREAKERS], app[LOG])
    preflight = asyncio.create_task(_preflight(pool, app[LOG]))
    yield
    preflight.cancel()
    pool.close()
    app[BREAKERS].close()


async def _fleet_quotas(app: web.Application) -> AsyncIterator[None]:
    """With ``[redis] url``: tenant quotas shared by the fleet, for the app's life."""
    settings = app[SETTINGS].current.redis
    if not settings.url:
        yield
        return
    metrics = app[METRICS]
    shared = SharedQuotas(settings, metrics, app[LOG])
    shared.start()
    app[ADMISSION].share(shared, settings, lambda mode: metrics.quota_fallbacks.labels(mode).inc())
    yield
    await shared.close()


async def _response_store(app: web.Application) -> AsyncIterator[None]:
    """With ``[redis] url``, a response is continued on any replica (kept in Redis)."""
    app[RESPONSE_STORE].start()
    yield
    await app[RESPONSE_STORE].close()


async def _tool_calls(app: web.Application) -> AsyncIterator[None]:
    """With ``[redis] url``, an MCP client's cancel or session end reaches every replica."""
    app[TOOL_CALLS].start()
    yield
    await app[TOOL_CALLS].close()


async def _resumable_streams(app: web.Application) -> AsyncIterator[None]:
    """With ``[redis] url``, streams resume on any replica (their events in Redis)."""
    streams, settings = app[RESUMABLE], app[SETTINGS].current
    if settings.redis.url:
        streams.remote = RedisStreams(
            settings.redis, settings.resume, settings.upstream.total_timeout_s, app[LOG]
        )
    yield
    streams.close()
    if streams.remote is not None:
        await streams.remote.close()


async def _preflight(pool: Pool, log: Logger) -> None:
    """Say at start, not at the first request, that the upstream looks unreachable."""
    problem = await pool.preflight()
    if problem is not None:
        log.warning("upstream_unreachable", problem=problem)


async def _publish_queue_depth(app: web.Application) -> AsyncIterator[None]:
    """Several workers: a gauge cannot be read on demand, so it is written twice a second."""

    async def publish() -> None:
        while True:
            app[METRICS].queue_depth.set(app[ADMISSION].queued)
            await asyncio.sleep(0.5)

    task = asyncio.create_task(publish())
    yield
    task.cancel()
