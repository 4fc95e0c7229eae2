"""The benchmark's load generator against a real emulator, and ``make bench`` end to end."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway import build
from loadtest.bench import PATHS, PathResult, Plan, round_ratios
from loadtest.emulator import EmulatorSettings, compose_reply
from loadtest.loadgen import Target, hold_streams, run_streams, stream_once
from tests.helpers import ACME_KEY, CHATIQ_KEY, GatewayProcess, StackFactory

ROOT = Path(__file__).resolve().parent.parent


def emulator_target(stack_port: int, bot: str) -> Target:
    body = {"message": "hi", "bot_slug": bot, "stream": True}
    return Target("127.0.0.1", stack_port, "/api/chat", body, key=CHATIQ_KEY)


async def test_loadgen_counts_every_event_whatever_the_chunking(make_stack: StackFactory) -> None:
    # The emulator cuts its writes at random byte offsets (inside events, inside
    # UTF-8 characters), so the HTTP chunks cut the events anywhere too.
    settings = EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=30, split_writes=True)
    stack = await make_stack(settings)
    assert stack.emulator.port is not None
    target = emulator_target(stack.emulator.port, "demo")
    for _ in range(5):
        result = await stream_once(target, target.request(), timeout_s=10)
        assert result.error is None and result.done and result.status == 200
        content = len(compose_reply("hi", [], 30))
        assert len(result.event_times) == content + 2  # then conversationId, [DONE]
        assert len(result.gaps()) == content - 1


async def test_loadgen_reports_refusals_and_streams_cut_midway(make_stack: StackFactory) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=10))
    assert stack.emulator.port is not None
    refused = emulator_target(stack.emulator.port, "fault-429")
    result = await stream_once(refused, refused.request(), timeout_s=10)
    assert result.error == "HTTP 429" and not result.done
    cut = emulator_target(stack.emulator.port, "fault-drop-mid")
    result = await stream_once(cut, cut.request(), timeout_s=10)
    assert result.error is not None and not result.done
    assert len(result.event_times) == 3  # the chunks sent before the drop


async def test_loadgen_holds_streams_open(make_stack: StackFactory) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=5, reply_tokens=1000))
    assert stack.emulator.port is not None
    target = emulator_target(stack.emulator.port, "demo")
    open_now, results = await hold_streams(target, 50, ramp_s=0.2, hold_s=0.5, timeout_s=10)
    assert open_now == 50 and all(r.error is None for r in results)


def nginx_available() -> bool:
    return bool(shutil.which("nginx") or Path("/usr/sbin/nginx").exists())


@pytest.mark.external
@pytest.mark.process
async def test_make_bench_writes_the_side_by_side_table(tmp_path: Path) -> None:
    if not nginx_available():
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed (apt-get install nginx-light); CI requires it")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.bench", "--levels", "1,5", "--tokens", "3",
        "--min-duration", "1", "--hold", "30", "--hold-seconds", "1", "--out", str(tmp_path),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), timeout=180)
    assert process.returncode == 0, out.decode()
    table = (tmp_path / "latest.md").read_text()
    rows = [
        line.split("|")
        for line in table.splitlines()
        if line.startswith("| 1 ") or line.startswith("| 5 ")
    ]
    assert sorted((r[1].strip(), r[2].strip()) for r in rows) == sorted(
        (level, path) for level in ("1", "5") for path in PATHS
    ), table
    for r in rows:
        assert r[4].strip() == "0", table  # no errors on any path
        assert int(r[3].strip()) > 0, table  # and streams completed
    assert "Open streams held by one gateway process: **30** of 30" in table, table
    printed = out.decode()
    steps = 2 * len(PATHS)
    assert f"bench: [1/{steps}] 1 streams via direct" in printed and "left" in printed
    assert "+TTFT p50/p99 ms" in printed  # the terminal's narrow table
    narrow = [line for line in printed.splitlines() if re.match(r"^ +[\d,]+  [a-z]", line)]
    assert len(narrow) == steps and max(len(line) for line in narrow) <= 80, narrow
    chart = (tmp_path / "latest.png").read_bytes()
    assert chart.startswith(b"\x89PNG") and len(chart) > 10_000


@pytest.mark.external
@pytest.mark.process
async def test_make_bench_rounds_interleave_the_paths_and_report_each_ratio(
    tmp_path: Path,
) -> None:
    if not nginx_available():
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    code, out = await run_tool(
        "loadtest.bench", tmp_path, "--levels", "20", "--tokens", "20", "--min-duration", "2",
        "--hold", "0", "--paths", "direct,gateway,token,pure,nginx", "--rounds", "2",
    )  # fmt: skip
    assert code == 0, out
    steps = [line.split(" via ")[1].split()[0] for line in out.splitlines() if " via " in line]
    paths = ["direct", "gateway", "token", "pure", "nginx"]
    assert steps == paths * 2, out  # interleaved, not path after path
    table = (tmp_path / "latest.md").read_text()
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| 20 ")]
    assert [r[2].strip() for r in rows] == paths, table  # the token path: no stream refused
    assert all(int(r[3].strip()) >= 40 and r[4].strip() == "0" for r in rows), table  # pooled
    ratio = re.search(
        r"Rounds: 20 streams, gateway CPU per event / nginx's: ([\d.]+)x, ([\d.]+)x "
        r"\(median ([\d.]+)x, pooled ([\d.]+)x\)\.",
        table,
    )
    assert ratio is not None, table
    first, second, median, _ = (float(x) for x in ratio.groups())
    assert median == max(first, second)  # of two, the upper one
    assert "Rounds: 20 streams, gateway" in out  # printed too
    assert "Rounds: 20 streams, token CPU per event / gateway's: " in table
    assert "Rounds: 20 streams, pure CPU per event / gateway's: " in table  # the pure path


async def test_a_burst_streams_once_per_user_all_started_within_the_ramp(
    make_stack: StackFactory,
) -> None:
    """bench --ramp: every stream of a level starts within the ramp, one reply
    each, however long the streams take (a level ends when they do)."""
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=20, reply_tokens=10))
    assert stack.emulator.port is not None
    target = emulator_target(stack.emulator.port, "demo")
    results = await run_streams(target, 40, 3.0, 0.5, timeout_s=30, once=True)
    assert len(results) == 40 and all(r.done for r in results)  # not one after another
    plan = Plan.for_level(1000, 20, 8.0, ramp_s=2.0)
    assert plan.burst and plan.ramp_s == 2.0
    assert plan.duration_s == 2.0 + 0.1 + 20 / 6  # the ramp, then one stream at 6 tokens/s
    assert not Plan.for_level(1000, 20, 8.0).burst


def test_rounds_too_short_for_nginx_to_register_are_said_so_not_divided_by() -> None:
    def result(path: str, cpu: list[float]) -> PathResult:
        return PathResult(path, 10, 0, {}, [1.0], [1.0], 100, sum(cpu), 20.0, 0.1, 0.1, cpu)

    plan = Plan.for_level(10, 20, 1.0)
    short = round_ratios([(plan, [result("gateway", [0.01, 0.02]), result("nginx", [0.0, 0.01])])])
    assert short[-1].startswith("Rounds: 10 streams: nginx used no measurable CPU")
    fine = round_ratios([(plan, [result("gateway", [0.02, 0.03]), result("nginx", [0.01, 0.01])])])
    assert fine[-1] == (
        "Rounds: 10 streams, gateway CPU per event / nginx's: 2.00x, 3.00x "
        "(median 3.00x, pooled 2.50x)."
    )


def test_a_traced_path_is_compared_with_the_untraced_gateway() -> None:
    def result(path: str, cpu: list[float]) -> PathResult:
        return PathResult(path, 10, 0, {}, [1.0], [1.0], 100, sum(cpu), 20.0, 0.1, 0.1, cpu)

    plan = Plan.for_level(10, 20, 1.0)
    ratios = round_ratios(
        [(plan, [result("gateway", [0.02, 0.02]), result("traced", [0.03, 0.025])])]
    )
    assert ratios[-1] == (
        "Rounds: 10 streams, traced CPU per event / gateway's: 1.50x, 1.25x "
        "(median 1.50x, pooled 1.38x)."
    )


@pytest.mark.process
async def test_the_gateway_runs_on_uvloop_unless_told_otherwise(
    make_stack: StackFactory,
    gateway_process: Callable[..., Awaitable[GatewayProcess]],
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=5))
    fast = await gateway_process(stack.emulator)
    plain = await gateway_process(stack.emulator, server={"event_loop": "asyncio"})
    for gw in (fast, plain):
        target = Target("127.0.0.1", gw.port, "/api/chatbot", {"message": "hi"}, key=ACME_KEY)
        result = await stream_once(target, target.request(), timeout_s=10)
        assert result.done and len(result.event_times) == len(compose_reply("hi", [], 5)) + 2
    assert '"name": "uvloop"' in fast.log() or "name=uvloop" in fast.log()
    assert "uvloop" not in plain.log()


async def run_tool(module: str, out: Path, *args: str) -> tuple[int, str]:
    """``python -m <module> ... --out <out>``: its exit code and what it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args, "--out", str(out),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    printed, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, printed.decode()


@pytest.mark.external
@pytest.mark.process
async def test_make_instructions_counts_the_gateways_instructions_per_stream_and_the_floors(
    tmp_path: Path,
) -> None:
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is missing (CI installs Debian's)")
    code, out = await run_tool("loadtest.instructions", tmp_path, "--seconds", "1")
    assert code == 0, out
    report = (tmp_path / "latest.md").read_text()
    rows = {
        cells[1].strip(): cells
        for cells in (line.split("|") for line in report.splitlines())
        if len(cells) == 8 and cells[3].strip()[:1].isdigit()
    }
    assert set(rows) == {"working tree", "floor: bare aiohttp, one write"}, report
    per_stream = {
        name: float(cells[5].strip(" k").replace(",", "")) for name, cells in rows.items()
    }
    # The gateway does what the floor does and more: auth, the upstream, the relay, metrics.
    assert per_stream["working tree"] > per_stream["floor: bare aiohttp, one write"] > 50, report


def test_instructions_split_a_streams_cost_into_fixed_and_per_event() -> None:
    from loadtest.instructions import split_costs

    # 100 streams of 11 events at 1,000k each, then of 31 events at 1,400k each:
    # 20 events more cost 400k, so 20k an event and 780k fixed.
    rows = [
        ("gateway", 1, 100, 1_100, 100 * 1_000_000),
        ("gateway", 21, 50, 1_550, 50 * 1_400_000),
        ("floor", 1, 10, 110, 10 * 300_000),  # one length only: no split
    ]
    split = split_costs(rows)
    assert set(split) == {"gateway"}
    fixed, per_event = split["gateway"]
    assert round(per_event) == 20_000 and round(fixed) == 780_000


@pytest.mark.process
async def test_make_resumes_drops_and_resumes_streams_and_says_what_it_measured(
    tmp_path: Path,
) -> None:
    code, out = await run_tool(
        "loadtest.resumes", tmp_path, "--streams", "20", "--rate", "100", "--waves", "2"
    )
    assert code == 0, out
    summary = (tmp_path / "latest.md").read_text()
    assert "- detached: 40 in all" in summary and "20 at once" in summary, summary
    waves = re.search(r"RSS by wave, detached / after it: (.*)", summary)
    assert waves and len(re.findall(r"\d+ / \d+ MiB", waves.group(1))) == 2, summary
    assert "KiB per detached stream" in summary and "p99 **" in summary, summary
    assert "**20 of 20**" in summary, summary


@pytest.mark.process
async def test_make_profile_reports_cost_per_stream_and_event_and_the_top_functions(
    tmp_path: Path,
) -> None:
    code, out = await run_tool("loadtest.profile", tmp_path, "--seconds", "2", "--streams", "20")
    if code != 0 and "ermission" in out:  # py-spy may not attach (ptrace)
        pytest.skip(f"py-spy cannot sample here: {out[-200:]}")
    assert code == 0, out
    report = (tmp_path / "latest.md").read_text()
    assert report.count("us per stream") == 2 and report.count("us per event") == 2, report
    rows = [line for line in report.splitlines() if line.startswith("| `")]
    # Functions sampled, with their shares (fewer on the compiled path: its
    # native functions' time is their Python caller's).
    assert len(rows) >= (5 if build() == "compiled" else 10), report
    # The gateway's own code (a compiled module's functions are native: py-spy
    # sees the Python ones around them).
    assert re.search(r"`(pipeline|exchange|relay|client|logs)\.py:", report), report


@pytest.mark.external
@pytest.mark.process
async def test_make_chaos_runs_every_fault_on_a_fleet_and_says_what_held(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None and not os.environ.get("CI"):
        pytest.skip("redis-server is not installed (CI installs Debian's)")
    fleet = tmp_path / "fleet"  # the replicas' logs: the log audit reads them too
    code, out = await run_tool("loadtest.chaos", tmp_path, "--rounds", "1", "--folder", str(fleet))
    report = (tmp_path / "latest.md").read_text()
    assert code == 0, out
    assert "**11 of 11 checks held.**" in report, report
    for check in ("Redis restarted empty", "while Redis hangs", "keep-alive comments",
                  "half-written config", "800 requests at once"):  # fmt: skip
        assert check in report, report
    assert len(list(fleet.glob("gateway-*.log"))) == 2
