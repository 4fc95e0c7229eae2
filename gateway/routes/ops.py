"""The operator's routes: liveness, readiness, Prometheus metrics and the OpenAPI document."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from gateway.auth.tenants import require_bearer
from gateway.state import LIFECYCLE, METRICS, SETTINGS
from gateway.upstream.breaker import BREAKERS

OPENAPI = Path(__file__).resolve().parent.parent / "openapi.json"


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
    body, content_type = request.app[METRICS].exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})
