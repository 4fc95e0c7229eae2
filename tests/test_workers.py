"""``--workers 2``: two processes share the port, and /metrics adds them up."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from loadtest.emulator import EmulatorSettings, compose_reply
from loadtest.harness import free_port, start_gateway, stop, wait_ready
from tests.conftest import ACME_KEY, CHATIQ_KEY, StackFactory, read_stream


async def test_two_workers_share_the_port_and_their_metrics(
    tmp_path: Path, make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=5))
    folder = tmp_path / "metrics"
    folder.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    port = free_port()
    assert stack.emulator.port is not None
    process, log = start_gateway(
        tmp_path, port, stack.emulator.port, ACME_KEY, api_key=CHATIQ_KEY,
        extra_args=["--workers", "2"],
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")

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

        def total(name: str) -> float:
            pattern = rf"^{name}(?:{{[^}}]*}})? (\S+)$"
            return sum(float(v) for v in re.findall(pattern, text, re.M))

        assert len(worker_pids()) == 2, sorted(f.name for f in folder.iterdir())
        assert total(r'chatiq_gateway_requests_total\{route="/api/chatbot"[^}]*\}') == sent
        per_stream = len(compose_reply("hi", [], 5)) + 2
        assert total("chatiq_gateway_stream_events_total") == sent * per_stream
        assert total("chatiq_gateway_time_to_first_token_seconds_count") == sent
        assert total("chatiq_gateway_active_streams") == 0
        assert "chatiq_gateway_build_info{" in text

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert "workers_stopped" in log.read_text()
    finally:
        stop(process)
