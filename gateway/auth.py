"""Tenants from their keys: only SHA-256 hashes are held, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from .config import Tenant
from .errors import Unauthorized


def hash_key(key: str) -> str:
    """The SHA-256 hex digest that the configuration stores for a tenant key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _bearer_digest(authorization: str | None) -> bytes:
    """The SHA-256 of the key in an ``Authorization: Bearer <key>`` header."""
    if not authorization:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def require_bearer(expected_sha256: str, authorization: str | None) -> None:
    """Accept only the one token whose SHA-256 is ``expected_sha256``."""
    if not hmac.compare_digest(_bearer_digest(authorization), bytes.fromhex(expected_sha256)):
        raise Unauthorized("unknown token")


class TenantDirectory:
    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._tenants = tuple((bytes.fromhex(t.key_sha256), t) for t in tenants)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant whose key is in an ``Authorization: Bearer`` header."""
        digest = _bearer_digest(authorization)
        found: Tenant | None = None
        # Compare against every tenant, without stopping early, so the time
        # taken says nothing about which (if any) hash matched.
        for known, tenant in self._tenants:
            if hmac.compare_digest(known, digest):
                found = tenant
        if found is None:
            raise Unauthorized("unknown API key")
        return found
