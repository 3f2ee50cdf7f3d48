"""Running a whole plan in one process, with no broker: the reference the distributed path is
measured against (bench/overhead.py) and a convenience for notebooks and tests of stages.

The run rules are ``pipeline.engine.run_node``'s, the same the Celery tasks follow; this module
only walks the plan in order over an in-memory ledger."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from pipeline.engine import MemoryLedger, register, run_node
from pipeline.errors import StageError
from pipeline.plan import build_plan
from pipeline.sources import prepare_sources
from pipeline.spec import PipelineSpec, load_spec, spec_digest
from pipeline.store import Store


def run_in_process(spec: PipelineSpec | dict | str, store: Store, *, run_id: str | None = None,
                   on_event: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Execute every stage of the spec's plan here, in order; returns the run summary.
    ``on_event(node_id, state)`` hears each node's final state (done, cached, failed, cancelled)."""
    spec = load_spec(spec)
    run_id = run_id or f"{spec.name}-{uuid.uuid4().hex[:8]}"
    plan = build_plan(spec, prepare_sources(spec, store))
    ledger = MemoryLedger()
    register(ledger, plan)
    digest = spec_digest(spec)
    for node in plan:
        outcome = run_node(node, store, ledger, run_id=run_id, spec_sha256=digest)
        if on_event:
            on_event(node["id"], outcome.state)
    if ledger.summary is None:
        raise StageError(ledger.error or "the run ended without a report")
    return ledger.summary
