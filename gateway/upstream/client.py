"""The ChatIQ client: a request out, and either an opened stream or a typed error.

A stream counts as open once its first whole event has arrived: until then
nothing has reached the client, so every failure may still be retried (with
backoff, within a budget) and reported as a plain HTTP status. The bot's
circuit breaker hears of each request's final outcome, once its retries are
done. No redirect is ever followed: it could carry the ChatIQ key to another
host.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from email.utils import parsedate_to_datetime
from functools import partial
from typing import TypeVar

from aiohttp import web

from gateway.chat import ChatRequest
from gateway.config import UpstreamSettings
from gateway.errors import (
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
from gateway.logs import Logger
from gateway.metrics import Metrics
from gateway.sse import Event
from gateway.tracing import Trace, gen_ai
from gateway.upstream.breaker import Breakers
from gateway.upstream.connection import Connection, Head, WireError, WireProtocolError, read_body
from gateway.upstream.deadline import Deadline
from gateway.upstream.events import EventSource
from gateway.upstream.pool import Pool
from gateway.upstream.retry import backoff_s, retry_reason

_ERROR_BODY_LIMIT = 64 * 1024


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


class Upstream:
    def __init__(
        self,
        settings: UpstreamSettings,
        pool: Pool,
        metrics: Metrics,
        breakers: Breakers,
        log: Logger,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._breakers = breakers
        self._log = log
        self._rng = random.Random()
        self.reconfigure(settings)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._pool.loop

    def reconfigure(self, settings: UpstreamSettings) -> None:
        """Timeouts, retries, limits and the key for requests from now on (a
        reload). The pool keeps its address, proxy and size until a restart."""
        self._settings = settings
        self._pool.reconfigure(settings)
        pool = self._pool
        fixed = [
            f"POST {pool.request_target} HTTP/1.1",
            f"Host: {pool.authority}",
            "User-Agent: chatiq-gateway",
        ]
        if pool.proxy_authorization:
            fixed.append(f"Proxy-Authorization: {pool.proxy_authorization}")
        if settings.api_key:
            fixed.append(f"Authorization: Bearer {settings.api_key}")
        self._fixed_head = "\r\n".join(fixed)

    async def open_stream(
        self, chat: ChatRequest, request_id: str, deadline: float, trace: Trace | None = None
    ) -> tuple[EventSource, list[Event]]:
        """The stream and its first events, retried while nothing reached the client.
        ``trace``: each attempt gets a CLIENT span (the stream's ends as its source closes)."""

        async def attempt(
            first_byte_by: float, retried_for: str | None
        ) -> tuple[EventSource, list[Event]]:
            conn = await self._send(chat, request_id, first_byte_by, deadline, trace, retried_for)
            source = EventSource(conn, self._settings.max_event_bytes, trace)
            try:
                return source, await source.read(min(first_byte_by, deadline))
            except TimeoutError:
                failure = _timeout_error(first_byte_by, deadline)
                if trace is not None:
                    trace.end_attempt(failure)
                source.close()
                raise failure from None
            except BaseException as e:
                if trace is not None:
                    trace.end_attempt(e)
                source.close()
                raise

        return await self._with_breaker(chat, attempt, request_id, deadline)

    async def complete(
        self, chat: ChatRequest, request_id: str, deadline: float, trace: Trace | None = None
    ) -> bytes:
        """A non-streaming answer's body, checked to be a JSON object."""

        async def attempt(first_byte_by: float, retried_for: str | None) -> bytes:
            conn = await self._send(chat, request_id, first_byte_by, deadline, trace, retried_for)
            try:
                body = await self._read_json(conn, deadline)
            except BaseException as e:
                if trace is not None:
                    trace.end_attempt(e)
                raise
            if trace is not None:
                trace.end_attempt(None)
            return body

        return await self._with_breaker(chat, attempt, request_id, deadline)

    async def _with_breaker(
        self,
        chat: ChatRequest,
        attempt: Callable[[float, str | None], Awaitable[T]],
        request_id: str,
        deadline: float,
    ) -> T:
        """The request with its retries, as one outcome for its bot's breaker."""
        permit = self._breakers.for_bot(chat.bot).permit()
        try:
            result = await self._with_retries(attempt, request_id, deadline)
        except UpstreamError as e:
            if e.counts_against_upstream:
                permit.failure()
            else:
                permit.release()
            raise
        except BaseException:  # the client left: no verdict on the upstream
            permit.release()
            raise
        permit.success()
        return result

    async def _with_retries(
        self,
        attempt: Callable[[float, str | None], Awaitable[T]],
        request_id: str,
        deadline: float,
    ) -> T:
        loop = self._pool.loop
        s = self._settings
        retry_by = min(deadline, loop.time() + s.retry_budget_s)
        tries = 0
        reason: str | None = None  # why this attempt is a retry
        while True:
            tries += 1
            try:
                result = await attempt(loop.time() + s.first_byte_timeout_s, reason)
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
            return result

    def _count_failure(self, error: UpstreamError, request_id: str, attempt: int) -> None:
        self._log.warning(
            "upstream_failed", request_id=request_id, attempt=attempt,
            error=type(error).__name__, kind=error.kind, status=error.status,
            upstream_status=getattr(error, "upstream_status", None), detail=error.detail,
        )  # fmt: skip
        if error.kind is not None:
            self._metrics.upstream_errors.labels(error.kind).inc()

    def _request_head(self, request_id: str, stream: bool, length: int) -> bytes:
        accept = "text/event-stream" if stream else "application/json"
        return (
            f"{self._fixed_head}\r\nContent-Type: application/json\r\nAccept: {accept}\r\n"
            f"X-Request-Id: {request_id}\r\nContent-Length: {length}\r\n\r\n"
        ).encode("latin-1")

    async def _send(
        self,
        chat: ChatRequest,
        request_id: str,
        first_byte_by: float,
        deadline: float,
        trace: Trace | None = None,
        retried_for: str | None = None,
    ) -> Connection:
        """POST the chat; return the connection of a 200 response of the expected
        type. A failure ends the attempt's span (if traced) with its error."""
        try:
            return await self._post(chat, request_id, first_byte_by, deadline, trace, retried_for)
        except BaseException as e:
            if trace is not None:
                trace.end_attempt(e)
            raise

    async def _post(
        self,
        chat: ChatRequest,
        request_id: str,
        first_byte_by: float,
        deadline: float,
        trace: Trace | None,
        retried_for: str | None,
    ) -> Connection:
        loop = self._pool.loop
        body = chat.upstream_json()
        request_head = self._request_head(request_id, chat.stream, len(body))
        sent = loop.time()
        try:
            async with Deadline(loop, min(first_byte_by, deadline)):
                if trace is None:
                    conn, head = await self._request(request_head, body)
                else:
                    conn, head = await self._request(
                        request_head, body, partial(self._traced_head, trace, chat, retried_for)
                    )
        except BaseException as e:
            if isinstance(e, TimeoutError):
                raise _timeout_error(first_byte_by, deadline) from None
            if isinstance(e, WireProtocolError):
                raise UpstreamProtocolError(f"the chat service sent {e}") from None
            if isinstance(e, WireError) and e.answered:
                raise UpstreamClosed("the chat service broke off its answer") from None
            if isinstance(e, OSError | WireError):
                failure = UpstreamConnectError("could not reach the chat service")
                failure.detail = str(e)  # for the log only: refused, TLS, the proxy's answer
                raise failure from None
            raise
        self._metrics.upstream_first_byte.observe(loop.time() - sent)
        if trace is not None:
            trace.attempt_answered(head.status)
        if head.status != 200:
            try:
                raise await _error_for(conn, head)
            finally:
                conn.release()
        expected = "text/event-stream" if chat.stream else "application/json"
        encoding = head.headers.get("content-encoding", "identity").strip().lower()
        if head.content_type != expected or encoding != "identity":
            conn.release()
            got = head.content_type if encoding == "identity" else f"{encoding}-encoded"
            raise UpstreamProtocolError(f"the chat service answered {got!r}, not {expected!r}")
        return conn

    def _traced_head(
        self, trace: Trace, chat: ChatRequest, retried_for: str | None, head: bytes, resend: bool
    ) -> bytes:
        """``head`` with the ``traceparent`` of a new CLIENT span for this send."""
        pool = self._pool
        line = trace.begin_attempt(
            {
                "http.request.method": "POST",
                "server.address": pool.host,
                "server.port": pool.port,
                "url.full": pool.url,
                **gen_ai(chat.bot),
            },
            retried_for,
            resend,
        )
        return head[:-2] + line + b"\r\n"  # before the blank line that ends the head

    async def _request(
        self, head: bytes, body: bytes, traced: Callable[[bytes, bool], bytes] | None = None
    ) -> tuple[Connection, Head]:
        """Send on a pooled connection; its response head. A reused connection
        that fails before any answer is re-sent once on a new one: the server
        closed it while idle, so it never acted on the request (Go's
        ``shouldRetryRequest``, urllib3). Not a retry: no backoff, no breaker.
        ``traced``: each send's head, with the ``traceparent`` of its own span."""
        conn = await self._connection(fresh=False)
        resend = False
        while True:
            try:
                sent = head if traced is None else traced(head, resend)
                return conn, await conn.request(sent, body)
            except BaseException as e:
                conn.release()  # a failed connection is closed, not pooled
                if not (isinstance(e, WireError) and not e.answered and conn.reused):
                    raise
            self._metrics.upstream_resends.inc()
            resend = True
            conn = await self._connection(fresh=True)

    async def _connection(self, *, fresh: bool) -> Connection:
        try:
            return await self._pool.acquire(self._settings.connect_timeout_s, fresh=fresh)
        except TimeoutError:
            raise ConnectTimeout("timed out connecting to the chat service") from None

    async def _read_json(self, conn: Connection, deadline: float) -> bytes:
        limit = self._settings.max_json_bytes
        try:
            async with asyncio.timeout_at(deadline):
                body = await read_body(conn, limit)
        except TimeoutError:
            raise TotalTimeout("the chat service did not finish its answer in time") from None
        except WireError:
            raise UpstreamClosed("the chat service broke off its answer") from None
        finally:
            conn.release()
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


async def _error_for(conn: Connection, head: Head) -> UpstreamError:
    retry_after = parse_retry_after(head.headers.get("retry-after"))
    if head.status == 429:
        return UpstreamRateLimited(
            "the chat service is rate limiting requests", retry_after=retry_after
        )
    if head.status == 400:
        return UpstreamRejected(await _upstream_message(conn))
    return UpstreamHTTPError(head.status, retry_after=retry_after)


async def _upstream_message(conn: Connection) -> str:
    """The message of a ChatIQ error body, or a generic one."""
    generic = "the chat service rejected the request"
    try:
        async with asyncio.timeout(2):
            raw = await read_body(conn, _ERROR_BODY_LIMIT)
        message = json.loads(raw[:_ERROR_BODY_LIMIT])["error"]["message"]
    except Exception:
        return generic
    return message if isinstance(message, str) and message else generic


UPSTREAM = web.AppKey("upstream", Upstream)  # on the app
