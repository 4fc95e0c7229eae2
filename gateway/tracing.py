"""Traces: an OpenTelemetry SERVER span per frontend request, continuing the
caller's W3C ``traceparent``, and a CLIENT span per upstream attempt, whose
own ``traceparent`` goes to ChatIQ with it.

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
is set, or ``[tracing] enabled = true``; never with ``OTEL_SDK_DISABLED=true``.
Everything else is the SDK's own reading of the standard ``OTEL_*`` variables
(the sampler, the resource, the exporter's headers and timeouts, the batch
processor). Off, the SDK is not even imported: a request's only cost is one
``is None`` test. Spans carry ids, names, counts and times: never a message,
a reply, a key or a token.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.config import TracingSettings
from gateway.logs import Logger

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
SERVICE_NAME = "chatiq-gateway"
PROVIDER = "chatiq"  # gen_ai.provider.name
BATCH_SIZE = 64  # spans an export request, unless OTEL_BSP_MAX_EXPORT_BATCH_SIZE says


def gen_ai(bot: str) -> dict[str, str]:
    """The GenAI conventions' attributes of a chat with ``bot``: the SERVER
    span's and each upstream attempt's."""
    return {"gen_ai.operation.name": "chat", "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": bot}  # fmt: skip


def wanted(settings: TracingSettings, environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return settings.enabled or any(environ.get(name) for name in ENDPOINT_VARIABLES)


def _protocol(environ: Mapping[str, str]) -> str:
    chosen = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    return chosen.strip().lower()


def _exporter(protocol: str) -> Any:
    """The OTLP exporter for ``protocol``; it reads its endpoint, headers,
    timeout, compression and certificates from the environment itself."""
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    raise ValueError(f"the OTLP protocol {protocol!r} is not supported (http/protobuf or grpc)")


class SdkReports(logging.Handler):
    """The SDK's own warnings (an export that failed, a collector that is down)
    as the gateway's log lines, not plain text on stderr."""

    def __init__(self, log: Logger) -> None:
        super().__init__(logging.WARNING)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        self._log.warning("tracing_problem", message=record.getMessage()[:300])


class Tracing:
    """The app's tracer (``TRACING``): none until ``start``, nor while tracing is off."""

    __slots__ = ("_error", "_kinds", "_propagator", "_provider", "_reports", "tracer")

    def __init__(self) -> None:
        self.tracer: Tracer | None = None
        self._provider: Any = None
        self._reports: SdkReports | None = None

    def start(
        self, settings: TracingSettings, version: str, log: Logger, environ: Mapping[str, str]
    ) -> None:
        """Start the SDK when tracing is asked for. A problem (its packages not
        installed, an unknown protocol) is logged, and the gateway runs untraced."""
        if not wanted(settings, environ):
            return
        protocol = _protocol(environ)
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace import SpanKind, Status, StatusCode
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            exporter = _exporter(protocol)
        except (ImportError, ValueError) as e:
            log.warning("tracing_unavailable", protocol=protocol, problem=str(e),
                        hint="pip install 'chatiq-gateway[tracing]'")  # fmt: skip
            return
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win; else the gateway's own name.
        resource = Resource.create({"service.version": version})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        # The SDK reports through the logging module's "opentelemetry" logger.
        self._reports = SdkReports(log)
        sdk_logger = logging.getLogger("opentelemetry")
        sdk_logger.addHandler(self._reports)
        sdk_logger.propagate = False
        # The sampler from OTEL_TRACES_SAMPLER. No shutdown at exit: ``shutdown``
        # bounds its wait, where the SDK's own atexit one would wait out the
        # exporter's retries of a collector that is down (10 s).
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        # OTEL_BSP_* as set; a batch of 64 by default (the SDK's is 512): its
        # encoding holds the GIL, and the event loop waits for it after each
        # system call, so shorter batches keep a stream's latency steady.
        batch = None if environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") else BATCH_SIZE
        provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=batch))
        self._provider = provider
        self._propagator = TraceContextTextMapPropagator()
        self._kinds = (SpanKind.SERVER, SpanKind.CLIENT)
        self._error = Status(StatusCode.ERROR)
        self.tracer = provider.get_tracer(SERVICE_NAME, version)
        sampler = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        service = resource.attributes.get("service.name")
        log.info("tracing_on", protocol=protocol, sampler=sampler, service=service)

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Send what is batched and stop, waiting ``timeout_s`` at most: the
        exporter retries a collector that is down for seconds, and a drain
        does not wait for it (its thread is a daemon, gone with the process)."""
        provider, self._provider, self.tracer = self._provider, None, None
        if provider is None:
            return

        def stop() -> None:
            provider.force_flush(timeout_millis=round(timeout_s * 1000))
            provider.shutdown()

        stopping = threading.Thread(target=stop, name="tracing-shutdown", daemon=True)
        stopping.start()
        stopping.join(timeout_s)
        if self._reports is not None and not stopping.is_alive():  # else it may report yet
            sdk_logger = logging.getLogger("opentelemetry")
            sdk_logger.removeHandler(self._reports)
            if not sdk_logger.handlers:
                sdk_logger.propagate = True
            self._reports = None

    def begin(self, request: web.Request, route: str, request_id: str) -> Trace | None:
        """A request's SERVER span, a child of the caller's ``traceparent`` if any."""
        tracer = self.tracer
        if tracer is None:
            return None
        headers = request.headers
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "http.route": route,
            "url.path": request.path,
            "url.scheme": request.scheme,
            "chatiq.request_id": request_id,
        }
        host = request.host.rpartition(":")
        if host[0] and host[2].isdigit():
            attributes["server.address"], attributes["server.port"] = host[0], int(host[2])
        elif request.host:
            attributes["server.address"] = request.host
        if request.remote:
            attributes["client.address"] = request.remote
        agent = headers.get("User-Agent")
        if agent:
            attributes["user_agent.original"] = agent[:256]
        span = tracer.start_span(
            f"{request.method} {route}", context=parent, kind=self._kinds[0], attributes=attributes
        )
        return Trace(self, span)


class Trace:
    """One request's spans: its SERVER span, and the upstream attempt open now."""

    __slots__ = ("_attempts", "_tracing", "attempt", "span")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span
        self.attempt: Span | None = None
        self._attempts = 0

    def ids(self) -> tuple[str, str] | None:
        """The SERVER span's trace and span ids in hex, when it is sampled."""
        context = self.span.get_span_context()
        if not context.trace_flags.sampled:
            return None
        return f"{context.trace_id:032x}", f"{context.span_id:016x}"

    def exemplar(self) -> dict[str, str] | None:
        """A histogram exemplar's labels: the trace to jump to from a latency panel."""
        ids = self.ids()
        return None if ids is None else {"trace_id": ids[0], "span_id": ids[1]}

    def traceparent(self) -> str:
        """The SERVER span's W3C ``traceparent`` (to link a resumed stream to it)."""
        return _traceparent(self.span)

    def link(self, traceparent: str) -> None:
        """Link this span to another request's (a resumed stream's original one)."""
        carrier = {"traceparent": traceparent}
        from opentelemetry.trace import get_current_span

        context = get_current_span(self._tracing._propagator.extract(carrier)).get_span_context()
        if context.is_valid:
            self.span.add_link(context, {"chatiq.link": "resumed_stream"})

    def describe(self, attributes: Mapping[str, Any]) -> None:
        if self.span.is_recording():
            self.span.set_attributes(attributes)

    def first_token(self, ttft_s: float) -> None:
        if self.span.is_recording():
            self.span.add_event("gen_ai.first_token", {"chatiq.ttft_s": ttft_s})

    def end(
        self,
        status: int,
        attributes: Callable[[], Mapping[str, Any]],
        error_type: str | None,
        failed: bool,
    ) -> None:
        """End the SERVER span, with ``attributes()`` (made only for a sampled
        span). ``failed``: a server-side failure (ERROR status), before or
        during the stream; a refused request only names its ``error.type``."""
        span = self.span
        if span.is_recording():
            span.set_attributes(attributes())
            if status:
                span.set_attribute("http.response.status_code", status)
            if error_type is not None:
                span.set_attribute("error.type", error_type)
            if failed:
                span.set_status(self._tracing._error)
        span.end()

    # the upstream attempts

    def begin_attempt(
        self, attributes: Mapping[str, Any], retried_for: str | None, resend: bool
    ) -> bytes:
        """A CLIENT span for one upstream attempt; the ``traceparent`` header
        line (with ``tracestate``, if any) that names it, for its request head.
        Under a request that is not sampled, no span: the line names the
        request's own (unrecorded) span, and the trace goes on unsampled."""
        tracing = self._tracing
        assert tracing.tracer is not None
        # A send still open here met a connection the server had closed while idle.
        self.end_attempt(None, error_type="stale_connection" if resend else None)
        if not self.span.is_recording():
            return _traceparent_lines(self.span)
        from opentelemetry.trace import set_span_in_context

        number = self._attempts
        self._attempts += 1
        span = tracing.tracer.start_span(
            f"chat {attributes.get('gen_ai.request.model', '')}".rstrip(),
            context=set_span_in_context(self.span),
            kind=tracing._kinds[1],
            attributes=attributes,
        )
        if span.is_recording():
            if number:
                span.set_attribute("http.request.resend_count", number)
            if retried_for is not None:
                span.set_attribute("chatiq.retry.reason", retried_for)
            if resend:
                span.set_attribute("chatiq.resend", "stale_connection")
        self.attempt = span
        return _traceparent_lines(span)

    def attempt_answered(self, status: int) -> None:
        if self.attempt is not None and self.attempt.is_recording():
            self.attempt.set_attribute("http.response.status_code", status)

    def end_attempt(self, error: BaseException | None, *, error_type: str | None = None) -> None:
        """End the open attempt (if any), failed with ``error`` if given."""
        span, self.attempt = self.attempt, None
        if span is None:
            return
        if (error is not None or error_type is not None) and span.is_recording():
            span.set_attribute("error.type", error_type or _error_type(error))
            span.set_status(self._tracing._error)
        span.end()


def _traceparent_lines(span: Span) -> bytes:
    """The request head's lines that carry ``span``'s context on."""
    line = f"traceparent: {_traceparent(span)}\r\n"
    state = span.get_span_context().trace_state
    if state:
        line += f"tracestate: {state.to_header()}\r\n"
    return line.encode("latin-1")


def _traceparent(span: Span) -> str:
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def _error_type(error: BaseException | None) -> str:
    code = getattr(error, "code", None)
    kind = getattr(error, "kind", None)
    if isinstance(kind, str):
        return kind
    return code if isinstance(code, str) else type(error).__name__


TRACING = web.AppKey("tracing", Tracing)
