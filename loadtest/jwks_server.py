"""A stand-in identity provider's key set for the benchmark's ``token`` path:
``GET /jwks`` answers the JWKS file it was given (the bench mints the tokens
with the matching private key)."""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--jwks", type=Path, required=True, help="the JWKS file to serve")
    args = parser.parse_args()
    body = args.jwks.read_bytes()

    async def jwks(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
