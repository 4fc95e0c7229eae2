"""Real servers on loopback ports: the emulator, and the gateway in front of it."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import (
    AdmissionSettings,
    CircuitSettings,
    Issuer,
    PageSettings,
    RedisSettings,
    ResumeSettings,
    ServerSettings,
    Settings,
    Tenant,
    TracingSettings,
)
from gateway.logs import make_logger
from gateway.quotas.admission import ADMISSION
from loadtest.emulator import LIVE, EmulatorSettings, create_emulator_app
from loadtest.harness import free_port, start_gateway, wait_ready
from tests.helpers import (
    ACME_KEY,
    CHATIQ_KEY,
    LIMITED_KEY,
    TINY_KEY,
    GatewayProcess,
    Stack,
    StackFactory,
    eventually,
    gateway_settings,
)

# The scripted upstream, redis-server, the OTLP receiver.
pytest_plugins = ["tests.scripted", "tests.redis_server", "tests.otlp", "tests.oidc"]


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
EXTERNAL_FIXTURES = frozenset({"redis_server", "tinyproxy", "oidc"})


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
        redis: RedisSettings | None = None,
        tracing: TracingSettings | None = None,
        issuers: tuple[Issuer, ...] | None = None,
        page: PageSettings | None = None,
        **upstream: Any,
    ) -> Stack:
        emulator_settings = emulator or EmulatorSettings(ttft_s=0, tokens_per_s=0)
        emulator_settings = replace(emulator_settings, record=record, api_key=CHATIQ_KEY)
        emu = await aiohttp_server(create_emulator_app(emulator_settings))
        gw_settings = settings or gateway_settings(
            str(emu.make_url("/api/chat")), admission, circuit, server, **upstream
        )
        tables: dict[str, Any] = {"tenants": tenants, "resume": resume, "redis": redis,
                                  "tracing": tracing, "issuers": issuers, "page": page}  # fmt: skip
        gw_settings = replace(gw_settings, **{k: v for k, v in tables.items() if v is not None})
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
