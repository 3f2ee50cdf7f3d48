"""The CPU cores of a worker: ``qpipe worker --cpus 0`` (or ``0-3``, ``0,2``: taskset's list
syntax) pins the worker and every pool process it forks to those cores, with one torch intra-op
thread per pinned core.

Why. Unpinned, every worker process on a machine runs torch with its default of one thread per
core of the machine, so two workers on two cores run four busy threads on two cores, and
OpenMP threads that share a core wait on each other at every parallel region: a second worker
added little. Pinned, each worker owns its cores and sizes its threads to them, which is what
adding a machine does.

How. ``pin`` runs in the worker's parent before torch is imported: ``os.sched_setaffinity`` on
this process (a forked pool process inherits it; the standard library call, Linux only, needs no
new dependency for what workers only do on Linux) and ``OMP_NUM_THREADS``, which torch and
OpenMP read at import, so anything started from the worker sizes itself alike.
``configure_pool`` then connects (``pin_pool_processes``) a ``worker_process_init`` handler
that, in each pool process right after the fork, applies the affinity again and calls
``torch.set_num_threads``: the thread count torch set in the parent is not guaranteed to hold in
a forked child. Each pool process logs the cores and the thread count it reads back.

The runtimes a stage times (ONNX Runtime, OpenVINO) take their thread count from the benchmark's
``threads`` setting, as before; pinned, their threads run on the pinned cores too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


def usable_cpus() -> set[int]:
    """The cores this process may run on."""
    return set(os.sched_getaffinity(0))


def parse_cpus(text: str, usable: Iterable[int] | None = None) -> list[int]:
    """``0``, ``0,2``, ``1-3`` (or a mix) as a sorted list of core numbers; ValueError, saying
    what is wrong and which cores there are, for a malformed list or a core outside ``usable``
    (default: this process's cores)."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus pins through os.sched_setaffinity, which this platform lacks (Linux has it): "
                         "drop --cpus")
    allowed = set(usable if usable is not None else usable_cpus())
    shown = _ranges(sorted(allowed))
    cores: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ValueError(f"--cpus {text!r}: {part!r} is not a core number or a range: give cores as taskset "
                             f"-c does, e.g. 0 or 0-3 or 0,2 (this machine lets the worker use {shown})") from None
        if first < 0 or last < first:
            raise ValueError(f"--cpus {text!r}: {part!r} is not a range of cores (first-last, first <= last)")
        cores.update(range(first, last + 1))
    outside = sorted(cores - allowed)
    if outside:
        raise ValueError(f"--cpus {text!r}: core(s) {_ranges(outside)} are not available to this worker, which may "
                         f"use {shown}: choose among those")
    return sorted(cores)


def _ranges(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out: list[str] = []
    for c in cores:
        if out and int(out[-1].split("-")[-1]) == c - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)


def pin(cpus: list[int]) -> None:
    """Pin this process to ``cpus`` and size OpenMP (and so torch, imported later) to them."""
    os.sched_setaffinity(0, cpus)
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))


def pin_pool_processes(cpus: list[int]) -> Callable[..., None]:
    """Connect (and return) the ``worker_process_init`` handler that pins each pool process to
    ``cpus`` with one torch thread per core; call it in the worker's parent before the pool starts."""
    from celery.signals import worker_process_init
    from celery.utils.log import current_process_index

    chosen = list(cpus)

    def on_pool_process_init(**_: Any) -> None:
        import torch

        os.sched_setaffinity(0, chosen)
        torch.set_num_threads(len(chosen))
        log.info("pool process %d (pid %d): cpus %s, torch threads %d", current_process_index(base=0) or 0,
                 os.getpid(), _ranges(sorted(os.sched_getaffinity(0))), torch.get_num_threads())

    worker_process_init.connect(on_pool_process_init, weak=False)
    return on_pool_process_init


def configure_pool(cpus: list[int], pool: str, concurrency: int) -> None:
    """After ``pin``, in the worker's parent before Celery starts: the pool processes of a prefork
    pool pin themselves (``pin_pool_processes``); a solo or threads pool runs stages in this
    process, whose torch gets its threads here. Logs the pinning once logging is set up."""
    from celery.signals import celeryd_after_setup

    if pool == "prefork":
        pin_pool_processes(cpus)
    else:
        import torch

        torch.set_num_threads(len(cpus))

    def on_setup(**_: Any) -> None:
        log.info("pinned to cpus %s, with %d torch thread(s) per process that runs stages", _ranges(cpus), len(cpus))
        if concurrency > len(cpus):
            log.warning("--concurrency %d is more than the %d pinned core(s): the pool processes share them",
                        concurrency, len(cpus))

    celeryd_after_setup.connect(on_setup, weak=False)
