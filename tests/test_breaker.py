"""The circuit breakers, one per bot, against scripted raw upstreams: a burst of
transient errors that retries fix never opens one; a failing bot opens its own;
an open circuit half-opens on a timer and probes; /readyz ignores it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.config import CircuitSettings
from gateway.upstream.breaker import BREAKERS, CircuitBreaker, State
from tests.helpers import Reply, Stack, eventually, post_chat, read_stream
from tests.scripted import (
    BODY,
    SSE_ANSWER,
    ScriptedFactory,
    ScriptedRequest,
    json_answer,
    ok_answer,
)

FAILED = json_answer(b'{"error": {"code": "INTERNAL", "message": "down"}}', "500 Internal")
# The cool-down is long enough that what a test checks while the circuit is
# open (a scrape or two, a chat) fits in it on a busy machine: with 0.3 s, CI
# twice found the circuit half-open again and a probe sent (502 for 503).
FAST = CircuitSettings(
    failure_rate=0.5, window_s=30, min_requests=5, cooldown_s=1.5, half_open_requests=1
)


async def chat(stack: Stack, bot: str = "demo", **body: Any) -> Reply:
    return await post_chat(stack, {"message": "hi", "bot": bot, **body})


async def state(stack: Stack, bot: str) -> float:
    return await stack.metric("chatiq_gateway_circuit_state", bot=bot)


async def transitions(stack: Stack, bot: str, to: str) -> float:
    return await stack.metric("chatiq_gateway_circuit_transitions_total", bot=bot, to=to)


async def readyz(stack: Stack) -> tuple[int, dict[str, Any]]:
    async with stack.session.get(stack.gateway.make_url("/readyz")) as r:
        return r.status, await r.json()


@pytest.mark.parametrize("concurrent", [20, 50])
@pytest.mark.parametrize("stream", [True, False])
async def test_a_burst_of_transient_503s_is_retried_and_never_opens_the_circuit(
    scripted: ScriptedFactory, concurrent: int, stream: bool
) -> None:
    """Every request's first attempt gets 503 with Retry-After: 0; its retry works."""
    seen: set[str] = set()

    def answer(request: ScriptedRequest) -> bytes:
        if request.request_id not in seen:
            seen.add(request.request_id)
            return json_answer(b'{"error": {"code": "BUSY"}}', "503 Busy", b"Retry-After: 0\r\n")
        return ok_answer(request)

    stack, upstream = await scripted(answer, max_retries=2, circuit=CircuitSettings())
    results = await asyncio.gather(*(chat(stack, stream=stream) for _ in range(concurrent)))
    assert [status for status, _, _ in results] == [200] * concurrent
    if stream:
        assert all(body == BODY for _, body, _ in results)
    assert len(upstream.requests) == 2 * concurrent
    assert await state(stack, "demo") == 0
    assert await transitions(stack, "demo", "open") == 0
    assert await stack.metric("chatiq_gateway_upstream_retries_total", reason="http_503") == (
        concurrent
    )


async def test_a_failing_bot_opens_its_own_circuit_while_another_keeps_streaming(
    scripted: ScriptedFactory,
) -> None:
    stack, upstream = await scripted(
        lambda r: FAILED if r.bot == "broken" else ok_answer(r), circuit=FAST
    )
    for _ in range(FAST.min_requests):
        assert (await chat(stack, "broken"))[0] == 502
    assert await state(stack, "other") == 1  # "broken" is not named: it shares "other"
    assert await transitions(stack, "other", "open") == 1

    sent = len(upstream.requests)
    status, body, headers = await chat(stack, "broken")
    assert status == 503
    assert json.loads(body)["error"]["code"] == "UPSTREAM_UNAVAILABLE"
    assert int(headers["Retry-After"]) >= 1
    assert len(upstream.requests) == sent  # failed fast, never sent

    async with await stack.chat({"message": "hi", "bot": "demo"}) as r:
        assert (await read_stream(r))[0] == BODY  # another bot is untouched
    assert await state(stack, "demo") == 0

    status, ready = await readyz(stack)
    assert status == 200  # a replica with an open circuit stays in the balancer
    assert ready["circuits"] == {"other": "open"}

    failed = [line for line in stack.log_lines() if line["event"] == "upstream_failed"]
    assert (failed[0]["status"], failed[0]["upstream_status"]) == (502, 500)  # both said
    opened = [line for line in stack.log_lines() if line["event"] == "circuit_open"]
    assert len(opened) == 1
    assert opened[0]["bot"] == "other" and opened[0]["reason"] == "failure_rate"
    assert opened[0]["requests"] == 5 and opened[0]["failures"] == 5
    assert opened[0]["failure_rate"] == 1.0 and opened[0]["window_s"] == 30


async def test_an_open_circuit_half_opens_without_traffic_and_a_probe_decides(
    scripted: ScriptedFactory,
) -> None:
    healthy = False
    stack, upstream = await scripted(lambda r: ok_answer(r) if healthy else FAILED, circuit=FAST)
    for _ in range(FAST.min_requests):
        assert (await chat(stack))[0] == 502
    assert await state(stack, "demo") == 1

    # No request at all: the timer alone makes it half-open.
    sent = len(upstream.requests)
    await eventually(lambda: stack.gateway.app[BREAKERS].for_bot("demo").state == State.HALF_OPEN)
    assert await state(stack, "demo") == 2
    assert len(upstream.requests) == sent
    assert (await readyz(stack))[1]["circuits"] == {"demo": "half_open"}

    assert (await chat(stack))[0] == 502  # the probe fails: open again
    assert await state(stack, "demo") == 1
    assert (await chat(stack))[0] == 503

    healthy = True
    await eventually(lambda: stack.gateway.app[BREAKERS].for_bot("demo").state == State.HALF_OPEN)
    assert await state(stack, "demo") == 2
    assert (await chat(stack))[0] == 200  # the probe succeeds: closed
    assert await state(stack, "demo") == 0
    assert [await transitions(stack, "demo", to) for to in ("open", "half_open", "closed")] == [
        2,
        2,
        1,
    ]
    assert (await readyz(stack))[1]["circuits"] == {}


async def test_a_success_that_started_before_the_circuit_opened_does_not_close_it(
    scripted: ScriptedFactory,
) -> None:
    release = asyncio.Event()

    async def answer(request: ScriptedRequest) -> bytes:
        if request.body["message"] == "slow":
            await release.wait()  # answered only after the circuit opened
            return SSE_ANSWER
        return FAILED

    stack, _ = await scripted(answer, circuit=FAST)
    slow = asyncio.create_task(chat(stack, message="slow"))
    await asyncio.sleep(0.05)
    for _ in range(FAST.min_requests):
        assert (await chat(stack))[0] == 502
    assert await state(stack, "demo") == 1
    release.set()
    status, body, _ = await slow
    assert (status, body) == (200, BODY)
    assert await state(stack, "demo") == 1  # still open: that success is from before
    assert await transitions(stack, "demo", "closed") == 0


async def test_client_errors_never_open_the_circuit_but_lasting_429s_do(
    scripted: ScriptedFactory,
) -> None:
    def answer(request: ScriptedRequest) -> bytes:
        if request.body["message"] == "bad":
            return json_answer(b'{"error": {"code": "X", "message": "bad"}}', "400 Bad")
        if request.body["message"] == "gone":
            return json_answer(b"{}", "404 Not Found")
        return json_answer(b"{}", "429 Slow down", b"Retry-After: 0\r\n")

    stack, _ = await scripted(answer, circuit=FAST)
    for message in ("bad", "gone") * 5:
        assert (await chat(stack, message=message))[0] in (400, 502)
    assert await state(stack, "demo") == 0  # the requests' own fault: not counted
    for _ in range(FAST.min_requests):
        assert (await chat(stack, message="busy"))[0] == 429
    assert await state(stack, "demo") == 1  # ChatIQ keeps limiting: pause, don't press on


async def test_failures_below_the_rate_or_the_minimum_keep_it_closed(
    scripted: ScriptedFactory,
) -> None:
    count = 0

    def answer(request: ScriptedRequest) -> bytes:
        nonlocal count
        count += 1
        return FAILED if count % 5 in (4, 0) else ok_answer(request)  # 2 in 5 fail

    stack, _ = await scripted(answer, circuit=FAST)
    statuses = [(await chat(stack))[0] for _ in range(20)]
    assert statuses.count(502) == 8, str(statuses)
    assert await state(stack, "demo") == 0


async def test_outcomes_older_than_the_window_are_forgotten() -> None:  # a loop for its timer
    now = 0.0
    changes: list[State] = []
    settings = CircuitSettings(failure_rate=0.5, window_s=10, min_requests=4, cooldown_s=5)
    breaker = CircuitBreaker("demo", settings, lambda bot, to, why: changes.append(to), lambda: now)
    for _ in range(3):
        breaker.permit().failure()
    now = 11.0  # those three slid out of the window
    for _ in range(3):
        breaker.permit().success()
    breaker.permit().failure()
    assert changes == []  # 1 of 4 failed
    breaker.permit().failure()
    assert changes == []  # 2 of 5: 40%
    breaker.permit().failure()  # 3 of 6 reaches 50%
    assert changes == [State.OPEN] and breaker.state is State.OPEN
    breaker.close()
