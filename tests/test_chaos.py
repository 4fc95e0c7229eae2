"""Client-side faults over real sockets: hang-ups at every point, mass
cancellation, clients that never read. Afterwards nothing is left behind:
every gauge at zero, no slot held, no task or connection open."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from loadtest.emulator import LIVE, EmulatorSettings
from tests.conftest import assert_all_released
from tests.helpers import ACME_KEY, GatewayProcess, StackFactory, eventually, read_stream

SLOW = EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=200)


@pytest.mark.parametrize("when", ["before_first_token", "after_first_token"])
async def test_a_client_hang_up_cancels_the_upstream_call_at_once(
    make_stack: StackFactory, when: str
) -> None:
    stack = await make_stack(SLOW, first_byte_timeout_s=30)
    bot = "fault-stall-first" if when == "before_first_token" else "demo"
    request = asyncio.ensure_future(stack.chat({"message": "hi", "bot": bot}))
    await eventually(lambda: stack.emulator.app[LIVE].handlers == 1)
    if when == "after_first_token":
        r = await request
        await r.content.readline()
        r.close()
    else:
        request.cancel()
    took = await eventually(lambda: stack.emulator.app[LIVE].handlers == 0)
    print(f"upstream call cancelled {took * 1000:.1f} ms after the client hung up ({when})")
    assert took < 1.0  # measured ~5 ms here; the bound only guards against "never"
    assert await stack.metric("chatiq_gateway_client_disconnects_total", tenant="acme") == 1
    await assert_all_released(stack)  # also at teardown; here, to fail next to the cause


async def test_a_client_hang_up_cancels_a_non_streaming_call(make_stack: StackFactory) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=30), first_byte_timeout_s=60)
    request = asyncio.ensure_future(stack.chat({"message": "hi", "stream": False}))
    await eventually(lambda: stack.emulator.app[LIVE].handlers == 1)
    request.cancel()
    await eventually(lambda: stack.emulator.app[LIVE].handlers == 0)
    await assert_all_released(stack)  # also at teardown; here, to fail next to the cause


async def test_thousands_of_streams_cancelled_at_random_points_leave_nothing_behind(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0.005, tokens_per_s=400, reply_tokens=20))
    rng = random.Random(1)
    outcomes = {"complete": 0, "cancelled": 0}

    async def one() -> None:
        async with await stack.chat() as r:
            _, events = await read_stream(r)
        assert events[-1] == "[DONE]"
        outcomes["complete"] += 1

    async def cancel_later(task: asyncio.Task[None], after: float) -> None:
        await asyncio.sleep(after)
        if not task.done():
            task.cancel()
            outcomes["cancelled"] += 1

    for _ in range(10):  # 10 waves of 200 concurrent streams
        tasks = [asyncio.ensure_future(one()) for _ in range(200)]
        await asyncio.gather(
            *(cancel_later(t, rng.uniform(0, 0.08)) for t in tasks if rng.random() < 0.7)
        )
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
    assert outcomes["complete"] + outcomes["cancelled"] == 2000
    assert outcomes["cancelled"] > 500 and outcomes["complete"] > 500
    await assert_all_released(stack)  # also at teardown; here, to fail next to the cause


@pytest.mark.process
async def test_clients_that_never_read_cannot_grow_memory(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    """200 clients read nothing of 10 MB replies: the gateway's RSS stays bounded,
    it spends no CPU on them while they are stalled (past several keep-alive
    intervals), and a normal client is unaffected."""
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=300),  # bot "bulk": ~10 MB
        record=False,
    )
    gw = await gateway_process(
        stack.emulator,
        upstream={"client_write_timeout_s": 60.0, "first_byte_timeout_s": 30.0, "keepalive_s": 0.5},
        logging={"format": "json", "level": "warning"},
    )
    before = gw.rss_bytes()
    stalled = []
    for _ in range(200):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        body = b'{"message": "hi", "bot": "bulk"}'
        sock.send(
            b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {ACME_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        stalled.append(sock)
    for _ in range(600):
        if await gw.metric(stack.session, "chatiq_gateway_active_streams") == 200:
            break
        await asyncio.sleep(0.1)
    assert await gw.metric(stack.session, "chatiq_gateway_active_streams") == 200, gw.log()
    await asyncio.sleep(2.0)  # let every relay fill its buffers and block
    grown = gw.rss_bytes() - before
    cpu_before, started = gw.cpu_seconds(), time.monotonic()
    await asyncio.sleep(3.0)  # six keep-alive intervals, all of them stalled
    busy = (gw.cpu_seconds() - cpu_before) / (time.monotonic() - started)
    assert busy < 0.05, f"{busy:.0%} of a core while 200 clients are stalled"

    # A normal client still streams while the 200 sit there.
    async with stack.session.post(
        gw.url, json={"message": "still there?"}, headers={"Authorization": f"Bearer {ACME_KEY}"}
    ) as r:
        _, events = await read_stream(r)
    assert events[-1] == "[DONE]"

    # Without backpressure the gateway would hold the 200 replies: 2 GB. With it,
    # each stalled stream holds a few reads of at most 64 KiB (~1 MiB measured).
    assert grown < 500 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    print(f"gateway RSS grew {grown / 2**20:.1f} MiB for 200 stalled 10 MB streams; CPU {busy:.1%}")
    for sock in stalled:
        sock.close()
    for _ in range(300):
        if await gw.metric(stack.session, "chatiq_gateway_active_streams") == 0:
            break
        await asyncio.sleep(0.1)
    assert await gw.metric(stack.session, "chatiq_gateway_active_streams") == 0
    assert await gw.metric(stack.session, "chatiq_gateway_client_disconnects_total") == 200
