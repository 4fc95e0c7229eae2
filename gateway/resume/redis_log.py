"""Resumable streams on any replica: each stream's events in a Redis Stream.

The replica that reads the upstream keeps the journal in its memory (its own
readers read it there) and copies every event to a Redis Stream, with
explicit ids ``0-<event id>`` so that Redis's order is the stream's. Another
replica serves a resume from Redis: ``XRANGE`` for what was missed, then
``XREAD BLOCK`` for what comes. The last event carries ``end``. Keys (a hash
tag per stream, so a Cluster keeps them in one slot) expire ``retain_s``
after the end, or after the longest a stream may last if its replica dies:

- ``{prefix:resume:<id>}:meta``: the tenant and the frontend;
- ``{prefix:resume:<id>}:events``: the events, trimmed as the journal is;
- ``{prefix:resume:<id>}:reader``: set while a replica serves a resume, so
  that the producing replica does not cancel a detached stream someone reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from ..config import RedisSettings, ResumeSettings
from ..logs import Logger
from .journal import Gone, Journal

_BATCH = 512  # events per XRANGE / XREAD
_READER_TTL_MS = 5000
_MAX_BLOCK_S = 1.0  # a remote reader looks up at least this often (a hand-over, its key)


class RedisStreams:
    def __init__(
        self, redis: RedisSettings, resume: ResumeSettings, max_life_s: float, log: Logger
    ) -> None:
        self._prefix = redis.key_prefix
        self._resume = resume
        self._max_life_s = max_life_s  # a stream's total timeout: its keys outlive it
        self._log = log
        # Its own connections: a blocking XREAD may take a second, the quotas'
        # round trips must not wait behind it.
        self._client = aioredis.Redis.from_url(
            redis.url,
            socket_timeout=_MAX_BLOCK_S + max(1.0, redis.timeout_s * 4),
            socket_connect_timeout=max(1.0, redis.timeout_s * 4),
            retry_on_timeout=False,
        )
        self._mirrors: set[asyncio.Task[None]] = set()

    def _key(self, stream_id: str, part: str) -> str:
        return f"{{{self._prefix}:resume:{stream_id}}}:{part}"

    async def close(self) -> None:
        if self._mirrors:
            await asyncio.wait(self._mirrors, timeout=5)
        await self._client.aclose()

    # the producing replica

    def _chat_key(self, frontend: str, tenant: str, chat_id: str) -> str:
        return f"{{{self._prefix}:resume-chat}}:{frontend}:{tenant}:{chat_id}"

    async def announce(self, journal: Journal) -> bool:
        """Make the stream known to every replica (before its id is given out)."""
        ttl = round((self._max_life_s + self._resume.retain_s) * 1000)
        try:
            if journal.chat_key is not None:
                await self._client.set(self._chat_key(*journal.chat_key), journal.id, px=ttl)
            await self._client.hset(
                self._key(journal.id, "meta"),
                mapping={
                    "tenant": journal.tenant,
                    "frontend": journal.frontend,
                    "headers": orjson.dumps(journal.headers),
                },
            )
            await self._client.pexpire(self._key(journal.id, "meta"), ttl)
        except (RedisError, OSError) as e:
            self._log.warning("resume_redis_failed", op="announce", error=type(e).__name__)
            return False
        return True

    def mirror(self, journal: Journal) -> asyncio.Task[None]:
        """Copy the journal's events to Redis as they come, until its end."""
        task = asyncio.create_task(self._mirror(journal))
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)
        return task

    async def _mirror(self, journal: Journal) -> None:
        copied = 0
        ttl = round((self._max_life_s + self._resume.retain_s) * 1000)
        while True:
            try:
                events = journal.events_after(copied)
            except Gone:  # the journal let them go before they were copied
                copied = journal.last_id - 1
                self._log.warning("resume_redis_behind", stream_events=journal.last_id)
                continue
            ended = journal.finished and copied + len(events) >= journal.last_id
            if events:
                try:
                    await self._append(journal, copied, events, ended, ttl)
                except (RedisError, OSError) as e:
                    self._log.warning("resume_redis_failed", op="append", error=type(e).__name__)
                    return  # resumable on this replica only, from now on
                copied += len(events)
            if ended:
                return
            if not events:
                await journal.wait(self._max_life_s)

    async def _append(
        self, journal: Journal, copied: int, events: list[bytes], ended: bool, ttl_ms: int
    ) -> None:
        key = self._key(journal.id, "events")
        pipe = self._client.pipeline(transaction=False)
        last = len(events) - 1
        for i, event in enumerate(events):
            fields: dict[Any, Any] = {"d": event}
            if ended and i == last:
                fields["end"] = 1
            pipe.xadd(key, fields, id=f"0-{copied + i + 1}")
        if ended:
            ttl_ms = round(self._resume.retain_s * 1000)
            pipe.pexpire(self._key(journal.id, "meta"), ttl_ms)
        if journal.first_id > 1:  # trimmed as the journal is
            pipe.xtrim(key, minid=f"0-{journal.first_id}")
        pipe.pexpire(key, ttl_ms)
        await pipe.execute()

    async def copied_up_to(self, stream_id: str, event_id: int, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until Redis holds the events up to ``event_id``."""
        key = self._key(stream_id, "events")
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        with contextlib.suppress(RedisError, OSError):
            while loop.time() < until:
                last: Any = await self._client.xrevrange(key, count=1)
                if last and _seq(last[0][0]) >= event_id:
                    return
                await asyncio.sleep(0.01)

    async def has_reader(self, stream_id: str) -> bool:
        try:
            return bool(await self._client.exists(self._key(stream_id, "reader")))
        except (RedisError, OSError):
            return False

    # a replica serving a resume

    async def chat_stream(self, frontend: str, tenant: str, chat_id: str) -> RemoteLog | None:
        """A chat's latest stream, if it is still streaming."""
        stream_id: bytes | None = await self._client.get(self._chat_key(frontend, tenant, chat_id))  # type: ignore[assignment]
        if stream_id is None:
            return None
        remote = await self.find(stream_id.decode(), tenant)
        return None if remote is None or await remote.finished() else remote

    async def find(self, stream_id: str, tenant: str) -> RemoteLog | None:
        """The stream's events in Redis, if it is this tenant's and still kept."""
        meta: dict[bytes, bytes] = await self._client.hgetall(self._key(stream_id, "meta"))  # type: ignore[assignment]
        if meta.get(b"tenant") != tenant.encode():
            return None
        frontend = meta.get(b"frontend", b"chatiq").decode()
        headers = orjson.loads(meta.get(b"headers", b"{}"))
        return RemoteLog(self._client, stream_id, self._key(stream_id, "events"),
                         self._key(stream_id, "reader"), frontend, headers)  # fmt: skip


def _seq(entry_id: bytes) -> int:
    """An event's id from its Redis entry id (``0-<id>``)."""
    return int(entry_id.split(b"-")[1])


class RemoteLog:
    """A stream's events in Redis, read as a journal is (``EventLog``)."""

    def __init__(
        self,
        client: aioredis.Redis,
        stream_id: str,
        key: str,
        reader_key: str,
        frontend: str,
        headers: dict[str, str],
    ) -> None:
        self._client = client
        self.stream_id = stream_id
        self._key = key
        self._reader_key = reader_key
        self.frontend = frontend
        self.headers = headers
        self._ended = False
        self._loop = asyncio.get_running_loop()
        self._marked = 0.0

    async def read(self, after: int, wait_s: float) -> tuple[list[bytes], bool]:
        if self._ended:
            return [], True
        await self._mark_reading()
        rows: Any = await self._client.xrange(self._key, min=f"0-{after + 1}", count=_BATCH)
        if not rows:
            block = round(min(wait_s, _MAX_BLOCK_S) * 1000)
            answer: Any = await self._client.xread(
                {self._key: f"0-{after}"}, count=_BATCH, block=block
            )
            rows = answer[0][1] if answer else []
        if rows and _seq(rows[0][0]) != after + 1:
            raise Gone(f"the events after {after} are no longer kept")
        self._ended = any(b"end" in fields for _, fields in rows)
        return [fields[b"d"] for _, fields in rows], self._ended

    async def finished(self) -> bool:
        last: Any = await self._client.xrevrange(self._key, count=1)
        return bool(last) and b"end" in last[0][1]

    async def _mark_reading(self) -> None:
        """Tell the producing replica that this stream is being read."""
        now = self._loop.time()
        if now - self._marked > _READER_TTL_MS / 3000:
            self._marked = now
            await self._client.set(self._reader_key, b"1", px=_READER_TTL_MS)
