"""The tools: one per bot the caller's key may use (``ask_<slug>``), what a call
of one asks ChatIQ, and its answer as MCP's tool result, streamed with
progress notifications or whole.

A result's first content is exactly the bot's reply, as text; ChatIQ's
further messages follow as text, its attachments as ``resource_link``s
(Markdown links for clients of 2025-03-26, which has none), its suggestions
as one text. ``structuredContent`` is ``{text, conversation_id}``, with
``suggestions`` and ``attachments`` when ChatIQ sent them. A failure is a
result with ``isError`` and a message a model can act on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.chat import ChatRequest, check_conversation_id, check_message
from gateway.config import Settings, Tenant, bots_for
from gateway.errors import GatewayError, InvalidRequest
from gateway.exchange import Exchange
from gateway.frontends.mcp.protocol import (
    INVALID_PARAMS,
    SERVER_INFO,
    SERVER_INFO_KEY,
    RpcError,
    http_error_response,
    result,
    sse_message,
)
from gateway.frontends.openai_common import chatiq_error, delta_content

TOOL_PREFIX = "ask_"
_NOT_IN_A_TOOL_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "question": {
            "type": "string",
            "description": "The question, in the user's words; the bot answers from its documents",
        },
        "conversation_id": {
            "type": "string",
            "description": "An earlier answer's conversation_id, to ask a follow-up in it",
        },
    },
    "required": ["question"],
    "additionalProperties": False,
}
OUTPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "description": "The bot's answer"},
        "conversation_id": {
            "type": "string",
            "description": "Pass it with the next question to continue the conversation",
        },
    },
    "required": ["text"],
}


def tool_name(bot: str) -> str:
    return TOOL_PREFIX + _NOT_IN_A_TOOL_NAME.sub("_", bot)


def list_tools(tenant: Tenant, settings: Settings) -> list[dict[str, Any]]:
    descriptions = {b.slug: b.description for b in settings.bots}
    return [
        {
            "name": tool_name(bot),
            "title": f"Ask {bot}",
            "description": descriptions.get(bot) or f"Ask the {bot} bot",
            "inputSchema": INPUT_SCHEMA,
            "outputSchema": OUTPUT_SCHEMA,
            "annotations": {"readOnlyHint": True, "destructiveHint": False, "openWorldHint": False},
        }
        for bot in bots_for(tenant, settings)
    ]


def bot_of(name: object, tenant: Tenant, settings: Settings) -> str:
    """The bot a tool name asks; ``RpcError`` for a tool this key does not have."""
    if isinstance(name, str):
        for bot in bots_for(tenant, settings):
            if tool_name(bot) == name:
                return bot
        slug = name.removeprefix(TOOL_PREFIX)
        if name.startswith(TOOL_PREFIX) and _SLUG.match(slug) and tenant.may_use(slug):
            return slug  # a "*" key may ask any bot, listed or not
    raise RpcError(INVALID_PARAMS, f"no tool {name!r} for this key (tools/list names them)")


def chat_of(
    params: Mapping[str, Any], bot: str, settings: Settings, stream: bool, extras: dict[str, Any]
) -> ChatRequest:
    """A call's arguments as the chat to send; ``InvalidRequest`` (a tool error
    the model can correct) for bad ones."""
    arguments = params.get("arguments", {})
    if not isinstance(arguments, dict):
        raise InvalidRequest('the arguments must be an object: {"question": "..."}')
    unknown = sorted(set(arguments) - {"question", "conversation_id"})
    if unknown:
        raise InvalidRequest(
            f"unknown argument {unknown[0]!r}: the tool takes question and conversation_id"
        )
    question = check_message(arguments.get("question"), settings.server, name="question")
    conversation_id = check_conversation_id(arguments.get("conversation_id"))
    return ChatRequest(
        message=question, bot=bot, stream=stream, conversation_id=conversation_id, extras=extras
    )


def error_text(err: GatewayError) -> str:
    """What a model reads of a failed call: what happened, and what it may do."""
    text = f"The bot could not answer: {err.message} ({err.code})."
    if err.retry_after is not None:
        text += f" Try again in {err.headers['Retry-After']} s."
    elif err.status >= 500:
        text += " Try again later."
    return text


ERROR_KEY = "io.chatiq/error"  # an error result's _meta: the gateway's code, status, retry hint


class ToolResult:
    """One call's result, as ChatIQ's events build it up (``extras``: the call's,
    as ``tools/call`` put them in its chat request)."""

    def __init__(self, extras: Mapping[str, Any]) -> None:
        self.rpc_id: int | str = extras["rpc_id"]
        self.links = extras.get("links", True)  # resource_link contents (2025-06-18 on)
        self.text: list[str] = []
        self.more: list[dict[str, Any]] = []  # contents after the reply
        self.conversation_id: object = None
        self.suggestions: list[Any] = []
        self.attachments: list[Any] = []
        self.per_request = extras.get("per_request", False)

    def take(self, payload: dict[str, Any]) -> None:
        """ChatIQ's events other than content and errors."""
        if "conversationId" in payload:
            self.conversation_id = payload["conversationId"]
        responses = payload.get("responses")
        if isinstance(responses, list):
            self.more += [{"type": "text", "text": r} for r in responses if isinstance(r, str)]
        attachments = payload.get("attachments")
        if isinstance(attachments, list):
            for a in attachments:
                if isinstance(a, dict) and isinstance(a.get("url"), str):
                    self.attachments.append(a)
                    self.more.append(self._attachment(a))
        suggestions = payload.get("suggestions")
        if isinstance(suggestions, list):
            self.suggestions += suggestions
            labels = [s.get("label") if isinstance(s, dict) else s for s in suggestions]
            lines = [f"- {label}" for label in labels if isinstance(label, str)]
            if lines:
                self.more.append(
                    {"type": "text", "text": "Suggested follow-ups:\n" + "\n".join(lines)}
                )

    def _attachment(self, a: dict[str, Any]) -> dict[str, Any]:
        name = str(a.get("name") or a.get("type") or "attachment")
        if not self.links:
            return {"type": "text", "text": f"[{name}]({a['url']})"}
        link: dict[str, Any] = {"type": "resource_link", "uri": a["url"], "name": name}
        if a.get("type") == "image":
            link["description"] = "an image"
        return link

    def answer(self) -> bytes:
        text = "".join(self.text)
        structured: dict[str, Any] = {"text": text}
        if isinstance(self.conversation_id, str):
            structured["conversation_id"] = self.conversation_id
        if self.suggestions:
            structured["suggestions"] = self.suggestions
        if self.attachments:
            structured["attachments"] = self.attachments
        value = {
            "content": [{"type": "text", "text": text}, *self.more],
            "structuredContent": structured,
            "isError": False,
        }
        return result(self.rpc_id, self._stamped(value))

    def failed(self, err: GatewayError, text: str | None = None) -> bytes:
        """An error result for ``err``: ``text`` for the model (``error_text``'s by
        default), and the gateway's code, status and retry hint in ``_meta``."""
        detail: dict[str, Any] = {"code": err.code, "status": err.status}
        if err.retry_after is not None:
            detail["retryAfter"] = int(err.headers["Retry-After"])
        return self.failure(error_text(err) if text is None else text, detail)

    def failure(self, text: str, detail: dict[str, Any]) -> bytes:
        value = {
            "content": [{"type": "text", "text": text}],
            "isError": True,
            "_meta": {ERROR_KEY: detail},
        }
        return result(self.rpc_id, self._stamped(value))

    def _stamped(self, value: dict[str, Any]) -> dict[str, Any]:
        return stamp(value) if self.per_request else value


def stamp(value: dict[str, Any]) -> dict[str, Any]:
    """A per-request-era result: complete, and naming the server."""
    meta = {**value.get("_meta", {}), SERVER_INFO_KEY: SERVER_INFO}
    return {**value, "resultType": "complete", "_meta": meta}


class ToolCallEvents:
    """A call's stream: a progress notification for each piece of the reply
    (when the call asked for progress), then the result."""

    def __init__(self, chat: ChatRequest) -> None:
        self.headers: Mapping[str, str] = {}
        self._result = ToolResult(chat.extras or {})
        token = (chat.extras or {}).get("progress_token")
        # Each notification is this, the characters so far, and the new piece:
        # one encode of the piece an event.
        self._progress_head = (
            None
            if token is None
            else (
                b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress",'
                b'"params":{"progressToken":' + orjson.dumps(token) + b',"progress":'
            )
        )
        self._chars = 0
        self._ended = False

    def event(self, payload: dict[str, Any]) -> bytes:
        if "choices" in payload:
            piece = delta_content(payload)
            if not piece:
                return b""
            self._result.text.append(piece)
            if self._progress_head is None:
                return b""
            self._chars += len(piece)
            return b'%b%d,"message":%b}}\n\n' % (
                self._progress_head,
                self._chars,
                orjson.dumps(piece),
            )
        if "error" in payload:  # ChatIQ's own, mid-stream
            code, message = chatiq_error(payload)
            text = f"The bot failed while answering: {message} ({code.upper()})."
            return self._end(self._result.failure(text, {"code": code.upper()}))
        self._result.take(payload)
        return b""

    def done(self) -> bytes:
        return self._end(self._result.answer())

    def error(self, err: GatewayError) -> bytes:
        partial = "".join(self._result.text)
        text = error_text(err)
        if partial:
            text += f" Its answer so far: {partial}"
        return self._end(self._result.failed(err, text))

    def _end(self, message: bytes) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        return sse_message(message)


class ToolCallFormat:
    """The wire format of a ``tools/call``, as the pipeline serves it."""

    resumable = False
    resume_path = None
    prepare = None

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix

    def parse(self, raw: bytes, settings: Settings) -> ChatRequest:
        raise InvalidRequest("a tool call is read by the MCP server, not on its own")

    def encoder(self, chat: ChatRequest, ex: Exchange) -> ToolCallEvents:
        return ToolCallEvents(chat)

    def completion(self, body: bytes, chat: ChatRequest, ex: Exchange) -> web.Response:
        answer = orjson.loads(body)  # the upstream client checked it is a JSON object
        shape = ToolResult(chat.extras or {})
        text = answer.get("response")
        shape.text.append(text if isinstance(text, str) else "")
        shape.take({k: v for k, v in answer.items() if k != "response"})
        return web.Response(body=shape.answer(), content_type="application/json")

    def error_response(self, err: GatewayError) -> web.Response:
        return http_error_response(err)
