"""The relay: an opened upstream stream to the client, whole events only, in order.

The upstream's bytes go out untouched, each batch of whole events written to
the client as soon as it is parsed. When the client's socket buffer passes
its high-water mark, the upstream socket is paused until the client drains
(TCP backpressure end to end, no buffer grows); a client that reads nothing
for ``client_write_timeout_s`` is dropped. While the upstream is silent, a
``: ping`` comment goes out every ``keepalive_s``. Any failure ends the
stream with one ChatIQ-style error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from gateway.chat import StreamEncoder
from gateway.config import UpstreamSettings
from gateway.downstream import (
    PING,
    SSE_HEADERS,
    WRITE_ROOM,
    EventStreamResponse,
    SlowClient,
    send_to_client,
    translate,
)
from gateway.errors import (
    Draining,
    GatewayError,
    IdleTimeout,
    TotalTimeout,
    UpstreamError,
)
from gateway.exchange import Exchange, LateResponse, end_exchange, first_token
from gateway.metrics import Metrics
from gateway.quotas.admission import Slot
from gateway.sse import DONE_EVENT, Event, format_event
from gateway.state import LIFECYCLE, LOG, METRICS, SETTINGS, TIMERS, Lifecycle
from gateway.timers import Timer, TimerHeap
from gateway.upstream.events import EventSource

_RUNNING = object()  # the stream has not ended yet


class RelayResponse(EventStreamResponse, LateResponse):
    """What the chat handler returns: aiohttp's call of ``prepare``, right after
    the handler returned, is the whole stream (``Relay.run``); the relay's own
    call sends the head."""

    def __init__(self, relay: Relay, headers: Mapping[str, str]) -> None:
        super().__init__(headers=headers)
        self._relay: Relay | None = relay

    def prepare(self, request: web.BaseRequest) -> Coroutine[Any, Any, AbstractStreamWriter | None]:
        relay, self._relay = self._relay, None
        if relay is None:  # the second call: the relay's own, in _start (it sends the head)
            return super().prepare(request)
        return relay.run()  # no frame of its own: a held stream keeps run's only


class Relay:
    """Writes the upstream's events to the client as they arrive.

    Its ``response`` is what the handler returns; the stream runs when aiohttp
    prepares it, and ends the exchange, gives back the admission slot and
    closes the upstream source as it ends, whatever ends it.

    The first batch goes out through aiohttp (it carries the response head);
    after that the relay is the ``EventSource``'s consumer: each batch is
    written to the client's transport from inside the upstream connection's
    ``buffer_updated``, with no task switch. The handler's task only waits for
    the end, or for a slow client to drain (the upstream is paused meanwhile).
    One lazy timer per stream watches the idle gap, the keep-alive pings and
    the total deadline; an event only records the time.
    """

    # No __dict__: one of these per live stream.
    __slots__ = (
        "_chunked",
        "_deadline",
        "_done",
        "_draining",
        "_encoder",
        "_end",
        "_ending",
        "_ex",
        "_first",
        "_high_water",
        "_last_event",
        "_last_write",
        "_lifecycle",
        "_log",
        "_loop",
        "_metrics",
        "_over",
        "_relay_overhead",
        "_request",
        "_response",
        "_settings",
        "_slot",
        "_source",
        "_timer",
        "_timers",
        "_transport",
        "_wake",
    )

    def __init__(
        self,
        request: web.Request,
        source: EventSource,
        first: list[Event],
        exchange: Exchange,
        deadline: float,
        encoder: StreamEncoder | None,
        slot: Slot,
    ) -> None:
        app = request.app
        self._first = first  # the events that came with the upstream's head
        self._slot = slot  # the admission slot taken for the stream: given back at its end
        self._encoder = encoder  # None: the upstream's own bytes (the native frontend)
        self._request = request
        self._source = source
        self._ex = exchange
        self._deadline = deadline
        self._settings: UpstreamSettings = app[SETTINGS].current.upstream
        self._metrics: Metrics = app[METRICS]
        self._lifecycle: Lifecycle = app[LIFECYCLE]
        self._log = app[LOG]
        self._relay_overhead = self._metrics.relay_overhead
        self._loop = source.loop
        headers = SSE_HEADERS if encoder is None else {**SSE_HEADERS, **encoder.headers}
        self._response = RelayResponse(self, headers)
        self._transport: asyncio.Transport | None = None
        self._chunked = True
        self._high_water = WRITE_ROOM
        # How the stream ended, once it did: None ([DONE] went out) or the failure.
        self._end: BaseException | object | None = _RUNNING
        self._ending = b""  # the last events, with [DONE]: they go out with the response's end
        self._wake: asyncio.Future[None] | None = None  # the handler's task waits on it
        self._over = False  # no more events go out: the stream is done or ending
        self._done = False  # [DONE] went out
        self._draining = False  # the client is behind; the upstream is paused
        self._last_event = self._last_write = 0.0
        self._timers: TimerHeap = app[TIMERS]
        self._timer: Timer | None = None

    @property
    def response(self) -> web.StreamResponse:
        return self._response

    async def run(self) -> None:
        """The stream, start to end, in the task that handled its request.

        One frame for the whole stream (a held stream keeps its frames): the
        wait for the end is here, not in a coroutine of its own."""
        ex, loop = self._ex, self._loop
        task = asyncio.current_task(loop)  # with the loop: no getpid
        assert task is not None
        live = self._metrics.stream_series(ex.tenant, ex.bot_label).active
        live.inc()
        self._lifecycle.streams.add(task)
        try:
            await self._start()
            try:
                first, self._first = self._first, []
                await self._send_first(first)
                if not self._done:
                    self._hand_over()
                    while (end := self._end) is not None:  # wait, draining a slow client
                        if isinstance(end, BaseException):
                            raise end
                        if self._draining:
                            await self._drain()
                            continue
                        self._wake = self._loop.create_future()
                        try:
                            await self._wake
                        finally:
                            self._wake = None
                    if self._ending:  # written by the handler's task: with the response's end
                        ending, self._ending = self._ending, b""
                        await self._send(ending, end=True)
            except UpstreamError as e:
                self._stop()
                if e.kind is not None:
                    self._metrics.upstream_errors.labels(e.kind).inc()
                self._log.warning(
                    "stream_failed", request_id=self._ex.request_id, error=type(e).__name__,
                    kind=e.kind, events=self._ex.events,
                )  # fmt: skip
                await self._end_with_error(e)
            except (ConnectionError, SlowClient) as e:
                self._stop()
                self._ex.outcome = (
                    "slow_client" if isinstance(e, SlowClient) else "client_disconnect"
                )
                if self._request.transport is not None:
                    self._request.transport.close()
            except asyncio.CancelledError:
                self._stop()
                if not self._lifecycle.draining:
                    ex.outcome = "client_disconnect"
                    raise  # the client left: the handler's task is being cancelled
                task.uncancel()  # draining: the stream ends with an error event instead
                await self._end_with_error(Draining("the gateway is restarting; please retry"))
            except Exception as e:  # a bug: the stream still ends as the contract says
                self._stop()
                self._log.error("relay_bug", request_id=self._ex.request_id, error=type(e).__name__)
                await self._end_with_error(GatewayError(f"internal error ({type(e).__name__})"))
        finally:
            self._stop()
            self._source.close(done=self._done)
            self._lifecycle.streams.discard(task)
            live.dec()
            self._slot.give_back()
            status = self._response.status if ex.streamed else 499  # nginx's "client closed"
            end_exchange(self._request, ex, status, loop.time(), self._metrics, self._log)

    async def _start(self) -> None:
        response = self._response
        await response.prepare(self._request)
        self._ex.streamed = True
        self._transport = self._request.transport
        self._chunked = response.headers.get("Transfer-Encoding") == "chunked"  # HTTP/1.1
        if self._transport is not None:
            self._high_water = self._transport.get_write_buffer_limits()[1]

    async def _send_first(self, first: list[Event]) -> None:
        """The first events, through aiohttp, in one write with the head (and with
        the response's end when they hold [DONE]). Nothing of them is kept
        afterwards: a stalled stream holds only what its socket does."""
        arrived = self._loop.time()
        payload, failure = self._batch(first)
        first.clear()  # the caller's list too
        if payload:
            self._relay_overhead.observe(self._loop.time() - arrived)
        # The head goes now even without events: later ones go straight to the socket.
        await self._send(payload, end=self._done)
        if failure is not None:
            raise failure

    def _hand_over(self) -> None:
        """From now on the events flow in ``on_events``, and the timer runs."""
        now = self._loop.time()
        self._last_event = self._last_write = now
        self._arm(now)
        self._source.attach(self)  # may deliver kept events, even the end, at once

    # EventConsumer: called from the upstream connection's buffer_updated

    def on_events(self, events: list[Event]) -> None:
        if self._over:
            return
        # This runs for every upstream read: the client check, ``_batch`` and
        # ``_write_now`` are inline here (a Python call each, saved).
        try:
            transport = self._transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client went away")
            pieces, failure, done, content, count, error_code, conversation = translate(
                events, self._encoder
            )
            ex = self._ex
            ex.events += count
            if error_code is not None:
                ex.upstream_error = error_code
            if conversation is not None:
                ex.conversation_id = str(conversation)
            if content and ex.ttft is None:
                self._first_token()
            payload = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            now = self._loop.time()
            if count:  # an event with data: comments and blank events are no sign of life
                self._last_event = now
            if done:  # (never with a failure: translate stops at either)
                self._done = True
                self._ending = payload  # one write with the chunked body's end
                self._finish(None)
                return
            if payload:
                if self._chunked:  # one HTTP/1.1 chunk, as aiohttp would frame it
                    transport.write(b"%x\r\n%b\r\n" % (len(payload), payload))
                else:
                    transport.write(payload)
                ex.bytes_out += len(payload)
                self._last_write = now
            if failure is not None:
                self._finish(failure)
            elif transport.get_write_buffer_size() > self._high_water and not self._draining:
                # Past the high-water mark, where aiohttp would wait: hold the upstream.
                self._draining = True
                self._source.pause()
                self._metrics.slow_client_pauses.labels(ex.tenant).inc()
                self._poke()
        except Exception as e:  # a bug, or the client left: the handler's task ends the stream
            self._finish(e)

    def on_failure(self, failure: UpstreamError) -> None:
        if not self._over:
            self._finish(failure)

    # the parts

    def _batch(self, events: list[Event]) -> tuple[bytes, UpstreamError | None]:
        """The bytes of the whole events to send, up to ``[DONE]`` or a bad event
        (``on_events`` has its own copy, inline)."""
        pieces, failure, done, content, count, error_code, conversation = translate(
            events, self._encoder
        )
        self._ex.events += count
        if error_code is not None:
            self._ex.upstream_error = error_code
        if conversation is not None:
            self._ex.conversation_id = str(conversation)
        if done:
            self._done = True
        if content and self._ex.ttft is None:
            self._first_token()
        return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), failure

    def _first_token(self) -> None:
        first_token(self._ex, self._loop.time(), self._metrics)

    def _finish(self, outcome: BaseException | None) -> None:
        """The stream ends: stop pushing, and wake the handler's task to end it."""
        self._stop()
        if self._end is _RUNNING:  # the first ending is the one that counts
            self._end = outcome
        self._poke()

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _stop(self) -> None:
        self._over = True
        if self._timer is not None:
            self._timers.cancel(self._timer)
            self._timer = None

    async def _drain(self) -> None:
        """Wait for the client to take what it was sent; then the upstream resumes."""
        try:
            async with asyncio.timeout(self._settings.client_write_timeout_s):
                await self._request.writer.drain()
        except TimeoutError:
            raise SlowClient from None
        now = self._loop.time()
        self._last_event = self._last_write = now  # the upstream was held, not silent
        self._draining = False
        if not self._over:
            if self._timer is not None:  # it was set for the deadline alone
                self._timers.cancel(self._timer)
            self._arm(now)
            self._source.resume()

    def _arm(self, now: float) -> None:
        s = self._settings
        when = self._deadline
        if not self._draining:  # while the client drains, the upstream is held, not idle
            when = min(when, self._last_event + s.idle_timeout_s, self._last_write + s.keepalive_s)
        self._timer = self._timers.call_at(max(when, now), self._on_timer)

    def _on_timer(self) -> None:
        """Total deadline, idle upstream, keep-alive ping: whichever is due."""
        self._timer = None
        if self._over:
            return
        now = self._loop.time()
        if now >= self._deadline:
            self._finish(TotalTimeout("the stream ran past its time limit"))
            return
        if not self._draining:
            if now >= self._last_event + self._settings.idle_timeout_s:
                self._finish(IdleTimeout("the chat service stopped sending"))
                return
            if now >= self._last_write + self._settings.keepalive_s:
                self._ping(now)
        self._arm(now)

    def _ping(self, now: float) -> None:
        if self._client_gone():
            self._finish(ConnectionResetError("the client went away"))
            return
        self._write_now(PING)
        self._last_write = now

    def _client_gone(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def _write_now(self, payload: bytes) -> None:
        """Straight to the client's socket (the response head went out before;
        ``on_events`` has its own copy, inline)."""
        assert self._transport is not None
        if self._chunked:  # one HTTP/1.1 chunk, as aiohttp would frame it
            self._transport.write(b"%x\r\n%b\r\n" % (len(payload), payload))
        else:
            self._transport.write(payload)
        self._ex.bytes_out += len(payload)

    async def _send(self, payload: bytes, *, end: bool = False) -> None:
        """Through aiohttp (the first batch, the ending); ``end``: the response
        ends with it, in the same write."""
        timeout_s = self._settings.client_write_timeout_s
        await send_to_client(self._request, self._response, payload, timeout_s, end=end)
        self._ex.bytes_out += len(payload)

    async def _end_with_error(self, err: GatewayError) -> None:
        self._ex.error = err
        try:
            if self._encoder is None:
                await self._send(format_event(err.body_json()) + DONE_EVENT, end=True)
            else:
                await self._send(self._encoder.error(err), end=True)
        except (ConnectionError, SlowClient):
            self._ex.outcome = "client_disconnect"
