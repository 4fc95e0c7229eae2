"""MCP's shared state: the tool calls running in this process, by session and
request id (what a client's ``notifications/cancelled`` names), and the
sessions that ended (``DELETE``).

With ``[redis]`` (``RedisToolCalls``) the replicas tell each other over one
pub/sub channel: a cancel that names a call running on another replica is
passed on to it (a client's cancel may land anywhere behind a load
balancer), and an ended session is ended on every replica. Nothing is read
from Redis on a request's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from gateway.config import RedisSettings
from gateway.logs import Logger

RpcId = int | str
_MAX_ENDED = 100_000  # ended sessions remembered at most (the oldest forgotten first)


class ToolCalls:
    """This process's running calls and ended sessions."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, RpcId], asyncio.Task[Any]] = {}
        self._ended: OrderedDict[str, float] = OrderedDict()  # session -> when it expires

    def running(self, session_id: str, rpc_id: RpcId, task: asyncio.Task[Any]) -> None:
        """``task`` runs that call until it is done (its stream's end included)."""
        key = (session_id, rpc_id)
        self._running[key] = task

        def done(finished: asyncio.Task[Any]) -> None:
            if self._running.get(key) is finished:
                del self._running[key]

        task.add_done_callback(done)

    def cancel(self, session_id: str, rpc_id: RpcId) -> None:
        """Cancel the call, here or (with Redis) on the replica that runs it."""
        if not self._cancel_here(session_id, rpc_id):
            self._tell({"c": [session_id, rpc_id]})

    def end(self, session_id: str, expires_at: float) -> None:
        """The session ended: refused from now on, until it would have expired."""
        self._end_here(session_id, expires_at)
        self._tell({"e": [session_id, expires_at]})

    def has_ended(self, session_id: str) -> bool:
        return session_id in self._ended

    def _cancel_here(self, session_id: str, rpc_id: RpcId) -> bool:
        task = self._running.get((session_id, rpc_id))
        if task is None:
            return False
        task.cancel()
        return True

    def _end_here(self, session_id: str, expires_at: float) -> None:
        self._ended[session_id] = expires_at
        now = time.time()
        ended = self._ended
        while ended and (len(ended) > _MAX_ENDED or next(iter(ended.values())) < now):
            ended.popitem(last=False)

    def _tell(self, message: dict[str, Any]) -> None:
        """Tell the other replicas (none without Redis)."""

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


class RedisToolCalls(ToolCalls):
    """This process's, and the fleet's through one Redis pub/sub channel."""

    def __init__(self, redis: RedisSettings, log: Logger) -> None:
        super().__init__()
        self._channel = f"{redis.key_prefix}:mcp"
        self._timeout_s = redis.timeout_s
        self._log = log
        self._client = aioredis.Redis.from_url(
            redis.url, socket_connect_timeout=max(1.0, redis.timeout_s * 4),
            retry_on_timeout=False,
        )  # fmt: skip
        self._listener: asyncio.Task[None] | None = None
        self._telling: set[asyncio.Task[None]] = set()
        self._failed_at = 0.0

    def start(self) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    def _tell(self, message: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(orjson.dumps(message)))
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    async def _publish(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._client.publish(self._channel, data)
        except (RedisError, OSError, TimeoutError) as e:
            self._failed("publish", e)

    async def _listen(self) -> None:
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                async for message in pubsub.listen():
                    self._heard(message.get("data"))
            except (RedisError, OSError) as e:
                self._failed("listen", e)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(0.5)

    def _heard(self, data: object) -> None:
        try:
            message = orjson.loads(data) if isinstance(data, bytes) else None
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict):
            return
        match message:
            case {"c": [str(session_id), int() | str() as rpc_id]}:
                self._cancel_here(session_id, rpc_id)
            case {"e": [str(session_id), int() | float() as expires_at]}:
                self._end_here(session_id, float(expires_at))

    def _failed(self, op: str, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._failed_at > 10:
            self._failed_at = now
            self._log.warning("mcp_redis_failed", op=op, error=type(e).__name__)

    async def close(self) -> None:
        for task in (self._listener, *self._telling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._client.aclose()


TOOL_CALLS = web.AppKey("tool_calls", ToolCalls)
