"""Sign-in discovery (RFC 9728): ``GET /.well-known/oauth-protected-resource``
names the identity providers (``[[issuers]]``) whose tokens the gateway takes,
and ``/.well-known/oauth-protected-resource{prefix}`` does so for a frontend
whose clients look there (MCP's). A 401 on such a frontend's routes points at
its document (``resource_metadata`` in ``WWW-Authenticate``)."""

from __future__ import annotations

from aiohttp import web

from gateway.config import Settings
from gateway.state import SETTINGS

WELL_KNOWN = "/.well-known/oauth-protected-resource"


def origin(request: web.Request, settings: Settings) -> str:
    """The gateway's origin as its clients reach it."""
    return settings.server.public_url.rstrip("/") or f"{request.scheme}://{request.host}"


def metadata_url(request: web.Request, settings: Settings, prefix: str) -> str:
    return f"{origin(request, settings)}{WELL_KNOWN}{prefix}"


def add_routes(app: web.Application, settings: Settings, prefixes: list[str]) -> None:
    """The documents, when there are issuers: the gateway's, and one per prefix."""
    if not settings.issuers:
        return
    for prefix in ("", *prefixes):

        async def document(request: web.Request, prefix: str = prefix) -> web.Response:
            current = request.app[SETTINGS].current
            body = {
                "resource": f"{origin(request, current)}{prefix}",
                "authorization_servers": [issuer.issuer for issuer in current.issuers],
                "bearer_methods_supported": ["header"],
                "resource_name": "ChatIQ Gateway",
            }
            # Public, and read by browser-based clients from other origins.
            headers = {"Access-Control-Allow-Origin": "*", "Cache-Control": "max-age=300"}
            return web.json_response(body, headers=headers)

        app.router.add_get(f"{WELL_KNOWN}{prefix}", document, allow_head=False)
