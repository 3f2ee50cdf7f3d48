"""One thin Celery task per stage, all built by one generic adapter over
``pipeline.stages.execute``.

A task message holds JSON only: ``(run_id, node, store_uri)`` where ``node`` is a plan node
(stage, variant, key, config, input references). The adapter records the stage's state in Redis,
runs the stage, and classifies what goes wrong:

- ``TransientError`` (store or broker unreachable): retried with exponential backoff and jitter,
  up to ``MAX_RETRIES``; then the stage fails naming the dependency.
- ``ConfigError`` / ``StageError``: failed at once, never retried, with the cause recorded.
- ``Cancelled``: the run was cancelled; the stage stops and is marked so.
- anything else is a bug: logged with its traceback and recorded as the stage's failure.

A task never raises after its last retry: the report (the chord's body) always runs, so a
failed variant cannot stop the other variants or leave the run without a summary.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
from celery import Task
from celery.exceptions import Retry

from pipeline.stages.table import is_join
from workers import metrics
from workers.app import MAX_DELIVERIES, MAX_RETRIES, RETRY_BACKOFF_MAX, STAGE_QUEUES, app
from workers.deliveries import Deliveries, explain
from workers.state import FINAL_RUN_STATES, RunState, connect

log = logging.getLogger(__name__)
T = TypeVar("T")
PROGRESS_INTERVAL = 0.5  # seconds between progress writes to Redis
# seconds a stage lock outlives a holder that died; renewed every LOCK_TTL / 4 while the stage runs
LOCK_TTL = int(os.environ.get("QPIPE_LOCK_TTL", 60))
FINAL_STAGE_STATES = ("done", "cached", "failed", "cancelled")
BROKER_ERRORS = (redis.ConnectionError, redis.TimeoutError)


@functools.cache
def _redis(url: str) -> redis.Redis:
    return connect(url)


def state_for(task: Task, run_id: str) -> RunState:
    return RunState(_redis(task.app.conf.broker_url), run_id)


def backoff(retries: int, base: float = 2.0, cap: float | None = None) -> float:
    """Exponential backoff with full jitter, capped at QPIPE_RETRY_BACKOFF_MAX."""
    cap = RETRY_BACKOFF_MAX if cap is None else cap
    return random.uniform(min(base, cap), max(min(base, cap), min(cap, base * 2**retries)))


def patiently(fn: Callable[[], T], what: str, patience: float = 300.0) -> T:
    """Call a Redis operation, waiting out a broker outage (restart) for up to ``patience`` s."""
    deadline = time.monotonic() + patience
    attempt = 0
    while True:
        try:
            return fn()
        except BROKER_ERRORS as err:
            if time.monotonic() > deadline:
                raise
            attempt += 1
            delay = backoff(attempt, base=0.5, cap=10.0)
            log.warning("%s: broker unreachable (%s); retrying in %.1fs", what, err, delay)
            time.sleep(delay)


@contextlib.contextmanager
def stage_lock(client: redis.Redis, key: str, owner: str, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold ``key`` while a stage computes, so a duplicate delivery of the same stage waits for
    the first one and then finds its result in the store instead of computing it again. The lock
    expires LOCK_TTL s after its holder dies; a thread renews it while the holder lives."""
    waited = False
    while not patiently(lambda: client.set(key, owner, nx=True, ex=LOCK_TTL), "lock"):
        if not waited:  # once per delivery: says which path a duplicate took
            log.info("%s is held: the same stage is running elsewhere; waiting for it", key)
            waited = True
        on_wait()
        time.sleep(1.0)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LOCK_TTL / 4):
            with contextlib.suppress(*BROKER_ERRORS):
                if client.get(key) == owner:
                    client.expire(key, LOCK_TTL)

    thread = threading.Thread(target=renew, name="qpipe-stage-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(*BROKER_ERRORS):
            release_lock(client, key, owner)


def lock_name(run_id: str, node: dict[str, Any]) -> str:
    """The stage lock of a node: per content key, and per run for the join (the report: not cached)."""
    return f"qpipe:lock:{node['stage']}:{run_id if is_join(node['stage']) else node['key']}"


def lock_owner(hostname: str, task_id: str) -> str:
    return f"{hostname}:{task_id}"


def release_lock(client: redis.Redis, key: str, owner: str) -> int:
    """Delete ``key`` only while ``owner`` holds it (compare and delete in one step)."""
    return client.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                       "return 0", 1, key, owner)


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


def remove_partial_outputs(store: Any, node: dict, keep_checkpoints: bool) -> None:
    """Delete what a stage wrote before failing, so the store holds no orphaned objects."""
    from pipeline.stages import stage_def

    if not stage_def(node["stage"]).cached:
        return
    prefix = f"stages/{node['stage']}/{node['key']}"
    for key in store.list(prefix):
        if keep_checkpoints and key.startswith(f"{prefix}/checkpoints/"):
            continue
        store.delete(key)


def run_stage(task: Task, run_id: str, node: dict[str, Any], store_uri: str) -> dict[str, Any]:
    from pipeline.errors import Cancelled, ConfigError, StageError, TransientError
    from pipeline.stages import execute
    from pipeline.store import open_store

    # a worker serves the store it was started with (`qpipe worker` puts the store's own spelling
    # of its URI here): a message naming another one is refused before anything is read or written
    own_store = os.environ.get("QPIPE_STORE_URI") or "no store"
    if store_uri != own_store:
        log.error("%s %s refused: it names the store %s, this worker serves %s", run_id, node.get("id"),
                  store_uri, own_store)
        return fail_stage(task, run_id, node, f"refused: the stage names the store {store_uri}, but its worker "
                          f"serves {own_store}: submit to the store the workers were started with "
                          "(QPIPE_STORE_URI), or start workers for that store")

    node_id, stage = node["id"], node["stage"]
    state = state_for(task, run_id)
    worker = task.request.hostname

    def finish(kind: str, **fields: Any) -> dict[str, Any]:
        patiently(lambda: state.update_stage(node_id, state=kind, finished=time.time(), **fields), "status")
        return {"node": node_id, "state": kind}

    patiently(state.mark_running, "status")
    if is_join(stage):
        if patiently(lambda: state.get("status"), "status") in FINAL_RUN_STATES:
            return {"node": node_id, "state": "done"}  # a duplicate delivery of the report
        stages = patiently(state.stages, "status")
        unfinished = [k for k, v in stages.items() if k != node_id and v["state"] not in FINAL_STAGE_STATES]
        if unfinished:  # the chord fired early (a redelivered header task): wait for the rest
            raise task.retry(countdown=2, max_retries=None)
    else:
        if patiently(state.cancel_requested, "status"):
            return finish("cancelled", error="the run was cancelled")
        stages = patiently(state.stages, "status")
        broken = [d["id"] for d in node["inputs"].values()
                  if stages.get(d["id"], {}).get("state") in ("failed", "cancelled")]
        if broken:
            return finish("failed", error=f"not run: upstream {broken[0]} did not finish")
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

    extra: dict[str, Any] = {"spec_sha256": patiently(lambda: state.get("spec_sha256"), "status")}
    if is_join(stage):
        extra["failures"] = state.failures()
        extra["cancelled"] = state.cancel_requested()
        extra["cached_stages"] = sum(1 for s in state.stages().values() if s["state"] == "cached")
    store = None
    lock, owner = lock_name(run_id, node), lock_owner(worker, task.request.id)

    def waiting() -> None:
        with contextlib.suppress(*BROKER_ERRORS):
            # a duplicate delivery of this very node shares its row with the holder: the row keeps
            # saying "running"; a node of another run that shares the key shows why it waits
            if (state.stage(node_id) or {}).get("state") != "running":
                state.update_stage(node_id, state="pending", detail="waiting: the same stage is running elsewhere")

    attempt = metrics.StageAttempt(stage, cacheable=not is_join(stage))  # no-op unless metrics are on
    try:
        store = open_store(store_uri)
        store.on_transfer = metrics.count_transfer
        with stage_lock(state.r, lock, owner, waiting), counted_delivery(state.r, stage, node["key"]):
            patiently(lambda: state.update_stage(node_id, state="running", worker=worker, pid=os.getpid(),
                                                 started=time.time(), progress=0.0,
                                                 attempt=task.request.retries + 1, error=None),
                      "status")
            result = execute(node, store, run_id=run_id, on_progress=on_progress, is_cancelled=is_cancelled,
                             extra=extra, on_images=metrics.images_hook(stage))
    except TransientError as err:
        if task.request.retries < MAX_RETRIES:
            delay = backoff(task.request.retries)
            log.warning("%s %s: %s; retry %d in %.0fs", run_id, node_id, err, task.request.retries + 1, delay)
            attempt.end("retry", err)
            with contextlib.suppress(*BROKER_ERRORS):
                state.update_stage(node_id, state="retrying", error=str(err))
            raise task.retry(countdown=delay, max_retries=MAX_RETRIES) from None
        attempt.end("failed", err)
        out = finish("failed", error=f"gave up after {MAX_RETRIES} retries: {err}")
    except Cancelled as err:
        attempt.end("cancelled", err)
        out = finish("cancelled", error=str(err))
        _cleanup(store, node, keep_checkpoints=True)
    except (ConfigError, StageError) as err:
        attempt.end("failed", err)
        log.error("%s %s failed: %s", run_id, node_id, err)
        out = finish("failed", error=str(err))
        # out of memory, or a process lost every time: the epochs trained so far stay, for a rerun
        # with room to resume from
        _cleanup(store, node, keep_checkpoints=err.keeps_checkpoints)
    except Exception as err:  # a bug: keep the traceback in the log, the cause in the status
        attempt.end("failed", err)
        log.exception("%s %s crashed", run_id, node_id)
        out = finish("failed", error=f"{type(err).__name__}: {err}")
        # an unexpected error (a bug, a full disk, a CUDA fault) never deletes the only progress
        # of a long stage: its checkpoints stay for the rerun
        _cleanup(store, node, keep_checkpoints=True)
    else:
        if not result.cached:  # one line per computation, so executions per content key can be counted
            log.info("%s %s: computed stage %s key %s", run_id, node_id, stage, node["key"])
        attempt.end("cached" if result.cached else "done")
        out = finish("cached" if result.cached else "done", progress=1.0, manifest=result.manifest_uri)
        if is_join(stage):
            patiently(lambda: state.finish(result.manifest["summary"]), "status")
            try:  # the run's outcome is recorded; a metrics problem must not change it
                metrics.set_quality(result.manifest["summary"])
            except Exception:
                log.exception("%s: could not set the quality gauges", run_id)
        return out
    if is_join(stage):  # the report itself failed: the run still ends, FAILED
        patiently(lambda: state.set(status="CANCELLED" if state.cancel_requested() else "FAILED",
                                    finished=time.time(),
                                    error=f"report failed: {state.stage(node_id).get('error')}"), "status")
    return out


def _cleanup(store: Any, node: dict, keep_checkpoints: bool) -> None:
    from pipeline.errors import QpipeError

    if store is None:
        return
    try:
        remove_partial_outputs(store, node, keep_checkpoints)
    except QpipeError as err:  # the store is down: the next attempt overwrites the same keys
        log.warning("could not remove partial outputs of %s: %s", node["id"], err)
    except Exception:  # never let clean-up hide the stage's own outcome from the run
        log.exception("could not remove partial outputs of %s", node["id"])


def fail_stage(task: Task, run_id: str, node: dict[str, Any], error: str) -> dict[str, Any]:
    """Record a stage as failed (the report stage: the run as FAILED) and return its result."""
    state = state_for(task, run_id)
    patiently(lambda: state.update_stage(node["id"], state="failed", finished=time.time(), error=error), "status")
    if is_join(node.get("stage", "")):
        patiently(lambda: state.set(status="FAILED", finished=time.time(), error=f"report failed: {error}"),
                  "status")
    return {"node": node["id"], "state": "failed"}


def _make_task(stage: str, queue: str) -> Task:
    def stage_task(self: Task, run_id: str, node: dict[str, Any], store_uri: str) -> dict[str, Any]:
        try:
            return run_stage(self, run_id, node, store_uri)
        except Retry:
            raise
        except Exception as err:
            # A task that raises makes the chord fail and its report never run, leaving the run
            # RUNNING forever: record the failure and return, so the report still fires.
            log.exception("%s %s: unexpected error outside the stage", run_id, node.get("id"))
            return fail_stage(self, run_id, node, f"{type(err).__name__}: {err}")

    stage_task.__name__ = f"{stage}_task"
    stage_task.__doc__ = f"qpipe stage '{stage}' (queue {queue})."
    return app.task(name=f"qpipe.{stage}", bind=True, queue=queue, acks_late=True,
                    reject_on_worker_lost=True, max_retries=MAX_RETRIES,
                    Request="workers.deliveries:Request")(stage_task)


TASKS = {stage: _make_task(stage, queue) for stage, queue in STAGE_QUEUES.items()}
