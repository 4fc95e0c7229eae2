"""The ChatIQ client: a request out, and either an opened stream or a typed error.

A stream counts as open once its first whole event has arrived: until then
nothing has reached the client, so every failure may still be retried (with
backoff, within a budget) and reported as a plain HTTP status. The circuit
breaker hears of every attempt. No redirect is ever followed: it could carry
the ChatIQ key to another host.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from typing import TypeVar

import aiohttp

from .breaker import CircuitBreaker
from .chat import ChatRequest
from .config import UpstreamSettings
from .errors import (
    ConnectTimeout,
    FirstByteTimeout,
    TotalTimeout,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
)
from .logs import Logger
from .metrics import Metrics
from .retry import backoff_s, retry_reason
from .sse import Event, SSEParser, SSEProtocolError

_ERROR_BODY_LIMIT = 64 * 1024
# The most one read takes from the upstream: what a relay holds while a slow
# client drains is a few of these, whatever the upstream had buffered.
_READ_BYTES = 64 * 1024
T = TypeVar("T")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait, from delta-seconds or an HTTP date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


class EventSource:
    """An upstream ``text/event-stream`` response, read as whole events.

    Each read has a deadline, but a stream reads an event every few
    milliseconds for minutes: rather than a timer per read (as
    ``asyncio.timeout`` would arm), one timer per stream is moved lazily. A
    read only records its deadline; the timer, when it fires early, re-arms
    itself for the latest one. So a timer runs about once per deadline span
    (seconds), not once per event.
    """

    def __init__(self, response: aiohttp.ClientResponse, max_event_bytes: int) -> None:
        self._response = response
        self._parser = SSEParser(max_event_bytes)
        # A parse failure found after some good events: raised on the next read.
        self._failure: UpstreamError | None = None
        self._loop = asyncio.get_running_loop()
        self._until = 0.0  # the deadline of the read in progress
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None  # the task that reads this stream
        self._reading = False  # that task is blocked in a read
        self._bytes_before = 0  # what the upstream had sent when that read began
        self._expired = False  # the timer cancelled the reader

    async def read(self, until: float) -> list[Event]:
        """At least one whole event; ``TimeoutError`` if loop time ``until`` passes first."""
        if self._failure is not None:
            raise self._failure
        while True:
            chunk = await self._read_chunk(until)
            if not chunk:
                raise UpstreamClosed("the chat service ended the stream early")
            try:
                events = self._parser.feed(chunk)
            except SSEProtocolError as e:
                failure = UpstreamProtocolError(f"the chat service sent an {e}")
                if not e.events:
                    raise failure from None
                self._failure, events = failure, e.events
            if events:
                return events

    async def _read_chunk(self, until: float) -> bytes:
        content = self._response.content
        self._until = until
        if self._timer is None or self._timer.when() > until:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(until, self._on_timer)
        if self._task is None:
            self._task = asyncio.current_task()  # one task reads a stream from start to end
        self._reading = True
        self._bytes_before = content.total_bytes
        try:
            return await content.read(_READ_BYTES)
        except asyncio.CancelledError:
            if self._expired:
                self._expired = False
                if self._task is not None and self._task.uncancel() == 0:
                    raise TimeoutError from None  # only the timer cancelled: a timeout
            raise
        except (aiohttp.ClientError, OSError):
            raise UpstreamClosed("the chat service broke off the stream") from None
        finally:
            self._reading = False

    def _on_timer(self) -> None:
        self._timer = None
        if not self._reading or self._task is None:
            return  # no read in progress: the next one arms the timer again
        if self._loop.time() < self._until:
            self._timer = self._loop.call_at(self._until, self._on_timer)
            return
        content = self._response.content
        if (
            content.total_bytes != self._bytes_before
            or content.is_eof()
            or content.exception() is not None
        ):
            return  # the reader is already woken (data, end or error): let it run
        self._expired = True
        self._task.cancel()

    def close(self) -> None:
        """Give the connection back to the pool when the body ended, else close it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class Upstream:
    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        breaker: CircuitBreaker,
        log: Logger,
    ) -> None:
        self._settings = settings
        self._session = session
        self._metrics = metrics
        self._breaker = breaker
        self._log = log
        self._rng = random.Random()
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=None
        )

    async def open_stream(
        self, chat: ChatRequest, request_id: str, deadline: float
    ) -> tuple[EventSource, list[Event]]:
        """The stream and its first events, retried while nothing reached the client."""

        async def attempt(first_byte_by: float) -> tuple[EventSource, list[Event]]:
            response = await self._send(chat, request_id, first_byte_by, deadline)
            source = EventSource(response, self._settings.max_event_bytes)
            try:
                return source, await source.read(min(first_byte_by, deadline))
            except TimeoutError:
                source.close()
                raise _timeout_error(first_byte_by, deadline) from None
            except BaseException:
                source.close()
                raise

        return await self._with_retries(attempt, request_id, deadline)

    async def complete(self, chat: ChatRequest, request_id: str, deadline: float) -> bytes:
        """A non-streaming answer's body, checked to be a JSON object."""

        async def attempt(first_byte_by: float) -> bytes:
            response = await self._send(chat, request_id, first_byte_by, deadline)
            return await self._read_json(response, deadline)

        return await self._with_retries(attempt, request_id, deadline)

    async def _with_retries(
        self, attempt: Callable[[float], Awaitable[T]], request_id: str, deadline: float
    ) -> T:
        loop = asyncio.get_running_loop()
        s = self._settings
        retry_by = min(deadline, loop.time() + s.retry_budget_s)
        tries = 0
        while True:
            self._breaker.check()
            tries += 1
            try:
                result = await attempt(loop.time() + s.first_byte_timeout_s)
            except UpstreamError as e:
                self._count_failure(e, request_id, tries)
                reason = retry_reason(e)
                if reason is None or tries > s.max_retries:
                    raise
                delay = backoff_s(tries, e, s, self._rng)
                if loop.time() + delay > retry_by:
                    raise
                self._metrics.upstream_retries.labels(reason).inc()
                self._log.warning(
                    "upstream_retry", request_id=request_id, reason=reason, attempt=tries,
                    delay_ms=round(delay * 1000),
                )  # fmt: skip
                await asyncio.sleep(delay)
                continue
            self._breaker.success()
            return result

    def _count_failure(self, error: UpstreamError, request_id: str, attempt: int) -> None:
        self._log.warning(
            "upstream_failed", request_id=request_id, attempt=attempt,
            error=type(error).__name__, kind=error.kind, status=error.status,
        )  # fmt: skip
        if error.kind is not None:
            self._metrics.upstream_errors.labels(error.kind).inc()
        if error.counts_against_upstream:
            self._breaker.failure()

    async def _send(
        self, chat: ChatRequest, request_id: str, first_byte_by: float, deadline: float
    ) -> aiohttp.ClientResponse:
        """POST the chat; return a 200 response of the expected type, or raise."""
        loop = asyncio.get_running_loop()
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if chat.stream else "application/json",
            "X-Request-Id": request_id,
        }
        if self._settings.api_key:
            headers["Authorization"] = f"Bearer {self._settings.api_key}"
        sent = loop.time()
        try:
            async with asyncio.timeout_at(min(first_byte_by, deadline)):
                response = await self._session.post(
                    self._settings.url,
                    data=json.dumps(chat.upstream_body()).encode(),
                    headers=headers,
                    allow_redirects=False,
                    timeout=self._timeout,
                )
        except aiohttp.ConnectionTimeoutError:
            raise ConnectTimeout("timed out connecting to the chat service") from None
        except TimeoutError:
            raise _timeout_error(first_byte_by, deadline) from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamConnectError("could not reach the chat service") from None
        self._metrics.upstream_first_byte.observe(loop.time() - sent)
        if response.status != 200:
            try:
                raise await _error_for(response)
            finally:
                response.close()
        expected = "text/event-stream" if chat.stream else "application/json"
        if response.content_type != expected:
            response.close()
            raise UpstreamProtocolError(
                f"the chat service answered {response.content_type!r}, not {expected!r}"
            )
        return response

    async def _read_json(self, response: aiohttp.ClientResponse, deadline: float) -> bytes:
        limit = self._settings.max_json_bytes
        try:
            async with asyncio.timeout_at(deadline):
                body = await response.content.read(limit + 1)
                while len(body) <= limit and not response.content.at_eof():
                    more = await response.content.read(limit + 1 - len(body))
                    if not more:
                        break
                    body += more
        except TimeoutError:
            raise TotalTimeout("the chat service did not finish its answer in time") from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamClosed("the chat service broke off its answer") from None
        finally:
            response.close()
        if len(body) > limit:
            raise UpstreamProtocolError(f"the chat service's answer is over {limit} bytes")
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise UpstreamProtocolError("the chat service's answer is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise UpstreamProtocolError("the chat service's answer is not a JSON object")
        return body


def _timeout_error(first_byte_by: float, deadline: float) -> UpstreamError:
    if deadline < first_byte_by:
        return TotalTimeout("the request ran out of time")
    return FirstByteTimeout("the chat service sent nothing in time")


async def _error_for(response: aiohttp.ClientResponse) -> UpstreamError:
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if response.status == 429:
        return UpstreamRateLimited(
            "the chat service is rate limiting requests", retry_after=retry_after
        )
    if response.status == 400:
        return UpstreamRejected(await _upstream_message(response))
    return UpstreamHTTPError(response.status, retry_after=retry_after)


async def _upstream_message(response: aiohttp.ClientResponse) -> str:
    """The message of a ChatIQ error body, or a generic one."""
    generic = "the chat service rejected the request"
    try:
        async with asyncio.timeout(2):
            raw = await response.content.read(_ERROR_BODY_LIMIT)
        message = json.loads(raw)["error"]["message"]
    except Exception:
        return generic
    return message if isinstance(message, str) and message else generic
