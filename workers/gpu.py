"""The GPUs of a gpu-queue worker: what CUDA can do on this machine, and one GPU per pool process.

Probe. ``start_probe()`` asks a child Python process (never this one) to initialise CUDA, list
each visible device and run one tiny kernel on it; the child prints JSON and exits. The prefork
parent must not initialise CUDA itself: a CUDA context does not survive ``fork``, and torch
caches the device count of the process that first asks, which a forked pool process would
inherit. The kernel catches what ``is_available()`` alone misses: a GPU this torch build has no
kernels for. The driver version comes from ``/proc/driver/nvidia/version`` (or ``nvidia-smi``),
which needs no CUDA at all.

Assignment. ``qpipe worker --gpus 0,1`` (default: every usable GPU the probe found) gives pool
process ``i`` the GPU ``gpus[i % len(gpus)]``: ``pin_pool_processes`` connects a
``worker_process_init`` handler, which runs in each pool process right after the fork and before
any stage runs, and sets ``CUDA_VISIBLE_DEVICES`` to that one entry, so the stage's ``cuda``
device is its own GPU. Billiard numbers its pool processes 0..concurrency-1 and gives a
replacement (after ``--max-tasks-per-child``, a memory limit or a crash) the lowest free index,
which is the one the process it replaces held (``billiard.pool.Pool._avail_index``): a GPU keeps
one pool process at a time for the worker's life. Entries are ``CUDA_VISIBLE_DEVICES`` entries as
this worker sees them: indices, ``GPU-<uuid>`` or ``MIG-<uuid>``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 120.0  # seconds; a wedged driver can hang cuInit, and a worker must still start or refuse
ENTRY_RE = re.compile(r"^(\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)$")

# Runs in a fresh interpreter: imports nothing of qpipe, prints one JSON object. First, on Linux
# and unless told "full", whether the driver's library loads at all: torch needs libcuda.so.1 for
# any CUDA, so without it the answer is known in milliseconds, without importing torch (a CPU-only
# machine starts its gpu worker as fast as before). Then torch.cuda.init(), which raises with the
# driver's own reason (a driver too old for this build's CUDA, no device), where is_available()
# only warns, and one kernel per device.
_PROBE_CODE = r"""
import json, sys

def probe(out):
    if sys.argv[1:] != ["full"] and sys.platform.startswith("linux"):
        import ctypes
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError as err:
            out["reason"] = f"no NVIDIA driver: libcuda.so.1 does not load ({err})"
            return
    import torch
    out["torch"], out["cuda_runtime"] = torch.__version__, torch.version.cuda
    if torch.version.cuda is None:
        out["reason"] = f"this torch build ({torch.__version__}) has no CUDA support: install a CUDA build of torch"
        return
    torch.cuda.init()
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        d = {"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
             "memory_gib": round(p.total_memory / 2**30, 1)}
        try:
            torch.ones(1, device=f"cuda:{i}").add_(1).item()
        except RuntimeError as err:
            d["error"] = (str(err).strip().splitlines() or [type(err).__name__])[0]
        out["devices"].append(d)
    if not out["devices"]:
        out["reason"] = "CUDA initialised, but no device is visible"

out = {"devices": [], "reason": None, "torch": None, "cuda_runtime": None}
try:
    probe(out)
except Exception as err:
    out["reason"] = (str(err).strip().splitlines() or [type(err).__name__])[0]
print(json.dumps(out), flush=True)
"""


@dataclass
class Probe:
    """What the child process found. ``devices`` holds every visible device (index, name,
    capability, memory_gib, and ``error`` when a kernel would not run on it)."""

    devices: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None  # why there is no usable device, when there is none
    driver: str | None = None
    torch: str | None = None
    cuda_runtime: str | None = None

    @property
    def usable(self) -> list[dict[str, Any]]:
        return [d for d in self.devices if "error" not in d]

    def why_none(self) -> str:
        """Why no device is usable (empty when one is)."""
        if self.usable:
            return ""
        if self.reason:
            return self.reason
        return "; ".join(f"GPU {d['index']} ({d['name']}): {d['error']}" for d in self.devices) or "no device"

    def lines(self) -> list[str]:
        """What a worker logs about its GPUs at start."""
        versions = f"NVIDIA driver {self.driver or 'not found'}" + (
            f", torch {self.torch} with CUDA {self.cuda_runtime or '(none)'}" if self.torch else "")
        out = [f"GPU {d['index']}: {d['name']}, compute capability {d['capability']}, {d['memory_gib']} GiB"
               + (f": unusable: {d['error']}" if "error" in d else "") for d in self.devices]
        if not self.usable:
            out.append(f"no usable CUDA device: {self.why_none()}")
        return [*out, versions]


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version, without touching CUDA: from the driver's /proc file,
    else from nvidia-smi; None when neither is there."""
    proc = Path("/proc/driver/nvidia/version")
    try:
        match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", proc.read_text())
        if match:
            return match.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            return out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


class ProbeProcess:
    """A running probe; ``result()`` waits for it. Started early, it overlaps the worker's own
    start-up (the parent imports torch and the stages meanwhile)."""

    def __init__(self, *, driver_check: bool = True, env: dict[str, str] | None = None) -> None:
        """``driver_check=False`` skips the quick libcuda check and always asks torch."""
        argv = [sys.executable, "-c", _PROBE_CODE] + ([] if driver_check else ["full"])
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._result: Probe | None = None
        atexit.register(self.close)  # a worker that refuses to start for another reason leaves no probe behind

    def result(self, timeout: float = PROBE_TIMEOUT) -> Probe:
        if self._result is not None:
            return self._result
        try:
            out, err = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            self._result = Probe(reason=f"the CUDA probe did not answer within {timeout:.0f} s (a hung driver?)")
        else:
            try:
                self._result = Probe(**json.loads(out.strip().splitlines()[-1]))
            except (ValueError, IndexError, TypeError):
                tail = (err.strip().splitlines() or ["no output"])[-1]
                self._result = Probe(reason=f"the CUDA probe exited with status {self._proc.returncode}: {tail}")
        self._result.driver = driver_version()
        return self._result

    def close(self) -> None:
        """Stop the probe if it still runs (the worker refused to start for another reason)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()


def start_probe() -> ProbeProcess:
    return ProbeProcess()


def probe(timeout: float = PROBE_TIMEOUT) -> Probe:
    """Probe CUDA in a child process and wait for the answer."""
    return start_probe().result(timeout)


def parse_gpus(text: str) -> list[str]:
    """``--gpus`` as a list of CUDA_VISIBLE_DEVICES entries; ValueError saying what is wrong."""
    entries = [e.strip() for e in text.split(",")]
    bad = [e for e in entries if not ENTRY_RE.match(e)]
    if bad or not entries:
        raise ValueError(f"--gpus {text!r}: {', '.join(map(repr, bad)) or 'nothing'} is not a GPU: give a "
                         "comma-separated list of GPU indices (0,1), GPU-<uuid> or MIG-<uuid> entries")
    twice = sorted({e for e in entries if entries.count(e) > 1})
    if twice:
        raise ValueError(f"--gpus {text!r} lists {', '.join(twice)} twice: give each GPU once (one pool process "
                         "per GPU; raise --concurrency to share them)")
    return entries


def visible_entries(found: Probe, env: dict[str, str] | None = None) -> list[str]:
    """The usable devices as CUDA_VISIBLE_DEVICES entries in this process's view: their index, or
    the entry of an inherited CUDA_VISIBLE_DEVICES that the index refers to."""
    inherited = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    names = [e.strip() for e in inherited.split(",")] if inherited else None
    return [names[d["index"]] if names and d["index"] < len(names) else str(d["index"]) for d in found.usable]


def choose_gpus(found: Probe, requested: str | None, env: dict[str, str] | None = None) -> list[str]:
    """The GPUs a worker hands to its pool processes: ``requested`` (``--gpus``) checked against
    what the probe saw, else every usable device. ValueError for an index the probe did not see."""
    if requested is None:
        return visible_entries(found, env)
    gpus = parse_gpus(requested)
    inherited = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if found.devices and not inherited:  # indices are this machine's: check them
        known = {str(d["index"]) for d in found.devices}
        unknown = [g for g in gpus if g.isdigit() and g not in known]
        if unknown:
            raise ValueError(f"--gpus {requested}: no GPU {', '.join(unknown)} here; the probe sees "
                             f"{', '.join(sorted(known, key=int))}")
    return gpus


def device_for(index: int, gpus: Sequence[str]) -> str:
    """The CUDA_VISIBLE_DEVICES value of pool process ``index`` (0-based): its own GPU, round
    robin when there are more processes than GPUs."""
    if not gpus:
        raise ValueError("no GPUs to assign")
    if index < 0:
        raise ValueError(f"pool process index {index} is negative")
    return gpus[index % len(gpus)]


def pin_pool_processes(gpus: Sequence[str]) -> Callable[..., None]:
    """Connect (and return) the ``worker_process_init`` handler that gives each pool process its
    GPU. Call in the worker's parent before the pool starts; the handler runs in each child."""
    from celery.signals import worker_process_init
    from celery.utils.log import current_process_index

    chosen = list(gpus)

    def on_pool_process_init(**_: Any) -> None:
        index = current_process_index(base=0) or 0
        device = device_for(index, chosen)
        # before anything in this process initialises CUDA: cuInit reads it once
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        log.info("pool process %d (pid %d): CUDA_VISIBLE_DEVICES=%s", index, os.getpid(),
                 os.environ.get("CUDA_VISIBLE_DEVICES"))

    worker_process_init.connect(on_pool_process_init, weak=False)
    return on_pool_process_init


def announce(lines: Sequence[str], warnings: Sequence[str] = ()) -> None:
    """Log the probe's findings in the worker's own log, once Celery has set logging up (its
    ``celeryd_after_setup`` signal: in the parent, before the pool starts)."""
    from celery.signals import celeryd_after_setup

    def on_setup(**_: Any) -> None:
        for line in lines:
            log.info("%s", line)
        for line in warnings:
            log.warning("%s", line)

    celeryd_after_setup.connect(on_setup, weak=False)


@dataclass
class WorkerGpus:
    """How a gpu-queue worker uses its GPUs: the entries its pool processes get, its pool size,
    and what to log."""

    gpus: list[str]
    concurrency: int
    lines: list[str]
    warnings: list[str]


def plan_worker(found: Probe, requested: str | None, concurrency: int | None,
                env: dict[str, str] | None = None) -> WorkerGpus:
    """Decide the GPUs and pool size of a gpu-queue worker from the probe, ``--gpus`` and
    ``--concurrency`` (None: one pool process per GPU, or one without a GPU). ValueError for a
    ``--gpus`` that cannot be right."""
    gpus = choose_gpus(found, requested, env)
    lines, warnings = found.lines(), []
    if not found.usable:
        warnings.append("stages of the gpu queue train on the CPU here; a stage that asks for finetune.device: "
                        "cuda is requeued for a worker with CUDA")
        if gpus:
            warnings.append(f"--gpus {','.join(gpus)} is applied all the same (CUDA_VISIBLE_DEVICES per pool "
                            "process), but no usable CUDA device was found")
    size = concurrency if concurrency is not None else max(len(gpus), 1)
    if gpus:
        lines.append(f"{size} pool process(es) on GPU(s) {','.join(gpus)}: pool process i gets "
                     "CUDA_VISIBLE_DEVICES=gpus[i % len(gpus)]")
        if size > len(gpus):
            warnings.append(f"--concurrency {size} is more than the {len(gpus)} GPU(s): pool processes share GPUs "
                            "round robin, and each shared GPU's memory is split between trainings")
    return WorkerGpus(gpus, size, lines, warnings)


def apply(setup: WorkerGpus, pool: str) -> None:
    """Give the worker's stages their GPUs: one per pool process under prefork; under the solo
    and threads pools stages run in this process, which then keeps the first GPU."""
    announce(setup.lines, setup.warnings)
    if not setup.gpus:
        return
    if pool == "prefork":
        pin_pool_processes(setup.gpus)
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = setup.gpus[0]  # nothing here has initialised CUDA yet
    announce([f"pool {pool}: stages run in this process, on GPU {setup.gpus[0]} (CUDA_VISIBLE_DEVICES)"])
