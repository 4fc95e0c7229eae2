"""TimerHeap: the live streams' timers, on one of the loop's, as loop timers behave."""

from __future__ import annotations

import asyncio
import gc
import weakref
from functools import partial

import pytest
import uvloop

from gateway.timers import TimerHeap


async def test_timers_run_in_time_order_and_never_early() -> None:
    loop = asyncio.get_running_loop()
    timers = TimerHeap()
    ran: list[tuple[str, float, float]] = []
    start = loop.time()
    for name, delay in [("c", 0.06), ("a", 0.02), ("b", 0.04), ("a2", 0.02)]:
        when = start + delay
        timers.call_at(when, partial(lambda n, w: ran.append((n, w, loop.time())), name, when))
    assert len(timers) == 4
    await asyncio.sleep(0.15)
    assert [name for name, _, _ in ran] == ["a", "a2", "b", "c"]  # ties: in arming order
    assert all(at >= when for _, when, at in ran)
    assert len(timers) == 0


@pytest.mark.process
def test_on_uvloop_too_no_timer_runs_before_its_time() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        timers = TimerHeap()
        early: list[float] = []
        for i in range(200):  # uvloop's timers count whole milliseconds
            when = loop.time() + 0.0003 * i

            def check(when: float = when) -> None:
                if loop.time() < when:
                    early.append(when - loop.time())

            timers.call_at(when, check)
        await asyncio.sleep(0.1)
        assert len(timers) == 0
        return early

    assert uvloop.run(main()) == []


async def test_an_earlier_timer_rearms_the_loop() -> None:
    loop = asyncio.get_running_loop()
    timers = TimerHeap()
    ran: list[str] = []
    timers.call_at(loop.time() + 5, lambda: ran.append("late"))
    timers.call_at(loop.time() + 0.01, lambda: ran.append("soon"))
    await asyncio.sleep(0.05)
    assert ran == ["soon"]


async def test_a_cancelled_timer_never_runs_and_lets_go_of_its_callback_at_once() -> None:
    loop = asyncio.get_running_loop()
    timers = TimerHeap()

    class Stream:
        fired = False

        def on_timer(self) -> None:
            self.fired = True

    stream = Stream()
    alive = weakref.ref(stream)
    timer = timers.call_at(loop.time() + 0.02, stream.on_timer)
    timers.cancel(timer)
    timers.cancel(timer)  # twice is harmless
    assert len(timers) == 0
    del stream
    gc.collect()
    assert alive() is None  # the heap holds nothing of it, though its entry waits
    await asyncio.sleep(0.05)


async def test_many_cancelled_timers_are_compacted_and_the_live_ones_still_run() -> None:
    loop = asyncio.get_running_loop()
    timers = TimerHeap()
    ran: list[int] = []
    armed = [timers.call_at(loop.time() + 60, partial(ran.append, i)) for i in range(1000)]
    live = timers.call_at(loop.time() + 0.02, lambda: ran.append(-1))
    for timer in armed:
        timers.cancel(timer)
    assert len(timers) == 1
    assert len(timers._heap) < 200  # rebuilt, not 1,001 entries long
    await asyncio.sleep(0.05)
    assert ran == [-1]
    timers.cancel(live)  # after it ran: nothing happens
    assert len(timers) == 0


async def test_a_failing_callback_is_reported_and_the_others_still_run() -> None:
    loop = asyncio.get_running_loop()
    reported: list[BaseException] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))
    timers = TimerHeap()
    ran: list[str] = []
    when = loop.time() + 0.01

    def fail() -> None:
        raise RuntimeError("boom")

    timers.call_at(when, fail)
    timers.call_at(when, lambda: ran.append("next"))
    await asyncio.sleep(0.05)
    assert ran == ["next"]
    assert [str(e) for e in reported] == ["boom"]


async def test_a_timer_cancelled_by_one_due_at_the_same_time_does_not_run() -> None:
    loop = asyncio.get_running_loop()
    timers = TimerHeap()
    ran: list[str] = []
    when = loop.time() + 0.01
    timers.call_at(when, lambda: timers.cancel(second))
    second = timers.call_at(when, lambda: ran.append("second"))
    await asyncio.sleep(0.05)
    assert ran == []
    assert len(timers) == 0


async def test_a_timer_armed_by_a_callback_runs_on_a_later_turn_of_the_loop() -> None:
    loop = asyncio.get_running_loop()
    timers = TimerHeap()
    order: list[str] = []
    when = loop.time() + 0.01
    timers.call_at(when, lambda: timers.call_at(loop.time() - 1, lambda: order.append("armed")))
    timers.call_at(when, lambda: order.append("same turn"))  # runs before the armed one
    await asyncio.sleep(0.05)
    assert order == ["same turn", "armed"]


@pytest.mark.parametrize("count", [1, 10_000])
async def test_every_timer_runs_once(count: int) -> None:
    loop = asyncio.get_running_loop()
    timers = TimerHeap()
    ran = [0] * count
    start = loop.time()

    def mark(i: int) -> None:
        ran[i] += 1

    for i in range(count):
        timers.call_at(start + (i % 50) / 1000, partial(mark, i))
    await asyncio.sleep(0.2)
    assert ran == [1] * count
