"""The contract's Prometheus collectors, in a registry owned by one app."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (re-export)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Streaming chat: first tokens from a few milliseconds to a minute.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
)  # fmt: skip
NAMESPACE = "chatiq_gateway"
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        r = self.registry
        self.requests = Counter(
            "requests",
            "Finished requests.",
            ["route", "tenant", "status"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.active_streams = Gauge(
            "active_streams",
            "Streams being relayed now.",
            ["tenant"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.queue_depth = Gauge(
            "queue_depth", "Requests waiting for an upstream slot.", namespace=NAMESPACE, registry=r
        )
        self.rejected = Counter(
            "rejected",
            "Requests turned away, by reason.",
            ["reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds",
            "Request received to first content chunk written to the client.",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            namespace=NAMESPACE,
            registry=r,
        )
        self.upstream_first_byte = Histogram(
            "upstream_first_byte_seconds",
            "Upstream request sent to its first byte.",
            buckets=LATENCY_BUCKETS,
            namespace=NAMESPACE,
            registry=r,
        )
        self.stream_duration = Histogram(
            "stream_duration_seconds",
            "Whole stream, request to close.",
            ["tenant"],
            buckets=DURATION_BUCKETS,
            namespace=NAMESPACE,
            registry=r,
        )
        self.stream_events = Counter(
            "stream_events", "SSE events relayed.", ["tenant"], namespace=NAMESPACE, registry=r
        )
        self.upstream_errors = Counter(
            "upstream_errors",
            "Upstream failures, by kind.",
            ["kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.client_disconnects = Counter(
            "client_disconnects",
            "Clients that left before the end.",
            ["tenant"],
            namespace=NAMESPACE,
            registry=r,
        )

        self.upstream_retries = Counter(
            "upstream_retries", "Upstream retries, by reason.", ["reason"],
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip
        self.circuit_open = Gauge(
            "circuit_open", "1 while the upstream's circuit breaker is open.",
            namespace=NAMESPACE, registry=r,
        )  # fmt: skip

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
