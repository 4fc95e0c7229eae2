"""``chatiq-gateway --workers N``: N gateway processes sharing one port, under
a small supervisor in the manner of gunicorn's arbiter.

Each worker is a whole gateway (``python -m gateway --worker``) that binds
the port with SO_REUSEPORT, so the kernel spreads new connections over them.
The supervisor only watches:

- it checks the port is free before starting anyone (one clear line if not);
- it gives the workers one folder for their metrics (prometheus-client's
  multiprocess mode, so any worker's ``/metrics`` shows the sums) and marks a
  dead worker's files dead, so its live gauges stop counting;
- a worker that dies is replaced at once; more than ``MAX_DEATHS`` deaths
  within ``DEATH_WINDOW_S`` is a crash loop: it stops them all and exits 1,
  saying so, for the service manager to see;
- SIGTERM and SIGINT are passed on (each worker drains its own streams; a
  second one makes them stop at once), then it exits with the workers' worst
  code; SIGHUP is passed on (each worker reloads the configuration);
- workers never outlive it: each one checks that its parent is still the
  supervisor, and drains and exits when it is not (``watch_parent``).

Admission limits and tenant quotas stay per worker: with N workers, the
process admits up to N times ``admission.max_streams`` (docs/operations.md, "Scaling out").
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from types import FrameType

from prometheus_client import multiprocess

from gateway.logs import Logger
from gateway.metrics import MULTIPROCESS_DIR

SUPERVISOR_PID = "CHATIQ_GATEWAY_SUPERVISOR_PID"  # how a worker knows its supervisor
MAX_DEATHS = 5
DEATH_WINDOW_S = 60.0


def port_is_free(host: str, port: int) -> OSError | None:
    """None if ``host:port`` can be bound now (without SO_REUSEPORT), else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            return e
    return None


class Supervisor:
    def __init__(self, config: str, workers: int, log: Logger, folder: str) -> None:
        self._command = [sys.executable, "-m", "gateway", "--config", config, "--worker"]
        self._env = {**os.environ, MULTIPROCESS_DIR: folder, SUPERVISOR_PID: str(os.getpid())}
        self._folder = folder
        self._size = workers
        self._log = log
        self._workers: dict[int, subprocess.Popen[bytes]] = {}
        self._deaths: deque[float] = deque()
        self._stopping = False
        self._codes: list[int] = []

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGHUP, self._pass_on)
        for _ in range(self._size):
            self._spawn()
        self._log.info("workers_started", workers=self._size, pids=sorted(self._workers))
        while self._workers:
            self._reap()
            time.sleep(0.1)
        worst = max(self._codes, key=abs, default=0)
        self._log.info("workers_stopped", codes=self._codes)
        return worst if worst >= 0 else 1

    def _spawn(self) -> int:
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only,
        # which passes it on once (twice would mean "stop at once").
        # SIGHUP ignored until the worker handles it: a reload while it starts
        # would otherwise kill it (an ignored signal stays ignored across exec).
        child = subprocess.Popen(
            self._command, env=self._env, start_new_session=True, preexec_fn=_ignore_hup
        )
        self._workers[child.pid] = child
        return child.pid

    def _reap(self) -> None:
        for pid, child in list(self._workers.items()):
            code = child.poll()
            if code is None:
                continue
            del self._workers[pid]
            multiprocess.mark_process_dead(pid, self._folder)  # type: ignore[no-untyped-call]
            if self._stopping:
                # Killed by the stop signal itself: it was still starting, with nothing to drain.
                stopped = code in (-signal.SIGTERM, -signal.SIGINT)
                self._codes.append(0 if stopped else code)
                continue
            self._log.warning("worker_exited", pid=pid, code=code)
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and self._deaths[0] < now - DEATH_WINDOW_S:
                self._deaths.popleft()
            if len(self._deaths) > MAX_DEATHS:
                self._log.error(
                    "workers_crash_loop", deaths=len(self._deaths), within_s=DEATH_WINDOW_S,
                    fix="see the workers' own lines above; the supervisor stops them all",
                )  # fmt: skip
                self._codes.append(1)
                self._on_stop(signal.SIGTERM, None)
                continue
            self._log.info("worker_replaced", old_pid=pid, pid=self._spawn())

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        self._pass_on(signum, frame)

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        for child in self._workers.values():
            if child.poll() is None:
                child.send_signal(signum)


def supervise(config: str, workers: int, host: str, port: int, log: Logger) -> int:
    problem = port_is_free(host, port)
    if problem is not None:
        print(f"chatiq-gateway: cannot serve on {host}:{port}: {problem}", file=sys.stderr)
        return 1
    shared = os.environ.get(MULTIPROCESS_DIR)
    folder = shared or tempfile.mkdtemp(prefix="chatiq-gateway-metrics-")
    for leftover in os.listdir(folder):  # a previous run's values must not be summed in
        if leftover.endswith(".db"):
            os.remove(os.path.join(folder, leftover))
    try:
        return Supervisor(config, workers, log, folder).run()
    finally:
        if shared is None:
            shutil.rmtree(folder, ignore_errors=True)


def _ignore_hup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def watch_parent(on_orphaned: Callable[[], None], every_s: float = 0.5) -> None:
    """In a worker: call ``on_orphaned`` once the supervisor is gone (this
    process was handed to another parent), so no worker outlives it. The
    supervisor's pid comes from the environment: one that died while this
    worker was starting is noticed too."""
    supervisor = int(os.environ.get(SUPERVISOR_PID) or os.getppid())
    while os.getppid() == supervisor:
        await asyncio.sleep(every_s)
    on_orphaned()
