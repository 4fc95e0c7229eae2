"""Admission control: tenant quotas, then a fixed number of upstream slots
behind a bounded FIFO queue.

``async with admission.slot(tenant):`` is the way in and out: everything
taken is given back in one place whatever ends the block (success, error,
cancellation, timeout). A stream that outlives its handler takes its slot
with ``take()`` and gives it back with ``give_back()`` when it ends. A freed
slot is handed straight to the oldest waiter, so the queue is fair and never
starves.

Tenant quotas are this process's own, unless a fleet shares them through
Redis (``share``, ``gateway.quotas.shared``): then Redis decides, and while it does
not answer, ``redis.on_error`` does: ``local`` quotas (each limit divided by
``redis.expected_replicas``) or ``reject`` (503).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.config import AdmissionSettings, RedisSettings, Tenant
from gateway.errors import QueueFull, QueueTimeout, QuotaUnavailable, RateLimited, TenantBusy
from gateway.quotas.shared import RedisDown, SharedQuotas


@dataclass(slots=True)
class _TenantState:
    max_streams: int  # 0: no limit
    per_minute: int  # 0: no limit
    tokens: float
    updated: float
    active: int = 0


class Admission:
    def __init__(
        self,
        settings: AdmissionSettings,
        tenants: tuple[Tenant, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._tenants: dict[str, _TenantState] = {}
        self._shared: SharedQuotas | None = None
        self._redis = RedisSettings()
        self._on_fallback: Callable[[str], None] = lambda mode: None
        self.reconfigure(settings, tenants)

    def share(
        self, shared: SharedQuotas, settings: RedisSettings, on_fallback: Callable[[str], None]
    ) -> None:
        """From now on, tenant quotas are the fleet's (through Redis)."""
        self._shared, self._redis, self._on_fallback = shared, settings, on_fallback

    def reconfigure(self, settings: AdmissionSettings, tenants: tuple[Tenant, ...]) -> None:
        """New limits for new requests (a reload). Streams in flight keep their
        slots and count against the new limits; a tenant keeps its spent tokens."""
        self._max_active = settings.max_streams
        self._max_queue = settings.max_queue
        self._queue_timeout_s = settings.queue_timeout_s
        now = self._clock()
        states: dict[str, _TenantState] = {}
        for t in tenants:
            rpm = (
                settings.tenant_requests_per_minute
                if t.requests_per_minute is None
                else t.requests_per_minute
            )
            streams = settings.tenant_max_streams if t.max_streams is None else t.max_streams
            state = self._tenants.get(t.name)
            if state is None:
                state = _TenantState(streams, rpm, float(rpm), now)
            elif not state.per_minute:  # unlimited until now: nothing spent, a full bucket
                state.tokens, state.updated = float(rpm), now
            state.max_streams, state.per_minute = streams, rpm
            state.tokens = min(state.tokens, float(rpm))
            states[t.name] = state
        self._tenants = states  # a removed tenant's live streams keep their own state
        while self._waiters and self._active < self._max_active:  # room made by a raise
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._active += 1
                waiter.set_result(None)

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def tenant_active(self, name: str) -> int:
        return self._tenants[name].active

    def slot(self, tenant: str) -> Slot:
        """``async with admission.slot(tenant):`` a stream's place, or an error."""
        return Slot(self, tenant)

    async def _tenant_quota(self, quota: _TenantState, tenant: str) -> str | None:
        """Let the tenant in (a fleet lease id, if any) or raise 429 (or 503)."""
        per_minute, max_streams = quota.per_minute, quota.max_streams
        if self._shared is not None:
            try:
                lease, settling = await self._shared.acquire(tenant, per_minute, max_streams)
                if not settling:
                    return lease
                # Redis lost the tenant's leases a moment ago, and the replicas
                # are adding theirs back: this process's share holds meanwhile.
                share = -(-max_streams // self._redis.expected_replicas)
                if quota.active >= share:
                    if lease is not None:
                        self._shared.release(lease)
                    raise TenantBusy(
                        f"this key already has {max_streams} streams open", retry_after=1
                    )
                return lease
            except RedisDown:
                self._on_fallback(self._redis.on_error)
                if self._redis.on_error == "reject":
                    raise QuotaUnavailable(
                        "tenant quotas cannot be checked just now; retry shortly", retry_after=1
                    ) from None
                # This process's share of the fleet's limits, until Redis is back.
                replicas = self._redis.expected_replicas
                per_minute = -(-per_minute // replicas)
                max_streams = -(-max_streams // replicas)
        self._take_token(quota, per_minute)
        if max_streams and quota.active >= max_streams:
            raise TenantBusy(f"this key already has {max_streams} streams open", retry_after=1)
        return None

    def _take_token(self, quota: _TenantState, per_minute: int) -> None:
        """Token bucket: ``per_minute`` tokens, refilled evenly over a minute."""
        if not per_minute:
            return
        now = self._clock()
        rate = per_minute / 60.0
        quota.tokens = min(float(per_minute), quota.tokens + (now - quota.updated) * rate)
        quota.updated = now
        if quota.tokens < 1.0:
            raise RateLimited(
                f"this key may make {per_minute} requests a minute",
                retry_after=(1.0 - quota.tokens) / rate,
            )
        quota.tokens -= 1.0

    async def _acquire(self) -> None:
        if self._active < self._max_active and not self._waiters:
            self._active += 1
            return
        if len(self._waiters) >= self._max_queue:
            raise QueueFull("the gateway is at capacity; try again shortly", retry_after=1)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():
                self._release()  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(e, TimeoutError):
                raise QueueTimeout(
                    "waited too long for capacity; try again shortly", retry_after=1
                ) from None
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; _active is unchanged
                return
        self._active -= 1


class Slot:
    """One request's place: the tenant's quota, then a place among the active
    streams (queued for one if need be); both given back on the way out. A
    class, not a generator: one per live stream, kept small."""

    __slots__ = ("_admission", "_lease", "_quota", "_tenant")

    def __init__(self, admission: Admission, tenant: str) -> None:
        self._admission = admission
        self._tenant = tenant
        self._quota = admission._tenants[tenant]
        self._lease: str | None = None

    async def __aenter__(self) -> None:
        await self.take()

    async def __aexit__(self, *exc_info: object) -> None:
        self.give_back()

    async def take(self) -> None:
        """The tenant's quota, then a place (or an error, with nothing kept)."""
        admission, quota = self._admission, self._quota
        self._lease = await admission._tenant_quota(quota, self._tenant)
        quota.active += 1
        try:
            await admission._acquire()
        except BaseException:
            self._give_back_quota()
            raise

    def give_back(self) -> None:
        """Once, for every ``take()`` that returned."""
        try:
            self._admission._release()
        finally:
            self._give_back_quota()

    def _give_back_quota(self) -> None:
        self._quota.active -= 1
        shared = self._admission._shared
        if self._lease is not None and shared is not None:
            shared.release(self._lease)


ADMISSION = web.AppKey("admission", Admission)  # on the app
