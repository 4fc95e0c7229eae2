"""The ChatIQ client: one request out, a checked response back, or a typed error.

Connect and first-byte timeouts live here; the relay owns the idle and total
timeouts once events flow. No redirect is ever followed (it could carry the
ChatIQ key to another host).
"""

from __future__ import annotations

import asyncio
import json
import time
from email.utils import parsedate_to_datetime

import aiohttp

from .chat import ChatRequest
from .config import UpstreamSettings
from .errors import (
    ConnectTimeout,
    FirstByteTimeout,
    TotalTimeout,
    UpstreamConnectError,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamRejected,
)
from .metrics import Metrics

_ERROR_BODY_LIMIT = 64 * 1024


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
        self, settings: UpstreamSettings, session: aiohttp.ClientSession, metrics: Metrics
    ) -> None:
        self._settings = settings
        self._session = session
        self._metrics = metrics
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=None
        )

    async def send(
        self, chat: ChatRequest, request_id: str, deadline: float
    ) -> aiohttp.ClientResponse:
        """POST the chat; return a 200 response of the expected type, or raise.

        ``deadline`` (loop time) is the end of the whole request's budget.
        """
        loop = asyncio.get_running_loop()
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if chat.stream else "application/json",
            "X-Request-Id": request_id,
        }
        if self._settings.api_key:
            headers["Authorization"] = f"Bearer {self._settings.api_key}"
        sent = loop.time()
        first_byte_by = sent + self._settings.first_byte_timeout_s
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
            if deadline < first_byte_by:
                raise TotalTimeout("the request ran out of time") from None
            raise FirstByteTimeout("the chat service did not answer in time") from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamConnectError("could not reach the chat service") from None
        self._metrics.upstream_first_byte.observe(loop.time() - sent)
        if response.status != 200:
            try:
                raise await self._error_for(response)
            finally:
                response.close()
        expected = "text/event-stream" if chat.stream else "application/json"
        if response.content_type != expected:
            response.close()
            raise UpstreamProtocolError(
                f"the chat service answered {response.content_type!r}, not {expected!r}"
            )
        return response

    async def read_json(self, response: aiohttp.ClientResponse, deadline: float) -> bytes:
        """The body of a non-streaming answer, checked to be a JSON object."""
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
            raise UpstreamConnectError("the chat service closed the connection") from None
        finally:
            response.release()
        if len(body) > limit:
            raise UpstreamProtocolError(f"the chat service's answer is over {limit} bytes")
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise UpstreamProtocolError("the chat service's answer is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise UpstreamProtocolError("the chat service's answer is not a JSON object")
        return body

    async def _error_for(self, response: aiohttp.ClientResponse) -> UpstreamError:
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
