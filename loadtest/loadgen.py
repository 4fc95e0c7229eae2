"""The benchmark's load generator: many SSE streams, timed per event, at low cost.

Not Locust, not aiohttp: one ``asyncio.Protocol`` per connection that reads
the response with a few ``bytes.find`` calls. It de-chunks the body (every
path answers ``Transfer-Encoding: chunked`` or closes the connection) and
notes the arrival time of each event end (a blank line). That is all the
benchmark needs: time to first event, the gaps between events, whether
``[DONE]`` arrived, and the number of events.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field, replace

_DONE_TAIL = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send a stream request, and what to send."""

    host: str
    port: int
    path: str
    body: dict[str, object]
    key: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # What says the stream ended whole: [DONE], or (OpenAI's Responses API,
    # which sends none) its last event's name.
    end_marker: bytes = _DONE_TAIL

    def request(self) -> bytes:
        body = json.dumps(self.body).encode()
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        auth += "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n{auth}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body


@dataclass(slots=True)
class StreamResult:
    started: float
    status: int = 0
    event_times: list[float] = field(default_factory=list)
    done: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.event_times[0] - self.started if self.event_times else None

    def gaps(self) -> list[float]:
        """Gaps between content events (the last two are conversationId and [DONE])."""
        t = self.event_times[:-2] if self.done else self.event_times
        return [b - a for a, b in itertools.pairwise(t)]


class _StreamProtocol(asyncio.Protocol):
    """Reads one HTTP/1.1 response and times its SSE events."""

    def __init__(
        self, result: StreamResult, finished: asyncio.Future[None], end_marker: bytes = _DONE_TAIL
    ) -> None:
        self.r = result
        self.finished = finished
        self.end_marker = end_marker
        self.saw_end = False
        self.head = b""
        self.chunked = False
        self.in_body = False
        self.raw = b""  # undecoded chunked framing not yet consumed
        self.chunk_left = 0  # body bytes still due in the current chunk
        self.tail = b""  # the last bytes of the body, to spot "\n\n" and [DONE] across reads

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.in_body = True
            try:
                self.r.status = int(head[9:12])
            except ValueError:
                self._finish("bad status line")
                return
            self.chunked = b"transfer-encoding: chunked" in head.lower()
            if self.r.status != 200:
                self._finish(f"HTTP {self.r.status}")
                return
        if self.chunked:
            data = self._dechunk(data)
        if data:
            self._body(data, now)

    def _dechunk(self, data: bytes) -> bytes:
        raw = self.raw + data
        out = []
        pos = 0
        while pos < len(raw):
            if self.chunk_left:
                take = raw[pos : pos + self.chunk_left]
                out.append(take)
                self.chunk_left -= len(take)
                pos += len(take)
                continue
            line_end = raw.find(b"\r\n", pos)
            if line_end < 0:
                break
            size_text = raw[pos:line_end].split(b";")[0].strip()
            if not size_text:  # the CRLF after a chunk's data
                pos = line_end + 2
                continue
            size = int(size_text, 16)
            pos = line_end + 2
            if size == 0:
                self.raw = b""
                return b"".join(out)
            self.chunk_left = size
        self.raw = raw[pos:]
        return b"".join(out)

    def _body(self, data: bytes, now: float) -> None:
        seen = self.tail + data
        start = max(0, len(self.tail) - 1)
        n = 0
        while (i := seen.find(b"\n\n", start)) >= 0:
            n += 1
            start = i + 2
        self.r.event_times.extend([now] * n)
        self.saw_end = self.saw_end or self.end_marker in seen
        self.tail = seen[-len(self.end_marker) :]
        if n and self.saw_end and seen.endswith(b"\n\n"):  # the end marker's event is whole
            self.r.done = True
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.r.done:
            self._finish("closed before [DONE]" if exc is None else f"lost: {exc}")

    def _finish(self, error: str | None) -> None:
        if error is not None and self.r.error is None:
            self.r.error = error
        if not self.finished.done():
            self.finished.set_result(None)


async def stream_once(target: Target, request: bytes, timeout_s: float) -> StreamResult:
    loop = asyncio.get_running_loop()
    result = StreamResult(started=time.perf_counter())
    finished: asyncio.Future[None] = loop.create_future()
    transport = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: _StreamProtocol(result, finished, target.end_marker),
                target.host,
                target.port,
            )
            transport.write(request)
            await finished
    except TimeoutError:
        result.error = result.error or "timeout"
    except OSError as e:
        result.error = result.error or f"connect: {e.strerror or e}"
    finally:
        if transport is not None:
            transport.close()
    return result


async def run_streams(
    target: Target,
    concurrency: int,
    duration_s: float,
    ramp_s: float,
    timeout_s: float,
    *,
    once: bool = False,
) -> list[StreamResult]:
    """``concurrency`` users, each streaming one reply after another for ``duration_s``
    (``once``: one reply each, whatever the duration: a burst).

    Users start spread over ``ramp_s``, so that the figures are about streams
    rather than about a thundering herd of connects.
    """
    request = target.request()
    results: list[StreamResult] = []
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration_s

    async def user(delay: float) -> None:
        await asyncio.sleep(delay)
        results.append(await stream_once(target, request, timeout_s))
        while not once and loop.time() < stop_at:
            results.append(await stream_once(target, request, timeout_s))

    await asyncio.gather(*(user(ramp_s * i / concurrency) for i in range(concurrency)))
    return results


async def hold_streams(
    target: Target, count: int, ramp_s: float, hold_s: float, timeout_s: float
) -> tuple[int, list[StreamResult]]:
    """Open ``count`` long streams, keep them open ``hold_s`` after the last opened.

    Returns how many had received an event (were open end to end) at the end
    of the hold, and every result (for errors).
    """
    request = target.request()
    results = [StreamResult(started=0.0) for _ in range(count)]
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []

    async def open_one(i: int) -> None:
        await asyncio.sleep(ramp_s * i / count)
        r = results[i]
        r.started = time.perf_counter()
        finished: asyncio.Future[None] = loop.create_future()
        try:
            async with asyncio.timeout(timeout_s):
                transport, _ = await loop.create_connection(
                    lambda: _StreamProtocol(r, finished, target.end_marker),
                    target.host,
                    target.port,
                )
        except (OSError, TimeoutError) as e:
            r.error = f"connect: {e}"
            return
        transports.append(transport)
        transport.write(request)

    await asyncio.gather(*(open_one(i) for i in range(count)))
    await asyncio.sleep(hold_s)
    open_now = sum(1 for r in results if r.event_times and r.error is None and not r.done)
    snapshot = [replace(r, event_times=list(r.event_times)) for r in results]
    for t in transports:
        t.close()
    await asyncio.sleep(0.1)  # the sockets close on the loop's next turns, not in close()
    return open_now, snapshot
