"""``--workers 2``: two processes share the port, and /metrics adds them up."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.config import ConfigError, settings_from_mapping
from gateway.server.cpus import cgroup_cpu_quota, resolve_workers, usable_cpus
from gateway.server.workers import MAX_DEATHS
from loadtest.emulator import EmulatorSettings, compose_reply
from loadtest.harness import metric_total, start_gateway, stop
from tests.helpers import ACME_KEY, StackFactory, read_stream, start_workers


@pytest.mark.process
async def test_two_workers_share_the_port_and_their_metrics(
    tmp_path: Path, make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=5))
    folder = tmp_path / "metrics"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    process, log, port = await start_workers(tmp_path, stack)
    try:

        def worker_pids() -> set[str]:  # each worker keeps its counters in its own file
            return {m[1] for f in folder.iterdir() if (m := re.match(r"counter_(\d+)\.db", f.name))}

        # A new connection per request, so that the kernel spreads them; at least
        # 40, and on until both workers served some (the second may start late).
        connector = aiohttp.TCPConnector(force_close=True)
        sent = 0
        async with aiohttp.ClientSession(connector=connector) as session:
            while sent < 40 or (len(worker_pids()) < 2 and sent < 1000):
                async with session.post(
                    f"http://127.0.0.1:{port}/api/chatbot",
                    json={"message": "hi"},
                    headers={"Authorization": f"Bearer {ACME_KEY}"},
                ) as r:
                    _, events = await read_stream(r)
                assert events[-1] == "[DONE]"
                sent += 1
            async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()

        assert len(worker_pids()) == 2, sorted(f.name for f in folder.iterdir())
        await metric_settles_at(port, "chatiq_gateway_requests_total", 'route="/api/chatbot"', sent)
        per_stream = len(compose_reply("hi", [], 5)) + 2
        await metric_settles_at(port, "chatiq_gateway_stream_events_total", "", sent * per_stream)
        await metric_settles_at(port, "chatiq_gateway_time_to_first_token_seconds_count", "", sent)
        await metric_settles_at(port, "chatiq_gateway_active_streams", "", 0)
        assert "chatiq_gateway_build_info{" in text

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert "workers_stopped" in log.read_text()
    finally:
        stop(process)


# --- the supervisor, as a service manager runs it (no metrics folder given) --


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


async def eventually_true(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    until = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < until, what
        await asyncio.sleep(0.05)


async def chat_on_new_connections(port: int, n: int) -> None:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(n):
            async with session.post(
                f"http://127.0.0.1:{port}/api/chatbot",
                json={"message": "hi"},
                headers={"Authorization": f"Bearer {ACME_KEY}"},
            ) as r:
                assert (await read_stream(r))[1][-1] == "[DONE]"


async def metric_settles_at(port: int, name: str, containing: str, value: float) -> None:
    """``name``'s samples holding ``containing`` sum to ``value`` on any worker's
    /metrics within 5 s (a request is counted as its handler ends, a moment
    after the client read its [DONE])."""
    until = time.monotonic() + 5
    async with aiohttp.ClientSession() as session:
        while (total := await metric_total(session, port, name, containing)) != value:
            assert time.monotonic() < until, f"{name} {containing}: {total}, not {value}"
            await asyncio.sleep(0.05)


async def start_supervised(
    tmp_path: Path,
    make_stack: StackFactory,
    monkeypatch: pytest.MonkeyPatch,
    workers: str = "2",
    prefix: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], Path, int]:
    """A gateway of two workers (``--workers``: 2, or auto on two cores)."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=5))
    process, log, port = await start_workers(tmp_path, stack, workers, prefix)
    await eventually_true(lambda: len(children_of(process.pid)) == 2, 10, "two workers")
    # Both listening: with one still starting, killing the other would leave
    # nobody on the port for a moment (connections refused).
    await eventually_true(
        lambda: log.read_text().count('"event": "listening"') == 2, 10, "two workers listening"
    )
    return process, log, port


@pytest.mark.process
async def test_a_killed_worker_is_replaced_and_metrics_still_add_up(
    tmp_path: Path, make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    process, log, port = await start_supervised(tmp_path, make_stack, monkeypatch)
    try:
        await chat_on_new_connections(port, 20)
        # Counted before the kill: a worker killed as its last stream ends has
        # no chance to count it (SIGKILL).
        await metric_settles_at(port, "chatiq_gateway_requests_total", 'route="/api/chatbot"', 20)
        first = children_of(process.pid)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        await eventually_true(
            lambda: len(children_of(process.pid) - first) == 1, 5, "no new worker within 5 s"
        )
        await chat_on_new_connections(port, 20)  # served by whichever worker the kernel picks
        assert time.monotonic() - killed < 10
        # the dead worker's counts are kept
        await metric_settles_at(port, "chatiq_gateway_requests_total", 'route="/api/chatbot"', 40)
        await metric_settles_at(port, "chatiq_gateway_active_streams", "", 0)
        text = log.read_text()
        assert '"event": "worker_exited"' in text and '"event": "worker_replaced"' in text
        assert "Traceback" not in text

        process.send_signal(signal.SIGTERM)  # then a clean stop: exit 0, nobody left
        workers = children_of(process.pid)
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert not any(alive(pid) for pid in workers)
        assert "Traceback" not in log.read_text()
    finally:
        stop(process)


@pytest.mark.process
async def test_workers_do_not_outlive_a_killed_supervisor(
    tmp_path: Path, make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    process, log, _ = await start_supervised(tmp_path, make_stack, monkeypatch)
    workers = children_of(process.pid)
    process.kill()
    process.wait()
    try:
        await eventually_true(
            lambda: not any(alive(pid) for pid in workers), 10, "workers outlived it"
        )
        assert log.read_text().count('"event": "supervisor_gone"') == 2
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.process
async def test_workers_that_keep_dying_stop_the_supervisor_with_a_reason(
    tmp_path: Path, make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    process, log, _ = await start_supervised(tmp_path, make_stack, monkeypatch)
    try:
        for _ in range(MAX_DEATHS + 1):
            victim = min(children_of(process.pid))
            os.kill(victim, signal.SIGKILL)

            def replaced(victim: int = victim) -> bool:
                now = children_of(process.pid)
                return process.poll() is not None or (victim not in now and len(now) == 2)

            await eventually_true(replaced, 5, "no reaction")
            if process.poll() is not None:
                break
        assert await asyncio.to_thread(process.wait, 30) == 1
        assert '"event": "workers_crash_loop"' in log.read_text()
    finally:
        stop(process)


@pytest.mark.process
async def test_a_taken_port_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            process, log = start_gateway(
                tmp_path, port, 9, ACME_KEY, extra_args=["--workers", workers]
            )
            assert await asyncio.to_thread(process.wait, 30) == 1
            text = log.read_text()
            assert "Traceback" not in text, text
            lines = [line for line in text.splitlines() if "cannot serve" in line]
            assert len(lines) == 1 and "in use" in lines[0], text


@pytest.mark.process
async def test_sighup_to_the_supervisor_reloads_every_worker(
    tmp_path: Path, make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    process, log, port = await start_supervised(tmp_path, make_stack, monkeypatch)
    try:
        await eventually_true(  # both workers handle signals once they listen
            lambda: log.read_text().count('"event": "listening"') == 2, 10, "two workers up"
        )
        config = log.with_suffix(".toml")
        config.write_text(
            config.read_text().replace("[[tenants]]", '[logging]\nlevel = "debug"\n\n[[tenants]]')
        )
        process.send_signal(signal.SIGHUP)
        await eventually_true(
            lambda: log.read_text().count('"event": "config_reloaded"') == 2, 10, "two reloads"
        )
        assert process.poll() is None
        await metric_settles_at(port, "chatiq_gateway_config_reloads_total", 'result="ok"', 2)
    finally:
        stop(process)


def test_usable_cpus_follow_the_cgroup_quota(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None  # no limit
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2) == 1.5
    assert usable_cpus(v2) == min(2, len(os.sched_getaffinity(0)))  # 1.5 cores: 2 workers
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1.parent) == 0.5
    assert usable_cpus(v1.parent) == 1  # never fewer than one
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1.parent) is None
    assert cgroup_cpu_quota(tmp_path / "none") is None


def test_workers_auto_in_the_file_is_one_per_usable_core() -> None:
    raw = {"upstream": {"url": "http://127.0.0.1:9/api/chat"}, "server": {"workers": "auto"}}
    assert resolve_workers(settings_from_mapping(raw, {}).server.workers) == usable_cpus()
    with pytest.raises(ConfigError, match=r'server\.workers: a whole number or "auto"'):
        settings_from_mapping({**raw, "server": {"workers": "many"}}, {})
    zero = {**raw, "server": {"workers": 0}}  # 0 is not "auto" spelled otherwise
    with pytest.raises(ConfigError, match=r'server\.workers: at least 1, or "auto"'):
        settings_from_mapping(zero, {})


@pytest.mark.process
def test_usable_cpus_follow_the_affinity_mask() -> None:
    if shutil.which("taskset") is None:
        pytest.skip("taskset is not installed")
    done = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c",
         "from gateway.server.cpus import usable_cpus; print(usable_cpus())"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "1"


@pytest.mark.process
async def test_workers_auto_starts_one_worker_per_usable_core(
    tmp_path: Path, make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and two cores")
    process, _, port = await start_supervised(
        tmp_path, make_stack, monkeypatch, "auto", ("taskset", "-c", "0,1")
    )
    try:
        await chat_on_new_connections(port, 4)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
