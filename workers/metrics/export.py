"""Exporting: the ``/metrics`` server of the worker's main process, and the files of exited
pool processes.

A scrape merges every process's files with prometheus_client's own ``MultiProcessCollector``.
What prometheus_client does not do is clean up after a process: ``mark_process_dead`` deletes only
its ``live*`` gauges, and its counters, histograms and ``mostrecent`` gauges stay in files of
their own. A gpu worker replaces its pool process after every stage, so it would add a few files
per stage and every scrape would read all of them. Hence :func:`fold`: the files of a dead process
are added into one ``*_archive.db`` file per kind (counters and histograms summed, ``mostrecent``
gauges keeping the newest value, as the merge would) and removed. A pool process folds its own
files when it exits (Celery's ``worker_process_shutdown`` signal, sent in the exiting process);
the main process folds those of processes that died without saying so (SIGKILL, out of memory)
at the next scrape. A file lock orders folding and scraping, so a scrape never sees a value
twice or not at all.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import glob
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.metrics.queues import WorkerCollector
from workers.metrics.record import ACTIVE_ENV

log = logging.getLogger(__name__)

ARCHIVE = "archive"  # stands where a pid would in the name of a folded file


# ----------------------------------------------------------------------------- process files

@contextlib.contextmanager
def folder_lock(path: str | Path) -> Iterator[None]:
    """Exclusive lock over a worker's metrics folder (folding and scraping), across processes."""
    with open(os.path.join(path, ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _parse(filename: str) -> tuple[str, str, str]:
    """``counter_123.db`` -> (counter, "", 123); ``gauge_livesum_123.db`` -> (gauge, livesum, 123)."""
    parts = os.path.basename(filename)[:-len(".db")].split("_")
    if parts[0] == "gauge" and len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], "", parts[-1]


def _combine(typ: str, mode: str, old: tuple[float, float] | None, new: tuple[float, float]) -> tuple[float, float]:
    """Two raw (value, timestamp) entries of one key, combined as the multiprocess merge would."""
    if old is None:
        return new
    if typ != "gauge" or mode == "sum":
        return old[0] + new[0], 0.0
    if mode == "max":
        return max(old, new, key=lambda v: v[0])
    if mode == "min":
        return min(old, new, key=lambda v: v[0])
    return max(old, new, key=lambda v: v[1])  # mostrecent: the newer timestamp wins


def fold(path: str | Path, pid: int) -> None:
    """Fold the files of the dead process ``pid`` into the folder's archive files, after
    prometheus_client's ``mark_process_dead`` has deleted its ``live*`` gauges (the process no
    longer holds what they measured). Call under :func:`folder_lock`."""
    from prometheus_client.mmap_dict import MmapedDict
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, str(path))
    for f in glob.glob(os.path.join(path, f"*_{pid}.db")):
        typ, mode, _ = _parse(f)
        if mode == "all":  # keeps a pid label per process: nothing to fold into (qpipe uses none)
            continue
        archive = os.path.join(path, f"{typ}_{mode}_{ARCHIVE}.db" if typ == "gauge" else f"{typ}_{ARCHIVE}.db")
        merged: dict[str, tuple[float, float]] = {}
        for src in [archive, f] if os.path.exists(archive) else [f]:
            for key, value, ts, _ in MmapedDict.read_all_values_from_file(src):
                merged[key] = _combine(typ, mode, merged.get(key), (value, ts))
        out = MmapedDict(archive)
        try:
            for key, (value, ts) in merged.items():
                out.write_value(key, value, ts)
        finally:
            out.close()
        os.remove(f)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fold_dead(path: str | Path) -> list[int]:
    """Fold the files of every process of this folder that is no longer running. Call under
    :func:`folder_lock`. Returns the pids folded."""
    pids = {int(pid) for f in glob.glob(os.path.join(path, "*.db")) if (pid := _parse(f)[2]).isdigit()}
    dead = sorted(p for p in pids - {os.getpid()} if not _alive(p))
    for pid in dead:
        fold(path, pid)
    return dead


class ProcessFilesCollector:
    """prometheus_client's ``MultiProcessCollector`` over the folder, after folding the files of
    dead processes (both under the folder's lock)."""

    def __init__(self, path: str | Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = str(path)
        self._files = MultiProcessCollector(None, self.path)

    def collect(self) -> Iterable[Any]:
        with folder_lock(self.path):
            dead = fold_dead(self.path)
            if dead:
                log.debug("folded the metrics of %d exited process(es)", len(dead))
            return list(self._files.collect())


# ----------------------------------------------------------------------------- serving

@dataclass
class Exporter:
    server: Any
    thread: threading.Thread
    path: Path
    addr: str
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(port: int, addr: str, *, broker_url: str, node: str, queues: Iterable[str], pool: str,
          unacked_key: str = "unacked") -> Exporter:
    """Serve ``/metrics`` from this (the worker's main) process, in a daemon thread. Call after
    :func:`enable_multiprocess` and before the pool starts. Raises OSError if the address is taken."""
    from celery.signals import worker_process_init, worker_process_shutdown
    from prometheus_client import CollectorRegistry, start_http_server

    path = os.environ.get(ACTIVE_ENV)
    if not path:
        raise RuntimeError("call enable_multiprocess() before serve()")
    registry = CollectorRegistry()
    registry.register(ProcessFilesCollector(path))
    registry.register(WorkerCollector(broker_url, node=node, queues=queues, pool=pool, unacked_key=unacked_key))
    main_pid = os.getpid()

    def _cleanup() -> None:  # at the worker's exit (pool processes leave through os._exit)
        if os.getpid() == main_pid:
            for f in glob.glob(os.path.join(path, "*.db")) + [os.path.join(path, ".lock")]:
                with contextlib.suppress(OSError):
                    os.remove(f)
            with contextlib.suppress(OSError):
                os.rmdir(path)

    atexit.register(_cleanup)
    server, thread = start_http_server(port, addr, registry)

    @worker_process_init.connect(weak=False)
    def _in_pool_process(**_: object) -> None:
        pid = os.getpid()
        if pid == main_pid:  # the solo pool sends this signal in the main process too
            return
        # a forked pool process inherits the listening socket: close its copy, so the port is
        # the main process's alone (and is freed when it exits)
        with contextlib.suppress(OSError):
            server.socket.close()
        # files under this pid can only be left by an earlier process that had the same pid
        # (pids get reused): fold them before this process adds to them
        try:
            with folder_lock(path):
                fold(path, pid)
        except OSError as err:
            log.debug("could not fold stale metrics of pid %d: %s", pid, err)

    @worker_process_shutdown.connect(weak=False)
    def _pool_process_exits(**_: object) -> None:
        pid = os.getpid()
        if pid == main_pid:
            return
        try:
            with folder_lock(path):
                fold(path, pid)
        except OSError as err:  # the main process folds it at the next scrape instead
            log.debug("could not fold the metrics of pool process %d: %s", pid, err)

    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", addr, bound)
    return Exporter(server, thread, Path(path), addr, int(bound))
