"""The commands a person types: the dev stack behind ``make run``, and the emulator."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import pytest

from loadtest.harness import free_port, wait_answering

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent


def is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start_stack(out: IO[str], **popen: Any) -> tuple[subprocess.Popen[bytes], int, int]:
    """``make run``'s stack on free ports: it, and its emulator's and gateway's ports."""
    emulator_port, gateway_port = free_port(), free_port()
    env = {
        **os.environ,
        "CHATIQ_API_URL": f"http://127.0.0.1:{emulator_port}/api/chat",
        "GATEWAY_PORT": str(gateway_port),
    }
    stack = subprocess.Popen(
        [sys.executable, "-m", "loadtest.stack", "--config", "config/gateway.toml"],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, **popen,
    )  # fmt: skip
    return stack, emulator_port, gateway_port


def chat_request(gateway_port: int) -> urllib.request.Request:
    """The README's curl line, for the demo key."""
    return urllib.request.Request(
        f"http://127.0.0.1:{gateway_port}/api/chatbot",
        data=json.dumps({"message": "hi"}).encode(),
        headers={"Authorization": "Bearer demo-key", "Content-Type": "application/json"},
    )


def test_the_dev_stack_streams_a_chat_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    out = (tmp_path / "stack.log").open("w+")
    stack, emulator_port, gateway_port = start_stack(out)
    try:
        wait_answering(f"http://127.0.0.1:{gateway_port}/healthz")
        request = chat_request(gateway_port)
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            body = r.read()
        assert body.endswith(b"data: [DONE]\n\n")
        assert body.count(b'"choices"') > 10
    finally:
        stack.send_signal(signal.SIGINT)
        code = stack.wait(timeout=30)
    out.seek(0)
    printed = out.read()
    assert code == 0, printed
    assert "curl -N -H 'Authorization: Bearer demo-key'" in printed
    assert f"http://127.0.0.1:{gateway_port}/api/chatbot" in printed
    assert "stack: stopped" in printed
    assert "Traceback" not in printed
    assert is_closed(emulator_port) and is_closed(gateway_port)


def test_ctrl_c_in_a_terminal_drains_the_gateway_once(tmp_path: Path) -> None:
    """Ctrl-C signals the whole foreground group, the gateway and the emulator
    too: the stack lets them stop on their own rather than signal the gateway a
    second time (which would end its drain at once, with a ``stopping_now``
    warning, on every Ctrl-C of ``make run``)."""
    out = (tmp_path / "stack.log").open("w+")
    stack, emulator_port, gateway_port = start_stack(out, start_new_session=True)
    try:
        wait_answering(f"http://127.0.0.1:{gateway_port}/healthz")
        request = chat_request(gateway_port)
        with urllib.request.urlopen(request, timeout=30) as r:
            first = r.read1()  # a live stream as Ctrl-C comes: the gateway drains
            os.killpg(stack.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
            body = first + r.read()
        assert stack.wait(timeout=30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stack.pid, signal.SIGKILL)
    out.seek(0)
    printed = out.read()
    assert "stopping_now" not in printed, printed[-1500:]
    assert "stack: stopped" in printed and '"event": "stopped"' in printed
    # The emulator stopped at once too: the stream still ends as the contract says.
    assert body.endswith(b"data: [DONE]\n\n")
    assert is_closed(emulator_port) and is_closed(gateway_port)


def test_the_emulator_command_serves_the_chat_api() -> None:
    port = free_port()
    emulator = subprocess.Popen(
        [sys.executable, "-m", "loadtest.emulator", "--port", str(port), "--ttft-ms", "0"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "CHATIQ_API_KEY"},
    )
    try:
        wait_answering(f"http://127.0.0.1:{port}/healthz")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/chat",
            data=json.dumps({"message": "hi", "bot_slug": "x", "stream": False}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            answer = json.loads(r.read())
        assert answer["conversationId"].startswith("conv_")
        assert "hi" in answer["response"]
    finally:
        emulator.send_signal(signal.SIGINT)
        assert emulator.wait(timeout=30) == 0


def test_the_emulator_stops_at_once_with_replies_in_progress_and_says_nothing() -> None:
    port = free_port()
    emulator = subprocess.Popen(
        [sys.executable, "-m", "loadtest.emulator", "--port", str(port),
         "--ttft-ms", "0", "--tokens-per-s", "0.5"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "CHATIQ_API_KEY"},
    )  # fmt: skip
    clients: list[socket.socket] = []
    try:
        wait_answering(f"http://127.0.0.1:{port}/healthz")
        body = json.dumps({"message": "hi", "bot_slug": "x", "stream": True}).encode()
        head = (
            f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        for _ in range(50):  # replies that would stream for minutes
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(head + body)
            clients.append(client)
        for client in clients:
            client.settimeout(10)
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        emulator.send_signal(signal.SIGTERM)
        _, said = emulator.communicate(timeout=30)
        # aiohttp would wait out its shutdown timeout (1 s) for the handlers;
        # they are ended first, so nothing is left to race its shutdown.
        assert time.monotonic() - started < 1.0
        assert said.decode().strip() == ""
    finally:
        for client in clients:
            client.close()
        if emulator.poll() is None:
            emulator.kill()


def test_a_backgrounded_dev_stack_stops_on_sigint_quickly_even_mid_stall(
    tmp_path: Path,
) -> None:
    """A shell starts a background job with SIGINT ignored; `kill -INT` must still
    stop it cleanly (exit 0), and a stalled reply must not hold the emulator up."""
    emulator_port, gateway_port = free_port(), free_port()
    env = {
        **os.environ,
        "CHATIQ_API_URL": f"http://127.0.0.1:{emulator_port}/api/chat",
        "GATEWAY_PORT": str(gateway_port),
    }
    stack = subprocess.Popen(
        [sys.executable, "-m", "loadtest.stack", "--config", "config/gateway.toml"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        wait_answering(f"http://127.0.0.1:{gateway_port}/healthz")
        stalled = socket.create_connection(("127.0.0.1", gateway_port))
        body = json.dumps({"message": "hi", "bot": "fault-stall-first"}).encode()
        stalled.sendall(
            b"POST /api/chatbot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer demo-key\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.5)  # the emulator is now stalling that reply
        started = time.monotonic()
        stack.send_signal(signal.SIGINT)
        assert stack.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
        stalled.close()
    finally:
        if stack.poll() is None:
            stack.kill()
    assert is_closed(emulator_port) and is_closed(gateway_port)
