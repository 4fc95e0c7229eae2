"""The native frontend: ChatIQ's own shape, ``POST {prefix}/chatbot`` (the
contract's route). A stream's bytes are the upstream's, untouched."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from gateway.chat import (
    ChatRequest,
    StreamEncoder,
    check_bot,
    check_conversation_id,
    check_history,
    check_message,
    json_object,
)
from gateway.config import Settings
from gateway.errors import GatewayError, InvalidRequest
from gateway.exchange import Exchange, error_response
from gateway.frontends.base import Frontend

_FIELDS = frozenset({"message", "conversation_id", "bot", "stream", "history", "private_mode"})


class ChatIQFrontend(Frontend):
    name = "chatiq"
    resumable = True
    default_prefix = "/api"

    def routes(self) -> Iterable[web.RouteDef]:
        return [self.chat_route("/chatbot")]

    def parse(self, raw: bytes, settings: Settings) -> ChatRequest:
        return parse_chat_request(raw, settings)

    def encoder(self, chat: ChatRequest, ex: Exchange) -> StreamEncoder | None:
        return None

    def completion(self, body: bytes, chat: ChatRequest, ex: Exchange) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    def error_response(self, err: GatewayError) -> web.Response:
        return error_response(err)


def parse_chat_request(raw: bytes, settings: Settings) -> ChatRequest:
    body = json_object(raw)
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}")
    limits = settings.server
    message = check_message(body.get("message"), limits)
    bot = check_bot(body.get("bot"), settings.upstream.bot_slug)
    conversation_id = check_conversation_id(body.get("conversation_id"))
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false")
    private_mode = body.get("private_mode")
    if private_mode is not None and not isinstance(private_mode, bool):
        raise InvalidRequest("'private_mode' must be true or false")
    history = body.get("history")
    if history is not None:
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise InvalidRequest("'history' must be a list of objects")
        check_history(history, limits)
    return ChatRequest(
        message=message,
        bot=bot,
        stream=stream,
        conversation_id=conversation_id,
        history=history,
        private_mode=private_mode,
    )
