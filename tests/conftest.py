"""Real servers on loopback ports: the emulator, and the gateway in front of it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.auth.tenants import hash_key
from gateway.config import (
    AdmissionSettings,
    CircuitSettings,
    LoggingSettings,
    ResumeSettings,
    ServerSettings,
    Settings,
    Tenant,
    UpstreamSettings,
)
from gateway.logs import make_logger
from gateway.quotas.admission import ADMISSION
from gateway.sse import SSEParser
from loadtest.emulator import LIVE, TRANSCRIPTS, EmulatorSettings, Transcript, create_emulator_app
from loadtest.harness import free_port, metric_total, start_gateway, wait_ready

pytest_plugins = ["tests.scripted", "tests.redis_server"]  # the scripted upstream, redis-server

CHATIQ_KEY = "sk-chatiq-test-3f9c2e7a5b1d"
ACME_KEY = "acme-key-7d1e"
LIMITED_KEY = "limited-key-09ab"
TINY_KEY = "tiny-key-55c0"
TENANTS = (
    Tenant("acme", hash_key(ACME_KEY), ("*",), max_streams=0, requests_per_minute=0),
    Tenant("limited", hash_key(LIMITED_KEY), ("demo",)),
    Tenant("tiny", hash_key(TINY_KEY), ("*",), max_streams=1, requests_per_minute=3),
)


@dataclass
class Stack:
    """A running emulator and gateway, and a client session to call them."""

    gateway: TestServer
    emulator: TestServer
    session: aiohttp.ClientSession
    logs: io.StringIO
    settings: Settings
    released: bool = False  # assert_all_released() ran and closed the gateway

    @property
    def url(self) -> str:
        return str(self.gateway.make_url("/api/chatbot"))

    def transcript(self, request_id: str) -> Transcript:
        transcripts = self.emulator.app[TRANSCRIPTS]
        return transcripts[request_id]

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines() if line]

    async def chat(
        self, body: dict[str, Any] | None = None, *, key: str | None = ACME_KEY, **kw: Any
    ) -> aiohttp.ClientResponse:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        payload = {"message": "hello"} if body is None else body
        return await self.session.post(self.url, json=payload, headers=headers, **kw)

    async def metric(self, name: str, **labels: str) -> float:
        """One sample's value from the gateway's /metrics (0 when absent)."""
        async with self.session.get(self.gateway.make_url("/metrics")) as r:
            text = await r.text()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            metric, _, label_text = sample.partition("{")
            got = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
            if metric == name and got == want:
                return float(value)
        return 0.0


async def eventually(
    condition: Callable[[], bool],
    timeout_s: float = 10.0,
    what: Callable[[], object] = lambda: "condition never held",
) -> float:
    """Wait until ``condition()`` holds; return how long that took, fail after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, what()
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def read_stream(response: aiohttp.ClientResponse) -> tuple[bytes, list[str]]:
    """The whole body, and the ``data`` of each event in it (one parser, as everywhere)."""
    assert response.status == 200, await response.text()
    body = await response.read()
    parser = SSEParser()
    events = [e.data for e in parser.feed(body) if e.data is not None]
    assert parser.close() is None, "stream ended inside an event"
    return body, events


def gateway_settings(
    upstream_url: str,
    admission: AdmissionSettings | None = None,
    circuit: CircuitSettings | None = None,
    server: ServerSettings | None = None,
    **upstream: Any,
) -> Settings:
    """Test settings: short timeouts, a ChatIQ key, the test tenants."""
    upstream = {
        "api_key": CHATIQ_KEY,
        "bot_slug": "demo",
        "connect_timeout_s": 2.0,
        "first_byte_timeout_s": 1.0,
        "idle_timeout_s": 0.5,
        "total_timeout_s": 30.0,
        "backoff_base_s": 0.01,
        "retry_after_cap_s": 0.05,
        **upstream,
    }
    return Settings(
        upstream=UpstreamSettings(url=upstream_url, **upstream),
        admission=admission
        or AdmissionSettings(max_streams=500, max_queue=500, queue_timeout_s=5.0),
        circuit=circuit or CircuitSettings(),
        server=server or ServerSettings(),
        logging=LoggingSettings(level="debug", format="json"),
        tenants=TENANTS,
    )


StackFactory = Callable[..., Awaitable[Stack]]

# Every secret the tests use, and a message text: none may appear in any log line.
SECRETS = (CHATIQ_KEY, ACME_KEY, LIMITED_KEY, TINY_KEY, "demo-key", "hunter2")


@dataclass
class LogAudit:
    """The logs of every gateway the test run started, read once at its end."""

    in_memory: list[io.StringIO]
    root: Path  # gateway processes log to files under the run's temporary folder

    def process_lines(self) -> list[str]:
        """What gateway processes wrote (stdout and stderr)."""
        texts = [p.read_text(errors="replace") for p in sorted(self.root.rglob("gateway-*.log"))]
        return [line for text in texts for line in text.splitlines()]

    def lines(self) -> list[str]:
        texts = [log.getvalue() for log in self.in_memory]
        return [line for text in texts for line in text.splitlines()] + self.process_lines()


def is_json_line(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# Fixtures that start a program besides Python: their tests are marked
# "external" (the modules that need one throughout say so themselves).
EXTERNAL_FIXTURES = frozenset({"redis_server", "tinyproxy"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if EXTERNAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.external)


@pytest.fixture(scope="session", autouse=True)
def log_audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogAudit]:
    """After the whole run: grep every log line of every gateway for every secret."""
    audit = LogAudit([], tmp_path_factory.getbasetemp())
    yield audit
    lines = audit.lines()
    leaks = [(s, line[:200]) for line in lines for s in SECRETS if s in line]
    assert not leaks, f"secrets in {len(leaks)} log lines, e.g. {leaks[:3]}"
    # A log of JSON lines stays one: no traceback or stray print in a process's
    # output, but for the one plain line of a process that cannot start.
    stray = [
        line[:200] for line in audit.process_lines()
        if not is_json_line(line) and not line.startswith("chatiq-gateway: ")
    ]  # fmt: skip
    assert not stray, f"{len(stray)} lines of gateway output are not JSON, e.g. {stray[:3]}"


@pytest.fixture
async def make_stack(
    aiohttp_server: Callable[..., Awaitable[TestServer]], log_audit: LogAudit
) -> AsyncIterator[StackFactory]:
    stacks: list[Stack] = []

    async def start(
        emulator: EmulatorSettings | None = None,
        settings: Settings | None = None,
        admission: AdmissionSettings | None = None,
        circuit: CircuitSettings | None = None,
        server: ServerSettings | None = None,
        record: bool = True,
        tenants: tuple[Tenant, ...] | None = None,
        resume: ResumeSettings | None = None,
        **upstream: Any,
    ) -> Stack:
        emulator_settings = emulator or EmulatorSettings(ttft_s=0, tokens_per_s=0)
        emulator_settings = replace(emulator_settings, record=record, api_key=CHATIQ_KEY)
        emu = await aiohttp_server(create_emulator_app(emulator_settings))
        gw_settings = settings or gateway_settings(
            str(emu.make_url("/api/chat")), admission, circuit, server, **upstream
        )
        if tenants is not None:
            gw_settings = replace(gw_settings, tenants=tenants)
        if resume is not None:
            gw_settings = replace(gw_settings, resume=resume)
        logs = io.StringIO()
        log_audit.in_memory.append(logs)
        app: web.Application = create_app(gw_settings, log=make_logger(gw_settings.logging, logs))
        # Test servers cancel a handler when its client disconnects, as run_app does here.
        gw = await aiohttp_server(app, access_log=None)
        stack = Stack(gw, emu, aiohttp.ClientSession(), logs, gw_settings)
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        await assert_all_released(stack)
    await eventually(lambda: not leftover_tasks(), what=leftover_tasks)


def leftover_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still running besides this one (and a browser test's Playwright driver)."""

    def source(task: asyncio.Task[Any]) -> str:
        code = getattr(task.get_coro(), "cr_code", None)
        return code.co_filename if code is not None else ""

    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current and "playwright" not in source(t)]


async def assert_all_released(stack: Stack) -> None:
    """Nothing outlives its request: no slot, quota, gauge, upstream call,
    connection or task. Run after every test, for every stack it started."""
    if stack.released:
        return
    stack.released = True
    await stack.session.close()
    gateway = stack.gateway.app
    admission = gateway[ADMISSION]
    await eventually(lambda: stack.emulator.app[LIVE].handlers == 0, what=lambda: "upstream call")
    await eventually(lambda: admission.active == 0, what=lambda: f"{admission.active} slots")
    assert admission.queued == 0
    assert all(admission.tenant_active(t.name) == 0 for t in stack.settings.tenants)
    async with aiohttp.ClientSession() as session:
        stack.session = session
        for tenant in stack.settings.tenants:
            labels = {"tenant": tenant.name}
            assert await stack.metric("chatiq_gateway_active_streams", **labels) == 0
        assert await stack.metric("chatiq_gateway_queue_depth") == 0
    # Closing the gateway closes its upstream pool; then nothing may remain open.
    assert stack.emulator.runner is not None and stack.emulator.runner.server is not None
    emulator = stack.emulator.runner.server
    await stack.gateway.close()
    await eventually(lambda: not emulator.connections, what=lambda: emulator.connections)


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


@dataclass
class GatewayProcess:
    """``python -m gateway`` in its own process, as it runs in production."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/chatbot"

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def cpu_seconds(self) -> float:
        """User and system CPU the process has used so far."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log(self) -> str:
        return self.log_path.read_text()

    async def metric(self, session: aiohttp.ClientSession, name: str) -> float:
        """The sum of a metric's samples (over all labels) on /metrics."""
        return await metric_total(session, self.port, name)


@pytest.fixture
async def gateway_process(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[GatewayProcess]]]:
    started: list[GatewayProcess] = []

    async def start(emulator: TestServer, **tables: Any) -> GatewayProcess:
        """The gateway in front of ``emulator``, with tenant "load" (key ACME_KEY)."""
        port = free_port()
        assert emulator.port is not None
        process, log_path = start_gateway(
            tmp_path, port, emulator.port, ACME_KEY, CHATIQ_KEY, (), **tables
        )
        gw = GatewayProcess(process, port, log_path)
        started.append(gw)
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        return gw

    yield start
    for gw in started:
        if gw.process.poll() is None:
            gw.process.kill()
            gw.process.wait()
