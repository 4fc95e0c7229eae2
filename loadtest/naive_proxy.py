"""NAIVE PROXY — FOR THE BENCHMARK ONLY. DO NOT DEPLOY.

The proxy as people write it from ChatIQ's published Flask example, kept here
as the baseline `make bench` compares against: Flask's threaded server (one
thread per stream), ``requests`` with ``stream=True`` for the upstream call,
each line re-decoded and re-encoded on the way through, no timeouts, no
backpressure, no limits, no error event when the upstream breaks. It does run
correctly for a well-behaved upstream, which is all the benchmark asks of it.

    python -m loadtest.naive_proxy --port 8282 --upstream http://127.0.0.1:8181/api/chat
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator

import requests
from flask import Flask, Response, request


def create_app(upstream_url: str) -> Flask:
    app = Flask(__name__)

    @app.post("/api/chatbot")
    def chatbot() -> Response:
        body = request.get_json()
        upstream = requests.post(
            upstream_url,
            json={
                "message": body["message"],
                "bot_slug": body.get("bot", "demo"),
                "conversation_id": body.get("conversation_id"),
                "stream": True,
            },
            stream=True,
        )

        def generate() -> Iterator[str]:
            for line in upstream.iter_lines():
                yield line.decode() + "\n"  # decoded and re-encoded, as in the example

        return Response(generate(), mimetype="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="naive Flask proxy (benchmark baseline)")
    parser.add_argument("--port", type=int, default=8282)
    parser.add_argument("--upstream", default="http://127.0.0.1:8181/api/chat")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log, as for the others
    create_app(args.upstream).run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
