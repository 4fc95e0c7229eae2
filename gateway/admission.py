"""Admission control: a fixed number of upstream slots and a bounded FIFO queue.

``async with admission.slot():`` is the only way in and out: the slot is freed
in one place whatever ends the block (success, error, cancellation, timeout).
A freed slot is handed straight to the oldest waiter, so the queue is fair and
the active count never dips below the limit while others wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .errors import QueueFull, QueueTimeout


class Admission:
    def __init__(self, max_active: int, max_queue: int, queue_timeout_s: float) -> None:
        self._max_active = max_active
        self._max_queue = max_queue
        self._queue_timeout_s = queue_timeout_s
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self._active < self._max_active and not self._waiters:
            self._active += 1
            return
        if len(self._waiters) >= self._max_queue:
            raise QueueFull("the gateway is at capacity; try again shortly", retry_after=1)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():
                self._release()  # a slot was handed over just as we gave up: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(e, TimeoutError):
                raise QueueTimeout(
                    "waited too long for capacity; try again shortly", retry_after=1
                ) from None
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; _active is unchanged
                return
        self._active -= 1
