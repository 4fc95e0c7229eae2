"""The MCP server as the other clients people use reach it: the TypeScript SDK's
``Client`` over ``StreamableHTTPClientTransport`` in Node, the OpenAI Agents
SDK's ``MCPServerStreamableHttp``, and one client session spread over two
replicas behind HAProxy (round robin, no stickiness) sharing a redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import mcp_types
import pytest
from agents.mcp import MCPServerStreamableHttp
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from gateway.config import RedisSettings
from loadtest.emulator import LIVE, TRANSCRIPTS, EmulatorSettings, compose_reply
from loadtest.fleet import Fleet
from loadtest.harness import metric_total
from tests.helpers import (
    ACME_KEY,
    LIMITED_KEY,
    Stack,
    StackFactory,
    eventually,
    run_node,
    start_test_fleet,
)
from tests.redis_server import RedisServer
from tests.scripted import MULTIBYTE_TEXT, ScriptedFactory, multibyte_pieces


def mcp_url(stack: Stack) -> str:
    return str(stack.gateway.make_url("/mcp"))


def last_upstream_text(stack: Stack) -> str:
    """The text the emulator streamed for the last request it had."""
    transcript = list(stack.emulator.app[TRANSCRIPTS].values())[-1]
    text = []
    for line in bytes(transcript.sent).decode().splitlines():
        if line.startswith("data: {") and '"choices"' in line:
            text.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
    return "".join(text)


@pytest.mark.external
@pytest.mark.process
async def test_the_typescript_sdk_lists_and_calls_with_the_exact_text(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=200, reply_tokens=40))
    out = await run_node("mcp_client.mjs", mcp_url(stack), ACME_KEY, "ask_demo", "hi")
    assert "thrown" not in out, out
    assert out["version"] == "2025-11-25" and out["session"]
    assert out["tools"] == ["ask_demo"]
    result = out["result"]
    sent = last_upstream_text(stack)
    assert sent == "".join(compose_reply("hi", [], 40))
    assert result["isError"] is False
    assert result["content"][0] == {"type": "text", "text": sent}
    assert result["structuredContent"]["text"] == sent
    assert len(out["progress"]) >= 2
    assert "".join(p["message"] for p in out["progress"]) == sent
    # The session it ended (terminateSession's DELETE) is refused from then on.
    ended = [line for line in stack.log_lines() if line.get("status") == 204]
    assert len(ended) == 1 and ended[0]["route"] == "/mcp"


@pytest.mark.external
@pytest.mark.process
async def test_the_typescript_sdk_gets_multibyte_text_split_across_reads_exact(
    scripted: ScriptedFactory,
) -> None:
    stack, _ = await scripted(multibyte_pieces(), idle_timeout_s=5.0)
    out = await run_node("mcp_client.mjs", mcp_url(stack), ACME_KEY, "ask_demo", "hi")
    assert out["result"]["content"][0]["text"] == MULTIBYTE_TEXT


@pytest.mark.external
@pytest.mark.process
async def test_the_typescript_sdk_is_told_of_a_wrong_key(stack: Stack) -> None:
    out = await run_node("mcp_client.mjs", mcp_url(stack), "wrong", "ask_demo", "hi")
    assert "unknown API key" in out["thrown"]


async def test_the_agents_sdk_lists_and_calls_a_bot_through_its_mcp_client(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(bots=("rich",))
    params = {"url": mcp_url(stack), "headers": {"Authorization": f"Bearer {ACME_KEY}"}}
    async with MCPServerStreamableHttp(params=params, name="chatiq") as server:  # type: ignore[arg-type]
        tools = await server.list_tools()
        assert [t.name for t in tools] == ["ask_demo", "ask_rich"]
        result = await server.call_tool("ask_demo", {"question": "what do you know?"})
    text = result.content[0]
    assert isinstance(text, mcp_types.TextContent)
    assert text.text == last_upstream_text(stack)
    assert text.text == "".join(compose_reply("what do you know?", [], 40))
    limited = {"url": mcp_url(stack), "headers": {"Authorization": f"Bearer {LIMITED_KEY}"}}
    async with MCPServerStreamableHttp(params=limited, name="limited") as server:  # type: ignore[arg-type]
        assert [t.name for t in await server.list_tools()] == ["ask_demo"]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    started = start_test_fleet(tmp_path, ("--ttft-ms", "0", "--tokens-per-s", "0"))
    yield started
    started.stop()


@asynccontextmanager
async def legacy_client(url: str) -> AsyncIterator[Client]:
    """The Python SDK's client in the handshake era: one session for everything."""
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {ACME_KEY}"})
    transport = streamable_http_client(url, http_client=http)
    async with http, Client(transport, mode="legacy") as client:
        yield client


@pytest.mark.external
@pytest.mark.process
async def test_one_session_is_served_by_both_replicas_behind_a_load_balancer(
    fleet: Fleet,
) -> None:
    async with legacy_client(f"{fleet.url}/mcp") as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["ask_demo"]
        for i in range(10):
            question = f"question {i}"
            result = await client.call_tool("ask_demo", {"question": question})
            assert not result.is_error, result
            text = result.content[0]
            assert isinstance(text, mcp_types.TextContent)
            assert text.text == "".join(compose_reply(question, [], 40))
        # A call that never ends (three chunks, then silence), cancelled by the
        # SDK: its notifications/cancelled lands on whichever replica is next.
        async with aiohttp.ClientSession() as scraper:
            for _ in range(4):
                await cancel_a_call_that_never_ends(client, scraper, fleet)
    logs = [log.read_text() for _, _, log in fleet.replicas]
    calls = [log.count('"rpc_method": "tools/call"') for log in logs]
    assert sum(calls) == 14 and all(calls), calls  # both replicas served the one session
    assert sum(log.count('"rpc_method": "initialize"') for log in logs) == 1
    cancels = [log.count('"rpc_method": "notifications/cancelled"') for log in logs]
    assert sum(cancels) == 4 and all(cancels), cancels  # some cancelled a call elsewhere


async def cancel_a_call_that_never_ends(
    client: Client, scraper: aiohttp.ClientSession, fleet: Fleet
) -> None:
    """Three chunks, then silence: the SDK cancels the call, and its
    notifications/cancelled lands on whichever replica HAProxy picks next."""
    pieces: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        pieces.append(message)

    call = asyncio.create_task(
        client.call_tool("ask_fault-stall-mid", {"question": "hi"}, progress_callback=on_progress)
    )
    await eventually(lambda: len(pieces) == 3)
    assert await live_streams(scraper, fleet) == 1
    call.cancel()
    started = time.monotonic()
    while await live_streams(scraper, fleet):
        assert time.monotonic() - started < 0.1, "the call outlived its cancel"
    with pytest.raises(asyncio.CancelledError):
        await call


async def live_streams(session: aiohttp.ClientSession, fleet: Fleet) -> float:
    return sum(
        [await metric_total(session, port, "chatiq_gateway_active_streams")
         for _, port, _ in fleet.replicas]
    )  # fmt: skip


async def two_replicas(make_stack: StackFactory, redis: RedisServer) -> tuple[Stack, Stack]:
    """Two gateways in this process sharing redis-server; the first in front of
    a slow emulator (a call lives for seconds)."""
    shared = RedisSettings(url=redis.url)
    slow = EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=200)
    return await make_stack(slow, redis=shared), await make_stack(redis=shared)


async def initialize(stack: Stack) -> str:
    """A handshake-era session opened by hand on ``stack``: its id."""
    init = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}},
    }  # fmt: skip
    async with stack.session.post(mcp_url(stack), json=init, headers=ACCEPT) as r:
        assert r.status == 200
        return r.headers["Mcp-Session-Id"]


ACCEPT = {"Authorization": f"Bearer {ACME_KEY}", "Accept": "application/json, text/event-stream"}


async def test_a_cancel_that_lands_on_another_replica_cancels_the_call_within_100_ms(
    make_stack: StackFactory, redis_server: RedisServer
) -> None:
    a, b = await two_replicas(make_stack, redis_server)
    session = await initialize(a)
    headers = {**ACCEPT, "Mcp-Session-Id": session, "MCP-Protocol-Version": "2025-11-25"}
    call = {
        "jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "ask_demo", "arguments": {"question": "hi"},
                   "_meta": {"progressToken": "p5"}},
    }  # fmt: skip
    live = a.emulator.app[LIVE]
    async with a.session.post(mcp_url(a), json=call, headers=headers) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        await r.content.readline()  # streaming: the call runs on a
        assert live.handlers == 1
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                  "params": {"requestId": 5, "reason": "the user moved on"}}  # fmt: skip
        async with b.session.post(mcp_url(b), json=cancel, headers=headers) as told:
            assert told.status == 202
        took = await eventually(lambda: live.handlers == 0)
    assert took < 0.1, f"the upstream call lived {took * 1000:.0f} ms after the cancel"
    outcomes = [line.get("outcome") for line in a.log_lines() if line.get("rpc_method")]
    assert "client_disconnect" in outcomes


async def test_a_session_ended_on_one_replica_is_ended_on_the_other(
    make_stack: StackFactory, redis_server: RedisServer
) -> None:
    a, b = await two_replicas(make_stack, redis_server)
    session = await initialize(a)
    headers = {**ACCEPT, "Mcp-Session-Id": session}
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}

    async def ping_status(stack: Stack) -> int:
        async with stack.session.post(mcp_url(stack), json=ping, headers=headers) as r:
            return r.status

    assert await ping_status(b) == 200  # any replica serves the session
    async with b.session.delete(mcp_url(b), headers=headers) as r:
        assert r.status == 204
    assert await ping_status(b) == 404
    statuses: list[int] = []
    for _ in range(100):
        statuses.append(await ping_status(a))
        if statuses[-1] == 404:
            break
        await asyncio.sleep(0.01)
    assert statuses[-1] == 404, statuses
