"""The client's side of a stream, shared by the relay and resumed streams: the
event-stream response and its headers, the keep-alive ping, a write that
gives up on a client that stopped reading, and the translation of upstream
events into a frontend's bytes.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import hdrs, web
from multidict import istr

from gateway.chat import StreamEncoder
from gateway.errors import (
    UpstreamError,
    UpstreamProtocolError,
)
from gateway.sse import DONE_DATA, Event

# Header names are istr, as aiohttp's own (hdrs): multidict keeps an istr key as
# it is, where a str one is copied into a new istr for each response, and again
# when the head is written (~700 bytes a held stream).
SSE_HEADERS: dict[str, str] = {
    hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
    hdrs.CACHE_CONTROL: "no-cache",
    istr("X-Accel-Buffering"): "no",
}


PING = b": ping\n\n"


# While the client's socket buffer holds fewer bytes than this, even after the
# write, a write cannot wait for a drain: the transports pause (and aiohttp
# waits) only above their high-water mark, 64 KiB for asyncio and uvloop.
WRITE_ROOM = 16 * 1024


class EventStreamResponse(web.StreamResponse):
    """A streamed response whose head waits for its first bytes (as aiohttp's
    ``Response`` does): the head and the first events go out in one write."""

    _send_headers_immediately = False


class SlowClient(Exception):
    """The client read nothing for ``client_write_timeout_s``."""


# What ``translate`` found, as a plain tuple (a NamedTuple costs a Python call
# to build, and its fields are slow to read, on a path taken for every read):
# - the wire bytes, one piece per upstream event (comments too, natively);
# - a malformed event's error (nothing from it on goes out), or None;
# - whether ``[DONE]`` is among them (and nothing after it);
# - whether a content chunk is among them (the first token, if none came before);
# - how many data events are among them;
# - the code of ChatIQ's own error event among them (it ends the stream), or None;
# - the conversation id ChatIQ named among them (for the trace), or None.
Translated = tuple[list[bytes], UpstreamError | None, bool, bool, int, str | None, object]


def translate(events: list[Event], encoder: StreamEncoder | None) -> Translated:
    """Upstream events as the client's wire bytes: the upstream's own (``encoder``
    None, the native frontend), or a frontend's encoding (comments dropped).
    Stops after ``[DONE]``, or before an event that is not a JSON object."""
    pieces: list[bytes] = []
    failure: UpstreamError | None = None
    done = content = False
    count = 0
    error_code: str | None = None
    conversation: object = None
    for event in events:
        data = event.data
        if data is None:
            if encoder is None:
                pieces.append(event.raw)
            continue
        if data == DONE_DATA:
            pieces.append(event.raw if encoder is None else encoder.done())
            count += 1
            done = True
            break
        # Every event is checked to be a JSON object, with orjson: one C call
        # (json.loads is three Python calls around its C scanner, ~5x slower
        # here), and stricter (no NaN, no lone surrogates, depth 1024).
        try:
            payload = orjson.loads(data)
        except ValueError:
            failure = UpstreamProtocolError("the chat service sent a malformed event")
            break
        if type(payload) is not dict:
            failure = UpstreamProtocolError("the chat service sent an event that is not an object")
            break
        count += 1
        content = content or "choices" in payload
        if "error" in payload:
            error_code = _error_code(payload["error"])
        if "conversationId" in payload:
            conversation = payload["conversationId"]
        pieces.append(event.raw if encoder is None else encoder.event(payload))
    return pieces, failure, done, content, count, error_code, conversation


def _error_code(error: object) -> str:
    """An upstream error event's code, for the log (bounded, printable)."""
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(code, str) or not code.isprintable():
        return "UNKNOWN"
    return code[:64]


async def send_to_client(
    request: web.Request,
    response: web.StreamResponse,
    payload: bytes,
    timeout_s: float,
    *,
    end: bool = False,
) -> None:
    """Write ``payload`` through aiohttp, waiting out a slow client for at most
    ``timeout_s`` (``SlowClient`` past it). ``end``: the response ends with it."""
    write = response.write_eof if end else response.write
    transport = request.transport
    if transport is not None and transport.get_write_buffer_size() + len(payload) < WRITE_ROOM:
        # The client keeps up: the write cannot wait for a drain, so no timer is needed.
        await write(payload)
        return
    try:
        async with asyncio.timeout(timeout_s):
            await write(payload)
    except TimeoutError:
        raise SlowClient from None
