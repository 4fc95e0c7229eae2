"""``chatiq-emulator``: a stand-in for ChatIQ's chat API, on one machine, no account.

Faithful to the contract's section 1: streaming and non-streaming answers,
content chunks, then ``conversationId``, then ``[DONE]``; conversations that
remember earlier messages; ``responses`` / ``attachments`` / ``suggestions``
events (bot ``rich``). Speed is set by knobs; faults are chosen per request by
the bot slug (``fault-429``, ``fault-stall-mid``, ...), so a test can ask for
one through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import struct
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

FAULTS = {
    "fault-400": "HTTP 400 (the request itself is refused)",
    "fault-429": "HTTP 429 with Retry-After",
    "fault-500": "HTTP 500",
    "fault-503": "HTTP 503 with Retry-After",
    "fault-reset": "connection reset before any response",
    "fault-stall-first": "no byte at all for --stall-s seconds",
    "fault-stall-mid": "three chunks, then silence for --stall-s seconds",
    "fault-ping-mid": "three chunks, then only ': ping' comments (one a second) for --stall-s",
    "fault-drop-mid": "three chunks, then the connection is cut (no [DONE])",
    "fault-error-mid": 'three chunks, then an {"error": ...} event and [DONE]',
    "fault-malformed": "three chunks, then an event whose JSON is broken",
    "fault-html": "HTTP 200 with an HTML page instead of events or JSON",
    "fault-redirect": "HTTP 302 to another host (which must never see the key)",
    "fault-endless": "HTTP 200 event-stream, then one line that never ends",
    "fault-huge": "a non-streaming answer of several megabytes",
}
REDIRECT_TO = "http://127.0.0.1:9/stolen"  # a cross-host redirect target nothing listens on
ONCE = "-once"  # suffix: the fault hits only the first attempt of a request id
RICH_BOT = "rich"
BULK_BOT = "bulk"  # content chunks of BULK_CHUNK_BYTES each: megabytes without many events
BULK_CHUNK_BYTES = 32 * 1024
CHUNKS_BEFORE_FAULT = 3
_FILLER = (
    "ChatIQ", "answers", "from", "your", "documents.", "Naïve", "café", "owners", "in",
    "Zürich", "read", "日本語", "manuals", "📚", "while", "the", "Straße", "hums;",
    "données,", "façade,", "jalapeño,", "Ελληνικά", "and", "emoji", "🙂🚀", "travel",
    "byte", "by", "byte.", "Streaming", "keeps", "the", "first", "token", "fast", "and",
    "the", "rest", "steady.",
)  # fmt: skip
_HISTORY_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class EmulatorSettings:
    ttft_s: float = 0.2
    tokens_per_s: float = 40.0  # 0: as fast as the socket takes them
    reply_tokens: int = 40
    split_writes: bool = False  # cut writes at random byte offsets
    seed: int = 0
    api_key: str | None = None  # when set, requests must carry it
    stall_s: float = 3600.0
    retry_after_s: int = 1
    record: bool = False  # keep what each request sent and received (tests)
    redirect_to: str = REDIRECT_TO  # where bot fault-redirect sends the caller
    image_url: str = "https://www.chatiq.io/logo.png"  # bot rich's attachment


@dataclass(slots=True)
class Transcript:
    """One request as the emulator saw it, and the bytes it wrote back."""

    headers: Mapping[str, str]
    body: dict[str, Any]
    sent: bytearray


SETTINGS = web.AppKey("settings", EmulatorSettings)
CONVERSATIONS: web.AppKey[OrderedDict[str, list[str]]] = web.AppKey("conversations")
TRANSCRIPTS: web.AppKey[OrderedDict[str, Transcript]] = web.AppKey("transcripts")
ATTEMPTS: web.AppKey[OrderedDict[str, int]] = web.AppKey("attempts")  # requests per request id


@dataclass(slots=True)
class Live:
    """Handlers running now: a caller that hangs up must bring this back down."""

    tasks: set[asyncio.Task[object]] = field(default_factory=set)

    @property
    def handlers(self) -> int:
        return len(self.tasks)


LIVE = web.AppKey("live", Live)


def create_emulator_app(settings: EmulatorSettings | None = None) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings or EmulatorSettings()
    app[CONVERSATIONS] = OrderedDict()
    app[TRANSCRIPTS] = OrderedDict()
    app[ATTEMPTS] = OrderedDict()
    app[LIVE] = Live()
    app.router.add_post("/api/chat", chat)
    app.router.add_get("/healthz", healthz)
    app.on_shutdown.append(end_replies)
    return app


async def end_replies(app: web.Application) -> None:
    """On shutdown, replies still streaming end at once: an emulator owes them
    no graceful end, and aiohttp, waiting on a handler as its shutdown times
    out, can fail to mark it finished ("Unhandled exception", InvalidStateError)."""
    tasks = list(app[LIVE].tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=1.0)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def _event(payload: object) -> bytes:
    return (
        b"data: "
        + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        + b"\n\n"
    )


DONE = b"data: [DONE]\n\n"


def compose_reply(message: str, earlier: list[str], tokens: int) -> list[str]:
    """A deterministic reply that shows the emulator remembers the conversation."""
    text = f"You asked: “{message[:80]}”."
    if earlier:
        text += f" Earlier you said: “{earlier[0][:80]}” ({len(earlier)} earlier messages)."
    words = text.split(" ")
    words += [_FILLER[i % len(_FILLER)] for i in range(tokens)]
    return [w + " " for w in words[:-1]] + [words[-1]]


def _abort(request: web.Request) -> None:
    """Cut the connection with a TCP reset, as a crashed server would."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _remember(store: OrderedDict[str, Any], key: str, value: Any) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > _HISTORY_LIMIT:
        store.popitem(last=False)


async def chat(request: web.Request) -> web.StreamResponse:
    live = request.app[LIVE]
    task = asyncio.current_task()
    assert task is not None
    live.tasks.add(task)
    try:
        return await _chat(request)
    finally:
        live.tasks.discard(task)


async def _chat(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if settings.api_key and request.headers.get("Authorization") != f"Bearer {settings.api_key}":
        return _error(401, "UNAUTHORIZED", "invalid API key")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "INVALID_REQUEST", "body is not JSON")
    if not isinstance(body, dict):
        return _error(400, "INVALID_REQUEST", "body must be an object")
    message, bot = body.get("message"), body.get("bot_slug")
    if not isinstance(message, str) or not message.strip():
        return _error(400, "INVALID_REQUEST", "message is required")
    if not isinstance(bot, str) or not bot:
        return _error(400, "INVALID_REQUEST", "bot_slug is required")

    request_id = request.headers.get("X-Request-Id", uuid.uuid4().hex)
    attempts = request.app[ATTEMPTS]
    attempt = attempts.get(request_id, 0) + 1
    _remember(attempts, request_id, attempt)
    transcript = Transcript(request.headers.copy(), body, bytearray())
    if settings.record:
        _remember(request.app[TRANSCRIPTS], request_id, transcript)
    if bot.endswith(ONCE):
        bot = bot.removesuffix(ONCE) if attempt == 1 else "demo"

    if bot == "fault-400":
        return _error(400, "INVALID_REQUEST", "this bot refuses every message")
    if bot == "fault-429":
        return _error(
            429, "RATE_LIMIT", "slow down", **{"Retry-After": str(settings.retry_after_s)}
        )
    if bot == "fault-500":
        return _error(500, "INTERNAL_ERROR", "the emulator failed on purpose")
    if bot == "fault-503":
        return _error(
            503, "UNAVAILABLE", "try later", **{"Retry-After": str(settings.retry_after_s)}
        )
    if bot == "fault-reset":
        _abort(request)
        raise asyncio.CancelledError
    if bot == "fault-stall-first":
        await asyncio.sleep(settings.stall_s)
    if bot == "fault-html":
        return web.Response(text="<html><body>Maintenance</body></html>", content_type="text/html")
    if bot == "fault-redirect":
        return web.Response(status=302, headers={"Location": settings.redirect_to})
    if bot == "fault-endless":
        return await _endless(request)
    if bot == "fault-huge":  # 8 MiB of valid JSON: over the gateway's max_json_bytes
        return web.Response(
            body=b'{"response": "' + b"x" * (8 << 20) + b'"}', content_type="application/json"
        )

    conversations = request.app[CONVERSATIONS]
    conversation_id = body.get("conversation_id") or f"conv_{uuid.uuid4().hex[:16]}"
    earlier = conversations.get(conversation_id, [])
    _remember(conversations, conversation_id, [*earlier, message])
    tokens = compose_reply(message, earlier, settings.reply_tokens)
    if bot == BULK_BOT:  # one shared string: megabytes on the wire, not in memory
        tokens = [("bulk " * (BULK_CHUNK_BYTES // 5))[:BULK_CHUNK_BYTES]] * len(tokens)

    if body.get("stream", True) is False:
        if bot == "fault-malformed":
            return web.Response(text='{"response": "trunc', content_type="application/json")
        await asyncio.sleep(settings.ttft_s)
        answer = {"response": "".join(tokens), "conversationId": conversation_id}
        return web.json_response(answer)
    return await _stream(request, bot, tokens, conversation_id, transcript)


async def _endless(request: web.Request) -> web.StreamResponse:
    """An event that never ends: 64 KiB pieces of one line, until the caller gives up."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    piece = b"x" * 65536
    try:
        await response.write(b"data: ")
        for _ in range(1024):  # 64 MiB at most
            await response.write(piece)
    except (ConnectionResetError, ConnectionError):
        pass
    return response


async def _stream(
    request: web.Request,
    bot: str,
    tokens: list[str],
    conversation_id: str,
    transcript: Transcript,
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    rng = random.Random(f"{settings.seed}:{request.headers.get('X-Request-Id', '')}")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    pending = bytearray()  # split mode: bytes held back to cut the next write

    async def flush() -> None:
        if pending:
            await response.write(bytes(pending))
            pending.clear()

    async def send(data: bytes) -> None:
        transcript.sent += data
        if not settings.split_writes:
            await response.write(data)
            return
        pending.extend(data)
        cut = rng.randint(0, len(pending))
        head, rest = bytes(pending[:cut]), bytes(pending[cut:])
        pending[:] = rest
        while head:
            piece = rng.randint(1, len(head))
            await response.write(head[:piece])
            head = head[piece:]
            await asyncio.sleep(0)

    try:
        await response.prepare(request)
        await _play(settings, bot, tokens, conversation_id, send, flush, lambda: _abort(request))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the caller hung up: nothing left to do
    return response


async def _play(
    settings: EmulatorSettings,
    bot: str,
    tokens: list[str],
    conversation_id: str,
    send: Callable[[bytes], Awaitable[None]],
    flush: Callable[[], Awaitable[None]],
    abort: Callable[[], None],
) -> None:
    """The events of one streamed reply, paced, with the bot's fault if it has one."""
    gap = 1 / settings.tokens_per_s if settings.tokens_per_s > 0 else 0.0
    await asyncio.sleep(settings.ttft_s)
    for i, token in enumerate(tokens):
        if i == CHUNKS_BEFORE_FAULT and bot.startswith("fault-"):
            if bot == "fault-stall-mid":
                await flush()
                await asyncio.sleep(settings.stall_s)
            elif bot == "fault-ping-mid":  # alive to a proxy that counts bytes, not answers
                for _ in range(math.ceil(settings.stall_s)):
                    await send(b": ping\n\n")
                    await flush()
                    await asyncio.sleep(1.0)
            elif bot == "fault-drop-mid":
                await flush()
                abort()
                return
            elif bot == "fault-error-mid":
                await send(
                    _event({"error": {"code": "RATE_LIMIT", "message": "quota hit mid-stream"}})
                )
                await send(DONE)
                break
            elif bot == "fault-malformed":
                await send(b'data: {"choices":[{"delta":{"content":"bro\n\n')
        await send(_event({"choices": [{"delta": {"content": token}}]}))
        if gap:
            await asyncio.sleep(gap)
    else:
        if bot == RICH_BOT:
            await send(_event({"responses": ["Here is a second message.", "And a third."]}))
            await send(_event({"attachments": [{"type": "image", "url": settings.image_url}]}))
            await send(_event({"suggestions": [{"label": "Tell me more"}, {"label": "Thanks!"}]}))
        await send(_event({"conversationId": conversation_id}))
        await send(DONE)
    await flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatiq-emulator", description=__doc__.split("\n\n")[0])
    d = EmulatorSettings()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8181)
    parser.add_argument(
        "--ttft-ms", type=float, default=d.ttft_s * 1000, help="delay before the first token"
    )
    parser.add_argument("--tokens-per-s", type=float, default=d.tokens_per_s, help="0: no pacing")
    parser.add_argument(
        "--reply-tokens", type=int, default=d.reply_tokens, help="filler tokens per reply"
    )
    parser.add_argument(
        "--split-writes", action="store_true", help="cut writes at random byte offsets"
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--stall-s", type=float, default=d.stall_s, help="how long a stall fault lasts"
    )
    parser.add_argument(
        "--image-url", default=d.image_url,
        help="bot rich's image attachment (a data: URL works offline)",
    )  # fmt: skip
    parser.add_argument(
        "--api-key-env",
        default="CHATIQ_API_KEY",
        help="require the key in this environment variable, when it is set (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    settings = EmulatorSettings(
        ttft_s=args.ttft_ms / 1000,
        tokens_per_s=args.tokens_per_s,
        reply_tokens=args.reply_tokens,
        split_writes=args.split_writes,
        seed=args.seed,
        stall_s=args.stall_s,
        api_key=os.environ.get(args.api_key_env) or None,
        image_url=args.image_url,
    )
    print(f"chatiq-emulator on http://{args.host}:{args.port}/api/chat", flush=True)
    web.run_app(
        create_emulator_app(settings),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        backlog=4096,  # a burst of new connections waits in the queue instead of being refused
        shutdown_timeout=1.0,  # a stalled reply is a fault to inject, not one to wait out
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
