"""When to retry an upstream attempt, and how long to wait first.

Retries happen only before any byte reached the client (the caller's
promise), for failures that a second try can fix: connect errors, a
first-byte timeout, 429, 502, 503 and 504. Never any other 4xx.
Backoff is exponential with full jitter; an upstream's ``Retry-After`` is
honoured up to a cap.
"""

from __future__ import annotations

import random

from gateway.config import UpstreamSettings
from gateway.errors import (
    ConnectTimeout,
    FirstByteTimeout,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamRateLimited,
)

RETRYABLE_STATUSES = frozenset({502, 503, 504})


def retry_reason(error: UpstreamError) -> str | None:
    """The ``reason`` label of ``upstream_retries_total``, or None: do not retry."""
    if isinstance(error, UpstreamConnectError | ConnectTimeout):
        return "connect"
    if isinstance(error, FirstByteTimeout):
        return "first_byte_timeout"
    if isinstance(error, UpstreamRateLimited):
        return "http_429"
    if isinstance(error, UpstreamHTTPError) and error.upstream_status in RETRYABLE_STATUSES:
        return f"http_{error.upstream_status}"
    return None


def backoff_s(
    attempt: int, error: UpstreamError, settings: UpstreamSettings, rng: random.Random
) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based)."""
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** (attempt - 1))
    delay = rng.uniform(0, ceiling)  # full jitter
    if error.retry_after is not None:
        delay = max(delay, min(error.retry_after, settings.retry_after_cap_s))
    return delay
