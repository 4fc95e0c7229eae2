"""The MCP server at /mcp, driven by the official Python SDK (``mcp``'s
``Client`` and its ``ClientSession`` over the Streamable HTTP transport) in
both of the eras it speaks: the ``initialize`` handshake (``legacy``) and the
per-request envelope it negotiates by default (``auto``). Error paths the SDK
cannot produce (a broken body, a wrong header) are sent by hand."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import mcp_types
import pytest
from mcp import ClientSession
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from gateway.config import ServerSettings
from loadtest.emulator import LIVE, TRANSCRIPTS, EmulatorSettings, compose_reply
from tests.conftest import assert_all_released
from tests.helpers import ACME_KEY, LIMITED_KEY, Stack, StackFactory, eventually
from tests.scripted import MULTIBYTE_TEXT, ScriptedFactory, multibyte_pieces

MODES = pytest.mark.parametrize("mode", ["legacy", "auto"])
SLOW = EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=200)
JSON_AND_EVENTS = "application/json, text/event-stream"


def mcp_url(stack: Stack) -> str:
    return str(stack.gateway.make_url("/mcp"))


@asynccontextmanager
async def connect(
    stack: Stack, key: str = ACME_KEY, mode: str = "legacy", **headers: str
) -> AsyncIterator[Client]:
    """The SDK's client on the gateway's /mcp, with a tenant key."""
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}", **headers})
    transport = streamable_http_client(mcp_url(stack), http_client=http)
    async with http, Client(transport, mode=mode) as c:
        yield c


def reply_of(stack: Stack) -> tuple[dict[str, Any], str]:
    """The last upstream request's body, and the text the emulator streamed for it."""
    transcript = list(stack.emulator.app[TRANSCRIPTS].values())[-1]
    text = []
    for line in bytes(transcript.sent).decode().splitlines():
        if line.startswith("data: {") and '"choices"' in line:
            text.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
    return transcript.body, "".join(text)


@MODES
async def test_the_tools_are_exactly_the_bots_the_key_may_use(
    make_stack: StackFactory, mode: str
) -> None:
    stack = await make_stack(bots=("rich", "fault-500"))
    async with connect(stack, mode=mode) as client:
        tools = (await client.list_tools()).tools
        assert [t.name for t in tools] == ["ask_demo", "ask_fault-500", "ask_rich"]  # "*" key
        demo = tools[0]
        assert demo.description == "Ask the demo bot"
        assert demo.input_schema["required"] == ["question"]
        assert set(demo.input_schema["properties"]) == {"question", "conversation_id"}
        assert demo.output_schema is not None
        assert set(demo.output_schema["properties"]) == {"text", "conversation_id"}
    async with connect(stack, key=LIMITED_KEY, mode=mode) as client:
        assert [t.name for t in (await client.list_tools()).tools] == ["ask_demo"]


async def test_the_classic_client_session_initializes_lists_and_calls(stack: Stack) -> None:
    """``ClientSession`` on the transport's two streams, as the SDK's examples
    (and the agent frameworks) use it."""
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {ACME_KEY}"})
    async with (
        http,
        streamable_http_client(mcp_url(stack), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
        assert init.protocol_version == "2025-11-25"
        assert [t.name for t in (await session.list_tools()).tools] == ["ask_demo"]
        result = await session.call_tool("ask_demo", {"question": "hi"})
    _, sent = reply_of(stack)
    text = result.content[0]
    assert isinstance(text, mcp_types.TextContent) and text.text == sent


async def test_initialize_agrees_on_the_client_s_version_and_names_the_server(
    stack: Stack,
) -> None:
    async with connect(stack) as client:
        init = client.session.initialize_result
        assert init is not None
        assert init.protocol_version == "2025-11-25"
        assert init.server_info.name == "chatiq-gateway"
        assert init.capabilities.tools is not None
        assert init.instructions and "conversation_id" in init.instructions


@MODES
async def test_a_call_returns_exactly_the_text_sent_split_inside_characters(
    scripted: ScriptedFactory, mode: str
) -> None:
    stack, _ = await scripted(multibyte_pieces(), idle_timeout_s=5.0)  # a read every 50 ms
    async with connect(stack, mode=mode) as client:
        result = await client.call_tool("ask_demo", {"question": "hi"})
    assert not result.is_error
    first = result.content[0]
    assert isinstance(first, mcp_types.TextContent) and first.text == MULTIBYTE_TEXT
    assert result.structured_content == {"text": MULTIBYTE_TEXT, "conversation_id": "c-9"}


@MODES
async def test_progress_notifications_carry_the_reply_as_it_streams(
    make_stack: StackFactory, mode: str
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=200, reply_tokens=40))
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with connect(stack, mode=mode) as client:
        result = await client.call_tool(
            "ask_demo", {"question": "hi"}, progress_callback=on_progress
        )
    _, sent = reply_of(stack)
    assert sent == "".join(compose_reply("hi", [], 40))
    text = result.content[0]
    assert isinstance(text, mcp_types.TextContent) and text.text == sent
    assert len(seen) >= 2
    assert "".join(m or "" for _, m in seen) == sent  # each notification: the new piece
    progress_values = [p for p, _ in seen]
    assert progress_values == sorted(set(progress_values))  # increasing, as the spec says


@MODES
async def test_a_follow_up_with_the_conversation_id_continues_that_conversation(
    stack: Stack, mode: str
) -> None:
    async with connect(stack, mode=mode) as client:
        first = await client.call_tool("ask_demo", {"question": "my name is Ada"})
        assert isinstance(first.structured_content, dict)
        conversation = first.structured_content["conversation_id"]
        await client.call_tool(
            "ask_demo", {"question": "what is my name?", "conversation_id": conversation}
        )
    body, _ = reply_of(stack)
    assert body["conversation_id"] == conversation
    assert body["message"] == "what is my name?" and body["bot_slug"] == "demo"


@MODES
async def test_an_upstream_failure_is_an_error_result_a_model_can_read(
    stack: Stack, mode: str
) -> None:
    async with connect(stack, mode=mode) as client:
        result = await client.call_tool("ask_fault-500", {"question": "hi"})
    assert result.is_error
    text = result.content[0]
    assert isinstance(text, mcp_types.TextContent)
    assert "HTTP 500" in text.text and "UPSTREAM_ERROR" in text.text
    counted = await stack.metric(
        "chatiq_gateway_tool_calls_total", tenant="acme", bot="other", outcome="failed"
    )
    assert counted == 1


@MODES
async def test_a_failure_mid_stream_is_an_error_result_with_the_answer_so_far(
    stack: Stack, mode: str
) -> None:
    async with connect(stack, mode=mode) as client:
        result = await client.call_tool("ask_fault-error-mid", {"question": "hi"})
    assert result.is_error
    text = result.content[0]
    assert isinstance(text, mcp_types.TextContent) and "failed while answering" in text.text


@MODES
async def test_an_unknown_tool_is_a_json_rpc_error(stack: Stack, mode: str) -> None:
    async with connect(stack, key=LIMITED_KEY, mode=mode) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("ask_rich", {"question": "hi"})  # not this key's
    assert raised.value.error.code == -32602
    assert "no tool 'ask_rich' for this key" in raised.value.error.message
    assert not stack.emulator.app[TRANSCRIPTS]


@MODES
async def test_bad_arguments_are_an_error_result_the_model_can_correct(
    stack: Stack, mode: str
) -> None:
    async with connect(stack, mode=mode) as client:
        empty = await client.call_tool("ask_demo", {"question": "  "})
        extra = await client.call_tool("ask_demo", {"question": "hi", "topic": "x"})
    for result, why in (
        (empty, "'question' must not be empty"),
        (extra, "unknown argument 'topic'"),
    ):
        assert result.is_error
        text = result.content[0]
        assert isinstance(text, mcp_types.TextContent) and why in text.text
    assert not stack.emulator.app[TRANSCRIPTS]


async def test_a_rich_answer_s_extras_are_further_contents(stack: Stack) -> None:
    async with connect(stack) as client:
        result = await client.call_tool("ask_rich", {"question": "hi"})
    kinds = [c.type for c in result.content]
    assert kinds[0] == "text" and "resource_link" in kinds
    texts = [c.text for c in result.content if isinstance(c, mcp_types.TextContent)]
    assert "Here is a second message." in texts
    assert any(t.startswith("Suggested follow-ups:") and "Tell me more" in t for t in texts)
    assert isinstance(result.structured_content, dict)
    assert result.structured_content["suggestions"][0]["label"] == "Tell me more"


@MODES
async def test_a_cancelled_call_closes_the_upstream_within_100_ms(
    make_stack: StackFactory, mode: str
) -> None:
    stack = await make_stack(SLOW)
    live = stack.emulator.app[LIVE]
    pieces: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        pieces.append(message)

    async with connect(stack, mode=mode) as client:
        call = asyncio.create_task(
            client.call_tool("ask_demo", {"question": "hi"}, progress_callback=on_progress)
        )
        await eventually(lambda: len(pieces) >= 2)
        assert live.handlers == 1
        call.cancel()
        took = await eventually(lambda: live.handlers == 0)
        assert took < 0.1, f"the upstream call lived {took * 1000:.0f} ms after the cancel"
        with pytest.raises(asyncio.CancelledError):
            await call
        after = await client.call_tool("ask_demo", {"question": "still there?"})  # goes on
        assert not after.is_error
    await assert_all_released(stack)


async def test_no_key_and_a_wrong_key_are_401_with_a_bearer_challenge(stack: Stack) -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for key, challenge in ((None, "Bearer"), ("wrong", 'Bearer error="invalid_token"')):
        headers = {"Accept": JSON_AND_EVENTS}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        async with stack.session.post(mcp_url(stack), json=message, headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith(challenge)
            body = await r.json()
        assert body["jsonrpc"] == "2.0" and body["error"]["data"]["code"] == "UNAUTHORIZED"
    with pytest.raises(BaseExceptionGroup) as raised:
        async with connect(stack, key="wrong"):
            pass
    assert [e.error.message for e in mcp_errors(raised.value)] == ["unknown API key"]


async def test_a_page_elsewhere_cannot_drive_the_server_through_a_browser(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(server=ServerSettings(cors_origins=("https://app.example.com",)))
    with pytest.raises(BaseExceptionGroup) as raised:
        async with connect(stack, Origin="https://evil.example"):
            pass
    assert "origin 'https://evil.example' is not allowed" in mcp_errors(raised.value)[0].message
    status, answer = await rpc(stack, {"jsonrpc": "2.0", "id": 1, "method": "ping"},
                               Origin="http://127.0.0.1.nip.io:8080")  # fmt: skip
    assert status == 403 and answer["error"]["data"]["code"] == "FORBIDDEN"
    async with connect(stack, Origin="https://app.example.com") as client:
        assert (await client.list_tools()).tools
    # A browser's MCP client on an allowed page: its preflight, and the session
    # id it may read.
    asked = "mcp-session-id, mcp-protocol-version, mcp-method, mcp-name, authorization"
    preflight = {
        "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": asked,
    }  # fmt: skip
    async with stack.session.options(mcp_url(stack), headers=preflight) as r:
        assert r.status == 204
        allowed = r.headers["Access-Control-Allow-Headers"].lower()
        assert all(h.strip() in allowed for h in asked.split(","))
        assert "DELETE" in r.headers["Access-Control-Allow-Methods"]
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    headers = {"Origin": "https://app.example.com", "Authorization": f"Bearer {ACME_KEY}"}
    async with stack.session.post(mcp_url(stack), json=init, headers=headers) as r:
        assert r.status == 200 and "Mcp-Session-Id" in r.headers
        assert "Mcp-Session-Id" in r.headers["Access-Control-Expose-Headers"]


def mcp_errors(raised: BaseException) -> list[MCPError]:
    """The SDK's errors in what it raised (its task groups wrap them)."""
    if isinstance(raised, MCPError):
        return [raised]
    if isinstance(raised, BaseExceptionGroup):
        return [e for sub in raised.exceptions for e in mcp_errors(sub)]
    return []


async def rpc(
    stack: Stack, body: bytes | dict[str, Any], **headers: str
) -> tuple[int, dict[str, Any]]:
    """One hand-made POST to /mcp with the acme key: its status and JSON body."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {
        "Authorization": f"Bearer {ACME_KEY}",
        "Content-Type": "application/json",
        "Accept": JSON_AND_EVENTS,
        **headers,
    }
    async with stack.session.post(mcp_url(stack), data=raw, headers=all_headers) as r:
        return r.status, await r.json()


MODERN = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}


def modern_list(version: str = "2026-07-28") -> dict[str, Any]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": version,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {"_meta": meta}}


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b'{"jsonrpc": "2.0", "id": 1, "method": ', {}, 400, -32700),  # not JSON
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', {}, 400, -32600),  # a batch
        (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', {}, 400, -32600),
        (b'{"jsonrpc": "2.0", "id": [1], "method": "ping"}', {}, 400, -32600),
        (b'{"jsonrpc": "2.0", "id": 18446744073709551616, "method": "x"}', {}, 400, -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "resources/list"}', {}, 200, -32601),
        (json.dumps(modern_list()).encode(), {**MODERN, "Mcp-Method": "ping"}, 400, -32020),
        (json.dumps(modern_list()).encode(), {**MODERN, "MCP-Protocol-Version": "x"}, 400, -32020),
        (
            json.dumps(modern_list("2027-01-01")).encode(),
            {**MODERN, "MCP-Protocol-Version": "2027-01-01"},
            400,
            -32022,
        ),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}', MODERN, 400, -32602),
        (json.dumps(modern_list()).encode(), {**MODERN, "Mcp-Method": "x"}, 400, -32020),
    ],
)
async def test_malformed_messages_get_the_spec_s_error_codes(
    stack: Stack, body: bytes, headers: dict[str, str], status: int, code: int
) -> None:
    got, answer = await rpc(stack, body, **headers)
    assert (got, answer["error"]["code"]) == (status, code), answer
    assert answer["jsonrpc"] == "2.0"
    if code == -32022:
        assert "2026-07-28" in answer["error"]["data"]["supported"]
    assert not [line for line in stack.log_lines() if line.get("event") == "unhandled_error"]


async def test_the_per_request_era_is_served_as_its_headers_say(stack: Stack) -> None:
    status, answer = await rpc(stack, modern_list(), **MODERN)
    assert status == 200
    assert answer["id"] == 7 and answer["result"]["resultType"] == "complete"
    assert [t["name"] for t in answer["result"]["tools"]] == ["ask_demo"]


async def test_a_body_too_large_is_a_413_with_a_json_rpc_error(make_stack: StackFactory) -> None:
    stack = await make_stack(server=ServerSettings(max_body_bytes=1000))
    message = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": "y" * 2000}}
    status, answer = await rpc(stack, message)
    assert status == 413 and answer["error"]["code"] == -32600


async def test_get_is_405_and_delete_ends_the_session(stack: Stack) -> None:
    async with stack.session.get(mcp_url(stack), headers={"Accept": "text/event-stream"}) as r:
        assert r.status == 405 and r.headers["Allow"] == "DELETE, POST"
    init = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}},
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {ACME_KEY}", "Accept": JSON_AND_EVENTS}
    async with stack.session.post(mcp_url(stack), json=init, headers=headers) as r:
        assert r.status == 200 and (await r.json())["result"]["protocolVersion"] == "2025-06-18"
        session = r.headers["Mcp-Session-Id"]
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    status, _ = await rpc(stack, ping, **{"Mcp-Session-Id": session})
    assert status == 200
    other = {"Authorization": f"Bearer {LIMITED_KEY}", "Mcp-Session-Id": session}
    status, _ = await rpc(stack, ping, **other)
    assert status == 404  # another key's session
    async with stack.session.delete(
        mcp_url(stack), headers={**headers, "Mcp-Session-Id": session}
    ) as r:
        assert r.status == 204
    status, answer = await rpc(stack, ping, **{"Mcp-Session-Id": session})
    assert status == 404 and "initialize a new one" in answer["error"]["message"]
