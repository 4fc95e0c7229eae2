"""Resumable streams on any replica: each stream's events in a Redis Stream.

The replica that reads the upstream keeps the stream's journal in its memory
(its own readers read it there), and one writer task copies every journal's
new events to Redis, all of them in one pipeline per round: explicit ids
``0-<event id>``, so that Redis's order is the stream's; the last event
carries ``end``. Another replica serves a resume from a *replica journal*:
filled from Redis (``XRANGE``), then kept up to date by one feed task: each
writer round publishes the ids of the streams it wrote to, and the feed
fetches the new events of those it follows (one pipeline of ``XRANGE``), and
of all of them once a second in case a notice was lost. Readers read a
replica journal as they read a local one. A few connections per process,
however many streams.

What a request waits for (announcing a stream before its id is given out,
loading one to resume it) takes at most ``redis.timeout_s``, not counting
the wait for a connection; after such a call failed, the next ones for half
a second fail at once: a Redis that hangs costs a stream one timeout, and
the stream is then resumable on its own replica only.

Keys (a hash tag per stream, so that a Cluster keeps them in one slot)
expire ``retain_s`` after the end, or after the longest a stream may last if
its replica dies:

- ``{prefix:resume:<id>}:meta``: the tenant, its owner (the tenant, or the
  signed-in user who started it), the frontend, the response head;
  its expiry pushed on with each copy and at least once a second, which also
  tells the producer when Redis lost it (a restart): then the stream is
  announced again and the events it keeps copied again;
- ``{prefix:resume:<id>}:events``: the events, trimmed as the journal is;
- ``{prefix:resume:<id>}:reader``: set while another replica serves the
  stream, so that the producing replica does not cancel it as detached;
- ``{prefix:resume-chat}:<frontend>:<owner>:<chat id>``: a chat's latest stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from redis import asyncio as aioredis
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config import RedisSettings, ResumeSettings
from gateway.logs import Logger
from gateway.resume.journal import Gone, Journal

_BATCH = 512  # events per XREAD round and stream
_CONNECTIONS = 16  # to Redis for the writer, resumes and the feed's fetches
_FOR_REQUESTS = _CONNECTIONS - 2  # the writer and the feed each hold one at most
_POLL_S = 1.0
# A round (the writer's copy, the feed's fetch) at most this often: under load
# the cost is per round, not per event; an event crosses replicas this much later.
_ROUND_S = 0.01  # every followed stream is looked at this often, notice or not
_READER_TTL_MS = 5000  # a reader key lives this long unless renewed (each poll)
_RETRY_S = 0.5  # after Redis failed, the writer and the feed wait this long
_T = TypeVar("_T")
_RENEW_S = 1.0  # every live stream is copied (its keys renewed) at least this often


class RedisStreams:
    def __init__(
        self, redis: RedisSettings, resume: ResumeSettings, max_life_s: float, log: Logger
    ) -> None:
        self._prefix = redis.key_prefix
        self._resume = resume
        self._max_life_s = max_life_s  # a stream's total timeout: its keys outlive it
        self._log = log
        self._timeout_s = redis.timeout_s
        self._requests = asyncio.Semaphore(_FOR_REQUESTS)  # a request's turn, then its timer
        self._refuse_until = 0.0  # after a request's call failed: fail fast until then
        timeouts: dict[str, Any] = {
            "socket_timeout": max(1.0, redis.timeout_s * 4),
            "socket_connect_timeout": max(1.0, redis.timeout_s * 4),
            "retry_on_timeout": False,
        }
        # A few connections, reused: a burst of resumes waits for one rather
        # than opening hundreds (each a handshake).
        pool = aioredis.BlockingConnectionPool.from_url(
            redis.url, max_connections=_CONNECTIONS, timeout=max(1.0, redis.timeout_s * 4),
            **timeouts,
        )  # fmt: skip
        self._client = aioredis.Redis(connection_pool=pool)
        # The feed's subscription has a connection of its own (no read timeout:
        # it waits for notices).
        self._feed_client = aioredis.Redis.from_url(
            redis.url, **{**timeouts, "socket_timeout": None}
        )
        self._changes = f"{{{self._prefix}:resume}}:changed"  # the writers' notices
        # the producing side: what each announced journal has copied so far
        self._copied: dict[str, int] = {}
        self._live: dict[str, Journal] = {}  # the journals being copied
        self._lost: set[str] = set()  # Redis lost their keys: announce them again
        self._dirty: dict[str, Journal] = {}
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # set after each round the writer wrote
        # the reading side: streams of other replicas followed here
        self._replicas: dict[str, Journal] = {}
        self._failed_at = 0.0
        self._writer_failing = False  # its last round failed: Redis is not taking copies
        self._feed_failing = False  # its last round failed: followed streams get nothing
        self._tasks = [
            asyncio.create_task(self._write_rounds()),
            asyncio.create_task(self._feed_rounds()),
        ]

    def _key(self, stream_id: str, part: str) -> str:
        return f"{{{self._prefix}:resume:{stream_id}}}:{part}"

    def _chat_key(self, frontend: str, owner: str, chat_id: str) -> str:
        return f"{{{self._prefix}:resume-chat}}:{frontend}:{owner}:{chat_id}"

    async def close(self) -> None:
        """After the writer copied what it still had (a few seconds at most), or
        at once when Redis does not take it: a shutdown does not wait for a
        Redis that is gone."""
        until = time.monotonic() + 5
        while self._copied and not self._writer_failing and time.monotonic() < until:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
        await self._feed_client.aclose()

    async def _ask(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """A call a request waits for: a connection first (not timed, so that a
        burst does not look like a Redis down), then ``redis.timeout_s`` at most;
        after one failed, refused at once for a moment. Raises ``RedisError``."""
        async with self._requests:
            if time.monotonic() < self._refuse_until:
                raise RedisTimeoutError("Redis did not answer a moment ago")
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await call()
            except (RedisError, OSError, TimeoutError) as e:
                self._refuse_until = time.monotonic() + _RETRY_S
                self._failed(what, e)
                if isinstance(e, RedisError):
                    raise
                raise RedisTimeoutError(f"Redis did not answer ({type(e).__name__})") from e

    def _failed(self, op: str, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._failed_at > 10:  # once in a while, not once per stream
            self._failed_at = now
            self._log.warning("resume_redis_failed", op=op, error=type(e).__name__)

    # the producing replica

    async def announce(self, journal: Journal) -> bool:
        """Make the stream known to every replica (before its id is given out),
        then copy its events as they come."""
        pipe = self._client.pipeline(transaction=False)
        self._describe(pipe, journal)
        try:
            await self._ask("announce", pipe.execute)
        except RedisError:
            return False
        self._copied[journal.id] = 0
        self._live[journal.id] = journal
        journal.listener = self._changed
        self._changed(journal)
        return True

    def _describe(self, pipe: Any, journal: Journal) -> None:
        """Queue the stream's metadata (and its chat's pointer to it)."""
        ttl = round((self._max_life_s + self._resume.retain_s) * 1000)
        meta = self._key(journal.id, "meta")
        # The head's names are multidict's istr (a str subclass, which orjson
        # takes as a key only with OPT_NON_STR_KEYS); they come back as str.
        head = orjson.dumps(journal.headers, option=orjson.OPT_NON_STR_KEYS)
        fields: dict[str, str | bytes] = {
            "tenant": journal.tenant,
            "owner": journal.owner,
            "frontend": journal.frontend,
            "headers": head,
        }
        if journal.traceparent is not None:
            fields["traceparent"] = journal.traceparent
        pipe.hset(meta, mapping=fields)
        pipe.pexpire(meta, ttl)
        if journal.chat_key is not None:
            pipe.set(self._chat_key(*journal.chat_key), journal.id, px=ttl)

    def _changed(self, journal: Journal) -> None:
        self._dirty[journal.id] = journal
        self._wake.set()

    async def _write_rounds(self) -> None:
        """Each round: every changed journal's new events, in one pipeline; every
        live journal at least once a second, to renew its keys."""
        renewed = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RENEW_S):
                    await self._wake.wait()
            await asyncio.sleep(_ROUND_S)  # let this round gather what comes with it
            self._wake.clear()
            if time.monotonic() - renewed >= _RENEW_S:
                renewed = time.monotonic()
                for journal in self._live.values():
                    self._dirty.setdefault(journal.id, journal)
            dirty, self._dirty = self._dirty, {}
            pipe = self._client.pipeline(transaction=False)
            wrote: list[tuple[Journal, int, bool]] = []
            meta_at: list[int] = []  # where each one's meta renewal is in the results
            for journal in dirty.values():
                copied = self._copied.get(journal.id)
                if copied is None:
                    continue
                if journal.id in self._lost:  # its keys again, its events from the start
                    self._describe(pipe, journal)
                    pipe.delete(self._key(journal.id, "events"))
                    copied = 0
                wrote.append(self._copy(pipe, journal, copied))
                meta_at.append(len(pipe) - 1)
            if wrote:  # replicas following one of them fetch its new events
                pipe.publish(self._changes, " ".join(journal.id for journal, _, _ in wrote))
            try:
                results = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as e:
                self._failed("append", e)
                self._writer_failing = True
                for journal, _, _ in wrote:
                    self._dirty.setdefault(journal.id, journal)
                await asyncio.sleep(_RETRY_S)
                self._wake.set()
                continue
            if self._writer_failing:  # Redis is back, maybe empty: look at them all now
                self._writer_failing = False
                renewed = 0.0
                self._wake.set()
            for result in results:  # a re-sent event Redis already has is no error here
                if isinstance(result, Exception) and not isinstance(result, ResponseError):
                    self._failed("append", result)
            for (journal, copied, ended), at in zip(wrote, meta_at, strict=True):
                self._lost.discard(journal.id)
                if results[at] == 0:  # the meta key was gone: Redis lost the stream
                    self._lost.add(journal.id)
                    self._dirty[journal.id] = journal
                    self._wake.set()
                elif ended:
                    self._copied.pop(journal.id, None)
                    self._live.pop(journal.id, None)
                    journal.listener = None
                else:
                    self._copied[journal.id] = copied
            self._progress.set()
            self._progress = asyncio.Event()

    def _copy(self, pipe: Any, journal: Journal, copied: int) -> tuple[Journal, int, bool]:
        """Queue a journal's events after ``copied``; (journal, copied after, ended)."""
        key = self._key(journal.id, "events")
        try:
            events = journal.events_after(copied)
        except Gone:  # let go before they were copied: the copy has a gap a resume sees
            copied = journal.first_id - 1
            events = journal.events_after(copied)
        ended = journal.finished and copied + len(events) >= journal.last_id
        last = len(events) - 1
        for i, event in enumerate(events):
            fields: dict[Any, Any] = {"d": event}
            if ended and i == last:
                fields["end"] = 1
            pipe.xadd(key, fields, id=f"0-{copied + i + 1}")
        if journal.first_id > 1:  # trimmed as the journal is
            pipe.xtrim(key, minid=f"0-{journal.first_id}")
        life_ms = round((self._resume.retain_s if ended else self._max_life_s) * 1000)
        pipe.pexpire(key, life_ms)
        meta_ms = life_ms if ended else round((self._max_life_s + self._resume.retain_s) * 1000)
        pipe.pexpire(self._key(journal.id, "meta"), meta_ms)  # last: 0 if Redis lost it
        return journal, copied + len(events), ended

    async def copied_up_to(self, stream_id: str, event_id: int, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until Redis holds this stream's events up
        to ``event_id`` (at once if this process does not copy it)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._copied.get(stream_id, event_id) < event_id:
                    await self._progress.wait()

    async def has_reader(self, stream_id: str) -> bool:
        try:
            return bool(
                await self._ask(
                    "reader", lambda: self._client.exists(self._key(stream_id, "reader"))
                )
            )
        except RedisError:
            return False

    # a replica serving a resume

    async def replica(self, stream_id: str, owner: str) -> Journal | None:
        """The stream as this replica follows it, if it is this owner's and kept."""
        journal = self._replicas.get(stream_id)
        if journal is not None:
            return journal if journal.owner == owner else None
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self._key(stream_id, "meta"))
        pipe.xrange(self._key(stream_id, "events"))
        meta, rows = await self._ask("load", pipe.execute)
        if meta.get(b"owner", meta.get(b"tenant")) != owner.encode("utf-8", "surrogateescape"):
            return None  # and nothing written: another owner's probe keeps nothing alive
        reader = self._key(stream_id, "reader")
        await self._ask("reader", lambda: self._client.set(reader, b"1", px=_READER_TTL_MS))
        frontend = meta.get(b"frontend", b"chatiq").decode()
        tenant = meta[b"tenant"].decode("utf-8", "surrogateescape")
        size = self._resume.max_stream_bytes
        journal = Journal(stream_id, tenant, frontend, size, owner)
        journal.headers = orjson.loads(meta.get(b"headers", b"{}"))
        traceparent = meta.get(b"traceparent")
        journal.traceparent = None if traceparent is None else traceparent.decode("latin-1")
        if rows:
            journal.start_at(_seq(rows[0][0]))
            _append(journal, rows)
        if stream_id in self._replicas:  # another resume made it meanwhile
            return self._replicas[stream_id]
        if not journal.finished:
            self._replicas[stream_id] = journal
        return journal

    async def chat_stream(self, frontend: str, owner: str, chat_id: str) -> Journal | None:
        """A chat's latest stream, if it is still streaming."""
        key = self._chat_key(frontend, owner, chat_id)
        stream_id = await self._ask("load", lambda: self._client.get(key))
        if stream_id is None:
            return None
        name = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
        journal = await self.replica(name, owner)
        return None if journal is None or journal.finished else journal

    def stalled_by_redis(self, journal: Journal) -> bool:
        """Whether this replica journal has gone silent because Redis does not
        answer (rather than because its producing replica went away)."""
        return self._feed_failing and self._replicas.get(journal.id) is journal

    def release(self, journal: Journal) -> None:
        """Its last reader here left: stop following it."""
        if journal.readers == 0 and self._replicas.get(journal.id) is journal:
            del self._replicas[journal.id]

    async def _feed_rounds(self) -> None:
        """Followed streams' new events, fetched when the writers say they changed;
        every followed stream looked at once a second anyway (a notice can be
        lost), and its reader key renewed."""
        pubsub = self._feed_client.pubsub()
        polled = 0.0
        while True:
            try:
                if not pubsub.subscribed:
                    await pubsub.subscribe(self._changes)
                changed = await self._changed_streams(pubsub)
                if time.monotonic() - polled > _POLL_S:
                    polled = time.monotonic()
                    changed = set(self._replicas)
                    await self._mark_readers()
                await self._fetch(changed)
                self._feed_failing = False
                await asyncio.sleep(_ROUND_S)
            except (RedisError, OSError) as e:
                self._feed_failing = True
                self._failed("read", e)
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
                pubsub = self._feed_client.pubsub()
                await asyncio.sleep(_RETRY_S)

    async def _changed_streams(self, pubsub: Any) -> set[str]:
        """The followed streams named in the notices that came (waiting a little)."""
        changed: set[str] = set()
        timeout = _POLL_S
        while (notice := await pubsub.get_message(ignore_subscribe_messages=True,
                                                  timeout=timeout)) is not None:  # fmt: skip
            for stream_id in notice["data"].decode().split():
                if stream_id in self._replicas:
                    changed.add(stream_id)
            timeout = 0.0  # take what else is there, then fetch
        return changed

    async def _fetch(self, stream_ids: set[str]) -> None:
        for stream_id, journal in list(self._replicas.items()):
            if journal.finished:
                del self._replicas[stream_id]
        followed = [(i, self._replicas[i]) for i in stream_ids if i in self._replicas]
        if not followed:
            return
        pipe = self._client.pipeline(transaction=False)
        for stream_id, journal in followed:
            pipe.xrange(self._key(stream_id, "events"), min=f"0-{journal.last_id + 1}")
        for (_, journal), rows in zip(followed, await pipe.execute(), strict=True):
            _append(journal, rows)

    async def _mark_readers(self) -> None:
        if self._replicas:
            pipe = self._client.pipeline(transaction=False)
            for stream_id in self._replicas:
                pipe.set(self._key(stream_id, "reader"), b"1", px=_READER_TTL_MS)
            await pipe.execute()


def _seq(entry_id: bytes) -> int:
    """An event's id from its Redis entry id (``0-<id>``)."""
    return int(entry_id.split(b"-")[1])


def _append(journal: Journal, rows: list[Any]) -> None:
    """Redis entries onto a replica journal, in order, from its next id on."""
    events: list[bytes] = []
    ended = False
    for entry_id, fields in rows:
        if _seq(entry_id) != journal.last_id + len(events) + 1:
            continue  # already held (or a gap: then its readers see it go silent)
        events.append(fields[b"d"])
        ended = ended or b"end" in fields
    journal.append(events, final=ended)
