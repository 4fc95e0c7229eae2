"""The Locust suite, headless, against a real gateway process and emulator."""

from __future__ import annotations

import asyncio
import csv
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from loadtest.emulator import EmulatorSettings
from tests.helpers import ACME_KEY, GatewayProcess, StackFactory

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent

SCENARIO = f"""
think_time_s = [0.0, 0.05]
turns = [2, 3]

[[profiles]]
name = "good"
key = "{ACME_KEY}"
bot = "demo"
weight = 3
messages = ["hello", "and then?"]

[[profiles]]
name = "broken"
key = "{ACME_KEY}"
bot = "fault-error-mid"
weight = 1
messages = ["this one breaks"]
"""


async def run_locust(results: Path, host: str, *options: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless",
        "--only-summary", "--host", host, "--users", "6", "--spawn-rate", "6",
        "--run-time", "6s", "--csv", str(results / "locust"),
        "--chatiq-results", str(results), *options,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_locust_reports_exact_streaming_percentiles_and_stream_failures(
    tmp_path: Path,
    make_stack: StackFactory,
    gateway_process: Callable[..., Awaitable[GatewayProcess]],
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0.05, tokens_per_s=200, reply_tokens=10))
    gw = await gateway_process(stack.emulator)
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    host = f"http://127.0.0.1:{gw.port}"

    code, out = await run_locust(tmp_path, host, "--chatiq-scenario", str(scenario))
    assert code == 0, out  # no threshold given but the failure ratio's default (100%)
    summary = (tmp_path / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if "|" in line}
    assert {"TTFT", "ITL", "STREAM"} <= rows.keys(), summary
    ttft_p50 = float(rows["TTFT"].split("|")[3])
    assert 50 <= ttft_p50 < 5000  # at least the emulator's own time to first token
    # The broken bot's streams end with an error event: each a failed stream, by its code.
    assert "| error event RATE_LIMIT |" in summary and "[DONE]" not in summary, summary
    with open(tmp_path / "locust_stats.csv") as f:
        stats = [row for row in csv.DictReader(f) if row["Name"] != "Aggregated"]
    assert {"POST", "TTFT", "ITL", "STREAM"} <= {row["Type"] for row in stats}

    def csv_count(kind: str, column: str = "Request Count") -> int:
        return sum(int(row[column]) for row in stats if row["Type"] == kind)

    # One set of counts: the summary, the CSV and the console agree (streams still
    # running when the run stopped are in none of them).
    header = re.search(r"## Load: (\d+) streams, (\d+) failed", summary)
    assert header is not None
    assert int(header.group(1)) == csv_count("STREAM")
    assert int(header.group(2)) == csv_count("STREAM", "Failure Count")
    assert int(rows["TTFT"].split("|")[2]) == csv_count("TTFT")
    assert header.group(0) in out
    assert re.search(r"load: \d+ s, \d+ users, \d+ streams done, \d+ failed", out), out
    assert (tmp_path / "charts.png").read_bytes().startswith(b"\x89PNG")

    # The same run with thresholds it cannot meet exits non-zero and says why.
    strict = tmp_path / "strict"
    code, out = await run_locust(
        strict, host, "--chatiq-scenario", str(scenario),
        "--max-ttft-p99-ms", "1", "--max-failure-ratio", "0.01",
    )  # fmt: skip
    assert code == 1, out
    assert "THRESHOLD CROSSED: TTFT p99" in out and "failure ratio" in out, out


async def test_locust_counts_resumes_of_streams_its_users_drop(
    tmp_path: Path,
    make_stack: StackFactory,
    gateway_process: Callable[..., Awaitable[GatewayProcess]],
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0.02, tokens_per_s=200, reply_tokens=30))
    gw = await gateway_process(stack.emulator, resume={"enabled": True})
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO.split('[[profiles]]\nname = "broken"')[0])
    host = f"http://127.0.0.1:{gw.port}"
    code, out = await run_locust(
        tmp_path, host, "--chatiq-scenario", str(scenario), "--chatiq-drop-ratio", "0.5",
        "--max-failure-ratio", "0",
    )  # fmt: skip
    summary = (tmp_path / "summary.md").read_text()
    assert code == 0, out
    assert "No stream failed." in summary, summary
    resumed = re.search(r"Resumed: (\d+) streams, (\d+) resumes", summary)
    assert resumed is not None and int(resumed.group(1)) >= 5, summary
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if "|" in line}
    assert int(rows["RESUME"].split("|")[2]) == int(resumed.group(2))
    # The gateway saw each of them (and maybe those of streams cut by the run's end).
    seen = await gw.metric(stack.session, "chatiq_gateway_streams_resumed_total")
    assert seen >= int(resumed.group(2))
