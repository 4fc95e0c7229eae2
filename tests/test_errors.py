"""Every row of the contract's error table, with the ChatIQ error shape."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import aiohttp
import pytest

from gateway.auth.tenants import FailedKeyThrottle
from gateway.chat import ChatRequest, json_object
from gateway.config import AdmissionSettings, ServerSettings
from gateway.errors import InvalidRequest, RateLimited
from loadtest.emulator import EmulatorSettings
from tests.helpers import ACME_KEY, LIMITED_KEY, Stack, StackFactory, gateway_settings

SLOW = EmulatorSettings(ttft_s=0, tokens_per_s=5, reply_tokens=20)  # a stream of ~4 s


async def expect_error(response: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    async with response:
        assert response.status == status, await response.text()
        assert response.content_type == "application/json"
        assert response.headers["X-Request-Id"]
        body: dict[str, Any] = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'["a list"]', "JSON object"),
        (b"{}", "'message' is required"),
        (b'{"message": ""}', "must not be empty"),
        (b'{"message": "   "}', "must not be empty"),
        (b'{"message": 42}', "'message' must be a string"),
        (b'{"message": "a\\u0000b"}', "NUL"),
        (b'{"message": "a\\ud800b"}', "lone surrogate"),
        (b'{"message": "hi", "conversation_id": "c\\u0000"}', "NUL"),
        (b'{"message": "hi", "history": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (
            b'{"message": "hi", "history": [' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"]}",
            "nested too deeply",
        ),
        (b'{"message": "hi", "stream": "yes"}', "'stream'"),
        (b'{"message": "hi", "conversation_id": 7}', "'conversation_id'"),
        (b'{"message": "hi", "history": "no"}', "'history'"),
        (b'{"message": "hi", "history": [1, 2]}', "'history'"),
        (b'{"message": "hi", "private_mode": 1}', "'private_mode'"),
        (b'{"message": "hi", "bot": "../etc"}', "'bot'"),
        (b'{"message": "hi", "bot_slug": "x"}', "unknown field 'bot_slug'"),
        (b'{"message": "hi", "history": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
    ],
)
async def test_400_for_a_bad_body(stack: Stack, payload: bytes, why: str) -> None:
    r = await stack.session.post(
        stack.url,
        data=payload,
        headers={"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/json"},
    )
    body = await expect_error(r, 400, "INVALID_REQUEST")
    assert why in body["error"]["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"message": "hi", "history": [{"n": 123456789012345678901234567890}]}',
        '{"message": "h\u00e9 \u2603", "history": [{"x": [1.5, -0.0, 1e300, 2.5e-320]}]}'.encode(),
        b'{"message": "a\\ud800b"}',  # an escaped lone surrogate
        b'{"message": "a\xed\xa0\x80b"}',  # one in UTF-8's bytes: json.loads passes it
        b'\xef\xbb\xbf{"message": "a BOM"}',
        '{"message": "UTF-16"}'.encode("utf-16-le"),
        '{"message": "UTF-32"}'.encode("utf-32-le"),
        b' \n{"message": "space first"} ',
        b'{"message": "extra"} x',
        b'{"message": "bad \xff"}',
    ],
)
def test_a_body_reads_and_goes_upstream_as_json_loads_and_dumps_would(raw: bytes) -> None:
    """``json_object`` takes a shorter way for the usual body, ``upstream_json`` a
    prebuilt encoder: the result, or the refusal, is json.loads's and json.dumps's
    (but for numbers JSON has no form for, refused with a 400 of their own)."""
    try:
        expected: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        with pytest.raises(InvalidRequest):
            json_object(raw)
        return
    body = json_object(raw)
    assert repr(body) == repr(expected)  # NaN != NaN: compared as text
    chat = ChatRequest(str(body["message"]), "demo", history=body.get("history"))
    assert chat.upstream_json() == json.dumps(chat.upstream_body()).encode()


def test_a_history_json_cannot_hold_fails_as_json_dumps_fails() -> None:
    """A plugin frontend's history is its own: a set, or a list holding itself,
    is refused with json.dumps's own errors."""
    looped: list[Any] = []
    looped.append(looped)
    for history, error in (([{"tags": {"a"}}], TypeError), (looped, ValueError)):
        chat = ChatRequest("hi", "demo", history=history)
        with pytest.raises(error) as ours:
            chat.upstream_json()
        with pytest.raises(error) as theirs:
            json.dumps(chat.upstream_body())
        assert str(ours.value) == str(theirs.value)


async def test_400_for_a_message_that_is_too_long(stack: Stack) -> None:
    limit = stack.settings.server.max_message_chars
    await expect_error(await stack.chat({"message": "x" * (limit + 1)}), 400, "INVALID_REQUEST")


async def test_400_for_too_much_history(stack: Stack) -> None:
    items = [{"role": "user", "content": "x"}] * (stack.settings.server.max_history_items + 1)
    await expect_error(
        await stack.chat({"message": "hi", "history": items}), 400, "INVALID_REQUEST"
    )


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", "Basic abc", "Bearer ", "demo-key"]
)
async def test_401_without_a_known_key(stack: Stack, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    await expect_error(await stack.chat(key=None, headers=headers), 401, "UNAUTHORIZED")


async def test_401_comes_before_anything_about_the_body(stack: Stack) -> None:
    r = await stack.session.post(stack.url, data=b"junk", headers={"Content-Type": "text/plain"})
    await expect_error(r, 401, "UNAUTHORIZED")


async def test_403_for_a_bot_the_tenant_may_not_use(stack: Stack) -> None:
    await expect_error(
        await stack.chat({"message": "hi", "bot": "rich"}, key=LIMITED_KEY), 403, "FORBIDDEN"
    )
    async with await stack.chat({"message": "hi", "bot": "demo"}, key=LIMITED_KEY) as r:
        assert r.status == 200


async def test_413_for_a_body_over_the_limit(stack: Stack) -> None:
    big = {"message": "x" * (stack.settings.server.max_body_bytes + 10)}
    await expect_error(await stack.chat(big), 413, "PAYLOAD_TOO_LARGE")


async def test_413_for_a_chunked_body_over_the_limit(stack: Stack) -> None:
    async def chunks() -> Any:
        yield b'{"message": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    r = await stack.session.post(
        stack.url,
        data=chunks(),
        headers={"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/json"},
    )
    await expect_error(r, 413, "PAYLOAD_TOO_LARGE")


async def test_415_for_a_body_that_is_not_json(stack: Stack) -> None:
    r = await stack.session.post(
        stack.url,
        data=b'{"message": "hi"}',
        headers={"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "text/plain"},
    )
    await expect_error(r, 415, "UNSUPPORTED_MEDIA_TYPE")


async def test_429_when_the_upstream_rate_limits_keeps_its_retry_after(stack: Stack) -> None:
    r = await stack.chat({"message": "hi", "bot": "fault-429"})
    await expect_error(r, 429, "RATE_LIMIT")
    assert r.headers["Retry-After"] == "1"


@pytest.mark.parametrize("bot", ["fault-500", "fault-503", "fault-reset"])
async def test_502_when_the_upstream_fails_before_the_stream(stack: Stack, bot: str) -> None:
    await expect_error(await stack.chat({"message": "hi", "bot": bot}), 502, "UPSTREAM_ERROR")


async def test_502_when_the_upstream_refuses_connections(make_stack: StackFactory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    stack = await make_stack(settings=gateway_settings(f"http://127.0.0.1:{closed_port}/api/chat"))
    await expect_error(await stack.chat(), 502, "UPSTREAM_ERROR")
    # One try and two retries (upstream.max_retries), each counted.
    assert await stack.metric("chatiq_gateway_upstream_errors_total", kind="connect") == 3
    assert await stack.metric("chatiq_gateway_upstream_retries_total", reason="connect") == 2


async def test_503_at_once_when_the_queue_is_full(make_stack: StackFactory) -> None:
    stack = await make_stack(
        SLOW, admission=AdmissionSettings(max_streams=1, max_queue=0, queue_timeout_s=5)
    )
    async with await stack.chat() as busy:
        assert busy.status == 200
        await busy.content.readline()
        r = await stack.chat()
        await expect_error(r, 503, "OVERLOADED")
        assert r.headers["Retry-After"] == "1"
    assert await stack.metric("chatiq_gateway_rejected_total", reason="overload") == 1


async def test_503_after_waiting_too_long_in_the_queue(make_stack: StackFactory) -> None:
    stack = await make_stack(
        SLOW, admission=AdmissionSettings(max_streams=1, max_queue=5, queue_timeout_s=0.2)
    )
    async with await stack.chat() as busy:
        await busy.content.readline()
        await expect_error(await stack.chat(), 503, "OVERLOADED")
    assert await stack.metric("chatiq_gateway_rejected_total", reason="queue_timeout") == 1
    assert await stack.metric("chatiq_gateway_queue_depth") == 0


async def test_a_queued_request_gets_the_freed_slot(make_stack: StackFactory) -> None:
    stack = await make_stack(
        admission=AdmissionSettings(max_streams=1, max_queue=50, queue_timeout_s=10)
    )

    async def one() -> int:
        async with await stack.chat() as r:
            await r.read()
            return r.status

    assert await asyncio.gather(*(one() for _ in range(20))) == [200] * 20


async def test_504_when_the_upstream_sends_nothing_in_time(make_stack: StackFactory) -> None:
    stack = await make_stack(first_byte_timeout_s=0.3)
    await expect_error(
        await stack.chat({"message": "hi", "bot": "fault-stall-first"}), 504, "UPSTREAM_TIMEOUT"
    )
    kind = "first_byte_timeout"
    assert await stack.metric("chatiq_gateway_upstream_errors_total", kind=kind) == 3
    assert await stack.metric("chatiq_gateway_upstream_retries_total", reason=kind) == 2


async def test_unknown_routes_and_methods_answer_in_the_same_error_shape(stack: Stack) -> None:
    await expect_error(await stack.session.get(stack.gateway.make_url("/nope")), 404, "NOT_FOUND")
    await expect_error(await stack.session.get(stack.url), 405, "METHOD_NOT_ALLOWED")


@pytest.mark.parametrize(
    ("path", "frontend"), [("/api/chatbot/history", "chatiq"), ("/api/ui/chat/x/y", "ai-sdk")]
)
async def test_an_unknown_route_under_a_frontend_is_its_404_naming_the_route_and_logged(
    stack: Stack, path: str, frontend: str
) -> None:
    body = await expect_error(await stack.session.delete(stack.gateway.make_url(path)), 404,
                              "NOT_FOUND")  # fmt: skip
    assert f"DELETE {path}" in body["error"]["message"]
    lines = [line for line in stack.log_lines() if line["event"] == "unknown_route"]
    assert [(line["method"], line["path"], line["frontend"]) for line in lines] == [
        ("DELETE", path, frontend)
    ]
    outside = await stack.session.get(stack.gateway.make_url("/apix"))  # not under /api
    await expect_error(outside, 404, "NOT_FOUND")
    assert len([line for line in stack.log_lines() if line["event"] == "unknown_route"]) == 1


async def test_429_for_an_address_that_keeps_sending_unknown_keys(make_stack: StackFactory) -> None:
    stack = await make_stack(server=ServerSettings(max_auth_failures_per_minute=5))
    for _ in range(5):
        async with await stack.chat(key="guess") as r:
            assert r.status == 401
    async with await stack.chat(key="guess") as r:
        assert r.status == 429
        assert 0 < int(r.headers["Retry-After"]) <= 60
        assert (await r.json())["error"]["code"] == "RATE_LIMIT"
    async with await stack.chat() as r:  # even a good key, from that address, for now
        assert r.status == 429
    assert await stack.metric("chatiq_gateway_rejected_total", reason="rate_limit") == 2
    # Another address is not affected.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with (
        aiohttp.ClientSession(connector=connector) as other,
        other.post(
            stack.url, json={"message": "hi"}, headers={"Authorization": f"Bearer {ACME_KEY}"}
        ) as r,
    ):
        assert r.status == 200
        await r.read()


def test_the_failed_key_throttle_forgets_after_a_minute_and_stays_bounded() -> None:
    now = [0.0]
    throttle = FailedKeyThrottle(3, max_addresses=100, clock=lambda: now[0])
    for _ in range(3):
        throttle.check("10.0.0.1")
        throttle.failed("10.0.0.1")
    with pytest.raises(RateLimited):
        throttle.check("10.0.0.1")
    now[0] = 60.5
    throttle.check("10.0.0.1")  # a new minute
    for i in range(10_000):
        throttle.failed(f"10.1.{i // 256}.{i % 256}")
    assert len(throttle._seen) == 100
    FailedKeyThrottle(0).failed("x")  # 0: off
