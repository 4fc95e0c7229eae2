"""Tenants from their keys: only SHA-256 hashes are held, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web

from gateway.auth.tokens import TOKENS, TokenVerifier, looks_like_jwt
from gateway.config import Tenant
from gateway.errors import Forbidden, RateLimited, Unauthorized
from gateway.exchange import exchange_of


def hash_key(key: str) -> str:
    """The SHA-256 hex digest that the configuration stores for a tenant key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer(authorization: str | None) -> str:
    """The credential in an ``Authorization: Bearer <credential>`` header."""
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", error=None)
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise Unauthorized(
            "malformed Authorization header: expected 'Bearer <key>'", error="invalid_request"
        )
    return credential


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def require_bearer(expected_sha256: str, authorization: str | None) -> None:
    """Accept only the one token whose SHA-256 is ``expected_sha256``."""
    digest = _digest(bearer(authorization))
    if not hmac.compare_digest(digest, bytes.fromhex(expected_sha256)):
        raise Unauthorized("unknown token")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: a tenant, and (signed in by a token) a user."""

    tenant: Tenant
    user: str | None = None  # as the exchange's log line shows it
    user_id: str | None = None  # a signed-in user's stable id (quotas, ownership)


class TenantDirectory:
    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self.replace(tenants)

    def replace(self, tenants: Iterable[Tenant]) -> None:
        """A reload: these keys from now on (a request already in keeps its tenant)."""
        tenants = tuple(tenants)
        self._tenants = tuple((bytes.fromhex(key), t) for t in tenants for key in t.keys_sha256)
        self._named = {t.name: t for t in tenants}

    def named(self, name: str) -> Tenant | None:
        return self._named.get(name)

    def authenticate(self, key: str) -> Tenant:
        """The tenant whose key this is."""
        digest = _digest(key)
        found: Tenant | None = None
        # Compare against every tenant, without stopping early, so the time
        # taken says nothing about which (if any) hash matched.
        for known, tenant in self._tenants:
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None:
            raise Unauthorized("unknown API key")
        return found


class FailedKeyThrottle:
    """Slows down an address that keeps sending unknown keys.

    After ``limit`` failures within a minute, that address gets 429 (with
    ``Retry-After``) until its minute is over, before its key is even looked
    at; other addresses are untouched. At most ``max_addresses`` are tracked
    (the oldest forgotten first), so a flood of addresses cannot grow memory.
    Behind a load balancer every client shares its address: raise the limit
    there, or set it to 0 (off).
    """

    def __init__(
        self,
        limit_per_minute: int,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit_per_minute  # a reload may change it
        self._max = max_addresses
        self._clock = clock
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()  # count, window end

    @property
    def watching(self) -> bool:
        """Some address has failed lately: requests' addresses need checking."""
        return bool(self.limit and self._seen)

    def check(self, address: str | None) -> None:
        if not self.limit or address is None or address not in self._seen:
            return
        count, until = self._seen[address]
        now = self._clock()
        if now >= until:
            del self._seen[address]
        elif count >= self.limit:
            raise RateLimited(
                "too many requests with unknown keys from this address",
                retry_after=math.ceil(until - now),
            )

    def failed(self, address: str | None) -> None:
        if not self.limit or address is None:
            return
        now = self._clock()
        count, until = self._seen.pop(address, (0, now + 60.0))
        if now >= until:
            count, until = 0, now + 60.0
        self._seen[address] = (count + 1, until)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)


async def authenticate(
    directory: TenantDirectory,
    throttle: FailedKeyThrottle,
    tokens: TokenVerifier,
    request: web.Request,
) -> Caller:
    """The request's caller, by a tenant key or (with issuers) a JWT, counting
    and throttling failed credentials by address."""
    if throttle.watching:  # the peer's address is looked up only when it may matter
        throttle.check(request.remote)
    try:
        credential = bearer(request.headers.get("Authorization"))
        if not (tokens.active and looks_like_jwt(credential)):
            return Caller(directory.authenticate(credential))
        verified = await tokens.verify(credential)
    except Unauthorized:
        throttle.failed(request.remote)
        raise
    tenant = directory.named(verified.tenant)
    if tenant is None:  # a tenant_claim naming none
        raise Forbidden("the token's tenant is not one of this gateway's")
    return Caller(tenant, tokens.user_label(verified), verified.user_id)


async def tenant_of(request: web.Request) -> Tenant:
    """The caller's tenant, by its ``Authorization`` (401 if none), recorded
    (with its user) on the request's exchange: how every route that needs a
    tenant authenticates."""
    app = request.app
    caller = await authenticate(app[TENANTS], app[FAILED_KEYS], app[TOKENS], request)
    exchange = exchange_of(request)
    exchange.tenant = caller.tenant.name
    exchange.user, exchange.user_id = caller.user, caller.user_id
    return caller.tenant


TENANTS = web.AppKey("tenants", TenantDirectory)
FAILED_KEYS = web.AppKey("failed_keys", FailedKeyThrottle)  # on the app
