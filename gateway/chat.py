"""The gateway's one neutral chat request, the checks every frontend's parser
applies to its parts (so that each refuses the same things the same way), and
what the stream path sees of a frontend: ``WireFormat`` and its
``StreamEncoder``. Frontends implement them (``gateway.frontends.base``); the
pipeline, the relay and resumed streams use them, and none of those imports a
frontend."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Protocol

from aiohttp import web
from multidict import istr

from gateway.config import ServerSettings, Settings, Tenant
from gateway.errors import GatewayError, InvalidRequest
from gateway.exchange import Exchange

_BOT_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_CONVERSATION_ID_CHARS = 200
_HEADER_SAFE = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")

# json.dumps's own C encoder with json.dumps's defaults, made once (json.dumps
# makes one on every call, ~11k instructions of its ~22k): the same text, and
# the same errors. Its arguments: markers (for the circular check), default
# (json's, which refuses what JSON has no form for), the string encoder,
# indent, key and item separators, sort_keys, skipkeys, allow_nan.
_ENCODE = c_make_encoder(
    {}, json.JSONEncoder().default, encode_basestring_ascii, None, ": ", ", ", False, False, True
)


def _no_constant(name: str) -> float:
    """NaN, Infinity, -Infinity: json.loads reads them, JSON has no such values."""
    raise InvalidRequest(f"the body holds {name}, which is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: json.loads would read it as infinity
        raise InvalidRequest("the body holds a number too large for a JSON float")
    return value


# json.loads's own decoder, but for numbers JSON has no form for (they would
# reach the upstream as NaN or Infinity, which is not JSON).
_DECODE = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant).decode


@dataclass(frozen=True, slots=True)
class ChatRequest:
    message: str
    bot: str
    stream: bool = True
    conversation_id: str | None = None
    history: list[Any] | None = None
    private_mode: bool | None = None
    # The frontend's own options for its answer (never sent upstream).
    extras: dict[str, Any] | None = None
    # The client's own id for the chat (the AI SDK's ``id``): its latest
    # resumable stream can be resumed by it (never sent upstream).
    chat_id: str | None = None

    def upstream_json(self) -> bytes:
        """The upstream request's body: ``json.dumps(self.upstream_body())``."""
        return "".join(_ENCODE(self.upstream_body(), 0)).encode()

    def upstream_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": self.message,
            "bot_slug": self.bot,
            "stream": self.stream,
            "conversation_id": self.conversation_id,
        }
        if self.history is not None:
            body["history"] = self.history
        if self.private_mode is not None:
            body["private_mode"] = self.private_mode
        return body


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object; ``InvalidRequest`` says why not.

    json, not orjson: orjson reads an integer past 64 bits as a float, and a
    client's history must reach the upstream as the client wrote it."""
    try:
        if raw[:1] == b"{" and raw[1:2] != b"\x00":
            # What json.loads does with such bytes, without its Python-side
            # guess of the encoding (~6k instructions of its ~19k): no BOM, and
            # not UTF-16 or -32, so UTF-8, lone surrogates passed through.
            text = raw.decode("utf-8", "surrogatepass")
        else:  # json.loads's own way: a BOM, UTF-16 or -32
            text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        body = _DECODE(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidRequest("the body is not valid JSON") from None
    except ValueError:  # the only other: an integer past Python's digit limit
        raise InvalidRequest(
            f"the body holds a number of more than {sys.get_int_max_str_digits()} digits"
        ) from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


CONVERSATION_ID_HEADER = istr("X-Conversation-Id")


def conversation_header(conversation_id: object) -> dict[str, str]:
    """``X-Conversation-Id`` for a response, when the id can go in a header as it
    is (visible ASCII and spaces; anything else stays in the body only)."""
    if isinstance(conversation_id, str) and _HEADER_SAFE.fullmatch(conversation_id):
        return {CONVERSATION_ID_HEADER: conversation_id}
    return {}


def check_text(name: str, value: str) -> None:
    """Refuse what JSON allows but no upstream should get: NUL, and lone surrogates."""
    if "\x00" in value:
        raise InvalidRequest(f"'{name}' must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"'{name}' is not valid Unicode (a lone surrogate)") from None


def check_message(
    message: object, limits: ServerSettings, name: str = "message", empty: str = "must not be empty"
) -> str:
    """``empty``: what to say of a message with no text (blank, or only files)."""
    if message is None:
        raise InvalidRequest(f"'{name}' is required")
    if not isinstance(message, str):
        raise InvalidRequest(f"'{name}' must be a string")
    if not message.strip():
        raise InvalidRequest(f"'{name}' {empty}")
    check_text(name, message)
    if len(message) > limits.max_message_chars:
        raise InvalidRequest(f"'{name}' is longer than {limits.max_message_chars} characters")
    return message


def check_bot(bot: object, default_bot: str, name: str = "bot") -> str:
    if bot is None:
        return default_bot
    if not isinstance(bot, str) or not _BOT_SLUG.match(bot):
        raise InvalidRequest(f"'{name}' must be a bot slug (letters, digits, '.', '_', '-')")
    return bot


def check_conversation_id(conversation_id: object) -> str | None:
    if conversation_id is None:
        return None
    if (
        not isinstance(conversation_id, str)
        or not 0 < len(conversation_id) <= MAX_CONVERSATION_ID_CHARS
    ):
        raise InvalidRequest(
            f"'conversation_id' must be null or a string of 1 to "
            f"{MAX_CONVERSATION_ID_CHARS} characters"
        )
    check_text("conversation_id", conversation_id)
    return conversation_id


def check_history(history: list[Any], limits: ServerSettings, name: str = "history") -> None:
    """At most ``max_history_items``, and every string in each item (keys too)
    refused as the message's would be (NUL, lone surrogates)."""
    if len(history) > limits.max_history_items:
        raise InvalidRequest(f"'{name}' has more than {limits.max_history_items} items")
    for i, item in enumerate(history):
        check_strings(f"{name}[{i}]", item)


def check_strings(name: str, value: object) -> None:
    """``check_text`` on every string within ``value``. A loop, not recursion:
    a body nested as deep as the parser allows must not exhaust the stack."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            check_text(name, item)
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def split_messages(
    messages: object,
    turn: Callable[[int, object], tuple[str, str]],
    limits: ServerSettings,
    content: str,
    name: str = "messages",
) -> tuple[str, list[dict[str, str]]]:
    """A chat-style ``messages`` list as ChatIQ takes it: the last one (a user's)
    is the message, the ones before it the history. ``turn`` reads one message's
    role and text; ``content`` names the field the text came from, and ``name``
    the list, for errors."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"'{name}' must be a non-empty list")
    turns = [turn(i, m) for i, m in enumerate(messages)]
    role, text = turns[-1]
    if role != "user":
        raise InvalidRequest(f"the last of '{name}' must be the user's")
    no_text = "has no text to send (ChatIQ takes text, not images or files)"
    message = check_message(text, limits, name=f"{name}[-1].{content}", empty=no_text)
    history = [{"role": r, "content": t} for r, t in turns[:-1]]
    check_history(history, limits, name=name)
    return message, history


# What the stream path sees of a frontend


class StreamEncoder(Protocol):
    """One stream's events, in a frontend's wire format. Each method returns the
    bytes to send (``b""``: nothing). Called from the relay's hot path: keep it
    to one ``dumps`` per event."""

    headers: Mapping[str, str]  # extra response headers (the stream's head)

    def event(self, payload: dict[str, Any]) -> bytes:
        """One upstream event (its JSON, already checked to be an object)."""

    def done(self) -> bytes:
        """The upstream's ``[DONE]``: the frontend's own ending."""

    def error(self, err: GatewayError) -> bytes:
        """A failure after the stream started: an error the client's library
        raises, and the ending. Never a silent truncation."""


class WireFormat(Protocol):
    """A frontend, as the pipeline and resumed streams use it."""

    @property
    def name(self) -> str: ...

    @property
    def prefix(self) -> str: ...

    @property
    def resumable(self) -> bool: ...

    @property
    def resume_path(self) -> str | None: ...

    def parse(self, raw: bytes, settings: Settings) -> ChatRequest: ...

    # What it looks up once the caller is known (its own stored state), before
    # the upstream call; None: nothing (most frontends).
    @property
    def prepare(self) -> Prepare | None: ...

    def encoder(self, chat: ChatRequest, ex: Exchange) -> StreamEncoder | None: ...

    def completion(self, body: bytes, chat: ChatRequest, ex: Exchange) -> web.Response: ...

    def error_response(self, err: GatewayError) -> web.Response: ...


Prepare = Callable[[web.Request, Tenant, ChatRequest], Awaitable[ChatRequest]]


async def served_by_the_pipeline(request: web.Request) -> web.StreamResponse:
    """The handler of a frontend's chat route (``Frontend.chat_route``) until the
    app binds the route to the pipeline, with its frontend."""
    raise RuntimeError("a chat route is served once the app binds it to the pipeline")


@dataclass(frozen=True, slots=True)
class ServedByThePipeline:
    """A chat route with a wire format of its own (a frontend that speaks two,
    as OpenAI's chat completions and Responses): the app binds it to the
    pipeline with ``wire`` rather than the frontend."""

    wire: WireFormat

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a chat route is served once the app binds it to the pipeline")


TenantHandler = Callable[[web.Request, Tenant, Settings], Awaitable[web.StreamResponse]]


class Pipeline(Protocol):
    """What the shared pipeline does for a route that reads its own requests
    (``Dispatching``: MCP's JSON-RPC, where one route carries many methods and
    only some of them are chats)."""

    async def authenticate(self, request: web.Request) -> Tenant:
        """The caller's tenant (``Unauthorized`` if none), as every chat route's."""

    async def read_body(self, request: web.Request) -> bytes:
        """The JSON body, within the server's size and time limits."""

    async def serve(
        self, request: web.Request, tenant: Tenant, chat: ChatRequest, wire: WireFormat
    ) -> web.StreamResponse:
        """A parsed chat, from the bot check on, as every chat route's: its
        stream or answer in ``wire``'s format; a ``GatewayError`` before the
        stream starts."""


DispatchHandler = Callable[[web.Request, Pipeline, Settings], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Dispatching:
    """A route that reads its own requests (``Frontend.dispatch_route``): the app
    binds it to the pipeline, which calls ``handler(request, pipeline, settings)``."""

    handler: DispatchHandler

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a dispatching route is served once the app binds it")


@dataclass(frozen=True, slots=True)
class ForTenant:
    """A route's handler that needs the caller's tenant (``Frontend.tenant_route``):
    the app binds it to the pipeline's authentication, which calls ``handler``
    with the tenant and the settings in force."""

    handler: TenantHandler

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        raise RuntimeError("a tenant route is served once the app binds it")
