"""After a run: the runs a store holds, one model pulled out of it with what serving it needs, and
the objects no run needs any more collected.

Where a run lives
    The client records each run when it submits it: ``runs/{run_id}/plan.json`` holds the plan,
    every node with its config (so the data sources and checkpoints it reads) and its content
    key. The report (the join) writes the rest of ``runs/{run_id}/`` when the run ends:
    ``summary.json``, ``report.md``, ``report.html``, the pictures and its ``manifest.json``. The
    store alone therefore knows every run, in flight or finished, whichever broker ran it. A
    broker adds what it knows (``broker``: ``{run_id: record}``, read from Redis by
    ``workers.client``): the status of runs in flight, and the plans of runs submitted before
    ``plan.json`` was written. Nothing here talks to a broker or imports torch.

Pulling (``pull``)
    One model of a finished run into a folder: the form the report chose at each batch size (or
    the one asked for), ``manifest.json`` (preprocessing, classes, every file's sha256, the
    summary row, the run's warnings), ``summary.json``, ``report.html`` with its pictures, and a
    ``README.md`` that shows how to feed the model with plain PyTorch, ONNX Runtime or OpenVINO.
    Every file is checked against the sha256 its manifest records before it lands in the folder;
    a mismatch refuses the whole pull and names the object. The folder appears whole or not at
    all: files are gathered in a hidden sibling folder, renamed into place at the end.

Collecting garbage (``collect``, then ``remove``)
    A policy keeps the newest ``keep_last`` runs and those started less than ``older_than_days``
    ago (either rule keeps a run; with neither, every run is kept and only what no run
    references goes). What a kept run needs is what its plan names: each step's output folder
    ``stages/{stage}/{key}/`` (its outputs, its manifest, the checkpoints of a failed attempt)
    and the sources and checkpoints its configs read; a run without ``plan.json`` is followed
    through its manifests instead, from the report's down to ingest. Everything under
    ``runs/``, ``stages/``, ``sources/`` and ``weights/`` that no kept run needs may go; nothing
    else in the store is touched.

    It is safe while workers run because three things are never removed:
    * a run in flight: the broker says PENDING or RUNNING, or, where no broker knows it, it has
      a ``plan.json`` and no summary yet (such a run counts as abandoned only once it is older
      than ``older_than_days``);
    * the output folder of a stage whose lock is held right now (``locked``);
    * anything written less than ``grace_s`` ago (one hour by default): a stage being computed
      writes outputs that no manifest references yet, and a client uploads a run's sources
      before its ``plan.json`` exists. A stage folder or run folder with one young object is
      kept whole.
    Submitting and removing exclude each other (``workers.client`` holds the same lock around
    a submission's record and around ``collect`` + ``remove``), so a run submitted meanwhile
    cannot start to rely on an old cached output that is about to go. Removal deletes a stage's
    ``manifest.json`` before its outputs, so a reader never sees a manifest whose outputs are
    gone, and a run's ``summary.json`` last, so an interrupted collection is finished by the
    next one. A second collection with the same policy finds nothing more to remove.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import ConfigError, TransientError
from pipeline.hashing import sha256_file
from pipeline.stages.table import STAGES
from pipeline.store import ArtifactMissing, ArtifactRef, FileStore, ObjectInfo, Store, check_key
from pipeline.summary import ordered, selection_batch, served_top1

log = logging.getLogger(__name__)

RUNS = "runs"
PLAN = "plan.json"
SUMMARY = "summary.json"
REPORT_MANIFEST = "manifest.json"
MANAGED = ("runs", "stages", "sources", "weights")  # the folders a collection may remove from
GRACE_S = 3600.0
IN_FLIGHT = ("PENDING", "RUNNING")
UNFINISHED = "UNFINISHED"  # a plan.json and no summary, and no broker that says otherwise
FINAL = ("SUCCESS", "FAILED", "CANCELLED")
RUNTIMES = ("torchscript", "onnxruntime", "openvino")  # pipeline.runtimes.RUNTIMES, without importing torch
RUN_STAMP = re.compile(r"-(\d{8}-\d{6})-[0-9a-f]{6}$")  # workers.client.new_run_id's UTC stamp
PULL_FORMAT = "qpipe-model/1"


# ------------------------------------------------------------------------------------- runs

def record_plan(store: Store, run_id: str, *, name: str, plan: list[dict], spec_sha256: str,
                created: float | None = None) -> None:
    """Write ``runs/{run_id}/plan.json``: what the run will compute and read (see the module
    docstring). The submitting client calls this before it enqueues anything."""
    store.put_json(f"{RUNS}/{check_key(run_id)}/{PLAN}", {
        "run_id": run_id, "name": name, "created": created if created is not None else time.time(),
        "spec_sha256": spec_sha256, "plan": plan})


@dataclass
class Run:
    """One run as the store and the broker know it. ``status``: the summary's (SUCCESS, FAILED,
    CANCELLED), else the broker's (PENDING, RUNNING, ...), else UNFINISHED (a plan and no
    summary) or UNKNOWN (a folder with neither)."""

    run_id: str
    objects: list[ObjectInfo] = field(default_factory=list)
    broker: dict[str, Any] | None = None
    name: str | None = None
    status: str = "UNKNOWN"
    started: float | None = None
    finished: float | None = None
    summary: dict[str, Any] | None = None
    plan: list[dict] | None = None
    loaded: bool = False

    def has(self, name: str) -> bool:
        return any(o.key == f"{RUNS}/{self.run_id}/{name}" for o in self.objects)

    def mtime(self, name: str) -> float | None:
        return next((o.modified for o in self.objects if o.key == f"{RUNS}/{self.run_id}/{name}"), None)

    @property
    def in_flight(self) -> bool:
        return self.status in IN_FLIGHT or self.status == UNFINISHED

    def nodes(self) -> list[dict]:
        """Its plan's nodes: ``plan.json``'s (with configs), and the broker's (keys only)."""
        return list(self.plan or []) + list((self.broker or {}).get("plan") or [])

    def row(self) -> dict[str, Any]:
        """What ``qpipe runs`` shows of it."""
        s = self.summary or {}
        batch = selection_batch(s)
        chosen = s.get("selection_per_batch") or {}
        duration = self.finished - self.started if self.finished and self.started else None
        if duration is None and self.status in IN_FLIGHT and self.started:
            duration = time.time() - self.started
        return {
            "run_id": self.run_id, "name": self.name, "status": self.status,
            "started": _iso(self.started), "duration_s": round(duration, 1) if duration is not None else None,
            "selected": s.get("selected"),
            "runtime": (chosen.get(batch) or {}).get("runtime") if batch else None,
            "runtime_per_batch": {b: c.get("runtime") for b, c in chosen.items()},
            "warnings": [w.get("message", "") for w in s.get("warnings") or []],
        }


def _iso(t: float | None) -> str | None:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds") if t else None


def _stamp(run_id: str) -> float | None:
    m = RUN_STAMP.search(run_id)
    if not m:
        return None
    return dt.datetime.strptime(m.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=dt.UTC).timestamp()


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _json(store: Store, key: str) -> Any:
    """A stored JSON object, or None when it is missing or not JSON."""
    try:
        return store.get_json(key)
    except (ArtifactMissing, ValueError):
        return None


def load(store: Store, run: Run) -> Run:
    """Read ``run``'s summary and plan from the store, in place, and settle its name, status
    and times (see ``Run``)."""
    if run.loaded:
        return run
    b = run.broker or {}
    if run.has(SUMMARY):
        run.summary = _json(store, f"{RUNS}/{run.run_id}/{SUMMARY}")
    recorded = _json(store, f"{RUNS}/{run.run_id}/{PLAN}") if run.has(PLAN) else None
    if isinstance(recorded, dict):
        run.plan = recorded.get("plan")
    s, r = run.summary or {}, recorded or {}
    run.name = s.get("name") or r.get("name") or b.get("name")
    if s.get("status") in FINAL:
        run.status = s["status"]
    elif b.get("status"):
        run.status = b["status"]
    elif isinstance(recorded, dict):
        run.status = UNFINISHED
    run.started = (_float(r.get("created")) or _float(b.get("created")) or _stamp(run.run_id)
                   or min((o.modified for o in run.objects), default=None))
    run.finished = _float(b.get("finished")) or (run.mtime(SUMMARY) if run.summary else None)
    run.loaded = True
    return run


def runs(store: Store, broker: dict[str, dict] | None = None, *, limit: int | None = None,
         listing: list[ObjectInfo] | None = None) -> list[Run]:
    """The store's runs and the broker's runs of this store, newest first (by when they were
    submitted), the first ``limit`` of them read (summary, plan) and returned."""
    listing = store.list_info(RUNS) if listing is None else listing
    by_id: dict[str, list[ObjectInfo]] = {}
    for o in listing:
        parts = o.key.split("/")
        if len(parts) >= 3:
            by_id.setdefault(parts[1], []).append(o)
    broker = broker or {}
    found = [Run(rid, by_id.get(rid, []), broker.get(rid)) for rid in sorted(set(by_id) | set(broker))]

    def submitted(run: Run) -> float:
        return (_float((run.broker or {}).get("created")) or _stamp(run.run_id)
                or min((o.modified for o in run.objects), default=0.0))

    found.sort(key=submitted, reverse=True)
    chosen = found if limit is None else found[:max(limit, 0)]
    return [load(store, r) for r in chosen]


def sources_missing(store: Store, sources: dict[str, Any]) -> list[str]:
    """The URIs of prepared sources (``pipeline.sources.prepare_sources``) held by this store that
    are gone from it: a collection removed them between their upload and the run's record."""
    gone = []
    for desc in sources.values():
        if (desc or {}).get("kind") not in ("archive", "checkpoint"):  # uploaded by the client: sources/, weights/
            continue
        for key in store_keys(store, desc.get("uri")):
            if not store.exists(key):
                gone.append(store.url(key))
    return gone


@contextlib.contextmanager
def file_lock(store: Store, wait: float) -> Iterator[None]:
    """Exclusive hold of a file store's collection lock (``.qpipe-gc.lock`` in its folder), which
    a submission's record and a collection share (see the module docstring); nothing for other
    stores, whose lock is the broker's. ``fcntl.flock`` directly: the kernel drops it when the
    holder dies, and the filelock package is a test dependency only."""
    if not isinstance(store, FileStore):
        yield
        return
    import fcntl

    with open(store.root / ".qpipe-gc.lock", "a+b") as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TransientError(f"the store {store.uri} stayed locked by a garbage collection (qpipe gc) "
                                         f"or a submission for {wait:.0f}s: retry when it is done") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------- pull

@dataclass
class Pulled:
    """What ``pull`` wrote: the folder, the variant, each file's record and the form serving
    each batch size."""

    folder: Path
    run_id: str
    variant: str
    files: dict[str, dict]
    serving: dict[str, dict]
    warnings: list[dict]


def _finished_run(store: Store, run_id: str) -> tuple[dict, dict]:
    """The verified summary of a finished run and its report's manifest."""
    check_key(run_id)
    manifest = _json(store, f"{RUNS}/{run_id}/{REPORT_MANIFEST}")
    if not isinstance(manifest, dict) or "outputs" not in manifest:
        if store.exists(f"{RUNS}/{run_id}/{PLAN}"):
            raise ConfigError(f"run {run_id} has not finished (no report yet in {store.uri}): wait for it "
                              f"(`qpipe watch {run_id}`), then pull")
        raise ConfigError(f"no finished run {run_id!r} in the store {store.uri}: `qpipe runs` lists its runs "
                          "(pass --store for another store)")
    with tempfile.TemporaryDirectory(prefix="qpipe-pull-") as tmp:
        summary = json.loads(store.fetch(manifest["outputs"]["summary"], Path(tmp) / SUMMARY).read_text())
    return summary, manifest


def _row(summary: dict, variant: str) -> dict:
    names = [str(r["name"]) for r in ordered(summary) if r.get("accuracy_top1") is not None]
    if variant == "selected":
        if not summary.get("selected"):
            raise ConfigError(f"run {summary.get('run_id')} selected no variant ({summary.get('selection_reason')}): "
                              f"pass --variant NAME, one of {', '.join(names) or 'none (nothing was measured)'}")
        variant = summary["selected"]
    row = next((r for r in ordered(summary) if str(r.get("name")) == variant), None)
    if row is None or row.get("accuracy_top1") is None:
        raise ConfigError(f"run {summary.get('run_id')} has no measured model {variant!r}: pass --variant with one "
                          f"of {', '.join(names) or 'none (nothing was measured)'}, or selected")
    return row


def _forms(row: dict) -> dict[str, dict]:
    """{runtime: its measured form (``artifact`` URI, top-1, latencies)}; a row from before the
    runtimes were measured has its TorchScript file only."""
    forms = dict(row.get("runtimes") or {})
    if not forms:
        forms["torchscript"] = {k: row.get(k) for k in ("accuracy_top1", "latency_ms_p50")} | {
            "artifact": row["artifact"]}
    return forms


def _serving(row: dict, runtime: str) -> dict[str, dict]:
    """{batch: the runtime serving ``row`` there, its p50 and top-1}: the report's choice
    (``runtime == "auto"``) or ``runtime`` at every batch size."""
    forms = _forms(row)
    out = {}
    for batch in row.get("latency_ms_p50") or {}:
        if runtime == "auto":
            rt = (row.get("runtime") or {}).get(batch) or row.get("reference_runtime", "torchscript")
            out[batch] = {"runtime": rt, "latency_ms_p50": row["latency_ms_p50"][batch],
                          "accuracy_top1": served_top1(row).get(batch)}
        else:
            form = forms[runtime]
            out[batch] = {"runtime": runtime, "latency_ms_p50": (form.get("latency_ms_p50") or {}).get(batch),
                          "accuracy_top1": form.get("accuracy_top1")}
    return out


def _refs_of(bench: dict, row: dict) -> dict[str, dict]:
    """Every artifact reference of the benchmark manifest by URI."""
    refs = {ref["uri"]: ref for ref in (bench.get("outputs") or {}).values() if isinstance(ref, dict) and "uri" in ref}
    if row.get("artifact") and row["artifact"] not in refs and row.get("sha256"):
        refs[row["artifact"]] = {"uri": row["artifact"], "sha256": row["sha256"], "size": 0}
    return refs


WRITTEN = ("manifest.json", "README.md")  # the pulled folder's own files


def file_name(uri: str) -> str:
    """The name a stored object gets in a pulled folder: the last part of its URI, refused when it
    could leave the folder or replace one of the folder's own files."""
    name = PurePosixPath(uri).name
    try:
        check_key(name)
    except ValueError:
        raise ConfigError(f"{uri} does not end in a plain file name: not pulled") from None
    if name in WRITTEN:
        raise ConfigError(f"{uri} would replace the pulled folder's own {name}: not pulled")
    return name


def _model_files(bench: dict, row: dict, runtimes: set[str]) -> dict[str, dict]:
    """{file name: reference} of the files ``runtimes`` read (an OpenVINO IR's .bin with its .xml)."""
    forms, refs = _forms(row), _refs_of(bench, row)
    files: dict[str, dict] = {}
    for rt in sorted(runtimes):
        uri = forms[rt].get("artifact")
        ref = refs.get(uri)
        if ref is None:
            raise ConfigError(f"the {rt} form of {row['name']} ({uri}) has no sha256 recorded in its benchmark "
                              f"manifest ({row.get('manifest')}): it cannot be verified, so it is not pulled")
        files[file_name(uri)] = ref
        if uri.endswith(".xml"):  # an IR is read with the weights file beside it
            weights = (bench.get("outputs") or {}).get("weights")
            if weights is None:
                raise ConfigError(f"{uri} is an OpenVINO IR without a recorded weights (.bin) file")
            files[file_name(weights["uri"])] = weights
    return files


def _verified(store: Store, ref: dict, dest: Path) -> dict:
    """Fetch ``ref`` to ``dest`` through the digest check; the file's record for the manifest."""
    path = store.fetch(ArtifactRef(ref["uri"], ref["sha256"], int(ref.get("size") or 0)), dest)
    return {"sha256": ref["sha256"], "size": path.stat().st_size, "from": ref["uri"]}


def _target(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest} already exists and is not an empty folder: pull into a new or empty folder")


def pull(store: Store, run_id: str, dest: str | Path, *, variant: str = "selected",
         runtime: str = "auto") -> Pulled:
    """Write one model of the finished run ``run_id`` into the folder ``dest`` (see the module
    docstring): ``variant`` names a summary row (``selected``: the report's choice; ``fp32``:
    the baseline), ``runtime`` the form (``auto``: the form the report chose per batch size).
    Raises ConfigError for a wrong run, variant, runtime or folder, and CorruptArtifact (nothing
    written) when a stored file does not match its recorded sha256."""
    if runtime != "auto" and runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}: use auto or one of {', '.join(RUNTIMES)}")
    dest = Path(dest).expanduser().absolute()
    _target(dest)
    summary, report = _finished_run(store, run_id)
    row = _row(summary, variant)
    forms = _forms(row)
    if runtime != "auto" and runtime not in forms:
        raise ConfigError(f"{row['name']} was measured on {', '.join(forms)}, not on {runtime}: pass one of those "
                          "(or auto: the form the report chose at each batch size)")
    if not row.get("manifest"):
        raise ConfigError(f"the summary of run {run_id} names no benchmark manifest for {row['name']}")
    bench = store.get_json(store.key_of(row["manifest"]))
    recorded = ((bench.get("outputs") or {}).get("model") or {}).get("sha256")
    if row.get("sha256") and recorded and recorded != row["sha256"]:
        raise ConfigError(f"the benchmark of {row['name']} was recomputed after run {run_id} (its model now has "
                          f"sha256 {recorded}, the report measured {row['sha256']}): pull a newer run")
    serving = _serving(row, runtime)
    models = _model_files(bench, row, {s["runtime"] for s in serving.values()} or {next(iter(forms))})
    for s in serving.values():  # the very file measured (OpenVINO's IR rather than the .onnx, where both are)
        s["file"] = file_name(forms[s["runtime"]]["artifact"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the pulled folder is made like any other
    try:
        files = {name: {**_verified(store, ref, staging / name), "model": True} for name, ref in models.items()}
        outputs = report["outputs"]
        files[SUMMARY] = _verified(store, outputs["summary"], staging / SUMMARY)
        files["report.html"] = _verified(store, outputs["report_html"], staging / "report.html")
        for ref in (outputs.get("plots") or {}).values():  # the report shows them by relative path
            name = file_name(ref["uri"])
            files[name] = _verified(store, ref, staging / name)
        manifest = _manifest(store, summary, row, bench, serving, files)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / "README.md").write_text(readme(manifest))
        _target(dest)  # still free: nothing else wrote there meanwhile
        if dest.exists():
            dest.rmdir()
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("pulled %s of %s into %s", row["name"], run_id, dest)
    return Pulled(dest, run_id, str(row["name"]), files, serving, summary.get("warnings") or [])


def _arch(store: Store, bench: dict, row: dict) -> str | None:
    """The model's architecture: the row's (a sweep), else its producer's config."""
    if row.get("arch"):
        return row["arch"]
    made = bench.get("produced_by") or {}
    producer = _json(store, f"stages/{made.get('stage')}/{made.get('key')}/manifest.json") if made else None
    return ((producer or {}).get("config") or {}).get("arch")


def _manifest(store: Store, summary: dict, row: dict, bench: dict, serving: dict, files: dict) -> dict:
    pre = bench["preprocess"]
    classes = bench["classes"]
    return {
        "format": PULL_FORMAT,
        "run_id": summary.get("run_id"),
        "run_name": summary.get("name"),
        "variant": row["name"],
        "method": row.get("method"),
        **({"engine": row["engine"]} if row.get("engine") else {}),
        "arch": _arch(store, bench, row),
        "backend": bench.get("backend"),
        "classes": classes,
        "preprocess": pre,
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "shape": [None, 3, pre["crop"], pre["crop"]],
                  "values": "RGB, Resize(resize) of the shorter side (bilinear), CenterCrop(crop), scaled to [0, 1], "
                            "then (x - mean) / std per channel"},
        "output": {"name": "logits", "shape": [None, len(classes)], "values": "logits; softmax gives probabilities"},
        "batch_sizes": list(serving),
        "serving": serving,
        "files": files,
        "summary_row": row,
        "selected": summary.get("selected"),
        "selection_reason": summary.get("selection_reason"),
        "accuracy_budget": summary.get("accuracy_budget"),
        "warnings": summary.get("warnings") or [],
        "pulled_from": store.uri,
        "pulled_at": _iso(time.time()),
    }


# ------------------------------------------------------------------------------------- README

# the README's snippets: READ opens and crops an image as the ingest does (pipeline.data.decode_image);
# each runtime's snippet, appended to it, makes a script that prints each image's top classes
READ = '''import json
import sys

from PIL import Image

manifest = json.load(open("manifest.json"))
pre, classes = manifest["preprocess"], manifest["classes"]


def pixels(path):
    img = Image.open(path)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("RGB")
    w, h, s, c = img.width, img.height, pre["resize"], pre["crop"]
    size = (s, max(1, int(s * h / w))) if w <= h else (max(1, int(s * w / h)), s)
    img = img.resize(size, Image.Resampling.BILINEAR)
    left, top = int(round((size[0] - c) / 2.0)), int(round((size[1] - c) / 2.0))
    return img.crop((left, top, left + c, top + c))
'''

TORCH = '''import torch

{engine}model = torch.jit.load("{file}", map_location="cpu").eval()
mean, std = torch.tensor(pre["mean"]).view(3, 1, 1), torch.tensor(pre["std"]).view(3, 1, 1)


def tensor(path):
    x = torch.frombuffer(bytearray(pixels(path).tobytes()), dtype=torch.uint8).view(pre["crop"], pre["crop"], 3)
    return (x.permute(2, 0, 1).float() / 255.0 - mean) / std


images = sys.argv[1:]
with torch.no_grad():
    probabilities = model(torch.stack([tensor(p) for p in images])).softmax(1)
for path, p in zip(images, probabilities):
    values, indices = p.topk(min(5, len(classes)))
    print(path + ": " + ", ".join(f"{{classes[i]}} {{v:.4f}}" for v, i in zip(values.tolist(), indices.tolist())))
'''

NUMPY = '''import numpy as np

{load}
mean, std = np.array(pre["mean"], np.float32)[:, None, None], np.array(pre["std"], np.float32)[:, None, None]
images = sys.argv[1:]
batch = np.stack([(np.asarray(pixels(p), np.float32).transpose(2, 0, 1) / 255.0 - mean) / std for p in images])
for path, z in zip(images, {run}):
    p = np.exp(z - z.max())
    p /= p.sum()
    print(path + ": " + ", ".join(f"{{classes[i]}} {{p[i]:.4f}}" for i in np.argsort(-p)[:5]))
'''
ORT = NUMPY.replace("{load}", '''import onnxruntime as ort

session = ort.InferenceSession("{file}", providers=["CPUExecutionProvider"])''').replace(
    "{run}", 'session.run(None, {{"input": batch.astype(np.float32)}})[0]')
OV = NUMPY.replace("{load}", '''import openvino as ov

compiled = ov.Core().compile_model("{file}", "CPU")''').replace("{run}", "compiled(batch.astype(np.float32))[0]")


def readme(manifest: dict) -> str:
    """The pulled folder's README.md: what the model is, how it was chosen, and how to load and
    feed each form in the folder without qpipe (``READ`` followed by a runtime's snippet is a
    script that prints each image's top classes)."""
    m = manifest
    pre, serving = m["preprocess"], m["serving"]
    models = [n for n, f in m["files"].items() if f.get("model")]
    row = m["summary_row"]
    lines = [f"# {m['variant']} from run {m['run_id']}", ""]
    for w in m.get("warnings") or []:
        lines += [f"> **Warning:** {w.get('message', w)}", ""]
    what = f"{m.get('method')} model" + (f" of {m['arch']}" if m.get("arch") else "") + (
        f", quantized by {m['engine']}" if m.get("engine") else "")
    shown = ", ".join(map(str, m["classes"][:20])) + (" ..." if len(m["classes"]) > 20 else "")
    lines += [f"A {what} with {len(m['classes'])} classes: {shown}.", ""]
    if m.get("selected") == m["variant"]:
        lines += [f"The run selected it: {m.get('selection_reason')}.", ""]
    lines += ["| batch | runtime | file | top-1 | p50 ms |", "|---|---|---|---|---|"]
    for batch, s in serving.items():
        top1 = f"{s['accuracy_top1']:.4f}" if isinstance(s.get("accuracy_top1"), (int, float)) else "-"
        p50 = f"{s['latency_ms_p50']:.3f}" if isinstance(s.get("latency_ms_p50"), (int, float)) else "-"
        lines.append(f"| {batch} | {s['runtime']} | {s['file']} | {top1} | {p50} |")
    measured = ", ".join(row.get("runtimes") or ["torchscript"])
    lines += ["", f"Measured on: {measured}. Another form: `qpipe pull {m['run_id']} --variant {m['variant']} "
              "--runtime RUNTIME DIR`.", "",
              "## Input", "",
              f"A float32 NCHW batch named `input`, 3 x {pre['crop']} x {pre['crop']}: the image in RGB (transparent "
              f"pixels on white), its shorter side resized to {pre['resize']} (bilinear), the centre "
              f"{pre['crop']} x {pre['crop']} cut out, scaled to [0, 1], then (x - mean) / std with mean "
              f"{pre['mean']} and std {pre['std']}. The output `logits` has one column per class, in the order of "
              "`classes` in manifest.json; softmax gives probabilities.", "",
              "## Reading an image", "",
              "As qpipe's ingest reads it (Pillow). Each runtime's snippet below, appended to this one, makes a "
              "script that prints the five most likely classes of each image: `python predict.py IMAGE...` in "
              "this folder.", "", "```python", READ.rstrip(), "```", ""]
    engine = (f'torch.backends.quantized.engine = "{m["backend"]}"  # the int8 kernels it was converted for\n'
              if m.get("backend") and m.get("method") != "fp32" else "")
    order = [".ts", ".onnx", ".xml"]  # plain PyTorch first
    has_ir = any(PurePosixPath(n).suffix == ".xml" for n in models)  # OpenVINO reads it, not the .onnx
    for name in sorted(models, key=lambda n: order.index(PurePosixPath(n).suffix) if PurePosixPath(n).suffix
                       in order else len(order)):
        suffix = PurePosixPath(name).suffix
        if suffix == ".ts":
            lines += ["## Plain PyTorch (TorchScript)", "", "Needs torch only.", "", "```python",
                      TORCH.format(file=name, engine=engine).rstrip(), "```", ""]
        if suffix == ".onnx":
            lines += ["## ONNX Runtime", "", "Needs onnxruntime and numpy.", "", "```python",
                      ORT.format(file=name).rstrip(), "```", ""]
        if suffix == ".xml" or (suffix == ".onnx" and not has_ir):  # an .onnx for OpenVINO: a run before the IR
            note = ("" if suffix == ".xml" or m.get("engine") else
                    " qpipe measured OpenVINO on its OpenVINO form of this file (`pipeline.runtimes.openvino_model`: "
                    "each layer's activation folded into the layer, which rounds once less and runs faster; "
                    "`qpipe pull --runtime openvino` writes it as model.xml): read as it is, this file gives the "
                    "same classes within that rounding.")
            lines += ["## OpenVINO", "", f"Needs openvino and numpy.{note}", "", "```python",
                      OV.format(file=name).rstrip(), "```", ""]
    lines += ["## With qpipe", "", "```", "qpipe predict . IMAGE_OR_FOLDER...", "```", "",
              "A folder of class sub-folders (an ImageFolder) also gets its top-1. `report.html` is the run's "
              "report; `manifest.json` holds every file's sha256, the summary row and the run's warnings.", ""]
    return "\n".join(lines)


def check_folder(folder: str | Path) -> dict:
    """The manifest of a pulled folder after checking every file it lists against its sha256
    (before anything in it is loaded). Raises ConfigError naming what is wrong."""
    folder = Path(folder)
    path = folder / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{folder} holds no manifest.json: give a folder written by `qpipe pull`, or a run id") \
            from None
    except ValueError as err:
        raise ConfigError(f"{path} is not JSON ({err}): pull the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PULL_FORMAT:
        raise ConfigError(f"{path} is not a manifest written by `qpipe pull` (format {PULL_FORMAT})")
    for name, f in manifest["files"].items():
        local = folder / check_key(name)
        if not local.is_file():
            raise ConfigError(f"{local} is missing: pull the model again")
        digest = sha256_file(local)
        if digest != f["sha256"]:
            raise ConfigError(f"{local} was changed since it was pulled: sha256 {digest}, manifest.json records "
                              f"{f['sha256']}; pull the model again")
    return manifest


# ------------------------------------------------------------------------------------- garbage

@dataclass(frozen=True)
class Policy:
    """Which runs a collection keeps: the newest ``keep_last``, and those started less than
    ``older_than_days`` ago (either rule keeps a run; with neither, every run). Objects written
    less than ``grace_s`` ago are never removed."""

    keep_last: int | None = None
    older_than_days: float | None = None
    grace_s: float = GRACE_S

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 0:
            raise ConfigError(f"--keep-last must be 0 or more, not {self.keep_last}")
        if self.older_than_days is not None and self.older_than_days < 0:
            raise ConfigError(f"--older-than must be 0 or more days, not {self.older_than_days}")
        if self.grace_s < 0:
            raise ConfigError(f"the grace period must be 0 or more minutes, not {self.grace_s / 60:g}")


@dataclass
class Collection:
    """What a collection decided: the runs kept (with why) and removed, and the objects to delete
    in their deletion order."""

    kept: list[tuple[Run, str]]
    removed: list[Run]
    objects: list[ObjectInfo]
    spared: int = 0  # objects no kept run needs, left because they are younger than the grace period

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.objects)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.objects:
            top = o.key.split("/", 1)[0]
            out[top] = out.get(top, 0) + 1
        return out


def store_keys(store: Store, obj: Any) -> Iterator[str]:
    """Every key of this store that a URI inside ``obj`` (any JSON) names."""
    inside = store.uri.rstrip("/") + "/"
    if isinstance(obj, str):
        if obj.startswith(inside):
            yield obj[len(inside):].strip("/")
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from store_keys(store, v)
    elif isinstance(obj, list):
        for v in obj:
            yield from store_keys(store, v)


def stage_prefix(stage: str, key: str) -> str:
    return f"stages/{stage}/{key}"


def needs(store: Store, run: Run) -> tuple[set[str], set[str]]:
    """(stage output folders, other keys or key prefixes) that ``run`` needs: its plan's (see
    the module docstring), or, without a plan, what its manifests lead to from the report's."""
    folders: set[str] = set()
    keys: set[str] = set()
    for node in run.nodes():
        sdef = STAGES.get(node.get("stage"))
        if sdef is not None and sdef.cached and node.get("key"):
            folders.add(stage_prefix(node["stage"], node["key"]))
        keys.update(store_keys(store, node.get("config")))
    if run.plan is None:  # submitted before plan.json: follow the manifests
        seen: set[str] = set()
        todo = [_json(store, f"{RUNS}/{run.run_id}/{REPORT_MANIFEST}")]
        while todo:
            manifest = todo.pop()
            if not isinstance(manifest, dict):
                continue
            keys.update(store_keys(store, manifest))
            for dep in (manifest.get("inputs") or {}).values():
                folder = stage_prefix(dep.get("stage"), dep.get("key"))
                if folder not in seen:
                    seen.add(folder)
                    folders.add(folder)
                    todo.append(_json(store, f"{folder}/manifest.json"))
    for k in list(keys):  # an object inside a stage's folder keeps the whole folder
        parts = k.split("/")
        if parts[0] == "stages" and len(parts) >= 3:
            folders.add("/".join(parts[:3]))
    return folders, keys


def _decide(runs_: list[Run], policy: Policy, now: float) -> tuple[list[tuple[Run, str]], list[Run]]:
    cut = now - policy.older_than_days * 86400 if policy.older_than_days is not None else None
    kept, removed = [], []
    for i, run in enumerate(runs_):
        young = [o for o in run.objects if now - o.modified < policy.grace_s]
        started = run.started or 0.0
        if run.status in IN_FLIGHT:
            kept.append((run, f"in flight ({run.status} in the broker)"))
        elif run.status == UNFINISHED and (cut is None or started >= cut):
            kept.append((run, "in flight (no summary yet; the broker does not say it ended)"))
        elif young:
            kept.append((run, f"written in the last {policy.grace_s / 60:g} min"))
        elif policy.keep_last is None and cut is None:
            kept.append((run, "no policy given: every run is kept"))
        elif policy.keep_last is not None and i < policy.keep_last:
            kept.append((run, f"among the newest {policy.keep_last}"))
        elif cut is not None and started >= cut:
            kept.append((run, f"started less than {policy.older_than_days:g} day(s) ago"))
        else:
            removed.append(run)
    return kept, removed


def _under(key: str, prefixes: set[str]) -> bool:
    parts = key.split("/")
    return any("/".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


def collect(store: Store, policy: Policy, *, broker: dict[str, dict] | None = None,
            locked: set[str] = frozenset(), now: float | None = None) -> Collection:
    """Decide what a collection under ``policy`` removes (see the module docstring). ``broker``:
    the broker's runs of this store; ``locked``: stage output folders whose stage lock is held."""
    now = time.time() if now is None else now
    listing = {top: store.list_info(top) for top in MANAGED}
    all_runs = runs(store, broker, listing=listing[RUNS])
    kept, removed = _decide(all_runs, policy, now)
    folders, keys = set(locked), set()
    for run, _ in kept:
        f, k = needs(store, run)
        folders |= f
        keys |= k
    objects: list[ObjectInfo] = []
    for run in removed:  # the summary last: an interrupted collection leaves a run the next one removes
        last = [f"{RUNS}/{run.run_id}/{PLAN}", f"{RUNS}/{run.run_id}/{SUMMARY}"]
        objects += sorted(run.objects, key=lambda o: last.index(o.key) if o.key in last else -1)
    by_folder: dict[str, list[ObjectInfo]] = {}
    for o in listing["stages"]:
        parts = o.key.split("/")
        if len(parts) >= 4:
            by_folder.setdefault("/".join(parts[:3]), []).append(o)
    spared = 0
    for folder, objs in sorted(by_folder.items()):
        if folder in folders or _under(folder, keys):
            continue
        if any(now - o.modified < policy.grace_s for o in objs):
            spared += len(objs)
            continue
        # the manifest first: no reader trusts a manifest whose outputs are going
        objects += sorted(objs, key=lambda o: 0 if o.key.endswith("/manifest.json") else 1)
    for top in ("sources", "weights"):
        for o in listing[top]:
            if _under(o.key, keys):
                continue
            if now - o.modified < policy.grace_s:
                spared += 1
                continue
            objects.append(o)
    return Collection(kept, removed, objects, spared)


def remove(store: Store, collection: Collection, *, renew: Callable[[], None] | None = None,
           every: int = 50) -> tuple[int, int]:
    """Delete the collection's objects in order; ``renew()`` is called every ``every`` objects
    (to keep a lock) and may raise to stop. Returns (objects, bytes) removed. On a file store the
    folders left empty are removed too."""
    done = freed = 0
    for o in collection.objects:
        if renew is not None and done % every == 0:
            renew()
        store.delete(o.key)
        done += 1
        freed += o.size
    if isinstance(store, FileStore):
        _prune(store, {str(PurePosixPath(o.key).parent) for o in collection.objects})
    return done, freed


def _prune(store: FileStore, folders: set[str]) -> None:
    """Remove the empty folders ``folders`` left behind and their empty parents, up to (not
    including) the managed top folders and ``stages/{stage}``."""
    for folder in sorted(folders, key=lambda f: -f.count("/")):
        parts = folder.split("/")
        while len(parts) > (2 if parts[0] == "stages" else 1):
            try:
                (store.root / "/".join(parts)).rmdir()
            except OSError:  # not empty (or already gone): its parents are not empty either
                break
            parts.pop()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
