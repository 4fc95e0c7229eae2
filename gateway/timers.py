"""Many streams' timers on one timer of the event loop's.

Each live stream keeps a timer (its total deadline, its idle limit, its next
keep-alive ping). A loop timer is a handle, a libuv timer and a bound method:
~550 bytes, held as long as the stream is. Here a timer is a three-item list
in a heap (~100 bytes), and the loop's timer is set for the earliest of them.
A cancelled timer lets go of its callback at once; its list leaves the heap
when its time comes, or with all the others once they outnumber the live ones.
The timing is the loop's: a callback runs once the loop's clock reaches its
time, never before.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any

# [when, sequence, callback]: lists compare by time, then by order of arming
# (never by callback); the callback is None once cancelled or run.
Timer = list[Any]

_COMPACT_AFTER = 64  # cancelled timers tolerated before the heap is rebuilt


class TimerHeap:
    __slots__ = ("_armed_at", "_cancelled", "_handle", "_heap", "_loop", "_sequence")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None  # the first caller's
        self._heap: list[Timer] = []
        self._sequence = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf
        self._cancelled = 0

    def __len__(self) -> int:
        """Timers armed and not yet run nor cancelled."""
        return len(self._heap) - self._cancelled

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` once the loop's clock reaches ``when``."""
        timer = [when, next(self._sequence), callback]
        heapq.heappush(self._heap, timer)
        if when < self._armed_at:
            self._arm(when)
        return timer

    def cancel(self, timer: Timer) -> None:
        if timer[2] is None:  # ran, or already cancelled
            return
        timer[2] = None
        if timer[1] < 0:  # out of the heap already, due to run on this turn
            return
        self._cancelled += 1
        heap = self._heap
        if self._cancelled > _COMPACT_AFTER and self._cancelled * 2 > len(heap):
            heap[:] = [t for t in heap if t[2] is not None]
            heapq.heapify(heap)
            self._cancelled = 0

    def _arm(self, when: float) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = loop.call_at(when, self._run)

    def _run(self) -> None:
        assert self._loop is not None
        self._handle = None
        self._armed_at = math.inf
        now = self._loop.time()
        heap = self._heap
        due: list[Timer] = []
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)
            if timer[2] is None:
                self._cancelled -= 1
            else:
                timer[1] = -1  # out of the heap: see cancel()
                due.append(timer)
        # Timers the callbacks arm run on a later turn of the loop, even if due.
        for timer in due:
            callback = timer[2]
            if callback is None:  # cancelled by one that ran before it
                continue
            timer[2] = None
            try:
                callback()
            except Exception as e:  # as the loop does: reported, and the others still run
                self._loop.call_exception_handler(
                    {"message": "a timer's callback failed", "exception": e}
                )
        if heap and heap[0][0] < self._armed_at:
            self._arm(heap[0][0])
