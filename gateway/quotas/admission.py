"""Admission control: tenant quotas, then a fixed number of upstream slots
behind a bounded FIFO queue.

``async with admission.slot(tenant):`` is the way in and out: everything
taken is given back in one place whatever ends the block (success, error,
cancellation, timeout). A stream that outlives its handler takes its slot
with ``take()`` and gives it back with ``give_back()`` when it ends. A freed
slot is handed straight to the oldest waiter, so the queue is fair and never
starves.

A signed-in user (a token's) may also have a share of their own within their
tenant's (``user_requests_per_minute``, ``user_max_streams``), checked
first, so that one user's refused requests do not spend the tenant's. Like
the tenant's, they are this process's own or the fleet's.

Tenant quotas are this process's own, unless a fleet shares them through
Redis (``share``, ``gateway.quotas.shared``): then Redis decides, and while it does
not answer, ``redis.on_error`` does: ``local`` quotas (each limit divided by
``redis.expected_replicas``) or ``reject`` (503).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.config import AdmissionSettings, RedisSettings, Tenant
from gateway.errors import QueueFull, QueueTimeout, QuotaUnavailable
from gateway.exchange import owner_of
from gateway.quotas.shared import TENANT_REFUSALS, USER_REFUSALS, RedisDown, Refusals, SharedQuotas

USERS_KEPT = 100_000  # idle users' quota states kept (the oldest idle forgotten first)


@dataclass(slots=True)
class _TenantState:
    """One quota's state: a tenant's, or one of its users'."""

    max_streams: int  # 0: no limit
    per_minute: int  # 0: no limit
    tokens: float
    updated: float
    active: int = 0
    refusals: Refusals = TENANT_REFUSALS
    # A tenant's limits for each of its signed-in users (0: none).
    user_max_streams: int = 0
    user_per_minute: int = 0

    def limit(self, max_streams: int, per_minute: int, now: float) -> None:
        """New limits (a reload). A rate where there was none starts with a
        full bucket, nothing having been spent; else what was spent stays so."""
        if not self.per_minute:
            self.tokens, self.updated = float(per_minute), now
        self.max_streams, self.per_minute = max_streams, per_minute
        self.tokens = min(self.tokens, float(per_minute))


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
        self._users: OrderedDict[str, _TenantState] = OrderedDict()  # by quota name
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
            else:
                state.limit(streams, rpm, now)
            state.user_max_streams = t.user_max_streams
            state.user_per_minute = t.user_requests_per_minute
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

    def slot(self, tenant: str, user: str | None = None) -> Slot:
        """``async with admission.slot(tenant, user):`` a stream's place, or an
        error. ``user``: a signed-in user's stable id (None: a tenant key)."""
        return Slot(self, tenant, user)

    def _user_quota(self, tenant: _TenantState, name: str) -> _TenantState | None:
        """The quota state of the user named ``name``, with their tenant's user
        limits as they are now; None when the tenant sets none."""
        streams, rpm = tenant.user_max_streams, tenant.user_per_minute
        if not (streams or rpm):
            return None
        users = self._users
        state = users.get(name)
        if state is None:
            state = _TenantState(streams, rpm, float(rpm), self._clock(), refusals=USER_REFUSALS)
            users[name] = state
            if len(users) > USERS_KEPT:
                self._forget_idle_users()
        else:
            users.move_to_end(name)
            state.limit(streams, rpm, self._clock())  # as a reload may have changed them
        return state

    def _forget_idle_users(self) -> None:
        """The oldest idle users' states (a live stream keeps its user's)."""
        for name in list(self._users)[: len(self._users) - USERS_KEPT]:
            if self._users[name].active == 0:
                del self._users[name]

    async def _tenant_quota(self, quota: _TenantState, tenant: str) -> str | None:
        """Let the tenant (or user) in: a fleet lease id, if any; or raise 429 (or 503)."""
        per_minute, max_streams = quota.per_minute, quota.max_streams
        if self._shared is not None:
            try:
                lease, settling = await self._shared.acquire(
                    tenant, per_minute, max_streams, quota.refusals
                )
                if not settling:
                    return lease
                # Redis lost the tenant's leases a moment ago, and the replicas
                # are adding theirs back: this process's share holds meanwhile.
                share = -(-max_streams // self._redis.expected_replicas)
                if quota.active >= share:
                    if lease is not None:
                        self._shared.release(lease)
                    raise quota.refusals.busy(max_streams, 1.0)
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
            raise quota.refusals.busy(max_streams, 1.0)
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
            raise quota.refusals.rate(per_minute, (1.0 - quota.tokens) / rate)
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
    """One request's place: its user's quota (if any), its tenant's, then a
    place among the active streams (queued for one if need be); all given back
    on the way out. A class, not a generator: one per live stream, kept small."""

    __slots__ = ("_admission", "_lease", "_quota", "_tenant", "_user", "_user_lease", "_user_quota")

    def __init__(self, admission: Admission, tenant: str, user: str | None = None) -> None:
        self._admission = admission
        self._tenant = tenant
        self._quota = admission._tenants[tenant]
        self._lease: str | None = None
        # A user's quota is named within its tenant's (as what the user owns is).
        self._user: str | None = None
        self._user_quota: _TenantState | None = None
        self._user_lease: str | None = None
        if user is not None:
            self._user = name = owner_of(tenant, user)
            self._user_quota = admission._user_quota(self._quota, name)

    async def __aenter__(self) -> None:
        await self.take()

    async def __aexit__(self, *exc_info: object) -> None:
        self.give_back()

    async def take(self) -> None:
        """The user's quota, the tenant's, then a place (or an error, with nothing kept)."""
        admission, quota, user_quota = self._admission, self._quota, self._user_quota
        if user_quota is not None:
            assert self._user is not None
            self._user_lease = await admission._tenant_quota(user_quota, self._user)
            user_quota.active += 1
        try:
            self._lease = await admission._tenant_quota(quota, self._tenant)
        except BaseException:
            self._give_back_user_quota()
            raise
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
        self._give_back_user_quota()

    def _give_back_user_quota(self) -> None:
        if self._user_quota is None:
            return
        self._user_quota.active -= 1
        shared = self._admission._shared
        if self._user_lease is not None and shared is not None:
            shared.release(self._user_lease)


ADMISSION = web.AppKey("admission", Admission)  # on the app
