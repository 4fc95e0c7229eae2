"""Tenant quotas shared by a fleet through a real Redis (started here on a free
port), with real gateway processes: exact concurrency and rate across two
replicas, a killed replica's leases freed by their expiry, and Redis going
away and coming back."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio.connection import AbstractConnection

from gateway.config import LoggingSettings, RedisSettings
from gateway.logs import make_logger
from gateway.metrics import Metrics
from gateway.quotas.shared import SharedQuotas
from loadtest.emulator import EmulatorSettings
from loadtest.harness import free_port, start_gateway, stop, wait_ready
from tests.helpers import (
    ACME_KEY,
    AUTH,
    CHATIQ_KEY,
    GatewayProcess,
    StackFactory,
    eventually,
    read_stream,
)
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.external, pytest.mark.process]


@pytest.fixture
async def fleet(
    make_stack: StackFactory, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Any]:
    """Start replicas of the gateway sharing Redis, in front of one slow emulator."""
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=10, reply_tokens=100), record=False
    )
    replicas: list[GatewayProcess] = []

    async def start(
        limits: tuple[int, int], n: int = 2, **redis: Any
    ) -> tuple[list[GatewayProcess], aiohttp.ClientSession]:
        for _ in range(n):
            port = free_port()
            assert stack.emulator.port is not None
            process, log = start_gateway(
                tmp_path, port, stack.emulator.port, ACME_KEY, CHATIQ_KEY,
                tenant_limits=limits, redis={"url": redis_server.url, **redis},
            )  # fmt: skip
            replicas.append(GatewayProcess(process, port, log))
        for replica in replicas:
            await wait_ready(f"http://127.0.0.1:{replica.port}/healthz")
        return replicas, stack.session

    yield start
    # The release check's fleet part: once every stream has ended (or its replica
    # died and its lease ran out), Redis holds no lease.
    if redis_server.process is not None:
        until = time.monotonic() + 20
        while redis_server.leases() and time.monotonic() < until:
            await asyncio.sleep(0.1)
        assert redis_server.leases() == 0, "leases left in Redis"
    for replica in replicas:
        stop(replica.process)


async def open_stream(
    session: aiohttp.ClientSession, replica: GatewayProcess
) -> aiohttp.ClientResponse:
    r = await session.post(replica.url, json={"message": "hi"}, headers=AUTH)
    if r.status == 200:
        await r.content.readline()  # live: its lease is held
    return r


async def test_a_tenant_gets_exactly_its_streams_across_the_fleet(
    fleet: Any, redis_server: RedisServer
) -> None:
    (a, b), session = await fleet(limits=(10, 0))
    held = [await open_stream(session, replica) for replica in (a, b) * 5]
    assert [r.status for r in held] == [200] * 10
    assert redis_server.leases() == 10
    for replica in (a, b):
        extra = await open_stream(session, replica)
        assert extra.status == 429
        assert int(extra.headers["Retry-After"]) >= 1
        assert (await extra.json())["error"]["code"] == "RATE_LIMIT"
        extra.close()
    held[0].close()  # one ends: its slot is free for either replica
    await asyncio.sleep(0.3)
    again = await open_stream(session, b)
    assert again.status == 200
    for r in [*held[1:], again]:
        r.close()
    for _ in range(100):
        if redis_server.leases() == 0:
            break
        await asyncio.sleep(0.05)
    assert redis_server.leases() == 0  # every lease given back


async def test_requests_per_minute_hold_across_the_fleet(fleet: Any) -> None:
    (a, b), session = await fleet(limits=(0, 20))
    statuses = []
    for i in range(30):
        async with session.post(
            (a, b)[i % 2].url, json={"message": "hi", "stream": False}, headers=AUTH
        ) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert float(r.headers["Retry-After"]) >= 1
    # A burst of the whole minute's quota, then one more every 3 s at most.
    assert 20 <= statuses.count(200) <= 21, statuses


async def test_a_killed_replica_frees_its_tenants_slots_within_the_lease_ttl(
    fleet: Any, redis_server: RedisServer
) -> None:
    (a, b), session = await fleet(limits=(10, 0), lease_ttl_s=2.0)
    held = [await open_stream(session, replica) for replica in (a, b) * 5]
    assert [r.status for r in held] == [200] * 10
    a.process.send_signal(signal.SIGKILL)
    a.process.wait()
    killed = time.monotonic()
    extra = await open_stream(session, b)
    assert extra.status == 429  # its leases live on until they expire
    extra.close()
    freed: list[aiohttp.ClientResponse] = []
    while len(freed) < 5:
        assert time.monotonic() - killed < 2.0 + 1.5, "the dead replica's slots never came back"
        r = await open_stream(session, b)
        if r.status == 200:
            freed.append(r)
        else:
            r.close()
            await asyncio.sleep(0.1)
    late = await open_stream(session, b)
    assert late.status == 429  # exactly its 5, no more
    late.close()
    for r in held + freed:
        r.close()


async def test_with_redis_gone_streams_go_on_and_quotas_fall_back_then_share_again(
    fleet: Any, redis_server: RedisServer
) -> None:
    (a, b), session = await fleet(
        limits=(4, 0), expected_replicas=2, lease_ttl_s=3.0, warn_every_s=60.0
    )
    live = await open_stream(session, a)
    assert live.status == 200
    redis_server.stop()
    # New requests: this replica's share of the limit (4 / 2 replicas), counted locally.
    fallback = [await open_stream(session, b) for _ in range(3)]
    assert [r.status for r in fallback] == [200, 200, 429]
    assert await b.metric(session, "chatiq_gateway_quota_backend_up") == 0
    assert await b.metric(session, "chatiq_gateway_quota_fallbacks_total") >= 3
    async with session.get(f"http://127.0.0.1:{b.port}/readyz") as r:
        assert r.status == 200
    _, events = await read_stream(live)  # the stream that was live goes on to the end
    assert events[-1] == "[DONE]"
    for r in fallback:
        r.close()
    assert b.log().count("quota_backend_down") == 1  # said once, not per request

    redis_server.start()  # back, empty: shared limits hold again, with no restart
    for replica in (a, b):  # each notices within a second (its probe), by itself
        for _ in range(60):
            if await replica.metric(session, "chatiq_gateway_quota_backend_up") == 1:
                break
            await asyncio.sleep(0.1)
        assert await replica.metric(session, "chatiq_gateway_quota_backend_up") == 1
    held = [await open_stream(session, replica) for replica in (a, b, a, b, a)]
    assert [r.status for r in held] == [200, 200, 200, 200, 429]
    for r in held:
        r.close()


async def test_on_error_reject_answers_503_while_redis_is_down(
    fleet: Any, redis_server: RedisServer
) -> None:
    (a,), session = await fleet(limits=(4, 0), n=1, on_error="reject")
    redis_server.stop()
    async with session.post(a.url, json={"message": "hi"}, headers=AUTH) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "1"
    async with session.get(f"http://127.0.0.1:{a.port}/readyz") as r:
        assert r.status == 200


@pytest.mark.parametrize("on_error", ["reject", "local"])
async def test_a_burst_on_a_healthy_redis_gets_exactly_the_tenant_s_quota(
    fleet: Any, redis_server: RedisServer, on_error: str
) -> None:
    """800 requests at once over two replicas, at 100 a minute: redis-py's pool
    of 100 connections was full at the 101st concurrent check, and the replica
    took Redis for down (reject: hundreds of 503s; local: twice the limit)."""
    (a, b), _ = await fleet(limits=(0, 100), on_error=on_error, expected_replicas=2)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(replica: GatewayProcess) -> int:
            body = {"message": "hi", "stream": False}
            async with session.post(replica.url, json=body, headers=AUTH) as r:
                await r.read()
                return r.status

        started = time.monotonic()
        statuses = await asyncio.gather(*(one(r) for r in (a, b) * 400))
        took = time.monotonic() - started
    # The burst allowance, and one request more each 0.6 s the burst lasted (a
    # loaded machine may take seconds over 800 requests): never twice the limit.
    allowed = 100 + int(took / 0.6)
    assert 100 <= statuses.count(200) <= allowed, (took, sorted(set(statuses)))
    assert statuses.count(200) + statuses.count(429) == 800, sorted(set(statuses))
    for replica in (a, b):
        assert "quota_backend_down" not in replica.log()


async def test_leases_come_back_when_redis_restarts_empty(
    fleet: Any, redis_server: RedisServer
) -> None:
    """20 live streams at a limit of 20; Redis restarts with nothing in it. The
    replicas' renewals add their leases again (they only refreshed leases Redis
    still held, so 20 more streams were admitted: 40 at once); and until they
    have, each replica holds the tenant to its share (right after the restart,
    before any renewal, 20 more were admitted too)."""
    (a, b), session = await fleet(limits=(20, 0), expected_replicas=2)
    live = [await open_stream(session, replica) for replica in (a, b) * 10]
    assert [r.status for r in live] == [200] * 20
    redis_server.stop()
    redis_server.start()  # empty
    at_once = [await open_stream(session, replica) for replica in (a, b) * 10]
    assert [r.status for r in at_once] == [429] * 20
    await eventually(lambda: redis_server.leases() == 20, timeout_s=8, what=redis_server.leases)
    more = [await open_stream(session, replica) for replica in (a, b) * 10]
    assert [r.status for r in more] == [429] * 20
    for r in [*live, *at_once, *more]:
        r.close()


async def test_checks_a_stalled_redis_ran_late_leave_no_lease_behind(
    fleet: Any, redis_server: RedisServer
) -> None:
    """Redis stalls (SIGSTOP) under a burst: each quota check times out, but was
    sent, and Redis runs it when it wakes, adding a lease that nobody holds (10
    were left after every stream ended; 9 of 20 new requests got 429 until the
    lease TTL, 15 s). Those leases are removed as soon as Redis answers again."""
    (a, b), session = await fleet(limits=(20, 0), expected_replicas=2)
    warm = await asyncio.gather(*(open_stream(session, r) for r in (a, b) * 10))
    for r in warm:  # each replica's pool has connections open to Redis, as in use
        r.close()
    await eventually(lambda: redis_server.leases() == 0, what=redis_server.leases)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        burst = await asyncio.gather(*(open_stream(session, r) for r in (a, b) * 10))
        assert [r.status for r in burst] == [200] * 20  # each replica's local share: 10
        for r in burst:
            r.close()
        await asyncio.sleep(1.0)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await eventually(lambda: redis_server.leases() == 0, timeout_s=5, what=redis_server.leases)
    for replica in (a, b):  # each has seen Redis back (its probe), so shares again
        for _ in range(50):
            if await replica.metric(session, "chatiq_gateway_quota_backend_up") == 1:
                break
            await asyncio.sleep(0.1)
    again = [await open_stream(session, replica) for replica in (a, b) * 10]
    assert [r.status for r in again] == [200] * 20
    for r in again:
        r.close()


async def test_checks_queued_when_redis_stalls_fail_at_once(
    fleet: Any, redis_server: RedisServer
) -> None:
    """400 requests at once, Redis stalled: the checks that were waiting for one
    of the 64 connections each tried Redis in turn and waited out its timeout
    (400 timeouts, the last request answered after 400 / 64 timeouts); now only
    the checks already sent time out, and the rest take the fallback at once."""
    (a,), _ = await fleet(limits=(0, 100_000), n=1)
    assert redis_server.process is not None
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            body = {"message": "hi", "stream": False}
            async with session.post(a.url, json=body, headers=AUTH) as r:
                await r.read()
                return r.status

        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            statuses = await asyncio.gather(*(one() for _ in range(400)))
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        timeouts = await a.metric(session, "chatiq_gateway_redis_errors_total")
    assert statuses == [200] * 400  # the local fallback's share: all of them
    assert 1 <= timeouts <= 64 + 2  # the 64 in flight (and a probe), not one per request


async def test_an_answer_that_came_while_the_gateway_s_loop_was_busy_is_not_a_timeout(
    redis_server: RedisServer,
) -> None:
    """The loop blocked past the check's timeout while Redis answered in time:
    the answer and the timer were both due on waking, and the timer won (the
    task's wake-up comes one turn after the read), so a busy gateway took a
    healthy Redis for down: under a burst on a loaded machine one replica fell
    back to its local share and 150 requests got through a limit of 100."""
    settings = RedisSettings(url=redis_server.url, timeout_s=0.1)
    quotas = SharedQuotas(settings, Metrics([]), make_logger(LoggingSettings(level="error")))
    await quotas.acquire("warm", 0, 5)  # a connection open
    loop = asyncio.get_running_loop()
    send = AbstractConnection.send_packed_command

    async def send_then_block(self: Any, *args: Any, **kwargs: Any) -> None:
        await send(self, *args, **kwargs)
        loop.call_soon(time.sleep, 0.3)  # the check is out: the loop blocks past its timeout

    AbstractConnection.send_packed_command = send_then_block  # type: ignore[method-assign]
    try:
        lease, _ = await quotas.acquire("busy", 0, 5)
    finally:
        AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    assert lease is not None and quotas.up
    await quotas.close()
