"""``make chaos``: the faults a fleet meets, against two gateway replicas that
share a real redis-server, and what held.

    python -m loadtest.chaos               # 10 rounds, about three minutes
    python -m loadtest.chaos --rounds 1

Each round runs every check once, on the same processes: a burst of requests
on a healthy Redis; Redis restarted empty under live streams (their leases
and their resumes on the other replica); Redis stalled (SIGSTOP) under a
burst (stream starts, leases left behind); an upstream that only sends
keep-alive comments; client input no JSON form allows; a reload of a
half-written configuration file. A check holds or it does not, and says
what it saw; the report goes to ``results/chaos/latest.md`` and the exit
code is 1 when anything did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from redis import asyncio as aioredis

from gateway.sse import Event, SSEParser

from .fleet import start_redis
from .harness import (
    free_port,
    metric_total,
    percentile,
    report,
    start_emulator,
    start_gateway,
    stop,
    wait_ready,
)

PLAIN_KEY = "chaos-key"  # no limits
LIMIT = 20  # the concurrency-limited tenants' max_streams
RATE = 100  # the burst tenants' requests a minute
BURST = 800
PREFIX = "chatiq-gateway"  # the replicas' redis.key_prefix (the default)


def tenants(rounds: int) -> list[dict[str, Any]]:
    """A limited tenant per check (and a burst tenant per round: its minute's
    quota is spent by the round's burst)."""
    return [
        {"name": "restart", "key": "restart-key", "max_streams": LIMIT, "resumable": True},
        {"name": "stall", "key": "stall-key", "max_streams": LIMIT},
        *(
            {
                "name": f"burst{n}",
                "key": f"burst{n}-key",
                "requests_per_minute": RATE,
                "max_streams": 0,
            }
            for n in range(rounds)
        ),
    ]


@dataclass
class Check:
    name: str
    held: bool
    saw: str


@dataclass
class Replica:
    port: int
    process: subprocess.Popen[bytes]
    config: Path


@dataclass
class Fleet:
    folder: Path
    redis_port: int
    redis: subprocess.Popen[bytes]
    replicas: list[Replica]
    session: aiohttp.ClientSession
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, i: int, path: str = "/api/chatbot") -> str:
        return f"http://127.0.0.1:{self.replicas[i % 2].port}{path}"

    async def restart_redis(self) -> None:
        """Killed and started again on its port: empty, as after a crash."""
        self.redis.kill()
        self.redis.wait()
        self.redis = start_redis(self.folder, self.redis_port)
        await self.redis_answers()

    async def redis_answers(self) -> None:
        client = aioredis.Redis(port=self.redis_port)
        try:
            for _ in range(200):
                try:
                    await client.ping()
                    return
                except (aioredis.RedisError, OSError):
                    await asyncio.sleep(0.02)
            raise SystemExit("chaos: redis-server did not start")
        finally:
            await client.aclose()

    async def leases(self, tenant: str) -> int:
        """A tenant's leases Redis holds now (not yet expired)."""
        client = aioredis.Redis(port=self.redis_port)
        try:
            seconds, micros = await client.time()
            now_ms = seconds * 1000 + micros // 1000
            return int(await client.zcount(f"{{{PREFIX}:{tenant}}}:leases", now_ms, "+inf"))
        finally:
            await client.aclose()


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await condition():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


async def events_of(response: aiohttp.ClientResponse, limit: int | None = None) -> list[Event]:
    """The data events of a stream, up to ``limit`` (then the connection is dropped)."""
    parser, events = SSEParser(), []
    async for chunk in response.content.iter_any():
        for event in parser.feed(chunk):
            if event.data is not None:
                events.append(event)
                if limit is not None and len(events) >= limit:
                    response.close()
                    return events
    return events


def ended_with(events: list[Event]) -> str:
    """How a stream ended: "done", an error code, or "no [DONE]"."""
    if not events or events[-1].data != "[DONE]":
        return "no [DONE]"
    if len(events) > 1 and '"error"' in (events[-2].data or ""):
        error: dict[str, Any] = json.loads(events[-2].data or "{}")["error"]
        return str(error.get("code"))
    return "done"


async def burst(fleet: Fleet, round_no: int) -> list[Check]:
    key = f"burst{round_no}-key"

    async def one(i: int) -> int:
        async with fleet.session.post(fleet.url(i), json={"message": "hi"}, headers=auth(key)) as r:
            return r.status  # and the stream is dropped at once

    statuses = Counter(await asyncio.gather(*(one(i) for i in range(BURST))))
    want = {200: RATE, 429: BURST - RATE}
    saw = ", ".join(f"{n} x {status}" for status, n in sorted(statuses.items()))
    return [Check(f"{BURST} requests at once, {RATE} a minute allowed", statuses == want, saw)]


async def redis_restart(fleet: Fleet) -> list[Check]:
    key = "restart-key"
    started: list[tuple[int, str]] = []  # (replica, stream id)
    for i in range(LIMIT):
        r = await fleet.session.post(fleet.url(i), json={"message": "hi"}, headers=auth(key))
        started.append((i, r.headers.get("X-Stream-Id", "")))
        await events_of(r, limit=2)  # then dropped: the stream lives on, detached
    await fleet.restart_redis()

    async def try_more() -> int:
        statuses = []
        for i in range(LIMIT):
            body = {"message": "hi"}
            async with fleet.session.post(fleet.url(i), json=body, headers=auth(key)) as r:
                statuses.append(r.status)
        return statuses.count(200)

    at_once = await try_more()  # before any replica renewed its leases

    async def all_back() -> bool:
        return await fleet.leases("restart") == LIMIT

    back = await until(all_back, 6.0)
    checks = [
        Check(
            f"{LIMIT} leases back after Redis restarted empty", back is not None,
            f"in {back:.1f} s" if back is not None else f"{await fleet.leases('restart')} held",
        )
    ]  # fmt: skip
    later = await try_more()
    checks.append(Check(
        f"never more than {LIMIT} streams at a limit of {LIMIT}", at_once == later == 0,
        f"{LIMIT} live; {LIMIT} more right after the restart: {at_once} admitted; "
        f"once the leases were back: {later}",
    ))  # fmt: skip

    async def resumed_elsewhere(i: int, stream_id: str) -> str:
        url = fleet.url(i + 1, f"/api/chatbot/streams/{stream_id}")
        for _ in range(30):  # a second for the producer to renew what Redis lost
            r = await fleet.session.get(url, headers=auth(key, **{"Last-Event-ID": "2"}))
            if r.status != 404:
                break
            r.release()
            await asyncio.sleep(0.1)
        if r.status != 200:
            r.release()
            return f"status {r.status}"
        events = await events_of(r)
        ids = [e.id for e in events]
        whole = ids == [str(n) for n in range(3, len(ids) + 3)]
        return ended_with(events) if whole else "events missing"

    ends = Counter(await asyncio.gather(*(resumed_elsewhere(i, s) for i, s in started)))
    saw = ", ".join(f"{n} {end}" for end, n in sorted(ends.items()))
    checks.append(Check("live streams resume on the other replica", ends == {"done": LIMIT}, saw))
    beyond = fleet.url(1, f"/api/chatbot/streams/{started[0][1]}")
    async with fleet.session.get(beyond, headers=auth(key, **{"Last-Event-ID": "100000"})) as r:
        checks.append(Check("a Last-Event-ID past the end, from Redis", r.status == 400,
                            f"status {r.status}"))  # fmt: skip
    return checks


async def redis_stall(fleet: Fleet, stall_s: float = 1.5) -> list[Check]:
    """SIGSTOP: Redis takes connections and commands and answers nothing."""
    fleet.redis.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:

        async def start(i: int, key: str, resumable: str) -> tuple[int, float]:
            began = time.monotonic()
            headers = auth(key, **{"X-Resumable": resumable})
            r = await fleet.session.post(fleet.url(i), json={"message": "hi"}, headers=headers)
            if r.status == 200:
                await events_of(r, limit=1)
            r.close()
            return r.status, time.monotonic() - began

        limited = await asyncio.gather(*(start(i, "stall-key", "0") for i in range(LIMIT)))
        resumable = await asyncio.gather(*(start(i, PLAIN_KEY, "1") for i in range(LIMIT)))
        await asyncio.sleep(max(0.0, stall_s - (time.monotonic() - stopped)))
    finally:
        fleet.redis.send_signal(signal.SIGCONT)
    waits = [took for status, took in resumable if status == 200]
    checks = [
        Check(
            "stream starts while Redis hangs (timeout 0.25 s)",
            len(waits) == LIMIT and max(waits) < 1.0,
            f"{len(waits)} started; first event p50 {percentile(waits, 0.5) * 1000:.0f} ms, "
            f"max {max(waits, default=0) * 1000:.0f} ms",
        )
    ]
    admitted = sum(status == 200 for status, _ in limited)

    async def none_left() -> bool:
        return await fleet.leases("stall") == 0

    cleared = await until(none_left, 5.0)
    checks.append(Check(
        "no lease left behind by checks a stalled Redis ran late", cleared is not None,
        f"{admitted} admitted while it hung; none left "
        f"{cleared:.1f} s after it woke" if cleared is not None
        else f"{await fleet.leases('stall')} leases held by nobody",
    ))  # fmt: skip
    after = [await start(i, "stall-key", "0") for i in range(LIMIT)]
    got = sum(status == 200 for status, _ in after)
    checks.append(Check(f"then {LIMIT} streams admitted at a limit of {LIMIT}", got == LIMIT,
                        f"{got} of {LIMIT}"))  # fmt: skip
    return checks


async def pings(fleet: Fleet) -> list[Check]:
    """An upstream that answers nothing but keep-alive comments."""
    body = {"message": "hi", "bot": "fault-ping-mid"}
    began = time.monotonic()
    async with fleet.session.post(fleet.url(0), json=body, headers=auth(PLAIN_KEY)) as r:
        plain = ended_with(await events_of(r))
    took = time.monotonic() - began
    resumable = auth(PLAIN_KEY, **{"X-Resumable": "1"})
    r = await fleet.session.post(fleet.url(0), json=body, headers=resumable)
    stream_id = r.headers.get("X-Stream-Id", "")
    await events_of(r, limit=1)
    url = fleet.url(1, f"/api/chatbot/streams/{stream_id}")
    async with fleet.session.get(url, headers=auth(PLAIN_KEY, **{"Last-Event-ID": "1"})) as r:
        elsewhere = ended_with(await events_of(r)) if r.status == 200 else f"status {r.status}"
    held = plain == elsewhere == "UPSTREAM_TIMEOUT"
    saw = f"{plain} after {took:.1f} s; resumed on the other replica: {elsewhere}"
    return [Check("only keep-alive comments end at the idle timeout (2 s)", held, saw)]


BAD_BODIES: list[tuple[str, bytes]] = [
    ("/api/chatbot", b'{"message": "hi", "conversation_id": ' + b"7" * 4301 + b"}"),
    ("/api/chatbot", b'{"message": "hi", "history": [NaN]}'),
    ("/v1/chat/completions",
     b'{"model": "demo", "messages": [{"role": "user", "content": "a\\u0000b"},'
     b' {"role": "user", "content": "hi"}]}'),
    ("/v1/chat/completions",
     b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"},'
     b' {"role": "user", "content": "hi"}]}'),
    ("/api/ui/chat", b'{"messages": [{"id": "1", "role": "user", "parts": [{"type": "text"}]}]}'),
    ("/api/ui/chat", b'{"messages": [{"id": "1", "role": "user", "parts": [{"type": "text", '
                     b'"text": "' + b"9" * 5000 + b'"}]}], "n": ' + b"9" * 5000 + b"}"),
]  # fmt: skip


async def bad_input(fleet: Fleet) -> list[Check]:
    statuses = []
    for i, (path, body) in enumerate(BAD_BODIES):
        headers = auth(PLAIN_KEY, **{"Content-Type": "application/json"})
        async with fleet.session.post(fleet.url(i, path), data=body, headers=headers) as r:
            await r.read()
            statuses.append(r.status)
    return [Check(f"{len(BAD_BODIES)} bodies no JSON form allows, on three frontends",
                  statuses == [400] * len(BAD_BODIES), f"statuses {statuses}")]  # fmt: skip


async def reload(fleet: Fleet) -> list[Check]:
    """The configuration file caught half-written (cut before its tenants), then SIGHUP."""
    replica = fleet.replicas[0]
    whole = replica.config.read_text()
    before = await metric_total(fleet.session, replica.port, "chatiq_gateway_config_reloads_total")
    replica.config.write_text(whole[: whole.index("[[tenants]]")])
    try:
        replica.process.send_signal(signal.SIGHUP)

        async def answered() -> bool:
            total = "chatiq_gateway_config_reloads_total"
            return await metric_total(fleet.session, replica.port, total) > before

        await until(answered, 5.0)
        refused = await metric_total(
            fleet.session, replica.port, "chatiq_gateway_config_reloads_total", 'result="invalid"'
        )
        body = {"message": "hi", "stream": False}
        async with fleet.session.post(fleet.url(0), json=body, headers=auth(PLAIN_KEY)) as r:
            status = r.status
    finally:
        replica.config.write_text(whole)
    saw = f"refused {refused:.0f} so far; the tenant then got {status}"
    held = refused > 0 and status == 200
    return [Check("a reload of a half-written config file is refused", held, saw)]


CHECKS: list[Callable[[Fleet], Awaitable[list[Check]]]] = [
    redis_restart, redis_stall, pings, bad_input, reload
]  # fmt: skip


async def run(args: argparse.Namespace) -> int:
    folder = Path(args.folder or tempfile.mkdtemp(prefix="chatiq-chaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    emulator_port, redis_port = free_port(), free_port()
    emulator = start_emulator(  # 6 s a reply; a stalled one: 30 s
        emulator_port, "--ttft-ms", "0", "--tokens-per-s", "10", "--reply-tokens", "60",
        "--stall-s", "30",
    )  # fmt: skip
    redis = start_redis(folder, redis_port)
    tables: dict[str, Any] = {
        "upstream": {"idle_timeout_s": 2.0, "max_connections": 2000},
        "admission": {"max_streams": 2000, "max_queue": 2000},
        "resume": {"enabled": True, "detach_grace_s": 30.0},
        "redis": {"url": f"redis://127.0.0.1:{redis_port}/0", "expected_replicas": 2},
        "logging": {"level": "warning", "format": "json"},
    }  # fmt: skip
    replicas = []
    for _ in range(2):
        port = free_port()
        process, _ = start_gateway(
            folder, port, emulator_port, PLAIN_KEY, more_tenants=tenants(args.rounds), **tables
        )
        replicas.append(Replica(port, process, folder / f"gateway-{port}.toml"))
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    session = aiohttp.ClientSession(connector=connector)
    fleet = Fleet(folder, redis_port, redis, replicas, session, [emulator])
    results: list[tuple[int, Check]] = []
    try:
        await fleet.redis_answers()
        for replica in replicas:
            await wait_ready(f"http://127.0.0.1:{replica.port}/healthz")
        for round_no in range(args.rounds):
            checks: list[Callable[[Fleet], Awaitable[list[Check]]]] = [
                functools.partial(burst, round_no=round_no),
                *CHECKS,
            ]
            for check in checks:
                for result in await check(fleet):
                    results.append((round_no + 1, result))
                    mark = "held" if result.held else "DID NOT HOLD"
                    print(f"round {round_no + 1}: {mark}: {result.name} ({result.saw})", flush=True)
    finally:
        await session.close()
        stop(*(r.process for r in replicas), emulator, fleet.redis)
    failed = [r for _, r in results if not r.held]
    lines = [
        f"## Chaos: {args.rounds} round(s) against two replicas sharing a redis-server",
        "",
        f"**{len(results) - len(failed)} of {len(results)} checks held.**",
        "",
        "| round | check | held | what it saw |",
        "| ---: | --- | --- | --- |",
        *(f"| {n} | {r.name} | {'yes' if r.held else '**no**'} | {r.saw} |" for n, r in results),
    ]
    lines += ["", f"Configurations and logs: {folder}"]
    report("\n".join(lines) + "\n", args.out)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="every check, this many times")
    parser.add_argument("--out", default="results/chaos", help="where the report goes")
    parser.add_argument("--folder", help="for the configs and logs (default: a new temp dir)")
    return asyncio.run(run(parser.parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
