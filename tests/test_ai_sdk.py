"""The ai-sdk frontend, driven by the Vercel AI SDK's own client code in Node
(``DefaultChatTransport``, what ``useChat`` uses, and ``readUIMessageStream``):
the assistant's message it rebuilds holds exactly the text the emulator sent."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config import ResumeSettings
from loadtest.emulator import EmulatorSettings, compose_reply
from tests.helpers import ACME_KEY, LIMITED_KEY, Stack, StackFactory, emulator_text, run_node
from tests.scripted import MULTIBYTE_TEXT, ScriptedFactory, multibyte_pieces

pytestmark = [pytest.mark.external, pytest.mark.process]


async def ui_chat(
    stack: Stack, text: str, bot: str = "", key: str = ACME_KEY, conversation_id: str = ""
) -> dict[str, Any]:
    """One turn through DefaultChatTransport; the message readUIMessageStream rebuilt."""
    api = str(stack.gateway.make_url("/api/ui/chat"))
    return await run_node("ui_chat.mjs", api, key, bot, text, conversation_id)


def texts(message: dict[str, Any]) -> list[str]:
    return [p["text"] for p in message["parts"] if p["type"] == "text"]


async def test_use_chat_s_transport_rebuilds_the_text_the_emulator_sent(stack: Stack) -> None:
    result = await ui_chat(stack, "hi")
    message = result["message"]
    assert result["errors"] == []
    assert message["role"] == "assistant" and message["id"].startswith("msg-")
    request_id = message["id"].removeprefix("msg-")
    assert texts(message) == [emulator_text(stack, request_id)]
    conversation_id = message["metadata"]["conversationId"]
    assert conversation_id

    # The next turn sends that message back, as useChat keeps it: same conversation.
    again = await ui_chat(stack, "and again?", conversation_id=conversation_id)
    request_id = again["message"]["id"].removeprefix("msg-")
    sent = stack.transcript(request_id).body
    assert sent["conversation_id"] == conversation_id and sent["message"] == "and again?"
    assert sent["history"] == [
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "an earlier answer"},
    ]


async def test_chatiq_s_other_events_become_parts(stack: Stack) -> None:
    message = (await ui_chat(stack, "hi", bot="rich"))["message"]
    assert texts(message)[1:] == ["Here is a second message.", "And a third."]
    files = [p for p in message["parts"] if p["type"] == "file"]
    assert files == [
        {"type": "file", "url": "https://www.chatiq.io/logo.png", "mediaType": "image/png"}
    ]
    data = [p for p in message["parts"] if p["type"] == "data-suggestions"]
    assert data[0]["data"] == [{"label": "Tell me more"}, {"label": "Thanks!"}]


@pytest.mark.parametrize("bot", ["fault-drop-mid", "fault-error-mid"])
async def test_a_failure_mid_stream_is_an_error_the_sdk_reports(stack: Stack, bot: str) -> None:
    result = await ui_chat(stack, "hi", bot=bot)
    assert texts(result["message"])[0]  # the text before the failure
    assert len(result["errors"]) == 1 and result["errors"][0]


async def test_errors_before_the_stream_are_thrown_by_the_transport(stack: Stack) -> None:
    thrown = (await ui_chat(stack, "hi", bot="rich", key=LIMITED_KEY))["thrown"]
    assert json.loads(thrown)["error"]["code"] == "FORBIDDEN"
    thrown = (await ui_chat(stack, "hi", key="wrong"))["thrown"]
    assert json.loads(thrown)["error"]["code"] == "UNAUTHORIZED"


async def test_multibyte_text_split_across_reads_arrives_exactly(
    scripted: ScriptedFactory,
) -> None:
    text, pieces = MULTIBYTE_TEXT, multibyte_pieces()
    stack, _ = await scripted(pieces, idle_timeout_s=5.0)
    message = (await ui_chat(stack, "hi"))["message"]
    assert texts(message) == [text]
    assert message["metadata"] == {"conversationId": "c-9"}


async def ui_resume(stack: Stack, chat_id: str, key: str = ACME_KEY) -> dict[str, Any]:
    """useChat's resume hook (reconnectToStream), as the AI SDK's own code calls it."""
    api = str(stack.gateway.make_url("/api/ui/chat"))
    return await run_node("ui_resume.mjs", api, key, chat_id)


async def test_use_chat_s_resume_hook_replays_the_chat_s_active_stream(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=40),
        resume=ResumeSettings(enabled=True),
    )
    body = {
        "id": "chat-r1",
        "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}],
    }
    headers = {"Authorization": f"Bearer {ACME_KEY}", "X-Resumable": "1"}
    response = await stack.session.post(
        stack.gateway.make_url("/api/ui/chat"), json=body, headers=headers
    )
    request_id = response.headers["X-Request-Id"]
    async for _ in response.content.iter_any():
        break  # the page reloads: its connection is gone after the first bytes
    response.close()

    assert await ui_resume(stack, "chat-r1", key=LIMITED_KEY) == {"none": True}  # not its chat
    resumed = await ui_resume(stack, "chat-r1")
    assert resumed["errors"] == []
    assert texts(resumed["message"]) == [emulator_text(stack, request_id)]
    assert resumed["message"]["metadata"]["conversationId"]
    # Finished: nothing to resume (204), as for a chat that never streamed or another key's.
    assert await ui_resume(stack, "chat-r1") == {"none": True}
    assert await ui_resume(stack, "chat-unknown") == {"none": True}
    assert await stack.metric("chatiq_gateway_streams_resumed_total", tenant="acme") == 1


async def test_the_ai_sdk_s_default_openai_provider_streams_and_generates_through_responses(
    make_stack: StackFactory,
) -> None:
    """``createOpenAI({baseURL})(model)`` calls the Responses API (only
    ``openai.chat(model)`` calls chat completions): streamText and generateText
    each get exactly the bot's text (the emulator's writes cut at random bytes)."""
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, split_writes=True))
    base = str(stack.gateway.make_url("/v1"))
    result = await run_node("openai_provider.mjs", base, ACME_KEY, "demo", "hello")
    assert "thrown" not in result, result
    expected = "".join(compose_reply("hello", [], 40))
    assert result["streamed"] == expected and result["generated"] == expected
    assert result["finishReason"] == "stop" and result["responseId"].startswith("resp_")
    assert "error" not in " ".join(result["parts"])
    routes = {line["route"] for line in stack.log_lines() if line["event"] == "request"}
    assert routes == {"/v1/responses"}


async def test_the_ai_sdk_s_openai_provider_reports_a_failed_stream(stack: Stack) -> None:
    base = str(stack.gateway.make_url("/v1"))
    result = await run_node("openai_provider.mjs", base, ACME_KEY, "fault-drop-mid", "hello")
    assert "thrown" in result or any(p.startswith("error") for p in result["parts"]), result
