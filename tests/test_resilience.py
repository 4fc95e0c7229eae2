"""Retries, tenant quotas, keep-alive and slow clients."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from gateway.config import AdmissionSettings
from gateway.quotas.admission import ADMISSION
from loadtest.emulator import ATTEMPTS, LIVE, EmulatorSettings
from tests.helpers import TINY_KEY, Stack, StackFactory, eventually, gateway_settings, read_stream


async def attempts(stack: Stack, request_id: str) -> int:
    seen = stack.emulator.app[ATTEMPTS]
    return seen.get(request_id, 0)


async def chat_status(stack: Stack, bot: str, request_id: str, **body: object) -> int:
    async with await stack.chat(
        {"message": "hi", "bot": bot, **body}, headers={"X-Request-Id": request_id}
    ) as r:
        await r.read()
        return r.status


# --- retries -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("bot", "reason"),
    [
        ("fault-503-once", "http_503"),
        ("fault-429-once", "http_429"),
        ("fault-reset-once", "connect"),
        ("fault-stall-first-once", "first_byte_timeout"),
    ],
)
@pytest.mark.parametrize("stream", [True, False])
async def test_a_failure_before_the_first_byte_is_retried_and_recovers(
    make_stack: StackFactory, bot: str, reason: str, stream: bool
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0), first_byte_timeout_s=0.3)
    async with await stack.chat(
        {"message": "hi", "bot": bot, "stream": stream}, headers={"X-Request-Id": "r1"}
    ) as r:
        assert r.status == 200
        body = await r.read()
    assert body.endswith(b"data: [DONE]\n\n" if stream else b"}")
    assert await attempts(stack, "r1") == 2
    assert await stack.metric("chatiq_gateway_upstream_retries_total", reason=reason) == 1


async def test_retries_stop_at_max_retries(stack: Stack) -> None:
    assert await chat_status(stack, "fault-503", "r1") == 502
    assert await attempts(stack, "r1") == 1 + stack.settings.upstream.max_retries


@pytest.mark.parametrize(
    "bot", ["fault-500", "fault-stall-mid", "fault-drop-mid", "fault-error-mid"]
)
async def test_no_retry_for_a_500_or_once_bytes_reached_the_client(stack: Stack, bot: str) -> None:
    await chat_status(stack, bot, "r1")
    assert await attempts(stack, "r1") == 1
    assert await stack.metric("chatiq_gateway_upstream_retries_total", reason="http_500") == 0


async def test_retry_after_is_honoured_up_to_its_cap(make_stack: StackFactory) -> None:
    stack = await make_stack(retry_after_cap_s=0.3)
    started = time.monotonic()
    assert await chat_status(stack, "fault-429", "r1") == 429
    # Two retries, each waiting the upstream's Retry-After (1 s) capped at 0.3 s.
    assert time.monotonic() - started >= 0.6
    assert await attempts(stack, "r1") == 3


async def test_the_retry_budget_bounds_the_total_wait(make_stack: StackFactory) -> None:
    stack = await make_stack(retry_after_cap_s=0.3, retry_budget_s=0.1, max_retries=5)
    assert await chat_status(stack, "fault-429", "r1") == 429
    assert await attempts(stack, "r1") == 1  # a 0.3 s wait does not fit a 0.1 s budget


# --- tenant quotas -----------------------------------------------------------


async def test_a_tenant_over_its_rate_gets_429_with_retry_after(stack: Stack) -> None:
    statuses = []
    for _ in range(4):  # tenant "tiny" may make 3 requests a minute
        async with await stack.chat(key=TINY_KEY) as r:
            await r.read()
            statuses.append(r.status)
            retry_after = r.headers.get("Retry-After")
    assert statuses == [200, 200, 200, 429]
    assert retry_after is not None and 1 <= int(retry_after) <= 20
    assert await stack.metric("chatiq_gateway_rejected_total", reason="rate_limit") == 1


async def test_a_tenant_over_its_concurrency_gets_429(make_stack: StackFactory) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=5, reply_tokens=20))
    async with await stack.chat(key=TINY_KEY) as first:  # tenant "tiny" may hold 1 stream
        await first.content.readline()
        async with await stack.chat(key=TINY_KEY) as second:
            assert second.status == 429
            assert (await second.json())["error"]["code"] == "RATE_LIMIT"
            assert second.headers["Retry-After"] == "1"
        async with await stack.chat() as other_tenant:
            assert other_tenant.status == 200
    assert await stack.metric("chatiq_gateway_rejected_total", reason="tenant_concurrency") == 1


# --- keep-alive and slow clients ---------------------------------------------


async def test_keepalive_pings_flow_while_the_upstream_is_quiet(make_stack: StackFactory) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=0, stall_s=0.6),
        idle_timeout_s=5.0,
        keepalive_s=0.1,
    )
    async with await stack.chat({"message": "hi", "bot": "fault-stall-mid"}) as r:
        body, events = await read_stream(r)
    assert body.count(b": ping\n\n") >= 3
    assert events[-1] == "[DONE]" and "conversationId" in events[-2]


async def test_a_client_that_reads_nothing_is_dropped_and_its_upstream_closed(
    make_stack: StackFactory,
) -> None:
    # ~10 MB of reply: more than the kernel's socket buffers can hide (up to 4 MB
    # on the gateway's side; the client pins its own to a few kB).
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=200_000),
        client_write_timeout_s=0.3,
    )
    _, writer = await open_raw_chat(stack)
    await eventually(lambda: stack.gateway.app[ADMISSION].active == 1)
    await eventually(lambda: any(x.get("route") == "/api/chatbot" for x in stack.log_lines()))
    (line,) = [x for x in stack.log_lines() if x.get("route") == "/api/chatbot"]
    assert line["outcome"] == "slow_client"
    assert 0 < line["bytes"] < 8_000_000
    assert stack.gateway.app[ADMISSION].active == 0
    await eventually(lambda: stack.emulator.app[LIVE].handlers == 0)
    assert await stack.metric("chatiq_gateway_active_streams", tenant="acme") == 0
    writer.close()


async def open_raw_chat(stack: Stack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A chat request over a bare socket whose answer is never read."""
    from tests.helpers import ACME_KEY

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuning
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (stack.gateway.host, stack.gateway.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = b'{"message": "hi"}'
    writer.write(
        b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {ACME_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    return reader, writer


async def test_the_queue_hands_slots_over_in_order_under_a_burst(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=50, reply_tokens=10),
        admission=AdmissionSettings(max_streams=5, max_queue=5, queue_timeout_s=10),
    )

    async def one() -> tuple[int, bytes]:
        async with await stack.chat() as r:
            return r.status, await r.read()

    results = await asyncio.gather(*(one() for _ in range(30)))
    ok = [body for status, body in results if status == 200]
    refused = [status for status, _ in results if status != 200]
    assert len(ok) == 10 and refused == [503] * 20
    assert all(body.endswith(b"data: [DONE]\n\n") for body in ok)
    assert await stack.metric("chatiq_gateway_rejected_total", reason="overload") == 20
    assert await stack.metric("chatiq_gateway_queue_depth") == 0


async def test_an_upstream_400_is_passed_on_and_never_retried(stack: Stack) -> None:
    async with await stack.chat(
        {"message": "hi", "bot": "fault-400"}, headers={"X-Request-Id": "r1"}
    ) as r:
        assert r.status == 400
        assert await r.json() == {
            "error": {"code": "INVALID_REQUEST", "message": "this bot refuses every message"}
        }
    assert await attempts(stack, "r1") == 1


async def test_a_connect_timeout_is_retried_then_answers_504(make_stack: StackFactory) -> None:
    # A listener that never accepts, its backlog already full: the kernel
    # drops further SYNs, so connecting hangs, as to a host that is down.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    try:
        host, port = listener.getsockname()
        stack = await make_stack(
            settings=gateway_settings(
                f"http://{host}:{port}/api/chat", connect_timeout_s=0.2, first_byte_timeout_s=5
            )
        )
        started = time.monotonic()
        async with await stack.chat() as r:
            assert r.status == 504
            assert (await r.json())["error"]["code"] == "UPSTREAM_TIMEOUT"
        assert time.monotonic() - started < 4  # the connect timeout, not the first-byte one
        assert await stack.metric("chatiq_gateway_upstream_errors_total", kind="connect") == 3
        assert await stack.metric("chatiq_gateway_upstream_retries_total", reason="connect") == 2
    finally:
        for s in (listener, *fillers):
            s.close()
