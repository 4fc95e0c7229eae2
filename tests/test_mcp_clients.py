"""The MCP server as the other clients people use reach it: the TypeScript SDK's
``Client`` over ``StreamableHTTPClientTransport`` in Node, the OpenAI Agents
SDK's ``MCPServerStreamableHttp``, and one client session spread over two
replicas behind HAProxy (round robin, no stickiness) sharing a redis-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import mcp_types
import pytest
from agents.mcp import MCPServerStreamableHttp
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from loadtest.emulator import TRANSCRIPTS, EmulatorSettings, compose_reply
from loadtest.fleet import Fleet
from tests.helpers import ACME_KEY, LIMITED_KEY, Stack, StackFactory, run_node, start_test_fleet
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
    calls = [log.read_text().count('"rpc_method": "tools/call"') for _, _, log in fleet.replicas]
    assert sum(calls) == 10 and all(calls), calls  # both replicas served the one session
    sessions = [log.read_text().count('"rpc_method": "initialize"') for _, _, log in fleet.replicas]
    assert sum(sessions) == 1
