"""The copy loop: an opened upstream stream to the client, whole events only, in order.

The upstream's bytes go out untouched. ``await response.write()`` waits for
the client to drain, so a slow reader slows the upstream reads (TCP
backpressure end to end) instead of growing a buffer; a client that reads
nothing for ``client_write_timeout_s`` is dropped. While the upstream is
silent, a ``: ping`` comment goes out every ``keepalive_s``. Any failure ends
the stream with one ChatIQ-style error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from .config import UpstreamSettings
from .errors import (
    Draining,
    GatewayError,
    IdleTimeout,
    TotalTimeout,
    UpstreamError,
    UpstreamProtocolError,
)
from .exchange import Exchange
from .metrics import Metrics
from .sse import DONE_DATA, DONE_EVENT, Event, format_event
from .state import LIFECYCLE, LOG, METRICS, SETTINGS, Lifecycle
from .upstream import EventSource

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
PING = b": ping\n\n"
# While the client's socket buffer holds fewer bytes than this, even after the
# write, a write cannot wait for a drain: the transports pause (and aiohttp
# waits) only above their high-water mark, 64 KiB for asyncio and uvloop.
_ROOM = 16 * 1024


class SlowClient(Exception):
    """The client read nothing for ``client_write_timeout_s``."""


def is_content_chunk(data: str) -> bool:
    """Check one event's JSON; True for a content chunk. Raises on malformed data."""
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        raise UpstreamProtocolError("the chat service sent a malformed event") from None
    if not isinstance(payload, dict):
        raise UpstreamProtocolError("the chat service sent an event that is not an object")
    return "choices" in payload


class Relay:
    def __init__(
        self, request: web.Request, source: EventSource, exchange: Exchange, deadline: float
    ) -> None:
        app = request.app
        self._request = request
        self._source = source
        self._ex = exchange
        self._deadline = deadline
        self._settings: UpstreamSettings = app[SETTINGS].upstream
        self._metrics: Metrics = app[METRICS]
        self._lifecycle: Lifecycle = app[LIFECYCLE]
        self._log = app[LOG]
        self._relay_overhead = self._metrics.overhead.labels("relay")
        self._loop = asyncio.get_running_loop()
        self._response = web.StreamResponse(headers=SSE_HEADERS)

    async def run(self, first: list[Event]) -> web.StreamResponse:
        try:
            await self._relay(first)
        finally:
            self._source.close()
        return self._response

    async def _relay(self, first: list[Event]) -> None:
        response = self._response
        await response.prepare(self._request)
        self._ex.streamed = True
        try:
            done = await self._write(first)
            while not done:
                done = await self._write(await self._next_events())
        except UpstreamError as e:
            if e.kind is not None:
                self._metrics.upstream_errors.labels(e.kind).inc()
            self._log.warning(
                "stream_failed", request_id=self._ex.request_id, error=type(e).__name__,
                kind=e.kind, events=self._ex.events,
            )  # fmt: skip
            await self._end_with_error(e)
        except (ConnectionError, SlowClient) as e:
            self._ex.outcome = "slow_client" if isinstance(e, SlowClient) else "client_disconnect"
            if self._request.transport is not None:
                self._request.transport.close()
        except asyncio.CancelledError:
            if not self._lifecycle.draining:
                raise  # the client left: the handler is being cancelled
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._end_with_error(Draining("the gateway is restarting; please retry"))
        except Exception as e:  # a bug: the stream still ends as the contract says
            self._log.error("relay_bug", request_id=self._ex.request_id, error=type(e).__name__)
            await self._end_with_error(GatewayError(f"internal error ({type(e).__name__})"))

    async def _next_events(self) -> list[Event]:
        """The next events, with keep-alive pings while the upstream is silent."""
        now = self._loop.time()
        idle_by = min(now + self._settings.idle_timeout_s, self._deadline)
        while True:
            ping_by = now + self._settings.keepalive_s
            try:
                return await self._source.read(min(ping_by, idle_by))
            except TimeoutError:
                now = self._loop.time()
                if now >= self._deadline:
                    raise TotalTimeout("the stream ran past its time limit") from None
                if now >= idle_by:
                    raise IdleTimeout("the chat service stopped sending") from None
                await self._send(PING)

    async def _write(self, events: list[Event]) -> bool:
        """Write a batch of whole events; True once ``[DONE]`` went out."""
        arrived = self._loop.time()
        ex = self._ex
        batch: list[bytes] = []
        failure: UpstreamError | None = None
        done = content = False
        for event in events:
            if event.data is not None:
                if event.data == DONE_DATA:
                    batch.append(event.raw)
                    ex.events += 1
                    done = True
                    break
                try:
                    content = is_content_chunk(event.data) or content
                except UpstreamError as e:
                    failure = e
                    break
                ex.events += 1
            batch.append(event.raw)
        if batch:
            payload = b"".join(batch)
            self._relay_overhead.observe(self._loop.time() - arrived)
            await self._send(payload)
        if content and ex.ttft is None:
            ex.ttft = self._loop.time() - ex.started
            self._metrics.time_to_first_token.labels(ex.tenant, ex.bot_label).observe(ex.ttft)
        if failure is not None:
            raise failure
        return done

    async def _send(self, payload: bytes) -> None:
        transport = self._request.transport
        if transport is not None and transport.get_write_buffer_size() + len(payload) < _ROOM:
            # The client keeps up: the write cannot wait for a drain, so no timer is needed.
            await self._response.write(payload)
        else:
            try:
                async with asyncio.timeout(self._settings.client_write_timeout_s):
                    await self._response.write(payload)
            except TimeoutError:
                raise SlowClient from None
        self._ex.bytes_out += len(payload)

    async def _end_with_error(self, err: GatewayError) -> None:
        self._ex.error = err
        try:
            await self._send(format_event(err.body_json()) + DONE_EVENT)
        except (ConnectionError, SlowClient):
            self._ex.outcome = "client_disconnect"
