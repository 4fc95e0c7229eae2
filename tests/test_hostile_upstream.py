"""A broken or hostile upstream: each case ends in a clean error, and the key stays home."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import ResumeSettings
from gateway.sse import SSEParser
from loadtest.emulator import EmulatorSettings
from tests.helpers import AUTH, CHATIQ_KEY, Stack, StackFactory, data_events
from tests.scripted import EVENTS, ONLY_PINGS, SSE_HEAD, ScriptedFactory, chunk


@pytest.mark.parametrize("stream", [True, False])
async def test_an_html_page_instead_of_events_or_json_is_a_502(stack: Stack, stream: bool) -> None:
    async with await stack.chat({"message": "hi", "bot": "fault-html", "stream": stream}) as r:
        assert r.status == 502
        error = (await r.json())["error"]
    assert error["code"] == "UPSTREAM_ERROR" and "text/html" in error["message"]


async def test_a_redirect_is_never_followed_and_the_key_never_leaves(
    make_stack: StackFactory,
) -> None:
    seen: list[web.Request] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"response": "stolen"})

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", elsewhere)
    thief = TestServer(other)
    await thief.start_server()
    try:
        redirect_to = str(thief.make_url("/api/chat"))
        stack = await make_stack(
            EmulatorSettings(ttft_s=0, tokens_per_s=0, redirect_to=redirect_to)
        )
        for stream in (True, False):
            body = {"message": "hi", "bot": "fault-redirect", "stream": stream}
            async with await stack.chat(body) as r:
                assert r.status == 502
                text = await r.text()
            assert "UPSTREAM_ERROR" in text and CHATIQ_KEY not in text
        assert seen == []  # not one request reached the other host
    finally:
        await thief.close()


async def test_an_event_that_never_ends_is_refused_with_bounded_memory(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(max_event_bytes=256 * 1024)
    async with await stack.chat({"message": "hi", "bot": "fault-endless"}) as r:
        assert r.status == 502
        assert "larger than" in (await r.json())["error"]["message"]


async def test_a_gigantic_json_answer_is_refused(stack: Stack) -> None:
    async with await stack.chat({"message": "hi", "bot": "fault-huge", "stream": False}) as r:
        assert r.status == 502
        assert "over" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("resumable", [False, True])
async def test_comments_and_blank_events_do_not_hold_a_stream_past_its_idle_timeout(
    scripted: ScriptedFactory, resumable: bool
) -> None:
    """Only events with data count as the upstream's activity: at a 0.5 s idle
    timeout, 3 s of pings end the stream with UPSTREAM_TIMEOUT (they held it,
    and its slot, to the end before: up to total_timeout_s)."""
    resume = ResumeSettings(enabled=True) if resumable else None
    stack, _ = await scripted(ONLY_PINGS, resume=resume, idle_timeout_s=0.5)
    headers = {**AUTH, "X-Resumable": "1" if resumable else "0"}
    async with stack.session.post(stack.url, json={"message": "hi"}, headers=headers) as r:
        assert r.status == 200
        events = data_events(await r.read())
    assert events[0] == EVENTS[0].decode()[len("data: ") : -2]
    assert '"UPSTREAM_TIMEOUT"' in events[-2] and events[-1] == "[DONE]"


async def test_the_upstream_s_own_ids_and_retry_never_reach_a_resumable_stream(
    scripted: ScriptedFactory,
) -> None:
    """A resumable stream's ids are the gateway's (a client resumes after them);
    the upstream's ``id:`` lines and its ``retry:`` (a reconnection time for
    browsers) are dropped, whatever their line ends. The data stays as it was."""
    own = [
        b"id: 77\n" + EVENTS[0],
        b"retry: 999999999\r\n" + EVENTS[1].replace(b"\n", b"\r\n"),
        b"id\nretry: 5\n" + EVENTS[2],
        EVENTS[3],
    ]
    answer = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"".join(map(chunk, own))
    stack, _ = await scripted(answer + b"0\r\n\r\n", resume=ResumeSettings(enabled=True))
    headers = {**AUTH, "X-Resumable": "1"}
    async with stack.session.post(stack.url, json={"message": "hi"}, headers=headers) as r:
        assert r.status == 200
        body = await r.read()
    events = [e for e in SSEParser().feed(body) if e.data is not None]
    assert [e.id for e in events] == ["1", "2", "3", "4"]
    assert b"retry" not in body and b"77" not in body
    assert [e.data for e in events] == data_events(b"".join(EVENTS))
