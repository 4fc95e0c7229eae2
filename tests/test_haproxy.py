"""The fleet as ``make fleet`` starts it (Redis, the emulator, two gateway
replicas, HAProxy in front), driven through HAProxy: streams spread over both
replicas and all complete; a replica drained during traffic leaves the
rotation while its live streams finish, and no client sees an error."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loadtest.fleet import Fleet, haproxy_binary, start_fleet
from loadtest.harness import free_port, metric_total
from tests.conftest import ACME_KEY, read_stream

AUTH = {"Authorization": f"Bearer {ACME_KEY}"}


def start_test_fleet(tmp_path: Path, emulator_args: tuple[str, ...], **tables: Any) -> Fleet:
    """``make fleet``'s fleet (Redis, emulator, two replicas, HAProxy) on free ports."""
    if haproxy_binary() is None or shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy or redis-server is missing: .ci/run installs both")
        pytest.skip("needs haproxy and redis-server (apt-get install haproxy redis-server)")
    return start_fleet(
        tmp_path, free_port(), replicas=2, key=ACME_KEY, emulator_args=emulator_args,
        server={"shutdown_grace_s": 20.0}, **tables,
    )  # fmt: skip


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    started = start_test_fleet(
        tmp_path, ("--ttft-ms", "20", "--tokens-per-s", "100", "--reply-tokens", "20")
    )
    yield started
    started.stop()


async def served(session: aiohttp.ClientSession, port: int) -> float:
    """Chat requests a replica answered, from its own /metrics."""
    return await metric_total(
        session, port, "chatiq_gateway_requests_total", 'route="/api/chatbot"'
    )


async def one_stream(session: aiohttp.ClientSession, fleet: Fleet) -> list[str]:
    async with session.post(f"{fleet.url}/api/chatbot", json={"message": "hi"}, headers=AUTH) as r:
        return (await read_stream(r))[1]  # asserts 200


def complete(events: list[str]) -> bool:
    return events[-1] == "[DONE]" and not any('"error"' in e for e in events)


async def test_streams_through_haproxy_spread_over_both_replicas_and_complete(
    fleet: Fleet,
) -> None:
    # A connection per stream, as many separate clients would have.
    connector = aiohttp.TCPConnector(force_close=True, limit=50)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(one_stream(session, fleet) for _ in range(200)))
        assert all(complete(events) for events in results)
        counts = [await served(session, port) for _, port, _ in fleet.replicas]
    assert sum(counts) == 200 and min(counts) > 0, counts


async def test_a_replica_drained_during_traffic_costs_no_client_an_error(fleet: Fleet) -> None:
    (draining, drained_port, _), (_, other_port, _) = fleet.replicas
    outcomes: list[bool] = []
    stop_at = time.monotonic() + 4.0

    async def user(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            outcomes.append(complete(await one_stream(session, fleet)))

    async with aiohttp.ClientSession() as session:  # keep-alive clients, as browsers are
        users = [asyncio.ensure_future(user(session)) for _ in range(30)]
        await asyncio.sleep(1.0)
        before = await served(session, drained_port)
        draining.send_signal(signal.SIGTERM)
        await asyncio.gather(*users)
        assert await asyncio.to_thread(draining.wait, 30) == 0  # drained and gone
        assert await served(session, other_port) > 0
    assert before > 0  # it did take its share before the drain
    assert len(outcomes) > 100 and all(outcomes), f"{outcomes.count(False)} streams failed"
