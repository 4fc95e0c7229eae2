"""The shipped dashboard and alert rules name only metrics the gateway exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import Stack

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "chatiq-gateway.json"
PROMETHEUS = ROOT / "config" / "prometheus"
METRIC = re.compile(r"\b((?:chatiq_gateway|process)_[a-z_]+)\b")
BY = re.compile(r"\bby \(([^)]*)\)")
SAMPLE = re.compile(r"^([a-z_]+)(?:\{([^}]*)\})? ")


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
