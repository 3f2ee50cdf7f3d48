"""Recording: turning metrics on in a worker, the metric definitions, and the functions stages
call to record into them (every one a no-op unless the worker enabled metrics).

prometheus_client picks its multiprocess mode when first imported, so this module imports it
only inside functions, after :func:`enable_multiprocess` has set ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.settings import settings
from pipeline.stages.table import STAGES  # the stage label of each declared stage

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808
DEFAULT_ADDR = "127.0.0.1"
# set by enable_multiprocess and inherited by the pool processes: a hand-off inside one worker, not
# a knob (the parent folder of the per-worker folders is QPIPE_METRICS_DIR, in pipeline/settings.py)
ACTIVE_ENV = "QPIPE_METRICS_WORKER_DIR"
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
    base = settings().metrics_dir or Path(tempfile.gettempdir()) / f"qpipe-metrics-{os.getuid()}"
    return base / re.sub(r"[^A-Za-z0-9@._-]", "_", node)


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
