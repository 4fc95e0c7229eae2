"""``chatiq-gateway --workers N``: N gateway processes sharing one port.

Each worker is a whole gateway (``python -m gateway --worker``) that binds
the port with SO_REUSEPORT, so the kernel spreads new connections over them.
This process only supervises: it gives the workers one folder for their
metrics (prometheus-client's multiprocess mode, so any worker's ``/metrics``
shows the sums), passes SIGTERM and SIGINT on (each worker drains its own
streams), and exits with the worst exit code. If a worker dies on its own,
the others are stopped too: a half-fleet that looks healthy is worse than a
restart by the service manager.

Admission limits and tenant quotas stay per worker: with N workers, the
process admits up to N times ``admission.max_streams`` (see "Scaling out").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from prometheus_client import multiprocess

from .logs import Logger
from .metrics import MULTIPROCESS_DIR


def supervise(config: str, workers: int, log: Logger) -> int:
    shared = os.environ.get(MULTIPROCESS_DIR)
    own_folder = shared is None
    folder = shared or tempfile.mkdtemp(prefix="chatiq-gateway-metrics-")
    for leftover in os.listdir(folder):  # a previous run's values must not be summed in
        if leftover.endswith(".db"):
            os.remove(os.path.join(folder, leftover))
    env = {**os.environ, MULTIPROCESS_DIR: folder}
    command = [sys.executable, "-m", "gateway", "--config", config, "--worker"]
    children = [subprocess.Popen(command, env=env) for _ in range(workers)]
    log.info("workers_started", workers=workers, pids=[c.pid for c in children])

    stopping = False

    def pass_on(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, pass_on)
    codes: dict[int, int] = {}
    try:
        while len(codes) < len(children):
            for child in children:
                if child.pid in codes or child.poll() is None:
                    continue
                codes[child.pid] = child.returncode
                multiprocess.mark_process_dead(child.pid)  # type: ignore[no-untyped-call]
                if not stopping:
                    log.warning("worker_exited", pid=child.pid, code=child.returncode)
                    pass_on(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)
    worst = max(codes.values(), key=abs, default=0)
    log.info("workers_stopped", codes=list(codes.values()))
    return worst if worst >= 0 else 1
