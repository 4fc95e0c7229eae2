"""The Vercel AI SDK's UI message stream, what ``useChat`` (``DefaultChatTransport``)
speaks: ``POST {prefix}/chat``, answered with ``x-vercel-ai-ui-message-stream: v1``.

- The body is ``useChat``'s: ``id`` (the chat), ``messages`` (each with
  ``role`` and ``parts``); the last one, a user's, is the message, its text
  parts joined; the ones before are the history. The bot comes from a ``bot``
  field (``useChat``'s ``body`` option adds it), else the default bot.
- ChatIQ's ``conversationId`` is the message's metadata (a
  ``message-metadata`` part and ``finish``'s ``messageMetadata``:
  ``{"conversationId": ...}``); the next request continues that conversation
  when it names it as ``conversation_id``, or when the assistant messages it
  sends back carry it in their metadata (as ``useChat`` keeps them).
- Content is one text part; each of ChatIQ's further ``responses`` a text
  part of its own; ``attachments`` are ``file`` parts; ``suggestions`` a
  ``data-suggestions`` part.
- A failure after the stream started is an ``error`` part (``useChat`` sets
  its ``error``), then ``[DONE]``.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web
from multidict import istr

from gateway.chat import (
    ChatRequest,
    StreamEncoder,
    check_bot,
    check_conversation_id,
    conversation_header,
    json_object,
    split_messages,
)
from gateway.config import Settings
from gateway.errors import GatewayError, InvalidRequest
from gateway.exchange import Exchange, error_response
from gateway.frontends.base import Frontend
from gateway.sse import DONE_EVENT

HEADER: dict[str, str] = {istr("x-vercel-ai-ui-message-stream"): "v1"}


class AISDKFrontend(Frontend):
    name = "ai-sdk"
    resumable = True
    # useChat's resume hook (``resume: true``): GET {api}/{chat id}/stream, 204 if
    # nothing is streaming, else the stream replayed from its start.
    resume_path = "/chat/{chat_id}/stream"
    default_prefix = "/api/ui"

    def routes(self) -> Iterable[web.RouteDef]:
        return [self.chat_route("/chat")]

    def parse(self, raw: bytes, settings: Settings) -> ChatRequest:
        body = json_object(raw)
        message, history = split_messages(body.get("messages"), _turn, settings.server, "parts")
        earlier = body["messages"][:-1]  # split_messages checked: a list of objects
        remembered = [c for c in map(_remembered, earlier) if c is not None]
        conversation_id = body.get("conversation_id") or (remembered[-1] if remembered else None)
        return ChatRequest(
            message=message,
            bot=check_bot(body.get("bot"), settings.upstream.bot_slug),
            stream=True,  # useChat always streams
            conversation_id=check_conversation_id(conversation_id),
            history=history or None,
            chat_id=_chat_id(body.get("id")),
        )

    def encoder(self, chat: ChatRequest, ex: Exchange) -> StreamEncoder:
        return UIMessageEncoder(chat, ex)

    def completion(self, body: bytes, chat: ChatRequest, ex: Exchange) -> web.Response:
        return web.Response(body=body, content_type="application/json")  # never asked for

    def error_response(self, err: GatewayError) -> web.Response:
        # DefaultChatTransport throws an Error whose message is the body's text.
        return error_response(err)


def _turn(index: int, message: object) -> tuple[str, str]:
    """A UI message's role and its text parts joined."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{where}' must be an object")
    role = message.get("role")
    if not isinstance(role, str) or role not in ("system", "user", "assistant"):
        raise InvalidRequest(f"'{where}.role' must be system, user or assistant")
    parts = message.get("parts")
    if not isinstance(parts, list) or not all(
        isinstance(p, dict) and isinstance(p.get("type"), str) for p in parts
    ):
        raise InvalidRequest(f"'{where}.parts' must be a list of parts, each with a 'type'")
    texts = [p.get("text") for p in parts if p.get("type") == "text"]
    if not all(isinstance(t, str) for t in texts):
        raise InvalidRequest(f"'{where}.parts': a text part needs a 'text' string")
    return role, "".join(texts)


def _chat_id(chat_id: object) -> str | None:
    """useChat's chat id, under which a resumable stream is resumed (else none)."""
    if isinstance(chat_id, str) and 0 < len(chat_id) <= 200 and chat_id.isprintable():
        return chat_id
    return None


def _remembered(message: dict[str, Any]) -> str | None:
    """The conversation id in a message's metadata (useChat keeps it on its assistant messages)."""
    metadata = message.get("metadata")
    remembered = metadata.get("conversationId") if isinstance(metadata, dict) else None
    return remembered if isinstance(remembered, str) else None


class UIMessageEncoder:
    """ChatIQ's events as UI message stream parts."""

    def __init__(self, chat: ChatRequest, ex: Exchange) -> None:
        self._message_id = f"msg-{ex.request_id}"
        self._conversation_id = chat.conversation_id
        self._text_id: str | None = None  # the open text part
        self._texts = 0
        self._started = False
        self._failed = False
        self.headers: Mapping[str, str] = {**HEADER, **conversation_header(chat.conversation_id)}

    def event(self, payload: dict[str, Any]) -> bytes:
        out = self._start()
        if "choices" in payload:
            try:
                delta = payload["choices"][0]["delta"]["content"]
            except (KeyError, IndexError, TypeError):
                return out
            if isinstance(delta, str) and delta:
                if self._text_id is None:
                    out += self._open_text()
                out += _part({"type": "text-delta", "id": self._text_id, "delta": delta})
            return out
        if "conversationId" in payload:
            self._conversation_id = payload["conversationId"]
            return out + _part({"type": "message-metadata", "messageMetadata": self._metadata()})
        if "error" in payload:  # ChatIQ's own mid-stream error
            error = payload["error"] if isinstance(payload["error"], dict) else {}
            self._failed = True
            text = str(error.get("message") or "the chat service failed")
            return out + self._close_text() + _part({"type": "error", "errorText": text})
        responses = payload.get("responses")
        if isinstance(responses, list):  # further messages: a text part each
            for response in (r for r in responses if isinstance(r, str)):
                out += self._close_text() + self._open_text()
                out += _part({"type": "text-delta", "id": self._text_id, "delta": response})
        attachments = payload.get("attachments")
        if isinstance(attachments, list):
            for a in attachments:
                if isinstance(a, dict) and isinstance(a.get("url"), str):
                    out += _part({"type": "file", "url": a["url"], "mediaType": _media_type(a)})
        suggestions = payload.get("suggestions")
        if isinstance(suggestions, list):
            out += _part({"type": "data-suggestions", "data": suggestions})
        return out

    def done(self) -> bytes:
        out = self._start() + self._close_text()
        if not self._failed:
            out += _part({"type": "finish-step"})
            out += _part({"type": "finish", "messageMetadata": self._metadata()})
        return out + DONE_EVENT

    def error(self, err: GatewayError) -> bytes:
        out = self._start() + self._close_text()
        return out + _part({"type": "error", "errorText": err.body_json()}) + DONE_EVENT

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        start: dict[str, Any] = {"type": "start", "messageId": self._message_id}
        if self._conversation_id:
            start["messageMetadata"] = self._metadata()
        return _part(start) + _part({"type": "start-step"})

    def _open_text(self) -> bytes:
        self._texts += 1
        self._text_id = f"text-{self._texts}"
        return _part({"type": "text-start", "id": self._text_id})

    def _close_text(self) -> bytes:
        if self._text_id is None:
            return b""
        text_id, self._text_id = self._text_id, None
        return _part({"type": "text-end", "id": text_id})

    def _metadata(self) -> dict[str, Any]:
        return {"conversationId": self._conversation_id}


def _media_type(attachment: dict[str, Any]) -> str:
    guessed, _ = mimetypes.guess_type(attachment["url"])
    if guessed:
        return guessed
    return "image/*" if attachment.get("type") == "image" else "application/octet-stream"


def _part(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
