"""``make stalled``: clients that stop reading large replies, against a real
gateway process: how much memory each one holds, how much CPU the gateway
spends while they are stalled, and whether a normal stream still flows.

    python -m loadtest.stalled --streams 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from .harness import (
    cpu_seconds,
    free_port,
    metric_total,
    rss_mib,
    start_emulator,
    start_gateway,
    stop,
    wait_ready,
)

KEY = "stalled-key"


async def stall(port: int, n: int) -> list[socket.socket]:
    """``n`` clients that ask for the ``bulk`` bot's ~10 MB reply and read nothing."""
    loop = asyncio.get_running_loop()
    body = b'{"message": "hi", "bot": "bulk"}'
    request = (
        b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    sockets = []
    for _ in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        sockets.append(sock)
    return sockets


async def run(args: argparse.Namespace) -> int:
    emulator_port, port = free_port(), free_port()
    emulator = start_emulator(  # ~10 MB a reply for the bulk bot
        emulator_port, "--ttft-ms", "0", "--tokens-per-s", "0", "--reply-tokens", "300"
    )
    folder = Path(tempfile.mkdtemp(prefix="stalled-"))
    gateway, _ = start_gateway(
        folder, port, emulator_port, KEY,
        server={"max_connections": args.streams + 100},
        upstream={
            "client_write_timeout_s": 600.0,
            "keepalive_s": 1.0,
            "max_connections": args.streams + 10,
        },
        admission={"max_streams": args.streams + 10, "max_queue": 100},
        logging={"level": "warning", "format": "json"},
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        before = rss_mib(gateway.pid)
        sockets = await stall(port, args.streams)
        async with aiohttp.ClientSession() as session:
            until = time.monotonic() + 120
            active = "chatiq_gateway_active_streams"
            while await metric_total(session, port, active) < args.streams:
                if time.monotonic() > until:
                    raise SystemExit("the stalled streams never all started")
                await asyncio.sleep(0.2)
            await asyncio.sleep(3.0)  # every relay fills its buffers and blocks
            grown = rss_mib(gateway.pid) - before
            cpu, started = cpu_seconds(gateway.pid), time.monotonic()
            await asyncio.sleep(args.seconds)
            busy = (cpu_seconds(gateway.pid) - cpu) / (time.monotonic() - started)
            async with session.post(
                f"http://127.0.0.1:{port}/api/chatbot",
                json={"message": "still there?"},
                headers={"Authorization": f"Bearer {KEY}"},
            ) as r:
                flowed = (await r.read()).endswith(b"data: [DONE]\n\n")
        for sock in sockets:
            sock.close()
    finally:
        stop(gateway, emulator)
    print(
        json.dumps(
            {
                "stalled_streams": args.streams,
                "rss_growth_mib": round(grown, 1),
                "kib_per_stalled_stream": round(grown * 1024 / args.streams, 1),
                "cpu_while_stalled": f"{busy:.1%} of a core over {args.seconds:g} s",
                "a normal stream flowed": flowed,
            },
            indent=2,
        )
    )
    return 0 if flowed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stalled", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000, help="clients that stop reading")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to watch the CPU")
    return asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
