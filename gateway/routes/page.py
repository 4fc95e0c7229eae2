"""What browsers get: the sample page (or a team's own) and CORS for pages served elsewhere."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from gateway.auth.tenants import tenant_of
from gateway.config import ANY_BOT, Settings
from gateway.errors import Forbidden, NotFound
from gateway.exchange import SAFETY_HEADERS
from gateway.state import SETTINGS

BUNDLED_PAGE = Path(__file__).resolve().parents[2] / "clients" / "web"
CORS_HEADERS = (
    "Authorization, Content-Type, X-Request-Id, X-Resumable, Last-Event-ID, "
    "Mcp-Session-Id, MCP-Protocol-Version, Mcp-Method, Mcp-Name"  # a browser's MCP client
)


def static_dir(settings: Settings) -> Path:
    return Path(settings.server.static_dir) if settings.server.static_dir else BUNDLED_PAGE


def add_routes(app: web.Application, settings: Settings, chat_routes: list[str]) -> None:
    """``/`` is the folder's index.html; its other files are under ``/static/``.
    CORS preflights are answered on ``/api/bots`` and every frontend route."""
    folder = static_dir(settings)
    index = folder / "index.html"

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.router.add_get("/", page)
    app.router.add_static("/static/", folder)
    app.router.add_get("/api/bots", bots)
    app.router.add_get("/api/sign-in", sign_in, allow_head=False)
    for path in ("/api/bots", *chat_routes):
        app.router.add_route("OPTIONS", path, preflight)
    app.on_response_prepare.append(add_browser_headers)


async def bots(request: web.Request) -> web.Response:
    """The bots this key may pick from (``"*"`` tenants: those the config names)."""
    app = request.app
    tenant = await tenant_of(request)
    upstream = app[SETTINGS].current.upstream
    default = upstream.bot_slug
    named = [b for b in tenant.bots if b != ANY_BOT]
    offered = [*named, *upstream.bots]  # "*" keys: the bots the configuration offers them
    choices = (
        named
        if ANY_BOT not in tenant.bots
        else [default, *dict.fromkeys(b for b in offered if b != default)]
    )
    return web.json_response({"tenant": tenant.name, "bots": choices, "default": default})


async def sign_in(request: web.Request) -> web.Response:
    """How the page signs people in (``[page] oidc_*``); 404 when it asks for a key."""
    page = request.app[SETTINGS].current.page
    if not page.oidc_issuer:
        raise NotFound("the page signs in with a key here: no [page] oidc_issuer")
    body = {"issuer": page.oidc_issuer, "client_id": page.oidc_client_id,
            "scope": page.oidc_scope}  # fmt: skip
    return web.json_response(body, headers={"Cache-Control": "no-cache"})


def page_policy(settings: Settings) -> str:
    """The page's Content-Security-Policy: the configured one, and with single
    sign-on, the issuer's origin among those it may fetch from (its discovery
    document and its token endpoint)."""
    policy = settings.server.content_security_policy
    issuer = settings.page.oidc_issuer
    if issuer and "connect-src 'self'" in policy:
        parts = urlsplit(issuer)
        policy = policy.replace(
            "connect-src 'self'", f"connect-src 'self' {parts.scheme}://{parts.netloc}", 1
        )
    return policy


async def preflight(request: web.Request) -> web.Response:
    """CORS preflight: only for the origins the configuration allows."""
    origin = request.headers.get("Origin", "")
    if origin not in request.app[SETTINGS].current.server.cors_origins:
        raise Forbidden(f"origin {origin!r} is not allowed")
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "GET, POST, DELETE",
            "Access-Control-Allow-Headers": CORS_HEADERS,
            "Access-Control-Max-Age": "600",
        },
    )


async def add_browser_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: safety headers on everything, the page's CSP, and CORS
    for allowed origins (none by default)."""
    response.headers.update(SAFETY_HEADERS)
    settings = request.app[SETTINGS].current
    server = settings.server
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers[hdrs.CONTENT_SECURITY_POLICY] = page_policy(settings)
        response.headers[hdrs.X_FRAME_OPTIONS] = "DENY"
    origin = request.headers.get("Origin")
    if origin is not None and origin in server.cors_origins:
        headers = response.headers
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
        headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = (
            "Retry-After, X-Request-Id, X-Stream-Id, Mcp-Session-Id, WWW-Authenticate"
        )
        headers[hdrs.VARY] = "Origin"
