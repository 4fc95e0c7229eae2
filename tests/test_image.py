"""The container image (Dockerfile): what it must say, always checked; and,
where buildah and a Debian Python base image are at hand (`make image`
BASE=...), built from the wheel and run, a chat streamed through it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from gateway import build
from loadtest.harness import free_port, start_emulator, stop, wait_ready
from tests.helpers import CHATIQ_KEY, data_events

ROOT = Path(__file__).resolve().parent.parent
BASE = os.environ.get("CHATIQ_IMAGE_BASE", "localhost/debian-python:bookworm")


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def test_the_image_runs_the_wheel_as_a_non_root_user_that_drains_on_sigterm() -> None:
    steps = instructions()
    stages = [rest for word, rest in steps if word == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build"), stages  # multi-stage
    final = steps[[i for i, (word, _) in enumerate(steps) if word == "FROM"][-1] :]
    said = dict(final)
    assert re.fullmatch(r"\d+:\d+", said["USER"]) and not said["USER"].startswith("0:")
    assert said["STOPSIGNAL"] == "SIGTERM"
    assert "/healthz" in said["HEALTHCHECK"]
    assert json.loads(said["ENTRYPOINT"]) == ["chatiq-gateway"]
    assert "--from=build" in said["COPY"]  # the virtualenv only: no compiler, no wheels
    assert not [rest for word, rest in steps if word == "ADD"]  # nothing fetched from a URL
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignored and "!dist/wheels/" in ignored  # the context is the wheels alone


@pytest.mark.external
@pytest.mark.process
async def test_the_image_builds_and_streams_a_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buildah = shutil.which("buildah")
    if buildah is None or subprocess.run([buildah, "inspect", BASE], capture_output=True,
                                         check=False).returncode != 0:  # fmt: skip
        pytest.skip(f"needs buildah and a Debian Python base image {BASE} (docs/operations.md)")
    built = await asyncio.to_thread(
        subprocess.run, ["make", "image", f"BASE={BASE}"], cwd=ROOT,
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    tag = re.findall(r"Successfully tagged (\S+)", built.stdout + built.stderr)[-1]
    shown = subprocess.run([buildah, "inspect", "--type", "image", tag],
                           capture_output=True, text=True, check=True)  # fmt: skip
    config = json.loads(shown.stdout)["Docker"]["config"]  # docker format: its health check kept
    assert config["User"] == "10001:10001" and config["StopSignal"] == "SIGTERM"
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    container = subprocess.run([buildah, "from", tag], capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
    emulator_port, port = free_port(), free_port()
    monkeypatch.setenv("CHATIQ_API_KEY", CHATIQ_KEY)  # the emulator's (restored after)
    emulator = start_emulator(emulator_port, "--ttft-ms", "0", "--tokens-per-s", "0")
    gateway = subprocess.Popen(
        [buildah, "run", "--isolation", "chroot", "--network", "host",
         "-e", f"CHATIQ_API_URL=http://127.0.0.1:{emulator_port}/api/chat",
         "-e", f"CHATIQ_API_KEY={CHATIQ_KEY}", "-e", f"GATEWAY_PORT={port}",
         container, "--", "chatiq-gateway"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz", timeout_s=30)
        async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}/api/chatbot", json={"message": "hi"},
            headers={"Authorization": "Bearer demo-key"},
        ) as r:  # fmt: skip
            assert r.status == 200
            assert data_events(await r.read())[-1] == "[DONE]"
        version = subprocess.run(
            [buildah, "run", "--isolation", "chroot", container, "--", "chatiq-gateway",
             "--version"], capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        if build() == "compiled":  # built here, so the image's wheel is compiled too
            assert "(compiled with mypyc)" in version, version
    finally:
        stop(gateway, emulator)
        subprocess.run([buildah, "rm", container], capture_output=True, check=False)
