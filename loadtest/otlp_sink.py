"""An OTLP/HTTP trace receiver that counts what it is sent and keeps nothing:
the collector a benchmark's traced gateways export to (``make bench``'s
``traced`` and ``sampled`` paths). ``GET /stats``: requests, bytes, spans."""

from __future__ import annotations

import argparse

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

STATS = web.AppKey("stats", dict[str, int])
ANSWER = ExportTraceServiceResponse().SerializeToString()


async def receive(request: web.Request) -> web.Response:
    body = await request.read()
    message = ExportTraceServiceRequest()
    message.ParseFromString(body)
    stats = request.app[STATS]
    stats["requests"] += 1
    stats["bytes"] += len(body)
    stats["spans"] += sum(
        len(scope.spans) for resource in message.resource_spans for scope in resource.scope_spans
    )
    return web.Response(body=ANSWER, content_type="application/x-protobuf")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS])


def create_sink() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATS] = {"requests": 0, "bytes": 0, "spans": 0}
    app.router.add_post("/v1/traces", receive)
    app.router.add_get("/stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    web.run_app(create_sink(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
