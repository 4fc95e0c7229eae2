"""The happy path, end to end: emulator -> gateway -> client, over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from loadtest.emulator import EmulatorSettings
from tests.helpers import (
    CHATIQ_KEY,
    Stack,
    StackFactory,
    read_stream,
    stream_counting_segments,
)


async def test_streams_cut_at_random_byte_offsets_arrive_byte_for_byte(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=25, split_writes=True, seed=7)
    )
    limit = asyncio.Semaphore(25)

    async def one(i: int) -> None:
        request_id = f"split-{i}"
        bot = "rich" if i % 3 == 0 else "demo"
        async with (
            limit,
            await stack.chat(
                {"message": f"question {i} ünïcödé 🙂", "bot": bot},
                headers={"X-Request-Id": request_id},
            ) as r,
        ):
            assert r.status == 200
            body, events = await read_stream(r)
        assert body == bytes(stack.transcript(request_id).sent)
        assert events[-1] == "[DONE]"

    await asyncio.gather(*(one(i) for i in range(300)))


async def test_all_event_kinds_pass_through_in_order(stack: Stack) -> None:
    async with await stack.chat({"message": "show me everything", "bot": "rich"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Accel-Buffering"] == "no"
        _, events = await read_stream(r)
    kinds = [next(iter(json.loads(e))) if e != "[DONE]" else e for e in events]
    n = kinds.count("choices")
    assert n > 5
    assert kinds == ["choices"] * n + [
        "responses",
        "attachments",
        "suggestions",
        "conversationId",
        "[DONE]",
    ]


async def test_the_upstream_request_carries_key_bot_conversation_and_request_id(
    stack: Stack,
) -> None:
    body = {
        "message": "hi",
        "bot": "rich",
        "conversation_id": "conv-given",
        "history": [{"role": "user", "content": "before"}],
        "private_mode": True,
    }
    async with await stack.chat(body) as r:
        await r.read()
        request_id = r.headers["X-Request-Id"]
    seen = stack.transcript(request_id)
    assert seen.headers["Authorization"] == f"Bearer {CHATIQ_KEY}"
    assert seen.headers["X-Request-Id"] == request_id
    assert seen.body == {
        "message": "hi",
        "bot_slug": "rich",
        "stream": True,
        "conversation_id": "conv-given",
        "history": [{"role": "user", "content": "before"}],
        "private_mode": True,
    }


async def test_the_emulators_image_can_be_a_local_data_url(make_stack: StackFactory) -> None:
    image = "data:image/svg+xml;base64,PHN2Zy8+"  # what make screenshot uses: no network
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, image_url=image))
    async with await stack.chat({"message": "hi", "bot": "rich"}) as r:
        _, events = await read_stream(r)
    attachments = [json.loads(e)["attachments"] for e in events if '"attachments"' in e]
    assert attachments == [[{"type": "image", "url": image}]]


async def test_a_client_request_id_is_kept_and_a_bad_one_replaced(stack: Stack) -> None:
    async with await stack.chat(headers={"X-Request-Id": "abc-123"}) as r:
        await r.read()
        assert r.headers["X-Request-Id"] == "abc-123"
    async with await stack.chat(headers={"X-Request-Id": "bad id\twith junk"}) as r:
        await r.read()
        assert r.headers["X-Request-Id"] != "bad id\twith junk"
        assert len(r.headers["X-Request-Id"]) == 32


async def test_a_conversation_continues_and_remembers_the_first_message(stack: Stack) -> None:
    async with await stack.chat({"message": "my name is Ada"}) as r:
        _, events = await read_stream(r)
    conversation_id = json.loads(events[-2])["conversationId"]

    async with await stack.chat({"message": "who am I?", "conversation_id": conversation_id}) as r:
        _, events = await read_stream(r)
    text = "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-2])
    assert "my name is Ada" in text
    assert json.loads(events[-2])["conversationId"] == conversation_id


async def test_non_streaming_answers_the_upstream_json(stack: Stack) -> None:
    async with await stack.chat({"message": "my name is Ada", "stream": False}) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        first = await r.json()
    assert "my name is Ada" in first["response"]
    async with await stack.chat(
        {"message": "again", "stream": False, "conversation_id": first["conversationId"]}
    ) as r:
        second = await r.json()
    assert "my name is Ada" in second["response"]
    assert second["conversationId"] == first["conversationId"]


async def test_tokens_reach_the_client_as_they_are_made(make_stack: StackFactory) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=6))
    arrivals: list[float] = []
    async with await stack.chat({"message": "x"}) as r:
        async for _ in r.content.iter_any():
            arrivals.append(time.monotonic())
    # The emulator paces tokens 50 ms apart; a buffering relay would deliver
    # them in one lump at the end.
    assert len(arrivals) >= 5
    assert arrivals[-1] - arrivals[0] >= 0.25


async def test_default_bot_is_used_when_none_is_named(stack: Stack) -> None:
    request_id = uuid.uuid4().hex
    async with await stack.chat(headers={"X-Request-Id": request_id}) as r:
        await r.read()
    assert stack.transcript(request_id).body["bot_slug"] == "demo"


async def test_a_history_with_a_huge_integer_still_reaches_the_upstream(stack: Stack) -> None:
    history = [{"role": "user", "content": "earlier", "n": 10**30}]
    response = await stack.chat({"message": "hi", "history": history})
    _, events = await read_stream(response)
    assert events[-1] == "[DONE]"
    assert stack.transcript(response.headers["X-Request-Id"]).body["history"] == history


async def test_the_head_rides_with_the_first_events_and_the_end_with_the_last(
    make_stack: StackFactory,
) -> None:
    # One upstream read per event (20 ms apart): one write to the client for
    # each, the response head in the first one and the chunked body's end in
    # the last, none on their own.
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=50, reply_tokens=5))
    received, segments = await stream_counting_segments(stack, "segments")
    upstream_events = bytes(stack.transcript("segments").sent).count(b"data: ")
    assert received.count(b"data: ") == upstream_events >= 7
    assert segments <= upstream_events, (segments, upstream_events)
