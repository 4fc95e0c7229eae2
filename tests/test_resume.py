"""Resumable streams on one process: a client that drops resumes with
Last-Event-ID and gets the rest, exactly once, in order, byte for byte."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway.config import ResumeSettings, Tenant
from gateway.resume.streams import RESUMABLE
from loadtest.emulator import LIVE, EmulatorSettings
from tests.helpers import (
    ACME_KEY,
    AUTH,
    LIMITED_KEY,
    TENANTS,
    GatewayProcess,
    Stack,
    StackFactory,
    eventually,
    read_events,
    stream_counting_segments,
    upstream_events,
    without_ids,
)

RESUME = ResumeSettings(enabled=True, detach_grace_s=5.0, retain_s=30.0)
SLOW = EmulatorSettings(ttft_s=0, tokens_per_s=400, reply_tokens=33)  # 40 events with [DONE]


async def resumable_stack(make_stack: StackFactory, **kw: Any) -> Stack:
    kw.setdefault("emulator", SLOW)
    kw.setdefault("resume", RESUME)
    return await make_stack(**kw)


async def start(stack: Stack, headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    return await stack.chat({"message": "tell me everything"}, headers=headers or {})


async def resume(
    stack: Stack, stream_id: str, after: int | None, *, key: str = ACME_KEY, **kw: Any
) -> aiohttp.ClientResponse:
    headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
    if after is not None:
        headers["Last-Event-ID"] = str(after)
    url = stack.gateway.make_url(f"/api/chatbot/streams/{stream_id}")
    return await stack.session.get(url, headers=headers, **kw)


async def test_a_client_that_drops_after_10_of_40_events_resumes_with_the_rest(
    make_stack: StackFactory,
) -> None:
    stack = await resumable_stack(make_stack)
    first = await start(stack, {"X-Resumable": "1"})
    stream_id = first.headers["X-Stream-Id"]
    request_id = first.headers["X-Request-Id"]
    head, got = await read_events(first, limit=10)
    assert [e.id for e in got] == [str(i) for i in range(1, 11)]

    rest = await resume(stack, stream_id, 10)
    assert rest.headers["X-Stream-Id"] == stream_id
    assert rest.headers["Content-Type"].startswith("text/event-stream")
    tail, resumed = await read_events(rest)
    assert [e.id for e in resumed] == [str(i) for i in range(11, 41)]
    assert resumed[-1].data == "[DONE]"
    # Exactly what the upstream sent, each event once, in order, with an id line.
    assert without_ids(head + tail) == upstream_events(stack, request_id)
    # And byte for byte what one uninterrupted reading of the stream gets.
    whole, _ = await read_events(await resume(stack, stream_id, None))
    assert head + tail == whole
    assert await stack.metric("chatiq_gateway_streams_detached_total", tenant="acme") == 1
    assert await stack.metric("chatiq_gateway_streams_resumed_total", tenant="acme") == 2
    assert await stack.metric("chatiq_gateway_events_replayed_total", tenant="acme") == 70


async def test_streams_are_not_resumable_unless_asked(make_stack: StackFactory) -> None:
    stack = await resumable_stack(make_stack)
    plain = await start(stack)
    body, events = await read_events(plain)
    assert "X-Stream-Id" not in plain.headers
    assert all(e.id is None for e in events) and events[-1].data == "[DONE]"
    assert body == upstream_events(stack, plain.headers["X-Request-Id"])
    opted_out = await start(stack, {"X-Resumable": "0"})
    assert "X-Stream-Id" not in opted_out.headers
    await read_events(opted_out)


async def test_a_tenant_may_make_all_its_streams_resumable(make_stack: StackFactory) -> None:
    tenants = (Tenant("acme", TENANTS[0].key_sha256, ("*",), 0, 0, resumable=True), *TENANTS[1:])
    stack = await resumable_stack(make_stack, tenants=tenants)
    response = await start(stack)
    assert response.headers["X-Stream-Id"]
    _, events = await read_events(response)
    assert events[0].id == "1" and events[-1].data == "[DONE]"
    off = await start(stack, {"X-Resumable": "0"})
    assert "X-Stream-Id" not in off.headers
    await read_events(off)


async def test_without_resume_enabled_the_header_changes_nothing(stack: Stack) -> None:
    response = await stack.chat(headers={"X-Resumable": "1"})
    assert "X-Stream-Id" not in response.headers
    await read_events(response)
    missing = await stack.session.get(stack.gateway.make_url("/api/chatbot/streams/x"))
    assert missing.status == 404


async def test_an_x_resumable_of_another_value_is_refused_on_or_off(
    stack: Stack, make_stack: StackFactory
) -> None:
    resuming = await resumable_stack(make_stack)
    for each in (stack, resuming):
        for stream in (True, False):
            response = await each.chat(
                {"message": "hi", "stream": stream}, headers={"X-Resumable": "maybe"}
            )
            assert response.status == 400
            body = await response.json()
            assert body["error"]["code"] == "INVALID_REQUEST"
            assert "X-Resumable" in body["error"]["message"]


async def test_a_finished_stream_resumes_within_retain_s_then_is_gone(
    make_stack: StackFactory,
) -> None:
    stack = await resumable_stack(
        make_stack, resume=ResumeSettings(enabled=True, detach_grace_s=5.0, retain_s=0.5)
    )
    response = await start(stack, {"X-Resumable": "1"})
    stream_id = response.headers["X-Stream-Id"]
    whole, events = await read_events(response)
    again, _ = await read_events(await resume(stack, stream_id, 30))
    assert again == whole[whole.index(b"id: 31\n") :]
    nothing = await resume(stack, stream_id, len(events))
    assert await nothing.read() == b""  # it had everything: an empty stream, and the end
    await asyncio.sleep(0.7)
    expired = await resume(stack, stream_id, 30)
    assert expired.status == 404
    assert (await expired.json())["error"]["code"] == "STREAM_NOT_FOUND"


async def test_resume_errors(make_stack: StackFactory) -> None:
    stack = await resumable_stack(make_stack)
    response = await start(stack, {"X-Resumable": "1"})
    stream_id = response.headers["X-Stream-Id"]
    await read_events(response)
    unknown = await resume(stack, "no-such-stream", 3)
    other_tenant = await resume(stack, stream_id, 3, key=LIMITED_KEY)
    for answer in (unknown, other_tenant):  # alike: an id tells nothing about other tenants
        assert answer.status == 404
        assert await answer.json() == {
            "error": {
                "code": "STREAM_NOT_FOUND",
                "message": "no resumable stream with that id for this key (it may have expired)",
            }
        }
    bad_id = await resume(stack, stream_id, None, headers={"Last-Event-ID": "ten"})
    assert bad_id.status == 400 and (await bad_id.json())["error"]["code"] == "INVALID_REQUEST"
    beyond = await resume(stack, stream_id, 999)
    assert beyond.status == 400
    nobody = await stack.session.get(stack.gateway.make_url(f"/api/chatbot/streams/{stream_id}"))
    assert nobody.status == 401
    by_query = await stack.session.get(
        stack.gateway.make_url(f"/api/chatbot/streams/{stream_id}"),
        params={"last_event_id": "39"},
        headers=AUTH,
    )
    _, events = await read_events(by_query)
    assert [e.id for e in events] == ["40"] and events[0].data == "[DONE]"


async def test_nobody_resumes_so_the_upstream_is_cancelled_after_the_grace(
    make_stack: StackFactory,
) -> None:
    stack = await resumable_stack(
        make_stack,
        emulator=EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=200),
        resume=ResumeSettings(enabled=True, detach_grace_s=0.5, retain_s=5.0),
    )
    response = await start(stack, {"X-Resumable": "1"})
    await read_events(response, limit=3)
    live = stack.emulator.app[LIVE]
    await asyncio.sleep(0.3)
    assert live.handlers == 1  # read on, for whoever resumes
    waited = await eventually(lambda: live.handlers == 0, timeout_s=3)
    assert waited < 1.5
    assert await stack.metric("chatiq_gateway_streams_detached_total", tenant="acme") == 1
    assert await stack.metric("chatiq_gateway_streams_expired_total", tenant="acme") == 1
    gone = await resume(stack, response.headers["X-Stream-Id"], 3)
    assert gone.status == 404
    assert len(stack.gateway.app[RESUMABLE]) == 0


async def test_a_resume_within_the_grace_keeps_the_upstream(make_stack: StackFactory) -> None:
    stack = await resumable_stack(
        make_stack,
        emulator=EmulatorSettings(ttft_s=0, tokens_per_s=100, reply_tokens=60),
        resume=ResumeSettings(enabled=True, detach_grace_s=0.5, retain_s=5.0),
    )
    response = await start(stack, {"X-Resumable": "1"})
    stream_id, request_id = response.headers["X-Stream-Id"], response.headers["X-Request-Id"]
    head, _got = await read_events(response, limit=5)
    await asyncio.sleep(0.3)
    tail, _ = await read_events(await resume(stack, stream_id, 5))
    assert without_ids(head + tail) == upstream_events(stack, request_id)
    assert await stack.metric("chatiq_gateway_streams_expired_total", tenant="acme") == 0


@pytest.mark.process
async def test_a_thousand_streams_dropped_and_resumed_at_random_moments(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=2000, reply_tokens=33))
    gw = await gateway_process(stack.emulator, resume={"enabled": True})
    base = f"http://127.0.0.1:{gw.port}"
    rng = random.Random(7)
    limit = asyncio.Semaphore(100)

    async def one(i: int) -> None:
        async with limit:
            response = await stack.session.post(
                f"{base}/api/chatbot", json={"message": "tell me everything"},
                headers={**AUTH, "X-Resumable": "1"},
            )  # fmt: skip
            stream_id, request_id = (
                response.headers["X-Stream-Id"],
                response.headers["X-Request-Id"],
            )
            body, events = await read_events(response, limit=rng.randint(1, 40))
            drops = 0
            while events[-1].data != "[DONE]":
                drops += 1
                assert drops < 60
                headers = {**AUTH, "Last-Event-ID": events[-1].id or "0"}
                again = await stack.session.get(f"{base}/api/chatbot/streams/{stream_id}",
                                                headers=headers)  # fmt: skip
                more, fresh = await read_events(again, limit=rng.choice([None, 1, 5, 20]))
                body += more
                events += fresh
            assert [e.id for e in events] == [str(n) for n in range(1, 41)], i
            assert without_ids(body) == upstream_events(stack, request_id), i

    await asyncio.gather(*(one(i) for i in range(1000)))
    resumed = await gw.metric(stack.session, "chatiq_gateway_streams_resumed_total")
    assert resumed >= 900  # all but those that happened to drop just after [DONE]
    assert await gw.metric(stack.session, "chatiq_gateway_active_streams") == 0


async def test_the_ai_sdk_stream_resumes_in_its_own_format(make_stack: StackFactory) -> None:
    stack = await resumable_stack(make_stack)
    body = {
        "id": "chat-1",
        "messages": [{"role": "user", "parts": [{"type": "text", "text": "hi"}]}],
    }
    response = await stack.session.post(
        stack.gateway.make_url("/api/ui/chat"), json=body, headers={**AUTH, "X-Resumable": "1"}
    )
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    stream_id = response.headers["X-Stream-Id"]
    head, _got = await read_events(response, limit=6)
    again = await resume(stack, stream_id, 6)
    assert again.headers["x-vercel-ai-ui-message-stream"] == "v1"
    tail, rest = await read_events(again)
    whole, _ = await read_events(await resume(stack, stream_id, None))
    assert head + tail == whole
    assert rest[-1].data == "[DONE]" and '"type":"finish"' in (rest[-2].data or "")


@pytest.mark.parametrize("cut_after", [1, 5])
async def test_a_resume_from_before_what_is_kept_is_refused(
    make_stack: StackFactory, cut_after: int
) -> None:
    stack = await resumable_stack(
        make_stack,
        emulator=EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=33),
        resume=ResumeSettings(enabled=True, max_stream_bytes=800),
    )
    response = await start(stack, {"X-Resumable": "1"})
    stream_id = response.headers["X-Stream-Id"]
    await read_events(response)
    late = await resume(stack, stream_id, cut_after)
    assert late.status == 404  # the events after it were let go: nothing could be complete
    assert (await late.json())["error"]["code"] == "STREAM_NOT_FOUND"
    _recent, events = await read_events(await resume(stack, stream_id, 38))
    assert [e.id for e in events] == ["39", "40"]


async def test_a_reader_that_falls_behind_what_is_kept_gets_an_error_and_the_end(
    make_stack: StackFactory,
) -> None:
    stack = await resumable_stack(
        make_stack,
        emulator=EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=300),
        resume=ResumeSettings(enabled=True, max_stream_bytes=64 * 1024),
    )
    response = await stack.chat({"message": "hi", "bot": "bulk"}, headers={"X-Resumable": "1"})
    assert response.status == 200
    await asyncio.sleep(1.0)  # reads nothing: the bulk reply (~10 MB) outruns what is kept
    _, events = await read_events(response)
    ids = [int(e.id) for e in events if e.id is not None]
    assert ids == list(range(1, len(ids) + 1))  # what it got, it got in order, once
    assert '"STREAM_INTERRUPTED"' in (events[-2].data or "") and events[-1].data == "[DONE]"
    assert events[-1].id is None  # the reader's own ending: not one of the stream's events


@pytest.mark.parametrize(
    ("bot", "code"),
    [("fault-drop-mid", "UPSTREAM_ERROR"), ("fault-stall-mid", "UPSTREAM_TIMEOUT")],
)
async def test_an_upstream_failure_mid_stream_ends_the_stream_and_every_resume_alike(
    make_stack: StackFactory, bot: str, code: str
) -> None:
    stack = await resumable_stack(make_stack)  # the upstream's idle timeout: 0.5 s
    response = await stack.chat({"message": "hi", "bot": bot}, headers={"X-Resumable": "1"})
    stream_id = response.headers["X-Stream-Id"]
    whole, events = await read_events(response)
    assert f'"{code}"' in (events[-2].data or "") and events[-1].data == "[DONE]"
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    again, _ = await read_events(await resume(stack, stream_id, 2))
    assert again == whole[whole.index(b"id: 3\n") :]  # the same ending, replayed
    metric = "chatiq_gateway_upstream_errors_total"
    kind = "protocol" if bot == "fault-drop-mid" else "idle_timeout"
    assert await stack.metric(metric, kind=kind) == 1


async def test_a_failure_before_the_first_event_is_a_clean_status_not_a_stream(
    make_stack: StackFactory,
) -> None:
    stack = await resumable_stack(make_stack)
    response = await stack.chat({"message": "hi", "bot": "fault-500"}, headers={"X-Resumable": "1"})
    assert response.status == 502 and "X-Stream-Id" not in response.headers
    assert (await response.json())["error"]["code"] == "UPSTREAM_ERROR"
    assert len(stack.gateway.app[RESUMABLE]) == 0  # nothing was promised, nothing kept


async def test_a_resumable_stream_sends_its_head_and_end_with_events(
    make_stack: StackFactory,
) -> None:
    stack = await resumable_stack(
        make_stack, emulator=EmulatorSettings(ttft_s=0, tokens_per_s=50, reply_tokens=5)
    )
    received, segments = await stream_counting_segments(
        stack, "resumable-segments", b"X-Resumable: 1\r\n"
    )
    assert b"X-Stream-Id: " in received
    events = received.count(b"data: ")
    assert events == bytes(stack.transcript("resumable-segments").sent).count(b"data: ") >= 7
    assert segments <= events, (segments, events)
