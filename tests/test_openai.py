"""The OpenAI frontend, driven by the official ``openai`` SDK (no hand-written
parsing): streaming and not, models, every error class our statuses raise,
mid-stream failures raised, ChatIQ's extra events kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from gateway.auth.tenants import hash_key
from gateway.config import Tenant
from loadtest.emulator import EmulatorSettings
from tests.helpers import (
    ACME_KEY,
    LIMITED_KEY,
    TENANTS,
    TINY_KEY,
    Stack,
    StackFactory,
    emulator_text,
)
from tests.scripted import MULTIBYTE_TEXT, ScriptedFactory, multibyte_pieces

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def client_for(stack: Stack, key: str = ACME_KEY) -> AsyncOpenAI:
    # No retries: the SDK would otherwise retry our 429s and 5xx on its own.
    return AsyncOpenAI(
        base_url=str(stack.gateway.make_url("/v1")), api_key=key, max_retries=0, timeout=10
    )


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with client_for(stack) as c:
        yield c


async def test_a_streamed_completion_arrives_whole_with_its_conversation_id(
    stack: Stack, client: AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model="demo", messages=USER, stream=True, extra_headers={"X-Request-Id": "oa-stream"}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == emulator_text(stack, "oa-stream") and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    conversation_id = (chunks[-1].model_extra or {})["conversation_id"]
    assert conversation_id and conversation_id.startswith("conv")
    assert {c.id for c in chunks} == {"chatcmpl-oa-stream"} and chunks[0].model == "demo"

    # The next turn names it, and hears it back in a header before the answer.
    raw = await client.chat.completions.with_raw_response.create(
        model="demo", messages=USER, stream=True, extra_body={"conversation_id": conversation_id}
    )
    assert raw.headers["X-Conversation-Id"] == conversation_id
    async for _ in raw.parse():
        pass


async def test_a_completion_without_streaming(stack: Stack, client: AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="demo",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
        ],
        extra_headers={"X-Request-Id": "oa-once"},
        temperature=0.2,  # options ChatIQ has no use for are accepted and ignored
        n=1,  # one choice, the only number ChatIQ gives
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason == "stop"
    conversation_id = (completion.model_extra or {})["conversation_id"]
    assert raw.headers["X-Conversation-Id"] == conversation_id
    assert completion.usage is not None and completion.usage.total_tokens == 0
    sent = stack.transcript("oa-once").body
    assert sent["message"] == "and now?" and sent["bot_slug"] == "demo"
    assert sent["history"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an answer"},
    ]


async def test_models_are_the_bots_the_key_may_use(make_stack: StackFactory) -> None:
    stack = await make_stack()
    async with client_for(stack) as client:
        assert [m.id async for m in client.models.list()] == ["demo"]
        assert (await client.models.retrieve("demo")).owned_by == "chatiq"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")


async def test_usage_is_reported_when_asked_for(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="demo", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 0  # ChatIQ reports no token counts


async def test_chatiq_s_other_events_reach_an_openai_client(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="rich", messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "\n\nHere is a second message.\n\nAnd a third." in text
    assert "\n\n![image](https://www.chatiq.io/logo.png)" in text
    extras = [(c.model_extra or {}).get("chatiq") for c in chunks]
    assert {"suggestions": [{"label": "Tell me more"}, {"label": "Thanks!"}]} in extras


@pytest.mark.parametrize(
    ("key", "fields", "error", "status", "code"),
    [
        ("wrong-key", {}, openai.AuthenticationError, 401, "invalid_api_key"),
        (LIMITED_KEY, {"model": "rich"}, openai.PermissionDeniedError, 403, "permission_denied"),
        (LIMITED_KEY, {"model": "unheard-of"}, openai.NotFoundError, 404, "model_not_found"),
        (ACME_KEY, {"messages": [{"role": "assistant", "content": "x"}]}, openai.BadRequestError,
         400, "invalid_request"),
        (ACME_KEY, {"stream_options": False}, openai.BadRequestError, 400, "invalid_request"),
        (ACME_KEY, {"n": 2}, openai.BadRequestError, 400, "invalid_request"),
        (ACME_KEY, {"n": True}, openai.BadRequestError, 400, "invalid_request"),
        (ACME_KEY, {"model": "fault-500"}, openai.InternalServerError, 502, "upstream_error"),
        (ACME_KEY, {"model": "fault-stall-first"}, openai.InternalServerError, 504,
         "upstream_timeout"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("stream", [True, False])
async def test_every_status_raises_the_sdk_s_own_error_class(
    make_stack: StackFactory,
    key: str,
    fields: dict[str, Any],
    error: type[openai.APIStatusError],
    status: int,
    code: str,
    stream: bool,
) -> None:
    other = Tenant("other", hash_key("other-key-1"), ("rich",))  # names the bot "rich"
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=0, stall_s=3),
        max_retries=0,
        tenants=(*TENANTS, other),
    )
    async with client_for(stack, key) as client:
        with pytest.raises(error) as caught:
            result = await client.chat.completions.create(
                **{"model": "demo", "messages": USER, "stream": stream, **fields}
            )
            if stream:
                async for _ in result:
                    pass
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == code


async def test_a_tenant_over_its_rate_gets_a_rate_limit_error_with_retry_after(
    stack: Stack,
) -> None:
    async with client_for(stack, TINY_KEY) as client:
        for _ in range(3):
            await client.chat.completions.create(model="demo", messages=USER)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="demo", messages=USER)
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert caught.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]


@pytest.mark.parametrize(("bot", "code"), [("fault-drop-mid", "upstream_error"),
                                           ("fault-error-mid", "rate_limit")])  # fmt: skip
async def test_a_failure_mid_stream_raises_in_the_sdk_after_the_text_so_far(
    client: AsyncOpenAI, bot: str, code: str
) -> None:
    stream = await client.chat.completions.create(model=bot, messages=USER, stream=True)
    text = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(text)  # the text before the failure arrived
    assert caught.value.code == code


async def test_multibyte_text_split_across_reads_arrives_exactly(
    scripted: ScriptedFactory,
) -> None:
    text, pieces = MULTIBYTE_TEXT, multibyte_pieces()
    stack, _ = await scripted(pieces, idle_timeout_s=5.0)  # a read every 50 ms: slow events
    async with client_for(stack) as client:
        stream = await client.chat.completions.create(model="demo", messages=USER, stream=True)
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert (chunks[-1].model_extra or {})["conversation_id"] == "c-9"


async def test_a_part_of_the_api_the_gateway_does_not_serve_is_openai_s_404_and_logged(
    stack: Stack, client: AsyncOpenAI
) -> None:
    """/v1/embeddings and the like: a 404 in OpenAI's error shape that names the
    route (it came in ChatIQ's shape, which SDKs report as a model not found,
    and nothing was logged)."""
    with pytest.raises(openai.NotFoundError) as caught:
        await client.embeddings.create(model="demo", input="hi")
    error = caught.value.body
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert "POST /v1/embeddings" in error["message"] and "serves chat" in error["message"]
    assert error["type"] == "invalid_request_error" and caught.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        await client.files.list()
    lines = [line for line in stack.log_lines() if line["event"] == "unknown_route"]
    assert [(line["method"], line["path"], line["frontend"]) for line in lines] == [
        ("POST", "/v1/embeddings", "openai"),
        ("GET", "/v1/files", "openai"),
    ]
    assert all(line["level"] == "info" for line in lines)


TOOL: Any = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}


@pytest.mark.parametrize(
    ("asked", "param"),
    [
        ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "lookup"}}},
         "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)  # fmt: skip
async def test_a_forced_tool_or_json_output_is_a_400_the_sdk_raises(
    client: AsyncOpenAI, asked: dict[str, Any], param: str
) -> None:
    """ChatIQ answers in plain text: these were accepted and ignored, and the
    client's parser failed later on the text."""
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="demo", messages=USER, **asked)
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == param
    assert error["code"] == "unsupported_parameter" and "plain text" in error["message"]


async def test_structured_output_through_parse_is_a_400_not_a_late_validation_error(
    client: AsyncOpenAI,
) -> None:
    from pydantic import BaseModel

    class Answer(BaseModel):
        text: str

    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.parse(model="demo", messages=USER, response_format=Answer)
    assert "json_schema" in caught.value.message


async def test_tools_the_bot_may_ignore_are_taken_and_answered_in_text(
    stack: Stack, client: AsyncOpenAI
) -> None:
    for choice in ("auto", "none", None):
        extra: dict[str, Any] = {} if choice is None else {"tool_choice": choice}
        completion = await client.chat.completions.create(
            model="demo", messages=USER, tools=[TOOL], **extra
        )
        assert completion.choices[0].message.content
        assert not completion.choices[0].message.tool_calls
