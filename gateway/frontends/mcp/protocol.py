"""MCP's JSON-RPC 2.0 as it travels over Streamable HTTP: reading one message,
the two eras of the protocol and their checks, and the answers' bytes.

Two eras are served, as the SDKs negotiate them:
- the handshake era (2025-03-26, 2025-06-18, 2025-11-25): ``initialize``
  names the version, later requests carry it in ``MCP-Protocol-Version``;
- the per-request era (2026-07-28): no handshake, each request carries its
  version and the client's capabilities in ``params._meta`` and repeats the
  version, the method and the tool's name in headers (``server/discover``
  tells a client what is served).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from aiohttp import web

from gateway.chat import json_object
from gateway.errors import GatewayError, InvalidRequest

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020
UNSUPPORTED_PROTOCOL_VERSION = -32022

HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")  # newest first
PER_REQUEST_VERSIONS = ("2026-07-28",)
ALL_VERSIONS = (*PER_REQUEST_VERSIONS, *HANDSHAKE_VERSIONS)
# Without the header, a handshake-era client is taken to speak this one (as the
# 2025-06-18 transport says a server should).
VERSION_WITHOUT_HEADER = "2025-03-26"

VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"

PROTOCOL_VERSION_HEADER = "MCP-Protocol-Version"
METHOD_HEADER = "Mcp-Method"
NAME_HEADER = "Mcp-Name"
SESSION_HEADER = "Mcp-Session-Id"

try:
    _VERSION = version("chatiq-gateway")
except PackageNotFoundError:  # run from a source tree that was never installed
    _VERSION = "0"
SERVER_INFO = {"name": "chatiq-gateway", "title": "ChatIQ Gateway", "version": _VERSION}

# The HTTP status of a request's JSON-RPC error in the per-request era (its
# transport's table); handshake-era errors go with 200, as that era's servers do.
_PER_REQUEST_STATUS = {
    PARSE_ERROR: 400,
    INVALID_REQUEST: 400,
    INVALID_PARAMS: 400,
    HEADER_MISMATCH: 400,
    UNSUPPORTED_PROTOCOL_VERSION: 400,
    METHOD_NOT_FOUND: 404,
}
_BASE64_VALUE = re.compile(r"^=\?base64\?(.*)\?=$")


class RpcError(Exception):
    """A JSON-RPC error answer: its code, a message for a person, and data."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def status(self, per_request: bool) -> int:
        if self.code == PARSE_ERROR or not per_request:
            return 400 if self.code in (PARSE_ERROR, INVALID_REQUEST) else 200
        return _PER_REQUEST_STATUS.get(self.code, 200)


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message from the client. ``id`` is None for a notification
    (and for a client's answer, which this server never asks for)."""

    method: str | None
    id: int | str | None
    params: dict[str, Any]

    @property
    def is_request(self) -> bool:
        return self.id is not None and self.method is not None

    @property
    def meta(self) -> Mapping[str, Any]:
        meta = self.params.get("_meta")
        return meta if isinstance(meta, dict) else {}


def read_message(raw: bytes) -> Message:
    """The body as one JSON-RPC message; ``RpcError`` says what is wrong with it."""
    if raw.lstrip()[:1] == b"[":
        raise RpcError(
            INVALID_REQUEST, "send one JSON-RPC message per request: batches are not served"
        )
    try:
        body = json_object(raw)
    except InvalidRequest as e:
        code = INVALID_REQUEST if "must be a JSON object" in e.message else PARSE_ERROR
        raise RpcError(code, e.message) from None
    if body.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, "'jsonrpc' must be \"2.0\"")
    rpc_id = body.get("id")
    if rpc_id is not None and (isinstance(rpc_id, bool) or not isinstance(rpc_id, int | str)):
        raise RpcError(INVALID_REQUEST, "'id' must be a string or an integer")
    if isinstance(rpc_id, int) and not -(2**63) <= rpc_id < 2**63:  # it is sent back as it came
        raise RpcError(INVALID_REQUEST, "'id' must be an integer of 64 bits at most")
    method = body.get("method")
    if method is None:
        if "result" in body or "error" in body:  # a client's answer: nothing was asked
            return Message(None, None, {})
        raise RpcError(INVALID_REQUEST, "'method' is required")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, "'method' must be a string")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise RpcError(INVALID_REQUEST, "'params' must be an object")
    return Message(method, rpc_id, params)


def is_per_request(message: Message, headers: Mapping[str, str]) -> bool:
    """Whether a request is of the per-request era: its version in ``_meta``, or in
    the header as that era's (then its ``_meta`` must say so too)."""
    return (
        VERSION_KEY in message.meta or headers.get(PROTOCOL_VERSION_HEADER) in PER_REQUEST_VERSIONS
    )


def per_request_version(message: Message, headers: Mapping[str, str]) -> str | None:
    """The version of a per-request-era request, checked as that era asks
    (``RpcError`` if it fails); None for a handshake-era request."""
    if not is_per_request(message, headers):
        return None
    meta = message.params.get("_meta")
    header = headers.get(PROTOCOL_VERSION_HEADER)
    if not isinstance(meta, dict) or VERSION_KEY not in meta or CAPABILITIES_KEY not in meta:
        raise RpcError(
            INVALID_PARAMS,
            f"params._meta must carry {VERSION_KEY!r} and {CAPABILITIES_KEY!r}",
        )
    requested = meta[VERSION_KEY]
    if header != requested:
        raise RpcError(
            HEADER_MISMATCH, f"the {PROTOCOL_VERSION_HEADER} header does not match params._meta"
        )
    if headers.get(METHOD_HEADER) != message.method:
        raise RpcError(HEADER_MISMATCH, f"the {METHOD_HEADER} header does not match the method")
    if message.method == "tools/call":
        name = message.params.get("name")
        if name is not None and _header_value(headers.get(NAME_HEADER)) != name:
            raise RpcError(
                HEADER_MISMATCH, f"the {NAME_HEADER} header does not match the tool's name"
            )
    if not isinstance(requested, str):
        raise RpcError(INVALID_PARAMS, "the protocol version must be a string")
    if requested not in PER_REQUEST_VERSIONS:
        raise RpcError(
            UNSUPPORTED_PROTOCOL_VERSION,
            "unsupported protocol version",
            {"supported": list(ALL_VERSIONS), "requested": requested},
        )
    return requested


def _header_value(value: str | None) -> str | None:
    """A header as the per-request era encodes a value that is not plain ASCII."""
    if value is None:
        return None
    found = _BASE64_VALUE.fullmatch(value)
    if found is None:
        return value
    try:
        return base64.b64decode(found.group(1), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def handshake_version(requested: object) -> str:
    """The version an ``initialize`` agrees to: the client's, if served, else the newest."""
    return (
        requested
        if isinstance(requested, str) and requested in HANDSHAKE_VERSIONS
        else HANDSHAKE_VERSIONS[0]
    )


def result(rpc_id: int | str, value: dict[str, Any]) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": value})


def error(rpc_id: int | str | None, err: RpcError) -> bytes:
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.data is not None:
        body["data"] = err.data
    return orjson.dumps({"jsonrpc": "2.0", "id": rpc_id, "error": body})


def sse_message(message: bytes) -> bytes:
    """One JSON-RPC message as an event of a ``text/event-stream`` answer."""
    return b"event: message\ndata: " + message + b"\n\n"


def http_error_response(err: GatewayError) -> web.Response:
    """An error of the HTTP exchange itself (no key, a bad Origin, a body too
    large, an unknown session): its status, with a JSON-RPC error that names
    the gateway's code in ``data``."""
    code = INVALID_REQUEST if 400 <= err.status < 500 else INTERNAL_ERROR
    body = error(None, RpcError(code, err.message, {"code": err.code}))
    response = web.Response(
        body=body, status=err.status, content_type="application/json", headers=err.headers
    )
    if err.closes_connection:
        response.force_close()
    return response
