"""Prometheus metrics of a qpipe worker, served on ``/metrics`` by the worker's main process.

``qpipe worker --metrics-port 9808 [--metrics-addr 0.0.0.0]`` turns them on (off by default).

Stages run in pool processes (prefork; the gpu queue replaces its pool process after every
stage) or in the main process (solo and threads pools). Every process therefore records into
prometheus-client's multiprocess files, in one folder per worker, and the main process merges
them when scraped:

- :func:`enable_multiprocess` picks the folder (``$QPIPE_METRICS_DIR/{node}``, by default under
  the system's temporary folder), wipes it, and sets ``PROMETHEUS_MULTIPROC_DIR``. It must run
  before prometheus_client is imported anywhere in the worker; this module imports it only
  inside functions for that reason, and nothing else in qpipe imports it.
- A pool process that exits leaves its files behind. Left alone, a gpu worker would add a few
  files per stage and every scrape would read all of them. So the files of a dead process are
  folded into one ``*_archive.db`` file per kind: counters and histograms are added, ``mostrecent``
  gauges keep the newest value, and ``live*`` gauges (stages in progress, GPU memory) are deleted,
  which is what ``prometheus_client.multiprocess.mark_process_dead`` does. A pool process folds
  its own files when it exits (Celery's ``worker_process_shutdown`` signal, sent in the exiting
  process); the main process folds those of processes that died without saying so (SIGKILL, out
  of memory) at the next scrape. A file lock orders folding and scraping, so a scrape never sees
  a value twice or not at all.
- The queue depths and ``qpipe_worker_info`` are computed at scrape time in the main process; a
  broker that does not answer within a second leaves the queue samples out of that scrape.

Recording functions (:class:`StageAttempt`, :func:`images_hook`, :func:`count_transfer`,
:func:`set_quality`, :func:`update_gpu_memory`) do nothing unless the worker enabled metrics,
so the stages cost nothing extra and write no files when metrics are off.

Label values come from bounded sets: stage names, outcomes, phases, queues, exception class
names from :data:`ERROR_TYPES` (others are reported as ``other``), pipeline and variant names
of the specs that ran. No label, sample or log line here ever holds a URL or a credential.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import glob
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stages.table import STAGES  # the stage label of each declared stage

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808
DEFAULT_ADDR = "127.0.0.1"
DIR_ENV = "QPIPE_METRICS_DIR"  # parent folder of the per-worker folders
ACTIVE_ENV = "QPIPE_METRICS_WORKER_DIR"  # set (and inherited by pool processes) once enabled
ARCHIVE = "archive"  # stands where a pid would in the name of a folded file

DURATION_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600)
OUTCOMES = ("done", "cached", "failed", "cancelled", "retry")
PHASES = ("train", "calibrate", "eval")
# exception class names kept as the error_type label; anything else is "other"
ERROR_TYPES = frozenset({
    "ConfigError", "SpecError", "StageError", "TransientError", "Cancelled", "ArtifactMissing", "CorruptArtifact",
    "OutOfMemory", "ProcessLost", "DeviceUnavailable",
    "SoftTimeLimitExceeded", "TimeLimitExceeded", "WorkerLostError", "OutOfMemoryError", "MemoryError",
    "RuntimeError", "ValueError", "TypeError", "KeyError", "IndexError", "AttributeError", "AssertionError",
    "NotImplementedError", "ZeroDivisionError", "OSError", "FileNotFoundError", "PermissionError",
    "TimeoutError", "ConnectionError",
})

METRIC_NAMES: tuple[str, ...] = (
    "qpipe_stage_duration_seconds",
    "qpipe_stages_in_progress",
    "qpipe_stage_failures_total",
    "qpipe_stage_retries_total",
    "qpipe_cache_hits_total",
    "qpipe_cache_misses_total",
    "qpipe_artifact_uploaded_bytes_total",
    "qpipe_artifact_downloaded_bytes_total",
    "qpipe_images_processed_total",
    "qpipe_images_per_second",
    "qpipe_queue_messages",
    "qpipe_model_accuracy_top1",
    "qpipe_model_accuracy_drop",
    "qpipe_model_size_bytes",
    "qpipe_model_latency_seconds",
    "qpipe_gpu_memory_bytes",
    "qpipe_worker_info",
)


# ----------------------------------------------------------------------------- enabling

def enabled() -> bool:
    """True in a worker started with ``--metrics-port`` (and in its pool processes)."""
    return bool(os.environ.get(ACTIVE_ENV))


def worker_dir(node: str) -> Path:
    base = os.environ.get(DIR_ENV) or os.path.join(tempfile.gettempdir(), f"qpipe-metrics-{os.getuid()}")
    return Path(base) / re.sub(r"[^A-Za-z0-9@._-]", "_", node)


def enable_multiprocess(node: str) -> Path:
    """Prepare this worker's metrics folder and point prometheus_client at it. Call in the
    worker's main process before anything imports prometheus_client."""
    if "prometheus_client.values" in sys.modules:
        from prometheus_client import values

        if not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError("prometheus_client was imported before the worker enabled its multiprocess "
                               "metrics, so pool processes would record into memory nobody scrapes: "
                               "enable metrics first")
    path = worker_dir(node)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for f in path.glob("*.db"):  # values of an earlier worker with the same node name
        f.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    os.environ[ACTIVE_ENV] = str(path)
    return path


# ----------------------------------------------------------------------------- the metrics

class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.stage_duration = Histogram(
            "qpipe_stage_duration_seconds", "Wall time of one attempt at a stage, by how it ended.",
            ["stage", "outcome"], buckets=DURATION_BUCKETS)
        self.in_progress = Gauge("qpipe_stages_in_progress", "Stages running now.", ["stage"],
                                 multiprocess_mode="livesum")
        self.failures = Counter("qpipe_stage_failures_total", "Stages that ended failed, by exception class.",
                                ["stage", "error_type"])
        self.retries = Counter("qpipe_stage_retries_total", "Stage attempts that will be retried.",
                               ["stage", "error_type"])
        self.cache_hits = Counter("qpipe_cache_hits_total", "Stages reused from the content-addressed store.",
                                  ["stage"])
        self.cache_misses = Counter("qpipe_cache_misses_total", "Stages computed because the store had no result.",
                                    ["stage"])
        self.uploaded = Counter("qpipe_artifact_uploaded_bytes_total", "Bytes written to the artifact store.")
        self.downloaded = Counter("qpipe_artifact_downloaded_bytes_total", "Bytes read from the artifact store.")
        self.images = Counter("qpipe_images_processed_total", "Images through a model, by stage and phase.",
                              ["stage", "phase"])
        self.images_rate = Gauge("qpipe_images_per_second", "Throughput of the latest whole pass over a split.",
                                 ["stage", "phase"], multiprocess_mode="mostrecent")
        quality = ["pipeline", "variant"]
        self.accuracy = Gauge("qpipe_model_accuracy_top1", "Top-1 accuracy on the validation split, latest run.",
                              quality, multiprocess_mode="mostrecent")
        self.drop = Gauge("qpipe_model_accuracy_drop", "Top-1 drop vs the fp32 baseline, latest run.",
                          quality, multiprocess_mode="mostrecent")
        self.size = Gauge("qpipe_model_size_bytes", "Size of the deployable model, latest run.",
                          quality, multiprocess_mode="mostrecent")
        self.latency = Gauge("qpipe_model_latency_seconds", "Median latency of one batch, latest run.",
                             [*quality, "batch_size"], multiprocess_mode="mostrecent")
        self.gpu_memory = Gauge("qpipe_gpu_memory_bytes", "CUDA memory held by this worker's processes.",
                                ["device", "kind"], multiprocess_mode="livesum")


_lock = threading.Lock()
_instance: _Metrics | None = None


def _metrics() -> _Metrics | None:
    global _instance
    if not enabled():
        return None
    with _lock:
        if _instance is None:
            _instance = _Metrics()
        return _instance


def stage_label(stage: str) -> str:
    """The stage label: the stage's name for every stage of the table, "other" for anything else."""
    return stage if stage in STAGES else "other"


def error_type(err: BaseException | None) -> str:
    name = type(err).__name__ if err is not None else "none"
    return name if name in ERROR_TYPES else "other"


class StageAttempt:
    """One attempt at a stage in this process: in progress from creation until :meth:`end`,
    which records its duration and outcome (and a failure, retry, cache hit or miss)."""

    def __init__(self, stage: str, *, cacheable: bool = True) -> None:
        self.stage = stage_label(stage)
        self.cacheable = cacheable
        self.started = time.monotonic()
        self.ended = False
        m = _metrics()
        if m is not None:
            m.in_progress.labels(self.stage).inc()

    def end(self, outcome: str, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        m = _metrics()
        if m is None:
            return
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}: use one of {OUTCOMES}")
        m.in_progress.labels(self.stage).dec()
        m.stage_duration.labels(self.stage, outcome).observe(time.monotonic() - self.started)
        if outcome == "failed":
            m.failures.labels(self.stage, error_type(error)).inc()
        elif outcome == "retry":
            m.retries.labels(self.stage, error_type(error)).inc()
        elif outcome == "cached" and self.cacheable:
            m.cache_hits.labels(self.stage).inc()
        elif outcome == "done" and self.cacheable:
            m.cache_misses.labels(self.stage).inc()
        update_gpu_memory()


def images_hook(stage: str) -> Callable[[str, int, float | None], None] | None:
    """The ``on_images(phase, n, per_second)`` callback for a stage's context (None when off)."""
    if not enabled():
        return None
    label = stage_label(stage)

    def on_images(phase: str, n: int, per_second: float | None) -> None:
        m = _metrics()
        if m is None:
            return
        phase = phase if phase in PHASES else "other"
        if n > 0:
            m.images.labels(label, phase).inc(n)
        if per_second is not None:
            m.images_rate.labels(label, phase).set(per_second)

    return on_images


def count_transfer(direction: str, nbytes: int) -> None:
    """The store's ``on_transfer`` callback: ``direction`` is ``upload`` or ``download``."""
    m = _metrics()
    if m is None or nbytes <= 0:
        return
    (m.uploaded if direction == "upload" else m.downloaded).inc(nbytes)


def set_quality(summary: dict[str, Any]) -> int:
    """Set the model-quality gauges from a run summary (the report's); returns the number of
    models recorded. Failed variants (no accuracy) are skipped."""
    m = _metrics()
    if m is None:
        return 0
    name = str(summary.get("name") or "unknown")
    base = summary.get("baseline")
    rows = ([base] if base else []) + list(summary.get("variants") or [])
    count = 0
    for row in rows:
        if row.get("accuracy_top1") is None:
            continue
        variant = str(row.get("name") or "unknown")
        m.accuracy.labels(name, variant).set(row["accuracy_top1"])
        drop = 0.0 if row is base else row.get("accuracy_drop")
        if drop is not None:
            m.drop.labels(name, variant).set(drop)
        if row.get("size_bytes") is not None:
            m.size.labels(name, variant).set(row["size_bytes"])
        for batch, ms in (row.get("latency_ms_p50") or {}).items():
            m.latency.labels(name, variant, str(batch)).set(ms / 1000.0)
        count += 1
    return count


def update_gpu_memory() -> None:
    """Record CUDA memory allocated and reserved by this process, only where CUDA is already
    initialised here (this never initialises it)."""
    torch = sys.modules.get("torch")
    m = _metrics()
    if m is None or torch is None or not torch.cuda.is_initialized():
        return
    for i in range(torch.cuda.device_count()):
        m.gpu_memory.labels(f"cuda:{i}", "allocated").set(torch.cuda.memory_allocated(i))
        m.gpu_memory.labels(f"cuda:{i}", "reserved").set(torch.cuda.memory_reserved(i))


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
    if old is None:
        return new
    if typ != "gauge" or mode == "sum":
        return old[0] + new[0], 0.0
    if mode == "max":
        return max(old, new, key=lambda v: v[0])
    if mode == "min":
        return min(old, new, key=lambda v: v[0])
    return max(old, new, key=lambda v: v[1])  # mostrecent: the newer timestamp wins


def fold(path: str | Path, pid: int) -> int:
    """Fold the files of the dead process ``pid`` into the folder's archive files; delete its
    ``live*`` gauges (the process no longer holds what they measured). Call under
    :func:`folder_lock`. Returns the number of files removed."""
    from prometheus_client.mmap_dict import MmapedDict

    removed = 0
    for f in glob.glob(os.path.join(path, f"*_{pid}.db")):
        typ, mode, _ = _parse(f)
        if mode.startswith("live"):
            os.remove(f)
            removed += 1
            continue
        if mode == "all":  # keeps a pid label per process: nothing to fold into (qpipe uses none)
            continue
        archive = os.path.join(path, f"{typ}_{mode}_{ARCHIVE}.db" if typ == "gauge" else f"{typ}_{ARCHIVE}.db")
        merged: dict[str, tuple[float, float]] = {}
        sources = [archive, f] if os.path.exists(archive) else [f]
        for src in sources:
            for key, value, ts, _ in MmapedDict.read_all_values_from_file(src):
                merged[key] = _combine(typ, mode, merged.get(key), (value, ts))
        out = MmapedDict(archive)
        try:
            for key, (value, ts) in merged.items():
                out.write_value(key, value, ts)
        finally:
            out.close()
        os.remove(f)
        removed += 1
    return removed


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
    pids = set()
    for f in glob.glob(os.path.join(path, "*.db")):
        pid = _parse(f)[2]
        if pid.isdigit() and int(pid) != os.getpid():
            pids.add(int(pid))
    dead = sorted(p for p in pids if not _alive(p))
    for pid in dead:
        fold(path, pid)
    return dead


class ProcessFilesCollector:
    """prometheus_client's multiprocess merge, after folding the files of dead processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        with folder_lock(self.path):
            dead = fold_dead(self.path)
            if dead:
                log.debug("folded the metrics of %d exited process(es)", len(dead))
            return list(MultiProcessCollector.merge(glob.glob(os.path.join(self.path, "*.db")), accumulate=True))


# ----------------------------------------------------------------------------- scrape-time collectors

class WorkerCollector:
    """``qpipe_worker_info`` and ``qpipe_queue_messages``, computed when scraped.

    waiting: length of the queue's Redis list (with kombu's priority sub-lists ``{queue}\\x06\\x16{n}``);
    reserved: messages delivered to a worker and not yet acknowledged, i.e. the entries of kombu's
    ``unacked`` hash whose routing key is the queue (qpipe binds each queue under its own name).
    """

    PRIORITY_SEP = "\x06\x16"
    PRIORITY_STEPS = (0, 3, 6, 9)

    def __init__(self, broker_url: str, *, node: str, queues: Iterable[str], pool: str,
                 all_queues: Iterable[str] = ("cpu", "gpu"), unacked_key: str = "unacked",
                 timeout: float = 1.0) -> None:
        self.node = node
        self.queues = ",".join(queues)
        self.pool = pool
        self.all_queues = tuple(all_queues)
        self.unacked_key = unacked_key
        self._url = broker_url
        self._timeout = timeout
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._client = redis.Redis.from_url(self._url, socket_timeout=self._timeout,
                                                socket_connect_timeout=self._timeout, retry=Retry(NoBackoff(), 0))
        return self._client

    def queue_depths(self) -> dict[tuple[str, str], int]:
        """{(queue, "waiting"|"reserved"): count}; raises redis errors when the broker is down."""
        client = self._redis()
        pipe = client.pipeline(transaction=False)
        for q in self.all_queues:
            for step in self.PRIORITY_STEPS:
                pipe.llen(q if step == 0 else f"{q}{self.PRIORITY_SEP}{step}")
        pipe.hvals(self.unacked_key)
        *lengths, unacked = pipe.execute()
        depths = {}
        n = len(self.PRIORITY_STEPS)
        for i, q in enumerate(self.all_queues):
            depths[(q, "waiting")] = sum(lengths[i * n:(i + 1) * n])
            depths[(q, "reserved")] = 0
        for raw in unacked:
            try:
                routing_key = json.loads(raw)[2]
            except (ValueError, IndexError, TypeError):
                continue
            if (routing_key, "reserved") in depths:
                depths[(routing_key, "reserved")] += 1
        return depths

    def collect(self) -> Iterable[Any]:
        import redis
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily("qpipe_worker_info", "1 per running worker, with what it serves.",
                                 labels=["node", "queues", "pool"])
        info.add_metric([self.node, self.queues, self.pool], 1.0)
        yield info
        try:
            depths = self.queue_depths()
        except (redis.RedisError, OSError) as err:  # the broker is down: leave the samples out
            log.debug("queue depth not collected: broker unreachable (%s)", type(err).__name__)
            self._client = None
            return
        family = GaugeMetricFamily("qpipe_queue_messages", "Messages in the broker per queue: waiting in the "
                                   "queue, or reserved by a worker and not yet acknowledged.",
                                   labels=["queue", "state"])
        for (q, state), count in sorted(depths.items()):
            family.add_metric([q, state], float(count))
        yield family


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
