"""A third-party frontend, installed with pip from the example in
docs/frontends.md and found through its entry point by a real gateway process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.config import ConfigError, settings_from_mapping
from gateway.frontends import load_frontends
from loadtest.emulator import EmulatorSettings
from loadtest.harness import free_port, start_gateway, stop, wait_ready
from tests.helpers import ACME_KEY, CHATIQ_KEY, StackFactory, emulator_text

DOC = Path(__file__).resolve().parent.parent / "docs" / "frontends.md"


def example(after: str, language: str) -> str:
    """The fenced code block that follows the line ``after`` in docs/frontends.md."""
    text = DOC.read_text()
    found = re.search(re.escape(after) + rf".*?```{language}\n(.*?)```", text, re.S)
    assert found, f"no {language} block after {after!r} in {DOC}"
    return found.group(1)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package, built and installed with pip into a folder of its own."""
    source = tmp_path_factory.mktemp("plugin-src")
    (source / "chatiq_text_frontend.py").write_text(example("`chatiq_text_frontend.py`:", "python"))
    (source / "pyproject.toml").write_text(example("`pyproject.toml`:", "toml"))
    site = tmp_path_factory.mktemp("plugin-site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(site.glob("chatiq_text_frontend-*.dist-info/entry_points.txt"))
    return site


@pytest.mark.process
async def test_an_installed_plugin_frontend_serves_through_the_shared_pipeline(
    plugin_site: Path,
    make_stack: StackFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = await make_stack(EmulatorSettings(ttft_s=0, tokens_per_s=0, reply_tokens=12))
    monkeypatch.setenv("PYTHONPATH", str(plugin_site))
    port = free_port()
    assert stack.emulator.port is not None
    process, log = start_gateway(
        tmp_path, port, stack.emulator.port, ACME_KEY, CHATIQ_KEY,
        frontends={"text": {"prefix": "/plain", "farewell": "(end)"}},
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz")
        url = f"http://127.0.0.1:{port}/plain/chat"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                url,
                json={"message": "hi"},
                headers={"Authorization": f"Bearer {ACME_KEY}", "X-Request-Id": "plug-1"},
            ) as r:
                assert r.status == 200 and r.content_type == "text/plain"
                text = await r.text()
            assert text == emulator_text(stack, "plug-1") + "\n(end)\n"
            async with session.post(url, json={"message": "hi"}) as r:  # no key
                assert r.status == 401
                assert await r.text() == "missing API key: send 'Authorization: Bearer <key>'\n"
            async with session.post(
                f"http://127.0.0.1:{port}/api/chatbot",
                json={"message": "hi"},
                headers={"Authorization": f"Bearer {ACME_KEY}"},
            ) as r:
                assert r.status == 200  # the built-in ones are still there
        assert '"frontend": "text"' in log.read_text()
    finally:
        stop(process)


def test_an_unknown_frontend_is_a_config_error_naming_the_known_ones() -> None:
    settings = settings_from_mapping(
        {"upstream": {"url": "http://127.0.0.1:9/api/chat"}, "frontends": {"nope": {}}}, {}
    )
    with pytest.raises(ConfigError, match=r"frontends\.nope: no such frontend \(known: ai-sdk"):
        load_frontends(settings)


def test_a_frontend_can_be_moved_or_turned_off() -> None:
    settings = settings_from_mapping(
        {
            "upstream": {"url": "http://127.0.0.1:9/api/chat"},
            "frontends": {"openai": {"prefix": "/openai/v1"}, "ai-sdk": {"enabled": False}},
        },
        {},
    )
    mounted = {f.name: f.prefix for f in load_frontends(settings)}
    assert mounted == {"chatiq": "/api", "openai": "/openai/v1", "mcp": "/mcp"}
    with pytest.raises(ConfigError, match=r"frontends\.openai\.prefix"):
        settings_from_mapping(
            {"upstream": {"url": "http://h/a"}, "frontends": {"openai": {"prefix": "v1/"}}}, {}
        )
