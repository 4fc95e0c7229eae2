"""Deadline behaves as asyncio.timeout_at in every case, side by side."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from gateway.upstream.deadline import Deadline

Factory = Callable[[float], AbstractAsyncContextManager[Any]]


def deadline(when: float) -> AbstractAsyncContextManager[None]:
    return Deadline(asyncio.get_running_loop(), when)


BOTH = pytest.mark.parametrize("at", [deadline, asyncio.timeout_at], ids=["Deadline", "asyncio"])


@BOTH
async def test_a_block_that_finishes_in_time_is_untouched(at: Factory) -> None:
    loop = asyncio.get_running_loop()
    async with at(loop.time() + 1):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)  # the timer was cancelled: nothing fires later
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


@BOTH
async def test_a_block_past_its_deadline_raises_timeout_and_the_task_is_not_left_cancelled(
    at: Factory,
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with at(started + 0.05):
            await asyncio.sleep(5)
    assert 0.04 < loop.time() - started < 1
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # still runnable


@BOTH
async def test_a_deadline_already_past_expires_at_the_first_wait(at: Factory) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with at(loop.time() - 1):
            await asyncio.sleep(1)


@BOTH
async def test_a_cancel_from_elsewhere_is_a_cancel_not_a_timeout(at: Factory) -> None:
    loop = asyncio.get_running_loop()

    async def guarded() -> None:
        async with at(loop.time() + 5):
            await asyncio.sleep(5)

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@BOTH
async def test_a_cancel_from_elsewhere_as_the_deadline_passes_still_wins(at: Factory) -> None:
    loop = asyncio.get_running_loop()
    outcome: list[str] = []
    # One moment for both, so that they are due in the same turn of the loop
    # (each taken from its own clock reading, a busy machine split them).
    when = loop.time() + 0.2

    async def guarded() -> None:
        try:
            async with at(when):
                await asyncio.sleep(5)
        except TimeoutError:
            outcome.append("timeout")
            raise

    task = asyncio.create_task(guarded())
    loop.call_at(when, task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == []


async def test_a_deadline_outside_a_task_is_refused() -> None:
    loop = asyncio.get_running_loop()
    said: asyncio.Future[str] = loop.create_future()

    def in_a_callback() -> None:  # on the loop, but no task is running
        entering = Deadline(loop, loop.time() + 1).__aenter__()
        try:
            entering.send(None)
        except RuntimeError as e:
            said.set_result(str(e))
        else:
            said.set_result("entered")

    loop.call_soon(in_a_callback)
    assert "inside a task" in await said
