"""A circuit breaker on the upstream: fail fast while it is down, probe it back.

Closed: everything goes through; N consecutive failures open it. Open:
requests fail at once with 503 until the cool-down ends. Then one probe goes
through (half-open): its success closes the circuit, its failure opens it
again. A probe that never reports (its client left) is replaced after another
cool-down, so the breaker cannot stick half-open.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import CircuitSettings
from .errors import CircuitOpen


class CircuitBreaker:
    def __init__(
        self,
        settings: CircuitSettings,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] = lambda is_open: None,
    ) -> None:
        self._threshold = settings.failure_threshold
        self._cooldown_s = settings.cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._opened_at: float | None = None  # None: closed
        self._probe_at: float | None = None  # when the half-open probe was let through

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def check(self) -> None:
        """Let a request try the upstream, or raise ``CircuitOpen``."""
        if self._opened_at is None:
            return
        now = self._clock()
        ready_at = max(self._opened_at, self._probe_at or self._opened_at) + self._cooldown_s
        if now < ready_at:
            raise CircuitOpen(
                "the chat service is failing; requests are paused", retry_after=ready_at - now
            )
        self._probe_at = now  # this request is the probe

    def success(self) -> None:
        self._failures = 0
        if self._opened_at is not None:
            self._opened_at = self._probe_at = None
            self._on_change(False)

    def failure(self) -> None:
        self._failures += 1
        if self._opened_at is not None:
            self._opened_at, self._probe_at = self._clock(), None  # the probe failed
        elif self._failures >= self._threshold:
            self._opened_at = self._clock()
            self._on_change(True)
