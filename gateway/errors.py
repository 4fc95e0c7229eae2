"""Every failure the gateway reports, as one typed tree.

Each error knows its HTTP status and its ChatIQ error code, so one middleware
renders any of them before a stream starts, and the relay turns the same error
into a ChatIQ-style error event after it started. Upstream failures also carry
the ``kind`` label of ``upstream_errors_total``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable


class GatewayError(Exception):
    status = 500
    code = "INTERNAL_ERROR"
    # The ``reason`` label of ``rejected_total`` when this error turns a request away.
    reject_reason: str | None = None
    closes_connection = False  # the connection is closed after the answer
    param: str | None = None  # the request field at fault, where a frontend names it

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}

    def body_json(self) -> str:
        return json.dumps(self.body(), ensure_ascii=False)


class InvalidRequest(GatewayError):
    status = 400
    code = "INVALID_REQUEST"


class UnsupportedParameter(InvalidRequest):
    """A request for what ChatIQ cannot do (a forced tool call, JSON output):
    refused, rather than answered in part. ``param``: the field that asks."""

    code = "UNSUPPORTED_PARAMETER"

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class Unauthorized(GatewayError):
    """``error``: RFC 6750's code for the challenge (None: no credential was sent,
    and the challenge names none)."""

    status = 401
    code = "UNAUTHORIZED"

    def __init__(self, message: str, *, error: str | None = "invalid_token") -> None:
        super().__init__(message)
        self.error = error
        # Where a client finds how to sign in (RFC 9728), on the routes that say so.
        self.resource_metadata: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        params = []
        if self.error is not None:
            description = self.message.replace("\\", "\\\\").replace('"', '\\"')
            params += [f'error="{self.error}"', f'error_description="{description}"']
        if self.resource_metadata is not None:
            params.append(f'resource_metadata="{self.resource_metadata}"')
        return {"WWW-Authenticate": f"Bearer {', '.join(params)}".rstrip()}


class Forbidden(GatewayError):
    status = 403
    code = "FORBIDDEN"


class UnknownBot(Forbidden):
    """A bot neither this key nor the configuration names (403 on the native
    route, like any bot the key may not use; 404 where a frontend says so)."""


class NotFound(GatewayError):
    status = 404
    code = "NOT_FOUND"


class PreviousResponseNotFound(NotFound):
    """A ``previous_response_id`` (or a response id) this key cannot have:
    unknown, expired, forgotten, stored with ``store: false``, or another
    tenant's (all alike)."""

    code = "PREVIOUS_RESPONSE_NOT_FOUND"
    param = "previous_response_id"


class StreamNotFound(NotFound):
    """A resume of a stream this key cannot have: unknown, expired, another
    tenant's, or its missed events no longer kept (all alike, on purpose)."""

    code = "STREAM_NOT_FOUND"


class StreamInterrupted(GatewayError):
    """A resumed stream could not go on: the replica that read its upstream
    stopped writing it, or its store stopped answering."""

    status = 502
    code = "STREAM_INTERRUPTED"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "METHOD_NOT_ALLOWED"

    def __init__(self, message: str, allowed: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.allowed = sorted(allowed)

    @property
    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}  # required with a 405 (RFC 9110)


class RequestTimeout(GatewayError):
    """The request took too long to arrive; the connection is closed after the answer."""

    status = 408
    code = "REQUEST_TIMEOUT"
    reject_reason = "body_timeout"
    closes_connection = True  # the rest of the body may still come: the stream is out of step


class PayloadTooLarge(GatewayError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"


class RateLimited(GatewayError):
    status = 429
    code = "RATE_LIMIT"
    reject_reason = "rate_limit"


class TenantBusy(RateLimited):
    reject_reason = "tenant_concurrency"


class UserRateLimited(RateLimited):
    """A signed-in user's own requests-per-minute quota (``user_requests_per_minute``)."""

    reject_reason = "user_rate_limit"


class UserBusy(RateLimited):
    """A signed-in user's own concurrent streams quota (``user_max_streams``)."""

    reject_reason = "user_concurrency"


class Overloaded(GatewayError):
    status = 503
    code = "OVERLOADED"


class QuotaUnavailable(Overloaded):
    """The fleet's quota store (Redis) is down and ``redis.on_error`` is reject."""

    reject_reason = "quota_unavailable"


class QueueFull(Overloaded):
    reject_reason = "overload"


class QueueTimeout(Overloaded):
    reject_reason = "queue_timeout"


class Draining(GatewayError):
    status = 503
    code = "DRAINING"
    reject_reason = "draining"


class CircuitOpen(GatewayError):
    status = 503
    code = "UPSTREAM_UNAVAILABLE"


# --- upstream failures -----------------------------------------------------


class UpstreamError(GatewayError):
    """The upstream failed; ``kind`` labels ``upstream_errors_total`` (None: not counted).

    ``counts_against_upstream``: as a request's final outcome, a failure for
    its bot's circuit breaker (not so for a 4xx other than 429, which the
    request itself caused, or our own time limit).
    """

    status = 502
    code = "UPSTREAM_ERROR"
    kind: str | None = "protocol"
    counts_against_upstream = True
    detail: str | None = None  # what went wrong, for the log (never sent to the client)


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"


class UpstreamClosed(UpstreamError):
    """The upstream closed the stream before ``[DONE]``."""

    kind = "protocol"


class UpstreamHTTPError(UpstreamError):
    """The upstream answered with an error status (not 400 or 429)."""

    def __init__(self, upstream_status: int, *, retry_after: float | None = None) -> None:
        super().__init__(
            f"the chat service answered HTTP {upstream_status}", retry_after=retry_after
        )
        self.upstream_status = upstream_status
        self.kind = "http_5xx" if upstream_status >= 500 else None
        self.counts_against_upstream = upstream_status >= 500


class UpstreamRateLimited(UpstreamError):
    """ChatIQ still limits the gateway's key after the retries: a bot kept at
    429 is paused by its breaker rather than pressed on."""

    status = 429
    code = "RATE_LIMIT"
    kind = "http_429"


class UpstreamRejected(UpstreamError):
    """The upstream refused the request itself (HTTP 400): the client's to fix."""

    status = 400
    code = "INVALID_REQUEST"
    kind: str | None = None
    counts_against_upstream = False


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "UPSTREAM_TIMEOUT"
    kind: str | None = None


class ConnectTimeout(UpstreamTimeout):
    kind = "connect"


class FirstByteTimeout(UpstreamTimeout):
    kind = "first_byte_timeout"


class IdleTimeout(UpstreamTimeout):
    kind = "idle_timeout"


class TotalTimeout(UpstreamTimeout):
    """The stream ran past the configured total duration (a gateway policy)."""

    kind = None
    counts_against_upstream = False
