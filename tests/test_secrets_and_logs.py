"""The ChatIQ key reaches the upstream and nothing else; one log line per request."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.auth.tenants import hash_key
from gateway.config import ConfigError, LoggingSettings, load_settings
from gateway.logs import make_logger, server_logger
from loadtest.harness import free_port, start_gateway, stop, wait_ready
from tests.helpers import ACME_KEY, CHATIQ_KEY, LIMITED_KEY, Stack, StackFactory, read_stream

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


def test_the_chatiq_key_may_come_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "chatiq_api_key"
    secret.write_text(CHATIQ_KEY + "\n")
    config = tmp_path / "gateway.toml"
    config.write_text('[upstream]\nurl = "http://127.0.0.1:9/api/chat"\n')
    env = {"CHATIQ_API_KEY_FILE": str(secret)}
    assert load_settings(config, environ=env).upstream.api_key == CHATIQ_KEY
    # The variable wins over the file; a bad file stops start-up without showing a secret.
    both = {**env, "CHATIQ_API_KEY": "sk-from-env"}
    assert load_settings(config, environ=both).upstream.api_key == "sk-from-env"
    for content, problem in (("", "is empty"), (b"\xff\xfe", "not UTF-8")):
        secret.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(ConfigError, match=f"CHATIQ_API_KEY_FILE: .*{problem}"):
            load_settings(config, environ=env)
    with pytest.raises(ConfigError, match="CHATIQ_API_KEY_FILE: cannot read"):
        load_settings(config, environ={"CHATIQ_API_KEY_FILE": str(tmp_path / "missing")})


@pytest.mark.process
async def test_a_gateway_process_reads_its_key_from_the_file(
    tmp_path: Path, make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()  # the emulator refuses requests without CHATIQ_KEY
    secret = tmp_path / "secret"
    secret.write_text(CHATIQ_KEY)
    monkeypatch.setenv("CHATIQ_API_KEY_FILE", str(secret))
    port = free_port()
    assert stack.emulator.port is not None
    process, _ = start_gateway(tmp_path, port, stack.emulator.port, ACME_KEY, api_key=None)
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        async with stack.session.post(
            f"http://127.0.0.1:{port}/api/chatbot",
            json={"message": "hi"},
            headers={"Authorization": f"Bearer {ACME_KEY}"},
        ) as r:
            assert r.status == 200
            _, events = await read_stream(r)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    finally:
        stop(process)


def run_gateway_command(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@pytest.mark.process
def test_hash_key_makes_a_new_key_and_its_config_line() -> None:
    done = run_gateway_command("hash-key")
    assert done.returncode == 0, done.stderr
    key = re.search(r"key \(.*\): (\S+)", done.stdout)
    line = re.search(r'key_sha256 = "([0-9a-f]{64})"', done.stdout)
    assert key and line and len(key[1]) >= 40
    assert hash_key(key[1]) == line[1]
    # A key of one's own goes in on stdin, never on the command line.
    done = run_gateway_command("hash-key", "--stdin", stdin="demo-key\n")
    assert done.returncode == 0 and done.stdout.strip() == hash_key("demo-key")
    done = run_gateway_command("hash-key", "--stdin", stdin="")
    assert done.returncode == 2 and "no key on stdin" in done.stderr


def test_aiohttp_s_own_error_reports_are_one_json_line_each() -> None:
    """A handler's unhandled exception, as aiohttp reports it through the logger
    it is given: one error line with the traceback as a field, not a multi-line
    traceback (a request aiohttp could not parse: tests/test_hostile_clients.py)."""
    out = io.StringIO()
    logger = server_logger(make_logger(LoggingSettings(format="json"), out))
    try:
        raise RuntimeError("a bug")
    except RuntimeError as e:
        logger.exception("Unhandled exception", exc_info=e)
    logger.debug("Error handling request from %s", "10.0.0.1")  # below info: dropped
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "server_error" and record["level"] == "error"
    assert record["error"] == "RuntimeError" and "raise RuntimeError" in record["traceback"]


async def test_the_loop_s_error_reports_are_one_json_line_each(stack: Stack) -> None:
    """While the gateway runs, what its loop reports (a callback that failed, a
    task whose exception nobody read) is one error line of its log."""
    loop = asyncio.get_running_loop()
    try:
        raise ValueError("a bug in a callback")
    except ValueError as e:
        loop.call_exception_handler({"message": "Exception in callback", "exception": e})
    (line,) = [line for line in stack.log_lines() if line["event"] == "loop_error"]
    assert line["level"] == "error" and line["message"] == "Exception in callback"
    assert line["error"] == "ValueError" and "a bug in a callback" in line["traceback"]
