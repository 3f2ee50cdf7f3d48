"""The run rules, once, for both executors: ``run_node`` runs one plan node against a store and a
ledger (the run's record of stage states), and decides everything that is not about where the
node runs:

- a node whose input failed or was cancelled is not run, and is recorded as failed with the
  upstream node named; a cancelled run records its remaining stages as cancelled;
- the join (the report) runs whatever happened, and receives the run's failures, whether it was
  cancelled and how many stages were served from the cache;
- a stage's outcome is recorded from the error taxonomy (``pipeline.errors``): ``Cancelled``;
  ``ConfigError``/``StageError`` (never retried); ``TransientError`` (retried where the executor
  can, else failed naming the dependency); anything else is a bug, logged with its traceback;
- what a failed stage wrote is removed, except its checkpoints when the error keeps them
  (out of memory, a lost process, a cancellation, a bug);
- the join's summary finishes the run; a failed join ends it FAILED (or CANCELLED).

``pipeline.runner`` runs a plan here over ``MemoryLedger``; ``workers.tasks`` runs each node in a
Celery task over the Redis ledger (``workers.state.RedisLedger``) and adds only what is Celery's:
the stage lock, delivery counting, retries and metrics.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.errors import Cancelled, ConfigError, QpipeError, StageError, TransientError
from pipeline.stages import StageResult, execute, is_join, stage_def
from pipeline.store import Store

log = logging.getLogger(__name__)

FINAL_STAGE_STATES = ("done", "cached", "failed", "cancelled")
BROKEN_STATES = ("failed", "cancelled")


class Ledger(Protocol):
    """A run's record of its stages, as ``run_node`` reads and writes it."""

    def stages(self) -> dict[str, dict]:
        """node id -> its row (``state``, ``error``, ...)."""

    def update_stage(self, node_id: str, **fields: Any) -> None: ...

    def cancel_requested(self) -> bool: ...

    def failures(self) -> list[dict]: ...

    def finish(self, summary: dict) -> None:
        """The join succeeded: the run ends with its summary's status."""

    def fail_run(self, status: str, error: str) -> None:
        """The join itself failed: the run ends ``status`` (FAILED or CANCELLED)."""

    def ended(self) -> bool:
        """Whether the run has ended (its join finished it, or failed)."""


@dataclass
class MemoryLedger:
    """The ledger of a run in one process (``pipeline.runner``)."""

    rows: dict[str, dict] = field(default_factory=dict)
    cancelled: bool = False
    summary: dict | None = None
    status: str = "RUNNING"
    error: str | None = None

    def stages(self) -> dict[str, dict]:
        return self.rows

    def update_stage(self, node_id: str, **fields: Any) -> None:
        self.rows.setdefault(node_id, {}).update(fields)

    def cancel_requested(self) -> bool:
        return self.cancelled

    def failures(self) -> list[dict]:
        return [{"stage": r["stage"], "variant": r.get("variant"), "node": nid, "error": r.get("error")}
                for nid, r in self.rows.items() if r.get("state") == "failed"]

    def finish(self, summary: dict) -> None:
        self.summary, self.status = summary, summary["status"]

    def fail_run(self, status: str, error: str) -> None:
        self.status, self.error = status, error

    def ended(self) -> bool:
        return self.status != "RUNNING"


def register(ledger: Ledger, plan: list[dict]) -> None:
    """Enter every node of ``plan`` in ``ledger`` as pending."""
    for n in plan:
        ledger.update_stage(n["id"], stage=n["stage"], variant=n.get("variant"), state="pending", progress=0.0,
                            worker=None, error=None, key=n["key"])


def remove_partial_outputs(store: Store, node: dict, keep_checkpoints: bool) -> None:
    """Delete what a stage wrote before failing, so the store holds no orphaned objects."""
    if not stage_def(node["stage"]).cached:
        return
    prefix = f"stages/{node['stage']}/{node['key']}"
    for key in store.list(prefix):
        if keep_checkpoints and key.startswith(f"{prefix}/checkpoints/"):
            continue
        store.delete(key)


def _cleanup(store: Store | None, node: dict, keep_checkpoints: bool) -> None:
    if store is None:
        return
    try:
        remove_partial_outputs(store, node, keep_checkpoints)
    except QpipeError as err:  # the store is down: the next attempt overwrites the same keys
        log.warning("could not remove partial outputs of %s: %s", node["id"], err)
    except Exception:  # never let clean-up hide the stage's own outcome from the run
        log.exception("could not remove partial outputs of %s", node["id"])


@dataclass
class Outcome:
    state: str  # one of FINAL_STAGE_STATES
    result: StageResult | None = None


def run_node(node: dict[str, Any], store: Store | Callable[[], Store], ledger: Ledger, *, run_id: str,
             spec_sha256: str | None, worker: str | None = None,
             guard: Callable[[], AbstractContextManager] = contextlib.nullcontext,
             can_retry: Callable[[TransientError], bool] = lambda err: False,
             gave_up: Callable[[TransientError], str] = str,
             on_running: Callable[[], dict[str, Any]] = dict,
             on_progress: Callable[[float, str], None] | None = None,
             is_cancelled: Callable[[], bool] | None = None,
             on_images: Callable[[str, int, float | None], None] | None = None,
             on_outcome: Callable[[str, BaseException | None], None] = lambda state, err: None) -> Outcome:
    """Run one plan node under the run rules above and record its outcome in ``ledger``.

    ``store`` may be a callable that opens it (so an unreachable store is the stage's transient
    error); ``guard()`` is entered around the computation (the executor's stage lock);
    ``on_running()`` adds fields to the row that says the stage runs; ``can_retry(err)`` says
    whether a transient error is retried by the executor: then it is re-raised after the row
    says "retrying", else ``gave_up(err)`` is the failure recorded; ``on_outcome(state, err)``
    hears the outcome of every stage that started, a retry included (a skipped node never starts)."""
    node_id, stage = node["id"], node["stage"]
    join = is_join(stage)

    def finish(state: str, **fields: Any) -> Outcome:
        ledger.update_stage(node_id, state=state, finished=time.time(), **fields)
        return Outcome(state)

    rows = ledger.stages()
    if not join:
        if ledger.cancel_requested():  # not an attempt: on_outcome hears only stages that started
            return finish("cancelled", error="the run was cancelled")
        broken = [d["id"] for d in node["inputs"].values() if rows.get(d["id"], {}).get("state") in BROKEN_STATES]
        if broken:
            return finish("failed", error=f"not run: upstream {broken[0]} did not finish")
    extra: dict[str, Any] = {"spec_sha256": spec_sha256}
    if join:
        extra["failures"] = ledger.failures()
        extra["cancelled"] = ledger.cancel_requested()
        extra["cached_stages"] = sum(1 for r in rows.values() if r.get("state") == "cached")
    opened: Store | None = None
    try:
        opened = store() if callable(store) else store
        with guard():
            if join and ledger.ended():  # a duplicate delivery of the join waited for the first one
                return Outcome("done")
            ledger.update_stage(node_id, state="running", worker=worker, started=time.time(), progress=0.0,
                                error=None, **on_running())
            result = execute(node, opened, run_id=run_id, on_progress=on_progress, is_cancelled=is_cancelled,
                             extra=extra, on_images=on_images)
    except TransientError as err:
        if can_retry(err):
            on_outcome("retry", err)
            with contextlib.suppress(QpipeError, OSError):  # the ledger may be what is down
                ledger.update_stage(node_id, state="retrying", error=str(err))
            raise
        on_outcome("failed", err)
        out = finish("failed", error=gave_up(err))
    except Cancelled as err:
        on_outcome("cancelled", err)
        out = finish("cancelled", error=str(err))
        _cleanup(opened, node, keep_checkpoints=True)
    except (ConfigError, StageError) as err:
        on_outcome("failed", err)
        log.error("%s %s failed: %s", run_id, node_id, err)
        out = finish("failed", error=str(err))
        # out of memory, or a process lost every time: the epochs trained so far stay, for a rerun
        # with room to resume from
        _cleanup(opened, node, keep_checkpoints=err.keeps_checkpoints)
    except Exception as err:  # a bug: keep the traceback in the log, the cause in the ledger
        on_outcome("failed", err)
        log.exception("%s %s crashed", run_id, node_id)
        out = finish("failed", error=f"{type(err).__name__}: {err}")
        # an unexpected error (a bug, a full disk, a CUDA fault) never deletes the only progress
        # of a long stage: its checkpoints stay for the rerun
        _cleanup(opened, node, keep_checkpoints=True)
    else:
        state = "cached" if result.cached else "done"
        if not result.cached:  # one line per computation, so executions per content key can be counted
            log.info("%s %s: computed stage %s key %s", run_id, node_id, stage, node["key"])
        on_outcome(state, None)
        out = finish(state, progress=1.0, manifest=result.manifest_uri)
        out.result = result
        if join:
            ledger.finish(result.manifest["summary"])
        return out
    if join:  # the report itself failed: the run still ends, FAILED
        ledger.fail_run("CANCELLED" if ledger.cancel_requested() else "FAILED",
                        f"report failed: {ledger.stages().get(node_id, {}).get('error')}")
    return out
