"""Egress through a real HTTP proxy (Debian's tinyproxy, started here) to a TLS
upstream signed by a test CA, and the proxy settings the environment gives."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.config import ConfigError, settings_from_mapping
from gateway.config.proxies import parse_proxy, proxy_from_environment
from loadtest.harness import free_port, start_gateway, wait_ready
from tests.helpers import ACME_KEY, CHATIQ_KEY, Stack, post_chat, read_stream
from tests.scripted import BODY, ScriptedFactory, ScriptedUpstream, ok_answer

PROXY_USER, PROXY_PASSWORD = "gateway", "hunter2"  # the password is in the log audit's list


@dataclass
class CertAuthority:
    ca: Path  # the CA's certificate, for upstream.ca_file
    server: ssl.SSLContext  # a server context with a certificate the CA signed for 127.0.0.1


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    d = tmp_path_factory.mktemp("ca")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", "ca.key",
        "-out", "ca.pem", "-subj", "/CN=ChatIQ Gateway test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr",
        "-subj", "/CN=127.0.0.1",
    )  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-out", "leaf.pem", "-extfile", "san.ext",
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(d / "leaf.pem", d / "leaf.key")
    return CertAuthority(d / "ca.pem", server)


@dataclass
class RealProxy:
    port: int
    log_path: Path

    def url(self, user: str = PROXY_USER, password: str = PROXY_PASSWORD) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[RealProxy]:
    """tinyproxy on a free loopback port, asking for basic auth, logging each request."""
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not os.path.exists(binary):
        if os.environ.get("CI"):
            pytest.fail("tinyproxy is missing: .ci/run installs Debian's tinyproxy package")
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy); CI requires it")
    proxy = RealProxy(free_port(), tmp_path / "tinyproxy.log")
    config = tmp_path / "tinyproxy.conf"
    config.write_text(
        f"Port {proxy.port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 100\n"
        f'Allow 127.0.0.1\nLogFile "{proxy.log_path}"\nLogLevel Info\n'
        f"DisableViaHeader Yes\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\n"
    )
    process = subprocess.Popen(
        [binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(200):
            if "Accepting connections" in proxy.log():
                break
            assert process.poll() is None, proxy.log()
            subprocess.run(["sleep", "0.02"])
        yield proxy
    finally:
        process.terminate()
        process.wait()


async def stream(stack: Stack) -> tuple[int, bytes]:
    reply = await post_chat(stack)
    if reply.status == 200:
        reply.events()  # a whole stream
    return reply.status, reply.body


async def test_an_https_upstream_is_reached_through_a_connect_tunnel_verified_end_to_end(
    scripted: ScriptedFactory, tinyproxy: RealProxy, test_ca: CertAuthority
) -> None:
    stack, upstream = await scripted(
        ok_answer, tls=test_ca.server, proxy_url=tinyproxy.url(), ca_file=str(test_ca.ca)
    )
    assert await stream(stack) == (200, BODY)
    assert await stream(stack) == (200, BODY)
    assert upstream.connections == 1  # one tunnel, kept alive
    log = tinyproxy.log()
    assert f"CONNECT 127.0.0.1:{upstream.port}" in log
    assert CHATIQ_KEY not in log and "message" not in log  # TLS inside the tunnel
    request = upstream.requests[0]
    assert f"Authorization: Bearer {CHATIQ_KEY}".encode() in request  # the key reached ChatIQ
    assert b"proxy-authorization" not in request.lower()  # the proxy's credentials did not


async def test_through_the_tunnel_an_upstream_the_ca_did_not_sign_is_refused(
    scripted: ScriptedFactory, tinyproxy: RealProxy, test_ca: CertAuthority
) -> None:
    stack, upstream = await scripted(ok_answer, tls=test_ca.server, proxy_url=tinyproxy.url())
    status, body = await stream(stack)
    assert status == 502 and b"could not reach" in body
    assert upstream.requests == []  # the key never went to an unverified server
    failed = [line for line in stack.log_lines() if line["event"] == "upstream_failed"]
    assert "CERTIFICATE_VERIFY_FAILED" in failed[0]["detail"]


async def test_wrong_proxy_credentials_are_a_clear_error_in_the_log(
    scripted: ScriptedFactory, tinyproxy: RealProxy, test_ca: CertAuthority
) -> None:
    stack, upstream = await scripted(
        ok_answer,
        tls=test_ca.server,
        proxy_url=tinyproxy.url(password="not-it"),
        ca_file=str(test_ca.ca),
    )
    status, _ = await stream(stack)
    assert status == 502
    assert upstream.connections == 0
    failed = [line for line in stack.log_lines() if line["event"] == "upstream_failed"]
    assert "user and password" in failed[0]["detail"]  # tinyproxy answers 401, others 407
    assert "not-it" not in stack.logs.getvalue()


async def test_a_plain_http_upstream_goes_through_the_proxy_in_absolute_form(
    scripted: ScriptedFactory, tinyproxy: RealProxy
) -> None:
    stack, upstream = await scripted(ok_answer, proxy_url=tinyproxy.url())
    assert await stream(stack) == (200, BODY)
    assert f"POST http://127.0.0.1:{upstream.port}/api/chat HTTP/1.1" in tinyproxy.log()
    assert upstream.requests[0].startswith(b"POST /api/chat HTTP/1.1\r\n")


@pytest.mark.process
async def test_the_environment_chooses_the_proxy_and_no_proxy_bypasses_it(
    tinyproxy: RealProxy,
    test_ca: CertAuthority,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Gateway processes, as deployed: HTTPS_PROXY alone, then with NO_PROXY."""
    upstream = ScriptedUpstream(ok_answer, tls=test_ca.server)
    server = await upstream.start()
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url())

    async def chat_through(no_proxy: str | None) -> None:
        if no_proxy is None:
            monkeypatch.delenv("NO_PROXY", raising=False)
        else:
            monkeypatch.setenv("NO_PROXY", no_proxy)
        port = free_port()
        url = f"https://127.0.0.1:{upstream.port}/api/chat"
        process, log = start_gateway(
            tmp_path,
            port,
            0,
            ACME_KEY,
            CHATIQ_KEY,
            upstream={"url": url, "ca_file": str(test_ca.ca)},
        )
        try:
            await wait_ready(f"http://127.0.0.1:{port}/healthz")
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://127.0.0.1:{port}/api/chatbot",
                    json={"message": "hi"},
                    headers={"Authorization": f"Bearer {ACME_KEY}"},
                ) as r,
            ):
                assert (await read_stream(r))[0] == BODY
        finally:
            process.terminate()
            process.wait()
        assert PROXY_PASSWORD not in log.read_text()

    try:
        await chat_through(None)
        tunnels = tinyproxy.log().count("CONNECT 127.0.0.1")
        assert tunnels == 1
        await chat_through("localhost,127.0.0.0/8")
        assert tinyproxy.log().count("CONNECT 127.0.0.1") == tunnels  # went direct
        assert len(upstream.requests) == 2
    finally:
        server.close()


@pytest.mark.process
async def test_a_proxy_that_does_not_answer_is_a_warning_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = free_port()
    for upstream, says in (
        ({"url": "http://127.0.0.1:9/api/chat", "proxy_url": f"http://127.0.0.1:{closed}"},
         f"the proxy http://127.0.0.1:{closed}"),
        ({"url": "http://no-such-host.invalid/api/chat"}, "the host 'no-such-host.invalid'"),
    ):  # fmt: skip
        port = free_port()
        process, log = start_gateway(tmp_path, port, 0, ACME_KEY, CHATIQ_KEY, upstream=upstream)
        try:
            await wait_ready(f"http://127.0.0.1:{port}/healthz")
            for _ in range(200):
                if "upstream_unreachable" in log.read_text():
                    break
                await asyncio.sleep(0.05)
            line = next(x for x in log.read_text().splitlines() if "upstream_unreachable" in x)
            assert says in line
        finally:
            process.terminate()
            process.wait()


# --- which proxy the environment gives ---------------------------------------

HTTPS_URL = "https://www.chatiq.io/api/chat"


@pytest.mark.parametrize(
    ("environ", "proxy"),
    [
        ({}, ""),
        ({"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
        ({"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}, "http://lower:1"),
        ({"HTTP_PROXY": "http://p:3128"}, ""),  # only for http upstreams
        ({"ALL_PROXY": "http://all:1"}, "http://all:1"),
        ({"HTTPS_PROXY": "http://p:1", "ALL_PROXY": "http://all:1"}, "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}, ""),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "chatiq.io"}, ""),  # and its subdomains
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": ".chatiq.io"}, ""),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "www.chatiq.io:443"}, ""),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "www.chatiq.io:8443"}, "http://p:1"),
        ({"HTTPS_PROXY": "http://p:1", "NO_PROXY": "notchatiq.io,example.com"}, "http://p:1"),
    ],
)
def test_the_proxy_from_the_environment_follows_curl(environ: dict[str, str], proxy: str) -> None:
    assert proxy_from_environment(HTTPS_URL, environ) == proxy


def test_no_proxy_takes_addresses_and_ranges() -> None:
    environ = {"HTTP_PROXY": "http://p:1", "NO_PROXY": "10.0.0.0/8, ::1"}
    assert proxy_from_environment("http://10.1.2.3:8181/api/chat", environ) == ""
    assert proxy_from_environment("http://[::1]:8181/api/chat", environ) == ""
    assert proxy_from_environment("http://11.0.0.1/api/chat", environ) == "http://p:1"


def settings_with(upstream: dict[str, str], environ: dict[str, str]) -> str:
    raw = {"upstream": {"url": HTTPS_URL, **upstream}}
    return settings_from_mapping(raw, environ).upstream.proxy_url


def test_the_config_wins_over_the_environment_and_direct_turns_it_off() -> None:
    environ = {"HTTPS_PROXY": "http://env:1"}
    assert settings_with({}, environ) == "http://env:1"
    assert settings_with({"proxy_url": "http://file:2"}, environ) == "http://file:2"
    assert settings_with({"proxy_url": "direct"}, environ) == "direct"
    assert settings_with({}, {}) == "direct"


@pytest.mark.parametrize(
    ("proxy", "says"),
    [("socks5://p:1080", "only http:// proxies"), ("http://:3128", "names no host")],
)
def test_an_unusable_proxy_is_a_config_error(proxy: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        settings_with({}, {"ALL_PROXY": proxy})


def test_proxy_credentials_become_basic_auth_and_stay_out_of_reprs() -> None:
    proxy = parse_proxy("http://us%40er:p%3Ass@proxy.internal:3128")
    assert proxy.authorization == "Basic dXNAZXI6cDpzcw=="  # "us@er:p:ss"
    assert proxy.display == "http://proxy.internal:3128"
    assert "p%3Ass" not in repr(proxy) and "dXNAZXI6cDpzcw" not in repr(proxy)
    settings = settings_from_mapping(
        {"upstream": {"url": HTTPS_URL, "proxy_url": "http://u:s3cret@p:1"}}, {}
    )
    assert "s3cret" not in repr(settings)
