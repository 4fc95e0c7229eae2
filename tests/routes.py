"""Every chat route's request and its answers, in each frontend's own shape:
what the tests that run one case over all the frontends share."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.sse import SSEParser


@dataclass(frozen=True)
class Route:
    path: str
    body: Callable[[str, str], dict[str, Any]]  # bot, message -> the frontend's request body
    # How its streams end: [DONE] after everything (an error event just before
    # it), or (OpenAI's Responses API) response.completed, or response.failed,
    # or (MCP) the call's result, an error result when it failed.
    ending: str = "done"
    headers: dict[str, str] | None = None  # what its clients send besides the key

    def ended_whole(self, events: list[str]) -> bool:
        if self.ending == "done":
            return events[-1] == "[DONE]"
        last = json.loads(events[-1])
        if self.ending == "result":
            return last["result"]["isError"] is False
        return bool(last["type"] == "response.completed")

    def ending_error(self, events: list[str]) -> str | None:
        """The error code a failed stream ended with (its error event's)."""
        if self.ending == "done":
            return self.error_code(events[-2]) if events[-1] == "[DONE]" else None
        return self.error_code(events[-1])

    def error_code(self, data: str) -> str | None:
        """The gateway's error code in one event's data, in any frontend's shape."""
        payload = json.loads(data)
        if payload.get("type") == "error":  # ai-sdk: the ChatIQ error as errorText
            payload = json.loads(payload["errorText"])
        if payload.get("type") == "response.failed":  # OpenAI's Responses API
            payload = payload["response"]
        if "result" in payload:  # MCP: an error result says why in its _meta
            code = (payload["result"].get("_meta") or {}).get(MCP_ERROR, {}).get("code")
            return None if code is None else str(code)
        error = payload.get("error")
        return str(error["code"]).upper() if isinstance(error, dict) else None

    def refusal(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, str | None]:
        """A request turned away: its status and Retry-After (MCP: a call's error
        result, HTTP 200, that says both, for the model to read)."""
        if self.ending != "result":
            return status, headers.get("Retry-After")
        assert status == 200, body
        detail = json.loads(body)["result"]["_meta"][MCP_ERROR]
        return detail["status"], str(detail["retryAfter"])


MCP_ERROR = "io.chatiq/error"
ROUTES = {
    "chatiq": Route("/api/chatbot", lambda bot, m: {"message": m, "bot": bot}),
    "openai": Route(
        "/v1/chat/completions",
        lambda bot, m: {"model": bot, "messages": [{"role": "user", "content": m}], "stream": True},
    ),
    "responses": Route(
        "/v1/responses", lambda bot, m: {"model": bot, "input": m, "stream": True}, "response"
    ),
    "ai-sdk": Route(
        "/api/ui/chat",
        lambda bot, m: {
            "bot": bot,
            "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": m}]}],
        },
    ),
    "mcp": Route(
        "/mcp",
        lambda bot, m: {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {
                "name": f"ask_{bot}",
                "arguments": {"question": m},
                "_meta": {"progressToken": 1},
            },
        },
        "result",
        {"Accept": "application/json, text/event-stream"},
    ),
}


def events_of(body: bytes) -> list[str]:
    """The ``data`` of each event of a stream (the one SSE parser)."""
    return [e.data for e in SSEParser().feed(body) if e.data is not None]
