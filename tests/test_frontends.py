"""What every chat route does the same way, whatever its frontend: quotas and
overload with Retry-After, cancellation when the client hangs up, drain,
backpressure on a slow client, and (after each test) nothing left behind.
One test each, parametrized over the frontends, each speaking its own format."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.config import AdmissionSettings
from loadtest.emulator import LIVE, TRANSCRIPTS, EmulatorSettings
from tests.conftest import assert_all_released
from tests.helpers import (
    ACME_KEY,
    AUTH,
    TINY_KEY,
    GatewayProcess,
    Stack,
    StackFactory,
    dechunk,
    eventually,
    read_slowly,
)
from tests.routes import ROUTES, events_of

FRONTENDS = pytest.mark.parametrize("frontend", list(ROUTES))
WITH_HISTORY = pytest.mark.parametrize("frontend", [f for f in ROUTES if f != "mcp"])
SLOW = EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=200)


async def post(stack: Stack, frontend: str, bot: str = "demo", key: str = ACME_KEY) -> Any:
    route = ROUTES[frontend]
    return await stack.session.post(
        stack.gateway.make_url(route.path),
        json=route.body(bot, "hi"),
        headers={"Authorization": f"Bearer {key}", **(route.headers or {})},
    )


NO_TEXT = {
    "openai": {
        "model": "demo",
        "messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}],
    },
    "ai-sdk": {
        "messages": [
            {"role": "user", "parts": [{"type": "file", "url": "x:y", "mediaType": "image/png"}]}
        ]
    },
}


@pytest.mark.parametrize("frontend", list(NO_TEXT))
async def test_a_last_message_without_text_is_a_400_that_says_so(
    stack: Stack, frontend: str
) -> None:
    async with await stack.session.post(
        stack.gateway.make_url(ROUTES[frontend].path),
        json=NO_TEXT[frontend],
        headers={"Authorization": f"Bearer {ACME_KEY}"},
    ) as r:
        assert r.status == 400
        message = (await r.json())["error"]["message"]
    assert "has no text to send" in message and "messages[-1]" in message


def with_extra(frontend: str, value: bytes) -> bytes:
    """The frontend's usual body with ``"extra": <value>`` in it, as raw JSON."""
    body = json.dumps(ROUTES[frontend].body("demo", "hi")).encode()
    return body[:-1] + b', "extra": ' + value + b"}"


@FRONTENDS
@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"1" * 5000, "more than 4300 digits"),  # Python's int limit raised ValueError: a 500
        (b"NaN", "NaN, which is not a JSON number"),  # json.loads reads it; upstream, not JSON
        (b"-Infinity", "-Infinity, which is not a JSON number"),
        (b"1e400", "too large for a JSON float"),  # read as infinity
    ],
)
async def test_a_number_json_has_no_form_for_is_a_400_on_every_frontend(
    stack: Stack, frontend: str, value: bytes, why: str
) -> None:
    async with stack.session.post(
        stack.gateway.make_url(ROUTES[frontend].path),
        data=with_extra(frontend, value),
        headers={"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/json"},
    ) as r:
        assert r.status == 400, await r.text()
        message = (await r.json())["error"]["message"]
    assert why in message
    assert not [line for line in stack.log_lines() if line.get("event") == "unhandled_error"]


def with_earlier(frontend: str, text: str) -> tuple[dict[str, Any], str]:
    """The frontend's body with ``text`` in a message before the last, and the
    name its error gives that message."""
    if frontend == "chatiq":
        return {"message": "hi", "history": [{"role": "user", "content": text}]}, "history[0]"
    if frontend == "openai":
        messages = [{"role": "user", "content": c} for c in (text, "hi")]
        return {"model": "demo", "messages": messages}, "messages[0]"
    if frontend == "responses":
        items = [{"role": "user", "content": c} for c in (text, "hi")]
        return {"model": "demo", "input": items}, "input[0]"
    ui = [{"id": str(i), "role": "user", "parts": [{"type": "text", "text": t}]}
          for i, t in enumerate((text, "hi"))]  # fmt: skip
    return {"messages": ui}, "messages[0]"


@WITH_HISTORY
@pytest.mark.parametrize(
    ("text", "why"),
    [("a\u0000b", "must not contain NUL characters"), ("a\ud800b", "a lone surrogate")],
)
async def test_an_earlier_message_is_refused_as_the_last_would_be(
    stack: Stack, frontend: str, text: str, why: str
) -> None:
    """NUL and lone surrogates were refused only in the last message; in earlier
    ones (and native history) they went upstream."""
    body, name = with_earlier(frontend, text)
    async with stack.session.post(
        stack.gateway.make_url(ROUTES[frontend].path), json=body, headers=AUTH
    ) as r:
        assert r.status == 400, await r.text()
        message = (await r.json())["error"]["message"]
    assert f"'{name}'" in message and why in message
    assert not stack.emulator.app[TRANSCRIPTS]  # nothing went upstream


async def test_an_ai_sdk_text_part_without_text_is_a_400(stack: Stack) -> None:
    body = {"messages": [{"id": "u", "role": "user", "parts": [{"type": "text"}]}]}
    async with stack.session.post(
        stack.gateway.make_url("/api/ui/chat"), json=body, headers=AUTH
    ) as r:
        assert r.status == 400, await r.text()  # a KeyError, a 500, before
        message = (await r.json())["error"]["message"]
    assert "a text part needs a 'text' string" in message


@FRONTENDS
async def test_a_tenant_over_its_rate_gets_429_with_retry_after(
    stack: Stack, frontend: str
) -> None:
    for _ in range(3):
        async with await post(stack, frontend, key=TINY_KEY) as r:
            assert r.status == 200
            assert ROUTES[frontend].ended_whole(events_of(await r.read()))
    async with await post(stack, frontend, key=TINY_KEY) as r:
        status, retry_after = ROUTES[frontend].refusal(r.status, r.headers, await r.read())
    assert status == 429 and retry_after is not None and int(retry_after) >= 1
    assert await stack.metric("chatiq_gateway_rejected_total", reason="rate_limit") == 1


@FRONTENDS
async def test_past_capacity_a_request_gets_503_with_retry_after(
    make_stack: StackFactory, frontend: str
) -> None:
    stack = await make_stack(
        SLOW, admission=AdmissionSettings(max_streams=1, max_queue=0, queue_timeout_s=1)
    )
    first = await post(stack, frontend)
    await first.content.readline()  # streaming: it holds the one slot
    async with await post(stack, frontend) as r:
        status, retry_after = ROUTES[frontend].refusal(r.status, r.headers, await r.read())
    assert (status, retry_after) == (503, "1")
    first.close()


@FRONTENDS
async def test_a_hang_up_cancels_the_upstream_call_within_100_ms(
    make_stack: StackFactory, frontend: str
) -> None:
    stack = await make_stack(SLOW)
    r = await post(stack, frontend)
    await r.content.readline()
    assert stack.emulator.app[LIVE].handlers == 1
    r.close()
    took = await eventually(lambda: stack.emulator.app[LIVE].handlers == 0)
    assert took < 0.1, f"the upstream call lived {took * 1000:.0f} ms after the hang-up"
    assert await stack.metric("chatiq_gateway_client_disconnects_total", tenant="acme") == 1
    await assert_all_released(stack)


@FRONTENDS
async def test_a_slow_reader_pauses_the_upstream_and_the_stream_still_ends_whole(
    make_stack: StackFactory, frontend: str
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=60_000),  # ~3 MB
        client_write_timeout_s=10.0,
        total_timeout_s=60.0,
    )
    route = ROUTES[frontend]
    received = await read_slowly(stack, route.path, json.dumps(route.body("demo", "hi")).encode())
    assert await stack.metric("chatiq_gateway_slow_client_pauses_total", tenant="acme") > 0
    head, _, framed = received.partition(b"\r\n\r\n")
    events = events_of(dechunk(framed))
    assert head.startswith(b"HTTP/1.1 200") and len(events) > 20_000
    assert route.ended_whole(events) and all(route.error_code(e) is None for e in events[:-1])


@pytest.mark.process
@FRONTENDS
async def test_drain_ends_live_streams_in_the_frontend_s_own_error_shape(
    make_stack: StackFactory,
    gateway_process: Callable[..., Awaitable[GatewayProcess]],
    frontend: str,
) -> None:
    stack = await make_stack(SLOW, record=False)
    gw = await gateway_process(stack.emulator, server={"shutdown_grace_s": 0.5})
    route = ROUTES[frontend]
    async with stack.session.post(
        f"http://127.0.0.1:{gw.port}{route.path}",
        json=route.body("demo", "hi"),
        headers={"Authorization": f"Bearer {ACME_KEY}", **(route.headers or {})},
    ) as r:
        assert r.status == 200
        await r.content.readline()
        gw.process.send_signal(signal.SIGTERM)
        events = events_of(await r.read())
    assert route.ending_error(events) == "DRAINING"
    assert await asyncio.to_thread(gw.process.wait, 30) == 0
