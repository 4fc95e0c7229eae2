"""OpenAI's chat completions, for the tools that speak it (the ``openai`` SDKs,
LangChain's ``ChatOpenAI``, Open WebUI...): ``POST {prefix}/chat/completions``
and ``GET {prefix}/models``.

- ``model`` is the bot slug; the last message (a user's) is the message, the
  ones before it the history (``{"role", "content"}`` each, text only).
- ``conversation_id`` may be passed as an extra body field; ChatIQ's
  ``conversationId`` comes back as ``conversation_id`` on the last chunk (and
  on a non-streaming completion), and as the ``X-Conversation-Id`` header
  when it is known before the answer (the request named one; or always, when
  not streaming).
- ChatIQ's other events are not lost: ``responses`` (further messages) and
  ``attachments`` (as Markdown links) become content, after a blank line,
  and every such chunk carries the event itself as ``chatiq`` (an extra
  field the SDKs keep: ``chunk.model_extra["chatiq"]``); ``suggestions``
  only as ``chatiq``.
- ``n`` must be 1 (or absent): ChatIQ gives one answer a request, and a
  client asking for several choices is told so rather than sent fewer.
- ChatIQ answers in plain text: a ``tool_choice`` that forces a tool
  (``"required"``, a named function) and a ``response_format`` of type
  ``json_schema`` or ``json_object`` are a 400 (``unsupported_parameter``),
  not an answer the client's parser fails on later; ``tools`` with
  ``tool_choice`` absent, ``"auto"`` or ``"none"`` are taken (the bot answers
  in text).
- ChatIQ reports no token counts: ``usage`` (with
  ``stream_options.include_usage``, or on a completion) is all zeros.
- Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
  before a stream and as its last event after it started, which the SDKs raise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.chat import (
    ChatRequest,
    StreamEncoder,
    check_bot,
    check_conversation_id,
    conversation_header,
    json_object,
    split_messages,
)
from gateway.config import Settings, Tenant, bots_for
from gateway.errors import GatewayError, InvalidRequest, UnknownBot
from gateway.exchange import Exchange
from gateway.frontends.base import Frontend
from gateway.frontends.openai_common import (
    chatiq_error,
    delta_content,
    error_body,
    openai_error_response,
    readable,
    refuse_what_chatiq_cannot_do,
    role_of,
)
from gateway.frontends.responses import ResponsesFormat, delete_response, get_response
from gateway.sse import DONE_EVENT

_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


class OpenAIFrontend(Frontend):
    name = "openai"
    default_prefix = "/v1"

    def routes(self) -> Iterable[web.RouteDef]:
        return [
            self.chat_route("/chat/completions"),
            self.chat_route("/responses", ResponsesFormat(self.name, self.prefix)),
            self.tenant_route("GET", "/responses/{response_id}", get_response),
            self.tenant_route("DELETE", "/responses/{response_id}", delete_response),
            self.tenant_route("GET", "/models", list_models),
            self.tenant_route("GET", "/models/{model}", get_model),
        ]

    def parse(self, raw: bytes, settings: Settings) -> ChatRequest:
        body = json_object(raw)
        if body.get("model") is None:
            raise InvalidRequest("'model' is required: a bot slug (GET /v1/models lists them)")
        bot = check_bot(body["model"], settings.upstream.bot_slug, name="model")
        message, history = split_messages(body.get("messages"), _turn, settings.server, "content")
        refuse_what_chatiq_cannot_do(
            body.get("tool_choice"), body.get("response_format"), "response_format"
        )
        n = body.get("n")  # several choices: ChatIQ gives one answer, so only 1 (or absent)
        if n is not None and (type(n) is not int or n != 1):
            raise InvalidRequest("'n' must be 1: ChatIQ gives one answer a request")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be true or false")
        options = body.get("stream_options")
        if options is None:  # absent, or null as OpenAI's API allows
            options = {}
        elif not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object")
        if not isinstance(options.get("include_usage", False), bool):
            raise InvalidRequest("'stream_options.include_usage' must be true or false")
        return ChatRequest(
            message=message,
            bot=bot,
            stream=stream,
            conversation_id=check_conversation_id(body.get("conversation_id")),
            history=history or None,
            extras={"include_usage": options.get("include_usage") is True},
        )

    def encoder(self, chat: ChatRequest, ex: Exchange) -> StreamEncoder:
        return ChunkEncoder(chat, ex)

    def completion(self, body: bytes, chat: ChatRequest, ex: Exchange) -> web.Response:
        answer = orjson.loads(body)  # the upstream client checked it is a JSON object
        text = answer.get("response")
        text = text if isinstance(text, str) else ""
        conversation_id = answer.get("conversationId")
        completion: dict[str, Any] = {
            "id": f"chatcmpl-{ex.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.bot,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": _USAGE,
            "conversation_id": conversation_id,
        }
        extra = {k: v for k, v in answer.items() if k not in ("response", "conversationId")}
        if extra:
            completion["chatiq"] = extra
        return web.Response(
            body=orjson.dumps(completion),
            content_type="application/json",
            headers=conversation_header(conversation_id),
        )

    def error_response(self, err: GatewayError) -> web.Response:
        return openai_error_response(err)


def _turn(index: int, message: object) -> tuple[str, str]:
    """A message's role and text (string content, or its text parts joined)."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"'{where}' must be an object")
    role = role_of(where, message)
    content = message.get("content")
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(f"'{where}.content': only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"'{where}.content': a text part needs a 'text' string")
            texts.append(part["text"])
        return role, "\n".join(texts)
    if content is None and role == "assistant":
        return role, ""
    raise InvalidRequest(f"'{where}.content' must be a string or a list of text parts")


class ChunkEncoder:
    """ChatIQ's events as ``chat.completion.chunk`` events."""

    def __init__(self, chat: ChatRequest, ex: Exchange) -> None:
        self._head = {
            "id": f"chatcmpl-{ex.request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": chat.bot,
        }
        self._include_usage = bool(chat.extras and chat.extras.get("include_usage"))
        self._conversation_id = chat.conversation_id
        self._role_sent = False
        self._failed = False
        self.headers: Mapping[str, str] = conversation_header(chat.conversation_id)

    def event(self, payload: dict[str, Any]) -> bytes:
        if "choices" in payload:
            return self._content(delta_content(payload), None)
        if "conversationId" in payload:
            self._conversation_id = payload["conversationId"]
            return b""
        if "error" in payload:  # ChatIQ's own mid-stream error
            code, message = chatiq_error(payload)
            self._failed = True
            return _error_event(message, "server_error", code)
        return self._content(readable(payload), payload)

    def done(self) -> bytes:
        if self._failed:
            return DONE_EVENT
        last = self._chunk({"index": 0, "delta": {}, "finish_reason": "stop"})
        last["conversation_id"] = self._conversation_id
        out = _data(last)
        if self._include_usage:
            out += _data({**self._head, "choices": [], "usage": _USAGE})
        return out + DONE_EVENT

    def error(self, err: GatewayError) -> bytes:
        _, error = error_body(err)
        return _error_event(error["message"], error["type"], error["code"]) + DONE_EVENT

    def _content(self, text: str | None, chatiq: dict[str, Any] | None) -> bytes:
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        if text:
            delta["content"] = text
        if not delta and chatiq is None:
            return b""
        chunk = self._chunk({"index": 0, "delta": delta, "finish_reason": None})
        if chatiq is not None:
            chunk["chatiq"] = chatiq
        return _data(chunk)

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self._head, "choices": [choice]}


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _error_event(message: str, kind: str, code: str) -> bytes:
    return _data({"error": {"message": message, "type": kind, "param": None, "code": code}})


def _model(bot: str) -> dict[str, Any]:
    return {"id": bot, "object": "model", "created": 0, "owned_by": "chatiq"}


async def list_models(request: web.Request, tenant: Tenant, settings: Settings) -> web.Response:
    models = [_model(b) for b in bots_for(tenant, settings)]
    return web.json_response({"object": "list", "data": models})


async def get_model(request: web.Request, tenant: Tenant, settings: Settings) -> web.Response:
    bot = request.match_info["model"]
    if bot not in bots_for(tenant, settings):
        raise UnknownBot(f"no model {bot!r} for this key")
    return web.json_response(_model(bot))
