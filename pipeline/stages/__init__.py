"""The stage registry and the one function that executes a stage.

A stage is a pure function ``fn(ctx, config, inputs) -> dict`` registered once with a name, a
version and the queue it belongs on. ``execute`` gives every stage the same treatment: return
the stored result when the stage's ``manifest.json`` already exists (content-addressed cache),
otherwise read the input manifests, run the function in a scratch folder, and write the
manifest last, so a manifest's presence means the whole output is there.
"""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import Cancelled, StageError
from pipeline.store import ArtifactMissing, ArtifactRef, Store

log = logging.getLogger(__name__)

StageFn = Callable[["StageContext", dict, dict[str, dict]], dict]
STAGE_MODULES = ("ingest", "finetune", "calibrate", "sensitivity", "quantize", "qat", "benchmark", "report")


@dataclass(frozen=True)
class StageDef:
    name: str
    version: int
    queue: str  # "cpu" or "gpu"
    fn: StageFn
    cached: bool = True  # False: rerun every time, outputs under runs/{run_id}/
    partial_inputs: bool = False  # True: run with whichever inputs exist (the report)


REGISTRY: dict[str, StageDef] = {}


def register(name: str, *, version: int, queue: str, cached: bool = True,
             partial_inputs: bool = False) -> Callable[[StageFn], StageFn]:
    if queue not in ("cpu", "gpu"):
        raise ValueError(f"queue must be cpu or gpu, not {queue!r}")

    def deco(fn: StageFn) -> StageFn:
        if name in REGISTRY:
            raise ValueError(f"stage {name!r} is registered twice")
        REGISTRY[name] = StageDef(name, version, queue, fn, cached, partial_inputs)
        return fn

    return deco


def load_all() -> dict[str, StageDef]:
    for mod in STAGE_MODULES:
        importlib.import_module(f"pipeline.stages.{mod}")
    return REGISTRY


def stage_def(name: str) -> StageDef:
    load_all()
    if name not in REGISTRY:
        raise StageError(f"unknown stage {name!r}")
    return REGISTRY[name]


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
        try:
            return StageResult(store.get_json(mkey), True, store.url(mkey))
        except ArtifactMissing:
            pass
    inputs: dict[str, dict] = {}
    for name, dep in node["inputs"].items():
        try:
            inputs[name] = store.get_json(manifest_key(dep["stage"], dep["key"]))
        except ArtifactMissing:
            if sdef.partial_inputs:
                continue
            raise StageError(f"input {name!r} ({dep['stage']} {dep['key']}) is missing: "
                             "that stage did not finish") from None
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"qpipe-{sdef.name}-") as tmp:
        ctx = StageContext(store, sdef.name, key, prefix, Path(tmp), run_id, on_progress, is_cancelled,
                           dict(extra or {}), on_images)
        result = sdef.fn(ctx, node["config"], inputs)
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
