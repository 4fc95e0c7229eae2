"""The ChatIQ key reaches the upstream and nothing else; one log line per request."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ACME_KEY, CHATIQ_KEY, LIMITED_KEY, Stack

SECRET_MESSAGE = "my password is hunter2"
TRAFFIC: list[dict[str, Any]] = [
    {"message": SECRET_MESSAGE},
    {"message": SECRET_MESSAGE, "stream": False},
    {"message": SECRET_MESSAGE, "bot": "rich"},
    *({"message": SECRET_MESSAGE, "bot": f"fault-{f}"} for f in (
        "429", "500", "503", "reset", "stall-mid", "drop-mid", "error-mid", "malformed",
    )),
    {"message": SECRET_MESSAGE, "bot": "fault-500", "stream": False},
    {"message": 42},
]  # fmt: skip


@pytest.fixture
async def exchanged(stack: Stack) -> list[bytes]:
    """Every byte the clients saw, headers included, after a mix of traffic."""
    seen: list[bytes] = []
    for key in (ACME_KEY, LIMITED_KEY, "wrong-key", CHATIQ_KEY):
        for body in TRAFFIC:
            async with await stack.chat(body, key=key) as r:
                seen.append(str(r.headers).encode() + await r.read())
    return seen


async def test_the_chatiq_key_reaches_the_upstream(stack: Stack) -> None:
    async with await stack.chat() as r:
        await r.read()
    seen = stack.transcript(r.headers["X-Request-Id"])
    assert seen.headers["Authorization"] == f"Bearer {CHATIQ_KEY}"


async def test_the_chatiq_key_never_reaches_a_client(exchanged: list[bytes]) -> None:
    assert len(exchanged) == 4 * len(TRAFFIC)
    for response in exchanged:
        assert CHATIQ_KEY.encode() not in response


async def test_no_key_or_message_text_in_any_log_line(stack: Stack, exchanged: list[bytes]) -> None:
    logs = stack.logs.getvalue()
    assert logs.count("\n") >= len(exchanged)
    for secret in (CHATIQ_KEY, ACME_KEY, LIMITED_KEY, SECRET_MESSAGE, "hunter2"):
        assert secret not in logs


async def test_one_log_line_per_request_with_its_figures(stack: Stack) -> None:
    async with await stack.chat({"message": "hi", "bot": "rich"}) as r:
        body = await r.read()
        request_id = r.headers["X-Request-Id"]
    (line,) = [x for x in stack.log_lines() if x.get("request_id") == request_id]
    assert line["event"] == "request" and line["level"] == "info"
    assert line["tenant"] == "acme" and line["bot"] == "rich"
    assert line["status"] == 200 and line["outcome"] == "ok"
    assert line["bytes"] == len(body)
    assert line["events"] == body.count(b"data: ")
    assert 0 <= line["ttft_ms"] <= line["duration_ms"]


async def test_health_and_readiness(stack: Stack) -> None:
    for path in ("/healthz", "/readyz"):
        async with stack.session.get(stack.gateway.make_url(path)) as r:
            assert r.status == 200
