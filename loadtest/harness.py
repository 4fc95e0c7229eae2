"""Shared by the soak test and the benchmarks: ports, processes and /proc readings."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp


def report(text: str, out_dir: str | Path, name: str = "latest.md") -> None:
    """Print a tool's report and keep it as ``out_dir/name``."""
    print(text)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(text)


# Ports this process has handed out: the kernel may give a port just closed
# again, and two asked for in a row (a gateway's and its metrics port) were
# once the same one.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now, and not one this process handed out before."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def answers(url: str) -> bool:
    """Whether ``url`` answers 2xx now (blocking; for scripts and sync tests)."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


def wait_answering(url: str, timeout_s: float = 30.0) -> None:
    """Block until ``url`` answers 2xx."""
    until = time.monotonic() + timeout_s
    while not answers(url):
        if time.monotonic() > until:
            raise SystemExit(f"{url} never answered")
        time.sleep(0.05)


async def wait_ready(url: str, timeout_s: float = 15.0) -> None:
    """Poll ``url`` until it answers 200."""
    async with aiohttp.ClientSession() as session:
        for _ in range(int(timeout_s / 0.05)):
            try:
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise SystemExit(f"{url} never answered")


async def metric_total(
    session: aiohttp.ClientSession, port: int, name: str, containing: str = ""
) -> float:
    """The sum of a metric's samples on the gateway at ``port``'s /metrics: those
    named ``name`` (which may go on into its labels) and holding ``containing``."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{")) and containing in line
    )


def start_emulator(port: int, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "loadtest.emulator", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
    )


def start_gateway(
    config_dir: Path,
    port: int,
    emulator_port: int,
    tenant_key: str,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    prefix: Sequence[str] = (),  # a command to run it under, e.g. prlimit
    cwd: Path | None = None,  # the tree it runs from (default: this one)
    tenant_limits: tuple[int, int] = (0, 0),  # the tenant's max_streams, requests_per_minute
    more_tenants: Sequence[Mapping[str, Any]] = (),  # each: name, key, then any tenant field
    issuers: Sequence[Mapping[str, Any]] = (),  # [[issuers]] tables
    tenant_fields: Mapping[str, Any] | None = None,  # more of the tenant's fields
    env: Mapping[str, str] | None = None,  # variables beside this process's own
    **tables: Any,  # TOML tables: server={...}, upstream={...}
) -> tuple[subprocess.Popen[bytes], Path]:
    """A gateway with one unlimited tenant (and ``more_tenants``); ``tables`` add
    settings (server={...}, ...).

    ``api_key`` is the ChatIQ key it gets in its environment. Its log file lies
    beside its config file.
    """
    server = {"port": port, **tables.pop("server", {})}
    upstream = {
        "url": f"http://127.0.0.1:{emulator_port}/api/chat",
        "bot_slug": "demo",
        **tables.pop("upstream", {}),
    }
    toml = "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
        for name, values in {"server": server, "upstream": upstream, **tables}.items()
    )
    config = config_dir / f"gateway-{port}.toml"
    config.write_text(
        toml + '[[tenants]]\nname = "load"\n'
        f'key_sha256 = "{hashlib.sha256(tenant_key.encode()).hexdigest()}"\n'
        f'bots = ["*"]\nmax_streams = {tenant_limits[0]}\n'
        f"requests_per_minute = {tenant_limits[1]}\n"
        + "".join(f"{k} = {_toml(v)}\n" for k, v in (tenant_fields or {}).items())
        + "".join(_tenant_toml(tenant) for tenant in more_tenants)
        + "".join(
            "[[issuers]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in issuer.items())
            for issuer in issuers
        )
    )
    log = config_dir / f"gateway-{port}.log"
    variables = {k: v for k, v in os.environ.items() if k != "CHATIQ_API_KEY"}
    variables.update(env or {})
    if api_key:
        variables["CHATIQ_API_KEY"] = api_key
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "gateway", "--config", str(config), *extra_args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=variables,
        cwd=cwd,
    )
    return process, log


def _tenant_toml(tenant: Mapping[str, Any]) -> str:
    fields = {k: v for k, v in tenant.items() if k != "key"}
    fields["key_sha256"] = hashlib.sha256(tenant["key"].encode()).hexdigest()
    fields.setdefault("bots", ["*"])
    return "[[tenants]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in fields.items())


def _toml(value: Any) -> str:
    """A TOML value: JSON's form for strings, numbers, booleans and lists; an
    inline table for a dict."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def stop_on_signals() -> list[int]:
    """From now on SIGINT (Ctrl-C) or SIGTERM raises KeyboardInterrupt, also in
    a process a shell started in the background (with SIGINT ignored); the list
    returned gets the signal that did, so that the caller knows whether its
    children got it too (Ctrl-C signals the whole group)."""
    stopped_by: list[int] = []

    def stop_on(signum: int, frame: object) -> None:
        if not stopped_by:
            stopped_by.append(signum)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop_on)
    signal.signal(signal.SIGTERM, stop_on)
    return stopped_by


def wait_exited(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Give ``processes`` up to ``timeout_s`` to exit on their own: after a
    Ctrl-C, which signals the whole group, a second signal would cut a
    gateway's drain short."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        time.sleep(0.05)


def stop(*processes: subprocess.Popen[bytes]) -> None:
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile by rank, exact (no interpolation, no rounding); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
