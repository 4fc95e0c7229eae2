"""The copy loop: upstream events to the client, whole events only, in order.

Until the first whole event arrives nothing is sent, so any failure is still
a clean HTTP error. After that, the upstream's bytes go out untouched; a
failure ends the stream with one ChatIQ-style error event and ``[DONE]``.
``await response.write()`` waits for the client to drain, so a slow reader
slows the upstream reads instead of growing a buffer.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from .config import UpstreamSettings
from .errors import (
    FirstByteTimeout,
    GatewayError,
    IdleTimeout,
    TotalTimeout,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
)
from .exchange import Exchange
from .metrics import Metrics
from .sse import DONE_DATA, DONE_EVENT, Event, SSEParser, SSEProtocolError, format_event

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


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
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        exchange: Exchange,
        settings: UpstreamSettings,
        metrics: Metrics,
        deadline: float,
    ) -> None:
        self._request = request
        self._upstream = upstream
        self._ex = exchange
        self._settings = settings
        self._metrics = metrics
        self._deadline = deadline
        self._parser = SSEParser(settings.max_event_bytes)
        self._loop = asyncio.get_running_loop()
        # A failure found while parsing, raised once the events before it are out.
        self._failure: UpstreamError | None = None

    async def run(self, first_byte_by: float) -> web.StreamResponse:
        try:
            return await self._relay(first_byte_by)
        finally:
            self._upstream.close()

    async def _relay(self, first_byte_by: float) -> web.StreamResponse:
        # Still before the stream: a failure here propagates as an HTTP error.
        first = await self._read_events(min(first_byte_by, self._deadline), first=True)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(self._request)
        self._ex.streamed = True
        try:
            done = await self._write(response, first)
            while not done:
                done = await self._write(response, await self._read_events(self._deadline))
        except UpstreamError as e:
            self._ex.error = e
            await self._end_with_error(response, e)
        except ConnectionError:
            self._ex.outcome = "client_disconnect"
        except Exception as e:  # a bug: the stream still ends as the contract says
            self._ex.error = GatewayError(f"internal error ({type(e).__name__})")
            await self._end_with_error(response, self._ex.error)
        return response

    async def _read_events(self, deadline: float, *, first: bool = False) -> list[Event]:
        """Read until at least one whole event is parsed."""
        content = self._upstream.content
        idle = self._settings.idle_timeout_s
        while True:
            until = deadline if first else min(self._loop.time() + idle, deadline)
            try:
                async with asyncio.timeout_at(until):
                    chunk = await content.readany()
            except TimeoutError:
                if first and deadline < self._deadline:
                    raise FirstByteTimeout("the chat service sent nothing in time") from None
                if until >= self._deadline:
                    raise TotalTimeout("the stream ran past its time limit") from None
                raise IdleTimeout("the chat service stopped sending") from None
            except (aiohttp.ClientError, OSError):
                raise UpstreamClosed("the chat service broke off the stream") from None
            if not chunk:
                raise UpstreamClosed("the chat service ended the stream early")
            try:
                events = self._parser.feed(chunk)
            except SSEProtocolError as e:
                failure = UpstreamProtocolError(f"the chat service sent an {e}")
                if not e.events:
                    raise failure from None
                self._failure, events = failure, e.events
            if events:
                return events

    async def _write(self, response: web.StreamResponse, events: list[Event]) -> bool:
        """Write a batch of whole events; True once ``[DONE]`` went out."""
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
            await response.write(payload)
            ex.bytes_out += len(payload)
        if content and ex.ttft is None:
            ex.ttft = self._loop.time() - ex.started
            self._metrics.time_to_first_token.labels(ex.tenant).observe(ex.ttft)
        failure = failure or self._failure
        if failure is not None:
            raise failure
        return done

    async def _end_with_error(self, response: web.StreamResponse, err: GatewayError) -> None:
        ending = format_event(err.body_json()) + DONE_EVENT
        try:
            await response.write(ending)
        except ConnectionError:
            self._ex.outcome = "client_disconnect"
            return
        self._ex.bytes_out += len(ending)
