"""Signals and connection bounds, against real gateway processes: SIGHUP reloads
(or keeps the running configuration), a second SIGTERM stops at once, idle and
trickling connections are cut, and the connection cap refuses cleanly."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.config import ConfigError, read_file, settings_from_mapping
from gateway.server.reload import LoadedFile, complete, read_settled
from loadtest.emulator import EmulatorSettings
from loadtest.harness import free_port, metric_total, start_gateway, stop, wait_ready
from tests.helpers import (
    ACME_KEY,
    CHATIQ_KEY,
    GatewayProcess,
    StackFactory,
    open_streams,
    read_stream,
)

pytestmark = pytest.mark.process

NEW_KEY = "new-tenant-key-8c41"
ROOT = Path(__file__).resolve().parent.parent


def config_of(gw: GatewayProcess) -> Path:
    return gw.log_path.with_suffix(".toml")


async def until_logged(
    gw: GatewayProcess, text: str, timeout_s: float = 10.0, count: int = 1
) -> str:
    """The ``count``-th log line holding ``text``, once it is there."""
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        lines = [line for line in gw.log().splitlines() if text in line]
        if len(lines) >= count:
            return lines[count - 1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} never logged:\n{gw.log()[-2000:]}")


async def status_with(session: aiohttp.ClientSession, gw: GatewayProcess, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(gw.url, json={"message": "hi"}, headers=headers) as r:
        await r.read()
        return r.status


async def test_sighup_adds_a_tenant_while_a_live_stream_completes(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=30), record=False
    )
    gw = await gateway_process(stack.emulator)
    session = stack.session
    (live,) = await open_streams(session, gw, 1)
    assert await status_with(session, gw, NEW_KEY) == 401

    config = config_of(gw)
    config.write_text(
        config.read_text() + '\n[[tenants]]\nname = "newcomer"\n'
        f'key_sha256 = "{hashlib.sha256(NEW_KEY.encode()).hexdigest()}"\nbots = ["demo"]\n'
        '\n[logging]\nlevel = "warning"\n'
    )
    gw.process.send_signal(signal.SIGHUP)
    line = json.loads(await until_logged(gw, "config_reloaded"))
    assert "tenants" in line["changed"] and "logging.level" in line["changed"]

    async with session.post(
        gw.url, json={"message": "hi"}, headers={"Authorization": f"Bearer {NEW_KEY}"}
    ) as r:
        assert (await read_stream(r))[1][-1] == "[DONE]"  # the new key streams
    events = await live
    assert "conversationId" in events[-2] and events[-1] == "[DONE]"  # untouched by the reload
    assert await gw.metric(session, 'chatiq_gateway_config_reloads_total{result="ok"}') == 1
    requests_logged = gw.log().count('"event": "request"')
    assert await status_with(session, gw, ACME_KEY) == 200
    assert gw.log().count('"event": "request"') == requests_logged  # level is warning now
    assert gw.process.poll() is None


async def test_a_key_rotation_by_sighup_keeps_the_tenant_and_its_quota(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    """The new key beside the old one (``more_keys_sha256``), then the old one gone:
    no request of the tenant's apps fails in between, and both keys are one tenant."""
    stack = await make_stack(record=False)
    gw = await gateway_process(stack.emulator)
    session = stack.session
    config = config_of(gw)
    old_hash = hashlib.sha256(ACME_KEY.encode()).hexdigest()
    new_hash = hashlib.sha256(NEW_KEY.encode()).hexdigest()
    single = config.read_text()
    assert single.count(old_hash) == 1
    both = single.replace(
        f'key_sha256 = "{old_hash}"',
        f'key_sha256 = "{new_hash}"\nmore_keys_sha256 = ["{old_hash}"]',
    ).replace("requests_per_minute = 0", "requests_per_minute = 2")
    config.write_text(both)
    gw.process.send_signal(signal.SIGHUP)
    await until_logged(gw, "config_reloaded")
    assert await status_with(session, gw, NEW_KEY) == 200
    assert await status_with(session, gw, ACME_KEY) == 200
    assert await status_with(session, gw, NEW_KEY) == 429  # one quota for both keys
    ok = 'route="/api/chatbot",status="200",tenant="load"}'
    requests = await metric_total(session, gw.port, "chatiq_gateway_requests_total", ok)
    assert requests == 2  # both keys' requests, under the one tenant

    config.write_text(both.replace(f'\nmore_keys_sha256 = ["{old_hash}"]', ""))
    gw.process.send_signal(signal.SIGHUP)
    await until_logged(gw, "config_reloaded", count=2)
    assert await status_with(session, gw, ACME_KEY) == 401  # the old key is gone


async def test_sighup_with_a_broken_file_keeps_the_running_configuration(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(record=False)
    gw = await gateway_process(stack.emulator)
    config = config_of(gw)
    good = config.read_text()
    config.write_text(good.replace("[upstream]", "[upstream]\nmax_retries = -3"))
    gw.process.send_signal(signal.SIGHUP)
    line = json.loads(await until_logged(gw, "config_reload_failed"))
    assert "upstream.max_retries" in line["error"]
    assert await status_with(stack.session, gw, ACME_KEY) == 200
    metric = 'chatiq_gateway_config_reloads_total{result="invalid"}'
    assert await gw.metric(stack.session, metric) == 1

    config.write_text(good.replace("port = ", "port = 1\n#", 1))  # a restart-only key changes
    gw.process.send_signal(signal.SIGHUP)
    line = json.loads(await until_logged(gw, "config_reload_needs_restart"))
    assert line["keys"] == ["server.port"]
    assert await status_with(stack.session, gw, ACME_KEY) == 200  # still on its old port


async def test_a_config_file_cut_short_or_still_being_written_is_refused_by_sighup(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    """Two ways a reload met a file mid-write: the file cut before its tables of
    tenants (it loaded with none: every key 401), and a write that goes on while
    the file is read. Both are refused, and the tenants keep answering."""
    stack = await make_stack(record=False)
    gw = await gateway_process(stack.emulator, admission={"max_queue": 100})
    config, session = config_of(gw), stack.session
    whole = config.read_text()
    config.write_text(whole[: whole.index("[[tenants]]")])  # cut before the tenants
    gw.process.send_signal(signal.SIGHUP)
    line = json.loads(await until_logged(gw, "config_reload_failed"))
    assert "[[tenants]]: the running configuration's file has it" in line["error"]
    assert await status_with(session, gw, ACME_KEY) == 200

    config.write_text(whole[: whole.index("[admission]")])  # cut before the later tables
    gw.process.send_signal(signal.SIGHUP)
    line = json.loads(await until_logged(gw, "config_reload_failed", count=2))
    assert "[admission]: the running configuration's file has it" in line["error"]
    assert await status_with(session, gw, ACME_KEY) == 200

    cut = len(whole) - 20  # a complete-looking file, whose last lines are still to come
    config.write_text(whole[:cut])
    gw.process.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.05)  # the reload has read it once
    with config.open("a") as f:
        f.write(whole[cut:])
    line = json.loads(await until_logged(gw, "config_reload_failed", count=3))
    assert "changed while it was read" in line["error"]
    assert await status_with(session, gw, ACME_KEY) == 200
    # cut inside the last tenant, before its limits: they would be the defaults
    config.write_text(whole[: whole.rindex("max_streams")])
    gw.process.send_signal(signal.SIGHUP)
    line = json.loads(await until_logged(gw, "config_reload_failed", count=4))
    assert "cut short inside a table" in line["error"]
    assert await status_with(session, gw, ACME_KEY) == 200
    config.write_text(whole)
    metric = 'chatiq_gateway_config_reloads_total{result="invalid"}'
    assert await gw.metric(session, metric) == 4

    gw.process.send_signal(signal.SIGHUP)  # the whole file, settled: taken
    await until_logged(gw, "config_reloaded")


async def test_a_reload_of_a_file_that_is_gone_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gone\.toml: no such file"):
        await read_settled(tmp_path / "gone.toml")


def test_every_line_cut_of_the_shipped_config_is_refused_or_its_whole_first_tenants() -> None:
    """Each line cut of the shipped file (plus a second tenant) is refused, but
    for cuts between the tenants: those load the file without its last tenant
    (what deleting it makes), every tenant left whole. Before, 91 of 133 cuts
    loaded with no tenant, and a tenant cut before its limits got the defaults."""
    key = hashlib.sha256(b"second-key").hexdigest()
    second = f'\n[[tenants]]\nname = "second"\nkey_sha256 = "{key}"\n'
    second += 'bots = ["demo"]\nmax_streams = 5\n'
    text = ((ROOT / "config" / "gateway.toml").read_text() + second).encode()
    full = settings_from_mapping(read_file("gateway.toml", text), {})
    running = LoadedFile(text, frozenset(read_file("gateway.toml", text)))
    lines = text.splitlines(keepends=True)
    accepted = []
    for n in range(len(lines)):
        cut = b"".join(lines[:n])
        try:
            raw = read_file("gateway.toml", cut)
            new = settings_from_mapping(raw, {})
            complete(raw, new, cut, running)
        except ConfigError:
            continue
        accepted.append(n)
        assert new.tenants == full.tenants[: len(new.tenants)], n  # whole tenants only
        assert len(new.tenants) == 1, n
    assert len(lines) == 159 and len(accepted) <= 6, accepted  # the lines after a whole tenant
    # The running file itself, and it with a last newline more or less, reload.
    for same in (text, text.rstrip(b"\n"), text + b"\n"):
        raw = read_file("gateway.toml", same)
        complete(raw, settings_from_mapping(raw, {}), same, running)


async def test_a_second_sigterm_ends_every_live_stream_at_once(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=5, reply_tokens=200), record=False
    )
    gw = await gateway_process(stack.emulator, server={"shutdown_grace_s": 60.0})
    streams = await open_streams(stack.session, gw, 50)
    gw.process.send_signal(signal.SIGTERM)
    await until_logged(gw, '"draining"')
    started = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    results = await asyncio.wait_for(asyncio.gather(*streams), 2.0)
    for events in results:
        assert json.loads(events[-2])["error"]["code"] == "DRAINING"
        assert events[-1] == "[DONE]"
    assert await asyncio.to_thread(gw.process.wait, 10) == 0
    assert time.monotonic() - started < 5.0
    assert '"streams_ended_early": 50' in gw.log()


async def test_idle_client_connections_are_closed_after_the_keepalive_timeout(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(record=False)
    gw = await gateway_process(stack.emulator, server={"keepalive_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b'{"status": "ok"}')
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
    assert 0.3 < time.monotonic() - started < 3
    writer.close()


async def test_a_stream_outlasting_the_keepalive_timeout_ends_whole_then_the_connection_idles_out(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    # The keep-alive timer only closes idle connections: a stream three times
    # longer runs to its end, the connection stays open for the next request,
    # and it is closed once it has been idle for the timeout.
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=30), record=False
    )
    gw = await gateway_process(stack.emulator, server={"keepalive_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    body = b'{"message": "hi", "stream": true}'
    request = (
        b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {ACME_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    for _ in range(2):  # the second request on the same connection, after the first's end
        started = time.monotonic()
        writer.write(request)
        answer = await asyncio.wait_for(reader.readuntil(b"data: [DONE]\n\n\r\n0\r\n\r\n"), 10)
        assert time.monotonic() - started > 1.2  # 30 tokens at 20 a second
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.count(b'"content"') >= 30
    ended = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
    assert 0.3 < time.monotonic() - ended < 3
    writer.close()


async def test_a_trickled_body_gets_408_and_the_connection_closed(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(record=False)
    gw = await gateway_process(stack.emulator, server={"body_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {ACME_KEY}\r\nContent-Length: 100\r\n\r\n".encode()
        + b'{"message": '
    )
    answer = await asyncio.wait_for(reader.read(), 5)  # the whole answer, then the close
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "REQUEST_TIMEOUT"
    assert await gw.metric(stack.session, 'chatiq_gateway_rejected_total{reason="body_timeout"}')


async def test_connections_beyond_the_cap_are_refused_cleanly(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(record=False)
    gw = await gateway_process(stack.emulator, server={"max_connections": 20})
    held = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in sock.recv(4096)
        held.append(sock)
    refused = []
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.settimeout(5)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        refused.append(answer)
        sock.close()
    for answer in refused:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
        assert json.loads(body)["error"]["code"] == "OVERLOADED"
    for sock in held:
        sock.close()
    await asyncio.sleep(0.2)
    assert (
        await gw.metric(stack.session, 'chatiq_gateway_rejected_total{reason="connections"}') == 5
    )
    assert gw.log().count("connections_refused") == 1  # at most once a second
    assert await status_with(stack.session, gw, ACME_KEY) == 200


async def test_a_low_open_files_limit_lowers_the_connection_cap_instead_of_failing(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    """Under a 200-file limit, 300 clients at once: every one gets an answer (200
    or a clean 503), none a reset, and the gateway says what to raise."""
    stack = await make_stack(record=False)
    port = free_port()
    assert stack.emulator.port is not None
    process, log = start_gateway(
        tmp_path, port, stack.emulator.port, ACME_KEY, CHATIQ_KEY,
        prefix=["prlimit", "--nofile=200:200"],
        admission={"max_streams": 50, "max_queue": 50},
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        warning = json.loads(
            next(line for line in log.read_text().splitlines() if "open_files_limit_low" in line)
        )
        assert warning["limit"] == 200 and warning["max_connections"] == 200 - 50 - 64
        assert "ulimit" in warning["fix"]
        held = []
        statuses = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5)
            statuses.append(sock.recv(4096).split(b" ", 2)[1])
            held.append(sock)
        assert set(statuses) == {b"200", b"503"}
        assert statuses.count(b"200") == 200 - 50 - 64
        for sock in held:
            sock.close()
        await asyncio.sleep(0.2)
        assert await status_with(stack.session, GatewayProcess(process, port, log), ACME_KEY) == 200
        assert "Too many open files" not in log.read_text()
    finally:
        stop(process)
