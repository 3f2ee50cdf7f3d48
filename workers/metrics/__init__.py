"""Prometheus metrics of a qpipe worker, served on ``/metrics`` by the worker's main process.

``qpipe worker --metrics-port 9808 [--metrics-addr 0.0.0.0]`` turns them on (off by default).

Stages run in pool processes (prefork; the gpu queue replaces its pool process after every
stage) or in the main process (solo and threads pools). Every process therefore records into
prometheus_client's multiprocess files, in one folder per worker, and the main process merges
them with prometheus_client's ``MultiProcessCollector`` when scraped. Three modules, one seam
each:

- :mod:`.record`: turning metrics on (:func:`enable_multiprocess`, before anything imports
  prometheus_client), the metric definitions, and what stages call to record
  (:class:`StageAttempt`, :func:`images_hook`, :func:`count_transfer`, :func:`set_quality`,
  :func:`update_gpu_memory`). These do nothing unless the worker enabled metrics, so the stages
  cost nothing extra and write no files when metrics are off.
- :mod:`.export`: the ``/metrics`` server (:func:`serve`) and the bookkeeping of the files that
  exited pool processes leave behind (:func:`fold`), which prometheus_client does not do.
- :mod:`.queues`: ``qpipe_queue_messages`` and ``qpipe_worker_info``, computed at scrape time;
  the one place that knows how kombu lays out a queue in Redis.

Label values come from bounded sets: stage names, outcomes, phases, queues, exception class
names from :data:`ERROR_TYPES` (others are reported as ``other``), pipeline and variant names
of the specs that ran. No label, sample or log line here ever holds a URL or a credential.

Nothing here imports prometheus_client, redis or celery at import time.
"""

from workers.metrics.export import Exporter, ProcessFilesCollector, fold, fold_dead, folder_lock, serve
from workers.metrics.queues import WorkerCollector
from workers.metrics.record import (
    DEFAULT_ADDR,
    DEFAULT_PORT,
    ERROR_TYPES,
    METRIC_NAMES,
    OUTCOMES,
    PHASES,
    StageAttempt,
    count_transfer,
    enable_multiprocess,
    enabled,
    error_type,
    images_hook,
    set_quality,
    stage_label,
    update_gpu_memory,
    worker_dir,
)

__all__ = [
    "DEFAULT_ADDR", "DEFAULT_PORT", "ERROR_TYPES", "METRIC_NAMES", "OUTCOMES", "PHASES",
    "Exporter", "ProcessFilesCollector", "StageAttempt", "WorkerCollector",
    "count_transfer", "enable_multiprocess", "enabled", "error_type", "fold", "fold_dead", "folder_lock",
    "images_hook", "serve", "set_quality", "stage_label", "update_gpu_memory", "worker_dir",
]
