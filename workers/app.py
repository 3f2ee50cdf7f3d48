"""The Celery app: queues, routing and the settings that make long ML stages safe to run.

Importing this module is cheap and side-effect free: it reads the stage table but imports
neither torch nor any stage's module, so a prefork parent never initialises CUDA (the stages
import torch inside the task, in the process that runs them).

Settings (the ``QPIPE_*`` knobs in ``pipeline/settings.py``; ``qpipe config`` lists them):
- JSON only, for task messages, results and events (``accept_content=["json"]``): a pickled
  message is refused, never deserialised.
- ``task_acks_late`` + ``task_reject_on_worker_lost`` + ``worker_prefetch_multiplier=1``: a
  message is acknowledged only after its stage finished, and a worker holds one message at a time,
  so a worker that dies loses nothing; the message is delivered again.
- Leases instead of one long Redis ``visibility_timeout``: each worker renews the delivery time
  of the messages it holds (``workers/leases.py``), so a running stage is never handed to a
  second worker however long it runs, and a dead worker's stage is redelivered once
  ``visibility_timeout`` (300 s) has passed.
- ``QPIPE_MAX_DELIVERIES`` (3): a stage whose process dies on that many deliveries in a row (the
  OOM killer, a segfault) is failed with the cause instead of being delivered again forever
  (``workers/deliveries.py``); a stage killed once or twice still resumes.
- Results (chord counters included) expire after 7 days, longer than any pipeline's span.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pipeline.settings import secret, settings
from pipeline.stages.table import QUEUES, STAGES

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
# the stages and the queue each runs on, from the stage table (torch-free)
STAGE_QUEUES = {name: d.queue for name, d in STAGES.items()}
_KNOBS = settings()  # read once, at import: the limits below are fixed for the app's life
STAGE_TIME_LIMIT = _KNOBS.stage_time_limit  # hard limit, seconds
RETRY_BACKOFF_MAX = _KNOBS.retry_backoff_max
MAX_RETRIES = _KNOBS.max_retries
# Messages held by a live worker are renewed every LEASE_INTERVAL seconds (workers/leases.py), so
# the visibility timeout bounds how long a *dead* worker's stage waits before redelivery.
LEASE_INTERVAL = _KNOBS.lease_interval
VISIBILITY_TIMEOUT = _KNOBS.visibility_timeout
RESTORE_INTERVAL = _KNOBS.restore_interval
# deliveries of one stage in a row whose process died before the stage is failed (workers/deliveries.py)
MAX_DELIVERIES = _KNOBS.max_deliveries


def broker_url(explicit: str | None = None) -> str | None:
    return explicit or secret(settings().broker_url) or None


def configure(app: Celery, url: str) -> Celery:
    """Point ``app`` at a Redis/Valkey broker (which also stores results and run status)."""
    transport = {"visibility_timeout": VISIBILITY_TIMEOUT, "socket_timeout": 30, "socket_connect_timeout": 10,
                 "retry_on_timeout": True, "health_check_interval": 25,
                 "unacked_restore_interval": RESTORE_INTERVAL, "unacked_restore_throttle": 1}
    app.conf.update(
        broker_url=url,
        result_backend=url,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT, "retry_policy": {"timeout": 10.0}},
    )
    return app


def create_app(url: str | None = None) -> Celery:
    app = Celery("qpipe", include=["workers.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_default_queue="cpu",
        task_routes={f"qpipe.{stage}": {"queue": queue} for stage, queue in STAGE_QUEUES.items()},
        task_time_limit=STAGE_TIME_LIMIT,
        task_soft_time_limit=max(STAGE_TIME_LIMIT - 60, 1),
        result_expires=7 * 24 * 3600,
        result_extended=True,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_max_memory_per_child=settings().worker_max_memory_kb,
        broker_connection_retry_on_startup=True,
        broker_channel_error_retry=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_deduplicate_successful_tasks=False,
    )
    return configure(app, broker_url(url) or DEFAULT_BROKER)


app = create_app()
