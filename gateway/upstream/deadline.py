"""``asyncio.timeout_at`` for a loop already at hand.

On Python 3.11, asyncio's ``Timeout`` asks for the running loop twice as it
is entered (``current_task()``, then ``reschedule()``), and each ask is a
getpid(2) system call; every stream's request to the upstream enters one.
The semantics are asyncio's: once the deadline passes, the task is
cancelled and the block raises ``TimeoutError``, unless the task was also
cancelled from elsewhere, which then wins.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_task", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._loop = loop
        self._when = when
        self._expired = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task(self._loop)  # with the loop: no getpid
        if task is None:
            raise RuntimeError("a Deadline is for use inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        loop = self._loop
        if self._when <= loop.time():
            self._handle: asyncio.Handle = loop.call_soon(self._expire)
        else:
            self._handle = loop.call_at(self._when, self._expire)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def _expire(self) -> None:
        self._task.cancel()
        self._expired = True
