"""The shipped dashboard and alert rules name only metrics the gateway exports."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from loadtest.harness import free_port
from tests.helpers import Stack, StackFactory
from tests.otlp import Receiver

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "chatiq-gateway.json"
PROMETHEUS = ROOT / "config" / "prometheus"
METRIC = re.compile(r"\b((?:chatiq_gateway|process)_[a-z_]+)\b")
BY = re.compile(r"\bby \(([^)]*)\)")
SAMPLE = re.compile(r"^([a-z_]+)(?:\{([^}]*)\})? ")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
async def exported(stack: Stack) -> dict[str, set[str]]:
    """Every metric the gateway exports right after start-up, before any request,
    with its label names: what a dashboard sees of a gateway that just started."""
    async with stack.session.get(stack.gateway.make_url("/metrics")) as r:
        text = await r.text()
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            for suffix in suffixes:
                names.setdefault(name + suffix, set())
        elif match := SAMPLE.match(line):
            labels = {pair.split("=")[0] for pair in (match.group(2) or "").split(",") if pair}
            names.setdefault(match.group(1), set()).update(labels)
    return names


def check_expression(expr: str, exported: dict[str, set[str]]) -> None:
    used = set(METRIC.findall(expr))
    assert used, f"no gateway metric in {expr!r}"
    for name in used:
        assert name in exported, f"{name} (in {expr!r}) is not exported"
    known = set().union(*(exported[n] for n in used)) | {"le", "instance", "job"}
    for group in BY.findall(expr):
        for label in (x.strip() for x in group.split(",")):
            assert label in known, f"label {label!r} (in {expr!r}) is on none of {used}"


def test_the_dashboard_is_valid_and_queries_only_exported_metrics(
    exported: dict[str, set[str]],
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    queried = set()
    for panel in panels:
        assert panel["title"] and panel["targets"], panel
        for target in panel["targets"]:
            check_expression(target["expr"], exported)
            queried |= set(METRIC.findall(target["expr"]))
    for required in (
        "chatiq_gateway_active_streams",
        "chatiq_gateway_requests_total",
        "chatiq_gateway_time_to_first_token_seconds_bucket",
        "chatiq_gateway_rejected_total",
        "chatiq_gateway_upstream_errors_total",
        "chatiq_gateway_upstream_retries_total",
        "chatiq_gateway_circuit_state",
        "chatiq_gateway_circuit_transitions_total",
        "chatiq_gateway_queue_depth",
        "process_resident_memory_bytes",
    ):
        assert required in queried, f"no panel shows {required}"


def test_the_alert_rules_are_complete_and_use_exported_metrics(
    exported: dict[str, set[str]],
) -> None:
    rules = [r for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
             for r in g["rules"]]  # fmt: skip
    names = {r["alert"] for r in rules}
    assert {
        "ChatIQGatewayTTFTHigh",
        "ChatIQGatewayErrorRatioHigh",
        "ChatIQGatewayCircuitOpen",
        "ChatIQGatewayCircuitFlapping",
        "ChatIQGatewaySustainedRejections",
        "ChatIQGatewayNoTraffic",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in {"page", "warn", "info"}
        assert rule["annotations"]["summary"]
        if "chatiq_gateway" in rule["expr"]:
            check_expression(rule["expr"], exported)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool is not installed (apt-get install prometheus); CI requires it")
    return found


@pytest.mark.external
@pytest.mark.process
@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],  # the alerts fire when they should
    ],
)
def test_promtool_accepts_the_rules_and_scrape_config(args: list[str]) -> None:
    done = subprocess.run(
        [promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_ttft_panel_shows_exemplars() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [panel] = [
        p for p in dashboard["panels"]
        if any("time_to_first_token" in t["expr"] for t in p["targets"])
    ]  # fmt: skip
    assert all(target.get("exemplar") is True for target in panel["targets"])


@pytest.mark.external
@pytest.mark.process
async def test_prometheus_keeps_the_traced_request_s_exemplar_as_shipped(
    tmp_path: Path, make_stack: StackFactory, otlp: Receiver
) -> None:
    """The shipped scrape configuration, pointed at a traced gateway, in a real
    Prometheus with exemplar storage: the TTFT buckets' exemplars name the
    request's trace, as the dashboard's panel queries them."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    stack = await make_stack()
    r = await stack.chat(headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
    await r.read()
    shipped = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert shipped["storage"]["exemplars"]["max_exemplars"] > 0
    [job] = shipped["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{stack.gateway.port}"]}]
    job["scrape_interval"] = "1s"
    shipped["rule_files"] = []
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    port = free_port()
    process = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--enable-feature=exemplar-storage"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    query = {
        "query": "chatiq_gateway_time_to_first_token_seconds_bucket",
        "start": str(time.time() - 600), "end": str(time.time() + 600),
    }  # fmt: skip
    found: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while not found and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                try:
                    async with session.get(
                        f"http://127.0.0.1:{port}/api/v1/query_exemplars", params=query
                    ) as answer:
                        if answer.status != 200:
                            continue
                        data = (await answer.json())["data"]
                except aiohttp.ClientConnectionError:
                    continue  # not listening yet
                found = [e for series in data for e in series["exemplars"]]
    finally:
        process.terminate()
        process.wait(10)
    assert found, "Prometheus stored no exemplar"
    assert {e["labels"]["trace_id"] for e in found} == {TRACE_ID}
