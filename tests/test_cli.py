"""The real ``chatiq-chat`` against a real gateway process, one-shot and interactive."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtest.emulator import EmulatorSettings, compose_reply
from tests.cutting_proxy import CuttingProxy
from tests.helpers import ACME_KEY, GatewayProcess, StackFactory
from tests.oidc import AUDIENCE, OpenIdProvider

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
async def cli(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> Callable[..., Awaitable[Run]]:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=8))
    # A stalled upstream times out in 1 s, not the default 30 s.
    gw = await gateway_process(stack.emulator, upstream={"idle_timeout_s": 1.0})

    async def run(*args: str, stdin: str = "", key: str | None = ACME_KEY) -> Run:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATIQ_GATEWAY")}
        env["CHATIQ_GATEWAY_URL"] = f"http://127.0.0.1:{gw.port}"
        if key is not None:
            env["CHATIQ_GATEWAY_KEY"] = key
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
        assert process.returncode is not None
        return Run(process.returncode, out.decode(), err.decode())

    return run


def reply(message: str, earlier: list[str] | None = None) -> str:
    return "".join(compose_reply(message, earlier or [], 8))


async def test_one_shot_prints_the_streamed_reply(cli: Callable[..., Awaitable[Run]]) -> None:
    run = await cli("hello there")
    assert (run.code, run.out) == (0, reply("hello there") + "\n")
    assert "conversation: conv_" in run.err


async def test_the_question_can_come_on_stdin(cli: Callable[..., Awaitable[Run]]) -> None:
    run = await cli(stdin="from a script\n")
    assert (run.code, run.out) == (0, reply("from a script") + "\n")


async def test_no_stream_and_a_conversation_carried_over(
    cli: Callable[..., Awaitable[Run]],
) -> None:
    first = await cli("--no-stream", "my name is Ada")
    assert (first.code, first.out) == (0, reply("my name is Ada") + "\n")
    conversation = first.err.split("conversation: ")[1].strip()
    second = await cli("--conversation", conversation, "who am I?")
    assert second.out == reply("who am I?", ["my name is Ada"]) + "\n"


async def test_json_prints_the_raw_events(cli: Callable[..., Awaitable[Run]]) -> None:
    run = await cli("--json", "--bot", "rich", "hi")
    lines = run.out.splitlines()
    assert run.code == 0 and lines[-1] == "[DONE]"
    kinds = [next(iter(json.loads(line))) for line in lines[:-1]]
    assert kinds[-4:] == ["responses", "attachments", "suggestions", "conversationId"]


async def test_stats_go_to_stderr(cli: Callable[..., Awaitable[Run]]) -> None:
    run = await cli("--stats", "hi")
    assert run.code == 0 and run.out == reply("hi") + "\n"
    assert "TTFT" in run.err and "tokens/s" in run.err


@pytest.mark.parametrize(
    ("args", "key", "message"),
    [
        (["hi"], "wrong-key", "401 UNAUTHORIZED"),
        (["--bot", "fault-429", "hi"], ACME_KEY, "429 RATE_LIMIT"),
        (["--bot", "fault-stall-mid", "hi"], ACME_KEY, "UPSTREAM_TIMEOUT"),
        (["--url", "http://127.0.0.1:9", "hi"], ACME_KEY, "cannot reach the gateway"),
    ],
)
async def test_errors_exit_non_zero_with_a_message_on_stderr(
    cli: Callable[..., Awaitable[Run]], args: list[str], key: str, message: str
) -> None:
    run = await cli(*args, key=key)
    assert run.code == 1
    assert message in run.err


async def test_usage_errors_exit_2(cli: Callable[..., Awaitable[Run]]) -> None:
    assert (await cli("hi", key=None)).code == 2
    assert (await cli(stdin="   ")).code == 2


async def test_interactive_commands(cli: Callable[..., Awaitable[Run]]) -> None:
    script = (
        "/help\nmy name is Ada\nwho am I?\n/new\nand now?\n/bot rich\nhi\n/bot demo\n"
        "who am I?\n/nope\n/quit\n"
    )
    run = await cli("-i", stdin=script)
    assert run.code == 0
    assert "/bot NAME" in run.err and "/help" in run.err  # /help is not sent as a question
    assert f"bot> {reply('who am I?', ['my name is Ada'])}\n" in run.out  # each reply prefixed
    assert f"bot> {reply('and now?')}\n" in run.out  # /new forgot the conversation
    assert "(suggestions: Tell me more | Thanks!)" in run.out  # /bot rich
    assert "(new conversation)" in run.err and "(bot: rich; new conversation)" in run.err
    # Back on demo, the conversation of "rich" is not carried over.
    assert run.out.count(f"bot> {reply('who am I?')}\n") == 1
    assert "(unknown command /nope: /help lists them)" in run.err
    assert "/help" not in run.out and "nope" not in run.out


async def test_ctrl_c_stops_the_reply_not_the_program(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=10, reply_tokens=100))
    gw = await gateway_process(stack.emulator)
    env = {**os.environ, "CHATIQ_GATEWAY_URL": f"http://127.0.0.1:{gw.port}",
           "CHATIQ_GATEWAY_KEY": ACME_KEY}  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", "-i",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
        # Started as a background job's child is (make in a script, say): with
        # SIGINT ignored. Ctrl-C must still stop the reply.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"tell me a long story\n")
    await process.stdin.drain()
    seen = b""
    while b"You asked" not in seen:  # the reply is streaming (not just the prompt)
        seen += await asyncio.wait_for(process.stdout.read(64), 30)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    await asyncio.sleep(0.3)
    process.stdin.write(b"/quit\n")
    await process.stdin.drain()
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert "(stopped)" in err.decode()
    async with stack.session.get(f"http://127.0.0.1:{gw.port}/metrics") as r:
        assert "chatiq_gateway_client_disconnects_total" in await r.text()
    assert await gw.metric(stack.session, "chatiq_gateway_client_disconnects_total") == 1


@pytest.mark.parametrize("stream", [True, False])
async def test_the_openai_route_gives_the_same_reply_and_conversation(
    cli: Callable[..., Awaitable[Run]], stream: bool
) -> None:
    flags = ["--api", "openai"] + ([] if stream else ["--no-stream"])
    first = await cli(*flags, "my name is Ada")
    assert (first.code, first.out) == (0, reply("my name is Ada") + "\n")
    conversation = first.err.split("conversation: ")[1].strip()
    second = await cli(*flags, "--conversation", conversation, "who am I?")
    assert second.out == reply("who am I?", ["my name is Ada"]) + "\n"
    failed = await cli("--api", "openai", "--bot", "fault-500", "hi")
    assert failed.code == 1 and "502 upstream_error" in failed.err


async def test_keys_typed_during_a_reply_wait_for_the_next_prompt(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    """On a real terminal (a pty), what is typed while a reply streams is not
    echoed into it; it is the next question."""
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=30))
    gw = await gateway_process(stack.emulator)
    env = {**os.environ, "CHATIQ_GATEWAY_URL": f"http://127.0.0.1:{gw.port}",
           "CHATIQ_GATEWAY_KEY": ACME_KEY, "TERM": "dumb"}  # fmt: skip
    leader, follower = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli",
        stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, env=env,
    )  # fmt: skip
    os.close(follower)
    seen = bytearray()
    arrived = asyncio.Event()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            seen.extend(os.read(leader, 4096))
        except OSError:  # the child closed the terminal
            loop.remove_reader(leader)
        arrived.set()

    loop.add_reader(leader, readable)

    async def read_until(marker: bytes, timeout_s: float = 30) -> None:
        until = loop.time() + timeout_s
        while marker not in seen:
            assert loop.time() < until, bytes(seen)
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), 1)

    try:
        await read_until(b"you> ")
        os.write(leader, b"first question\r")
        await read_until(b"You asked")  # the reply is streaming
        os.write(leader, b"typed meanwhile\r")
        await read_until(b"typed meanwhile")
        await read_until(b"you> ", timeout_s=30)
        text = bytes(seen).decode(errors="replace")
        reply = text[text.index("bot> ") : text.index("typed meanwhile")]
        assert "you> " in reply  # the typed line shows only after the reply, at the prompt
        os.write(leader, b"/quit\r")
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        loop.remove_reader(leader)
        if process.returncode is None:
            process.kill()
        os.close(leader)


async def test_a_reply_cut_off_mid_stream_is_resumed_without_a_gap_or_a_repeat(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=30))
    gw = await gateway_process(stack.emulator, resume={"enabled": True})
    proxy = await CuttingProxy(gw.port).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATIQ_GATEWAY")}
    env.update(CHATIQ_GATEWAY_URL=proxy.url, CHATIQ_GATEWAY_KEY=ACME_KEY)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", "tell me a long story",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    await asyncio.sleep(0.6)
    assert proxy.cut() >= 2  # the client's connection and the gateway's side of it
    out, err = await asyncio.wait_for(process.communicate(), 60)
    await proxy.close()
    assert process.returncode == 0, err.decode()
    assert "(reconnecting...)" in err.decode()
    words = "".join(compose_reply("tell me a long story", [], 30))
    assert out.decode() == words + "\n"


async def test_a_token_from_the_identity_provider_signs_in_instead_of_a_key(
    make_stack: StackFactory,
    gateway_process: Callable[..., Awaitable[GatewayProcess]],
    oidc: OpenIdProvider,
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=8))
    issuer = {"issuer": oidc.issuer, "audience": AUDIENCE, "tenant": "load"}
    gw = await gateway_process(stack.emulator, issuers=[issuer])
    token = await oidc.client_token()

    async def run(*args: str, **variables: str) -> Run:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATIQ_GATEWAY")}
        env.update(CHATIQ_GATEWAY_URL=f"http://127.0.0.1:{gw.port}", **variables)
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", *args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(done.communicate(), 60)
        assert done.returncode is not None
        return Run(done.returncode, out.decode(), err.decode())

    for signed_in in (
        await run("hi", CHATIQ_GATEWAY_TOKEN=token),
        await run("hi", "--token", token),
    ):
        assert (signed_in.code, signed_in.out.strip()) == (0, reply("hi")), signed_in.err
    expired = await run("hi", "--token", oidc.mint(exp=int(time.time()) - 600))
    assert expired.code == 1 and "the token has expired" in expired.err
    both = await run("hi", CHATIQ_GATEWAY_TOKEN=token, CHATIQ_GATEWAY_KEY=ACME_KEY)
    assert both.code == 2 and "not both" in both.err
    # A key on the command line wins over a token in the environment.
    keyed = await run("hi", "--key", ACME_KEY, CHATIQ_GATEWAY_TOKEN="stale")
    assert keyed.code == 0, keyed.err
