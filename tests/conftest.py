"""Real servers on loopback ports: the emulator, and the gateway in front of it."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.auth import hash_key
from gateway.config import (
    AdmissionSettings,
    LoggingSettings,
    Settings,
    Tenant,
    UpstreamSettings,
)
from gateway.logs import make_logger
from gateway.sse import SSEParser
from loadtest.emulator import TRANSCRIPTS, EmulatorSettings, Transcript, create_emulator_app

CHATIQ_KEY = "sk-chatiq-test-3f9c2e7a5b1d"
ACME_KEY = "acme-key-7d1e"
LIMITED_KEY = "limited-key-09ab"
TINY_KEY = "tiny-key-55c0"
TENANTS = (
    Tenant("acme", hash_key(ACME_KEY), ("*",)),
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
    sent_to: list[TestServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return str(self.gateway.make_url("/api/chatbot"))

    def transcript(self, request_id: str) -> Transcript:
        return self.emulator.app[TRANSCRIPTS][request_id]

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


async def read_stream(response: aiohttp.ClientResponse) -> tuple[bytes, list[str]]:
    """The whole body, and the ``data`` of each event in it (one parser, as everywhere)."""
    body = await response.read()
    parser = SSEParser()
    events = [e.data for e in parser.feed(body) if e.data is not None]
    assert parser.close() is None, "stream ended inside an event"
    return body, events


def gateway_settings(
    upstream_url: str, admission: AdmissionSettings | None = None, **upstream: Any
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
        logging=LoggingSettings(level="debug", format="json"),
        tenants=TENANTS,
    )


StackFactory = Callable[..., Awaitable[Stack]]


@pytest.fixture
async def make_stack(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> AsyncIterator[StackFactory]:
    sessions: list[aiohttp.ClientSession] = []

    async def start(
        emulator: EmulatorSettings | None = None,
        settings: Settings | None = None,
        admission: AdmissionSettings | None = None,
        **upstream: Any,
    ) -> Stack:
        emulator_settings = emulator or EmulatorSettings(ttft_s=0, tokens_per_s=0)
        emulator_settings = replace(emulator_settings, record=True, api_key=CHATIQ_KEY)
        emu = await aiohttp_server(create_emulator_app(emulator_settings))
        gw_settings = settings or gateway_settings(
            str(emu.make_url("/api/chat")), admission, **upstream
        )
        logs = io.StringIO()
        app: web.Application = create_app(gw_settings, log=make_logger(gw_settings.logging, logs))
        # Test servers cancel a handler when its client disconnects, as run_app does here.
        gw = await aiohttp_server(app, access_log=None)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Stack(gw, emu, session, logs, gw_settings)

    yield start
    for s in sessions:
        await s.close()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()
