"""Building the Celery canvas of a plan.

``ingest -> finetune -> chord(group(branch...), report)``, where each branch is the chain of
stages hanging under one child of finetune (a calibration fans out again into one
quantize -> benchmark chain per static variant that uses it). Every signature is immutable:
stages read their inputs from the store by key, never from the previous task's return value.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain, chord, group
from celery.canvas import Signature


def _tree_children(plan: list[dict]) -> dict[str, list[str]]:
    """Each node hangs under its input that comes last in plan order (its tree parent)."""
    order = {n["id"]: i for i, n in enumerate(plan)}
    kids: dict[str, list[str]] = {n["id"]: [] for n in plan}
    for n in plan:
        if n["stage"] == "report" or not n["inputs"]:
            continue
        parent = max((d["id"] for d in n["inputs"].values()), key=order.__getitem__)
        kids[parent].append(n["id"])
    return kids


def build_canvas(app: Celery, plan: list[dict[str, Any]], run_id: str, store_uri: str) -> Signature:
    nodes = {n["id"]: n for n in plan}
    kids = _tree_children(plan)

    def sig(node_id: str) -> Signature:
        n = nodes[node_id]
        return app.signature(f"qpipe.{n['stage']}", args=(run_id, n, store_uri), immutable=True, queue=n["queue"])

    def branch(node_id: str) -> Signature:
        below = kids[node_id]
        if not below:
            return sig(node_id)
        if len(below) == 1:
            return chain(sig(node_id), branch(below[0]))
        return chain(sig(node_id), group(branch(k) for k in below))

    report = next(n["id"] for n in plan if n["stage"] == "report")
    trunk = []
    head = plan[0]["id"]
    while len(kids[head]) == 1:  # ingest -> finetune
        trunk.append(sig(head))
        head = kids[head][0]
    trunk.append(sig(head))
    fan = [branch(k) for k in kids[head]]
    return chain(*trunk, chord(group(fan), sig(report)))
