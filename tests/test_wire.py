"""The gateway's own upstream client (gateway/upstream/) against scripted raw HTTP
servers, and the push relay's pause and resume against a slow reader."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from pathlib import Path

import pytest

from gateway.upstream.pool import Pool
from loadtest.emulator import EmulatorSettings
from tests.helpers import Stack, StackFactory, dechunk, post_chat, read_slowly
from tests.scripted import (
    BODY,
    EVENTS,
    JSON_BODY,
    SSE_HEAD,
    ScriptedFactory,
    ScriptedRequest,
    chunked,
    ok_answer,
)


async def stream_body(stack: Stack, stream: bool = True) -> tuple[int, bytes]:
    reply = await post_chat(stack, {"message": "hi", "stream": stream})
    return reply.status, reply.body


async def test_streams_one_after_another_share_one_upstream_connection(
    scripted: ScriptedFactory,
) -> None:
    stack, upstream = await scripted(chunked(SSE_HEAD, *EVENTS))
    for _ in range(3):
        assert await stream_body(stack) == (200, BODY)
    assert upstream.connections == 1
    assert len(upstream.requests) == 3
    first = upstream.requests[0]
    assert first.startswith(b"POST /api/chat HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{upstream.port}\r\n".encode() in first
    assert b"\r\nAccept: text/event-stream\r\n" in first
    assert b"accept-encoding" not in first.lower()  # nothing compressed is asked for


async def test_a_connection_the_upstream_closed_after_its_answer_is_not_reused(
    scripted: ScriptedFactory,
) -> None:
    stack, upstream = await scripted(chunked(SSE_HEAD, *EVENTS), close_after=True)
    for _ in range(3):
        assert await stream_body(stack) == (200, BODY)
        await asyncio.sleep(0.05)  # the close reaches the gateway
    assert upstream.connections == 3


async def test_an_upstream_that_says_connection_close_gets_a_new_connection_each_time(
    scripted: ScriptedFactory,
) -> None:
    stack, upstream = await scripted(chunked(SSE_HEAD + b"Connection: close\r\n", *EVENTS))
    for _ in range(2):
        assert await stream_body(stack) == (200, BODY)
    assert upstream.connections == 2


async def test_bodies_that_end_with_the_connection_are_relayed_whole(
    scripted: ScriptedFactory,
) -> None:
    json_body = b'{"answer": "hi", "conversationId": "c-1"}'

    def answer(request: ScriptedRequest) -> bytes:
        if request.number == 1:  # events, then the connection closes: no length, no chunks
            return SSE_HEAD + b"Connection: close\r\n\r\n" + BODY
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + json_body

    stack, _ = await scripted(answer, close_after=True)
    assert await stream_body(stack) == (200, BODY)
    assert await stream_body(stack, stream=False) == (200, json_body)


async def test_a_host_whose_first_address_refuses_is_reached_at_the_next(
    scripted: ScriptedFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for a name with an IPv6 address first, on a machine without IPv6.
    async def two_addresses(pool: Pool, host: str, port: int) -> list[str]:
        return ["127.0.0.2", "127.0.0.1"]  # the server listens on 127.0.0.1 only

    monkeypatch.setattr(Pool, "lookup", two_addresses)
    stack, _ = await scripted(chunked(SSE_HEAD, *EVENTS))
    assert await stream_body(stack) == (200, BODY)


async def test_an_upstream_named_by_host_name_is_resolved(scripted: ScriptedFactory) -> None:
    stack, upstream = await scripted(chunked(SSE_HEAD, *EVENTS), host="localhost")
    assert await stream_body(stack) == (200, BODY)
    assert f"\r\nHost: localhost:{upstream.port}\r\n".encode() in upstream.requests[0]


async def test_an_event_cut_between_chunks_and_reads_arrives_whole(
    scripted: ScriptedFactory,
) -> None:
    cut = [BODY[i : i + 7] for i in range(0, len(BODY), 7)]  # chunks cut inside events
    stack, _ = await scripted(chunked(SSE_HEAD, *cut))
    assert await stream_body(stack) == (200, BODY)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (chunked(SSE_HEAD + b"Content-Encoding: gzip\r\n", b"\x1f\x8b"), "gzip-encoded"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "invalid HTTP"),
        (SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n", "broke off"),
    ],
    ids=["compressed", "not-http", "bad-chunk", "cut-head"],
)
async def test_a_garbled_or_compressed_upstream_answer_is_a_clean_error(
    scripted: ScriptedFactory,
    answer: bytes,
    says: str,
) -> None:
    stack, _ = await scripted(answer, close_after=True)
    async with await stack.chat({"message": "hi"}) as r:
        assert r.status == 502, await r.text()  # nothing reached the client yet
        error = (await r.json())["error"]
    assert error["code"] == "UPSTREAM_ERROR"
    assert says in error["message"]


async def test_a_slow_reader_pauses_the_upstream_and_still_gets_every_byte(
    make_stack: StackFactory,
) -> None:
    """~3 MB through a client that reads 16 kB at a time, with pauses: the relay
    holds the upstream while the client's buffer is full, and loses nothing."""
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=60_000),
        client_write_timeout_s=10.0,
        total_timeout_s=60.0,
    )
    received = await read_slowly(stack, "/api/chatbot", b'{"message": "hi"}', "slow-reader")
    head, _, framed = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert dechunk(framed) == bytes(stack.transcript("slow-reader").sent)
    assert len(framed) > 3_000_000
    assert await stack.metric("chatiq_gateway_slow_client_pauses_total", tenant="acme") > 0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("trusted", [True, False])
async def test_an_https_upstream_is_verified_before_anything_is_sent(
    scripted: ScriptedFactory,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    trusted: bool,
) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    if trusted:  # OpenSSL's own variable: the gateway trusts what the system trusts
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    stack, upstream = await scripted(chunked(SSE_HEAD, *EVENTS), tls=tls)
    if trusted:
        assert await stream_body(stack) == (200, BODY)
        assert await stream_body(stack) == (200, BODY)
        assert upstream.connections == 1  # kept alive over TLS too
    else:
        status, body = await stream_body(stack)
        assert status == 502 and b"could not reach" in body
        assert upstream.requests == []  # the key never went to an unverified server


async def test_an_upstream_that_ends_right_after_its_first_event_gets_an_error_ending(
    scripted: ScriptedFactory,
) -> None:
    """The end arrives with the first event, before the relay takes over: it
    must still end the client's stream with an error event and [DONE]."""
    stack, _ = await scripted(chunked(SSE_HEAD, EVENTS[0]), close_after=True)
    status, body = await stream_body(stack)
    assert status == 200
    assert body.startswith(EVENTS[0])
    assert b"UPSTREAM_ERROR" in body and body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("stream", [True, False])
async def test_interim_100_and_103_answers_before_the_200_are_skipped(
    scripted: ScriptedFactory, stream: bool
) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    stack, upstream = await scripted(lambda r: interim + ok_answer(r))
    status, body = await stream_body(stack, stream)
    assert (status, body) == (200, BODY if stream else JSON_BODY)
    assert (await stream_body(stack, stream))[0] == 200  # and the connection is reused
    assert upstream.connections == 1


async def test_a_response_head_that_never_ends_is_cut_at_its_limit(
    scripted: ScriptedFactory,
) -> None:
    endless = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Filler: " + b"a" * (8 << 20)
    stack, _ = await scripted(endless, max_head_bytes=64 * 1024)
    status, body = await stream_body(stack)
    assert status == 502
    assert b"a response head over 65536 bytes" in body


async def test_a_crlf_split_across_reads_reaches_the_client_byte_for_byte(
    scripted: ScriptedFactory,
) -> None:
    crlf_events = [e.replace(b"\n", b"\r\n") for e in EVENTS]
    whole = b"".join(crlf_events)  # ends "data: [DONE]\r\n\r\n"
    cut = chunked(SSE_HEAD, whole[:-1])[: -len(b"0\r\n\r\n")]
    stack, _ = await scripted([cut, b"1\r\n\n\r\n0\r\n\r\n"])  # the last \n in a read of its own
    assert await stream_body(stack) == (200, whole)
