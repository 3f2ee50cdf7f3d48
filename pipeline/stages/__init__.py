"""The one function that executes a stage, and what a stage may use.

A stage is a pure function ``fn(ctx, config, inputs) -> dict`` over its typed config, declared
once in ``pipeline.stages.table`` (torch-free, re-exported here) with a name, a version, a queue
and a role. ``execute`` gives every stage the same treatment: return the stored result when the
stage's ``manifest.json`` already exists (content-addressed cache), otherwise read the input
manifests, parse the node's config into the stage's config type, run the function in a scratch
folder, and write the manifest last, so a manifest's presence means the whole output is there.

A cached result is served only after every artifact its manifest references has been hashed
again and found to match: an entry whose output rotted, was truncated or was tampered with is
dropped (manifest and corrupt object deleted, with a warning naming it) and recomputed, instead
of being handed to the next stage or retried as if the store were down.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import Cancelled, CorruptArtifact, StageError
from pipeline.stages.table import STAGES, StageDef, is_join, load_all, stage_def
from pipeline.store import ArtifactMissing, ArtifactRef, Store

log = logging.getLogger(__name__)

__all__ = ["STAGES", "StageContext", "StageDef", "StageResult", "execute", "is_join", "load_all",
           "manifest_key", "stage_def"]


def manifest_key(stage: str, key: str) -> str:
    return f"stages/{stage}/{key}/manifest.json"


@dataclass
class StageContext:
    """What a stage may use besides its config and inputs."""

    store: Store
    stage: str
    key: str
    prefix: str
    workdir: Path
    run_id: str | None = None
    on_progress: Callable[[float, str], None] | None = None
    is_cancelled: Callable[[], bool] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # on_images(phase, n, per_second): images through a model (for metrics); see images()
    on_images: Callable[[str, int, float | None], None] | None = None
    _last_cancel_check: float = 0.0

    def put(self, name: str, path: Path) -> dict[str, Any]:
        return self.store.put_file(f"{self.prefix}/{name}", path).to_dict()

    def put_json(self, name: str, obj: Any) -> dict[str, Any]:
        return self.store.put_json(f"{self.prefix}/{name}", obj).to_dict()

    def fetch(self, ref: dict[str, Any], name: str) -> Path:
        return self.store.fetch(ArtifactRef.from_dict(ref), self.workdir / name)

    def progress(self, fraction: float, detail: str = "") -> None:
        if self.on_progress:
            self.on_progress(max(0.0, min(1.0, fraction)), detail)

    def images(self, n: int, phase: str, per_second: float | None = None) -> None:
        """Count ``n`` more images run through a model in ``phase`` (train, calibrate or eval);
        ``per_second``, given when a whole pass over a split ends, is that pass's throughput."""
        if self.on_images:
            self.on_images(phase, n, per_second)

    def check_cancelled(self, every: float = 1.0) -> None:
        """Raise Cancelled if the run was cancelled (asks at most once per ``every`` seconds)."""
        now = time.monotonic()
        if self.is_cancelled is None or now - self._last_cancel_check < every:
            return
        self._last_cancel_check = now
        if self.is_cancelled():
            raise Cancelled(f"{self.stage} stopped: the run was cancelled")


@dataclass
class StageResult:
    manifest: dict[str, Any]
    cached: bool
    manifest_uri: str


# manifest fields copied from the plan node: what the stage read, not what it wrote (a finetune's
# config holds the reference of its initial weights, which is not part of its output)
NODE_FIELDS = frozenset({"config", "inputs", "input_digests"})


def artifact_refs(obj: Any) -> Iterator[dict[str, Any]]:
    """Every artifact reference (a dict with uri, sha256 and size) nested in ``obj``."""
    if isinstance(obj, dict):
        if {"uri", "sha256", "size"} <= obj.keys():
            yield obj
            return
        for value in obj.values():
            yield from artifact_refs(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from artifact_refs(value)


def damaged_outputs(store: Store, manifest: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """The stored outputs of a cached stage that are missing or do not hash to their recorded
    sha256, each with the reason. Every output is read once, as a stream."""
    inside = store.uri.rstrip("/") + "/"
    damaged = []
    for ref in artifact_refs({k: v for k, v in manifest.items() if k not in NODE_FIELDS}):
        if not str(ref["uri"]).startswith(inside):
            continue
        try:
            store.verify(ref)
        except (CorruptArtifact, ArtifactMissing) as err:
            damaged.append((ref, str(err)))
    return damaged


def cached_result(store: Store, stage: str, prefix: str) -> StageResult | None:
    """The stored result under ``prefix`` if it exists and is intact; a damaged one is dropped
    (manifest first, then its corrupt objects) so that the caller recomputes it."""
    mkey = f"{prefix}/manifest.json"
    try:
        manifest = store.get_json(mkey)
    except ArtifactMissing:
        return None
    except ValueError as err:  # not JSON any more (UnicodeDecodeError is a ValueError too)
        log.warning("%s: cached manifest %s is corrupt (%s); recomputing", stage, store.url(mkey), err)
        store.delete(mkey)
        return None
    damaged = damaged_outputs(store, manifest)
    if not damaged:
        return StageResult(manifest, True, store.url(mkey))
    for _, why in damaged:
        log.warning("%s: cached output damaged: %s", stage, why)
    log.warning("%s: dropping the cached result %s and recomputing it", stage, store.url(mkey))
    store.delete(mkey)
    own = f"{store.url(prefix)}/"
    for ref, _ in damaged:
        if ref["uri"].startswith(own):  # another stage's object is that stage's to recompute
            store.delete(store.key_of(ref["uri"]))
    return None


def execute(node: dict[str, Any], store: Store, *, run_id: str | None = None,
            on_progress: Callable[[float, str], None] | None = None,
            is_cancelled: Callable[[], bool] | None = None,
            extra: dict[str, Any] | None = None,
            on_images: Callable[[str, int, float | None], None] | None = None) -> StageResult:
    """Run one plan node (see ``pipeline.plan``) against ``store``, or reuse its stored result."""
    sdef = stage_def(node["stage"])
    key = node["key"]
    prefix = f"stages/{sdef.name}/{key}" if sdef.cached else f"runs/{run_id}"
    mkey = f"{prefix}/manifest.json"
    if sdef.cached:
        cached = cached_result(store, sdef.name, prefix)
        if cached is not None:
            return cached
    inputs: dict[str, dict] = {}
    for name, dep in node["inputs"].items():
        try:
            inputs[name] = store.get_json(manifest_key(dep["stage"], dep["key"]))
        except ArtifactMissing:
            if sdef.partial_inputs:
                continue
            raise StageError(f"input {name!r} ({dep['stage']} {dep['key']}) is missing: "
                             "that stage did not finish") from None
        except ValueError:
            if sdef.partial_inputs:
                log.warning("%s: input %s has a corrupt manifest; left out", sdef.name, name)
                continue
            raise StageError(f"input {name!r} ({dep['stage']} {dep['key']}) has a corrupt manifest "
                             f"{store.url(manifest_key(dep['stage'], dep['key']))}: rerun, and that stage "
                             "is recomputed") from None
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"qpipe-{sdef.name}-") as tmp:
        ctx = StageContext(store, sdef.name, key, prefix, Path(tmp), run_id, on_progress, is_cancelled,
                           dict(extra or {}), on_images)
        result = sdef.fn(ctx, sdef.config.parse(node["config"]), inputs)
    manifest = {
        "stage": sdef.name,
        "stage_version": sdef.version,
        "key": key,
        "variant": node.get("variant"),
        "config": node["config"],
        "inputs": {name: {"stage": d["stage"], "key": d["key"]} for name, d in node["inputs"].items()},
        "input_digests": node.get("input_digests", {}),
        **result,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 3),
        "host": socket.gethostname(),
    }
    ref = store.put_json(mkey, manifest)  # written last: its presence means the output is complete
    return StageResult(manifest, False, ref.uri)
