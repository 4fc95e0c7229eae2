"""Graceful drain: SIGTERM during live streams, against a real gateway process."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from loadtest.emulator import EmulatorSettings
from tests.helpers import AUTH, GatewayProcess, StackFactory, open_streams

pytestmark = pytest.mark.process


async def test_sigterm_ends_live_streams_cleanly_after_the_grace_period(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=10, reply_tokens=200), record=False
    )
    gw = await gateway_process(stack.emulator, server={"shutdown_grace_s": 1.0})
    session = stack.session
    streams = await open_streams(session, gw, 100)

    gw.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as late:  # the other session's 100 connections are busy
        async with late.post(gw.url, json={"message": "late"}, headers=AUTH) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "DRAINING"
            assert r.headers["Retry-After"] == "1"
        async with late.get(f"http://127.0.0.1:{gw.port}/readyz") as r:
            assert r.status == 503
        assert await gw.metric(late, "chatiq_gateway_rejected_total") == 1  # reason="draining"

    results = await asyncio.gather(*streams)
    for events in results:
        assert json.loads(events[-2])["error"]["code"] == "DRAINING"
        assert events[-1] == "[DONE]"
    assert await asyncio.to_thread(gw.process.wait, 30) == 0
    log = gw.log()
    assert '"event": "drained"' in log and '"streams_ended_early": 100' in log
    assert "Traceback" not in log


async def test_streams_that_finish_within_the_grace_period_complete(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=20), record=False
    )
    gw = await gateway_process(stack.emulator, server={"shutdown_grace_s": 20.0})
    streams = await open_streams(stack.session, gw, 20)
    gw.process.send_signal(signal.SIGINT)
    for events in await asyncio.gather(*streams):
        assert "conversationId" in events[-2] and events[-1] == "[DONE]"
    assert await asyncio.to_thread(gw.process.wait, 30) == 0
    assert '"streams_ended_early": 0' in gw.log()
