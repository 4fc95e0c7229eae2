"""Resumable streams on the wire: the producer, the readers, the resume route.

A resumable stream is two tasks instead of one. The *producer* holds the
admission slot and reads the upstream into the stream's journal; it lives on
when the client leaves (for ``resume.detach_grace_s``). A *reader* (the
request that started the stream, then each resume) sends the journal's
events to its client, each with an SSE ``id:`` line, from the event after
``Last-Event-ID``, then the live ones, then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable

from aiohttp import web
from redis.exceptions import RedisError

from gateway.auth.tenants import tenant_of
from gateway.chat import ChatRequest, StreamEncoder, WireFormat
from gateway.config import Settings, Tenant
from gateway.downstream import PING, SSE_HEADERS, EventStreamResponse, SlowClient, send_to_client
from gateway.errors import (
    Draining,
    GatewayError,
    InvalidRequest,
    StreamInterrupted,
    StreamNotFound,
    UpstreamError,
)
from gateway.exchange import Exchange, exchange_of, first_token
from gateway.quotas.admission import ADMISSION
from gateway.resume.journal import Gone, Journal, frame
from gateway.resume.recorder import Recorder, ending
from gateway.resume.streams import RESUMABLE
from gateway.state import LIFECYCLE, LOG, METRICS, SETTINGS, TIMERS
from gateway.upstream.client import UPSTREAM

RESUMABLE_HEADER = "X-Resumable"
STREAM_ID_HEADER = "X-Stream-Id"
_CHOICES = {"1": True, "true": True, "0": False, "false": False}
_EVENT_ID = re.compile(r"^[0-9]{1,18}$")
# A reader gives up on a stream whose producer went silent this long past the
# upstream's own idle timeout (the producer would have ended it by then).
_SILENCE_SLACK_S = 2.0


def wants_resumable(
    request: web.Request, tenant: Tenant, frontend: WireFormat, s: Settings
) -> bool:
    """``[resume]`` on, a frontend that can carry ids, and the tenant's choice
    unless the request makes its own (``X-Resumable: 1`` or ``0``). A header
    of another value is refused whatever the answer would be."""
    asked = request.headers.get(RESUMABLE_HEADER)
    choice = None if asked is None else _CHOICES.get(asked.strip().lower())
    if asked is not None and choice is None:
        raise InvalidRequest(f"{RESUMABLE_HEADER} must be 1 or 0 (true or false)")
    if not (s.resume.enabled and frontend.resumable):
        return False
    return tenant.resumable if choice is None else choice


async def serve_resumable(
    request: web.Request, frontend: WireFormat, chat: ChatRequest, ex: Exchange, deadline: float
) -> web.StreamResponse:
    """Start the producer; once the upstream answered, read the stream from its start."""
    app = request.app
    streams = app[RESUMABLE]
    journal = streams.open(ex.tenant, frontend.name, ex.owner)
    if chat.chat_id is not None:
        streams.name_chat(journal, chat.chat_id)
    if ex.trace is not None:
        journal.traceparent = ex.trace.traceparent()
    encoder = frontend.encoder(chat, ex)
    journal.headers = {**SSE_HEADERS, **(encoder.headers if encoder is not None else {})}
    opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    producer = asyncio.create_task(_produce(app, chat, ex, journal, encoder, deadline, opened))
    journal.producer = producer
    try:
        await asyncio.shield(opened)
    except BaseException:
        producer.cancel()  # failed or the client left before anything was promised
        streams.forget(journal.id)
        raise
    streams.reader_joined(journal)
    try:
        return await follow(request, journal, 0, ex)
    finally:
        streams.reader_left(journal)


async def _produce(
    app: web.Application,
    chat: ChatRequest,
    ex: Exchange,
    journal: Journal,
    encoder: StreamEncoder | None,
    deadline: float,
    opened: asyncio.Future[None],
) -> None:
    streams, lifecycle, metrics = app[RESUMABLE], app[LIFECYCLE], app[METRICS]
    settings = app[SETTINGS].current.upstream
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    lifecycle.streams.add(task)
    recorder: Recorder | None = None

    def on_first_token() -> None:
        if ex.ttft is None:
            first_token(ex, loop.time(), metrics)

    def failed(e: UpstreamError) -> None:
        if e.kind is not None:
            metrics.upstream_errors.labels(e.kind).inc()
        app[LOG].warning("stream_failed", request_id=ex.request_id, error=type(e).__name__,
                         kind=e.kind, resumable=True)  # fmt: skip

    try:
        queued = loop.time()
        async with app[ADMISSION].slot(ex.tenant, ex.user_id):
            if ex.trace is not None:
                ex.queue_wait = loop.time() - queued
            source, first = await app[UPSTREAM].open_stream(chat, ex.request_id, deadline, ex.trace)
            if streams.remote is not None:
                try:
                    await streams.remote.announce(journal)  # else: resumable here only
                except BaseException:  # cancelled meanwhile: the client left
                    source.close()
                    raise
            opened.set_result(None)
            live = metrics.stream_series(ex.tenant, ex.bot_label).active
            live.inc()
            recorder = Recorder(
                source, journal, encoder, settings, deadline, on_first_token, failed, app[TIMERS],
                on_error_event=lambda code: setattr(ex, "upstream_error", code),
                on_conversation=lambda conversation: setattr(ex, "conversation_id", conversation),
            )  # fmt: skip
            try:
                await recorder.run(first)
            finally:
                live.dec()
    except BaseException as e:
        if not opened.done():
            if isinstance(e, asyncio.CancelledError):
                opened.cancel()
            else:
                opened.set_exception(e)
        elif not isinstance(e, asyncio.CancelledError):
            raise
    finally:
        lifecycle.streams.discard(task)
        if recorder is not None and not journal.finished:  # cancelled, or a bug
            recorder.end_with(
                Draining("the gateway is restarting; please retry")
                if lifecycle.draining
                else StreamInterrupted("the stream was cancelled")
            )
        if opened.done() and not opened.cancelled() and opened.exception() is None:
            streams.finished(journal)


async def follow(
    request: web.Request, journal: Journal, after: int, ex: Exchange, *, resumed: bool = False
) -> web.StreamResponse:
    """Send the stream's events after id ``after`` to this client, to the end."""
    app = request.app
    stream_id = journal.id
    streams = app[RESUMABLE]
    settings = app[SETTINGS].current.upstream
    replayed = app[METRICS].events_replayed.labels(ex.tenant)
    # The head goes with the first events (or ping), the body's end with the last.
    response = EventStreamResponse(headers={**journal.headers, STREAM_ID_HEADER: stream_id})
    await response.prepare(request)
    ex.streamed = True
    loop = asyncio.get_running_loop()
    heard = wrote = loop.time()
    position = after

    async def send(payload: bytes, *, end: bool = False) -> None:
        await send_to_client(request, response, payload, settings.client_write_timeout_s, end=end)
        ex.bytes_out += len(payload)

    try:
        while True:
            if streams.handing_over:
                await _hand_over(request, response, stream_id, position, send)
                ex.outcome = "handed_over"
                return response
            try:
                now = loop.time()  # woken for a ping, or to give up on a silent stream
                silent_by = heard + settings.idle_timeout_s + _SILENCE_SLACK_S
                wait_s = max(0.01, min(wrote + settings.keepalive_s, silent_by + 0.01) - now)
                events, ended = await journal.read(position, wait_s)
            except Gone:
                raise StreamInterrupted(
                    "the client fell further behind than the gateway keeps a stream"
                ) from None
            now = loop.time()
            if events:
                await send(frame(position + 1, events), end=ended)
                position += len(events)
                ex.events += len(events)
                if resumed:
                    replayed.inc(len(events))
                heard = wrote = now
            elif not ended:
                if now > silent_by:  # (heard is as it was when silent_by was set)
                    if streams.remote is not None and streams.remote.stalled_by_redis(journal):
                        raise StreamInterrupted(
                            "the stream stopped: the resumable streams' store is not answering"
                        )
                    raise StreamInterrupted("the stream stopped: its gateway replica went away")
                if now - wrote >= settings.keepalive_s:  # not when woken for nothing
                    await send(PING)
                    wrote = now
            if ended:
                return response
    except StreamInterrupted as e:
        ex.error = e
        with contextlib.suppress(ConnectionError, SlowClient):
            await send(b"".join(_ending(app, journal, e)), end=True)
    except (ConnectionError, SlowClient) as e:
        ex.outcome = "slow_client" if isinstance(e, SlowClient) else "client_disconnect"
        if request.transport is not None:
            request.transport.close()
    return response


def _ending(app: web.Application, journal: Journal, err: GatewayError) -> list[bytes]:
    """An error and the ending, in the stream's own wire format."""
    frontend = app[RESUMABLE].frontends.get(journal.frontend)
    if frontend is None:
        return ending(err, None)
    blank = Exchange(request_id=journal.id, route="-", started=0.0)
    return ending(err, frontend.encoder(ChatRequest(message="", bot=""), blank))


async def _hand_over(
    request: web.Request,
    response: web.StreamResponse,
    stream_id: str,
    position: int,
    send: Callable[[bytes], Awaitable[None]],
) -> None:
    """Shutdown with Redis: once Redis holds what this client has, end its
    connection with a ``retry:`` hint; it resumes on another replica."""
    streams = request.app[RESUMABLE]
    if streams.remote is not None:
        await streams.remote.copied_up_to(stream_id, position, timeout_s=2.0)
    await send(b"retry: %d\n\n" % streams.settings.retry_ms)  # a slow client: the write timeout
    response.force_close()


# the resume route


def _link(ex: Exchange, journal: Journal) -> None:
    """A resume's span links to the span of the request that started the stream."""
    if ex.trace is not None:
        ex.trace.describe({"chatiq.stream.resumed": True})
        if journal.traceparent is not None:
            ex.trace.link(journal.traceparent)


def last_event_id(request: web.Request) -> int:
    """``Last-Event-ID`` (the header, else ``?last_event_id=``); none: from the start."""
    raw = request.headers.get("Last-Event-ID", request.query.get("last_event_id", "")).strip()
    if not raw:
        return 0
    if not _EVENT_ID.match(raw):
        raise InvalidRequest("Last-Event-ID must be the id of an event of this stream")
    return int(raw)


# How far a replica journal (filled from Redis) may trail its producer: a
# writer round and a feed round, with room to spare.
_REPLICA_LAG_S = 1.0


async def _reaches(journal: Journal, event_id: int, within_s: float) -> bool:
    """Whether ``journal`` holds ``event_id`` now or, while it is live, within
    ``within_s``: a client may have had an event from the producing replica
    that Redis is still copying."""
    loop = asyncio.get_running_loop()
    until = loop.time() + within_s
    while journal.last_id < event_id and not journal.finished:
        left = until - loop.time()
        if left <= 0:
            break
        await journal.wait(left)
    return journal.last_id >= event_id


async def resume_stream(request: web.Request) -> web.StreamResponse:
    """``GET {prefix}/chatbot/streams/{stream_id}``: the events after ``Last-Event-ID``."""
    app = request.app
    await tenant_of(request)
    owner = exchange_of(request).owner  # the tenant's, or its signed-in user's
    stream_id = request.match_info["stream_id"]
    after = last_event_id(request)
    streams = app[RESUMABLE]
    if app[LIFECYCLE].draining and streams.remote is not None:
        raise Draining("this replica is shutting down; resume on another", retry_after=0)
    journal = streams.find(stream_id, owner)
    if journal is not None:
        if after > journal.last_id:
            raise InvalidRequest(f"this stream has no event {after} yet")
        try:
            journal.events_after(after)
        except Gone:
            raise StreamNotFound("the events after that id are no longer kept") from None
        return await _resume_here(request, journal, after)
    if streams.remote is not None:
        try:
            replica = await streams.remote.replica(stream_id, owner)
        except (RedisError, OSError):
            raise StreamInterrupted("the resumable streams' store is not answering") from None
        if replica is not None:
            if not await _reaches(replica, after, _REPLICA_LAG_S):  # as a local stream's
                raise InvalidRequest(f"this stream has no event {after} yet")
            try:
                replica.events_after(after)
            except Gone:
                raise StreamNotFound("the events after that id are no longer kept") from None
            return await _resume_from_redis(request, replica, after)
    raise StreamNotFound("no resumable stream with that id for this key (it may have expired)")


def resume_chat_route(frontend: WireFormat) -> web.RouteDef:
    """``GET {prefix}{resume_path}``: a chat's latest stream, by the chat's own id,
    replayed from its start while it is streaming; 204 when none is."""
    assert frontend.resume_path is not None

    async def resume_chat(request: web.Request) -> web.StreamResponse:
        app = request.app
        await tenant_of(request)
        owner = exchange_of(request).owner
        chat_id = request.match_info["chat_id"]
        streams = app[RESUMABLE]
        if app[LIFECYCLE].draining and streams.remote is not None:
            raise Draining("this replica is shutting down; resume on another", retry_after=0)
        journal = streams.chat_stream(frontend.name, owner, chat_id)
        if journal is not None and not journal.finished:
            return await _resume_here(request, journal, 0)
        if journal is None and streams.remote is not None:
            try:
                replica = await streams.remote.chat_stream(frontend.name, owner, chat_id)
            except (RedisError, OSError):
                raise StreamInterrupted("the resumable streams' store is not answering") from None
            if replica is not None:
                return await _resume_from_redis(request, replica, 0)
        return web.Response(status=204)

    return web.get(f"{frontend.prefix}{frontend.resume_path}", resume_chat, allow_head=False)


async def _resume_here(request: web.Request, journal: Journal, after: int) -> web.StreamResponse:
    app, ex = request.app, exchange_of(request)
    streams = app[RESUMABLE]
    app[METRICS].streams_resumed.labels(journal.tenant).inc()
    _link(ex, journal)
    streams.reader_joined(journal)
    try:
        return await follow(request, journal, after, ex, resumed=True)
    finally:
        streams.reader_left(journal)


async def _resume_from_redis(
    request: web.Request, replica: Journal, after: int
) -> web.StreamResponse:
    """A stream another replica produces, read here from Redis."""
    ex = exchange_of(request)
    remote = request.app[RESUMABLE].remote
    assert remote is not None
    request.app[METRICS].streams_resumed.labels(ex.tenant).inc()
    _link(ex, replica)
    replica.readers += 1
    try:
        return await follow(request, replica, after, ex, resumed=True)
    finally:
        replica.readers -= 1
        remote.release(replica)
