"""Running a whole plan in one process, with no broker: the reference the distributed path is
measured against (bench/overhead.py) and a convenience for notebooks and tests of stages."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from pipeline.errors import QpipeError
from pipeline.hashing import canonical_json, sha256_bytes
from pipeline.plan import build_plan
from pipeline.sources import prepare_source
from pipeline.spec import PipelineSpec, load_spec
from pipeline.stages import execute, is_join
from pipeline.store import Store

log = logging.getLogger(__name__)


def prepare_sources(spec: PipelineSpec, store: Store) -> dict[str, Any]:
    """Describe and upload the spec's data sources and checkpoint (see pipeline.sources)."""
    sources = {"source": prepare_source(spec.data.source, store),
               "val_source": prepare_source(spec.data.val_source, store)}
    w = spec.model.weights
    if w is None:
        sources["weights"] = None
    elif "/" in w or w.startswith(("file://", "s3://")):
        desc = prepare_source(w, store) if not w.endswith((".pt", ".pth")) else _upload_checkpoint(w, store)
        sources["weights"] = desc
    else:
        sources["weights"] = {"kind": "torchvision", "name": w,
                              "sha256": sha256_bytes(f"torchvision:{spec.model.arch}:{w}".encode())}
    return sources


def _upload_checkpoint(value: str, store: Store) -> dict[str, Any]:
    from pathlib import Path

    from pipeline.errors import ConfigError

    if value.startswith("s3://"):
        raise ConfigError("checkpoints in s3:// are read through the store: put the file under the store "
                          "URI and give its path, or give a local file")
    path = Path(value.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {value} does not exist: give a local .pt/.pth state_dict file")
    ref = store.put_by_digest("weights", path, path.suffix)
    return {"kind": "checkpoint", "name": path.name, **ref.to_dict()}


def spec_digest(spec: PipelineSpec) -> str:
    dump = spec.model_dump(mode="json")
    if dump.get("sweep") is None:  # a spec without a sweep keeps the digest it had before sweeps existed
        dump.pop("sweep", None)
    return sha256_bytes(canonical_json(dump).encode())


def run_in_process(spec: PipelineSpec | dict | str, store: Store, *, run_id: str | None = None,
                   on_event: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """Execute every stage of the spec's plan here, in order; returns the run summary."""
    spec = load_spec(spec)
    run_id = run_id or f"{spec.name}-{uuid.uuid4().hex[:8]}"
    plan = build_plan(spec, prepare_sources(spec, store))
    failed: dict[str, str] = {}
    failures: list[dict] = []
    extra = {"spec_sha256": spec_digest(spec)}
    result = None
    cached = 0
    for node in plan:
        upstream = [d["id"] for d in node["inputs"].values() if d["id"] in failed]
        if upstream and not is_join(node["stage"]):
            failed[node["id"]] = f"upstream {upstream[0]} failed"
            continue
        try:
            if is_join(node["stage"]):
                extra["failures"] = failures
                extra["cached_stages"] = cached
            result = execute(node, store, run_id=run_id, extra=extra)
            cached += result.cached
            if on_event:
                on_event(node["id"], "cached" if result.cached else "done")
        except QpipeError as err:
            failed[node["id"]] = str(err)
            failures.append({"stage": node["stage"], "variant": node.get("variant"), "error": str(err)})
            log.error("%s failed: %s", node["id"], err)
            if on_event:
                on_event(node["id"], "failed")
    assert result is not None and is_join(result.manifest["stage"])
    return result.manifest["summary"]
