"""Stored responses: a response id -> the ChatIQ conversation it produced (and,
unless the request said ``store: false``, the response object itself, for
``GET /v1/responses/{id}``), per tenant.

In this process: at most ``responses.max_stored``, the oldest first to go,
each for ``responses.retain_s``. A response id names its tenant's entry only:
another tenant's id is unknown to it, alike.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.config import ResponsesSettings

RESPONSE_ID_PREFIX = "resp_"


def new_response_id() -> str:
    return RESPONSE_ID_PREFIX + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class Stored:
    conversation_id: str | None
    response: dict[str, Any] | None  # None: ``store: false``, or not finished
    expires_at: float


class ResponseStore:
    def __init__(self, settings: ResponsesSettings) -> None:
        self._settings = settings
        self._entries: OrderedDict[tuple[str, str], Stored] = OrderedDict()

    def remember(
        self,
        tenant: str,
        response_id: str,
        conversation_id: str | None,
        response: dict[str, Any] | None,
    ) -> None:
        """A finished response (from the stream's end: no waiting here)."""
        key = (tenant, response_id)
        self._entries[key] = Stored(
            conversation_id, response, time.monotonic() + self._settings.retain_s
        )
        self._entries.move_to_end(key)
        while len(self._entries) > self._settings.max_stored:
            self._entries.popitem(last=False)

    async def find(self, tenant: str, response_id: str) -> Stored | None:
        key = (tenant, response_id)
        found = self._entries.get(key)
        if found is not None and found.expires_at < time.monotonic():
            del self._entries[key]
            return None
        return found

    async def forget(self, tenant: str, response_id: str) -> bool:
        return self._entries.pop((tenant, response_id), None) is not None

    async def close(self) -> None:
        pass


RESPONSE_STORE = web.AppKey("response_store", ResponseStore)
