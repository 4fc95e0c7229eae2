"""Hostile clients against a real gateway process: slowloris, oversized and ambiguous requests."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable

import pytest

from loadtest.emulator import TRANSCRIPTS, EmulatorSettings
from tests.helpers import ACME_KEY, GatewayProcess, StackFactory, read_stream

pytestmark = pytest.mark.process

GatewayFactory = Callable[..., Awaitable[GatewayProcess]]


async def raw_exchange(port: int, request: bytes, read_timeout_s: float = 10) -> bytes:
    """Send ``request`` as is; return everything the gateway answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), read_timeout_s)
    finally:
        writer.close()


async def test_headers_sent_a_byte_at_a_time_are_cut_off_with_a_408(
    make_stack: StackFactory, gateway_process: GatewayFactory
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=5))
    gw = await gateway_process(stack.emulator, server={"header_timeout_s": 1.0})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    started = time.monotonic()
    head = b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100

    async def trickle() -> None:
        for byte in head:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        # Meanwhile a normal client is served as usual.
        async with stack.session.post(
            gw.url, json={"message": "hi"}, headers={"Authorization": f"Bearer {ACME_KEY}"}
        ) as r:
            _, events = await read_stream(r)
        assert events[-1] == "[DONE]"
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        trickling.cancel()
        writer.close()
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "REQUEST_TIMEOUT"
    assert 0.9 < took < 3.0
    assert await gw.metric(stack.session, "chatiq_gateway_rejected_total") == 1


async def test_a_request_whose_headers_arrive_in_time_is_not_cut(
    make_stack: StackFactory, gateway_process: GatewayFactory
) -> None:
    # The deadline covers the head only: a stream may last far longer.
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=10, reply_tokens=15))
    gw = await gateway_process(stack.emulator, server={"header_timeout_s": 0.5})
    async with stack.session.post(
        gw.url, json={"message": "hi"}, headers={"Authorization": f"Bearer {ACME_KEY}"}
    ) as r:
        assert r.status == 200
        _, events = await read_stream(r)
    assert events[-1] == "[DONE]"


async def test_oversized_and_ambiguous_requests_are_refused(
    make_stack: StackFactory, gateway_process: GatewayFactory
) -> None:
    stack = await make_stack()
    gw = await gateway_process(stack.emulator)
    auth = f"Authorization: Bearer {ACME_KEY}\r\n".encode()
    body = b'{"message": "hi"}'
    cases = {
        "request line": b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "header": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        "both lengths": b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: 17\r\n"
        + b"Transfer-Encoding: chunked\r\n\r\n11\r\n" + body + b"\r\n0\r\n\r\n",
        "two lengths": b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\n" + auth
        + b"Content-Type: application/json\r\nContent-Length: 17\r\nContent-Length: 5\r\n\r\n"
        + body,
    }  # fmt: skip
    for case, request in cases.items():
        answer = await raw_exchange(gw.port, request)
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 413, 431), (case, answer[:200])
        assert b"\r\nServer: chatiq-gateway\r\n" in answer, (case, answer[:200])  # no versions
    # The process is unharmed.
    async with stack.session.get(f"http://127.0.0.1:{gw.port}/healthz") as r:
        assert r.status == 200
    # Each refusal is one JSON line of the log, with none of the request's bytes
    # (aiohttp would print a traceback quoting them).
    lines = [json.loads(line) for line in gw.log().splitlines()]  # every line is JSON
    refused = [line for line in lines if line["event"] == "bad_request"]
    assert len(refused) == len(cases), refused
    assert {line["status"] for line in refused} <= {400, 413, 431}
    assert all(line["level"] == "info" and line["error"] for line in refused)
    assert "Transfer-Encoding" in " ".join(line["error"] for line in refused)
    assert "aaaa" not in gw.log() and ACME_KEY not in gw.log()


async def test_a_slow_second_head_on_a_kept_alive_connection_is_cut_too(
    make_stack: StackFactory, gateway_process: GatewayFactory
) -> None:
    stack = await make_stack()
    gw = await gateway_process(stack.emulator, server={"header_timeout_s": 1.0})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(re.search(rb"Content-Length: (\d+)", head, re.I)[1])  # type: ignore[index]
        await reader.readexactly(length)
        # The connection is kept alive; now the next head comes a byte at a time.
        started = time.monotonic()
        answer = b""
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
            if reader.at_eof() or (answer := await _available(reader)):
                break
        answer += await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.9 < time.monotonic() - started < 3.0


async def _available(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(4096), 0.001)
    except TimeoutError:
        return b""


def _chat_request(message: str, *, close: bool = False) -> tuple[bytes, bytes]:
    """A raw chat request's head and body."""
    body = json.dumps({"message": message}).encode()
    head = (
        b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {ACME_KEY}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    return head, body


async def test_pipelined_requests_are_answered_whole_and_in_order(
    make_stack: StackFactory, gateway_process: GatewayFactory
) -> None:
    """Three requests in one write: three whole streams, one after another."""
    stack = await make_stack(EmulatorSettings(ttft_s=0.05, tokens_per_s=100, reply_tokens=3))
    gw = await gateway_process(stack.emulator)
    requests = [_chat_request(m, close=m == "three") for m in ("one", "two", "three")]
    answer = await raw_exchange(gw.port, b"".join(head + body for head, body in requests))
    responses = answer.split(b"HTTP/1.1 ")[1:]
    assert len(responses) == 3, answer
    for response in responses:
        assert response.startswith(b"200 "), response[:200]
        assert response.count(b"data: [DONE]") == 1, response  # each ends before the next starts
        assert response.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"), response[-100:]
    seen = [t.body["message"] for t in stack.emulator.app[TRANSCRIPTS].values()]
    assert seen == ["one", "two", "three"]


async def test_a_body_that_arrives_after_its_head_in_parts_is_read_whole(
    make_stack: StackFactory, gateway_process: GatewayFactory
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=3))
    gw = await gateway_process(stack.emulator)
    head, body = _chat_request("a body in two parts", close=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        for part in (head, body[:7], body[7:]):
            writer.write(part)
            await asyncio.sleep(0.1)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert answer.count(b"data: [DONE]") == 1
    seen = [t.body["message"] for t in stack.emulator.app[TRANSCRIPTS].values()]
    assert seen == ["a body in two parts"]
