"""The Responses API (``POST /v1/responses``), driven by the official ``openai``
SDK (no hand-written parsing): streaming and not, the SDK's strict stream
accumulator, ``previous_response_id`` over turns, stored responses, every
error class, failures mid-stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from gateway.auth.tenants import hash_key
from gateway.config import RedisSettings, Tenant
from loadtest.emulator import EmulatorSettings, compose_reply
from loadtest.harness import free_port, start_gateway, stop, wait_ready
from tests.helpers import (
    ACME_KEY,
    CHATIQ_KEY,
    LIMITED_KEY,
    TENANTS,
    TINY_KEY,
    GatewayProcess,
    Stack,
    StackFactory,
    emulator_text,
)
from tests.redis_server import RedisServer
from tests.scripted import MULTIBYTE_TEXT, ScriptedFactory, multibyte_pieces


def client_for(stack: Stack, key: str = ACME_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url=str(stack.gateway.make_url("/v1")), api_key=key, max_retries=0, timeout=10
    )


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with client_for(stack) as c:
        yield c


async def test_a_response_not_streamed_is_the_bot_s_text(stack: Stack, client: AsyncOpenAI) -> None:
    response = await client.responses.create(model="demo", input="hello")
    assert response.output_text == "".join(compose_reply("hello", [], 40))
    assert response.status == "completed" and response.object == "response"
    assert response.id.startswith("resp_") and response.model == "demo"
    assert response.usage is not None and response.usage.total_tokens == 0


async def test_a_streamed_response_rebuilds_exactly_the_text_in_the_sdk_s_accumulator(
    stack: Stack, client: AsyncOpenAI
) -> None:
    async with client.responses.stream(
        model="demo", input="hello", extra_headers={"X-Request-Id": "rs-stream"}
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert final.output_text == emulator_text(stack, "rs-stream") and final.output_text
    assert kinds[:4] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added",
    ]  # fmt: skip
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert set(kinds[4:-4]) == {"response.output_text.delta"}


async def test_raw_stream_events_carry_their_sequence_and_one_response_id(
    client: AsyncOpenAI,
) -> None:
    events = [e async for e in await client.responses.create(model="demo", input="hi", stream=True)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    ids = {e.response.id for e in events if hasattr(e, "response")}
    assert len(ids) == 1


async def test_multibyte_text_split_across_reads_arrives_exact(scripted: ScriptedFactory) -> None:
    stack, _ = await scripted(multibyte_pieces(), idle_timeout_s=5.0)  # a read every 50 ms
    async with (
        client_for(stack) as client,
        client.responses.stream(model="demo", input="hi") as stream,
    ):
        final = await stream.get_final_response()
    assert final.output_text == MULTIBYTE_TEXT
    assert (final.model_extra or {})["chatiq"]["conversation_id"] == "c-9"


async def test_previous_response_id_continues_the_conversation(
    stack: Stack, client: AsyncOpenAI
) -> None:
    first = await client.responses.create(model="demo", input="my name is Ada")
    second = await client.responses.create(
        model="demo", input="what is my name?", previous_response_id=first.id,
        extra_headers={"X-Request-Id": "rs-second"},
    )  # fmt: skip
    sent = stack.transcript("rs-second").body
    assert sent["conversation_id"] == (first.model_extra or {})["chatiq"]["conversation_id"]
    assert second.previous_response_id == first.id
    streamed = await client.responses.create(
        model="demo", input="and again?", previous_response_id=second.id, stream=True
    )
    async for _ in streamed:
        pass


async def test_an_unknown_or_other_tenant_s_previous_response_is_a_404(
    stack: Stack, client: AsyncOpenAI
) -> None:
    first = await client.responses.create(model="demo", input="hi")
    for key, response_id in ((ACME_KEY, "resp_nope"), (LIMITED_KEY, first.id)):
        async with client_for(stack, key) as other:
            with pytest.raises(openai.NotFoundError) as caught:
                await other.responses.create(
                    model="demo", input="hi", previous_response_id=response_id
                )
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "previous_response_not_found"
        assert caught.value.body["param"] == "previous_response_id"


async def test_a_stored_response_is_read_back_and_forgotten(client: AsyncOpenAI) -> None:
    created = await client.responses.create(model="demo", input="hi")
    again = await client.responses.retrieve(created.id)
    assert again.output_text == created.output_text and again.id == created.id
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    unstored = await client.responses.create(model="demo", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="demo", input="hi", previous_response_id=unstored.id)


@pytest.mark.parametrize(
    ("key", "fields", "error", "status", "code"),
    [
        ("wrong-key", {}, openai.AuthenticationError, 401, "invalid_api_key"),
        (LIMITED_KEY, {"model": "rich"}, openai.PermissionDeniedError, 403, "permission_denied"),
        (LIMITED_KEY, {"model": "unheard-of"}, openai.NotFoundError, 404, "model_not_found"),
        (ACME_KEY, {"input": []}, openai.BadRequestError, 400, "invalid_request"),
        (ACME_KEY, {"input": [{"role": "assistant", "content": "x"}]}, openai.BadRequestError,
         400, "invalid_request"),
        (ACME_KEY, {"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
         openai.BadRequestError, 400, "invalid_request"),
        (ACME_KEY, {"text": {"format": {"type": "json_object"}}}, openai.BadRequestError, 400,
         "unsupported_parameter"),
        (ACME_KEY, {"tool_choice": "required"}, openai.BadRequestError, 400,
         "unsupported_parameter"),
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
            result = await client.responses.create(
                **{"model": "demo", "input": "hi", "stream": stream, **fields}
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
            await client.responses.create(model="demo", input="hi")
        with pytest.raises(openai.RateLimitError) as caught:
            await client.responses.create(model="demo", input="hi")
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert caught.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]


@pytest.mark.parametrize("bot", ["fault-drop-mid", "fault-error-mid", "fault-stall-mid"])
async def test_a_stream_that_fails_midway_ends_with_response_failed(
    make_stack: StackFactory, bot: str
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, stall_s=5))
    async with client_for(stack) as client:
        events = [
            e async for e in await client.responses.create(model=bot, input="hi", stream=True)
        ]
        assert events[-1].type == "response.failed"
        assert "response.completed" not in {e.type for e in events}
        failed = events[-1].response
        assert failed.status == "failed" and failed.error is not None
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            async with client.responses.stream(model=bot, input="hi") as stream:
                await stream.get_final_response()


@pytest.mark.process
async def test_previous_response_id_works_on_another_replica_sharing_redis(
    make_stack: StackFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two gateway processes sharing a real redis-server, a client alternating
    between them (a load balancer without stickiness): every turn continues
    the last."""
    stack = await make_stack()
    assert stack.emulator.port is not None
    processes = []
    for _ in range(2):
        port = free_port()
        process, log = start_gateway(
            tmp_path, port, stack.emulator.port, ACME_KEY, CHATIQ_KEY,
            more_tenants=[{"name": "limited", "key": LIMITED_KEY}], redis={"url": redis_server.url},
        )  # fmt: skip
        processes.append(GatewayProcess(process, port, log))
    try:
        for gw in processes:
            await wait_ready(f"http://127.0.0.1:{gw.port}/healthz")
        a, b = (
            AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key=ACME_KEY, max_retries=0)
            for gw in processes
        )
        first = await a.responses.create(model="demo", input="my name is Ada")
        conversation = (first.model_extra or {})["chatiq"]["conversation_id"]
        second = await b.responses.create(
            model="demo", input="and mine?", previous_response_id=first.id,
            extra_headers={"X-Request-Id": "rs-on-b"},
        )  # fmt: skip
        assert stack.transcript("rs-on-b").body["conversation_id"] == conversation
        async with a.responses.stream(
            model="demo", input="again", previous_response_id=second.id
        ) as stream:
            third = await stream.get_final_response()
        assert third.output_text and third.previous_response_id == second.id
        assert (await a.responses.retrieve(second.id)).output_text == second.output_text
        await a.responses.delete(second.id)
        with pytest.raises(openai.NotFoundError):
            await b.responses.retrieve(second.id)
        other = AsyncOpenAI(
            base_url=f"http://127.0.0.1:{processes[1].port}/v1", api_key=LIMITED_KEY,
            max_retries=0,
        )  # fmt: skip
        with pytest.raises(openai.NotFoundError):  # another tenant's id, on either replica
            await other.responses.create(model="demo", input="hi", previous_response_id=first.id)
        for client in (a, b, other):
            await client.close()
    finally:
        stop(*(gw.process for gw in processes))


async def test_a_response_store_whose_redis_is_gone_answers_503(
    make_stack: StackFactory, redis_server: RedisServer
) -> None:
    shared = RedisSettings(url=redis_server.url, timeout_s=0.2)
    a, b = await make_stack(redis=shared), await make_stack(redis=shared)
    async with client_for(a) as on_a, client_for(b) as on_b:
        first = await on_a.responses.create(model="demo", input="hi")
        redis_server.stop()
        # Its own replica still has its copy; another cannot say, and says so.
        assert (await on_a.responses.retrieve(first.id)).id == first.id
        with pytest.raises(openai.InternalServerError) as caught:
            await on_b.responses.create(model="demo", input="hi", previous_response_id=first.id)
        assert caught.value.status_code == 503


async def test_the_openai_agents_sdk_s_default_model_runs_through_the_gateway(
    make_stack: StackFactory,
) -> None:
    """``Agent(model=...)`` with the gateway as the default client: the Agents
    SDK's default model calls the Responses API, streaming and not (the
    emulator's writes cut at random bytes, inside multi-byte characters)."""
    import agents

    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, split_writes=True))
    client = client_for(stack)
    agents.set_default_openai_client(client, use_for_tracing=False)
    agents.set_tracing_disabled(True)
    agent = agents.Agent(name="docs", instructions="Answer from the documents.", model="demo")
    result = await agents.Runner.run(agent, "hello")
    assert result.final_output == "".join(compose_reply("hello", [], 40))
    streamed = agents.Runner.run_streamed(agent, "and again")
    deltas = [
        event.data.delta
        async for event in streamed.stream_events()
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"
    ]
    assert "".join(deltas) == streamed.final_output and streamed.final_output
    await client.close()


async def test_chatiq_s_other_events_reach_a_responses_client(client: AsyncOpenAI) -> None:
    async with client.responses.stream(model="rich", input="hi") as stream:
        final = await stream.get_final_response()
    assert "\n\nHere is a second message.\n\nAnd a third." in final.output_text
    assert "\n\n![image](https://www.chatiq.io/logo.png)" in final.output_text
    chatiq = (final.model_extra or {})["chatiq"]
    assert chatiq["suggestions"] == [{"label": "Tell me more"}, {"label": "Thanks!"}]
    assert chatiq["conversation_id"]
