"""The upstream connection pool against upstreams that close keep-alive
connections the ways real servers do, and a host name whose address moves."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest

from gateway.config import AdmissionSettings
from gateway.upstream.pool import Pool
from tests.helpers import Stack, StackFactory, gateway_settings
from tests.scripted import (
    BODY,
    JSON_BODY,
    ScriptedFactory,
    ScriptedRequest,
    ScriptedUpstream,
    ok_answer,
)


async def chat(stack: Stack, stream: bool) -> tuple[int, bytes]:
    async with await stack.chat({"message": "hi", "stream": stream}) as r:
        return r.status, await r.read()


def close_on_reuse(request: ScriptedRequest) -> bytes | None:
    """Closes a kept-alive connection when the next request arrives on it."""
    return ok_answer(request) if request.on_connection == 1 else None


STALE_UPSTREAMS: dict[str, dict[str, Any]] = {
    # the keep-alive race: the server closes as the next request arrives
    "closes-on-reuse": {"answer": close_on_reuse},
    # closes after every answer, without saying "Connection: close"
    "closes-after-each-answer": {"answer": ok_answer, "close_after": True},
    # a short keep-alive timeout, not announced, and clients about that far apart
    "short-keep-alive": {"answer": ok_answer, "server_idle_s": 0.2},
}


@pytest.mark.parametrize("upstream", list(STALE_UPSTREAMS))
@pytest.mark.parametrize("stream", [True, False])
async def test_stale_keep_alive_connections_lose_no_request(
    scripted: ScriptedFactory, upstream: str, stream: bool
) -> None:
    """20 concurrent x 10 rounds, no retries allowed: every request that met a
    connection the upstream had closed is re-sent on a new one."""
    spec = STALE_UPSTREAMS[upstream]
    stack, server = await scripted(**spec)
    rng = random.Random(7)
    for _ in range(10):
        results = await asyncio.gather(*(chat(stack, stream) for _ in range(20)))
        assert results == [(200, BODY if stream else JSON_BODY)] * 20
        if upstream == "short-keep-alive":
            await asyncio.sleep(0.2 + rng.uniform(-0.02, 0.02))
    resends = await stack.metric("chatiq_gateway_upstream_resends_total")
    # A re-sent request reached the server at most twice: once on the closing
    # connection (which it dropped unanswered), once on the new one.
    assert 200 <= len(server.requests) <= 200 + resends
    if upstream == "closes-on-reuse":  # every reuse meets the close: the resend path ran
        assert resends > 0
    else:  # the closes happened; whether one crossed a request in flight is timing
        assert server.connections > 20
    assert await stack.metric("chatiq_gateway_upstream_retries_total", reason="connect") == 0
    assert await stack.metric("chatiq_gateway_circuit_state", bot="demo") == 0


async def test_a_fresh_connection_that_fails_is_not_re_sent(scripted: ScriptedFactory) -> None:
    stack, server = await scripted(lambda request: None)  # closes without answering
    status, body = await chat(stack, True)
    assert status == 502 and b"could not reach" in body
    assert len(server.requests) == 1
    assert await stack.metric("chatiq_gateway_upstream_resends_total") == 0


async def test_idle_connections_are_closed_after_pool_idle_s(scripted: ScriptedFactory) -> None:
    stack, server = await scripted(ok_answer, pool_idle_s=0.2)
    assert (await chat(stack, True))[0] == 200
    assert (await chat(stack, True))[0] == 200
    assert server.connections == 1  # reused while fresh
    await asyncio.sleep(0.3)
    assert (await chat(stack, True))[0] == 200
    assert server.connections == 2  # not reused once idle past pool_idle_s
    assert await stack.metric("chatiq_gateway_upstream_resends_total") == 0


async def test_the_servers_keep_alive_timeout_shortens_the_idle_limit(
    scripted: ScriptedFactory,
) -> None:
    def answer(request: ScriptedRequest) -> bytes:
        head, _, rest = ok_answer(request).partition(b"\r\n")
        return head + b"\r\nKeep-Alive: timeout=2, max=100\r\n" + rest

    stack, server = await scripted(answer, server_idle_s=2.0)
    assert (await chat(stack, True))[0] == 200
    await asyncio.sleep(1.2)  # under pool_idle_s (4 s), over the server's 2 s less a second
    assert (await chat(stack, True))[0] == 200
    assert server.connections == 2
    assert await stack.metric("chatiq_gateway_upstream_resends_total") == 0


async def test_a_host_whose_address_changes_is_followed_within_the_connection_max_age(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = ScriptedUpstream(ok_answer), ScriptedUpstream(ok_answer)
    old_server = await old.start("127.0.0.1")
    new_server = await new.start("127.0.0.2", old.port)  # the same port, another address
    address = "127.0.0.1"

    async def lookup(pool: Pool, host: str, port: int) -> list[str]:
        assert host == "chat.upstream.test"
        return [address]

    monkeypatch.setattr(Pool, "lookup", lookup)
    url = f"http://chat.upstream.test:{old.port}/api/chat"
    stack = await make_stack(settings=gateway_settings(url, connection_max_age_s=0.5))
    try:
        for _ in range(5):
            assert await chat(stack, True) == (200, BODY)
        address = "127.0.0.2"  # the name moves
        loop = asyncio.get_running_loop()
        moved = loop.time()
        while not new.requests:
            assert loop.time() - moved < 0.5 + 0.05 + 0.3, "still going to the old address"
            assert await chat(stack, True) == (200, BODY)
            await asyncio.sleep(0.02)
        before = len(old.requests)
        for _ in range(5):
            assert await chat(stack, True) == (200, BODY)
        assert len(old.requests) == before  # nothing goes to the old address any more
    finally:
        old_server.close()
        new_server.close()


async def test_time_waiting_for_a_connection_slot_is_measured(scripted: ScriptedFactory) -> None:
    async def slow(request: ScriptedRequest) -> bytes:
        await asyncio.sleep(0.2)
        return ok_answer(request)

    # A pool smaller than admission lets in (a config check refuses this; built here by hand).
    admission = AdmissionSettings(max_streams=10, max_queue=10, queue_timeout_s=5)
    stack, _ = await scripted(slow, max_connections=1, admission=admission)
    results = await asyncio.gather(*(chat(stack, True) for _ in range(3)))
    assert results == [(200, BODY)] * 3
    count = await stack.metric("chatiq_gateway_upstream_pool_wait_seconds_count")
    waited = await stack.metric("chatiq_gateway_upstream_pool_wait_seconds_sum")
    assert count == 3
    assert waited >= 0.2 + 0.4 - 0.05  # the second waited for the first, the third for both


async def test_every_idle_connection_is_kept_for_the_next_burst(scripted: ScriptedFactory) -> None:
    """300 streams at once, then 300 more: the second burst reuses all 300
    connections (a cap on idle connections would open new ones for the rest,
    each an accept and a round trip more for the upstream)."""

    async def slow(request: ScriptedRequest) -> bytes:
        await asyncio.sleep(1.0)  # long enough for the 300 to overlap
        return ok_answer(request)

    admission = AdmissionSettings(max_streams=300, max_queue=0, queue_timeout_s=5)
    stack, server = await scripted(
        slow, admission=admission, max_connections=300, first_byte_timeout_s=5.0
    )
    unlimited = aiohttp.TCPConnector(limit=0)  # aiohttp's client holds 100 at most by default
    shared, stack.session = stack.session, aiohttp.ClientSession(connector=unlimited)
    try:
        for _ in range(2):
            results = await asyncio.gather(*(chat(stack, True) for _ in range(300)))
            assert results == [(200, BODY)] * 300
    finally:
        await stack.session.close()
        stack.session = shared
    assert server.connections == 300
    assert len(server.requests) == 600
