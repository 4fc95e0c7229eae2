"""Raw HTTP/1.1 upstreams that tests script byte for byte: real sockets on
loopback, answers as the test writes them, closes when the test says."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.config import RedisSettings, ResumeSettings
from tests.helpers import Stack, StackFactory, gateway_settings

EVENTS = (
    b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n',
    b'data: {"conversationId":"c-1"}\n\n',
    b"data: [DONE]\n\n",
)
BODY = b"".join(EVENTS)
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
JSON_BODY = b'{"response": "Hello", "conversationId": "c-1"}'


def chunked(head: bytes, *parts: bytes) -> bytes:
    """A chunked response: one chunk a part, then the last chunk."""
    framed = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts)
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"


def chunk(part: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(part), part)


def json_answer(body: bytes = JSON_BODY, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n".encode()
        + extra
        + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )


SSE_ANSWER = chunked(SSE_HEAD, *EVENTS)
MULTIBYTE_TEXT = "Grüße, 日本語 and 🙂 — naïve"


def multibyte_pieces() -> list[bytes]:
    """MULTIBYTE_TEXT streamed (conversation c-9), cut every 7 bytes, inside the
    multi-byte characters too; each piece a read of its own."""
    events = [
        b'data: {"choices":[{"delta":{"content":' + json.dumps(t).encode() + b"}}]}\n\n"
        for t in (MULTIBYTE_TEXT[:9], MULTIBYTE_TEXT[9:])
    ]
    body = b"".join(events) + b'data: {"conversationId":"c-9"}\n\ndata: [DONE]\n\n'
    head, framed = chunked(SSE_HEAD, body).split(b"\r\n\r\n", 1)
    return [head + b"\r\n\r\n"] + [framed[i : i + 7] for i in range(0, len(framed), 7)]


# The first event, then only comments for 3 s (60, a read each), then the end:
# an upstream whose keep-alive pings hide that it stopped answering.
ONLY_PINGS = [
    SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(EVENTS[0]),
    *[chunk(b": ping\n\n")] * 30,
    *[chunk(b"\n\n")] * 30,  # blank events too
    chunk(EVENTS[-1]) + b"0\r\n\r\n",
]


def ok_answer(request: ScriptedRequest) -> bytes:
    """What a healthy upstream answers: events, or JSON when not streaming."""
    return SSE_ANSWER if request.stream else json_answer()


@dataclass
class ScriptedRequest:
    number: int  # 1-based, over the server's life
    on_connection: int  # 1-based, on its connection
    raw: bytes

    @property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.raw.partition(b"\r\n\r\n")[2])
        return parsed

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream", True))

    @property
    def bot(self) -> str:
        return str(self.body["bot_slug"])

    @property
    def request_id(self) -> str:
        found = re.search(rb"(?i)\r\nx-request-id: *([^\r]+)", self.raw)
        return found.group(1).decode() if found else ""


# An answer: bytes; several parts, written as separate reads; or None: close
# the connection without answering.
Answer = bytes | list[bytes] | None
AnswerFunction = Callable[[ScriptedRequest], Answer | Awaitable[Answer]]


class ScriptedUpstream:
    """A bare HTTP/1.1 server. Each request gets ``answer`` (or what the
    function makes of it); then the connection is closed (``close_after``),
    closed once idle for ``idle_timeout_s``, or kept open."""

    def __init__(
        self,
        answer: bytes | AnswerFunction,
        close_after: bool = False,
        tls: ssl.SSLContext | None = None,
        idle_timeout_s: float | None = None,
    ) -> None:
        self._answer = answer
        self._tls = tls
        self._close_after = close_after
        self._idle_timeout_s = idle_timeout_s
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        on_connection = 0
        try:
            while True:
                async with asyncio.timeout(self._idle_timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(length.group(1)) if length else 0)
                self.requests.append(head + body)
                on_connection += 1
                answer: Answer
                if callable(self._answer):
                    request = ScriptedRequest(len(self.requests), on_connection, head + body)
                    made = self._answer(request)
                    answer = await made if isinstance(made, Awaitable) else made
                else:
                    answer = self._answer
                if answer is None:
                    break
                for i, part in enumerate([answer] if isinstance(answer, bytes) else answer):
                    if i:
                        await asyncio.sleep(0.05)  # a read of its own
                    writer.write(part)
                    await writer.drain()
                if self._close_after:
                    break
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        # A backlog as a real server's (nginx: 511), not asyncio's 100: a burst of
        # hundreds of connects must not see SYNs dropped and retried a second later.
        server = await asyncio.start_server(self._serve, host, port, ssl=self._tls, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        return server


ScriptedFactory = Callable[..., Awaitable[tuple[Stack, ScriptedUpstream]]]


@pytest.fixture
async def scripted(make_stack: StackFactory) -> AsyncIterator[ScriptedFactory]:
    """A scripted upstream and a gateway in front of it (no retries unless asked)."""
    servers: list[asyncio.Server] = []

    async def start(
        answer: bytes | AnswerFunction,
        close_after: bool = False,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        server_idle_s: float | None = None,  # the server closes idle connections after this
        resume: ResumeSettings | None = None,
        redis: RedisSettings | None = None,
        **settings: Any,
    ) -> tuple[Stack, ScriptedUpstream]:
        upstream = ScriptedUpstream(answer, close_after, tls, server_idle_s)
        servers.append(await upstream.start())
        scheme = "https" if tls else "http"
        url = f"{scheme}://{host}:{upstream.port}/api/chat"
        settings.setdefault("max_retries", 0)
        stack = await make_stack(
            settings=gateway_settings(url, **settings), resume=resume, redis=redis
        )
        return stack, upstream

    yield start
    for server in servers:
        server.close()
