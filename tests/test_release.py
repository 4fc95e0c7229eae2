"""What an operator installing a release gets: the version, the packaged
default configuration, ``check-config``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import aiohttp
import pytest

from gateway import build_note
from gateway.server.cli import DEFAULT_CONFIG, main
from loadtest.harness import free_port, start_emulator, stop, wait_ready
from tests.helpers import CHATIQ_KEY, data_events

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_comes_from_one_place(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    shown = capsys.readouterr().out.strip()
    assert shown == f"chatiq-gateway {metadata.version('chatiq-gateway')} ({build_note()})"


def test_the_build_needs_what_the_compiled_modules_are_type_checked_against() -> None:
    """mypyc type-checks the hot path as it compiles it: against the runtime
    dependencies, so the build's requirements hold them all, and the mypy
    that compiles is the one that checks (the dev set's)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build = set(project["build-system"]["requires"])
    assert set(project["project"]["dependencies"]) <= build
    (pinned,) = [r for r in build if r.startswith("mypy")]
    assert any(r.startswith(pinned) for r in project["project"]["optional-dependencies"]["dev"])


def test_the_default_config_is_packaged_and_is_the_checkout_s(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["default-config"]) == 0
    shown = capsys.readouterr().out
    assert shown == DEFAULT_CONFIG.read_text() == (ROOT / "config" / "gateway.toml").read_text()


def test_check_config_prints_the_effective_settings_and_no_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHATIQ_API_KEY", "sk-the-chatiq-key-1234")
    config = tmp_path / "gateway.toml"
    hashed = "c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c"
    config.write_text(DEFAULT_CONFIG.read_text() + '\n[[tenants]]\nname = "team"\n'
                      f'key_sha256 = "{"ab" * 32}"\nbots = ["demo"]\n')  # fmt: skip
    assert main(["check-config", str(config)]) == 0
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert shown["upstream"]["api_key"] == "(set)" and shown["server"]["port"] == 8080
    assert [(t["name"], t["keys"]) for t in shown["tenants"]] == [("demo", 1), ("team", 1)]
    for secret in ("sk-the-chatiq-key-1234", hashed, "ab" * 32):
        assert secret not in out
    assert f"{config} is valid" in err


def test_check_config_refuses_a_broken_file_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(DEFAULT_CONFIG.read_text().replace("[server]\n", "[server]\nprot = 1\n"))
    assert main(["check-config", str(config)]) == 2
    assert "config error: server.prot: unknown key" in capsys.readouterr().err


@pytest.mark.process
async def test_the_wheel_installs_without_the_dev_extras_and_serves_a_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built as `make dist` builds it, installed as docs/operations.md says,
    run with its packaged default configuration (no checkout in sight). Built
    from a copy of the tree: a build writes build/ and *.egg-info where it
    runs, and the image test builds in the tree itself, maybe at once."""
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(
        ".venv*", "node_modules", "build", "dist", "results", ".git", "*.egg-info",
        "__pycache__", ".*_cache", ".hypothesis",
    )  # fmt: skip
    await asyncio.to_thread(shutil.copytree, ROOT, source, symlinks=True, ignore=skip)
    # As a machine without a C compiler builds it (the compiled wheel is the
    # image test's): nothing compiled, and the gateway says it runs the pure path.
    built = await run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
         str(source)], env={**os.environ, "CHATIQ_GATEWAY_NO_EXTENSIONS": "1"},
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("chatiq_gateway-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith(".so")]
    venv = tmp_path / "venv"
    assert (await run([sys.executable, "-m", "venv", str(venv)])).returncode == 0
    installed = await run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)])
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = await run([str(venv / "bin" / "pip"), "list", "--format=json"])
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"aiohttp", "pyjwt", "chatiq-gateway"} <= names
    assert not names & {"pytest", "mypy", "locust", "playwright", "ruff"}, names  # no extras

    emulator_port, port = free_port(), free_port()
    monkeypatch.setenv("CHATIQ_API_KEY", CHATIQ_KEY)
    pure_not_asked = {k: v for k, v in os.environ.items() if k != "CHATIQ_GATEWAY_NO_EXTENSIONS"}
    emulator = start_emulator(emulator_port, "--ttft-ms", "0", "--tokens-per-s", "0")
    env = {
        **pure_not_asked, "CHATIQ_API_URL": f"http://127.0.0.1:{emulator_port}/api/chat",
        "GATEWAY_PORT": str(port),
    }  # fmt: skip
    gateway = subprocess.Popen(
        [str(venv / "bin" / "chatiq-gateway")], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{port}/api/chatbot", json={"message": "hi"},
                headers={"Authorization": "Bearer demo-key"},  # the packaged config's tenant
            ) as r:  # fmt: skip
                assert r.status == 200
                assert data_events(await r.read())[-1] == "[DONE]"
            async with session.get(f"http://127.0.0.1:{port}/") as r:  # the page, packaged
                assert r.status == 200 and "ChatIQ" in await r.text()
    finally:
        stop(gateway, emulator)
    broken = tmp_path / "broken.toml"
    broken.write_text("[server]\nprot = 1\n")
    checked = await run([str(venv / "bin" / "chatiq-gateway"), "check-config", str(broken)])
    assert checked.returncode == 2 and "server.prot: unknown key" in checked.stderr
    shown = await run([str(venv / "bin" / "chatiq-gateway"), "--version"], env=pure_not_asked)
    assert shown.stdout.strip() == (
        f"chatiq-gateway {metadata.version('chatiq-gateway')} "
        "(pure Python: no compiled modules are installed)"
    )


async def run(
    command: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=600, check=False,
        env=env,
    )  # fmt: skip
