"""``make resumes``: resumable streams dropped and resumed, against real
gateway processes: the memory a detached stream holds, how long a resume
takes to its first event, and that every stream still ends whole.

    python -m loadtest.resumes --streams 1000            # one process
    python -m loadtest.resumes --streams 1000 --redis    # resumed on another replica
    python -m loadtest.resumes --streams 2000 --reply-tokens 400 --waves 2

N clients each start a resumable stream, read its first events and drop the
connection (a phone losing its network). While they are all detached, the
producing gateway's RSS growth over N is the memory per detached stream.
Then every client resumes with ``Last-Event-ID`` (with ``--redis``, on a
second replica that reads the stream from Redis), and the time from the
resume request to its first event is measured. With ``--waves``, the whole
burst again, on the same processes: RSS after each wave says whether the
memory a burst took is kept, reused or grows.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.sse import Event, SSEParser

from .fleet import start_redis
from .harness import (
    cpu_seconds,
    free_port,
    metric_total,
    percentile,
    report,
    rss_mib,
    start_emulator,
    start_gateway,
    stop,
    wait_ready,
)

KEY = "resume-key"
READ_BEFORE_DROP = 3  # events each client reads before it drops


@dataclass
class Client:
    stream_id: str = ""
    events: list[Event] = field(default_factory=list)
    resume_ms: float | None = None


async def read(response: aiohttp.ClientResponse, client: Client, limit: int | None) -> None:
    parser = SSEParser()
    async for chunk in response.content.iter_any():
        for event in parser.feed(chunk):
            if event.data is None:
                continue
            client.events.append(event)
            if limit is not None and len(client.events) >= limit:
                response.close()
                return


async def start_and_drop(session: aiohttp.ClientSession, port: int) -> Client:
    client = Client()
    headers = {"Authorization": f"Bearer {KEY}", "X-Resumable": "1"}
    async with session.post(
        f"http://127.0.0.1:{port}/api/chatbot", json={"message": "hello"}, headers=headers
    ) as response:
        response.raise_for_status()
        client.stream_id = response.headers["X-Stream-Id"]
        await read(response, client, READ_BEFORE_DROP)
    return client


async def resume(session: aiohttp.ClientSession, port: int, client: Client) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Last-Event-ID": client.events[-1].id or "0"}
    url = f"http://127.0.0.1:{port}/api/chatbot/streams/{client.stream_id}"
    asked = time.perf_counter()
    async with session.get(url, headers=headers) as response:
        response.raise_for_status()
        parser = SSEParser()
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                if event.data is None:
                    continue
                if client.resume_ms is None:
                    client.resume_ms = (time.perf_counter() - asked) * 1000
                client.events.append(event)


def whole(client: Client) -> bool:
    """Every event once, in order, to [DONE]."""
    ids = [e.id for e in client.events]
    return ids == [str(i) for i in range(1, len(ids) + 1)] and client.events[-1].data == "[DONE]"


async def run(args: argparse.Namespace) -> int:
    folder = Path(tempfile.mkdtemp(prefix="resumes-"))
    emulator_port = free_port()
    tokens_per_s = args.reply_tokens / 8  # 8 s a reply: each live while its client is away
    emulator = start_emulator(
        emulator_port, "--ttft-ms", "0", "--tokens-per-s", f"{tokens_per_s:g}",
        "--reply-tokens", str(args.reply_tokens),
    )  # fmt: skip
    processes = [emulator]
    named = {"emulator": emulator}
    tables: dict[str, Any] = {
        "server": {"max_connections": args.streams * 2 + 100},
        "upstream": {"max_connections": args.streams + 10},
        "admission": {"max_streams": args.streams + 10, "max_queue": args.streams},
        "resume": {"enabled": True, "detach_grace_s": 60.0},
        "logging": {"level": "warning", "format": "json"},
    }
    if args.redis:
        redis_port = free_port()
        processes.append(start_redis(folder, redis_port))
        named["redis"] = processes[-1]
        tables["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
    producer_port = free_port()
    producer, _ = start_gateway(folder, producer_port, emulator_port, KEY, **tables)
    processes.append(producer)
    named["gateway" if not args.redis else "producing replica"] = producer
    resume_port = producer_port
    if args.redis:
        resume_port = free_port()
        other, _ = start_gateway(folder, resume_port, emulator_port, KEY, **tables)
        processes.append(other)
        named["resuming replica"] = other
    try:
        for port in {producer_port, resume_port}:
            await wait_ready(f"http://127.0.0.1:{port}/healthz")
        before = rss_mib(producer.pid)
        memory: list[tuple[float, float]] = []  # each wave's RSS: detached, after it
        for _ in range(args.waves):
            last = await wave(args, (producer_port, producer.pid), resume_port, named)
            await asyncio.sleep(1.0)
            memory.append((last.detached_rss_mib, rss_mib(producer.pid)))
        async with aiohttp.ClientSession() as session:
            counted = await metric_total(
                session, producer_port, "chatiq_gateway_streams_detached_total"
            )
        clients, times, resumed_s, cpu = last.clients, last.resume_ms, last.resumed_s, last.cpu
        detached = memory[0][0]
        complete = sum(whole(c) for c in clients)
        where = "another replica, from Redis" if args.redis else "the same process"
        per_stream = (detached - before) * 1024 / args.streams
        lines = [
            f"## Resumes: {args.streams:,} streams of {args.reply_tokens} tokens dropped after "
            f"{READ_BEFORE_DROP} events, resumed on {where}",
            "",
            f"- detached: {counted:.0f} in all (the gateway's `streams_detached_total`), "
            f"{args.streams:,} at once",
            f"- memory while detached: RSS {before:.0f} MiB before, {detached:.0f} MiB with "
            f"them detached: **{per_stream:.1f} KiB per detached stream** (its upstream "
            "connection and the events read meanwhile)",
            "- RSS by wave, detached / after it: "
            + ", ".join(f"{d:.0f} / {a:.0f} MiB" for d, a in memory),
            f"- resume, request to its first event: p50 **{percentile(times, 0.5):.1f} ms**, "
            f"p99 **{percentile(times, 0.99):.1f} ms**, max {max(times):.1f} ms "
            f"({len(times):,} resumes at {args.rate:g} a second; all streams done "
            f"{resumed_s:.1f} s after the first)",
            f"- whole (every event once, in order, to [DONE]): **{complete:,} of "
            f"{args.streams:,}** (the last wave)",
            "- CPU while resuming (share of a core): "
            + ", ".join(f"{name} {share:.0%}" for name, share in cpu.items()),
        ]
        report("\n".join(lines) + "\n", args.out, "latest-redis.md" if args.redis else "latest.md")
        return 0 if complete == args.streams else 1
    finally:
        stop(*reversed(processes))


@dataclass
class Wave:
    clients: list[Client]
    detached_rss_mib: float  # with every stream detached
    resume_ms: list[float]
    resumed_s: float  # first resume to the last stream's end
    cpu: dict[str, float]  # share of a core, per process, while resuming


async def wave(
    args: argparse.Namespace,
    producer: tuple[int, int],  # its port, its pid
    resume_port: int,
    named: dict[str, Any],
) -> Wave:
    """One burst: every stream started and dropped, then all resumed at ``--rate``."""
    limit = asyncio.Semaphore(200)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> Client:
            async with limit:
                return await start_and_drop(session, producer[0])

        clients = await asyncio.gather(*(one() for _ in range(args.streams)))
        await asyncio.sleep(1.0)
        detached = rss_mib(producer[1])
        started = time.perf_counter()
        cpu_before = {name: cpu_seconds(p.pid) for name, p in named.items()}

        async def paced(i: int, client: Client) -> None:
            await asyncio.sleep(i / args.rate)  # resumes arrive at a steady rate
            await resume(session, resume_port, client)

        await asyncio.gather(*(paced(i, c) for i, c in enumerate(clients)))
        resumed_s = time.perf_counter() - started
        cpu = {n: (cpu_seconds(p.pid) - cpu_before[n]) / resumed_s for n, p in named.items()}
    times = [c.resume_ms for c in clients if c.resume_ms is not None]
    return Wave(clients, detached, times, resumed_s, cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resumes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="streams dropped and resumed")
    parser.add_argument("--redis", action="store_true", help="resume on a second replica")
    parser.add_argument("--rate", type=float, default=500.0, help="resumes a second")
    parser.add_argument("--reply-tokens", type=int, default=40, help="each answer's length")
    parser.add_argument("--waves", type=int, default=1, help="bursts, one after the other")
    parser.add_argument("--out", default="results/resumes", help="where the summary goes")
    return asyncio.run(run(parser.parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
