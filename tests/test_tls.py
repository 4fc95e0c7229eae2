"""TLS on the listening port: a gateway process with certificates the test
made, the real clients over HTTPS (the openai SDK, curl), mutual TLS, and a
SIGHUP that brings new certificates to new connections while a stream on an
old one goes on."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx2 as httpx
import pytest
from cryptography import x509
from openai import AsyncOpenAI

from loadtest.emulator import EmulatorSettings
from loadtest.harness import free_port, start_gateway, stop
from tests.certs import CertificateAuthority, Issued
from tests.helpers import ACME_KEY, CHATIQ_KEY, StackFactory, data_events, eventually

pytestmark = pytest.mark.process


async def wait_tls(port: int, context: ssl.SSLContext, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            writer.close()
            return
        except (OSError, ssl.SSLError):
            assert time.monotonic() < deadline, "the gateway's TLS port never answered"
            await asyncio.sleep(0.1)


@pytest.fixture
async def tls_gateway(
    tmp_path: Path, make_stack: StackFactory
) -> AsyncIterator[Callable[..., Any]]:
    """A gateway process on TLS in front of a slowish emulator: (process, port, log)."""
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=40, reply_tokens=40))
    started: list[subprocess.Popen[bytes]] = []

    async def start(ca: CertificateAuthority, leaf: Issued, **tls: str) -> tuple[Any, int, Path]:
        port = free_port()
        assert stack.emulator.port is not None
        server = {"tls_cert_file": str(leaf.cert), "tls_key_file": str(leaf.key), **tls}
        process, log = start_gateway(
            tmp_path, port, stack.emulator.port, ACME_KEY, CHATIQ_KEY, server=server
        )
        started.append(process)
        client = ssl.create_default_context(cafile=str(ca.pem))
        if "tls_client_ca_file" in tls:
            mine = ca.issue("probe", server=False)
            client.load_cert_chain(mine.cert, mine.key)
        await wait_tls(port, client)
        return process, port, log

    yield start
    stop(*started)


def trusting(ca: CertificateAuthority, identity: Issued | None = None) -> ssl.SSLContext:
    """A client's TLS: it trusts ``ca``, and presents ``identity`` if given."""
    context = ssl.create_default_context(cafile=str(ca.pem))
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    return context


def served_serial(port: int, ca: CertificateAuthority) -> int:
    """The serial number of the certificate a new connection gets."""
    context = ssl.create_default_context(cafile=str(ca.pem))
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_the_openai_sdk_and_curl_stream_over_https(
    tmp_path: Path, tls_gateway: Callable[..., Any]
) -> None:
    ca = CertificateAuthority(tmp_path)
    _, port, _ = await tls_gateway(ca, ca.issue("gateway"))
    client = AsyncOpenAI(
        base_url=f"https://127.0.0.1:{port}/v1", api_key=ACME_KEY,
        http_client=httpx.AsyncClient(verify=trusting(ca)),
    )  # fmt: skip
    stream = await client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(
        [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    )
    assert len(text) > 20
    curl = shutil.which("curl")
    assert curl is not None
    done = await asyncio.to_thread(
        subprocess.run,
        [curl, "-sN", "--cacert", str(ca.pem), "-H", f"Authorization: Bearer {ACME_KEY}",
         "-H", "Content-Type: application/json", "-d", '{"message": "hi"}',
         f"https://127.0.0.1:{port}/api/chatbot"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert data_events(done.stdout)[-1] == "[DONE]"
    # Not another CA's, not plain HTTP.
    other = CertificateAuthority(tmp_path, "another CA")
    async with httpx.AsyncClient(verify=trusting(other)) as elsewhere:
        with pytest.raises(httpx.ConnectError):
            await elsewhere.get(f"https://127.0.0.1:{port}/healthz")
    async with httpx.AsyncClient() as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(f"http://127.0.0.1:{port}/healthz")


async def test_with_mutual_tls_a_client_without_a_certificate_is_refused(
    tmp_path: Path, tls_gateway: Callable[..., Any]
) -> None:
    ca = CertificateAuthority(tmp_path)
    clients = CertificateAuthority(tmp_path, "clients CA")
    _, port, _ = await tls_gateway(ca, ca.issue("gateway"), tls_client_ca_file=str(ca.pem))
    url = f"https://127.0.0.1:{port}/api/chatbot"
    body, auth = {"message": "hi"}, {"Authorization": f"Bearer {ACME_KEY}"}

    async def post(identity: Issued | None) -> httpx.Response:
        async with httpx.AsyncClient(verify=trusting(ca, identity)) as client:
            return await client.post(url, json=body, headers=auth)

    with pytest.raises(httpx.HTTPError):  # no certificate
        await post(None)
    with pytest.raises(httpx.HTTPError):  # one another CA signed
        await post(clients.issue("stranger", server=False))
    answer = await post(ca.issue("app", server=False))
    assert answer.status_code == 200 and data_events(answer.content)[-1] == "[DONE]"


async def test_a_sighup_serves_new_certificates_to_new_connections_and_keeps_streams(
    tmp_path: Path, tls_gateway: Callable[..., Any]
) -> None:
    ca = CertificateAuthority(tmp_path)
    first = ca.issue("gateway")
    process, port, log = await tls_gateway(ca, first)
    assert await asyncio.to_thread(served_serial, port, ca) == first.serial
    context = ssl.create_default_context(cafile=str(ca.pem))
    async with aiohttp.ClientSession() as session, session.post(
        f"https://127.0.0.1:{port}/api/chatbot", json={"message": "hi"},
        headers={"Authorization": f"Bearer {ACME_KEY}"}, ssl=context,
    ) as live:  # fmt: skip
        assert live.status == 200
        await live.content.readline()  # streaming, on a connection with the first cert
        second = ca.issue("gateway-renewed")
        shutil.copy(second.cert, first.cert)  # renewed in place, as certbot does
        shutil.copy(second.key, first.key)
        process.send_signal(signal.SIGHUP)
        await eventually(lambda: '"config_reloaded"' in log.read_text(), 10)
        assert await asyncio.to_thread(served_serial, port, ca) == second.serial
        rest = await live.read()
    assert data_events(rest)[-1] == "[DONE]"  # the old connection's stream, whole
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert not [line for line in lines if line.get("level") == "error"]


async def test_a_reload_keeps_the_running_certificate_when_the_new_one_is_bad_or_the_mode_changes(
    tmp_path: Path, tls_gateway: Callable[..., Any]
) -> None:
    """A renewal that went wrong (a key that is not the certificate's) is
    refused whole, the old certificate still served; turning mutual TLS on
    needs a restart, and until then the listener is as it was: the running
    certificate, and clients without one of their own get in."""
    ca = CertificateAuthority(tmp_path)
    first = ca.issue("gateway")
    process, port, log = await tls_gateway(ca, first)
    config = tmp_path / f"gateway-{port}.toml"
    running = config.read_text()
    shutil.copy(ca.issue("stranger").key, first.key)  # the key of another certificate
    process.send_signal(signal.SIGHUP)
    await eventually(lambda: '"config_reload_failed"' in log.read_text(), 10)
    assert "cannot load them" in log.read_text()
    assert await asyncio.to_thread(served_serial, port, ca) == first.serial

    renewed = ca.issue("gateway-renewed")
    shutil.copy(renewed.key, first.key)
    shutil.copy(renewed.cert, first.cert)
    config.write_text(running.replace("[server]\n", f'[server]\ntls_client_ca_file = "{ca.pem}"\n'))
    process.send_signal(signal.SIGHUP)
    await eventually(lambda: '"config_reload_needs_restart"' in log.read_text(), 10)
    (held,) = [
        json.loads(line) for line in log.read_text().splitlines()
        if '"config_reload_needs_restart"' in line
    ]  # fmt: skip
    assert "server.tls_client_ca_file" in held["keys"]
    # Nothing of the listener's TLS changes until the restart, the files included.
    assert await asyncio.to_thread(served_serial, port, ca) == first.serial
    async with aiohttp.ClientSession() as session, session.post(
        f"https://127.0.0.1:{port}/api/chatbot", json={"message": "hi"},
        headers={"Authorization": f"Bearer {ACME_KEY}"}, ssl=trusting(ca),
    ) as answer:  # fmt: skip
        assert answer.status == 200  # no client certificate: mutual TLS is not on yet
        assert data_events(await answer.read())[-1] == "[DONE]"


def test_tls_settings_are_checked_at_start(tmp_path: Path) -> None:
    from gateway.config import ConfigError, settings_from_mapping

    def settings(**server: str) -> Any:
        raw = {"upstream": {"url": "http://127.0.0.1:9/api/chat"}, "server": server}
        return settings_from_mapping(raw, {})

    ca = CertificateAuthority(tmp_path)
    leaf = ca.issue("gateway")
    for server, says in [
        ({"tls_cert_file": str(leaf.cert)}, "give both"),
        ({"tls_client_ca_file": str(ca.pem)}, "needs tls_cert_file"),
        ({"tls_cert_file": str(leaf.cert), "tls_key_file": "/nope.key"}, "no such file"),
    ]:
        with pytest.raises(ConfigError, match=says):
            settings(**server)
    from gateway.server.tls import make_context

    fine = settings(tls_cert_file=str(leaf.cert), tls_key_file=str(leaf.key)).server
    assert make_context(fine).minimum_version == ssl.TLSVersion.TLSv1_2
    mismatched = ca.issue("other")
    wrong = settings(tls_cert_file=str(leaf.cert), tls_key_file=str(mismatched.key)).server
    with pytest.raises(ConfigError, match="cannot load them"):
        make_context(wrong)
