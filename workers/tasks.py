"""One thin Celery task per stage, all built by one adapter over ``pipeline.engine.run_node``.

A task message holds JSON only: ``(run_id, node, store_uri)`` where ``node`` is a plan node
(stage, variant, key, config, input references). The run rules (upstream failures, what the
report receives, how each error is recorded, what a failed stage leaves behind) are the engine's,
the same as in one process. What this module adds is Celery's part:

- the ledger is the run's record in Redis (``workers.state.RedisLedger``);
- the stage lock (``workers/locks.py``) and the count of deliveries whose process died
  (``workers/deliveries.py``) around the computation;
- ``TransientError`` (store or broker unreachable) is retried by Celery (``autoretry_for`` with
  ``retry_backoff``, full jitter, capped at QPIPE_RETRY_BACKOFF_MAX) up to ``MAX_RETRIES``; then
  the stage fails naming the dependency;
- the report (the chord's body) waits for a header task that was redelivered after it fired;
- metrics.

A task never raises after its last retry: the report always runs, so a failed variant cannot
stop the other variants or leave the run without a summary.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import redis
from celery import Task
from celery.exceptions import Retry

from pipeline.errors import TransientError
from pipeline.settings import settings
from pipeline.stages.table import is_join
from workers import metrics
from workers.app import MAX_DELIVERIES, MAX_RETRIES, RETRY_BACKOFF_MAX, STAGE_QUEUES, app
from workers.deliveries import Deliveries, explain
from workers.locks import lock_name, lock_owner, stage_lock
from workers.state import BROKER_ERRORS, RedisLedger, RunState, connect, patiently

log = logging.getLogger(__name__)
PROGRESS_INTERVAL = 0.5  # seconds between progress writes to Redis
RETRY_BACKOFF = 2  # seconds: Celery's retry_backoff factor (2, 4, 8, ... s, full jitter)


@functools.cache
def _redis(url: str) -> redis.Redis:
    return connect(url)


def state_for(task: Task, run_id: str) -> RunState:
    return RunState(_redis(task.app.conf.broker_url), run_id)


@contextlib.contextmanager
def counted_delivery(client: redis.Redis, stage: str, key: str) -> Iterator[None]:
    """Count this delivery of a stage until it ends under control (``workers/deliveries.py``);
    after QPIPE_MAX_DELIVERIES deliveries in a row died, fail the stage instead of running it.
    Entered once the stage lock is held. An Exception is a controlled end (the stage's outcome,
    or a retry); SystemExit or a killed process is not, and leaves the count."""
    from pipeline.errors import ProcessLost

    deliveries = Deliveries(client, stage, key)
    died = patiently(deliveries.begin, "deliveries")
    try:
        if died >= MAX_DELIVERIES:
            raise ProcessLost(explain(died, patiently(deliveries.causes, "deliveries"), MAX_DELIVERIES))
        if died:
            log.warning("%s %s: delivery %d; %d before it died without finishing (limit %d)", stage, key, died + 1,
                        died, MAX_DELIVERIES)
        yield
    except Exception:
        with contextlib.suppress(*BROKER_ERRORS):  # the outcome matters more than the count
            patiently(deliveries.end, "deliveries")
        raise
    patiently(deliveries.end, "deliveries")


def run_stage(task: Task, run_id: str, node: dict[str, Any], store_uri: str) -> dict[str, Any]:
    from pipeline.engine import FINAL_STAGE_STATES, run_node
    from pipeline.store import open_store

    # a worker serves the store it was started with (`qpipe worker` puts the store's own spelling
    # of its URI here): a message naming another one is refused before anything is read or written
    own_store = settings().store_uri or "no store"
    if store_uri != own_store:
        log.error("%s %s refused: it names the store %s, this worker serves %s", run_id, node.get("id"),
                  store_uri, own_store)
        return fail_stage(task, run_id, node, f"refused: the stage names the store {store_uri}, but its worker "
                          f"serves {own_store}: submit to the store the workers were started with "
                          "(QPIPE_STORE_URI), or start workers for that store")

    node_id, stage = node["id"], node["stage"]
    state = state_for(task, run_id)
    ledger = RedisLedger(state)
    worker = task.request.hostname
    patiently(state.mark_running, "status")
    if is_join(stage):
        if ledger.ended():
            return {"node": node_id, "state": "done"}  # a duplicate delivery of the report
        unfinished = [k for k, v in ledger.stages().items() if k != node_id and v["state"] not in FINAL_STAGE_STATES]
        if unfinished:  # the chord fired early (a redelivered header task): wait for the rest
            raise task.retry(countdown=2, max_retries=None)
    last = [0.0]

    def on_progress(fraction: float, detail: str) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL or fraction >= 1.0:
            last[0] = now
            with contextlib.suppress(*BROKER_ERRORS):  # progress is best effort during an outage
                state.update_stage(node_id, progress=round(fraction, 4), detail=detail)
            metrics.update_gpu_memory()

    def is_cancelled() -> bool:
        try:
            return state.cancel_requested()
        except BROKER_ERRORS:
            return False

    def waiting() -> None:
        with contextlib.suppress(*BROKER_ERRORS):
            # a duplicate delivery of this very node shares its row with the holder: the row keeps
            # saying "running"; a node of another run that shares the key shows why it waits
            if (state.stage(node_id) or {}).get("state") != "running":
                state.update_stage(node_id, state="pending", detail="waiting: the same stage is running elsewhere")

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        with (stage_lock(state.r, lock_name(run_id, node), lock_owner(worker, task.request.id), waiting),
              counted_delivery(state.r, stage, node["key"])):
            yield

    attempts: list[metrics.StageAttempt] = []

    def open_() -> Any:  # the stage starts (it was not skipped): an attempt from here on, for metrics
        attempts.append(metrics.StageAttempt(stage, cacheable=not is_join(stage)))  # no-op unless metrics are on
        store = open_store(store_uri)
        store.on_transfer = metrics.count_transfer
        return store

    def can_retry(err: TransientError) -> bool:
        if task.request.retries >= MAX_RETRIES:
            return False
        log.warning("%s %s: %s; retry %d in up to %ds", run_id, node_id, err, task.request.retries + 1,
                    min(RETRY_BACKOFF_MAX, RETRY_BACKOFF * 2 ** task.request.retries))
        return True

    outcome = run_node(
        node, open_, ledger, run_id=run_id, spec_sha256=patiently(lambda: state.get("spec_sha256"), "status"),
        worker=worker, guard=guard, can_retry=can_retry,
        gave_up=gave_up,
        on_running=lambda: {"pid": os.getpid(), "attempt": task.request.retries + 1},
        on_progress=on_progress, is_cancelled=is_cancelled, on_images=metrics.images_hook(stage),
        on_outcome=lambda state, err: attempts and attempts[-1].end(state, err))
    if outcome.result is not None and is_join(stage):
        try:  # the run's outcome is recorded; a metrics problem must not change it
            metrics.set_quality(outcome.result.manifest["summary"])
        except Exception:
            log.exception("%s: could not set the quality gauges", run_id)
    return {"node": node_id, "state": outcome.state}


def gave_up(err: TransientError) -> str:
    """A transient error's record once Celery's retries are spent."""
    return f"gave up after {MAX_RETRIES} retries: {err}"


def fail_stage(task: Task, run_id: str, node: dict[str, Any], error: str) -> dict[str, Any]:
    """Record a stage as failed (the report stage: the run as FAILED) and return its result."""
    ledger = RedisLedger(state_for(task, run_id))
    ledger.update_stage(node["id"], state="failed", finished=time.time(), error=error)
    if is_join(node.get("stage", "")):
        ledger.fail_run("FAILED", f"report failed: {error}")
    return {"node": node["id"], "state": "failed"}


def _make_task(stage: str, queue: str) -> Task:
    def stage_task(self: Task, run_id: str, node: dict[str, Any], store_uri: str) -> dict[str, Any]:
        try:
            return run_stage(self, run_id, node, store_uri)
        except Retry:
            raise
        except TransientError as err:
            if self.request.retries < MAX_RETRIES:
                raise  # Celery's autoretry_for: a new message after the backoff
            log.exception("%s %s: unexpected error outside the stage", run_id, node.get("id"))
            return fail_stage(self, run_id, node, gave_up(err))
        except Exception as err:
            # A task that raises makes the chord fail and its report never run, leaving the run
            # RUNNING forever: record the failure and return, so the report still fires.
            log.exception("%s %s: unexpected error outside the stage", run_id, node.get("id"))
            return fail_stage(self, run_id, node, f"{type(err).__name__}: {err}")

    stage_task.__name__ = f"{stage}_task"
    stage_task.__doc__ = f"qpipe stage '{stage}' (queue {queue})."
    return app.task(name=f"qpipe.{stage}", bind=True, queue=queue, acks_late=True, reject_on_worker_lost=True,
                    autoretry_for=(TransientError,), max_retries=MAX_RETRIES, retry_backoff=RETRY_BACKOFF,
                    retry_backoff_max=RETRY_BACKOFF_MAX, retry_jitter=True,
                    Request="workers.deliveries:Request")(stage_task)


TASKS = {stage: _make_task(stage, queue) for stage, queue in STAGE_QUEUES.items()}
