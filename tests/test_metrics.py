"""/metrics after scripted traffic: exact values for every metric of the contract."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from gateway import build as gateway_build
from gateway.metrics import (
    DOCUMENTED_STATUSES,
    ERROR_KINDS,
    REJECT_REASONS,
    RETRY_REASONS,
    LoopCounter,
    LoopHistogram,
    Metrics,
    version,
)
from gateway.quotas.admission import ADMISSION
from loadtest.emulator import EmulatorSettings
from loadtest.harness import free_port
from tests.helpers import (
    ACME_KEY,
    TINY_KEY,
    GatewayProcess,
    Stack,
    StackFactory,
    eventually,
    post_chat,
)

ROUTE = "/api/chatbot"


async def stream(stack: Stack, bot: str = "demo", key: str = ACME_KEY) -> tuple[int, int]:
    """Status and number of events of one streamed chat."""
    reply = await post_chat(stack, {"message": "hi", "bot": bot}, key=key)
    return reply.status, len(reply.events()) if reply.status == 200 else 0


async def test_every_metric_after_scripted_traffic_with_faults(make_stack: StackFactory) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=10))
    m = stack.metric

    ok = [await stream(stack) for _ in range(3)]  # bot "demo", named in the config
    assert {s for s, _ in ok} == {200}
    events_per_stream = ok[0][1]
    assert await stream(stack, "rich") == (200, events_per_stream + 3)  # counted as "other"
    async with await stack.chat({"message": "hi", "stream": False}) as r:
        assert r.status == 200
    assert (await stream(stack, key="nope"))[0] == 401
    assert (await stream(stack, "fault-500"))[0] == 502  # not retried
    assert (await stream(stack, "fault-503-once"))[0] == 200  # retried once
    assert (await stream(stack, "fault-429"))[0] == 429  # two retries, then 429
    stall = await stream(stack, "fault-stall-mid")  # idle timeout mid-stream
    malformed = await stream(stack, "fault-malformed")  # protocol error mid-stream
    assert [await stream(stack, key=TINY_KEY) for _ in range(4)][-1] == (429, 0)  # quota

    r = await stack.chat({"message": "hi", "bot": "fault-stall-mid"})  # the client hangs up
    await r.content.readline()
    r.close()
    await eventually(lambda: stack.gateway.app[ADMISSION].active == 0)
    await asyncio.sleep(0.05)

    status = {
        ("acme", "200", "ok"): 3 + 1 + 1 + 1,  # ok, rich, json, 503-once
        ("acme", "200", "failed"): 2,  # stall, malformed: failed after their 200
        ("acme", "200", "client_left"): 1,  # the hang-up
        ("-", "401", "rejected"): 1,
        ("acme", "502", "failed"): 1,
        ("acme", "429", "rejected"): 1,
        ("tiny", "200", "ok"): 3,
        ("tiny", "429", "rejected"): 1,
    }
    for (tenant, code, outcome), n in status.items():
        labels = {"route": ROUTE, "frontend": "chatiq", "tenant": tenant, "status": code}
        assert await m("chatiq_gateway_requests_total", **labels, outcome=outcome) == n, outcome

    assert await m("chatiq_gateway_stream_events_total", tenant="acme", bot="demo") == (
        3 * events_per_stream
    )
    assert await m("chatiq_gateway_stream_events_total", tenant="tiny", bot="demo") == (
        3 * events_per_stream
    )
    # rich + 503-once + the upstream's events of stall and malformed (the
    # gateway's own error event and [DONE] are not relayed events) + the 3
    # chunks the hung-up stream had relayed.
    other = (events_per_stream + 3) + events_per_stream + (stall[1] - 2) + (malformed[1] - 2) + 3
    assert await m("chatiq_gateway_stream_events_total", tenant="acme", bot="other") == other
    assert (
        await m("chatiq_gateway_time_to_first_token_seconds_count", tenant="acme", bot="demo") == 3
    )
    assert (
        await m("chatiq_gateway_time_to_first_token_seconds_count", tenant="acme", bot="other") == 5
    )  # rich, 503-once, stall, malformed, hang-up
    assert await m("chatiq_gateway_stream_duration_seconds_count", tenant="acme", bot="demo") == 3
    assert await m("chatiq_gateway_stream_duration_seconds_count", tenant="acme", bot="other") == 5
    # Response headers from the upstream: every attempt but none (the emulator
    # answers each one): 3 + rich + json + 500 + 2 (503-once) + 3 (429) + stall
    # + malformed + 3 tiny + hang-up.
    assert await m("chatiq_gateway_upstream_first_byte_seconds_count") == 17
    assert await m("chatiq_gateway_upstream_errors_total", kind="http_5xx") == 2
    assert await m("chatiq_gateway_upstream_errors_total", kind="http_429") == 3
    assert await m("chatiq_gateway_upstream_errors_total", kind="idle_timeout") == 1
    assert await m("chatiq_gateway_upstream_errors_total", kind="protocol") == 1
    assert await m("chatiq_gateway_upstream_retries_total", reason="http_503") == 1
    assert await m("chatiq_gateway_upstream_retries_total", reason="http_429") == 2
    assert await m("chatiq_gateway_rejected_total", reason="rate_limit") == 1
    assert await m("chatiq_gateway_client_disconnects_total", tenant="acme") == 1
    for tenant in ("acme", "tiny"):
        for bot in ("demo", "other"):
            labels = {"tenant": tenant, "bot": bot}
            assert await m("chatiq_gateway_active_streams", **labels) == 0
    assert await m("chatiq_gateway_queue_depth") == 0
    for bot in ("demo", "other"):
        assert await m("chatiq_gateway_circuit_state", bot=bot) == 0
    # Every request that got past validation (all 15 but the 401) was timed.
    assert await m("chatiq_gateway_overhead_seconds_count", phase="pre_upstream") == 15
    assert await m("chatiq_gateway_overhead_seconds_count", phase="relay") >= 10  # one a stream


async def test_build_and_process_metrics(stack: Stack) -> None:
    async with stack.session.get(stack.gateway.make_url("/metrics")) as r:
        text = await r.text()
    build = re.search(r"^chatiq_gateway_build_info\{(.*)\} 1\.0$", text, re.M)
    assert build is not None
    assert f'version="{version()}"' in build.group(1)
    assert 'python="3.' in build.group(1) and f'aiohttp="{aiohttp.__version__}"' in build.group(1)
    compiled = "true" if gateway_build() == "compiled" else "false"
    assert f'compiled="{compiled}"' in build.group(1)
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert re.search(rf"^{name} [0-9.e+]+$", text, re.M), name


async def test_bots_from_client_input_never_create_new_series(stack: Stack) -> None:
    for i in range(30):
        async with await stack.chat({"message": "hi", "bot": f"made-up-{i}"}) as r:
            await r.read()
    async with stack.session.get(stack.gateway.make_url("/metrics")) as r:
        text = await r.text()
    assert "made-up" not in text
    assert set(re.findall(r'bot="([^"]*)"', text)) <= {"demo", "other"}


async def test_metrics_can_require_a_bearer_token(make_stack: StackFactory) -> None:
    from dataclasses import replace

    from gateway.config import MetricsSettings
    from tests.helpers import gateway_settings

    base = await make_stack()
    token = "scrape-token-1"
    settings = replace(
        gateway_settings(str(base.emulator.make_url("/api/chat"))),
        metrics=MetricsSettings(token_sha256=hashlib.sha256(token.encode()).hexdigest()),
    )
    stack = await make_stack(settings=settings)
    url = stack.gateway.make_url("/metrics")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with stack.session.get(url, headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "UNAUTHORIZED"
    async with stack.session.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        assert "chatiq_gateway_requests_total" in await r.text()
    await base.session.close()


@pytest.mark.process
async def test_metrics_can_live_on_a_port_of_their_own(
    make_stack: StackFactory, gateway_process: Callable[..., Awaitable[GatewayProcess]]
) -> None:
    stack = await make_stack(record=False)
    metrics_port = free_port()
    gw = await gateway_process(stack.emulator, metrics={"port": metrics_port})
    async with stack.session.get(f"http://127.0.0.1:{gw.port}/metrics") as r:
        assert r.status == 404
    async with stack.session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
        assert r.status == 200
        assert "chatiq_gateway_build_info" in await r.text()


def test_metrics_switched_off_record_nothing() -> None:
    metrics = Metrics(["demo"], enabled=False)
    metrics.requests.labels("/api/chatbot", "chatiq", "acme", "200", "ok").inc()
    metrics.time_to_first_token.labels("acme", "demo").observe(0.1)
    series = metrics.stream_series("acme", "demo")
    series.duration.observe(1.0)
    series.active.inc()
    metrics.request_counter("/api/chatbot", "chatiq", "acme", 200, "ok").inc()
    assert b"chatiq_gateway" not in metrics.exposition()[0]


# Below the first bound, on bounds, just past them, past the last, a negative
# (a clock step): every bucket edge of the latency and duration histograms.
EDGES = [-1.0, 0.0, 0.001, 0.005, 0.0050001, 0.075, 1.0, 1.5000001, 60.0, 60.5, 600.0, 1e9]


def test_the_per_stream_children_record_what_the_library_would() -> None:
    """The stream path's label children skip prometheus-client's per-call checks
    and, in one process, the values' locks (``LoopCounter``, ``LoopHistogram``):
    the exposition is the same as the library's own ``observe``/``inc``/``dec``
    would make, bucket by bucket."""
    hot, library = Metrics(["demo"]), Metrics(["demo"])
    series = hot.stream_series("acme", "demo")
    assert type(series.duration) is LoopHistogram and type(series.active) is LoopCounter
    for value in EDGES:
        series.time_to_first_token.observe(value)
        library.time_to_first_token.labels("acme", "demo").observe(value)
        series.duration.observe(value)
        library.stream_duration.labels("acme", "demo").observe(value)
        hot.pre_upstream.observe(value / 1000)
        library.overhead.labels("pre_upstream").observe(value / 1000)
        hot.upstream_first_byte.observe(value)
        library.upstream_first_byte.observe(value)
    series.events.inc(21)
    library.stream_events.labels("acme", "demo").inc(21)
    series.active.inc()
    series.active.inc()
    series.active.dec()
    library.active_streams.labels("acme", "demo").inc()
    hot.request_counter("/api/chatbot", "chatiq", "acme", 200, "ok").inc()
    library.requests.labels("/api/chatbot", "chatiq", "acme", "200", "ok").inc()

    def samples(metrics: Metrics) -> list[str]:
        lines = metrics.exposition()[0].decode().splitlines()
        return [line for line in lines if "_created" not in line and "process_" not in line]

    assert samples(hot) == samples(library)
    assert 'le="0.005"} 4.0' in "\n".join(samples(hot))  # -1, 0, 0.001 and 0.005 itself


@pytest.mark.parametrize("bot", [None, "demo", "nope"])
def test_bot_labels_are_bounded_by_the_configuration(bot: str | None) -> None:
    assert Metrics(["demo"]).bot_label(bot) == {None: "-", "demo": "demo", "nope": "other"}[bot]


async def test_every_known_series_is_exported_at_zero_right_after_start(stack: Stack) -> None:
    """So that rate() and increase() see the first burst of each status, reason,
    kind and tenant (a series that appears at its first increment is missed)."""
    async with stack.session.get(stack.gateway.make_url("/metrics")) as r:
        text = await r.text()  # (stack.metric would read an absent series as 0 too)
    for reason in REJECT_REASONS:
        assert f'chatiq_gateway_rejected_total{{reason="{reason}"}} 0.0' in text
    for kind in ERROR_KINDS:
        assert f'chatiq_gateway_upstream_errors_total{{kind="{kind}"}} 0.0' in text
    for tenant in ("acme", "limited", "tiny"):
        for route, frontend in (
            ("/api/chatbot", "chatiq"),
            ("/v1/chat/completions", "openai"),
            ("/api/ui/chat", "ai-sdk"),
        ):
            for status in DOCUMENTED_STATUSES:
                outcome = "ok" if status < 400 else "rejected" if status < 500 else "failed"
                sample = (
                    f'chatiq_gateway_requests_total{{frontend="{frontend}",outcome="{outcome}",'
                    f'route="{route}",status="{status}",tenant="{tenant}"}} 0.0'
                )
                assert sample in text, sample
        assert f'chatiq_gateway_client_disconnects_total{{tenant="{tenant}"}} 0.0' in text
        for bot in ("demo", "other"):
            ttft = "chatiq_gateway_time_to_first_token_seconds_count"
            assert f'{ttft}{{bot="{bot}",tenant="{tenant}"}} 0.0' in text
    for reason in RETRY_REASONS:
        assert f'chatiq_gateway_upstream_retries_total{{reason="{reason}"}} 0.0' in text


ROOT = Path(__file__).resolve().parent.parent
PINNED_WORKER = """
import os
real_getpid, calls = os.getpid, []
os.getpid = lambda: calls.append(1) or real_getpid()  # before prometheus-client takes it
from gateway.metrics import hot, pin_worker_pid
pin_worker_pid()
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
counter = Counter("pinned", "a counter", ["x"], registry=None).labels("a")
latency = Histogram("latency", "a histogram", registry=None, buckets=(0.1, 1.0))
calls.clear()
for _ in range(5):
    counter.inc()
    hot(counter).inc()  # a stream's children, in a worker: the same file
hot(latency).observe(0.5)
print(len(calls))
print(type(hot(counter)).__name__, type(hot(latency)).__name__)
registry = CollectorRegistry()
MultiProcessCollector(registry)
print(registry.get_sample_value("latency_bucket", {"le": "1.0"}))
print(registry.get_sample_value("pinned_total", {"x": "a"}))
print(sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])))
"""


@pytest.mark.process
async def test_a_worker_reads_its_pid_once_not_on_every_update(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PINNED_WORKER, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, out.decode()
    calls, kinds, bucket, value, files = out.decode().splitlines()[-5:]
    assert calls == "0"  # eleven updates, no getpid
    assert kinds == "HotCounter HotHistogram"  # a worker's values keep their own inc
    assert float(bucket) == 1.0
    assert float(value) == 10.0
    assert re.fullmatch(r"\['counter_\d+\.db', 'histogram_\d+\.db'\]", files), files
