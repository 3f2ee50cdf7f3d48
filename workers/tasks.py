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

import functools
import logging
import random
import time
from typing import Any

from celery import Task

from workers.app import STAGE_QUEUES, app
from workers.state import RunState, connect

log = logging.getLogger(__name__)
MAX_RETRIES = 8
PROGRESS_INTERVAL = 0.5  # seconds between progress writes to Redis


@functools.cache
def _redis(url: str):
    return connect(url)


def state_for(task: Task, run_id: str) -> RunState:
    return RunState(_redis(task.app.conf.broker_url), run_id)


def backoff(retries: int, base: float = 2.0, cap: float | None = None) -> float:
    """Exponential backoff with full jitter, capped at QPIPE_RETRY_BACKOFF_MAX."""
    from workers.app import RETRY_BACKOFF_MAX

    cap = RETRY_BACKOFF_MAX if cap is None else cap
    return random.uniform(base, max(base, min(cap, base * 2**retries)))


def run_stage(task: Task, run_id: str, node: dict[str, Any], store_uri: str) -> dict[str, Any]:
    from pipeline.errors import Cancelled, ConfigError, StageError, TransientError
    from pipeline.stages import execute
    from pipeline.store import open_store

    node_id, stage = node["id"], node["stage"]
    state = state_for(task, run_id)
    worker = task.request.hostname
    state.mark_running()

    def finish(kind: str, **fields: Any) -> dict[str, Any]:
        state.update_stage(node_id, state=kind, finished=time.time(), **fields)
        return {"node": node_id, "state": kind}

    if state.cancel_requested() and stage != "report":
        return finish("cancelled", error="the run was cancelled")
    if stage != "report":
        stages = state.stages()
        broken = [d["id"] for d in node["inputs"].values()
                  if stages.get(d["id"], {}).get("state") in ("failed", "cancelled")]
        if broken:
            return finish("failed", error=f"not run: upstream {broken[0]} did not finish")
    state.update_stage(node_id, state="running", worker=worker, started=time.time(), progress=0.0,
                       attempt=task.request.retries + 1, error=None)
    last = [0.0]

    def on_progress(fraction: float, detail: str) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL or fraction >= 1.0:
            last[0] = now
            state.update_stage(node_id, progress=round(fraction, 4), detail=detail)

    extra: dict[str, Any] = {"spec_sha256": state.get("spec_sha256")}
    if stage == "report":
        extra["failures"] = state.failures()
        extra["cancelled"] = state.cancel_requested()
        extra["cached_stages"] = sum(1 for s in state.stages().values() if s["state"] == "cached")
    try:
        store = open_store(store_uri)
        result = execute(node, store, run_id=run_id, on_progress=on_progress, is_cancelled=state.cancel_requested,
                         extra=extra)
    except TransientError as err:
        if task.request.retries < MAX_RETRIES:
            delay = backoff(task.request.retries)
            log.warning("%s %s: %s; retry %d in %.0fs", run_id, node_id, err, task.request.retries + 1, delay)
            state.update_stage(node_id, state="retrying", error=str(err))
            raise task.retry(countdown=delay, max_retries=MAX_RETRIES) from None
        out = finish("failed", error=f"gave up after {MAX_RETRIES} retries: {err}")
    except Cancelled as err:
        out = finish("cancelled", error=str(err))
    except (ConfigError, StageError) as err:
        log.error("%s %s failed: %s", run_id, node_id, err)
        out = finish("failed", error=str(err))
    except Exception as err:  # a bug: keep the traceback in the log, the cause in the status
        log.exception("%s %s crashed", run_id, node_id)
        out = finish("failed", error=f"{type(err).__name__}: {err}")
    else:
        out = finish("cached" if result.cached else "done", progress=1.0, manifest=result.manifest_uri)
        if stage == "report":
            state.finish(result.manifest["summary"])
        return out
    if stage == "report":  # the report itself failed: the run still ends, FAILED
        state.set(status="CANCELLED" if state.cancel_requested() else "FAILED", finished=time.time(),
                  error=f"report failed: {state.stage(node_id).get('error')}")
    return out


def _make_task(stage: str, queue: str) -> Task:
    def stage_task(self: Task, run_id: str, node: dict[str, Any], store_uri: str) -> dict[str, Any]:
        return run_stage(self, run_id, node, store_uri)

    stage_task.__name__ = f"{stage}_task"
    stage_task.__doc__ = f"qpipe stage '{stage}' (queue {queue})."
    return app.task(name=f"qpipe.{stage}", bind=True, queue=queue, acks_late=True,
                    reject_on_worker_lost=True, max_retries=MAX_RETRIES)(stage_task)


TASKS = {stage: _make_task(stage, queue) for stage, queue in STAGE_QUEUES.items()}
