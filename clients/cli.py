"""``chatiq-chat``: talk to ChatIQ through the gateway from a terminal or a script.

One-shot: ``chatiq-chat "question"`` (or the question on stdin) prints the
reply on stdout, diagnostics on stderr, and exits non-zero on any error.
Interactive (no question, stdin a terminal, or ``-i``): a prompt with history;
replies come after ``bot> ``; ``/help`` lists the commands (``/new``, ``/bot``,
``/quit``); Ctrl-C during a reply stops that reply, not the program; what is
typed during a reply is not echoed into it, and waits for the next prompt.

``--api openai`` talks to the gateway's OpenAI-compatible route
(``/v1/chat/completions``) instead of the native one, as any OpenAI client would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from gateway.sse import SSEParser

DEFAULT_URL = "http://127.0.0.1:8080"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
RESUME_FOR_S = 30.0  # a cut stream is resumed for this long (the gateway's detach grace)


class ChatError(Exception):
    """The gateway refused the request or the stream ended in an error."""


@dataclass
class Session:
    url: str
    key: str
    bot: str | None = None
    conversation_id: str | None = None
    stream: bool = True
    raw_json: bool = False
    stats: bool = False
    api: str = "chatiq"  # or "openai": the gateway's OpenAI-compatible route
    prefix: str = ""  # before each reply (the prompt's "bot> ")
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: int = 0

    def report(self) -> str:
        total = time.monotonic() - self.started
        if self.first_token is None:
            return f"total {total:.2f} s, no tokens"
        streaming = total - self.first_token
        rate = f"{(self.tokens - 1) / streaming:.1f} tokens/s" if streaming > 0 else "n/a"
        ttft = f"TTFT {self.first_token * 1000:.0f} ms"
        return f"{ttft}, {self.tokens} tokens, {rate}, total {total:.2f} s"


async def ask(session: Session, message: str) -> None:
    """Send one message and print the reply as it arrives; raise ChatError on failure.

    A native stream is asked to be resumable: when the connection drops before
    ``[DONE]``, the reply is resumed after the last event received (the gateway
    sends each event once), for up to ``RESUME_FOR_S``."""
    headers = {"Authorization": f"Bearer {session.key}"}
    stats = Stats()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            path, body = await _request(http, session, message, headers)
            ask_headers = {**headers, "X-Resumable": "1"} if session.stream else headers
            async with http.post(
                f"{session.url}{path}", json=body, headers=ask_headers
            ) as response:
                if response.status != 200:
                    raise ChatError(await _describe_error(response))
                if session.prefix and not session.raw_json:
                    print(session.prefix, end="", file=session.out, flush=True)
                reading = Reading(response.headers.get("X-Stream-Id"), done=not session.stream)
                if session.stream:
                    await _print_stream(session, response, stats, reading)
                else:
                    _print_answer(session, await response.json())
            while not reading.done:
                response = await _resume(http, session, reading, headers)
                async with response:
                    await _print_stream(session, response, stats, reading)
            if session.stream:
                _end_stream(session, reading)
        except aiohttp.ClientError as e:
            raise ChatError(f"cannot reach the gateway at {session.url}: {e}") from None
    _report(session, stats)


def _report(session: Session, stats: Stats) -> None:
    if session.stats:
        print(stats.report(), file=session.err)


@dataclass
class Reading:
    """Where a stream is: its id (None: not resumable), its last event's id."""

    stream_id: str | None
    last_event_id: str = ""
    done: bool = False
    failure: str | None = None
    retry_ms: int = 500  # the gateway's retry: hint, if it sent one


async def _resume(
    http: aiohttp.ClientSession, session: Session, reading: Reading, headers: dict[str, str]
) -> aiohttp.ClientResponse:
    """The stream again, after the last event received; ChatError once it cannot be."""
    if reading.stream_id is None:
        _end_stream(session, reading)  # raises: the stream was cut, and is not resumable
    url = f"{session.url}/api/chatbot/streams/{reading.stream_id}"
    wait_s, until = reading.retry_ms / 1000, time.monotonic() + RESUME_FOR_S
    print("\n(reconnecting...)", file=session.err, flush=True)
    while True:
        await asyncio.sleep(wait_s)
        try:
            response = await http.get(
                url, headers={**headers, "Last-Event-ID": reading.last_event_id}
            )
        except aiohttp.ClientError:
            response = None
        if response is not None and response.status == 200:
            return response
        if response is not None and response.status not in (502, 503, 504):
            raise ChatError(f"the reply was cut off and cannot be resumed: "
                            f"{await _describe_error(response)}")  # fmt: skip
        if time.monotonic() + wait_s > until:
            raise ChatError("the reply was cut off and the gateway could not be reached again")
        wait_s = min(wait_s * 2, 4.0)


def _end_stream(session: Session, reading: Reading) -> None:
    if not session.raw_json:
        print(file=session.out, flush=True)
    if reading.failure:
        raise ChatError(reading.failure)
    if not reading.done:
        raise ChatError("the stream ended before [DONE]")


async def _request(
    http: aiohttp.ClientSession, session: Session, message: str, headers: dict[str, str]
) -> tuple[str, dict[str, object]]:
    """The route and body for one message, in the API chosen."""
    if session.api == "openai":
        model = session.bot
        if not model:  # OpenAI's API names a model: the first the key may use
            async with http.get(f"{session.url}/v1/models", headers=headers) as r:
                if r.status != 200:
                    raise ChatError(await _describe_error(r))
                model = (await r.json())["data"][0]["id"]
        return "/v1/chat/completions", {
            "model": model,
            "messages": [{"role": "user", "content": message}],
            "stream": session.stream,
            "conversation_id": session.conversation_id,
        }
    body: dict[str, object] = {
        "message": message,
        "stream": session.stream,
        "conversation_id": session.conversation_id,
    }
    if session.bot:
        body["bot"] = session.bot
    return "/api/chatbot", body


def _print_answer(session: Session, answer: dict[str, Any]) -> None:
    """A whole (non-streamed) answer, native or OpenAI's."""
    if session.api == "openai":
        text = answer["choices"][0]["message"]["content"]
        conversation_id = answer.get("conversation_id")
    else:
        text, conversation_id = answer.get("response", ""), answer.get("conversationId")
    session.conversation_id = conversation_id or session.conversation_id
    if session.raw_json:
        print(json.dumps(answer, ensure_ascii=False), file=session.out)
    else:
        print(text, file=session.out)


async def _print_stream(
    session: Session, response: aiohttp.ClientResponse, stats: Stats, reading: Reading
) -> None:
    """Print events until the stream ends, or its connection breaks."""
    parser = SSEParser()  # a fresh one per connection: a cut event is sent again whole
    try:
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                if event.retry is not None:
                    reading.retry_ms = event.retry
                if event.data is None:
                    continue
                if event.id is not None:
                    reading.last_event_id = event.id
                if session.raw_json:
                    print(event.data, file=session.out, flush=True)
                if event.data == "[DONE]":
                    reading.done = True
                    continue
                payload = json.loads(event.data)
                reading.failure = _show(session, payload, stats) or reading.failure
    except aiohttp.ClientPayloadError:
        if reading.stream_id is None:
            raise ChatError("the connection broke before [DONE]") from None


def _show(session: Session, payload: dict[str, Any], stats: Stats) -> str | None:
    """Print one event's content; return an error message if it is an error event."""
    show = not session.raw_json
    choices = payload.get("choices")
    if isinstance(choices, list) and choices:
        content = choices[0].get("delta", {}).get("content")
        if isinstance(content, str):
            if stats.first_token is None:
                stats.first_token = time.monotonic() - stats.started
            stats.tokens += 1
            if show:
                print(content, end="", file=session.out, flush=True)
    for extra in payload.get("responses") or []:
        if show:
            print(f"\n{extra}", end="", file=session.out, flush=True)
    for attachment in payload.get("attachments") or []:
        if show and isinstance(attachment, dict):
            print(f"\n[{attachment.get('type', 'attachment')}: {attachment.get('url')}]",
                  end="", file=session.out, flush=True)  # fmt: skip
    suggestions = payload.get("suggestions")
    if show and isinstance(suggestions, list) and suggestions:
        labels = " | ".join(str(s.get("label", s)) if isinstance(s, dict) else str(s)
                            for s in suggestions)  # fmt: skip
        print(f"\n(suggestions: {labels})", end="", file=session.out, flush=True)
    for name in ("conversationId", "conversation_id"):  # native, OpenAI's last chunk
        if isinstance(payload.get(name), str):
            session.conversation_id = payload[name]
    error = payload.get("error")
    if isinstance(error, dict):
        return f"{error.get('code', 'ERROR')}: {error.get('message', '')}"
    return None


async def _describe_error(response: aiohttp.ClientResponse) -> str:
    try:
        error = (await response.json())["error"]
        text = f"{response.status} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
        text = f"{response.status} {response.reason}"
    if response.headers.get("Retry-After"):
        text += f" (retry after {response.headers['Retry-After']} s)"
    return text


HELP = """\
  /new        start a new conversation
  /bot NAME   talk to another bot (a new conversation); /bot alone: the default bot
  /quit       leave (also Ctrl-D)
  /help       this list
Anything else is sent to the bot. Ctrl-C during a reply stops that reply."""


@contextlib.contextmanager
def _no_echo(stream: TextIO) -> Iterator[None]:
    """While a reply streams, keystrokes are not echoed into it; they stay in the
    terminal's input and reach the next prompt."""
    try:
        import termios
    except ImportError:  # not on every platform
        yield
        return
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError, AttributeError):  # not a terminal
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def interactive(session: Session) -> int:
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (arrow keys and history for input())
    # Ctrl-C stops a reply, whatever the CLI was started from: a shell script's
    # background job, or make, passes SIGINT on ignored, and Python then
    # leaves it ignored (asyncio.run only takes it over from Python's own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    session.prefix = "bot> "
    print("chatiq-chat: /help for the commands, /quit to leave", file=session.err)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print(file=session.err)
            return EXIT_OK
        except KeyboardInterrupt:
            print(file=session.err)
            continue
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return EXIT_OK
        if line == "/new":
            session.conversation_id = None
            print("(new conversation)", file=session.err)
            continue
        if line.startswith("/bot"):
            session.bot = line.removeprefix("/bot").strip() or None
            session.conversation_id = None  # a conversation belongs to its bot
            print(f"(bot: {session.bot or 'the default'}; new conversation)", file=session.err)
            continue
        if line in ("/help", "/?"):
            print(HELP, file=session.err)
            continue
        if line.startswith("/") and " " not in line:
            print(f"(unknown command {line}: /help lists them)", file=session.err)
            continue
        try:
            with _no_echo(sys.stdin):
                asyncio.run(ask(session, line))
        except KeyboardInterrupt:
            print("\n(stopped)", file=session.err)
        except ChatError as e:
            print(f"error: {e}", file=session.err)


def _credential(parser: argparse.ArgumentParser, key: str | None, token: str | None) -> str:
    """The key or the token: the command line's, else the environment's; one of them."""
    if not (key or token):
        key, token = os.environ.get("CHATIQ_GATEWAY_KEY"), os.environ.get("CHATIQ_GATEWAY_TOKEN")
    if key and token:
        parser.error("a key or a token, not both (CHATIQ_GATEWAY_KEY, CHATIQ_GATEWAY_TOKEN)")
    if not (key or token):
        parser.error("no key: pass --key or set CHATIQ_GATEWAY_KEY (or a --token)")
    return str(key or token)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatiq-chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", help="ask this and exit (else stdin, or a prompt)")
    parser.add_argument(
        "--url",
        default=os.environ.get("CHATIQ_GATEWAY_URL", DEFAULT_URL),
        help="the gateway (env CHATIQ_GATEWAY_URL; default %(default)s)",
    )
    parser.add_argument(
        "--key",
        help="your gateway key (env CHATIQ_GATEWAY_KEY)",
    )
    parser.add_argument(
        "--token",
        help="instead of a key, a token from your identity provider (env CHATIQ_GATEWAY_TOKEN)",
    )
    parser.add_argument("--bot", help="the bot to ask (default: the gateway's)")
    parser.add_argument(
        "--api", choices=["chatiq", "openai"], default="chatiq",
        help="the gateway's native route, or its OpenAI-compatible one (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--conversation", metavar="ID", help="continue this conversation")
    parser.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    parser.add_argument("--json", action="store_true", help="print the raw events (JSON)")
    parser.add_argument("--stats", action="store_true", help="TTFT, tokens/s and time, on stderr")
    parser.add_argument("-i", "--interactive", action="store_true", help="a prompt, even on a pipe")
    args = parser.parse_args(argv)
    credential = _credential(parser, args.key, args.token)
    session = Session(
        url=args.url.rstrip("/"),
        key=credential,
        bot=args.bot,
        conversation_id=args.conversation,
        stream=not args.no_stream,
        raw_json=args.json,
        stats=args.stats,
        api=args.api,
    )
    if args.interactive or (args.question is None and sys.stdin.isatty()):
        return interactive(session)
    question = args.question if args.question is not None else sys.stdin.read()
    if not question.strip():
        parser.error("the question is empty")
    try:
        asyncio.run(ask(session, question.strip()))
    except ChatError as e:
        print(f"chatiq-chat: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\nchatiq-chat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if session.conversation_id:
        print(f"conversation: {session.conversation_id}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
