"""Building the Celery canvas of a plan.

``ingest -> finetune -> chord(group(branch...), report)``, where each branch is the chain of
stages hanging under one child of finetune (a calibration fans out again into one
quantize -> benchmark chain per static variant that uses it, and into a chord over the parts
of a sensitivity analysis whose body is that variant's quantize -> benchmark). Every signature is immutable:
stages read their inputs from the store by key, never from the previous task's return value.

A sweep plans one finetune per arch under the one ingest, so the trunk stops at ingest:
``ingest -> chord(group(one branch per finetune), report)``, the archs in parallel.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, chain, chord, group
from celery.canvas import Signature

from pipeline.stages.table import is_join


def _tree(plan: list[dict]) -> tuple[dict[str, list[str]], dict[str, list[tuple[list[str], str]]]]:
    """Each node hangs under its input that comes last in plan order (its tree parent), except a
    join: a node with two or more inputs hanging under the same parent P (the parts of a
    sensitivity analysis). A join is listed under P with those inputs, its members, and runs as
    the body of a chord over them. Returns (children, joins)."""
    order = {n["id"]: i for i, n in enumerate(plan)}
    parent: dict[str, str] = {}
    kids: dict[str, list[str]] = {n["id"]: [] for n in plan}
    joins: dict[str, list[tuple[list[str], str]]] = {}
    for n in plan:
        if is_join(n["stage"]) or not n["inputs"]:
            continue
        deps = [d["id"] for d in n["inputs"].values()]
        last = max(deps, key=order.__getitem__)
        members = [d for d in deps if last in parent and parent.get(d) == parent[last]]
        if len(members) > 1:
            for m in members:
                if kids[m]:
                    raise ValueError(f"{m} is part of the join {n['id']} and cannot have other dependants")
            joins.setdefault(parent[last], []).append((members, n["id"]))
            parent[n["id"]] = parent[last]
            continue
        parent[n["id"]] = last
        kids[last].append(n["id"])
    return kids, joins


def build_canvas(app: Celery, plan: list[dict[str, Any]], run_id: str, store_uri: str) -> Signature:
    nodes = {n["id"]: n for n in plan}
    kids, joins = _tree(plan)
    joined = {m for js in joins.values() for members, _ in js for m in members}

    def sig(node_id: str) -> Signature:
        n = nodes[node_id]
        return app.signature(f"qpipe.{n['stage']}", args=(run_id, n, store_uri), immutable=True, queue=n["queue"])

    def under(node_id: str) -> list[Signature]:
        """What runs after ``node_id``, in parallel: a branch per child, a chord per join."""
        return ([branch(k) for k in kids[node_id] if k not in joined] +
                [chord(group(branch(m) for m in members), branch(join)) for members, join in joins.get(node_id, [])])

    def branch(node_id: str) -> Signature:
        below = under(node_id)
        if not below:
            return sig(node_id)
        if len(below) == 1:
            return chain(sig(node_id), below[0])
        return chain(sig(node_id), group(below))

    report = next(n["id"] for n in plan if is_join(n["stage"]))
    trunk = []
    head = plan[0]["id"]
    while len(kids[head]) == 1 and not joins.get(head):  # ingest -> finetune
        trunk.append(sig(head))
        head = kids[head][0]
    trunk.append(sig(head))
    return chain(*trunk, chord(group(under(head)), sig(report)))
