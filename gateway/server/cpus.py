"""How many cores this process may really use: ``--workers auto``.

``os.cpu_count()`` is the machine's; a container usually gets less. The
answer is the smaller of the CPU affinity mask (``taskset``, cpusets) and
the cgroup's CPU quota (Docker's ``--cpus``, a Kubernetes limit), rounded up,
and at least 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from gateway.config import AUTO_WORKERS

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP) -> int:
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on every platform
        allowed = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        allowed = min(allowed, math.ceil(quota))
    return max(1, allowed)


def cgroup_cpu_quota(root: Path = CGROUP) -> float | None:
    """The cgroup's CPU limit in cores (v2 ``cpu.max``, or v1's CFS quota); None: none."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return _ratio(quota, period or "100000")
    quota_v1 = _read(root / "cpu" / "cpu.cfs_quota_us") or _read(root / "cpu.cfs_quota_us")
    period_v1 = _read(root / "cpu" / "cpu.cfs_period_us") or _read(root / "cpu.cfs_period_us")
    if quota_v1 is not None and period_v1 is not None:
        return _ratio(quota_v1, period_v1)
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def parse_workers(value: str | int) -> int:
    """A ``--workers`` / ``server.workers`` value: a count, or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return usable_cpus()
    return int(value)


def resolve_workers(configured: int) -> int:
    """``server.workers`` as the configuration holds it: a count, or
    ``AUTO_WORKERS`` (``"auto"`` in the file) for one per usable core."""
    return usable_cpus() if configured == AUTO_WORKERS else configured
