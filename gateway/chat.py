"""The body of ``POST /api/chatbot``: parsed, checked, and turned into ChatIQ's body."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .config import ServerSettings
from .errors import InvalidRequest

_BOT_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_CONVERSATION_ID_CHARS = 200
_FIELDS = frozenset({"message", "conversation_id", "bot", "stream", "history", "private_mode"})


@dataclass(frozen=True, slots=True)
class ChatRequest:
    message: str
    bot: str
    stream: bool = True
    conversation_id: str | None = None
    history: list[Any] | None = None
    private_mode: bool | None = None

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


def _check_text(name: str, value: str) -> None:
    """Refuse what JSON allows but no upstream should get: NUL, and lone surrogates."""
    if "\x00" in value:
        raise InvalidRequest(f"'{name}' must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"'{name}' is not valid Unicode (a lone surrogate)") from None


def parse_chat_request(raw: bytes, limits: ServerSettings, default_bot: str) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidRequest("the body is not valid JSON") from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}")

    message = body.get("message")
    if message is None:
        raise InvalidRequest("'message' is required")
    if not isinstance(message, str):
        raise InvalidRequest("'message' must be a string")
    if not message.strip():
        raise InvalidRequest("'message' must not be empty")
    _check_text("message", message)
    if len(message) > limits.max_message_chars:
        raise InvalidRequest(f"'message' is longer than {limits.max_message_chars} characters")

    bot = body.get("bot")
    if bot is None:
        bot = default_bot
    elif not isinstance(bot, str) or not _BOT_SLUG.match(bot):
        raise InvalidRequest("'bot' must be a bot slug (letters, digits, '.', '_', '-')")

    conversation_id = body.get("conversation_id")
    if conversation_id is not None and (
        not isinstance(conversation_id, str)
        or not 0 < len(conversation_id) <= MAX_CONVERSATION_ID_CHARS
    ):
        raise InvalidRequest(
            f"'conversation_id' must be null or a string of 1 to "
            f"{MAX_CONVERSATION_ID_CHARS} characters"
        )

    if conversation_id is not None:
        _check_text("conversation_id", conversation_id)

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
        if len(history) > limits.max_history_items:
            raise InvalidRequest(f"'history' has more than {limits.max_history_items} items")

    return ChatRequest(
        message=message,
        bot=bot,
        stream=stream,
        conversation_id=conversation_id,
        history=history,
        private_mode=private_mode,
    )
