"""OpenAI's Responses API, part of the ``openai`` frontend: ``POST {prefix}/responses``
(streaming and not), ``GET`` and ``DELETE {prefix}/responses/{id}``. What the
OpenAI Agents SDK, the AI SDK's ``openai(model)`` and pydantic-ai's
``openai:`` models call by default.

- ``model`` is the bot. ``input`` is a string, or a list of message items
  (string content, or ``input_text``/``output_text`` parts): the last one (a
  user's) is the message, the ones before it the history. ``instructions``
  goes first in the history as a system turn, as chat completions' system
  messages do: ChatIQ has no system prompt, and the bot decides what it
  makes of it.
- ``previous_response_id`` continues the ChatIQ conversation that response
  produced; each response's id is kept with its conversation for
  ``responses.retain_s`` (in Redis with ``[redis]``, so any replica finds it).
  ``store: false`` keeps nothing: that response cannot be continued or read.
- A stream is OpenAI's: ``event:``/``data:`` events with a ``sequence_number``,
  ``response.created`` to ``response.completed`` (or ``response.failed``,
  carrying the error), no ``[DONE]``. ChatIQ's further ``responses`` and
  ``attachments`` (as Markdown links) are text, after a blank line, with the
  event itself as ``chatiq`` on that delta; ``suggestions`` and the
  ``conversation_id`` are in the response's ``chatiq`` field.
- ChatIQ answers in plain text: a forced tool or a JSON ``text.format`` is a
  400. ChatIQ reports no tokens: ``usage`` is zeros.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import orjson
from aiohttp import web

from gateway.chat import ChatRequest, check_bot, check_history, json_object, split_messages
from gateway.config import Settings, Tenant
from gateway.conversations.store import RESPONSE_STORE, new_response_id
from gateway.errors import GatewayError, InvalidRequest, PreviousResponseNotFound
from gateway.exchange import Exchange, exchange_of
from gateway.frontends.openai_common import (
    chatiq_error,
    delta_content,
    error_body,
    openai_error_response,
    readable,
    refuse_what_chatiq_cannot_do,
    role_of,
)

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})
_RESPONSE_ID = re.compile(r"^resp_[0-9a-zA-Z_-]{1,120}$")
_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 0,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 0,
}


def parse_responses_request(raw: bytes, settings: Settings) -> ChatRequest:
    body = json_object(raw)
    if body.get("model") is None:
        raise InvalidRequest("'model' is required: a bot slug (GET /v1/models lists them)")
    bot = check_bot(body["model"], settings.upstream.bot_slug, name="model")
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object")
    refuse_what_chatiq_cannot_do(body.get("tool_choice"), (text or {}).get("format"), "text.format")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("'instructions' must be a string")
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    elif not isinstance(items, list):
        raise InvalidRequest("'input' must be a string or a list of message items")
    message, history = split_messages(items, _turn, settings.server, "content", name="input")
    if instructions:  # first, as a system turn (ChatIQ has no system prompt)
        history = [{"role": "system", "content": instructions}, *history]
        check_history(history, settings.server, name="instructions and input")
    previous = body.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not _RESPONSE_ID.match(previous)):
        raise InvalidRequest("'previous_response_id' must be the id of a response (resp_...)")
    for flag in ("stream", "store", "parallel_tool_calls"):
        if not isinstance(body.get(flag, False), bool):
            raise InvalidRequest(f"'{flag}' must be true or false")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InvalidRequest("'metadata' must be an object of at most 16 strings")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string")
    return ChatRequest(
        message=message,
        bot=bot,
        stream=body.get("stream", False),
        history=history or None,
        extras={
            "previous_response_id": previous,
            "store": body.get("store", True),
            "instructions": instructions,
            "metadata": metadata or {},
            "user": user,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
        },
    )


def _turn(index: int, item: object) -> tuple[str, str]:
    """An input item's role and text: a message, with string content or text parts."""
    where = f"input[{index}]"
    if not isinstance(item, dict):
        raise InvalidRequest(f"'{where}' must be an object")
    kind = item.get("type", "message")
    if kind != "message":
        raise InvalidRequest(
            f"'{where}.type' {kind!r}: only message items (ChatIQ answers in text, "
            "and calls no tools)"
        )
    role = role_of(where, item)
    content = item.get("content")
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list):
        raise InvalidRequest(f"'{where}.content' must be a string or a list of parts")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise InvalidRequest(f"'{where}.content': each part must be an object")
        kind = part.get("type")
        if kind == "refusal":
            continue
        if not isinstance(kind, str) or kind not in _TEXT_PARTS:
            raise InvalidRequest(f"'{where}.content': ChatIQ takes text parts, not {kind!r}")
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"'{where}.content': a text part needs a 'text' string")
        texts.append(part["text"])
    return role, "\n".join(texts)


class ResponsesFormat:
    """The Responses API's wire format, under the ``openai`` frontend's name."""

    resumable = False
    resume_path = None

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix

    def parse(self, raw: bytes, settings: Settings) -> ChatRequest:
        return parse_responses_request(raw, settings)

    async def prepare(self, request: web.Request, tenant: Tenant, chat: ChatRequest) -> ChatRequest:
        """The conversation ``previous_response_id`` continues, and this response's id."""
        extras = dict(chat.extras or {})
        store = request.app[RESPONSE_STORE]
        owner = exchange_of(request).owner  # the tenant's, or its signed-in user's
        conversation_id = None
        previous = extras["previous_response_id"]
        if previous is not None:
            found = await store.find(owner, previous)
            if found is None or found.conversation_id is None:
                raise PreviousResponseNotFound(
                    f"no response {previous!r} to continue: unknown, expired, not stored, "
                    "or not this key's"
                )
            conversation_id = found.conversation_id
        response_id = new_response_id()
        extras["response_id"] = response_id
        if extras["store"]:
            extras["remember"] = lambda conversation, response: store.remember(
                owner, response_id, conversation, response
            )
        return replace(chat, conversation_id=conversation_id, extras=extras)

    def encoder(self, chat: ChatRequest, ex: Exchange) -> ResponseEvents:
        return ResponseEvents(chat)

    def completion(self, body: bytes, chat: ChatRequest, ex: Exchange) -> web.Response:
        answer = orjson.loads(body)  # the upstream client checked it is a JSON object
        text = answer.get("response")
        text = text if isinstance(text, str) else ""
        shape = ResponseShape(chat)
        shape.conversation_id = answer.get("conversationId")
        extra = {k: v for k, v in answer.items() if k not in ("response", "conversationId")}
        shape.chatiq.update(extra)
        response = shape.response("completed", [shape.message(text, "completed")])
        shape.remember(response)
        return web.Response(body=orjson.dumps(response), content_type="application/json")

    def error_response(self, err: GatewayError) -> web.Response:
        return openai_error_response(err)


class ResponseShape:
    """The ``response`` object of one request, as it is built up."""

    def __init__(self, chat: ChatRequest) -> None:
        extras = chat.extras or {}
        self._chat = chat
        self._extras = extras
        self.id: str = extras.get("response_id") or new_response_id()
        self.message_id = "msg_" + self.id.removeprefix("resp_")
        self.created_at = int(time.time())
        self.conversation_id: Any = chat.conversation_id
        self.chatiq: dict[str, Any] = {}

    def response(
        self, status: str, output: list[dict[str, Any]], error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        extras = self._extras
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": None,
            "instructions": extras.get("instructions"),
            "max_output_tokens": None,
            "model": self._chat.bot,
            "output": output,
            "parallel_tool_calls": extras.get("parallel_tool_calls", True),
            "previous_response_id": extras.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": extras.get("store", True),
            "temperature": None,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": None,
            "truncation": "disabled",
            "usage": _USAGE if status == "completed" else None,
            "user": extras.get("user"),
            "metadata": extras.get("metadata") or {},
            "chatiq": {"conversation_id": self.conversation_id, **self.chatiq},
        }

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_text_part(text)]
        return {
            "id": self.message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def remember(self, response: dict[str, Any]) -> None:
        remember = self._extras.get("remember")
        if remember is not None:
            conversation = self.conversation_id if isinstance(self.conversation_id, str) else None
            remember(conversation, response)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseEvents:
    """ChatIQ's events as the Responses API's stream events."""

    def __init__(self, chat: ChatRequest) -> None:
        self.headers: Mapping[str, str] = {}
        self._shape = ResponseShape(chat)
        self._sequence = 0
        self._text: list[str] = []
        self._started = False
        self._failed = False

    def event(self, payload: dict[str, Any]) -> bytes:
        if "choices" in payload:
            return self._delta(delta_content(payload), None)
        if "conversationId" in payload:
            self._shape.conversation_id = payload["conversationId"]
            return b""
        if "error" in payload:  # ChatIQ's own mid-stream error
            return self._fail(*chatiq_error(payload))
        if "suggestions" in payload:
            self._shape.chatiq["suggestions"] = payload["suggestions"]
        return self._delta(readable(payload), payload)

    def done(self) -> bytes:
        if self._failed:
            return b""
        shape, text = self._shape, "".join(self._text)
        out = self._start()
        ids = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
        out += self._send("response.output_text.done", {**ids, "text": text, "logprobs": []})
        out += self._send("response.content_part.done", {**ids, "part": _text_part(text)})
        message = shape.message(text, "completed")
        out += self._send("response.output_item.done", {"output_index": 0, "item": message})
        response = shape.response("completed", [message])
        shape.remember(response)
        return out + self._send("response.completed", {"response": response})

    def error(self, err: GatewayError) -> bytes:
        _, error = error_body(err)
        return self._fail(str(error["code"]), err.message)

    def _fail(self, code: str, message: str) -> bytes:
        self._failed = True
        out = self._start()
        shape = self._shape
        output = [shape.message("".join(self._text), "incomplete")]
        response = shape.response("failed", output, {"code": code, "message": message})
        return out + self._send("response.failed", {"response": response})

    def _start(self) -> bytes:
        """The opening events, once: the response, its message, its text part."""
        if self._started:
            return b""
        self._started = True
        shape = self._shape
        response = shape.response("in_progress", [])
        out = self._send("response.created", {"response": response})
        out += self._send("response.in_progress", {"response": response})
        out += self._send(
            "response.output_item.added",
            {"output_index": 0, "item": shape.message(None, "in_progress")},
        )
        part = {"item_id": shape.message_id, "output_index": 0, "content_index": 0}
        return out + self._send("response.content_part.added", {**part, "part": _text_part("")})

    def _delta(self, text: str | None, chatiq: dict[str, Any] | None) -> bytes:
        out = self._start()
        if not text:
            return out
        self._text.append(text)
        delta: dict[str, Any] = {
            "item_id": self._shape.message_id,
            "output_index": 0,
            "content_index": 0,
            "delta": text,
            "logprobs": [],
        }
        if chatiq is not None:
            delta["chatiq"] = chatiq
        return out + self._send("response.output_text.delta", delta)

    def _send(self, kind: str, fields: dict[str, Any]) -> bytes:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


# GET and DELETE {prefix}/responses/{response_id}


async def get_response(request: web.Request, tenant: Tenant, settings: Settings) -> web.Response:
    response_id = request.match_info["response_id"]
    found = await request.app[RESPONSE_STORE].find(exchange_of(request).owner, response_id)
    if found is None or found.response is None:
        raise PreviousResponseNotFound(f"no stored response {response_id!r} for this key")
    return web.json_response(found.response, dumps=lambda o: orjson.dumps(o).decode())


async def delete_response(request: web.Request, tenant: Tenant, settings: Settings) -> web.Response:
    response_id = request.match_info["response_id"]
    if not await request.app[RESPONSE_STORE].forget(exchange_of(request).owner, response_id):
        raise PreviousResponseNotFound(f"no stored response {response_id!r} for this key")
    return web.json_response({"id": response_id, "object": "response", "deleted": True})
