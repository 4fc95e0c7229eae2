"""``make fleet``: a fleet on one machine, until Ctrl-C: Redis, the emulator,
two gateway replicas sharing tenant quotas and resumable streams through
Redis, and HAProxy in front of them on the port ``make run`` uses (8080). A
replica that exits (``kill -TERM`` one to watch a rolling restart) is started
again on its port.

HAProxy is configured as a gateway needs: HTTP keep-alive on both sides,
``option http-no-delay`` (else it batches small writes, holding tokens back
by up to ~200 ms), no buffering of responses, a health check on ``/readyz``
every half second (a draining replica leaves the rotation at once while its
live streams finish), and a retry on another replica of a request answered
503 before it started (the short moment before the check notices a drain).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .harness import (
    answers,
    free_port,
    start_emulator,
    start_gateway,
    stop,
    stop_on_signals,
    wait_answering,
    wait_exited,
)

DEMO_KEY = "demo-key"

HAPROXY_CONF = """\
global
    maxconn 4000
    log stderr format short local0 warning

defaults
    mode http
    log global
    option http-no-delay
    option http-buffer-request
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 503
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend chat
    bind {host}:{port}
    default_backend gateways

backend gateways
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fastinter 250ms fall 1 rise 2
{servers}
"""


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )


def start_haproxy(
    folder: Path, port: int, backends: list[int], host: str = "127.0.0.1"
) -> subprocess.Popen[bytes]:
    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("fleet: haproxy is not installed (apt-get install haproxy)")
    servers = "\n".join(
        f"    server gw{i} 127.0.0.1:{p} check" for i, p in enumerate(backends, start=1)
    )
    config = folder / "haproxy.cfg"
    config.write_text(HAPROXY_CONF.format(host=host, port=port, servers=servers))
    return subprocess.Popen([binary, "-W", "-db", "-f", str(config)], stderr=subprocess.DEVNULL)


def start_redis(folder: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("fleet: redis-server is not installed (apt-get install redis-server)")
    # In a session of its own: a terminal's Ctrl-C (which signals the whole
    # group) must not stop it before the replicas that still write to it have
    # drained; the fleet stops it last.
    return subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


@dataclass
class Fleet:
    port: int  # HAProxy's
    replicas: list[tuple[subprocess.Popen[bytes], int, Path]] = field(default_factory=list)
    others: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis: subprocess.Popen[bytes] | None = None  # also in others; in a session of its own
    # Starts a replica on a port (and returns it with its log): kept for restarts.
    start_replica: Callable[[int], tuple[subprocess.Popen[bytes], Path]] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restart_exited(self) -> list[tuple[int, int, int]]:
        """Start again, on its own port, every replica that exited: the port, the
        exit code and the new pid of each."""
        restarted = []
        for i, (process, port, _) in enumerate(self.replicas):
            code = process.poll()
            if code is not None and self.start_replica is not None:
                process, log = self.start_replica(port)
                self.replicas[i] = (process, port, log)
                restarted.append((port, code, process.pid))
        return restarted

    def stop(self) -> None:
        stop(*(p for p, _, _ in self.replicas), *self.others)


def start_fleet(
    folder: Path,
    port: int,
    replicas: int = 2,
    emulator_args: tuple[str, ...] = (),
    key: str = DEMO_KEY,
    redis: bool = True,
    tenant_limits: tuple[int, int] = (0, 0),
    **tables: Any,
) -> Fleet:
    """Redis (unless ``redis`` is False), the emulator, ``replicas`` gateways, HAProxy."""
    fleet = Fleet(port)
    try:
        emulator_port = free_port()
        fleet.others.append(start_emulator(emulator_port, *emulator_args))
        if redis:
            redis_port = free_port()
            fleet.redis = start_redis(folder, redis_port)
            fleet.others.append(fleet.redis)
            tables["redis"] = {
                "url": f"redis://127.0.0.1:{redis_port}/0",
                "expected_replicas": replicas,
                **tables.get("redis", {}),
            }
        wait_answering(f"http://127.0.0.1:{emulator_port}/healthz")

        def start_replica(port: int) -> tuple[subprocess.Popen[bytes], Path]:
            return start_gateway(
                folder, port, emulator_port, key, tenant_limits=tenant_limits, **tables
            )

        fleet.start_replica = start_replica
        for _ in range(replicas):
            gw_port = free_port()
            process, log = start_replica(gw_port)
            fleet.replicas.append((process, gw_port, log))
        for _, gw_port, _ in fleet.replicas:
            wait_answering(f"http://127.0.0.1:{gw_port}/healthz")
        backends = [p for _, p, _ in fleet.replicas]
        fleet.others.insert(0, start_haproxy(folder, port, backends))
        wait_answering(f"{fleet.url}/healthz")
    except BaseException:
        fleet.stop()
        raise
    return fleet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="HAProxy's (default %(default)s)")
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args(argv)
    if answers(f"http://127.0.0.1:{args.port}/healthz"):
        raise SystemExit(f"fleet: something already answers on port {args.port} (make run?)")
    folder = Path(tempfile.mkdtemp(prefix="chatiq-fleet-"))
    # The demo tenant's limits, shared by the replicas through Redis; resumable
    # streams on (the page asks for them), so a reply goes on from any replica.
    fleet = start_fleet(
        folder, args.port, args.replicas, tenant_limits=(1000, 60000), resume={"enabled": True}
    )
    replicas = ", ".join(f"port {port} (pid {p.pid})" for p, port, _ in fleet.replicas)
    print(
        f"\nA fleet is ready on {fleet.url}: HAProxy in front of {args.replicas} gateway "
        f"replicas sharing tenant quotas and resumable streams through Redis.\n"
        f"Replicas: {replicas}.\n\n"
        f"  Chat in a browser: {fleet.url}/  (key: {DEMO_KEY})\n"
        f"  Or: CHATIQ_GATEWAY_URL={fleet.url} CHATIQ_GATEWAY_KEY={DEMO_KEY} "
        ".venv/bin/chatiq-chat\n"
        f'  Load it: make load ARGS="--host {fleet.url}"\n'
        "  A rolling restart: kill -TERM a replica's pid mid-answer; it drains, its\n"
        "  readers resume on the other replica, and it is started again.\n"
        f"  Logs: {folder}\n\nPress Ctrl-C to stop them all.\n",
        flush=True,
    )
    stopped_by = stop_on_signals()  # Ctrl-C or SIGTERM stops them all
    try:
        while all(p.poll() is None for p in fleet.others):  # HAProxy, Redis, the emulator
            for port, code, pid in fleet.restart_exited():
                print(f"fleet: the replica on port {port} exited ({code}); started again "
                      f"(pid {pid})", flush=True)  # fmt: skip
            time.sleep(0.2)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if stopped_by == [signal.SIGINT]:  # Ctrl-C: all but Redis are stopping on their own
            signalled = [p for p in fleet.others if p is not fleet.redis]
            wait_exited([*(p for p, _, _ in fleet.replicas), *signalled], 1.5)
        fleet.stop()
        print("fleet: stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
