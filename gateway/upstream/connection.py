"""A minimal HTTP/1.1 client for the upstream: send a request, await the
response head, then have the body pushed to a sink as it arrives.

Why not aiohttp's client: it hands a body over through a ``StreamReader``, so
every relayed event costs a task wake-up and several coroutine layers. Here
the body reaches its sink inside ``buffer_updated`` (parsed by httptools, the C
parser uvicorn uses), and a relay can write it to the client at once.
Connections are kept alive and pooled, but never past ``upstream.pool_idle_s``
idle (shorter than common servers' keep-alive, and shorter still when the
server's ``Keep-Alive: timeout`` says so) nor ``connection_max_age_s`` old (so
a DNS change takes effect). Interim 1xx answers are skipped; a response head
larger than ``max_head_bytes`` is refused. An egress proxy is used as
``gateway.config.proxies`` decides. Nothing here follows a redirect or asks for
compression.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

READ_BYTES = 32 * 1024  # the most one read from the upstream brings


_KEEP_ALIVE_TIMEOUT = re.compile(r"(?i)\btimeout\s*=\s*(\d+)")


class WireError(Exception):
    """The connection failed. ``answered``: some of the response had arrived."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


class WireProtocolError(WireError):
    """The server's bytes are not valid HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated header keeps its last value

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class BodySink(Protocol):
    def body(self, data: bytes) -> None: ...

    def end(self, error: WireError | None) -> None:
        """The body is complete (``None``) or broken off."""


class Owner(Protocol):
    """What a connection needs of the pool that made it (``pool.Pool``)."""

    read_buffer: memoryview  # one buffer, shared by every connection's reads
    max_head_bytes: int
    loop: asyncio.AbstractEventLoop

    def put(self, conn: Connection) -> None:
        """The connection is idle again: keep it for the next request."""

    def lost(self, conn: Connection) -> None:
        """The connection closed."""


class Connection(asyncio.BufferedProtocol):
    """One upstream connection; one request at a time.

    A buffered protocol: the loop reads into the pool's one read buffer
    (``READ_BYTES``), which is parsed at once, so what one read brings (and a
    stalled client can hold) is bounded by that size, not by the loop's own
    read size (256 KiB), and idle connections hold no buffer at all.
    """

    # No __dict__: one of these per live stream.
    __slots__ = (
        "_answered",
        "_close_delimited",
        "_early",
        "_ended",
        "_head",
        "_head_bytes",
        "_head_seen",
        "_headers",
        "_in_use",
        "_parser",
        "_pending",
        "_pool",
        "_result",
        "_sink",
        "complete",
        "created",
        "idle_limit_s",
        "idle_since",
        "reused",
        "transport",
    )

    def __init__(self, pool: Owner) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.created = pool.loop.time()
        self.reused = False  # taken from the pool's idle connections
        self.idle_limit_s = math.inf  # the server's Keep-Alive timeout, less a second
        self._head_bytes = 0  # bytes read while the response head is not complete
        self._parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        # Set while the response head is awaited; the head itself is not kept
        # (a held stream keeps nothing of it).
        self._head: asyncio.Future[Head] | None = None
        self._head_seen = False  # the current response's (final) head arrived
        self._in_use = False  # a request was sent; its response has not ended
        self._sink: BodySink | None = None
        self._early: list[bytes] = []  # body that came before a sink was attached
        self._pending: list[bytes] = []  # body parsed from the read being parsed
        self._answered = False  # a byte of the current response arrived
        self._close_delimited = False  # the body ends when the connection does
        self._result: WireError | None = None
        self._ended = False  # the current response ended, cleanly or not
        self.complete = False  # the current response ended as HTTP says it should
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._pool.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self._pool.read_buffer[:nbytes]
        if not self._in_use:  # bytes nobody asked for, on an idle connection
            if self.transport is not None:
                self.transport.close()
            return
        self._answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._flush_body()  # what came before the error, as it would have
            self._broken(f"invalid HTTP from the server ({e})")
            return
        pending = self._pending
        if pending:  # _flush_body, inline: this runs for every read
            body = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            if self._sink is not None:
                self._sink.body(body)
            else:
                self._early.append(body)
        if self._in_use and not self._head_seen:  # the head is incomplete: bound it
            self._head_bytes += len(data)
            if self._head_bytes > self._pool.max_head_bytes:
                self._broken(f"a response head over {self._pool.max_head_bytes} bytes")

    def _broken(self, what: str) -> None:
        self._fail(WireProtocolError(what, answered=True))
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._pool.lost(self)
        if self._close_delimited and self._head_seen:
            self._finish(None)
        else:
            self._fail(WireError("the connection closed", answered=self._answered))

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # interim (100 Continue, 103 Early Hints): the real answer follows
        headers = self._headers
        keep_alive = _KEEP_ALIVE_TIMEOUT.search(headers.get("keep-alive", ""))
        if keep_alive:  # the server closes idle connections after that: stop a second early
            self.idle_limit_s = int(keep_alive.group(1)) - 1.0
        self._close_delimited = (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )
        self._head_seen = True
        self._headers = {}
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_result(Head(status, headers))

    def on_body(self, body: bytes) -> None:
        # Kept until the read is parsed: its chunks reach the sink as one piece
        # (and a relay writes the events that arrived together in one write).
        self._pending.append(body)

    def _flush_body(self) -> None:
        pending = self._pending
        if not pending:
            return
        body = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if self._sink is not None:
            self._sink.body(body)
        else:
            self._early.append(body)

    def on_message_complete(self) -> None:
        if not self._head_seen:
            return  # an interim answer ended
        self._close_delimited = False
        self.complete = self._parser.should_keep_alive()
        self._finish(None)

    # requests

    async def request(self, head: bytes, body: bytes) -> Head:
        """Send a request; its response head once it arrives."""
        assert self.transport is not None
        self._in_use = True
        answer: asyncio.Future[Head] = self._pool.loop.create_future()
        self._head = answer
        self.transport.write(head + body)
        return await answer

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._pool.loop

    def attach(self, sink: BodySink) -> None:
        """Push the body to ``sink``: what came already, at once, then as it comes."""
        self._sink = sink
        early, self._early = self._early, []
        for chunk in early:
            sink.body(chunk)
        if self._ended:
            sink.end(self._result)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def release(self, *, body_done: bool = False) -> None:
        """Done with it: back to the pool if its response ended cleanly, else closed.

        ``body_done``: the caller read all it wanted (an event stream's
        ``[DONE]``); the end of the message may still be on its way, so the
        connection waits for it a moment instead of being closed at once.
        """
        self._sink = None
        self._early = []
        if self.transport is None:
            return
        if self.complete and not self.transport.is_closing():
            self._reset()
            self._pool.put(self)
        elif body_done and not self._ended:
            self._sink = _Finisher(self)
        else:
            self.transport.close()

    def _finish(self, error: WireError | None) -> None:
        if self._ended:
            return
        self._flush_body()  # the body parsed so far comes before its end
        self._ended = True
        self._result = error
        if self._sink is not None:
            self._sink.end(error)

    def _fail(self, error: WireError) -> None:
        self.complete = False
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(error)  # no sink yet: the request's caller hears of it
        self._finish(error)

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers = {}
        self._head = None
        self._head_seen = self._in_use = False
        self._answered = self._ended = self.complete = self._close_delimited = False
        self._result = None
        self._head_bytes = 0


class _Finisher:
    """Waits briefly for a response's end, so that its connection can be reused."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._timer = asyncio.get_running_loop().call_later(1.0, self._give_up)

    def body(self, data: bytes) -> None:
        self._give_up()  # more than the end of the message: not worth reading

    def end(self, error: WireError | None) -> None:
        self._timer.cancel()
        self._conn.release()

    def _give_up(self) -> None:
        self._timer.cancel()
        if self._conn.transport is not None:
            self._conn.transport.close()


class _Collector:
    def __init__(self, limit: int) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def body(self, data: bytes) -> None:
        if self.size > self.limit:
            return
        self.chunks.append(data)
        self.size += len(data)
        if self.size > self.limit and not self.done.done():
            self.done.set_result(None)

    def end(self, error: WireError | None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


async def read_body(conn: Connection, limit: int) -> bytes:
    """The whole body, or its first ``limit`` + 1 bytes or more once it is longer.

    Raises ``WireError`` when the connection breaks first. The caller releases
    the connection (a body read only in part is not reusable).
    """
    collector = _Collector(limit)
    conn.attach(collector)
    await collector.done
    return b"".join(collector.chunks)
