"""This process's resumable streams: their journals, a detached one's grace,
a finished one's retention, and (with Redis) their copies for other replicas.

A stream whose last reader leaves before the end is *detached*: its upstream
is read on for ``resume.detach_grace_s``; if nobody resumes it by then (here,
or on another replica through Redis), the upstream is cancelled. A finished
stream stays resumable for ``resume.retain_s``; at most ``resume.max_retained``
finished streams are kept, the oldest let go first.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import Mapping

from aiohttp import web

from gateway.chat import WireFormat
from gateway.config import ResumeSettings
from gateway.logs import Logger
from gateway.metrics import Metrics
from gateway.resume.journal import Journal
from gateway.resume.redis_log import RedisStreams


def new_stream_id() -> str:
    """128 random bits, URL-safe: not guessable, not enumerable."""
    return secrets.token_urlsafe(16)


class ResumableStreams:
    def __init__(
        self,
        settings: ResumeSettings,
        metrics: Metrics,
        log: Logger,
        frontends: Mapping[str, WireFormat],
    ) -> None:
        self.settings = settings
        self.frontends = frontends  # by name: each stream's wire format
        self.remote: RedisStreams | None = None  # with [redis]: resumable on any replica
        self._metrics = metrics
        self._log = log
        self._journals: dict[str, Journal] = {}
        self._retained: OrderedDict[str, asyncio.TimerHandle] = OrderedDict()
        self._graces: dict[str, asyncio.TimerHandle] = {}
        self._checks: set[asyncio.Task[None]] = set()
        # (frontend, owner, the client's chat id) -> that chat's latest stream
        self._chats: dict[tuple[str, str, str], str] = {}
        self.handing_over = False  # draining with Redis: readers end, clients resume elsewhere

    def __len__(self) -> int:
        return len(self._journals)

    def open(self, tenant: str, frontend: str, owner: str | None = None) -> Journal:
        size = self.settings.max_stream_bytes
        journal = Journal(new_stream_id(), tenant, frontend, size, owner)
        self._journals[journal.id] = journal
        return journal

    def find(self, stream_id: str, owner: str) -> Journal | None:
        """Its journal in this process; another owner's stream is nobody's."""
        journal = self._journals.get(stream_id)
        return journal if journal is not None and journal.owner == owner else None

    def name_chat(self, journal: Journal, chat_id: str) -> None:
        """The stream is its chat's latest: resumable by the chat's id too."""
        journal.chat_key = (journal.frontend, journal.owner, chat_id)
        self._chats[journal.chat_key] = journal.id

    def chat_stream(self, frontend: str, owner: str, chat_id: str) -> Journal | None:
        """A chat's latest stream in this process."""
        stream_id = self._chats.get((frontend, owner, chat_id))
        return None if stream_id is None else self.find(stream_id, owner)

    def reader_joined(self, journal: Journal) -> None:
        journal.readers += 1
        grace = self._graces.pop(journal.id, None)
        if grace is not None:
            grace.cancel()

    def reader_left(self, journal: Journal) -> None:
        journal.readers -= 1
        if journal.readers == 0 and not journal.finished and journal.id in self._journals:
            self._metrics.streams_detached.labels(journal.tenant).inc()
            self._start_grace(journal)

    def finished(self, journal: Journal) -> None:
        """Its producer is done: keep it ``retain_s`` for late resumes."""
        grace = self._graces.pop(journal.id, None)
        if grace is not None:
            grace.cancel()
        if journal.id not in self._journals:
            return
        loop = asyncio.get_running_loop()
        self._retained[journal.id] = loop.call_later(
            self.settings.retain_s, self.forget, journal.id
        )
        while len(self._retained) > self.settings.max_retained:
            oldest = next(iter(self._retained))
            self.forget(oldest)

    def forget(self, stream_id: str) -> None:
        journal = self._journals.pop(stream_id, None)
        key = journal.chat_key if journal is not None else None
        if key is not None and self._chats.get(key) == stream_id:
            del self._chats[key]
        for timers in (self._retained, self._graces):
            timer = timers.pop(stream_id, None)
            if timer is not None:
                timer.cancel()

    def hand_over(self) -> None:
        """Shutdown with Redis: every reader here ends, to resume on another replica."""
        self.handing_over = True
        for journal in self._journals.values():
            journal.poke()

    def close(self) -> None:
        for stream_id in list(self._journals):
            self.forget(stream_id)
        for check in self._checks:
            check.cancel()

    # the grace of a detached stream

    def _start_grace(self, journal: Journal) -> None:
        loop = asyncio.get_running_loop()
        self._graces[journal.id] = loop.call_later(
            self.settings.detach_grace_s, self._grace_over, journal
        )

    def _grace_over(self, journal: Journal) -> None:
        self._graces.pop(journal.id, None)
        if journal.readers or journal.finished:
            return
        if self.remote is None:
            self._abandon(journal)
            return
        check = asyncio.create_task(self._check_remote(journal))
        self._checks.add(check)
        check.add_done_callback(self._checks.discard)

    async def _check_remote(self, journal: Journal) -> None:
        """Someone may read it on another replica: then it lives on."""
        assert self.remote is not None
        if await self.remote.has_reader(journal.id):
            if not journal.readers and not journal.finished:
                self._start_grace(journal)
        elif not journal.readers and not journal.finished:
            self._abandon(journal)

    def _abandon(self, journal: Journal) -> None:
        self._metrics.streams_expired.labels(journal.tenant).inc()
        self._log.info("stream_expired", tenant=journal.tenant, events=journal.last_id)
        self.forget(journal.id)
        if journal.producer is not None:
            journal.producer.cancel()


RESUMABLE = web.AppKey("resumable", ResumableStreams)  # on the app
