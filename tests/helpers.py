"""What the tests share: the tenants and keys, the stack they start (``Stack``,
``GatewayProcess``) and its settings, reading a stream (``read_stream``,
``read_events``), waiting until something holds (``eventually``), what the
emulator sent, slow and counting readers, a fleet. No test module imports
another: each imports these (and the fixtures of conftest.py)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.auth.tenants import hash_key
from gateway.config import (
    AdmissionSettings,
    CircuitSettings,
    LoggingSettings,
    ServerSettings,
    Settings,
    Tenant,
    UpstreamSettings,
)
from gateway.sse import Event, SSEParser
from loadtest.emulator import TRANSCRIPTS, Transcript
from loadtest.fleet import Fleet, haproxy_binary, start_fleet
from loadtest.harness import free_port, metric_total, start_gateway, wait_ready

CHATIQ_KEY = "sk-chatiq-test-3f9c2e7a5b1d"


ACME_KEY = "acme-key-7d1e"


LIMITED_KEY = "limited-key-09ab"


TINY_KEY = "tiny-key-55c0"
AUTH = {"Authorization": f"Bearer {ACME_KEY}"}  # the acme tenant's


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


def data_events(body: bytes) -> list[str]:
    """The ``data`` of each event of a whole stream (one parser, as everywhere);
    the stream must end on an event's end."""
    parser = SSEParser()
    events = [e.data for e in parser.feed(body) if e.data is not None]
    assert parser.close() is None, "stream ended inside an event"
    return events


async def read_stream(response: aiohttp.ClientResponse) -> tuple[bytes, list[str]]:
    """The whole body of a 200 stream, and the ``data`` of each event in it."""
    assert response.status == 200, await response.text()
    body = await response.read()
    return body, data_events(body)


class Reply(NamedTuple):
    """A chat's answer, read to its end."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    def events(self) -> list[str]:
        """The ``data`` of each event, of a 200 stream."""
        assert self.status == 200, self.body
        return data_events(self.body)


async def post_chat(
    stack: Stack, body: dict[str, Any] | None = None, *, key: str | None = ACME_KEY
) -> Reply:
    """One chat on the stack's native route (``{"message": "hi"}`` unless
    ``body`` says otherwise), its answer read to the end."""
    async with await stack.chat({"message": "hi"} if body is None else body, key=key) as r:
        return Reply(r.status, await r.read(), r.headers)


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


_ID_LINE = re.compile(rb"^id: [0-9]+\n", re.M)


async def read_events(
    response: aiohttp.ClientResponse, limit: int | None = None
) -> tuple[bytes, list[Event]]:
    """The body's bytes and its data events, up to ``limit`` data events (then
    the connection is dropped, as a phone losing its network would)."""
    assert response.status == 200, await response.text()
    parser = SSEParser()
    body, events = b"", []
    async for chunk in response.content.iter_any():
        for event in parser.feed(chunk):
            body += event.raw
            if event.data is None:
                continue
            events.append(event)
            if limit is not None and len(events) == limit:
                response.close()
                return body, events
    return body, events


def without_ids(body: bytes) -> bytes:
    return _ID_LINE.sub(b"", body)


def upstream_events(stack: Stack, request_id: str) -> bytes:
    """What the upstream sent, as whole data events (its pings left out)."""
    sent = bytes(stack.transcript(request_id).sent)
    return b"".join(e.raw for e in SSEParser().feed(sent) if e.data is not None)


async def read_slowly(stack: Stack, path: str, body: bytes, request_id: str = "slow") -> bytes:
    """The whole answer, read by a client with a 4 KiB socket buffer, 16 KiB at a
    time with a pause between reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuning
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (stack.gateway.host, stack.gateway.port))
    await loop.sock_sendall(
        sock,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\n"
        f"X-Request-Id: {request_id}\r\nConnection: close\r\n"
        f"Authorization: Bearer {ACME_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body,
    )
    received = bytearray()
    while chunk := await loop.sock_recv(sock, 16384):
        received += chunk
        await asyncio.sleep(0.001)
    sock.close()
    return bytes(received)


def dechunk(framed: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        line_end = framed.index(b"\r\n", pos)
        size = int(framed[pos:line_end], 16)
        if size == 0:
            return bytes(out)
        out += framed[line_end + 2 : line_end + 2 + size]
        pos = line_end + 2 + size + 2


def data_segments_received(sock: socket.socket) -> int:
    """Linux's ``tcpi_data_segs_in``: segments with data that reached this socket."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, 152)[0])


async def stream_counting_segments(
    stack: Stack, request_id: str, extra: bytes = b""
) -> tuple[bytes, int]:
    """A chat streamed over a plain socket: the bytes received, and how many TCP
    segments carried them (each write of the gateway is one: nodelay)."""
    reader, writer = await asyncio.open_connection(stack.gateway.host, stack.gateway.port)
    body = b'{"message": "hi"}'
    writer.write(
        b"POST /api/chatbot HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + ACME_KEY.encode() + b"\r\nX-Request-Id: "
        + request_id.encode() + b"\r\n" + extra
        + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )  # fmt: skip
    received = b""
    while not received.endswith(b"\r\n0\r\n\r\n"):
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, received
        received += data
    segments = data_segments_received(writer.get_extra_info("socket"))
    writer.close()
    return received, segments


def emulator_text(stack: Stack, request_id: str) -> str:
    """The content the emulator sent for one request, read back from its own bytes."""
    parser = SSEParser()
    text = []
    for event in parser.feed(bytes(stack.transcript(request_id).sent)):
        if event.data and event.data != "[DONE]":
            payload = json.loads(event.data)
            if "choices" in payload:
                text.append(payload["choices"][0]["delta"]["content"])
    return "".join(text)


def require_fleet_programs() -> None:
    """Skip (fail in CI, which installs them) without HAProxy or Redis."""
    if haproxy_binary() is None or shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy or redis-server is missing: .ci/run installs both")
        pytest.skip("needs haproxy and redis-server (apt-get install haproxy redis-server)")


def start_test_fleet(tmp_path: Path, emulator_args: tuple[str, ...], **tables: Any) -> Fleet:
    """``make fleet``'s fleet (Redis, emulator, two replicas, HAProxy) on free ports."""
    require_fleet_programs()
    return start_fleet(
        tmp_path, free_port(), replicas=2, key=ACME_KEY, emulator_args=emulator_args,
        server={"shutdown_grace_s": 20.0}, **tables,
    )  # fmt: skip


async def open_streams(
    session: aiohttp.ClientSession, gw: GatewayProcess, n: int
) -> list[asyncio.Task[list[str]]]:
    started = asyncio.Event()
    count = 0

    async def one() -> list[str]:
        nonlocal count
        async with session.post(gw.url, json={"message": "hi"}, headers=AUTH) as r:
            assert r.status == 200
            await r.content.readline()  # the stream is live
            count += 1
            if count == n:
                started.set()
            _, events = await read_stream(r)
            return events

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    await asyncio.wait_for(started.wait(), 60)
    return tasks


NODE_DIR = Path(__file__).resolve().parent / "node"


def node() -> str:
    """Node, with tests/node's packages installed (the AI SDK's, the MCP SDK's)."""
    found = shutil.which("node")
    if found is None or not (NODE_DIR / "node_modules" / "ai").is_dir():
        if os.environ.get("CI"):
            pytest.fail("Node or tests/node's packages are missing: .ci/run installs them")
        pytest.skip("needs Node and `npm ci` in tests/node (CI installs both)")
    return found


async def run_node(script: str, *args: str) -> dict[str, Any]:
    """One of tests/node's scripts; the JSON it prints."""
    process = await asyncio.create_subprocess_exec(
        node(), str(NODE_DIR / script), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def start_workers(
    tmp_path: Path, stack: Stack, workers: str = "2", prefix: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], Path, int]:
    """A gateway process of ``workers`` workers in front of ``stack``'s emulator,
    answering: the process, its log and its port."""
    port = free_port()
    assert stack.emulator.port is not None
    process, log = start_gateway(
        tmp_path, port, stack.emulator.port, ACME_KEY, api_key=CHATIQ_KEY,
        extra_args=["--workers", workers], prefix=prefix,
    )  # fmt: skip
    await wait_ready(f"http://127.0.0.1:{port}/healthz")
    return process, log, port
