"""``make bench``: the gateway side by side with direct, nginx and a naive proxy.

In one run, against one emulator per concurrency level, the load generator
(``loadtest/loadgen.py``) streams through five paths in turn:

- ``direct``: straight to the emulator, the baseline;
- ``gateway``: one ``chatiq-gateway`` process, its shipped defaults but limits
  raised for the load, logging at info (one line per stream);
- ``resumable``: the same gateway process, each stream resumable
  (``X-Resumable: 1``: an id line per event, read into a journal by a task
  of its own, the client served from the journal);
- ``openai``: the same gateway process, through its OpenAI-compatible
  frontend (every event re-encoded as a ``chat.completion.chunk``);
- ``responses``: the same gateway process, through OpenAI's Responses API
  (every content event a ``response.output_text.delta``, with the response's
  eight opening and closing events around them);
- ``mcp``: the same gateway process, as an MCP server: one ``tools/call`` a
  stream, every content event a ``notifications/progress``, then the result
  (the whole reply again);
- ``nginx``: one nginx worker configured as an SSE proxy (``loadtest/nginx.py``);
- ``naive``: the Flask proxy people write from ChatIQ's example
  (``loadtest/naive_proxy.py``).

For each level it reports time to first event and the gap between events
(the absolute figures, and what each proxy adds over direct), errors, the
proxy's CPU seconds per 100,000 relayed events and its peak RSS, and the CPU
used by the emulator and the load generator so that a bottleneck there is
visible. Then it opens as many slow streams as one gateway process may hold
(10,000, or what the open-files limit allows) and reports its RSS per stream.
The table goes to ``results/bench/<time>.md`` and ``results/bench/latest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from loadtest.chart import terminal_table, write_chart
from loadtest.fleet import start_redis
from loadtest.harness import (
    cpu_seconds,
    free_port,
    percentile,
    rss_mib,
    start_emulator,
    start_gateway,
    stop,
)
from loadtest.harness import wait_ready as wait_http_ready
from loadtest.loadgen import Target, hold_streams, run_streams
from loadtest.nginx import UPSTREAM_IDLE_S, start_nginx

KEY = "bench-key"
PATHS = ("direct", "gateway", "resumable", "openai", "responses", "mcp", "nginx", "naive")
# On request only (--paths): the gateway's path through a gateway process of
# its own: one that traces (OpenTelemetry, to an OTLP sink), sampling this share
# of requests; "twin", a second plain one, to see what two processes differ by
# alone; "pure", one on the pure-Python path (CHATIQ_GATEWAY_NO_EXTENSIONS).
TRACED_PATHS: dict[str, float | None] = {"traced": 1.0, "sampled": 0.01, "twin": None, "pure": None}
PURE_PATH = "pure"
# On request too: the gateway's path with a JWT from an identity provider
# ([[issuers]], its keys served by loadtest.jwks_server) instead of a tenant key.
TOKEN_PATH = "token"
ON_REQUEST = (*TRACED_PATHS, TOKEN_PATH)  # each compared with the gateway's own path
TOKENS = 20  # content events per reply, by default
TTFT_MS = 100  # the emulator's own time to first token
EVENTS_PER_S = 6_000  # across all streams: keeps the emulator and the load generator light


@dataclass(frozen=True)
class Plan:
    concurrency: int
    tokens: int
    tokens_per_s: float
    duration_s: float
    ramp_s: float
    burst: bool = False  # each user streams once: every stream starts within ramp_s

    @classmethod
    def for_level(
        cls, concurrency: int, tokens: int, min_duration_s: float, ramp_s: float | None = None
    ) -> Plan:
        rate = min(50.0, EVENTS_PER_S / concurrency)
        stream_s = TTFT_MS / 1000 + tokens / rate
        if ramp_s is not None:  # a burst: as many new streams a second as it takes
            return cls(concurrency, tokens, rate, ramp_s + stream_s, ramp_s, burst=True)
        return cls(concurrency, tokens, rate, max(min_duration_s, 1.5 * stream_s), stream_s)


@dataclass
class PathResult:
    path: str
    streams: int
    errors: int
    error_kinds: dict[str, int]
    ttft_ms: list[float]
    gap_ms: list[float]
    events: int
    proxy_cpu_s: float | None
    proxy_peak_rss_mib: float | None
    emulator_cpu: float  # share of one core over the run
    loadgen_cpu: float
    # With --rounds: each round's proxy CPU s / 100k events (the pooled figure
    # is the table's; these show the spread).
    round_cpu: list[float] = field(default_factory=list)

    def cpu_per_100k(self) -> float | None:
        if self.proxy_cpu_s is None or not self.events:
            return None
        return self.proxy_cpu_s / self.events * 100_000


def pooled(rounds: list[PathResult]) -> PathResult:
    """One path's rounds as one result: streams, events and CPU summed, the
    latencies pooled, the busiest round's emulator and load generator."""
    first = rounds[0]
    kinds: dict[str, int] = {}
    for r in rounds:
        for kind, n in r.error_kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    cpus = [r.proxy_cpu_s for r in rounds if r.proxy_cpu_s is not None]
    rss = [r.proxy_peak_rss_mib for r in rounds if r.proxy_peak_rss_mib is not None]
    per_round = [c for c in (r.cpu_per_100k() for r in rounds) if c is not None]
    return PathResult(
        path=first.path,
        streams=sum(r.streams for r in rounds),
        errors=sum(r.errors for r in rounds),
        error_kinds=kinds,
        ttft_ms=[t for r in rounds for t in r.ttft_ms],
        gap_ms=[g for r in rounds for g in r.gap_ms],
        events=sum(r.events for r in rounds),
        proxy_cpu_s=sum(cpus) if cpus else None,
        proxy_peak_rss_mib=max(rss) if rss else None,
        emulator_cpu=max(r.emulator_cpu for r in rounds),
        loadgen_cpu=max(r.loadgen_cpu for r in rounds),
        round_cpu=per_round if len(rounds) > 1 else [],
    )


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (nginx's workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                pids.append(int(entry))
    return pids


def tree_cpu(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_peak_rss_mib(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
    return total


def open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def wait_tcp(port: int, timeout_s: float = 15.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
    raise SystemExit(f"nothing listens on port {port}")


class Stack:
    """The emulator and the three proxies in front of it, for one level."""

    def __init__(
        self,
        workdir: Path,
        emulator_args: list[str],
        gateway_tables: dict[str, Any],
        redis: bool = False,
        traced: tuple[str, ...] = (),  # of TRACED_PATHS
        token: bool = False,  # the token path: the gateway takes an issuer's JWTs too
    ) -> None:
        self.workdir = workdir
        names = ("emulator", "gateway", "nginx", "naive", "sink", "jwks", *traced)
        self.ports = {name: free_port() for name in names}
        self.jwks: subprocess.Popen[bytes] | None = None
        self.token = ""
        if token:
            self.jwks, self.token, issuer = start_issuer(workdir, self.ports["jwks"])
            gateway_tables = {**gateway_tables, "issuers": [issuer]}
        self.emulator = start_emulator(self.ports["emulator"], *emulator_args)
        self.sink: subprocess.Popen[bytes] | None = None
        self.traced: dict[str, subprocess.Popen[bytes]] = {}
        if any(TRACED_PATHS[path] is not None for path in traced):
            self.sink = subprocess.Popen(
                [sys.executable, "-m", "loadtest.otlp_sink", "--port", str(self.ports["sink"])],
                stdout=subprocess.DEVNULL,
            )
        for path in traced:
            ratio = TRACED_PATHS[path]
            env = {"CHATIQ_GATEWAY_NO_EXTENSIONS": "1"} if path == PURE_PATH else {}
            if ratio is not None:
                env = {
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.ports['sink']}",
                    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": str(ratio),
                }
            self.traced[path], _ = start_gateway(
                workdir, self.ports[path], self.ports["emulator"], KEY, None, (),
                env=env, **gateway_tables,
            )  # fmt: skip
        self.redis: subprocess.Popen[bytes] | None = None
        limits = (0, 0)
        if redis:  # quotas in Redis, with limits so high they never bite but are checked
            redis_port = free_port()
            self.redis = start_redis(workdir, redis_port)
            gateway_tables = {**gateway_tables, "redis": {"url": f"redis://127.0.0.1:{redis_port}"}}
            limits = (1_000_000, 100_000_000)
        self.gateway, _ = start_gateway(
            workdir, self.ports["gateway"], self.ports["emulator"], KEY, None, (),
            tenant_limits=limits, **gateway_tables,
        )  # fmt: skip
        self.nginx: subprocess.Popen[bytes] | None = None  # once the gateway's workers are known
        self.naive = subprocess.Popen(
            [
                sys.executable, "-m", "loadtest.naive_proxy", "--port", str(self.ports["naive"]),
                "--upstream", f"http://127.0.0.1:{self.ports['emulator']}/api/chat",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def ready(self) -> None:
        if self.jwks is not None:  # before the gateway fetches its keys
            await wait_tcp(self.ports["jwks"])
        for name in ("gateway", *self.traced):
            await wait_http_ready(f"http://127.0.0.1:{self.ports[name]}/healthz")
        if self.sink is not None:
            await wait_http_ready(f"http://127.0.0.1:{self.ports['sink']}/stats")
        # nginx with as many workers as the gateway has (its supervisor's children)
        workers = max(1, len(process_tree(self.gateway.pid)) - 1)
        self.nginx = start_nginx(
            self.workdir / f"nginx-{self.ports['nginx']}", self.ports["nginx"],
            self.ports["emulator"], open_files_limit(), workers,
        )  # fmt: skip
        for name in ("emulator", "nginx", "naive"):
            await wait_tcp(self.ports[name])

    def target(self, path: str) -> Target:
        message = "How do I reset my password?"
        if path in ("direct", "nginx"):  # ChatIQ's own API
            port = self.ports["emulator" if path == "direct" else "nginx"]
            body = {"message": message, "bot_slug": "demo", "stream": True}
            return Target("127.0.0.1", port, "/api/chat", body)
        if path == "openai":  # the gateway's OpenAI-compatible frontend
            chat = {"model": "demo", "messages": [{"role": "user", "content": message}]}
            body = {**chat, "stream": True}
            port = self.ports["gateway"]
            return Target("127.0.0.1", port, "/v1/chat/completions", body, key=KEY)
        if path == "responses":  # the same frontend's Responses API
            body = {"model": "demo", "input": message, "stream": True}
            return Target(
                "127.0.0.1", self.ports["gateway"], "/v1/responses", body, key=KEY,
                end_marker=b"event: response.completed\n",
            )  # fmt: skip
        if path == "mcp":  # the gateway as an MCP server: one tool call a stream
            call = {
                "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "ask_demo", "arguments": {"question": message},
                           "_meta": {"progressToken": 1}},
            }  # fmt: skip
            return Target(
                "127.0.0.1", self.ports["gateway"], "/mcp", call, key=KEY,
                end_marker=b'"isError":false}}\n\n',
            )  # fmt: skip
        body = {"message": message, "bot": "demo", "stream": True}  # the gateway's API
        if path == "resumable":
            port, resumable = self.ports["gateway"], (("X-Resumable", "1"),)
            return Target("127.0.0.1", port, "/api/chatbot", body, key=KEY, headers=resumable)
        if path == TOKEN_PATH:  # one service's token, as its every request sends it
            return Target("127.0.0.1", self.ports["gateway"], "/api/chatbot", body, key=self.token)
        return Target("127.0.0.1", self.ports[path], "/api/chatbot", body, key=KEY)  # + traced

    def proxy_pid(self, path: str) -> int | None:
        gateway = self.gateway
        proxies = {
            "gateway": gateway, "resumable": gateway, "openai": gateway, "responses": gateway,
            "mcp": gateway, "nginx": self.nginx, TOKEN_PATH: gateway,
        }  # fmt: skip
        proxy = {**proxies, "naive": self.naive, **self.traced}.get(path)
        return proxy.pid if proxy is not None else None

    def stop(self) -> None:
        stop(self.gateway, self.naive, *([self.nginx] if self.nginx else []), self.emulator)
        if self.jwks is not None:
            stop(self.jwks)
        stop(*self.traced.values(), *([self.sink] if self.sink else []))
        if self.redis is not None:
            stop(self.redis)


GATEWAY_TABLES: dict[str, dict[str, Any]] = {
    # Room for the capacity run's 9,900 streams. No more: the gateway keeps
    # server.max_connections + upstream.max_connections within its open-files
    # limit (20,000 here), lowering the former to fit.
    "admission": {"max_streams": 10_000, "max_queue": 2_000, "tenant_max_streams": 0},
    # Idle upstream connections kept as long as nginx keeps them, and reused at
    # any age within a run (nginx's keepalive_time is an hour).
    "upstream": {
        "max_connections": 10_000,
        "pool_idle_s": UPSTREAM_IDLE_S,
        "connection_max_age_s": 3600,
    },
    "logging": {"format": "json"},
    "resume": {"enabled": True},  # only the resumable path's streams ask for it
}


def start_issuer(workdir: Path, port: int) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """A stand-in identity provider: an RSA key, its public JWKS served on
    ``port``, a token for the gateway signed with it (valid for a day), and
    the ``[[issuers]]`` table that trusts it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    (workdir / "jwks.json").write_text(json.dumps({"keys": [{**public, "kid": "bench"}]}))
    server = subprocess.Popen(
        [sys.executable, "-m", "loadtest.jwks_server", "--port", str(port),
         "--jwks", str(workdir / "jwks.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    issuer = f"http://127.0.0.1:{port}"
    now = int(time.time())
    claims = {"iss": issuer, "aud": "chatiq-gateway", "sub": "bench-service", "iat": now,
              "exp": now + 86400}  # fmt: skip
    token = jwt.encode(claims, key, "RS256", headers={"kid": "bench"})
    table = {"issuer": issuer, "audience": "chatiq-gateway", "tenant": "load",
             "jwks_url": f"{issuer}/jwks"}  # fmt: skip
    return server, token, table


@contextmanager
def stack(
    workdir: Path,
    emulator_args: list[str],
    workers: int | str = 1,
    redis: bool = False,
    traced: tuple[str, ...] = (),
    token: bool = False,
) -> Iterator[Stack]:
    tables = {**GATEWAY_TABLES, "server": {"workers": workers}}
    s = Stack(workdir, emulator_args, tables, redis, traced, token)
    try:
        yield s
    finally:
        s.stop()


async def measure_path(s: Stack, path: str, plan: Plan) -> PathResult:
    pid = s.proxy_pid(path)
    cpu_before = tree_cpu(pid) if pid else 0.0
    emu_before = cpu_seconds(s.emulator.pid)
    own_before = time.process_time()
    wall = time.perf_counter()
    results = await run_streams(
        s.target(path), plan.concurrency, plan.duration_s, plan.ramp_s, timeout_s=120,
        once=plan.burst,
    )  # fmt: skip
    wall = time.perf_counter() - wall
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None or not r.done:
            kind = (r.error or "no [DONE]").split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    good = [r for r in results if r.error is None and r.done]
    return PathResult(
        path=path,
        streams=len(results),
        errors=sum(errors.values()),
        error_kinds=errors,
        ttft_ms=[r.ttft * 1000 for r in good if r.ttft is not None],
        gap_ms=[g * 1000 for r in good for g in r.gaps()],
        events=sum(len(r.event_times) for r in results),
        proxy_cpu_s=(tree_cpu(pid) - cpu_before) if pid else None,
        proxy_peak_rss_mib=tree_peak_rss_mib(pid) if pid else None,
        emulator_cpu=(cpu_seconds(s.emulator.pid) - emu_before) / wall,
        loadgen_cpu=(time.process_time() - own_before) / wall,
    )


class Progress:
    """One line a step, with what is left: the run's plan, known from the start."""

    SETUP_S = 4.0  # starting a level's processes, and the pauses between paths

    def __init__(self, plans: list[Plan], paths: int, hold_s: float, rounds: int = 1) -> None:
        self.steps = len(plans) * paths * rounds
        self.left_s = sum((p.duration_s + self.SETUP_S) * paths * rounds for p in plans) + hold_s
        self.done = 0

    def step(self, plan: Plan, path: str) -> None:
        self.done += 1
        minutes, seconds = divmod(int(self.left_s), 60)
        print(
            f"bench: [{self.done}/{self.steps}] {plan.concurrency:,} streams via {path} for "
            f"{plan.duration_s:.0f} s; about {minutes}:{seconds:02d} left",
            flush=True,
        )
        self.left_s -= plan.duration_s + self.SETUP_S


async def run_level(
    workdir: Path,
    plan: Plan,
    paths: tuple[str, ...],
    workers: int | str,
    redis: bool = False,
    progress: Progress | None = None,
    rounds: int = 1,
) -> list[PathResult]:
    """Each path in turn, ``rounds`` times over (interleaved, so that the
    machine's drift falls on every path alike), pooled per path."""
    emulator_args = [
        "--ttft-ms", str(TTFT_MS), "--tokens-per-s", str(plan.tokens_per_s),
        "--reply-tokens", str(plan.tokens),
    ]  # fmt: skip
    traced = tuple(p for p in paths if p in TRACED_PATHS)
    with stack(workdir, emulator_args, workers, redis, traced, TOKEN_PATH in paths) as s:
        await s.ready()
        measured: dict[str, list[PathResult]] = {path: [] for path in paths}
        for _ in range(rounds):
            for path in paths:
                if progress is not None:
                    progress.step(plan, path)
                measured[path].append(await measure_path(s, path, plan))
                await asyncio.sleep(1)  # let sockets close before the next path
        return [pooled(measured[path]) for path in paths]


@dataclass
class Capacity:
    target: int
    open_streams: int
    errors: int
    error_kinds: dict[str, int]
    baseline_rss_mib: float
    rss_mib: float
    fd_limit: int

    @property
    def per_stream_kib(self) -> float:
        return (self.rss_mib - self.baseline_rss_mib) * 1024 / max(1, self.open_streams)


async def run_capacity(workdir: Path, target: int, hold_s: float) -> Capacity:
    fd_limit = open_files_limit()
    # Two sockets a stream in the gateway (client and upstream), and a margin.
    count = min(target, (fd_limit - 200) // 2)
    # One token every 5 s: the streams stay open, nearly idle, for the whole hold.
    emulator_args = ["--ttft-ms", "100", "--tokens-per-s", "0.2", "--reply-tokens", "200"]
    with stack(workdir, emulator_args) as s:
        await s.ready()
        baseline = rss_mib(s.gateway.pid)
        print(f"bench: opening {count} slow streams through one gateway process", flush=True)
        open_now, results = await hold_streams(
            s.target("gateway"), count, ramp_s=count / 1000, hold_s=hold_s, timeout_s=60
        )
        rss = rss_mib(s.gateway.pid)  # sampled by hold_streams' end, streams still open
        kinds: dict[str, int] = {}
        for r in results:
            if r.error is not None:
                kinds[r.error] = kinds.get(r.error, 0) + 1
            elif not r.event_times:
                kinds["no event yet"] = kinds.get("no event yet", 0) + 1
        return Capacity(
            target=target,
            open_streams=open_now,
            errors=sum(kinds.values()),
            error_kinds=kinds,
            baseline_rss_mib=baseline,
            rss_mib=rss,
            fd_limit=fd_limit,
        )


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()} ({sys.base_prefix})"
    )


def fmt(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None or value != value:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def added(values: list[float], direct: list[float]) -> str:
    """The p50 and p99 of ``values`` minus those of ``direct``."""
    return " / ".join(
        fmt(percentile(values, q) - percentile(direct, q), 2, signed=True) for q in (0.5, 0.99)
    )


def round_ratios(levels: list[tuple[Plan, list[PathResult]]]) -> list[str]:
    """With --rounds: each proxy's CPU per event over nginx's, round by round
    (a traced or token path's over the plain gateway's)."""
    out: list[str] = []
    for plan, results in levels:
        by_path = {r.path: r for r in results}
        for r in results:
            base = by_path.get("gateway" if r.path in ON_REQUEST else "nginx")
            if base is None or r is base or not base.round_cpu:
                continue
            if len(r.round_cpu) != len(base.round_cpu):
                continue
            if not all(base.round_cpu):  # CPU is counted in clock ticks: a round too short
                out.append(
                    f"Rounds: {plan.concurrency:,} streams: {base.path} used no measurable CPU "
                    "in a round; lengthen them (--min-duration) to compare round by round."
                )
                break
            each = [a / b for a, b in zip(r.round_cpu, base.round_cpu, strict=True)]
            ratios = sorted(each)
            rounds = ", ".join(f"{x:.2f}x" for x in each)
            pooled_cpu, base_cpu = r.cpu_per_100k(), base.cpu_per_100k()
            assert pooled_cpu is not None and base_cpu is not None
            out.append(
                f"Rounds: {plan.concurrency:,} streams, {r.path} CPU per event / {base.path}'s: "
                f"{rounds} (median {ratios[len(ratios) // 2]:.2f}x, "
                f"pooled {pooled_cpu / base_cpu:.2f}x)."
            )
    return ["", *out] if out else []


def report(
    levels: list[tuple[Plan, list[PathResult]]], capacity: Capacity | None, command: str
) -> str:
    tokens = levels[0][0].tokens if levels else TOKENS
    lines = [
        f"Machine: {machine()}. Command: `{command}`. Emulator: {TTFT_MS} ms to the first "
        f"token, {tokens} tokens a reply, at a rate per level such that all streams together "
        f"ask for about {EVENTS_PER_S:,} events/s. Added = the path's percentile minus direct's."
        + (
            f" A burst: every stream of a level started within {levels[0][0].ramp_s:g} s, "
            "one reply each."
            if levels and levels[0][0].burst
            else ""
        ),
        "",
        "| streams | path | streams done | errors | TTFT p50 / p99 ms "
        "| added TTFT p50 / p99 ms | gap p50 / p99 ms | added gap p50 / p99 ms "
        "| proxy CPU s / 100k events | proxy peak RSS MiB | emulator CPU | loadgen CPU |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    warnings = []
    for plan, results in levels:
        direct = next((r for r in results if r.path == "direct"), None)
        for r in results:
            t50, t99 = percentile(r.ttft_ms, 0.5), percentile(r.ttft_ms, 0.99)
            g50, g99 = percentile(r.gap_ms, 0.5), percentile(r.gap_ms, 0.99)
            if direct is not None and r is not direct:
                added_t = added(r.ttft_ms, direct.ttft_ms)
                added_g = added(r.gap_ms, direct.gap_ms)
            else:
                added_t = added_g = "–"
            per_100k = r.cpu_per_100k()
            cpu = "–" if per_100k is None else fmt(per_100k, 2)
            errors = str(r.errors) + (
                " (" + ", ".join(f"{k} {v}" for k, v in sorted(r.error_kinds.items())) + ")"
                if r.error_kinds
                else ""
            )
            lines.append(
                f"| {plan.concurrency:,} | {r.path} | {r.streams - r.errors:,} | {errors} "
                f"| {fmt(t50)} / {fmt(t99)} | {added_t} | {fmt(g50)} / {fmt(g99)} | {added_g} "
                f"| {cpu} | {fmt(r.proxy_peak_rss_mib)} "
                f"| {r.emulator_cpu:.0%} | {r.loadgen_cpu:.0%} |"
            )
            for who, share in (("emulator", r.emulator_cpu), ("load generator", r.loadgen_cpu)):
                if share > 0.8:
                    warnings.append(
                        f"- {plan.concurrency:,} streams via {r.path}: the {who} used {share:.0%} "
                        "of a core: it may be the bottleneck, read this row with care."
                    )
    lines.append("")
    lines.extend(
        warnings
        or [
            "The emulator and the load generator stayed under 80% of a core on every row: "
            "neither was the bottleneck."
        ]
    )
    lines += round_ratios(levels)
    if capacity is not None:
        c = capacity
        lines += [
            "",
            f"Open streams held by one gateway process: **{c.open_streams:,}** of "
            f"{min(c.target, (c.fd_limit - 200) // 2):,} opened (target {c.target:,}; "
            f"open-files limit {c.fd_limit:,}, two sockets a stream), {c.errors} failed "
            f"{c.error_kinds or ''}; "
            f"RSS {c.baseline_rss_mib:.0f} MiB idle, {c.rss_mib:.0f} MiB holding them: "
            f"**{c.per_stream_kib:.1f} KiB per stream**.",
        ]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> int:
    try:
        import uvloop

        uvloop.install()  # the load generator's own loop: cheaper per event
    except ImportError:
        pass
    open_files_limit()
    levels = [int(x) for x in args.levels.split(",") if x]
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = [p for p in paths if p not in PATHS and p not in ON_REQUEST]
    if unknown:
        raise SystemExit(f"bench: no path {', '.join(unknown)}")
    workdir = Path(tempfile.mkdtemp(prefix="chatiq-bench-"))
    plans = [Plan.for_level(c, args.tokens, args.min_duration, args.ramp) for c in levels]
    hold_s = args.hold_seconds + 20 if args.hold else 0
    progress = Progress(plans, len(paths), hold_s, args.rounds)
    try:
        results = []
        for plan in plans:
            levels_run = await run_level(
                workdir, plan, paths, args.workers, args.redis, progress, args.rounds
            )
            results.append((plan, levels_run))
        capacity = await run_capacity(workdir, args.hold, args.hold_seconds) if args.hold else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(
        results, capacity, "make bench" + (f' ARGS="{" ".join(args.raw)}"' if args.raw else "")
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{stamp}.md").write_text(text)
    (out / "latest.md").write_text(text)
    by_level = [(plan.concurrency, level) for plan, level in results]
    chart = out / f"{stamp}.png"
    write_chart(by_level, chart, machine())
    shutil.copyfile(chart, out / "latest.png")
    print(terminal_table(by_level))
    for line in text.splitlines():  # the verdicts below the full table
        if line.startswith(("The emulator", "Open streams", "Warning", "Rounds:")):
            print(line)
    print(
        f"bench: the full table in {out / (stamp + '.md')} (and latest.md), "
        f"the chart in {chart} (and latest.png)"
    )
    return 0


def _workers(value: str) -> int | str:
    """A count, or "auto" (the gateway decides; nginx then gets as many)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'auto', not {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,100,1000,5000", help="concurrent streams")
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help="comma-separated, of: " + ", ".join(PATHS) + " (and, when asked: traced, the "
        "gateway tracing every request; sampled, 1%% of them; twin, a second untraced one; "
        "pure, one on the pure-Python path; token, the gateway's path with an identity "
        "provider's JWT for a key)",
    )
    parser.add_argument("--tokens", type=int, default=TOKENS, help="content events a reply")
    parser.add_argument("--min-duration", type=float, default=8.0, help="seconds per path")
    parser.add_argument(
        "--ramp", type=float, default=None, metavar="S",
        help="a burst: every stream of a level started within S seconds, one reply each "
        "(default: streams one after another, their starts spread over a stream's length)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="measure every path this many times, interleaved, and pool them (spread reported)",
    )  # fmt: skip
    parser.add_argument("--hold", type=int, default=10_000, help="open streams to hold (0: skip)")
    parser.add_argument("--hold-seconds", type=float, default=10.0, help="how long to hold them")
    parser.add_argument(
        "--workers", type=_workers, default=1,
        help="gateway worker processes, and as many nginx workers; 'auto': one per core the "
        "gateway may use",
    )  # fmt: skip
    parser.add_argument(
        "--redis", action="store_true",
        help="the gateway's tenant quotas in a local redis-server (checked, never biting)",
    )  # fmt: skip
    parser.add_argument("--out", default="results/bench", help="where the table and chart go")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.raw = argv
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
