"""Settings: the shipped file loads; the environment overrides; bad input is one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.auth.tenants import hash_key
from gateway.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "config" / "gateway.toml"
GOOD = f"""
[upstream]
url = "http://127.0.0.1:9/api/chat"

[[tenants]]
name = "t"
key_sha256 = "{hash_key("k")}"
bots = ["demo"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_the_shipped_config_serves_the_demo_tenant_against_the_emulator() -> None:
    settings = load_settings(SHIPPED, environ={})
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8080)
    assert settings.upstream.url == "http://127.0.0.1:8181/api/chat"
    (demo,) = settings.tenants
    assert demo.name == "demo" and demo.key_sha256 == hash_key("demo-key")
    assert settings.upstream.api_key is None


def test_the_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "CHATIQ_API_URL": "https://www.chatiq.io/api/chat",
        "CHATIQ_API_KEY": "sk-secret",
        "CHATIQ_BOT_SLUG": "support",
        "GATEWAY_HOST": "0.0.0.0",
        "GATEWAY_PORT": "9999",
    }
    s = load_settings(write(tmp_path, GOOD), environ=env)
    assert s.upstream.url == "https://www.chatiq.io/api/chat"
    assert s.upstream.api_key == "sk-secret"
    assert s.upstream.bot_slug == "support"
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9999)
    assert "sk-secret" not in repr(s)


def test_settings_are_immutable(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, GOOD), environ={})
    with pytest.raises(AttributeError):
        s.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (GOOD + "\n[server]\nprot = 1\n", {}, "server.prot: unknown key"),
        (GOOD + "\n[server]\nport = '80'\n", {}, "server.port: must be a whole number, not str"),
        (GOOD + "\n[server]\nport = 70000\n", {}, "server.port: must be between"),
        (GOOD + "\n[logging]\nlevel = 'loud'\n", {}, "logging.level"),
        (GOOD + "\n[server]\nevent_loop = 'trio'\n", {}, "server.event_loop: must be auto"),
        (GOOD + "\n[server]\nbacklog = 0\n", {}, "server.backlog: must be greater than 0"),
        (GOOD + "\n[admission]\nmax_streams = 0\n", {}, "admission.max_streams"),
        (GOOD.replace('url = "http://127.0.0.1:9/api/chat"', ""), {}, "upstream.url: missing"),
        (GOOD.replace("http://127.0.0.1:9", "ftp://x"), {}, "upstream.url: must be an http(s)"),
        (GOOD, {"CHATIQ_API_URL": "https://chatiq.io/api/chat"}, "use https://www.chatiq.io"),
        (GOOD.replace(hash_key("k"), "demo-key"), {}, "tenants[0].key_sha256: must be 64"),
        (GOOD.replace('bots = ["demo"]', "bots = []"), {}, "tenants[0].bots"),
        (GOOD.replace('bots = ["demo"]', 'bots = "demo"'), {}, "tenants[0].bots: must be a list"),
        (GOOD.replace('name = "t"\n', ""), {}, "tenants[0].name: missing"),
        (GOOD + "\n[upstream.extra]\n", {}, "upstream.extra: unknown key"),
        (GOOD + "\n[telemetry]\n", {}, "telemetry: unknown key"),
        (GOOD + '\n[logs]\nuser = "hash"\n', {}, "logs: unknown key (did you mean [logging]?)"),
        (GOOD + "\n[issuer]\n", {}, "issuer: unknown key (did you mean [[issuers]]?)"),
        (GOOD.replace("[upstream]", '[upstream]\napi_key = "sk"'), {}, "CHATIQ_API_KEY"),
        (GOOD, {"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT: not a whole number"),
        # The key and URL go into a request head as they are: no line breaks, no spaces.
        (GOOD, {"CHATIQ_API_KEY": "sk-1\r\nX-Evil: 1"}, "CHATIQ_API_KEY: only visible"),
        (GOOD, {"CHATIQ_API_KEY": "sk-1\n"}, "CHATIQ_API_KEY: only visible"),
        (GOOD, {"CHATIQ_API_URL": "http://h/a b"}, "upstream.url: spaces and control"),
        ("[server\n", {}, "not valid TOML"),
        (
            GOOD + "\n[admission]\nmax_streams = 3000\n",
            {},
            "admission.max_streams (3000) is above upstream.max_connections (2000)",
        ),
        (GOOD + "\n[circuit]\nfailure_threshold = 5\n", {}, "circuit.failure_threshold: no long"),
        (GOOD + "\n[circuit]\nfailure_rate = 1.5\n", {}, "circuit.failure_rate: must be a share"),
        (GOOD + "\n[server]\nbody_timeout_s = 0\n", {}, "server.body_timeout_s: must be greater"),
        (GOOD, {"ALL_PROXY": "socks5://p:1"}, "only http:// proxies"),
        (GOOD.replace("[upstream]", '[upstream]\nca_file = "/nope.pem"'), {}, "upstream.ca_file"),
    ],
)
def test_a_bad_config_names_the_key_and_what_is_wrong(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ=env)
    assert message in str(caught.value)


def test_two_tenants_with_the_same_key_are_refused(tmp_path: Path) -> None:
    twice = GOOD + GOOD.split("\n\n", 2)[-1].replace('name = "t"', 'name = "u"')
    with pytest.raises(ConfigError, match=r"tenants\[1\].key_sha256: the same key"):
        load_settings(write(tmp_path, twice), environ={})


def test_a_tenant_may_have_more_keys_each_a_hash_and_each_its_own(tmp_path: Path) -> None:
    more = f'more_keys_sha256 = ["{hash_key("k2")}", "{hash_key("k3")}"]\n'
    (tenant,) = load_settings(write(tmp_path, GOOD + more), environ={}).tenants
    assert tenant.keys_sha256 == (hash_key("k"), hash_key("k2"), hash_key("k3"))
    for bad, message in [
        (f'more_keys_sha256 = ["{hash_key("k")}"]', "more_keys_sha256: the same key"),
        ('more_keys_sha256 = ["k2"]', "more_keys_sha256: must be 64 lowercase hex"),
        (f'more_keys_sha256 = "{hash_key("k2")}"', "more_keys_sha256: must be a list"),
    ]:
        with pytest.raises(ConfigError, match=rf"tenants\[0\]\.{message}"):
            load_settings(write(tmp_path, GOOD + bad + "\n"), environ={})
    other = GOOD.split("\n\n", 2)[-1].replace('name = "t"', 'name = "u"')
    other = other.replace(hash_key("k"), hash_key("u")) + f'more_keys_sha256 = ["{hash_key("k")}"]'
    with pytest.raises(ConfigError, match=r"tenants\[1\]\.more_keys_sha256: the same key"):
        load_settings(write(tmp_path, GOOD + other + "\n"), environ={})


@pytest.mark.process
def test_the_gateway_stops_on_a_bad_config_with_one_line_and_no_traceback(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, GOOD + "\n[server]\nprot = 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "chatiq-gateway: config error: server.prot: unknown key"
    ]
