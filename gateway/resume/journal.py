"""One resumable stream's events, numbered from 1, kept for whoever reads them.

The recorder appends the events the client is to get (already in the
frontend's wire format, one SSE event each); each reader reads those after
the last id it has. Bounded: past ``max_bytes`` the oldest events are let
go, and a reader that still needed them is told so (``Gone``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Gone(Exception):
    """The events after that id are no longer kept."""


def frame(first_id: int, events: list[bytes]) -> bytes:
    """The events as they go out: each with its ``id:`` line first, the
    event's own bytes unchanged after it."""
    return b"".join(b"id: %d\n%b" % (i, e) for i, e in enumerate(events, first_id))


def split_events(chunk: bytes) -> list[bytes]:
    """A frontend's encoded bytes as single events (they end in a blank line)."""
    events, start = [], 0
    while (end := chunk.find(b"\n\n", start)) != -1:
        events.append(chunk[start : end + 2])
        start = end + 2
    if start < len(chunk):
        events.append(chunk[start:])
    return events


class Journal:
    """A stream's events in this process, what its readers here and the Redis
    writer read: appended from the upstream's ``buffer_updated`` on the
    replica that produces it, from Redis on a replica that follows it."""

    def __init__(
        self, stream_id: str, tenant: str, frontend: str, max_bytes: int, owner: str | None = None
    ) -> None:
        self.id = stream_id
        self.tenant = tenant
        # Who may resume it: its tenant, or the tenant's signed-in user who started it.
        self.owner = tenant if owner is None else owner
        self.frontend = frontend
        self.finished = False
        self.headers: dict[str, str] = {}  # its response head (the frontend's)
        self.chat_key: tuple[str, str, str] | None = None  # see ResumableStreams.name_chat
        # The W3C traceparent of the request that started it: a resume's span links to it.
        self.traceparent: str | None = None
        # Told of every change (the Redis writer, which copies it for other replicas).
        self.listener: Callable[[Journal], None] | None = None
        self.readers = 0  # clients reading it now (the Redis writer is not one)
        self.producer: asyncio.Task[None] | None = None  # reads the upstream into it
        self._events: deque[bytes] = deque()
        self._first = 1  # the id of _events[0]
        self._bytes = 0
        self._max_bytes = max_bytes
        self._waiting: list[asyncio.Future[None]] = []  # readers waiting for a change

    @property
    def last_id(self) -> int:
        return self._first + len(self._events) - 1

    @property
    def first_id(self) -> int:
        return self._first

    def append(self, events: list[bytes], *, final: bool = False) -> None:
        if self.finished or not (events or final):
            return
        for event in events:
            self._events.append(event)
            self._bytes += len(event)
        while self._bytes > self._max_bytes and len(self._events) > 1:
            self._bytes -= len(self._events.popleft())
            self._first += 1
        if final:
            self.finished = True
        self.poke()
        if self.listener is not None:
            self.listener(self)

    def start_at(self, first_id: int) -> None:
        """An empty journal's first event will have this id (a replica of a
        stream whose earliest events were let go)."""
        assert not self._events
        self._first = first_id

    def poke(self) -> None:
        """Wake every reader waiting (new events, the end, or a shutdown's hand-over)."""
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

    def events_after(self, after: int) -> list[bytes]:
        if after + 1 < self._first:
            raise Gone(f"the events after {after} are no longer kept")
        start = after + 1 - self._first
        if start >= len(self._events):
            return []
        if start == 0:
            return list(self._events)
        return [self._events[i] for i in range(start, len(self._events))]

    async def read(self, after: int, wait_s: float) -> tuple[list[bytes], bool]:
        events = self.events_after(after)
        if not events and not self.finished:
            await self.wait(wait_s)
            events = self.events_after(after)
        return events, self.finished and after + len(events) >= self.last_id

    async def wait(self, wait_s: float) -> None:
        """Until the journal changes (or ``poke``), at most ``wait_s``."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiting.append(waiter)
        timer = loop.call_later(wait_s, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
