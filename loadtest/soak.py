"""``make soak``: many streams through a real gateway, with faults and hang-ups.

Starts the emulator and a gateway process, sends ``--streams`` chats at
``--concurrency``, of which ~10% ask the emulator for a fault and ~10% are
cancelled by the client at a random moment. Every other stream must end with
``[DONE]``; one that ends without it is a failure. The gateway's RSS is sampled
every second and reported as the first minute against the last one. At the
end every gauge must be back to zero and the gateway must exit 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from gateway.sse import SSEParser
from loadtest.harness import free_port, rss_mib, start_emulator, start_gateway, stop, wait_ready

FAULTS = (
    "fault-429", "fault-500", "fault-503", "fault-reset", "fault-stall-first",
    "fault-stall-mid", "fault-drop-mid", "fault-error-mid", "fault-malformed",
)  # fmt: skip
KEY = "soak-key"


async def one_stream(
    session: aiohttp.ClientSession, url: str, rng: random.Random, outcomes: Counter[str]
) -> None:
    roll = rng.random()
    bot = rng.choice(FAULTS) if roll < 0.1 else "demo"
    cancel_after = rng.uniform(0, 0.5) if 0.1 <= roll < 0.2 else None

    async def run() -> None:
        async with session.post(
            url, json={"message": "soak", "bot": bot}, headers={"Authorization": f"Bearer {KEY}"}
        ) as r:
            if r.status != 200:
                await r.read()
                outcomes[f"status {r.status}"] += 1
                return
            parser = SSEParser()
            events: list[str] = []
            async for chunk in r.content.iter_any():
                events += [e.data for e in parser.feed(chunk) if e.data is not None]
            if not events or events[-1] != "[DONE]":
                outcomes["SILENT END (bug)"] += 1
            elif '"error"' in events[-2]:
                outcomes["error event + [DONE]"] += 1
            else:
                outcomes["complete"] += 1

    task = asyncio.ensure_future(run())
    if cancel_after is None:
        await task
        return
    done, _ = await asyncio.wait({task}, timeout=cancel_after)
    if done:
        await task
    else:
        task.cancel()
        outcomes["cancelled by client"] += 1


async def soak(args: argparse.Namespace) -> int:
    emulator_port, gateway_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    emulator = start_emulator(
        emulator_port, "--ttft-ms", "20", "--tokens-per-s", str(args.tokens_per_s),
        "--reply-tokens", "30", "--stall-s", "5",
    )  # fmt: skip
    gateway, _ = start_gateway(
        tmp, gateway_port, emulator_port, KEY,
        server={"shutdown_grace_s": 5.0},
        upstream={"first_byte_timeout_s": 2.0, "idle_timeout_s": 2.0,
                  "backoff_base_s": 0.05, "retry_after_cap_s": 0.2},
        # Faults are injected on purpose: keep the breaker from pausing the soak.
        circuit={"min_requests": 1_000_000},
        admission={"max_streams": 2000},
        logging={"format": "json", "level": "warning"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{gateway_port}"
    samples: list[tuple[float, float]] = []
    outcomes: Counter[str] = Counter()
    try:
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(f"http://127.0.0.1:{emulator_port}/healthz")
            await wait_ready(f"{base}/healthz")
            started = time.monotonic()

            async def sample() -> None:
                while True:
                    samples.append((time.monotonic() - started, rss_mib(gateway.pid)))
                    await asyncio.sleep(1)

            sampler = asyncio.ensure_future(sample())
            rng = random.Random(args.seed)
            queue: asyncio.Queue[None] = asyncio.Queue()
            for _ in range(args.streams):
                queue.put_nowait(None)

            async def worker() -> None:
                while not queue.empty():
                    queue.get_nowait()
                    await one_stream(session, f"{base}/api/chatbot", rng, outcomes)

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            elapsed = time.monotonic() - started
            sampler.cancel()
            await asyncio.sleep(1)
            async with session.get(f"{base}/metrics") as r:
                metrics = await r.text()
        gauges = {
            line.split(" ")[0]: float(line.split(" ")[-1])
            for line in metrics.splitlines()
            if line.startswith(("chatiq_gateway_active_streams", "chatiq_gateway_queue_depth"))
        }
        gateway.send_signal(signal.SIGTERM)
        exit_code = gateway.wait(timeout=30)
    finally:
        stop(gateway, emulator)

    first = [rss for t, rss in samples if t < 60] or [samples[0][1]]
    last = [rss for t, rss in samples if t >= elapsed - 60] or [samples[-1][1]]
    report = [
        f"## Soak: {args.streams} streams, concurrency {args.concurrency}, "
        f"{elapsed:.0f} s ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)",
        "",
        "| outcome | streams |",
        "| --- | ---: |",
        *(f"| {k} | {v} |" for k, v in sorted(outcomes.items())),
        "",
        "| gateway RSS (MiB) | median | max |",
        "| --- | ---: | ---: |",
        f"| first minute | {statistics.median(first):.1f} | {max(first):.1f} |",
        f"| last minute | {statistics.median(last):.1f} | {max(last):.1f} |",
        "",
        f"Gauges after the run: {json.dumps(gauges)}; exit code on SIGTERM: {exit_code}.",
    ]
    text = "\n".join(report)
    print(text)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    bad = outcomes["SILENT END (bug)"] or any(gauges.values()) or exit_code != 0
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--tokens-per-s", type=float, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default="results/soak.md")
    return asyncio.run(soak(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
