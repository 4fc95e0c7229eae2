"""Stored responses: a response id -> the ChatIQ conversation it produced (and,
unless the request said ``store: false``, the response object itself, for
``GET /v1/responses/{id}``), per owner: a tenant, or one of its signed-in users.

In this process: at most ``responses.max_stored``, the oldest first to go,
each for ``responses.retain_s``. With ``[redis]`` (``RedisResponseStore``),
also in Redis, so that any replica continues any response: written by one
task, a pipeline a round, a moment after the response ended (a replica asked
for a response younger than a second waits that long for it). A response id
names its owner's entry only: another tenant's or user's id is unknown to it, alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from gateway.config import RedisSettings, ResponsesSettings
from gateway.errors import GatewayError
from gateway.logs import Logger

RESPONSE_ID_PREFIX = "resp_"
_BORN = re.compile(r"^resp_([0-9a-f]{11})[0-9a-f]{16,}$")
_CATCH_UP_S = 1.0  # how long a young response may take to reach Redis from its replica
_ROUND_S = 0.005  # the writer gathers this long, then writes one pipeline


def new_response_id() -> str:
    """``resp_``, the time it was made (ms, hex), then random: a replica that does
    not find a young one yet knows to wait a moment for it."""
    return f"{RESPONSE_ID_PREFIX}{int(time.time() * 1000):011x}{secrets.token_hex(12)}"


def _age_s(response_id: str) -> float | None:
    born = _BORN.match(response_id)
    return None if born is None else time.time() - int(born.group(1), 16) / 1000


class StoreUnavailable(GatewayError):
    status = 503
    code = "STORE_UNAVAILABLE"


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
        owner: str,
        response_id: str,
        conversation_id: str | None,
        response: dict[str, Any] | None,
    ) -> None:
        """A finished response (from the stream's end: no waiting here)."""
        key = (owner, response_id)
        self._entries[key] = Stored(
            conversation_id, response, time.monotonic() + self._settings.retain_s
        )
        self._entries.move_to_end(key)
        while len(self._entries) > self._settings.max_stored:
            self._entries.popitem(last=False)

    async def find(self, owner: str, response_id: str) -> Stored | None:
        key = (owner, response_id)
        found = self._entries.get(key)
        if found is not None and found.expires_at < time.monotonic():
            del self._entries[key]
            return None
        return found

    async def forget(self, owner: str, response_id: str) -> bool:
        return self._entries.pop((owner, response_id), None) is not None

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class RedisResponseStore(ResponseStore):
    """This process's store, and Redis behind it for the fleet."""

    def __init__(self, settings: ResponsesSettings, redis: RedisSettings, log: Logger) -> None:
        super().__init__(settings)
        self._prefix = redis.key_prefix
        self._timeout_s = redis.timeout_s
        self._log = log
        self._client = aioredis.Redis.from_url(
            redis.url, socket_timeout=max(1.0, redis.timeout_s * 4),
            socket_connect_timeout=max(1.0, redis.timeout_s * 4), retry_on_timeout=False,
        )  # fmt: skip
        self._pending: dict[str, bytes] = {}  # key -> value, for the writer's next round
        self._wake = asyncio.Event()
        self._failed_at = 0.0
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_rounds())

    def _key(self, owner: str, response_id: str) -> str:
        return f"{{{self._prefix}:response:{owner}:{response_id}}}"

    def remember(
        self,
        owner: str,
        response_id: str,
        conversation_id: str | None,
        response: dict[str, Any] | None,
    ) -> None:
        super().remember(owner, response_id, conversation_id, response)
        value = orjson.dumps({"c": conversation_id, "r": response})
        self._pending[self._key(owner, response_id)] = value
        self._wake.set()

    async def find(self, owner: str, response_id: str) -> Stored | None:
        """Redis says (a response forgotten on another replica is gone here too);
        this process's own copy only while Redis does not answer, or before its
        write went out."""
        key = self._key(owner, response_id)
        here = await super().find(owner, response_id)
        if key in self._pending:
            return here
        age = _age_s(response_id)
        until = time.monotonic() + (_CATCH_UP_S - age if age is not None else 0.0)
        try:
            while True:
                raw = await self._ask(lambda: self._client.get(key))
                if raw is not None or time.monotonic() >= until:
                    break
                await asyncio.sleep(0.05)
        except StoreUnavailable:
            if here is not None:
                return here
            raise
        if raw is None:
            return None
        entry = orjson.loads(raw)
        return Stored(entry.get("c"), entry.get("r"), time.monotonic() + self._settings.retain_s)

    async def forget(self, owner: str, response_id: str) -> bool:
        here = await super().forget(owner, response_id)
        key = self._key(owner, response_id)
        self._pending.pop(key, None)
        removed = await self._ask(lambda: self._client.delete(key))
        return here or bool(removed)

    async def _ask(self, call: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call()
        except (RedisError, OSError, TimeoutError) as e:
            self._failed("read", e)
            raise StoreUnavailable(
                "the stored responses cannot be read just now; retry shortly", retry_after=1
            ) from None

    async def _write_rounds(self) -> None:
        ttl_ms = round(self._settings.retain_s * 1000)
        while True:
            await self._wake.wait()
            await asyncio.sleep(_ROUND_S)
            self._wake.clear()
            batch, self._pending = self._pending, {}
            pipe = self._client.pipeline(transaction=False)
            for key, value in batch.items():
                pipe.set(key, value, px=ttl_ms)
            try:
                await pipe.execute()
            except (RedisError, OSError) as e:  # this process still has them; others not
                self._failed("write", e)
                await asyncio.sleep(0.5)
                for key, value in batch.items():
                    self._pending.setdefault(key, value)
                self._wake.set()

    def _failed(self, op: str, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._failed_at > 10:
            self._failed_at = now
            self._log.warning("responses_redis_failed", op=op, error=type(e).__name__)

    async def close(self) -> None:
        until = time.monotonic() + 2  # what is still to write, if Redis takes it
        while self._pending and self._writer is not None and time.monotonic() < until:
            await asyncio.sleep(0.02)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._client.aclose()


RESPONSE_STORE = web.AppKey("response_store", ResponseStore)
