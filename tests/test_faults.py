"""Every emulator fault, through the gateway, ends as the contract says.

Before the stream: an HTTP error (see test_errors). After it started: the
events so far, unchanged, then one ChatIQ-style error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.config import ResumeSettings
from gateway.frontends.openai import ChunkEncoder
from loadtest.emulator import CHUNKS_BEFORE_FAULT, EmulatorSettings
from tests.helpers import AUTH, Stack, StackFactory, post_chat
from tests.routes import ROUTES, events_of


def error_code(event: str) -> str:
    code: str = json.loads(event)["error"]["code"]
    return code


async def stream_of(stack: Stack, bot: str) -> tuple[bytes, list[str]]:
    reply = await post_chat(stack, {"message": "hi", "bot": bot})
    return reply.body, reply.events()


@pytest.mark.parametrize("bot", ["fault-stall-mid", "fault-ping-mid"])
async def test_stall_mid_stream_ends_with_a_timeout_event(stack: Stack, bot: str) -> None:
    """Silence, or only keep-alive comments: neither is an answer."""
    _, events = await stream_of(stack, bot)
    assert len(events) == CHUNKS_BEFORE_FAULT + 2
    assert all("choices" in e for e in events[:CHUNKS_BEFORE_FAULT])
    assert error_code(events[-2]) == "UPSTREAM_TIMEOUT"
    assert events[-1] == "[DONE]"
    assert await stack.metric("chatiq_gateway_upstream_errors_total", kind="idle_timeout") == 1


async def test_a_connection_dropped_mid_stream_ends_with_an_error_event(stack: Stack) -> None:
    _, events = await stream_of(stack, "fault-drop-mid")
    assert len(events) == CHUNKS_BEFORE_FAULT + 2
    assert error_code(events[-2]) == "UPSTREAM_ERROR"
    assert events[-1] == "[DONE]"
    assert await stack.metric("chatiq_gateway_upstream_errors_total", kind="protocol") == 1


async def test_an_upstream_error_event_is_relayed_unchanged(stack: Stack) -> None:
    body, events = await stream_of(stack, "fault-error-mid")
    assert error_code(events[-2]) == "RATE_LIMIT"  # the upstream's own, not the gateway's
    assert events[-1] == "[DONE]"
    assert body.count(b'"error"') == 1


async def test_a_malformed_event_is_not_forwarded_and_ends_the_stream(stack: Stack) -> None:
    body, events = await stream_of(stack, "fault-malformed")
    assert b"bro" not in body
    assert all("choices" in e for e in events[:CHUNKS_BEFORE_FAULT])
    assert error_code(events[CHUNKS_BEFORE_FAULT]) == "UPSTREAM_ERROR"
    assert events[CHUNKS_BEFORE_FAULT + 1 :] == ["[DONE]"]


async def test_an_event_over_the_size_limit_ends_the_stream(make_stack: StackFactory) -> None:
    # Content chunks are ~50 bytes; the "attachments" event of bot "rich" is ~80.
    stack = await make_stack(max_event_bytes=70)
    _, events = await stream_of(stack, "rich")
    assert "responses" in events[-3]
    assert error_code(events[-2]) == "UPSTREAM_ERROR"
    assert events[-1] == "[DONE]"


async def test_a_stream_longer_than_the_total_timeout_is_ended(make_stack: StackFactory) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=100), total_timeout_s=0.4
    )
    _, events = await stream_of(stack, "demo")
    assert 2 <= len(events) < 30
    assert error_code(events[-2]) == "UPSTREAM_TIMEOUT"
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("bot", "status"),
    [
        ("fault-429", 429),
        ("fault-500", 502),
        ("fault-503", 502),
        ("fault-reset", 502),
        ("fault-stall-first", 504),
        ("fault-malformed", 502),
    ],
)
async def test_non_streaming_faults_map_to_statuses(stack: Stack, bot: str, status: int) -> None:
    async with await stack.chat({"message": "hi", "bot": bot, "stream": False}) as r:
        assert r.status == status
        assert set((await r.json())["error"]) == {"code", "message"}


async def test_a_client_that_leaves_mid_stream_closes_the_upstream(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=10, reply_tokens=100))
    r = await stack.chat()
    await r.content.readline()
    r.close()  # hang up
    for _ in range(100):
        if await stack.metric("chatiq_gateway_client_disconnects_total", tenant="acme") == 1:
            break
        await asyncio.sleep(0.02)
    assert await stack.metric("chatiq_gateway_client_disconnects_total", tenant="acme") == 1
    assert await stack.metric("chatiq_gateway_active_streams", tenant="acme") == 0
    # The emulator's handler ends once the gateway drops its upstream connection.
    for _ in range(100):
        if not stack.emulator.runner or not stack.emulator.runner.server:
            break
        if not stack.emulator.runner.server.connections:
            break
        await asyncio.sleep(0.02)
    assert stack.emulator.runner is not None and stack.emulator.runner.server is not None
    assert not stack.emulator.runner.server.connections


async def test_a_gateway_bug_mid_stream_still_ends_with_an_error_event(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug on the stream's path (the OpenAI frontend's encoder raises at the
    third event; the relay itself may be compiled, the encoder is not): the
    stream still ends with an error in the frontend's shape, and [DONE]."""
    # Paced, so that the first two events went out in batches of their own.
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=50, reply_tokens=10))
    calls = 0
    real = ChunkEncoder.event

    def breaks_on_the_third_event(self: ChunkEncoder, payload: dict[str, Any]) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected")
        return real(self, payload)

    monkeypatch.setattr(ChunkEncoder, "event", breaks_on_the_third_event)
    route = ROUTES["openai"]
    async with stack.session.post(
        stack.gateway.make_url(route.path), json=route.body("demo", "hi"), headers=AUTH
    ) as answer:
        events = events_of(await answer.read())
    assert len(events) == 4, events  # two chunks, the error, [DONE]
    assert route.ending_error(events) == "INTERNAL_ERROR"
    assert events[-1] == "[DONE]"


ERROR_MID_REQUESTS = {
    "chatiq": ("/api/chatbot", {"message": "hi", "bot": "fault-error-mid"}),
    "openai": (
        "/v1/chat/completions",
        {"model": "fault-error-mid", "stream": True,
         "messages": [{"role": "user", "content": "hi"}]},
    ),
    "responses": (
        "/v1/responses",
        {"model": "fault-error-mid", "stream": True, "input": "hi"},
    ),
    "ai-sdk": (
        "/api/ui/chat",
        {"id": "c1", "bot": "fault-error-mid",
         "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]},
    ),
}  # fmt: skip


@pytest.mark.parametrize("resumable", [False, True])
@pytest.mark.parametrize("frontend", list(ERROR_MID_REQUESTS))
async def test_a_stream_chatiq_ends_with_its_error_event_is_logged_and_counted_as_failed(
    make_stack: StackFactory, frontend: str, resumable: bool
) -> None:
    """It was logged with outcome "ok" while every client raised an error."""
    stack = await make_stack(resume=ResumeSettings(enabled=True) if resumable else None)
    path, body = ERROR_MID_REQUESTS[frontend]
    headers = {**AUTH, "X-Resumable": "1" if resumable else "0"}
    async with stack.session.post(stack.gateway.make_url(path), json=body, headers=headers) as r:
        assert r.status == 200
        await r.read()
    lines = [line for line in stack.log_lines() if line["event"] == "request"]
    assert [(line["outcome"], line.get("error_code")) for line in lines] == [
        ("upstream_error", "RATE_LIMIT")
    ]
    label = "openai" if path.startswith("/v1/") else frontend  # both OpenAI APIs: one frontend
    labels = {"route": path, "frontend": label, "tenant": "acme", "status": "200"}
    assert await stack.metric("chatiq_gateway_requests_total", **labels, outcome="failed") == 1
    assert await stack.metric("chatiq_gateway_requests_total", **labels, outcome="ok") == 0
