"""An upstream ``text/event-stream`` body, read as whole events and pushed to
the relay that attached to it (or awaited, before one has).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from gateway.errors import (
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
)
from gateway.sse import Event, SSEParser, SSEProtocolError
from gateway.tracing import Trace
from gateway.upstream.connection import Connection, WireError, WireProtocolError

# Events read before a relay takes them (while the client's response starts):
# past this many bytes the upstream socket is paused, so nothing piles up.
_MAX_KEPT_BYTES = 64 * 1024


class EventConsumer(Protocol):
    """Where an attached ``EventSource`` pushes what it reads (see ``relay.Relay``)."""

    def on_events(self, events: list[Event]) -> None: ...

    def on_failure(self, failure: UpstreamError) -> None: ...


class EventSource:
    """An upstream ``text/event-stream`` body, read as whole events.

    Until a consumer attaches, events are kept for ``read`` (the first ones,
    while a retry is still possible). Once one attaches, every batch is pushed
    to it from inside the connection's ``buffer_updated``: no task wakes up
    per event. A consumer that cannot keep up calls ``pause``.
    """

    # No __dict__: one of these per live stream.
    __slots__ = (
        "_conn",
        "_consumer",
        "_failure",
        "_kept",
        "_kept_bytes",
        "_parser",
        "_paused",
        "_trace",
        "_waiter",
    )

    def __init__(self, conn: Connection, max_event_bytes: int, trace: Trace | None = None) -> None:
        self._conn = conn
        self._trace = trace  # its attempt's span ends as the source closes
        self._parser = SSEParser(max_event_bytes)
        self._kept: list[Event] = []  # read, not yet taken
        self._kept_bytes = 0
        self._paused = False
        # The end of the stream (every stream ends in one), after any events kept.
        self._failure: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._consumer: EventConsumer | None = None
        conn.attach(self)

    # wire.BodySink

    def body(self, data: bytes) -> None:
        if self._failure is not None:  # the parser gave up: nothing after may be trusted
            return
        consumer = self._consumer
        if consumer is None:
            self._parse(self._parser.feed, data)
            return
        # Attached: every upstream read comes this way, so ``_parse``'s case is inline.
        try:
            events = self._parser.feed(data)
        except SSEProtocolError as e:
            self._failure = UpstreamProtocolError(f"the chat service sent an {e}")
            if e.events:
                consumer.on_events(e.events)
            consumer.on_failure(self._failure)
            return
        if events:
            consumer.on_events(events)

    def _parse(self, parse: Callable[[bytes], list[Event]], data: bytes) -> None:
        try:
            events = parse(data)
        except SSEProtocolError as e:
            events = e.events
            self._failure = UpstreamProtocolError(f"the chat service sent an {e}")
        consumer = self._consumer
        if consumer is not None:
            if events:
                consumer.on_events(events)
            if self._failure is not None:
                consumer.on_failure(self._failure)
            return
        if events:
            self._kept += events
            self._kept_bytes += sum(len(event.raw) for event in events)
            if self._kept_bytes > _MAX_KEPT_BYTES:
                self.pause()  # nobody takes them yet: hold the upstream
        self._wake()

    def end(self, error: WireError | None) -> None:
        if error is None and self._failure is None:  # a last event may wait on a final \r
            self._parse(lambda _: self._parser.flush(), b"")
        if self._failure is not None:
            return
        if error is None:
            self._failure = UpstreamClosed("the chat service ended the stream early")
        elif isinstance(error, WireProtocolError):
            self._failure = UpstreamProtocolError(f"the chat service sent {error}")
        else:
            self._failure = UpstreamClosed("the chat service broke off the stream")
        if self._consumer is not None:
            self._consumer.on_failure(self._failure)
        self._wake()

    # the reader's side

    async def read(self, until: float) -> list[Event]:
        """At least one whole event; ``TimeoutError`` if loop time ``until`` passes first."""
        while not self._kept:
            if self._failure is not None:
                raise self._failure
            loop = self._conn.loop
            waiter = self._waiter = loop.create_future()
            timer = loop.call_at(until, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        events, self._kept, self._kept_bytes = self._kept, [], 0
        self.resume()
        return events

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._conn.loop

    def attach(self, consumer: EventConsumer) -> None:
        """From now on, push events and the stream's end to ``consumer``."""
        self._consumer = consumer
        self.resume()
        if self._kept:
            events, self._kept, self._kept_bytes = self._kept, [], 0
            consumer.on_events(events)
        if self._failure is not None:
            consumer.on_failure(self._failure)

    def pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._conn.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._conn.resume_reading()

    def close(self, *, done: bool = False) -> None:
        """Let go of the connection. ``done``: the stream's ``[DONE]`` was read, so
        the connection may go back to the pool once its response ends."""
        self._consumer = None
        self.resume()
        self._conn.release(body_done=done)
        if self._trace is not None:
            self._trace.end_attempt(None if done else self._failure)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
