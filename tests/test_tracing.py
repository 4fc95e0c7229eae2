"""Traces: the caller's trace continued through the gateway to ChatIQ, exported
over OTLP/HTTP to a real receiver (tests/otlp.py), with the GenAI conventions'
attributes, and no message, reply or key anywhere in what is sent."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc  # type: ignore[import-untyped]
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from openai import AsyncOpenAI
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import ResumeSettings, TracingSettings
from gateway.tracing import TRACING
from loadtest.emulator import TRANSCRIPTS, EmulatorSettings
from loadtest.harness import stop
from tests.conftest import is_json_line
from tests.helpers import (
    ACME_KEY,
    AUTH,
    CHATIQ_KEY,
    StackFactory,
    data_events,
    eventually,
    read_events,
    start_workers,
)
from tests.otlp import CLIENT, SERVER, Receiver, attributes
from tests.scripted import SSE_ANSWER, ScriptedFactory, ScriptedRequest

MESSAGE = "What is the refund policy for order 58213?"


def caller_headers() -> tuple[dict[str, str], str, str]:
    """An app's own span, as its OpenTelemetry SDK sends it on: the headers, its
    trace id and span id."""
    span = TracerProvider().get_tracer("the-app").start_span("checkout")
    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers, context=set_span_in_context(span))
    context = span.get_span_context()
    return headers, f"{context.trace_id:032x}", f"{context.span_id:016x}"


def traceparent_of(raw_request: bytes) -> str:
    found = re.search(rb"(?i)\r\ntraceparent: *([^\r]+)", raw_request)
    assert found is not None, raw_request[:300]
    return found.group(1).decode()


async def test_a_retried_chat_is_one_trace_from_the_caller_to_each_upstream_attempt(
    scripted: ScriptedFactory, otlp: Receiver
) -> None:
    def answer(request: ScriptedRequest) -> bytes:
        if request.number == 1:
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
        return SSE_ANSWER

    stack, upstream = await scripted(answer, max_retries=1)
    headers, trace_id, caller_span = caller_headers()
    r = await stack.chat({"message": MESSAGE}, headers=headers)
    assert r.status == 200
    assert data_events(await r.read())[-1] == "[DONE]"

    [server] = await otlp.wait_for(SERVER)
    assert server.trace_id == trace_id and server.parent_id == caller_span
    assert server.span.name == "POST /api/chatbot"
    attrs = server.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "chatiq"
    assert attrs["gen_ai.request.model"] == "demo"
    assert attrs["gen_ai.conversation.id"] == "c-1"  # named by the stream
    assert attrs["chatiq.tenant"] == "acme" and attrs["chatiq.frontend"] == "chatiq"
    assert attrs["http.request.method"] == "POST" and attrs["http.route"] == "/api/chatbot"
    assert attrs["http.response.status_code"] == 200
    assert attrs["chatiq.queue.wait_s"] >= 0
    assert "error.type" not in attrs
    assert [e.name for e in server.span.events] == ["gen_ai.first_token"]
    assert server.resource["service.name"] == "gateway-under-test"

    first, second = sorted(
        await otlp.wait_for(CLIENT, 2), key=lambda s: s.span.start_time_unix_nano
    )
    for attempt in (first, second):
        assert attempt.trace_id == trace_id and attempt.parent_id == server.span_id
        assert attempt.attributes["server.address"] == "127.0.0.1"
        assert attempt.attributes["server.port"] == upstream.port
        assert attempt.attributes["gen_ai.request.model"] == "demo"
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "http_5xx"
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["chatiq.retry.reason"] == "http_503"
    assert "error.type" not in second.attributes
    # Each attempt's request named its own span.
    sent = [traceparent_of(raw).rpartition("-") for raw in upstream.requests]
    assert [named for named, _, _ in sent] == [
        f"00-{trace_id}-{first.span_id}",
        f"00-{trace_id}-{second.span_id}",
    ]
    assert all(int(flags, 16) & 1 for _, _, flags in sent)  # sampled
    [line] = [e for e in stack.log_lines() if e.get("event") == "request"]
    assert line["trace_id"] == trace_id and line["span_id"] == server.span_id


async def test_nothing_said_or_answered_and_no_key_is_in_any_exported_byte(
    make_stack: StackFactory, otlp: Receiver
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=30))
    r = await stack.chat({"message": MESSAGE, "conversation_id": "conv-77"})
    reply = "".join(
        chunk["choices"][0]["delta"].get("content", "")
        for chunk in map(_json, data_events(await r.read())[:-1])
        if "choices" in chunk
    )
    assert len(reply) > 40
    [server] = await otlp.wait_for(SERVER)
    await otlp.wait_for(CLIENT)
    assert server.attributes["gen_ai.conversation.id"] == "conv-77"
    exported = b"".join(otlp.bodies)
    for secret in (MESSAGE, reply, reply[:20], ACME_KEY, CHATIQ_KEY, "refund policy"):
        assert secret.encode() not in exported


def _json(data: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(data)
    return parsed


async def test_a_stream_that_breaks_mid_way_ends_its_span_in_error(
    make_stack: StackFactory, otlp: Receiver
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0))
    r = await stack.chat({"message": "hi", "bot": "fault-drop-mid"})
    assert r.status == 200
    events = data_events(await r.read())
    assert events[-1] == "[DONE]" and "error" in events[-2]
    [server] = await otlp.wait_for(SERVER)
    assert server.span.status.code == server.span.status.STATUS_CODE_ERROR
    assert server.attributes["error.type"] == "UPSTREAM_ERROR"
    assert server.attributes["http.response.status_code"] == 200
    [attempt] = await otlp.wait_for(CLIENT)
    assert attempt.span.status.code == attempt.span.status.STATUS_CODE_ERROR


async def test_a_refused_request_names_its_error_without_failing_the_span(
    make_stack: StackFactory, otlp: Receiver
) -> None:
    stack = await make_stack()
    r = await stack.chat({"message": "hi", "bot": "no-such-bot"}, key="limited-key-09ab")
    assert r.status in (403, 404)
    [server] = await otlp.wait_for(SERVER)
    assert server.attributes["http.response.status_code"] == r.status
    assert server.attributes["error.type"] in ("UNKNOWN_BOT", "FORBIDDEN")
    assert server.span.status.code == server.span.status.STATUS_CODE_UNSET
    assert not otlp.of_kind(CLIENT)


async def test_untraced_no_span_is_made_and_no_traceparent_goes_upstream(
    scripted: ScriptedFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    stack, upstream = await scripted(SSE_ANSWER)
    headers, _, _ = caller_headers()
    r = await stack.chat(headers=headers)
    assert r.status == 200
    await r.read()
    assert b"traceparent" not in upstream.requests[0].lower()
    [line] = [e for e in stack.log_lines() if e.get("event") == "request"]
    assert "trace_id" not in line
    assert stack.gateway.app[TRACING].tracer is None


async def test_otel_sdk_disabled_wins_over_an_endpoint(
    scripted: ScriptedFactory, otlp: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    stack, upstream = await scripted(SSE_ANSWER)
    r = await stack.chat(headers=caller_headers()[0])
    await r.read()
    assert b"traceparent" not in upstream.requests[0].lower()
    assert stack.gateway.app[TRACING].tracer is None
    await asyncio.sleep(0.3)  # a batch would have gone within 50 ms
    assert otlp.bodies == []


async def test_exemplars_on_the_latency_histograms_name_the_traced_request(
    make_stack: StackFactory, otlp: Receiver
) -> None:
    stack = await make_stack()
    headers, trace_id, _ = caller_headers()
    r = await stack.chat(headers=headers)
    await r.read()
    [server] = await otlp.wait_for(SERVER)
    openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with stack.session.get(stack.gateway.make_url("/metrics"), headers=openmetrics) as m:
        assert m.content_type == "application/openmetrics-text"
        text = await m.text()
    for histogram in ("time_to_first_token_seconds", "stream_duration_seconds"):
        [line] = [
            ln for ln in text.splitlines()
            if ln.startswith(f"chatiq_gateway_{histogram}_bucket") and " # {" in ln
        ]  # fmt: skip
        assert f'trace_id="{trace_id}"' in line and f'span_id="{server.span_id}"' in line
    async with stack.session.get(stack.gateway.make_url("/metrics"), headers=AUTH) as m:
        assert m.content_type == "text/plain"  # Prometheus' text: no exemplars
        assert "trace_id" not in await m.text()


async def test_a_caller_that_sampled_its_trace_out_is_followed_but_not_exported(
    scripted: ScriptedFactory, otlp: Receiver
) -> None:
    """parentbased_always_on (the default): the caller's decision holds, and
    ChatIQ still hears of the trace (its flags say: not sampled)."""
    stack, upstream = await scripted(SSE_ANSWER)
    trace_id, caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = await stack.chat(headers={"traceparent": f"00-{trace_id}-{caller}-00"})
    assert r.status == 200
    await r.read()
    sent = traceparent_of(upstream.requests[0])
    assert sent.startswith(f"00-{trace_id}-") and sent.endswith("-00")
    [line] = [e for e in stack.log_lines() if e.get("event") == "request"]
    assert "trace_id" not in line  # nothing to find it by
    await asyncio.sleep(0.3)  # a batch would have gone within 50 ms
    assert otlp.spans == []


async def test_a_stale_connection_s_re_send_is_a_span_of_its_own(
    scripted: ScriptedFactory, otlp: Receiver
) -> None:
    def close_on_reuse(request: ScriptedRequest) -> bytes | None:
        return SSE_ANSWER if request.on_connection == 1 else None

    stack, upstream = await scripted(close_on_reuse)
    for _ in range(2):
        r = await stack.chat()
        assert r.status == 200
        await r.read()
    assert await stack.metric("chatiq_gateway_upstream_resends_total") == 1
    servers = await otlp.wait_for(SERVER, 2)
    second = max(servers, key=lambda s: s.span.start_time_unix_nano)
    attempts = [a for a in await otlp.wait_for(CLIENT, 3) if a.parent_id == second.span_id]
    stale, fresh = sorted(attempts, key=lambda s: s.span.start_time_unix_nano)
    assert stale.attributes["error.type"] == "stale_connection"
    assert fresh.attributes["chatiq.resend"] == "stale_connection"
    assert fresh.attributes["http.response.status_code"] == 200
    assert [traceparent_of(raw).split("-")[2] for raw in upstream.requests[1:]] == [
        stale.span_id,
        fresh.span_id,
    ]


async def test_a_resumed_stream_s_span_links_to_the_stream_s_first_request(
    make_stack: StackFactory, otlp: Receiver
) -> None:
    stack = await make_stack(
        EmulatorSettings(ttft_s=0, tokens_per_s=400, reply_tokens=33),
        resume=ResumeSettings(enabled=True, detach_grace_s=5.0, retain_s=30.0),
    )
    first = await stack.chat({"message": "tell me"}, headers={"X-Resumable": "1"})
    stream_id = first.headers["X-Stream-Id"]
    await read_events(first, limit=5)
    url = stack.gateway.make_url(f"/api/chatbot/streams/{stream_id}")
    async with stack.session.get(url, headers={**AUTH, "Last-Event-ID": "5"}) as rest:
        assert rest.status == 200
        await rest.read()
    servers = await otlp.wait_for(SERVER, 2)
    original = next(s for s in servers if s.attributes["http.route"] == "/api/chatbot")
    resumed = next(s for s in servers if s is not original)
    assert resumed.attributes["chatiq.stream.resumed"] is True
    [link] = resumed.span.links
    assert (link.trace_id.hex(), link.span_id.hex()) == (original.trace_id, original.span_id)


async def test_the_responses_api_and_mcp_tool_calls_carry_the_same_attributes(
    otlp: Receiver, make_stack: StackFactory
) -> None:
    stack = await make_stack()
    headers, trace_id, _ = caller_headers()
    async with AsyncOpenAI(
        base_url=str(stack.gateway.make_url("/v1")), api_key=ACME_KEY, max_retries=0
    ) as client:
        answer = await client.responses.create(model="demo", input="hi", extra_headers=headers)
    assert answer.output_text
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {ACME_KEY}", **headers})
    transport = streamable_http_client(str(stack.gateway.make_url("/mcp")), http_client=http)
    async with http, Client(transport, mode="legacy") as mcp:
        result = await mcp.call_tool("ask_demo", {"question": "hi"})
    assert not result.is_error

    def chats() -> dict[str, Any]:  # the chats' SERVER spans (not MCP's initialize, say)
        spans = otlp.of_kind(SERVER)
        return {
            s.attributes["chatiq.frontend"]: s
            for s in spans
            if "gen_ai.request.model" in s.attributes
        }

    # Exported in batches: the tool call's span may come after the handshake's.
    await eventually(lambda: set(chats()) == {"openai", "mcp"}, what=lambda: otlp.spans)
    by_frontend = chats()
    for span in by_frontend.values():
        assert span.trace_id == trace_id
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.provider.name"] == "chatiq"
        assert span.attributes["gen_ai.request.model"] == "demo"
        assert span.attributes["chatiq.tenant"] == "acme"
    assert by_frontend["openai"].attributes["http.route"] == "/v1/responses"
    assert by_frontend["mcp"].attributes["mcp.method.name"] == "tools/call"


async def test_the_tracing_key_turns_it_on_without_the_variables(
    make_stack: StackFactory, otlp: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")  # the exporter's default endpoint
    untraced = await make_stack()
    assert untraced.gateway.app[TRACING].tracer is None
    stack = await make_stack(tracing=TracingSettings(enabled=True))
    assert stack.gateway.app[TRACING].tracer is not None
    r = await stack.chat()
    await r.read()
    [line] = [e for e in stack.log_lines() if e.get("event") == "request"]
    assert len(line["trace_id"]) == 32
    [transcript] = stack.emulator.app[TRANSCRIPTS].values()
    assert transcript.headers["traceparent"].split("-")[1] == line["trace_id"]


async def test_off_the_sdk_is_not_even_imported() -> None:
    """No SDK on the hot path: a gateway built and serving without the
    variables has imported neither the trace SDK nor an exporter (redis-py
    imports the API for its own instrumentation, where it is installed)."""
    script = (
        "import asyncio, sys\n"
        "from aiohttp.test_utils import TestClient, TestServer\n"
        "from gateway.app import create_app\n"
        "from gateway.config import Settings\n"
        "async def main():\n"
        "    async with TestClient(TestServer(create_app(Settings()))) as c:\n"
        "        r = await c.post('/api/chatbot', json={'message': 'hi'})\n"
        "        assert r.status == 401, r.status\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.process
async def test_each_worker_of_a_gateway_process_exports_and_a_dead_collector_holds_up_no_stop(
    tmp_path: Path, make_stack: StackFactory, otlp: Receiver
) -> None:
    process, log, port = await start_workers(tmp_path, await make_stack())
    try:
        # The port answers once one worker is up; the second may start late
        # on a busy machine (and a SIGTERM before its start would skip it).
        await eventually(lambda: log.read_text().count('"tracing_on"') == 2, timeout_s=20)
        connector = aiohttp.TCPConnector(force_close=True)  # the kernel spreads them
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(20):
                headers, _, _ = caller_headers()
                async with session.post(
                    f"http://127.0.0.1:{port}/api/chatbot", json={"message": MESSAGE},
                    headers={"Authorization": f"Bearer {ACME_KEY}", **headers},
                ) as r:  # fmt: skip
                    assert data_events(await r.read())[-1] == "[DONE]"
        servers = await otlp.wait_for(SERVER, 20)
        assert {s.resource["service.name"] for s in servers} == {"gateway-under-test"}
        assert otlp.server is not None
        await otlp.server.close()  # the collector goes away, with spans still to send
        async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}/api/chatbot", json={"message": "hi"},
            headers={"Authorization": f"Bearer {ACME_KEY}"},
        ) as r:  # fmt: skip
            await r.read()
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        # The exporter would retry for its 10 s timeout; the stop waits 2 s for it.
        assert time.monotonic() - stopping < 8
        lines = log.read_text().splitlines()
        assert all(is_json_line(line) for line in lines)  # the SDK's reports too
        assert sum('"tracing_on"' in line for line in lines) == 2  # one a worker
    finally:
        stop(process)


async def test_the_standard_variables_set_the_export_headers_and_the_resource(
    make_stack: StackFactory, otlp: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-collector-token=c0ll3ct")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=staging")
    stack = await make_stack()
    r = await stack.chat()
    await r.read()
    [server] = await otlp.wait_for(SERVER)
    assert server.resource["deployment.environment"] == "staging"
    assert server.resource["service.name"] == "gateway-under-test"
    assert all(h["x-collector-token"] == "c0ll3ct" for h in otlp.headers)


async def test_a_protocol_it_cannot_speak_is_a_warning_and_the_gateway_runs_untraced(
    make_stack: StackFactory, otlp: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    stack = await make_stack()
    assert stack.gateway.app[TRACING].tracer is None
    [warning] = [e for e in stack.log_lines() if e.get("event") == "tracing_unavailable"]
    assert warning["protocol"] == "http/json" and "not supported" in warning["problem"]
    r = await stack.chat()
    assert r.status == 200
    await r.read()


async def test_over_grpc_the_same_spans_reach_a_grpc_collector(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc, with the SDK's gRPC exporter installed,
    to a real gRPC server speaking the collector's own service."""
    received: list[ExportTraceServiceRequest] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request: Any, context: Any) -> ExportTraceServiceResponse:
            received.append(request)
            return ExportTraceServiceResponse()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        for name, value in {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_SERVICE_NAME": "gateway-over-grpc", "OTEL_BSP_SCHEDULE_DELAY": "50",
        }.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        stack = await make_stack()
        async with await stack.chat({"message": MESSAGE}) as r:
            assert data_events(await r.read())[-1] == "[DONE]"

        def spans() -> list[Any]:
            return [s for m in received for rs in m.resource_spans for ss in rs.scope_spans
                    for s in ss.spans]  # fmt: skip

        await eventually(lambda: len(spans()) >= 2, what=lambda: received)
        server_span = next(s for s in spans() if s.kind == SERVER)
        assert attributes(server_span.attributes)["gen_ai.provider.name"] == "chatiq"
        resource = attributes(received[0].resource_spans[0].resource.attributes)
        assert resource["service.name"] == "gateway-over-grpc"
        assert MESSAGE.encode() not in b"".join(m.SerializeToString() for m in received)
    finally:
        await server.stop(0)
