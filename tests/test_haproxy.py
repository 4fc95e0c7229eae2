"""The fleet as ``make fleet`` starts it (Redis, the emulator, two gateway
replicas, HAProxy in front), driven through HAProxy: streams spread over both
replicas and all complete; a replica drained during traffic leaves the
rotation while its live streams finish, and no client sees an error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from loadtest.fleet import Fleet
from loadtest.harness import free_port, metric_total
from tests.helpers import AUTH, read_stream, require_fleet_programs, start_test_fleet

pytestmark = pytest.mark.external


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


@pytest.mark.process
async def test_make_fleet_restarts_a_replica_that_exits_and_stops_on_ctrl_c() -> None:
    """``make fleet`` itself: resumable streams on, a replica sent SIGTERM (a
    rolling restart) is started again on its port while the fleet serves, and
    Ctrl-C stops everything."""
    require_fleet_programs()
    port = free_port()
    fleet = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.fleet", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own group: a failed test can stop all it started
    )  # fmt: skip
    assert fleet.stdout is not None
    output = fleet.stdout

    async def line_with(text: str) -> str:
        while True:
            line: str = (await asyncio.wait_for(output.readline(), 30)).decode()
            assert line, f"make fleet ended before printing {text!r}"
            if text in line:
                return line

    url = f"http://127.0.0.1:{port}"
    resumable = {"Authorization": "Bearer demo-key", "X-Resumable": "1"}
    try:
        replicas = re.findall(r"port (\d+) \(pid (\d+)\)", await line_with("Replicas:"))
        assert len(replicas) == 2
        (replica_port, pid), _ = replicas
        logs = Path((await line_with("Logs:")).split("Logs:", 1)[1].strip())
        await line_with("Press Ctrl-C")
        async with aiohttp.ClientSession() as session:
            chat = f"{url}/api/chatbot"
            async with session.post(chat, json={"message": "hi"}, headers=resumable) as r:
                assert r.headers["X-Stream-Id"]  # resumable streams are on
                assert complete((await read_stream(r))[1])

            os.kill(int(pid), signal.SIGTERM)
            restarted = await line_with(f"the replica on port {replica_port} exited (0)")
            new_pid = int(re.findall(r"pid (\d+)", restarted)[0])
            assert new_pid != int(pid)
            deadline = time.monotonic() + 20
            while not await answers_ready(session, f"http://127.0.0.1:{replica_port}/readyz"):
                assert time.monotonic() < deadline, "the restarted replica never became ready"
                await asyncio.sleep(0.1)
            for _ in range(4):  # both replicas serve
                async with session.post(chat, json={"message": "hi"}, headers=resumable) as r:
                    assert complete((await read_stream(r))[1])
        os.killpg(fleet.pid, signal.SIGINT)  # as a terminal's Ctrl-C does: the whole group
        await line_with("fleet: stopped")
        assert await asyncio.wait_for(fleet.wait(), 30) == 0
        with pytest.raises(ProcessLookupError):  # the restarted replica is stopped too
            os.kill(new_pid, 0)
        # Each replica drained once: no second signal from the fleet cut it short.
        replica_logs = [p.read_text() for p in logs.glob("gateway-*.log")]
        assert len(replica_logs) == 2 and all('"event": "stopped"' in t for t in replica_logs)
        assert not any("stopping_now" in t for t in replica_logs)
    finally:
        with contextlib.suppress(ProcessLookupError):  # HAProxy, Redis, the replicas too
            os.killpg(fleet.pid, signal.SIGKILL)


async def answers_ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False
