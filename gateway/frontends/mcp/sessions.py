"""MCP sessions as signed, self-contained ids: any replica checks one with no
state of its own and no shared store, so a client's requests may land on any
replica behind a load balancer without stickiness.

An id is ``<issued ms, hex>.<nonce>.<version>.<signature>``; the signature
binds it to the tenant whose key opened it (the tenant is not in the id). A
session ends when the client deletes it (``DELETE``: its id is refused from
then on, in the process that was told) or when it is ``max_age_s`` old.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    version: str  # the protocol version its initialize agreed to
    expires_at: float  # time.time()


class Sessions:
    """Issues and checks session ids."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.time) -> None:
        self.max_age_s = max_age_s
        self._clock = clock

    def issue(self, secret: bytes, tenant: str, version: str) -> str:
        body = f"{int(self._clock() * 1000):x}.{secrets.token_hex(8)}.{version}"
        return f"{body}.{_sign(secret, body, tenant)}"

    def check(self, secret: bytes, session_id: str, tenant: str) -> Session | None:
        """The session, if ``session_id`` is one this tenant opened, not expired."""
        parts = session_id.split(".")
        if len(parts) != 4:
            return None
        issued_hex, _, version, signature = parts
        body = session_id.rpartition(".")[0]
        expected = _sign(secret, body, tenant).encode()
        if not hmac.compare_digest(signature.encode("utf-8", "surrogateescape"), expected):
            return None
        try:
            issued = int(issued_hex, 16) / 1000
        except ValueError:
            return None
        expires_at = issued + self.max_age_s
        if self._clock() > expires_at:
            return None
        return Session(session_id, version, expires_at)


def _sign(secret: bytes, body: str, tenant: str) -> str:
    mac = hmac.new(secret, f"{body}\x00{tenant}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:18]).decode()


def session_secret(upstream_key: str | None) -> bytes:
    """The key sessions are signed with, the same on every replica that shares
    the ChatIQ key (a new ChatIQ key ends every session: clients open new ones)."""
    return hmac.new(
        (upstream_key or "").encode(), b"chatiq-gateway mcp sessions", hashlib.sha256
    ).digest()
