"""Tenant quotas shared by a fleet of gateways through Redis (``[redis] url``).

One Lua script per quota check, so that it is one round trip and atomic
(redis-py's ``register_script``):

- **Requests per minute: GCRA** (the generic cell rate algorithm). Each
  tenant has one key, its "theoretical arrival time". A request is let in
  when that time, less a tolerance of one minute's quota, is not in the
  future; then the time moves on by 60 s / quota. It lets a burst of up to
  the quota through at once, then one request every 60 s / quota: what a
  sliding window allows, in one number per tenant, with an exact
  ``Retry-After``, and never the 2x a fixed window lets through at its edge.
- **Concurrent streams: leases.** Each stream holds a lease, a member of the
  tenant's sorted set scored by its expiry. This process renews its leases
  every third of ``lease_ttl_s`` while their streams live; a replica that
  dies (kill -9) stops renewing, and its tenants' slots come back within
  ``lease_ttl_s``, with nobody cleaning up.
- **A Redis that lost its leases** (a restart, a flush) holds none of the
  streams that live on; each replica adds its own back at its next renewal.
  Until all have (a renewal period and a second: ``settled-at``, a key per
  tenant that a restart loses too), the check says so and the caller also
  holds the tenant to this process's share of its streams, so a limit of 20
  never lets 40 in. A tenant's first check on a new Redis settles the same.

Keys carry a hash tag (``{prefix:tenant}``) so that both keys of a tenant
are in one Redis Cluster slot, and expire on their own.

When Redis does not answer, ``RedisDown`` tells the caller to follow
``on_error``; a probe in the background notices when it is back. A check
that timed out was sent all the same, and Redis may run it later (a stalled
Redis runs what it was sent when it wakes): its lease, which nobody holds,
is removed as soon as Redis answers again, and at each renewal after that
until it would have expired; so are leases released while Redis was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import RedisSettings
from gateway.errors import RateLimited, TenantBusy, UserBusy, UserRateLimited
from gateway.logs import Logger
from gateway.metrics import Metrics

# Time is Redis's own (TIME), so that replicas' clocks need not agree.
_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
# KEYS: the tenant's rate key, its lease set, its settled-at time.
# ARGV: (unused), requests per minute (0: none), max streams (0: none), lease id,
#       lease ttl (ms), settling (ms).
# Returns {0, 0, settling} (let in; the lease is held; settling: 1 while the lease
#         set may lack other replicas' leases), {1, ms} (rate: retry after ms),
#         {2, ms} (concurrency: retry after ms).
_SETTLED_AT = """
local settled_at = tonumber(redis.call('GET', KEYS[{i}]) or -1)
if settled_at < 0 then  -- this Redis lost (or never had) the tenant's leases
  settled_at = now + tonumber(ARGV[{settle}])
  redis.call('SET', KEYS[{i}], settled_at, 'PX', 86400000)
else
  redis.call('PEXPIRE', KEYS[{i}], 86400000)
end
"""
CHECK = (
    _NOW
    + """
local per_minute = tonumber(ARGV[2])
local max_streams = tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])
local settling = 0
if max_streams > 0 then"""
    + _SETTLED_AT.format(i=3, settle=6)
    + """
  if settled_at > now then settling = 1 end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_streams then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {2, math.max(1, math.min(1000, tonumber(first[2]) - now))}
  end
end
if per_minute > 0 then
  local interval = 60000 / per_minute
  local tolerance = 60000 - interval
  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
  if tat < now then tat = now end
  if tat - tolerance > now then
    return {1, math.ceil(tat - tolerance - now)}
  end
  local next_tat = tat + interval
  redis.call('SET', KEYS[1], tostring(next_tat), 'PX', math.ceil(next_tat - now) + 1000)
end
if max_streams > 0 then
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl * 2)
end
return {0, 0, settling}
"""
)
# KEYS: one tenant's lease set, its settled-at time; ARGV: lease ttl (ms),
# settling (ms), then the lease ids to renew. Added, not only refreshed: a Redis
# that restarted empty gets them back (a release waits for a renewal in flight,
# so none is added after its removal).
RENEW = (
    _NOW
    + """
local ttl = tonumber(ARGV[1])"""
    + _SETTLED_AT.format(i=2, settle=2)
    + """
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return #ARGV - 2
"""
)


_CONNECTIONS = 64  # to Redis, per process: quota checks, renewals, releases


@dataclass(frozen=True, slots=True)
class Refusals:
    """How a quota says no, in its own words: a rate spent (the limit, the
    seconds to wait), or its streams all open."""

    rate: Callable[[int, float], RateLimited]
    busy: Callable[[int, float], RateLimited]


TENANT_REFUSALS = Refusals(
    lambda n, wait: RateLimited(f"this key may make {n} requests a minute", retry_after=wait),
    lambda n, wait: TenantBusy(f"this key already has {n} streams open", retry_after=wait),
)
USER_REFUSALS = Refusals(
    lambda n, wait: UserRateLimited(
        f"you may make {n} requests a minute (each user's own limit)", retry_after=wait
    ),
    lambda n, wait: UserBusy(
        f"you already have {n} streams open (each user's own limit)", retry_after=wait
    ),
)


class _Deadline:
    """``asyncio.timeout``, but one turn of the loop later: when the loop was busy
    past the deadline, an answer that came meanwhile is read in the same turn as
    the timer fires, and the task it wakes runs only in the next; the plain
    timeout cancelled it first, and a busy gateway took a healthy Redis for
    down (under a burst on a loaded machine, a replica fell back to its local
    share and let 150 requests through a limit of 100)."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = asyncio.timeout(None)
        await self._timer.__aenter__()
        self._handle: asyncio.Handle = loop.call_at(loop.time() + self._timeout_s, self._due)

    def _due(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = loop.call_soon(self._timer.reschedule, loop.time())

    async def __aexit__(self, *exc_info: Any) -> None:
        self._handle.cancel()
        await self._timer.__aexit__(*exc_info)


class RedisDown(Exception):
    """Redis did not answer in time (or at all): follow ``on_error``."""


class SharedQuotas:
    def __init__(self, settings: RedisSettings, metrics: Metrics, log: Logger) -> None:
        self._s = settings
        self._metrics = metrics
        self._log = log
        # A burst waits for one of a few connections (each check is one round
        # trip of a fraction of a millisecond), outside the call's timeout (see
        # _call); a pool that refused the 101st concurrent check (redis-py's
        # default) made a healthy Redis look down.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.url, max_connections=_CONNECTIONS, timeout=None,
            # The call's own deadline is _call's (one a busy loop does not fool);
            # these only catch a socket that hangs for good.
            socket_timeout=max(1.0, settings.timeout_s * 4),
            socket_connect_timeout=max(1.0, settings.timeout_s * 4),
            retry_on_timeout=False,
        )  # fmt: skip
        self._client = aioredis.Redis(connection_pool=pool)
        self._connections = asyncio.Semaphore(_CONNECTIONS)  # one a call, before its timer
        self._renewing = asyncio.Lock()  # a renewal, and the releases that wait for it
        self._check = self._client.register_script(CHECK)
        self._renew_script = self._client.register_script(RENEW)
        self._leases: dict[str, str] = {}  # lease id -> its tenant's lease set
        # Leases Redis may hold that nobody does: lease id -> (its set, when given up)
        self._given_up: dict[str, tuple[str, float]] = {}
        self.up = True
        self._down_said = 0.0  # when "Redis is down" was last logged
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        metrics.quota_backend_up.set(1)

    def start(self) -> None:
        self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        for task in list(self._tasks):
            await asyncio.wait([task], timeout=1)
        if (self._leases or self._given_up) and self.up:  # stopping: give slots back now
            with contextlib.suppress(RedisDown):
                await self._call(self._release_all, what="release")
        await self._client.aclose()

    def _keys(self, tenant: str) -> tuple[str, str, str]:
        tag = f"{{{self._s.key_prefix}:{tenant}}}"
        return f"{tag}:rate", f"{tag}:leases", f"{tag}:settled-at"

    @property
    def _settle_ms(self) -> int:
        """How long a lease set Redis lost takes to be whole again: every replica
        renews within a third of the lease's life (and probes once a second)."""
        return int((self._s.lease_ttl_s / 3 + 1.0) * 1000)

    async def acquire(
        self, tenant: str, per_minute: int, max_streams: int, refusals: Refusals = TENANT_REFUSALS
    ) -> tuple[str | None, bool]:
        """Let a request in: (a lease id while it has a concurrency limit, whether
        the tenant's lease set is still settling after Redis lost it), or raise
        ``RateLimited`` / ``TenantBusy``; ``RedisDown`` if Redis does not answer."""
        if not self.up:
            raise RedisDown
        lease = uuid.uuid4().hex if max_streams else ""
        rate_key, leases_key, settled_key = self._keys(tenant)
        ttl_ms = int(self._s.lease_ttl_s * 1000)
        args: list[str | int] = [0, per_minute, max_streams, lease, ttl_ms, self._settle_ms]
        try:
            result = await self._call(
                lambda: self._check(keys=[rate_key, leases_key, settled_key], args=args),
                what="check",
            )
        except BaseException:  # timed out, failed or cancelled: Redis may run it yet
            if lease:
                self._give_up(lease, leases_key)
            raise
        verdict, wait_ms = int(result[0]), int(result[1])
        if verdict == 1:
            raise refusals.rate(per_minute, wait_ms / 1000)
        if verdict == 2:
            raise refusals.busy(max_streams, wait_ms / 1000)
        if not lease:
            return None, False
        self._leases[lease] = leases_key
        return lease, bool(int(result[2]))

    def release(self, lease: str) -> None:
        """Give a lease back (in the background; if Redis is away, once it is back)."""
        key = self._leases.pop(lease, None)
        if key is None:
            return
        if not self.up:
            self._given_up[lease] = (key, time.monotonic())
            return
        task = asyncio.get_running_loop().create_task(self._release(key, lease))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _give_up(self, lease: str, key: str) -> None:
        """A lease whose check failed: Redis may add it yet, so it is removed now and
        after each time Redis was away, until it would have expired."""
        self._given_up[lease] = (key, time.monotonic())
        if self.up:
            task = asyncio.get_running_loop().create_task(self._remove_given_up())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _release(self, key: str, lease: str) -> None:
        async with self._renewing:  # after a renewal that may still add it
            try:
                await self._call(lambda: self._client.zrem(key, lease), what="release")
            except RedisDown:
                self._given_up[lease] = (key, time.monotonic())

    async def _remove_given_up(self) -> None:
        with contextlib.suppress(RedisDown):
            await self._call(self._release_given_up, what="release")

    async def _release_given_up(self) -> None:
        """Remove every lease given up (again: one Redis ran late may be back); forget
        those that have expired by now anyway."""
        expired = time.monotonic() - self._s.lease_ttl_s
        for lease, (_, since) in list(self._given_up.items()):
            if since < expired:
                del self._given_up[lease]
        if self._given_up:
            async with self._client.pipeline(transaction=False) as pipe:
                for lease, (key, _) in self._given_up.items():
                    pipe.zrem(key, lease)
                await pipe.execute()

    async def _release_all(self) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            held = {**self._leases, **{lease: key for lease, (key, _) in self._given_up.items()}}
            for lease, key in held.items():
                pipe.zrem(key, lease)
            await pipe.execute()
        self._leases.clear()
        self._given_up.clear()

    async def _renew_forever(self) -> None:
        """Every third of the lease's life: renew this process's leases, or (while
        Redis is down) see whether it is back."""
        every = self._s.lease_ttl_s / 3
        while True:
            await asyncio.sleep(every if self.up else min(every, 1.0))
            try:
                if not self.up:
                    await self._call(self._client.ping, what="probe", while_down=True)
                # and at once when it is back: it may have restarted empty, or
                # run late the checks that timed out
                if self._leases:
                    async with self._renewing:
                        await self._call(self._renew, what="renew")
                if self._given_up:
                    await self._call(self._release_given_up, what="release")
            except RedisDown:
                continue

    async def _renew(self) -> None:
        """One script a tenant (its leases share a key, so this works on a Cluster too)."""
        by_key: dict[str, list[str]] = {}
        for lease, key in self._leases.items():
            by_key.setdefault(key, []).append(lease)
        ttl_ms = int(self._s.lease_ttl_s * 1000)
        async with self._client.pipeline(transaction=False) as pipe:
            for key, leases in by_key.items():
                settled_key = key.removesuffix(":leases") + ":settled-at"
                args: list[str | int] = [ttl_ms, self._settle_ms, *leases]
                await self._renew_script(keys=[key, settled_key], args=args, client=pipe)
            await pipe.execute()

    async def _call(self, op: Callable[[], Any], what: str, while_down: bool = False) -> Any:
        """One round trip, timed; a failure marks Redis down and raises ``RedisDown``.
        The wait for a connection comes first and is not timed: a burst queued
        behind the pool's connections is this process's load, not Redis's; but
        when Redis went down meanwhile, the call fails at once (only the probe
        tries a Redis that is down)."""
        async with self._connections:
            if not (self.up or while_down):
                raise RedisDown
            started = time.perf_counter()
            try:
                async with _Deadline(self._s.timeout_s):
                    result = op()
                    if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                        result = await result
            except (RedisError, OSError, TimeoutError) as e:
                self._failed(e, what)
                raise RedisDown from None
        self._metrics.redis_seconds.labels(what).observe(time.perf_counter() - started)
        if not self.up:
            self.up = True
            self._metrics.quota_backend_up.set(1)
            self._log.warning("quota_backend_back", backend="redis")
        return result

    def _failed(self, error: BaseException, what: str) -> None:
        kind = (
            "timeout"
            if isinstance(error, RedisTimeoutError | TimeoutError)
            else "connection"
            if isinstance(error, RedisConnectionError | OSError)
            else "error"
        )
        self._metrics.redis_errors.labels(kind).inc()
        if self.up:
            self.up = False
            self._metrics.quota_backend_up.set(0)
        now = time.monotonic()
        if now - self._down_said >= self._s.warn_every_s:
            self._down_said = now
            self._log.warning(
                "quota_backend_down", backend="redis", op=what, kind=kind,
                on_error=self._s.on_error,
            )  # fmt: skip
