"""The contract's Prometheus collectors, in a registry owned by one app.

Labels stay bounded: tenants come from the configuration, and a bot is its
own label only when the configuration names it (a tenant's bot list or the
default bot); any other bot a client asks for is counted as ``other``.

With several worker processes (``--workers``), prometheus-client's
multiprocess mode keeps each worker's values in files under
``PROMETHEUS_MULTIPROC_DIR``, and whichever worker answers ``/metrics``
sums them: counters and histograms add up, live-stream and queue gauges are
summed over live workers, a circuit's state is the highest any worker has. Process metrics
(RSS, CPU) are then left to the host's exporters: they would describe only
the worker that happened to answer.
"""

from __future__ import annotations

import os
import platform
import time
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import aiohttp
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.samples import Exemplar

from gateway import build

NAMESPACE = "chatiq_gateway"
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set by the supervisor of several workers
OTHER_BOT = "other"
# Streaming chat: first tokens from a few milliseconds to a minute.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip


DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# The gateway's own work: microseconds to milliseconds.
OVERHEAD_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip


def pin_worker_pid() -> None:
    """In a worker (multiprocess mode), before any metric exists: prometheus-
    client asks ``os.getpid()`` on every update, to notice a fork and start
    its own files. Workers are started, not forked, so their pid is read once:
    each update cost a getpid system call (a dozen a stream)."""
    if os.environ.get(MULTIPROCESS_DIR):
        pid = os.getpid()
        values.ValueClass = values.MultiProcessValue(lambda: pid)  # type: ignore[no-untyped-call]


# The label values known before any request, exported at 0 from the start so
# that rate() and increase() see their first increment.
REJECT_REASONS = (
    "overload", "queue_timeout", "rate_limit", "tenant_concurrency", "draining",
    "header_timeout", "body_timeout", "connections", "quota_unavailable",
    "user_rate_limit", "user_concurrency",
)  # fmt: skip
ERROR_KINDS = ("connect", "first_byte_timeout", "idle_timeout", "http_5xx", "http_429", "protocol")
RETRY_REASONS = ("connect", "first_byte_timeout", "http_429", "http_502", "http_503", "http_504")
DOCUMENTED_STATUSES = (200, 400, 401, 403, 404, 408, 413, 415, 429, 502, 503, 504)


def version() -> str:
    try:
        return metadata.version("chatiq-gateway")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown"


class _Null:
    """Stands in for every collector when metrics are off (the benchmark's baseline)."""

    def labels(self, *args: object, **kwargs: object) -> _Null:
        return self

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class HotCounter:
    """A counter's or gauge's label child as a stream moves it: its value's own
    ``inc``, without the checks prometheus-client makes on every call (that
    the metric has all its labels, that a counter's amount is not negative:
    both hold here by construction). Two Python calls rather than five
    (~4.4k instructions to ~3.5k, most of it the value's lock); the value (a
    worker's file in multiprocess mode) and its exposition are the library's."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def inc(self, amount: float = 1) -> None:
        self._value.inc(amount)

    def dec(self, amount: float = 1) -> None:
        self._value.inc(-amount)


class LoopCounter(HotCounter):
    """A ``HotCounter`` over one process's value (prometheus-client's
    ``MutexValue``, a float and a lock), added to in place: the gateway moves
    and reads its metrics on its event loop's thread only (it starts no
    thread), so the lock guards nothing here. ~1k instructions."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        self._value._value += amount

    def dec(self, amount: float = 1) -> None:
        self._value._value -= amount


class HotHistogram:
    """A histogram's label child as a stream observes it: its sum and the one
    bucket the amount falls in (a bisection, where the library walks the
    bounds in Python after three calls of checks). ~10.3k instructions an
    observation to ~7k; the same values, exposed by the library."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, total: Any, buckets: list[Any], bounds: list[float]) -> None:
        self._sum = total
        self._buckets = buckets
        self._bounds = bounds

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        # The first bucket whose bound is >= amount, as the library's ``amount <= bound``.
        self._buckets[bisect_left(self._bounds, amount)].inc(1)

    def observe_exemplar(self, amount: float, exemplar: dict[str, str]) -> None:
        """Observe, and keep ``exemplar`` on the amount's bucket (multiprocess
        values keep none: the library does not store them across workers)."""
        self.observe(amount)
        bucket = self._buckets[bisect_left(self._bounds, amount)]
        bucket.set_exemplar(Exemplar(exemplar, amount, time.time()))


class LoopHistogram(HotHistogram):
    """A ``HotHistogram`` over one process's values, added to in place (as
    ``LoopCounter``): ~2.2k instructions an observation."""

    __slots__ = ()

    def observe(self, amount: float) -> None:
        self._sum._value += amount
        self._buckets[bisect_left(self._bounds, amount)]._value += 1


def observe(histogram: Any, amount: float, exemplar: dict[str, str] | None) -> None:
    """An observation with its exemplar (a traced request's ids), if it has one."""
    if exemplar is None:
        histogram.observe(amount)
    elif isinstance(histogram, HotHistogram):
        histogram.observe_exemplar(amount, exemplar)
    else:  # the library's own child, or metrics off
        histogram.observe(amount, exemplar)


def _in_process(value: Any) -> bool:
    """A single process's value: a float the loop's thread may add to in place."""
    return type(value) is values.MutexValue and type(getattr(value, "_value", None)) is float


def hot(child: Any) -> Any:
    """A label child for the per-stream path: a ``LoopCounter`` or
    ``LoopHistogram`` over a single process's values, a ``HotCounter`` or
    ``HotHistogram`` over a worker's; the child itself when metrics are off,
    or when the library's internals are not the ones these expect."""
    if isinstance(child, Histogram):
        total, buckets, bounds = (
            getattr(child, name, None) for name in ("_sum", "_buckets", "_upper_bounds")
        )
        if total is not None and buckets is not None and bounds is not None:
            local = all(_in_process(value) for value in (total, *buckets))
            return (LoopHistogram if local else HotHistogram)(total, buckets, bounds)
    elif isinstance(child, (Counter, Gauge)):
        value = getattr(child, "_value", None)
        if value is not None:
            return (LoopCounter if _in_process(value) else HotCounter)(value)
    return child


@dataclass(frozen=True, slots=True)
class StreamSeries:
    """The series a stream moves, for one tenant and bot (``hot`` children)."""

    time_to_first_token: Any
    duration: Any
    events: Any
    active: Any


class Metrics:
    def __init__(self, bots: Iterable[str] = (), *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        self.registry = CollectorRegistry(auto_describe=True)
        self._bots = frozenset(bots)
        self._chat_routes: list[tuple[str, str]] = []
        # Label children looked up once (a lookup is a lock and a tuple each
        # time), keyed by their label values: bounded as the labels are.
        self._streams: dict[tuple[str, str], StreamSeries] = {}
        self._requests: dict[tuple[str, str, str, int, str], Any] = {}
        r = self.registry
        ns = NAMESPACE

        def make(cls: type, name: str, doc: str, labels: Iterable[str] = (), **kw: Any) -> Any:
            if not enabled:
                return _Null()
            if cls is Gauge and self.multiprocess:
                kw.setdefault("multiprocess_mode", "livesum")
            elif cls is Gauge:
                kw.pop("multiprocess_mode", None)
            return cls(name, doc, list(labels), namespace=ns, registry=r, **kw)

        self.requests = make(
            Counter,
            "requests",
            "Finished requests (frontend: the route's wire format; - for other routes; "
            "outcome: ok, rejected, failed (before or during its stream), client_left, "
            "handed_over).",
            ["route", "frontend", "tenant", "status", "outcome"],
        )
        self.active_streams = make(
            Gauge, "active_streams", "Streams being relayed now.", ["tenant", "bot"]
        )
        self.queue_depth = make(Gauge, "queue_depth", "Requests waiting for an upstream slot.")
        self.rejected = make(Counter, "rejected", "Requests turned away, by reason.", ["reason"])
        self.time_to_first_token = make(
            Histogram,
            "time_to_first_token_seconds",
            "Request received to first content chunk written to the client.",
            ["tenant", "bot"],
            buckets=LATENCY_BUCKETS,
        )
        self.upstream_first_byte = hot(  # observed once a stream, as the ones below
            make(
                Histogram,
                "upstream_first_byte_seconds",
                "Upstream request sent to its first byte (its response headers).",
                buckets=LATENCY_BUCKETS,
            )
        )
        self.stream_duration = make(
            Histogram,
            "stream_duration_seconds",
            "Whole stream, request to close.",
            ["tenant", "bot"],
            buckets=DURATION_BUCKETS,
        )
        self.stream_events = make(
            Counter, "stream_events", "SSE events relayed.", ["tenant", "bot"]
        )
        self.tool_calls = make(
            Counter, "tool_calls",
            "MCP tool calls (one per tools/call), by outcome (as requests_total's: a "
            "call answered with an error result is rejected or failed).",
            ["tenant", "bot", "outcome"],
        )  # fmt: skip
        self.tool_call_duration = make(
            Histogram, "tool_call_duration_seconds", "MCP tool calls, request to result.",
            ["tenant", "bot"], buckets=DURATION_BUCKETS,
        )  # fmt: skip
        self.upstream_errors = make(
            Counter, "upstream_errors", "Upstream failures, by kind.", ["kind"]
        )
        self.upstream_retries = make(
            Counter, "upstream_retries", "Upstream retries, by reason.", ["reason"]
        )
        self.client_disconnects = make(
            Counter, "client_disconnects", "Clients that left before the end.", ["tenant"]
        )
        self.slow_client_pauses = make(
            Counter, "slow_client_pauses",
            "Times a stream's upstream was paused because its client read too slowly.",
            ["tenant"],
        )  # fmt: skip
        self.circuit_state = make(
            Gauge, "circuit_state", "Each bot's circuit: 0 closed, 1 open, 2 half-open.",
            ["bot"], multiprocess_mode="livemax",
        )  # fmt: skip
        self.circuit_transitions = make(
            Counter, "circuit_transitions", "Circuit breaker transitions, by bot and new state.",
            ["bot", "to"],
        )  # fmt: skip
        self.upstream_pool_wait = hot(
            make(
                Histogram,
                "upstream_pool_wait_seconds",
                "Time a request waited for an upstream connection slot (upstream.max_connections).",
                buckets=OVERHEAD_BUCKETS + LATENCY_BUCKETS[6:],
            )
        )
        self.upstream_resends = make(
            Counter,
            "upstream_resends",
            "Requests re-sent at once on a new connection after a reused one was "
            "found closed before any answer (not retries).",
        )
        self.quota_backend_up = make(
            Gauge, "quota_backend_up",
            "1 while the shared quota store (Redis) answers; 0 while quotas fall back.",
            multiprocess_mode="livemin",
        )  # fmt: skip
        self.redis_seconds = make(
            Histogram, "redis_seconds", "Redis round trips, by operation.", ["op"],
            buckets=OVERHEAD_BUCKETS,
        )  # fmt: skip
        self.redis_errors = make(
            Counter, "redis_errors", "Redis failures, by kind (timeout, connection, error).",
            ["kind"],
        )  # fmt: skip
        self.quota_fallbacks = make(
            Counter, "quota_fallbacks",
            "Quota checks made without Redis while it was down, by on_error (local, reject).",
            ["mode"],
        )  # fmt: skip
        self.config_reloads = make(
            Counter, "config_reloads", "Configuration reloads (SIGHUP), by result.", ["result"]
        )
        self.streams_detached = make(
            Counter, "streams_detached",
            "Resumable streams whose last client left before the end (the upstream read on).",
            ["tenant"],
        )  # fmt: skip
        self.streams_resumed = make(
            Counter, "streams_resumed", "Resumable streams picked up again (resume requests).",
            ["tenant"],
        )  # fmt: skip
        self.streams_expired = make(
            Counter, "streams_expired",
            "Detached streams nobody resumed within resume.detach_grace_s (upstream cancelled).",
            ["tenant"],
        )  # fmt: skip
        self.events_replayed = make(
            Counter, "events_replayed",
            "Events sent by resume requests (the missed ones, then the live ones).", ["tenant"],
        )  # fmt: skip
        self.overhead = make(
            Histogram,
            "overhead_seconds",
            "Time the gateway itself spends: before the upstream request is sent "
            "(phase=pre_upstream, queue wait excluded), and from a stream's first "
            "events' arrival to their hand-over to the client's socket (phase=relay).",
            ["phase"],
            buckets=OVERHEAD_BUCKETS,
        )
        self.pre_upstream = hot(self.overhead.labels("pre_upstream"))
        self.relay_overhead = hot(self.overhead.labels("relay"))
        runtime = {
            "version": version(),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "compiled": str(build() == "compiled").lower(),
        }
        if enabled and self.multiprocess:  # Info has no multiprocess mode: the same series
            make(
                Gauge, "build_info", "The gateway's version and runtime.", list(runtime),
                multiprocess_mode="livemax",
            ).labels(**runtime).set(1)  # fmt: skip
        elif enabled:
            Info("build", "The gateway's version and runtime.", namespace=ns, registry=r).info(
                runtime
            )
            ProcessCollector(registry=r)  # process_resident_memory_bytes, _cpu_seconds, fds
            PlatformCollector(registry=r)

    def export_known(
        self, tenants: Iterable[str], chat_routes: Iterable[tuple[str, str]] | None = None
    ) -> None:
        """Every series whose labels are known in advance, at 0: reasons, kinds,
        and per tenant its bots and, per frontend route (the ones given before,
        if None), the documented statuses."""
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for kind in ERROR_KINDS:
            self.upstream_errors.labels(kind)
        for reason in RETRY_REASONS:
            self.upstream_retries.labels(reason)
        for kind in ("timeout", "connection", "error"):
            self.redis_errors.labels(kind)
        for mode in ("local", "reject"):
            self.quota_fallbacks.labels(mode)
        for phase in ("pre_upstream", "relay"):
            self.overhead.labels(phase)
        for op in ("check", "renew", "release", "probe"):
            self.redis_seconds.labels(op)
        if chat_routes is not None:
            self._chat_routes = list(chat_routes)
        routes = self._chat_routes
        bots = sorted(self._bots | {OTHER_BOT})
        for tenant in tenants:
            self.client_disconnects.labels(tenant)
            self.slow_client_pauses.labels(tenant)
            for resume_counter in (
                self.streams_detached, self.streams_resumed, self.streams_expired,
                self.events_replayed,
            ):  # fmt: skip
                resume_counter.labels(tenant)
            for bot in bots:
                self.stream_events.labels(tenant, bot)
                self.time_to_first_token.labels(tenant, bot)
                self.stream_duration.labels(tenant, bot)
                if not self.multiprocess:  # a livesum gauge would pin a dead worker's file
                    self.active_streams.labels(tenant, bot).set(0)
                if any(frontend == "mcp" for _, frontend in routes):
                    self.tool_call_duration.labels(tenant, bot)
                    for outcome in ("ok", "rejected", "failed", "client_left"):
                        self.tool_calls.labels(tenant, bot, outcome)
            for route, frontend in routes:
                for status in DOCUMENTED_STATUSES:
                    outcome = "ok" if status < 400 else "rejected" if status < 500 else "failed"
                    self.requests.labels(route, frontend, tenant, str(status), outcome)

    def stream_series(self, tenant: str, bot_label: str) -> StreamSeries:
        """A tenant's and bot's stream series."""
        found = self._streams.get((tenant, bot_label))
        if found is None:
            found = self._streams[(tenant, bot_label)] = StreamSeries(
                hot(self.time_to_first_token.labels(tenant, bot_label)),
                hot(self.stream_duration.labels(tenant, bot_label)),
                hot(self.stream_events.labels(tenant, bot_label)),
                hot(self.active_streams.labels(tenant, bot_label)),
            )
        return found

    def request_counter(
        self, route: str, frontend: str, tenant: str, status: int, outcome: str
    ) -> Any:
        key = (route, frontend, tenant, status, outcome)
        found = self._requests.get(key)
        if found is None:
            found = self._requests[key] = hot(
                self.requests.labels(route, frontend, tenant, str(status), outcome)
            )
        return found

    def name_bots(self, bots: Iterable[str]) -> None:
        """The bots that get a label of their own (a reload may name more)."""
        self._bots = frozenset(bots)

    def bot_label(self, bot: str | None) -> str:
        """A bot's label value: its name when the configuration names it."""
        if bot is None:
            return "-"
        return bot if bot in self._bots else OTHER_BOT

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics and their content type: OpenMetrics (with exemplars) when
        ``accept`` (the scraper's Accept header) asks for it, else Prometheus' text."""
        encode, content_type = choose_encoder(accept)
        if self.multiprocess:
            everyone = CollectorRegistry()
            multiprocess.MultiProcessCollector(everyone)  # type: ignore[no-untyped-call]
            return encode(everyone), content_type
        return encode(self.registry), content_type
