"""What OpenAI's two APIs here (chat completions, Responses) share: the error
object, what ChatIQ cannot do, and ChatIQ's extra events as text."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.errors import GatewayError, InvalidRequest, UnknownBot, UnsupportedParameter

ROLES = frozenset({"system", "developer", "user", "assistant"})  # a message's, in both APIs
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_denied",
    404: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def role_of(where: str, message: dict[str, Any]) -> str:
    """A message's role, one of ``ROLES``; ``InvalidRequest`` naming ``where`` if not."""
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequest(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}")
    return role


def chatiq_error(payload: dict[str, Any]) -> tuple[str, str]:
    """ChatIQ's own mid-stream error event as OpenAI's (code, message)."""
    error = payload["error"] if isinstance(payload["error"], dict) else {}
    code = str(error.get("code") or "upstream_error").lower()
    return code, str(error.get("message") or "the chat service failed")


def error_body(err: GatewayError) -> tuple[int, dict[str, Any]]:
    """OpenAI's status and error object for a gateway error."""
    if isinstance(err, UnknownBot):
        return 404, {
            "message": err.message, "type": "invalid_request_error", "param": "model",
            "code": "model_not_found",
        }  # fmt: skip
    codes = {401: "invalid_api_key", 403: "permission_denied", 429: "rate_limit_exceeded"}
    code = codes.get(err.status, err.code.lower())
    kind = _TYPES.get(err.status, "server_error")
    return err.status, {"message": err.message, "type": kind, "param": err.param, "code": code}


def openai_error_response(err: GatewayError) -> web.Response:
    status, error = error_body(err)
    response = web.json_response({"error": error}, status=status, headers=err.headers)
    if err.closes_connection:
        response.force_close()
    return response


def refuse_what_chatiq_cannot_do(tool_choice: object, output_format: object, where: str) -> None:
    """``UnsupportedParameter`` for a forced tool call or a JSON output format
    (``where``: the format's field): ChatIQ answers in plain text."""
    if tool_choice == "required" or isinstance(tool_choice, dict):
        raise UnsupportedParameter(
            "'tool_choice' forces a tool call, and ChatIQ answers in plain text and calls "
            'no tools: leave it out, or use "auto" or "none"',
            param="tool_choice",
        )
    if tool_choice not in (None, "auto", "none"):
        raise InvalidRequest('\'tool_choice\' must be "auto" or "none" here')
    kind = output_format.get("type") if isinstance(output_format, dict) else None
    if kind in ("json_schema", "json_object"):
        raise UnsupportedParameter(
            f"'{where}' of type {kind} asks for JSON, and ChatIQ answers in plain text: "
            'leave it out, or use {"type": "text"}',
            param=where,
        )


def delta_content(payload: dict[str, Any]) -> str | None:
    try:
        content = payload["choices"][0]["delta"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def readable(payload: dict[str, Any]) -> str | None:
    """What an OpenAI client can show of ChatIQ's other events: further
    messages, and attachments as Markdown links, each after a blank line."""
    parts: list[str] = []
    responses = payload.get("responses")
    if isinstance(responses, list):
        parts += [r for r in responses if isinstance(r, str)]
    attachments = payload.get("attachments")
    if isinstance(attachments, list):
        for a in attachments:
            if isinstance(a, dict) and isinstance(a.get("url"), str):
                label = str(a.get("name") or a.get("type") or "attachment")
                bang = "!" if a.get("type") == "image" else ""
                parts.append(f"{bang}[{label}]({a['url']})")
    return "".join(f"\n\n{p}" for p in parts) or None
