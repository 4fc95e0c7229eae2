"""``make bench-observability``: what metrics and logging cost on the hot path.

Runs one emulator and, in turn, gateways with metrics on or off and the
per-request log line on or off (level info vs warning). Each variant relays
as many events as it can for ``--seconds`` under ``--concurrency`` streams;
rounds are interleaved so machine noise hits every variant alike. Reports the
median events per second at the client and the gateway's CPU seconds per
100,000 events (from /proc), the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from loadtest.harness import cpu_seconds, free_port, start_emulator, start_gateway, stop, wait_ready

KEY = "bench-key"
VARIANTS = {
    "metrics on, log line on": (True, "info"),
    "metrics off, log line on": (False, "info"),
    "metrics on, log line off": (True, "warning"),
    "metrics off, log line off": (False, "warning"),
}


async def load(url: str, concurrency: int, seconds: float) -> int:
    """Stream chats back to back; return the events received."""
    events = 0
    until = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {KEY}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal events
        while time.monotonic() < until:
            async with session.post(url, json={"message": "bench"}, headers=headers) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        events += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return events


async def run_variant(
    tmp: Path, emulator_port: int, metrics: bool, level: str, args: argparse.Namespace
) -> tuple[float, float]:
    port = free_port()
    gateway, _ = start_gateway(
        tmp, port, emulator_port, KEY,
        metrics={"enabled": metrics}, logging={"format": "json", "level": level},
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        cpu_before = cpu_seconds(gateway.pid)
        started = time.monotonic()
        events = await load(f"http://127.0.0.1:{port}/api/chatbot", args.concurrency, args.seconds)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(gateway.pid) - cpu_before
    finally:
        stop(gateway)
    return events / elapsed, cpu / events * 100_000


async def bench(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-obs-"))
    emulator_port = free_port()
    emulator = start_emulator(
        emulator_port, "--ttft-ms", "0", "--tokens-per-s", "0",
        "--reply-tokens", str(args.reply_tokens),
    )  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    try:
        await wait_ready(f"http://127.0.0.1:{emulator_port}/healthz")
        for round_ in range(args.rounds):
            for name, (metrics, level) in VARIANTS.items():
                results[name].append(await run_variant(tmp, emulator_port, metrics, level, args))
                print(f"round {round_ + 1}: {name}: {results[name][-1][0]:,.0f} events/s",
                      file=sys.stderr)  # fmt: skip
    finally:
        stop(emulator)

    base_rate = statistics.median(r for r, _ in results["metrics off, log line off"])
    base_cpu = statistics.median(c for _, c in results["metrics off, log line off"])
    lines = [
        f"## Cost of metrics and logging on the hot path ({time.strftime('%Y-%m-%d')})",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{args.concurrency} concurrent streams of {args.reply_tokens} tokens, unpaced; "
        f"{args.rounds} interleaved rounds of {args.seconds:.0f} s; medians.",
        "",
        "| variant | events/s | vs. all off | gateway CPU s per 100k events | vs. all off |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in VARIANTS:
        rate = statistics.median(r for r, _ in results[name])
        cpu = statistics.median(c for _, c in results[name])
        lines.append(
            f"| {name} | {rate:,.0f} | {rate / base_rate - 1:+.1%} | {cpu:.2f} | "
            f"{cpu / base_cpu - 1:+.1%} |"
        )
    text = "\n".join(lines)
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench-observability", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--reply-tokens", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default="results/bench-observability.md")
    return asyncio.run(bench(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
