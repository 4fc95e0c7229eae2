"""Resumable streams across replicas sharing a real redis-server: a client
resumes on any replica, and a replica that shuts down hands its clients over
(through HAProxy, as ``make fleet`` runs it) without losing a byte."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import RedisSettings, ResumeSettings
from gateway.sse import Event
from loadtest.emulator import EmulatorSettings
from loadtest.fleet import Fleet
from loadtest.harness import free_port, metric_total, start_gateway, stop, wait_ready
from tests.helpers import (
    ACME_KEY,
    AUTH,
    CHATIQ_KEY,
    LIMITED_KEY,
    GatewayProcess,
    Stack,
    StackFactory,
    eventually,
    read_events,
    start_test_fleet,
    upstream_events,
    without_ids,
)
from tests.redis_server import RedisServer
from tests.scripted import ONLY_PINGS, ScriptedFactory

pytestmark = pytest.mark.external

RESUMABLE = {**AUTH, "X-Resumable": "1"}

Replicas = Callable[..., Awaitable[list[GatewayProcess]]]


@pytest.fixture
async def replicas(
    redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[list[GatewayProcess]]]]:
    started: list[GatewayProcess] = []

    async def start(stack: Stack, n: int = 2, **tables: Any) -> list[GatewayProcess]:
        assert stack.emulator.port is not None
        tables.setdefault("resume", {"enabled": True, "detach_grace_s": 5.0})
        for _ in range(n):
            port = free_port()
            process, log = start_gateway(
                tmp_path, port, stack.emulator.port, ACME_KEY, CHATIQ_KEY,
                redis={"url": redis_server.url}, **tables,
            )  # fmt: skip
            started.append(GatewayProcess(process, port, log))
        for gw in started[-n:]:
            await wait_ready(f"http://127.0.0.1:{gw.port}/healthz")
        return started[-n:]

    yield start
    stop(*(gw.process for gw in started))


def stream_url(gw: GatewayProcess, stream_id: str) -> str:
    return f"http://127.0.0.1:{gw.port}/api/chatbot/streams/{stream_id}"


@pytest.mark.process
async def test_a_stream_dropped_on_one_replica_resumes_on_the_other(
    make_stack: StackFactory, replicas: Replicas
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=100, reply_tokens=33))
    a, b = await replicas(stack)
    session = stack.session
    first = await session.post(a.url, json={"message": "tell me everything"}, headers=RESUMABLE)
    stream_id, request_id = first.headers["X-Stream-Id"], first.headers["X-Request-Id"]
    head, _got = await read_events(first, limit=10)
    rest = await session.get(stream_url(b, stream_id), headers={**AUTH, "Last-Event-ID": "10"})
    assert rest.headers["X-Stream-Id"] == stream_id
    tail, resumed = await read_events(rest)
    assert [e.id for e in resumed] == [str(i) for i in range(11, 41)]
    assert resumed[-1].data == "[DONE]"
    assert without_ids(head + tail) == upstream_events(stack, request_id)
    # Finished, and still kept: the whole stream again from B, byte for byte.
    whole, _ = await read_events(await session.get(stream_url(b, stream_id), headers=AUTH))
    assert whole == head + tail
    assert await b.metric(session, "chatiq_gateway_streams_resumed_total") == 2
    assert await b.metric(session, "chatiq_gateway_events_replayed_total") == 70
    # An id one character off (never the same id): as if it did not exist.
    unknown = ("y" if stream_id[0] == "x" else "x") + stream_id[1:]
    other = await session.get(stream_url(b, unknown), headers=AUTH)
    assert other.status == 404


@pytest.mark.process
async def test_a_detached_stream_read_elsewhere_outlives_its_grace(
    make_stack: StackFactory, replicas: Replicas
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=43))
    a, b = await replicas(stack, resume={"enabled": True, "detach_grace_s": 0.5})
    session = stack.session
    first = await session.post(a.url, json={"message": "tell me everything"}, headers=RESUMABLE)
    stream_id, request_id = first.headers["X-Stream-Id"], first.headers["X-Request-Id"]
    head, _ = await read_events(first, limit=3)
    rest = await session.get(stream_url(b, stream_id), headers={**AUTH, "Last-Event-ID": "3"})
    tail, events = await read_events(rest)  # about 2 s: four times the grace
    assert events[-1].data == "[DONE]" and '"error"' not in (events[-2].data or "")
    assert without_ids(head + tail) == upstream_events(stack, request_id)
    assert await a.metric(session, "chatiq_gateway_streams_expired_total") == 0


@pytest.mark.process
async def test_a_resume_whose_replica_died_ends_with_an_error_and_done(
    make_stack: StackFactory, replicas: Replicas
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=10, reply_tokens=100))
    a, b = await replicas(stack, upstream={"idle_timeout_s": 1.0, "keepalive_s": 0.5})
    session = stack.session
    first = await session.post(a.url, json={"message": "tell me everything"}, headers=RESUMABLE)
    stream_id = first.headers["X-Stream-Id"]
    await read_events(first, limit=3)
    rest = await session.get(stream_url(b, stream_id), headers={**AUTH, "Last-Event-ID": "3"})
    assert rest.status == 200
    a.process.kill()  # no drain, no last event: B must notice the silence
    _, events = await read_events(rest)
    assert events[-1].data == "[DONE]"
    assert '"STREAM_INTERRUPTED"' in (events[-2].data or "")


@pytest.fixture
def resumable_fleet(tmp_path: Path) -> Iterator[Fleet]:
    started = start_test_fleet(
        tmp_path,
        ("--ttft-ms", "20", "--tokens-per-s", "25", "--reply-tokens", "60"),
        resume={"enabled": True},
    )
    yield started
    started.stop()


def text(events: list[Event]) -> str:
    """The answer's content, as a reader would put it together."""
    return "".join(e.data for e in events if e.data and '"choices"' in e.data)


async def resumed_to_the_end(
    session: aiohttp.ClientSession, fleet: Fleet, started: list[str] | None = None
) -> list[Event]:
    """A client that resumes, as the page does, whenever a stream ends before
    [DONE]; ``started`` gets its stream's id once its stream is live."""
    response = await session.post(
        f"{fleet.url}/api/chatbot", json={"message": "tell me everything"}, headers=RESUMABLE
    )
    assert response.status == 200, await response.text()
    stream_id = response.headers["X-Stream-Id"]
    if started is not None:
        started.append(stream_id)
    _, events = await read_events(response)
    for _ in range(5):
        if events and events[-1].data == "[DONE]":
            break
        await asyncio.sleep(0.1)
        last = events[-1].id if events else "0"
        response = await session.get(
            f"{fleet.url}/api/chatbot/streams/{stream_id}",
            headers={**AUTH, "Last-Event-ID": last or "0"},
        )
        events += (await read_events(response))[1]
    return events


async def test_a_replica_shut_down_mid_stream_hands_its_clients_over(
    resumable_fleet: Fleet,
) -> None:
    fleet = resumable_fleet
    (leaving, _, log), (_, staying_port, _) = fleet.replicas
    connector = aiohttp.TCPConnector(force_close=True, limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        started: list[str] = []
        clients = [
            asyncio.ensure_future(resumed_to_the_end(session, fleet, started)) for _ in range(100)
        ]
        # Every stream live (each replica with about half) before the shutdown:
        # a start it met would be refused with 503, as it should. A stream
        # lasts 2.4 s; on a busy machine the 100 starts took longer than 1 s.
        await eventually(lambda: len(started) == 100, timeout_s=20)
        leaving.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*clients)
        reference = await session.post(
            f"{fleet.url}/api/chatbot", json={"message": "tell me everything"}, headers=AUTH
        )
        _, uninterrupted = await read_events(reference)
        taken_over = await metric_total(
            session, staying_port, "chatiq_gateway_streams_resumed_total"
        )
    for events in results:
        assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
        assert events[-1].data == "[DONE]"
        assert not any('"error"' in (e.data or "") for e in events)
        assert text(events) == text(uninterrupted)  # every word once, in order
    assert leaving.wait(timeout=30) == 0
    handed_over = log.read_text().count('"outcome": "handed_over"')
    assert 20 < handed_over == taken_over, (handed_over, taken_over)


@pytest.mark.process
async def test_with_redis_down_streams_resume_where_they_run_and_elsewhere_get_a_clear_error(
    make_stack: StackFactory, replicas: Replicas, redis_server: RedisServer
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=100, reply_tokens=33))
    a, b = await replicas(stack)
    session = stack.session
    redis_server.stop()
    first = await session.post(a.url, json={"message": "tell me everything"}, headers=RESUMABLE)
    stream_id, request_id = first.headers["X-Stream-Id"], first.headers["X-Request-Id"]
    head, _ = await read_events(first, limit=10)
    elsewhere = await session.get(stream_url(b, stream_id), headers={**AUTH, "Last-Event-ID": "10"})
    assert elsewhere.status == 502
    assert (await elsewhere.json())["error"]["code"] == "STREAM_INTERRUPTED"
    here = await session.get(stream_url(a, stream_id), headers={**AUTH, "Last-Event-ID": "10"})
    tail, events = await read_events(here)
    assert events[-1].data == "[DONE]"
    assert without_ids(head + tail) == upstream_events(stack, request_id)
    redis_server.start()


@pytest.mark.process
async def test_a_replica_whose_redis_is_gone_stops_without_waiting_for_it(
    make_stack: StackFactory, replicas: Replicas, redis_server: RedisServer
) -> None:
    """Its writer cannot copy a live stream's last events to a Redis that is
    gone: the shutdown gives up at the first failed round instead of waiting
    out its 5 s for copies (which made make fleet's Ctrl-C signal it again)."""
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=400))
    (gw,) = await replicas(stack, n=1, server={"shutdown_grace_s": 0.2})
    live = await stack.session.post(gw.url, json={"message": "go on"}, headers=RESUMABLE)
    await read_events(live, limit=2)  # then dropped: the stream goes on, detached
    redis_server.stop()
    signalled = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.process.wait, 30) == 0
    took_s = time.monotonic() - signalled
    log = gw.log_path.read_text()
    assert '"event": "drained"' in log and '"event": "stopped"' in log
    assert '"resume_redis_failed"' in log  # it did try
    assert took_s < 4, f"stopped {took_s:.1f} s after SIGTERM"  # it waited >= 5 s for Redis


async def two_in_process_replicas(
    make_stack: StackFactory, redis_server: RedisServer
) -> tuple[Stack, Stack]:
    """Two gateways in this process sharing redis_server's resumable streams; the
    first in front of a slow emulator (its streams live for seconds)."""
    shared = {"resume": ResumeSettings(enabled=True), "redis": RedisSettings(url=redis_server.url)}
    slow = EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=100)
    return await make_stack(slow, **shared), await make_stack(**shared)


def resume_url(stack: Stack, stream_id: str) -> str:
    return str(stack.gateway.make_url(f"/api/chatbot/streams/{stream_id}"))


async def test_another_tenant_s_probe_on_another_replica_writes_nothing(
    make_stack: StackFactory, redis_server: RedisServer
) -> None:
    """The tenant check comes before the reader key is written: a tenant that
    knows another's stream id got a 404, but kept that stream read on past its
    grace (and left a key for 5 s) with each probe."""
    a, b = await two_in_process_replicas(make_stack, redis_server)
    live = await a.session.post(a.url, json={"message": "hi"}, headers=RESUMABLE)
    stream_id = live.headers["X-Stream-Id"]
    await read_events(live, limit=2)
    probe = {"Authorization": f"Bearer {LIMITED_KEY}", "Last-Event-ID": "1"}
    async with b.session.get(resume_url(b, stream_id), headers=probe) as r:
        assert r.status == 404
    assert redis_server.cli("EXISTS", f"{{chatiq-gateway:resume:{stream_id}}}:reader") == "0"
    async with b.session.get(resume_url(b, stream_id), headers={**AUTH, "Last-Event-ID": "2"}) as r:
        assert r.status == 200  # its own tenant resumes there, and is counted as a reader
        assert redis_server.cli("EXISTS", f"{{chatiq-gateway:resume:{stream_id}}}:reader") == "1"
        await read_events(r, limit=1)


async def test_a_last_event_id_past_the_end_is_a_400_on_another_replica_as_here(
    make_stack: StackFactory, redis_server: RedisServer
) -> None:
    """From Redis, a finished stream answered 200 with an empty body (no [DONE],
    no error) and a live one waited silently: now both are the local 400."""
    a, b = await two_in_process_replicas(make_stack, redis_server)
    live = await a.session.post(a.url, json={"message": "hi"}, headers=RESUMABLE)
    stream_id = live.headers["X-Stream-Id"]
    await read_events(live, limit=2)
    for stack in (a, b):  # live: on the producing replica, and from Redis
        beyond = {**AUTH, "Last-Event-ID": "10000"}
        async with stack.session.get(resume_url(stack, stream_id), headers=beyond) as r:
            assert r.status == 400, await r.text()
            assert "no event 10000 yet" in (await r.json())["error"]["message"]
    done = await b.session.post(b.url, json={"message": "hi"}, headers=RESUMABLE)
    finished_id = done.headers["X-Stream-Id"]
    _, events = await read_events(done)
    last = int(events[-1].id or 0)
    events_key = f"{{chatiq-gateway:resume:{finished_id}}}:events"
    await eventually(lambda: redis_server.cli("EXISTS", events_key) == "1")
    for stack in (b, a):  # finished: on its replica, and from Redis
        beyond = {**AUTH, "Last-Event-ID": str(last + 1)}
        async with stack.session.get(resume_url(stack, finished_id), headers=beyond) as r:
            assert r.status == 400, await r.text()
    async with a.session.get(
        resume_url(a, finished_id), headers={**AUTH, "Last-Event-ID": str(last - 1)}
    ) as r:  # and the last event is still there to resume
        _, rest = await read_events(r)
    assert [e.data for e in rest] == ["[DONE]"]


async def test_live_streams_resume_on_either_replica_after_redis_restarts_empty(
    make_stack: StackFactory, redis_server: RedisServer
) -> None:
    """A stream's metadata was written once, at its start: after Redis restarted
    empty, 20 of 20 resumes on the other replica got 404 while their producer
    lived. The producer re-asserts it (and copies the events it keeps again)."""
    a, b = await two_in_process_replicas(make_stack, redis_server)
    started = [
        await a.session.post(a.url, json={"message": "hi"}, headers=RESUMABLE) for _ in range(20)
    ]
    ids = [(r.headers["X-Stream-Id"], r.headers["X-Request-Id"]) for r in started]
    for r in started:
        await read_events(r, limit=2)
    redis_server.stop()
    redis_server.start()  # empty

    async def resumed(stack: Stack, stream_id: str, request_id: str) -> None:
        for _ in range(40):  # a renewal's period, with room to spare
            r = await stack.session.get(resume_url(stack, stream_id), headers=AUTH)
            if r.status != 404:
                break
            r.release()
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{stream_id}: still 404 four seconds after Redis came back")
        whole, events = await read_events(r)
        assert events[-1].data == "[DONE]"
        assert without_ids(whole) == upstream_events(a, request_id)

    await asyncio.gather(*(resumed(b, *pair) for pair in ids[:10]))
    await asyncio.gather(*(resumed(a, *pair) for pair in ids[10:]))


async def test_while_redis_hangs_resumable_streams_start_within_its_timeout(
    make_stack: StackFactory, redis_server: RedisServer
) -> None:
    """Redis stalled (SIGSTOP): each start waited for its stream's registration
    (1 s timeouts, first event after 1.3 s at the median and 2.3 s at worst,
    about 20 ms normally). Now one waits ``redis.timeout_s`` (0.1 s here) and
    the ones after it none; each stream is resumable on its own replica, and
    a resume elsewhere is a prompt 502."""
    shared = {
        "resume": ResumeSettings(enabled=True),
        "redis": RedisSettings(url=redis_server.url, timeout_s=0.1),
    }
    slow = EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=40)
    a, b = await make_stack(slow, **shared), await make_stack(**shared)
    assert redis_server.process is not None

    async def start() -> tuple[float, str, aiohttp.ClientResponse]:
        began = time.monotonic()
        r = await a.session.post(a.url, json={"message": "hi"}, headers=RESUMABLE)
        await read_events(r, limit=1)
        return time.monotonic() - began, r.headers["X-Stream-Id"], r

    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = await asyncio.gather(*(start() for _ in range(20)))
        waits = sorted(took for took, _, _ in started)
        assert waits[-1] < 1.0, waits  # a stream's start never waits out 1 s timeouts
        stream_id = started[0][1]
        began = time.monotonic()
        async with b.session.get(resume_url(b, stream_id), headers=AUTH) as r:
            assert r.status == 502
            assert "not answering" in (await r.json())["error"]["message"]
        assert time.monotonic() - began < 1.0
        async with a.session.get(
            resume_url(a, stream_id), headers={**AUTH, "Last-Event-ID": "1"}
        ) as r:  # where it runs, it resumes
            _, rest = await read_events(r)
        assert rest[-1].data == "[DONE]"
    finally:
        redis_server.process.send_signal(signal.SIGCONT)


async def test_a_stream_of_pings_ends_with_its_idle_timeout_on_another_replica_too(
    make_stack: StackFactory, scripted: ScriptedFactory, redis_server: RedisServer
) -> None:
    """An upstream that only pings after its first event: the producer ends the
    stream at its idle timeout, and a reader on another replica gets that
    error; it got STREAM_INTERRUPTED "its gateway replica went away" at
    2.5 s, the producer still holding the stream."""
    shared = {"resume": ResumeSettings(enabled=True), "redis": RedisSettings(url=redis_server.url)}
    a, _ = await scripted(ONLY_PINGS, idle_timeout_s=0.5, **shared)
    b = await make_stack(idle_timeout_s=0.5, **shared)
    live = await a.session.post(a.url, json={"message": "hi"}, headers=RESUMABLE)
    stream_id = live.headers["X-Stream-Id"]
    await read_events(live, limit=1)
    async with b.session.get(resume_url(b, stream_id), headers={**AUTH, "Last-Event-ID": "1"}) as r:
        _, events = await read_events(r)
    assert events[-1].data == "[DONE]"
    assert '"UPSTREAM_TIMEOUT"' in (events[-2].data or ""), events[-2].data


async def test_a_resume_whose_redis_hangs_ends_saying_so(
    make_stack: StackFactory, redis_server: RedisServer
) -> None:
    """A reader on another replica, Redis stalled: its stream goes silent, and
    ends with STREAM_INTERRUPTED naming the store that does not answer (it said
    "its gateway replica went away", which was alive)."""
    shared = {"resume": ResumeSettings(enabled=True), "redis": RedisSettings(url=redis_server.url)}
    slow = EmulatorSettings(ttft_s=0, tokens_per_s=10, reply_tokens=60)  # 6 s: past the silence
    a = await make_stack(slow, idle_timeout_s=1.0, **shared)
    b = await make_stack(idle_timeout_s=1.0, **shared)
    assert redis_server.process is not None
    live = await a.session.post(a.url, json={"message": "hi"}, headers=RESUMABLE)
    stream_id = live.headers["X-Stream-Id"]
    await read_events(live, limit=1)
    async with b.session.get(resume_url(b, stream_id), headers={**AUTH, "Last-Event-ID": "1"}) as r:
        assert r.status == 200
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            _, events = await read_events(r)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
    assert events[-1].data == "[DONE]"
    error = json.loads(events[-2].data or "{}")["error"]
    assert error["code"] == "STREAM_INTERRUPTED"
    assert "store is not answering" in error["message"], error
