"""Torch and OpenMP threads sized to the CPU quota of the container a worker runs in.

Why. A container limited to N CPUs (``docker run --cpus``, compose's ``cpus:``, Kubernetes'
``resources.limits.cpu``) gets N CPUs' worth of time per scheduling period through the kernel's
CFS quota, yet it sees every core of the host: torch and OpenMP start one thread per host core.
A 2-CPU worker on a 32-core host then runs 32 threads that the quota throttles together for most
of each period; four such replicas oversubscribe the host's cores many times over, and stage
times and benchmark latencies measure the throttling rather than the work.

How. :func:`cpu_quota` reads the quota from the cgroup the process is in: cgroup v2's ``cpu.max``
(``"max 100000"`` or ``"200000 100000"``: quota and period in microseconds) or cgroup v1's
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none), walking from the process's own
cgroup up to the mount's root and keeping the smallest limit (a pod-level limit above the
container's counts too). :func:`threads_for` turns it into a thread count: the quota rounded
down, at least 1 and at most the cores the process may run on; rounded down because a thread
more than the quota pays is a thread that waits throttled. :func:`apply` is called by ``qpipe
worker`` before torch is imported: unless the user chose (``OMP_NUM_THREADS`` set, or ``--cpus``
pinning, which sizes threads itself), it sets ``OMP_NUM_THREADS``, which torch and OpenMP read at
import, so the worker and every pool process it forks start with that many threads; the count
and where it came from are logged once the worker's logging is set up.

Not ``joblib.cpu_count()``, which also reads the quota: it reads fixed paths only (so neither a
nested cgroup nor a test's fake cgroup files), rounds up, and does not say whether a quota was
what limited it, which the log line and the decision to set anything need.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_limit(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    try:
        q, p = int(quota), int(period or 100000)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _v1_limit(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _own_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(cgroup v2 path, cgroup v1 cpu-controller path) of this process, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _walk_up(mount: Path, path: str | None) -> list[Path]:
    """``mount``/``path`` and each of its parents up to ``mount`` (just ``mount`` when the path is
    unknown or not visible, as inside a container whose cgroup is mounted at the root)."""
    dirs: list[Path] = []
    if path:
        current = mount / path.lstrip("/")
        while current != mount and mount in current.parents:
            if current.is_dir():
                dirs.append(current)
            current = current.parent
    dirs.append(mount)
    return dirs


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPUs this process's cgroup may use (e.g. 1.5), or None when no quota limits it."""
    v2_path, v1_path = _own_paths(proc_cgroup)
    limits: list[float] = []
    if (root / "cgroup.controllers").exists():  # cgroup v2, unified hierarchy
        limits = [q for d in _walk_up(root, v2_path) if (q := _v2_limit(d)) is not None]
    else:  # cgroup v1: the cpu controller has its own mount
        for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            mount = root / name
            if mount.is_dir():
                limits = [q for d in _walk_up(mount, v1_path) if (q := _v1_limit(d)) is not None]
                break
    return min(limits) if limits else None


def threads_for(quota: float | None, usable_cores: int) -> int:
    """Threads for a quota of ``quota`` CPUs on ``usable_cores`` cores: the quota rounded down,
    at least 1, at most the cores; all the cores when there is no quota."""
    if quota is None:
        return max(1, usable_cores)
    return max(1, min(usable_cores, math.floor(quota)))


def decide(environ: dict[str, str] | os._Environ, usable_cores: int, root: Path = CGROUP_ROOT,
           proc_cgroup: Path = PROC_CGROUP) -> tuple[int | None, str]:
    """(threads to set in OMP_NUM_THREADS or None to set nothing, the reason as a log line)."""
    quota = cpu_quota(root, proc_cgroup)
    chosen = environ.get("OMP_NUM_THREADS")
    if chosen:
        return None, f"OMP_NUM_THREADS={chosen} set in the environment: kept (CPU quota: {_shown(quota)})"
    if quota is None or math.floor(quota) >= usable_cores:
        return None, (f"no CPU quota below this worker's {usable_cores} core(s) (CPU quota: {_shown(quota)}): "
                      "torch's default threads")
    threads = threads_for(quota, usable_cores)
    return threads, (f"CPU quota {_shown(quota)} on {usable_cores} core(s): {threads} torch/OpenMP thread(s) per "
                     "process that runs stages (set OMP_NUM_THREADS to choose otherwise)")


def apply(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """In ``qpipe worker`` before torch is imported: set ``OMP_NUM_THREADS`` as :func:`decide`
    says, and log why once Celery has set up the worker's logging. Returns the count it set."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads, reason = decide(os.environ, usable, root, proc_cgroup)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    from celery.signals import celeryd_after_setup

    def on_setup(**_: object) -> None:
        log.info("%s", reason)

    celeryd_after_setup.connect(on_setup, weak=False)
    return threads


def _shown(quota: float | None) -> str:
    return "none" if quota is None else f"{quota:g} CPUs"
