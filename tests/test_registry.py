"""What a garbage collection decides (``pipeline.registry.collect``) on a file store laid out as
runs leave it: which runs a policy keeps, what a kept or running run needs (by its plan, or
through its manifests when it has none), and what the grace period and stage locks spare. The
end-to-end runs, with workers and a run in flight, are in ``tests/test_after_a_run.py``."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.registry import Policy, collect, remove, runs
from pipeline.store import FileStore

NOW = time.time()
DAY = 86400.0


def run_id(days_ago: float) -> str:
    stamp = dt.datetime.fromtimestamp(NOW - days_ago * DAY, dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"demo-{stamp}-{int(days_ago * 1000) % 0xFFFFFF:06x}"


def put(store: FileStore, key: str, obj: object, age_days: float = 30.0) -> str:
    """Write ``obj`` (JSON, or bytes as they are) at ``key``, last modified ``age_days`` ago."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    store.put_bytes(key, data)
    t = NOW - age_days * DAY
    os.utime(store.root / key, (t, t))
    return store.url(key)


def stage(store: FileStore, name: str, key: str, *, inputs: dict | None = None, config: dict | None = None,
          age_days: float = 30.0) -> str:
    """A finished stage's folder: one output and its manifest."""
    out = put(store, f"stages/{name}/{key}/out.bin", b"o" * 100, age_days)
    put(store, f"stages/{name}/{key}/manifest.json", {"stage": name, "key": key, "config": config or {},
                                                      "inputs": inputs or {}, "outputs": {"out": {"uri": out}}},
        age_days)
    return key


def finished(store: FileStore, rid: str, days_ago: float, nodes: list[dict] | None, *, status: str = "SUCCESS",
             report_inputs: dict | None = None) -> None:
    """A run as the client records it (``plan.json``, unless ``nodes`` is None) and the report
    leaves it (summary and report manifest)."""
    if nodes is not None:
        put(store, f"runs/{rid}/plan.json", {"run_id": rid, "name": "demo", "created": NOW - days_ago * DAY,
                                             "plan": nodes}, days_ago)
    put(store, f"runs/{rid}/summary.json", {"run_id": rid, "name": "demo", "status": status}, days_ago)
    put(store, f"runs/{rid}/manifest.json", {"stage": "report", "inputs": report_inputs or {}, "outputs": {}},
        days_ago)


def node(stage_name: str, key: str, config: dict | None = None) -> dict:
    return {"id": stage_name, "stage": stage_name, "key": key, "config": config or {}, "inputs": {}}


def keys(objects) -> set[str]:
    return {o.key for o in objects}


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


def test_the_policy_keeps_the_newest_the_recent_and_runs_in_flight(store):
    old, middle, newest = run_id(10), run_id(5), run_id(1)
    for rid, days in ((old, 10), (middle, 5), (newest, 1)):
        finished(store, rid, days, [])
    flying, abandoned, running = run_id(3), run_id(30), run_id(40)
    for rid, days in ((flying, 3), (abandoned, 30), (running, 40)):  # submitted, no summary yet
        put(store, f"runs/{rid}/plan.json", {"run_id": rid, "created": NOW - days * DAY, "plan": []}, days)
    broker = {running: {"status": "RUNNING", "created": str(NOW - 40 * DAY), "plan": []}}

    found = collect(store, Policy(keep_last=1, older_than_days=4), broker=broker, now=NOW)
    why = {run.run_id: reason for run, reason in found.kept}
    assert why == {newest: "among the newest 1", flying: "in flight (no summary yet; the broker does not say it ended)",
                   running: "in flight (RUNNING in the broker)"}
    assert {r.run_id for r in found.removed} == {old, middle, abandoned}  # abandoned: unfinished past the cut
    # either rule keeps a run: the newest two by count, and the middle one by age as well
    found = collect(store, Policy(keep_last=0, older_than_days=6), broker=broker, now=NOW)
    assert {r.run_id for r in found.removed} == {old, abandoned}
    # with neither rule every run stays
    assert collect(store, Policy(), broker=broker, now=NOW).removed == []
    with pytest.raises(ConfigError, match="--keep-last must be 0 or more"):
        Policy(keep_last=-1)


def test_what_a_kept_run_needs_stays_and_the_rest_goes(store):
    source = put(store, "sources/" + "a" * 64 + ".tar", b"s" * 1000)
    weights = put(store, "weights/" + "b" * 64 + ".pt", b"w" * 1000)
    other_source = put(store, "sources/" + "c" * 64 + ".tar", b"s" * 1000)
    for key in ("ingest1", "finetune1"):
        stage(store, key[:-1], key)
    put(store, "stages/qat/failed1/checkpoints/epoch-0001.pt", b"c" * 10)  # a failed attempt the plan names
    kept = run_id(1)
    finished(store, kept, 1, [node("ingest", "ingest1", {"source": {"kind": "archive", "uri": source}}),
                              node("finetune", "finetune1", {"weights": {"kind": "checkpoint", "uri": weights}}),
                              node("qat", "failed1"), node("report", "report")])
    gone = run_id(9)
    stage(store, "ingest", "ingest2")
    finished(store, gone, 9, [node("ingest", "ingest2", {"source": {"kind": "archive", "uri": other_source}}),
                              node("finetune", "finetune1")])  # shares the kept run's fine-tune
    stage(store, "quantize", "orphan")  # no run names it
    put(store, "stages/calibrate/young/observers.pt", b"y", age_days=0.001)  # being written now
    stage(store, "benchmark", "locked")  # its stage lock is held: computing right now

    found = collect(store, Policy(keep_last=1), locked={"stages/benchmark/locked"}, now=NOW)
    assert [r.run_id for r in found.removed] == [gone]
    assert keys(found.objects) == {
        f"runs/{gone}/plan.json", f"runs/{gone}/summary.json", f"runs/{gone}/manifest.json",
        "stages/ingest/ingest2/manifest.json", "stages/ingest/ingest2/out.bin",
        "stages/quantize/orphan/manifest.json", "stages/quantize/orphan/out.bin",
        "sources/" + "c" * 64 + ".tar"}
    assert found.spared == 1 and found.bytes == sum(o.size for o in found.objects)
    order = [o.key for o in found.objects]
    assert order[2] == f"runs/{gone}/summary.json"  # the run's summary last, so a cut-off collection is finished
    assert order.index("stages/ingest/ingest2/manifest.json") < order.index("stages/ingest/ingest2/out.bin")

    assert remove(store, found) == (len(found.objects), found.bytes)
    assert not (store.root / "stages" / "ingest" / "ingest2").exists()  # emptied folders go too
    again = collect(store, Policy(keep_last=1), locked={"stages/benchmark/locked"}, now=NOW)
    assert again.objects == [] and [r.run_id for r, _ in again.kept] == [kept]  # a second pass: nothing more


def test_a_run_without_a_plan_is_followed_through_its_manifests(store):
    source = put(store, "sources/" + "d" * 64 + ".tgz", b"s" * 10)
    stage(store, "ingest", "i", config={"source": {"kind": "archive", "uri": source}})
    stage(store, "finetune", "f", inputs={"data": {"stage": "ingest", "key": "i"}})
    stage(store, "quantize", "q", inputs={"data": {"stage": "ingest", "key": "i"}, "model": {"stage": "finetune",
                                                                                              "key": "f"}})
    stage(store, "benchmark", "b", inputs={"model": {"stage": "quantize", "key": "q"}})
    stage(store, "benchmark", "unrelated")
    old = run_id(2)
    finished(store, old, 2, None, report_inputs={"bench_x": {"stage": "benchmark", "key": "b"}})
    (listed,) = runs(store)
    assert (listed.run_id, listed.status, listed.plan) == (old, "SUCCESS", None)

    found = collect(store, Policy(), now=NOW)
    assert keys(found.objects) == {"stages/benchmark/unrelated/manifest.json", "stages/benchmark/unrelated/out.bin"}


# ------------------------------------------------------------------------------------- pull

def engine_run(store: FileStore, rid: str, *, selected: str | None = "nncf") -> None:
    """A finished run as the report leaves it, whose variant ``nncf`` is another engine's OpenVINO
    IR (a .xml read with the .bin beside it), served on OpenVINO; fp32 in TorchScript."""
    def ref(key: str, data: bytes) -> dict:
        return store.put_bytes(key, data).to_dict()

    pre = {"resize": 16, "crop": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear"}
    xml, binary = ref("stages/benchmark/b1/model.xml", b"<net/>"), ref("stages/benchmark/b1/model.bin", b"\1" * 64)
    ts = ref("stages/benchmark/b0/model.ts", b"ts" * 32)
    put(store, "stages/benchmark/b1/manifest.json", {"classes": ["cat", "dog"], "preprocess": pre,
                                                     "outputs": {"model": xml, "weights": binary}}, 0)
    put(store, "stages/benchmark/b0/manifest.json", {"classes": ["cat", "dog"], "preprocess": pre,
                                                     "outputs": {"model": ts}}, 0)
    fp32 = {"name": "fp32", "method": "fp32", "accuracy_top1": 0.9, "latency_ms_p50": {"1": 2.0},
            "artifact": ts["uri"], "sha256": ts["sha256"], "manifest": store.url("stages/benchmark/b0/manifest.json"),
            "runtimes": {"torchscript": {"artifact": ts["uri"], "accuracy_top1": 0.9, "latency_ms_p50": {"1": 2.0}}},
            "runtime": {"1": "torchscript"}}
    nncf = {"name": "nncf", "method": "static", "engine": "nncf", "accuracy_top1": 0.88, "latency_ms_p50": {"1": 0.5},
            "artifact": xml["uri"], "sha256": xml["sha256"], "manifest": store.url("stages/benchmark/b1/manifest.json"),
            "runtimes": {"openvino": {"artifact": xml["uri"], "accuracy_top1": 0.88, "latency_ms_p50": {"1": 0.5}}},
            "runtime": {"1": "openvino"}, "reference_runtime": "openvino"}
    summary = {"run_id": rid, "name": "demo", "status": "SUCCESS", "baseline": fp32, "variants": [nncf],
               "selected": selected, "selection_reason": "fastest" if selected else "no variant is within the budget",
               "batch_sizes": [1], "accuracy_budget": 0.05,
               "selection_per_batch": {"1": {"variant": "nncf", "runtime": "openvino"}} if selected else {},
               "warnings": [{"kind": "resolution", "model": "", "message": "the validation split is tiny"}]}
    outputs = {"summary": ref(f"runs/{rid}/summary.json", json.dumps(summary).encode()),
               "report_html": ref(f"runs/{rid}/report.html", b'<img src="size.png">'),
               "plots": {"size": ref(f"runs/{rid}/size.png", b"png")}}
    put(store, f"runs/{rid}/manifest.json", {"stage": "report", "inputs": {}, "outputs": outputs}, 0)


def test_pull_of_another_engines_ir_writes_both_files_and_says_how_to_load_them(store, tmp_path):
    from pipeline.registry import check_folder, pull

    engine_run(store, "demo-1")
    got = pull(store, "demo-1", tmp_path / "model")
    assert got.variant == "nncf" and got.serving == {"1": {"runtime": "openvino", "latency_ms_p50": 0.5,
                                                           "accuracy_top1": 0.88, "file": "model.xml"}}
    assert files_of(tmp_path / "model") == {"model.xml", "model.bin", "summary.json", "report.html", "size.png",
                                            "manifest.json", "README.md"}
    manifest = check_folder(tmp_path / "model")
    assert manifest["classes"] == ["cat", "dog"] and manifest["engine"] == "nncf"
    assert manifest["warnings"] == [{"kind": "resolution", "model": "", "message": "the validation split is tiny"}]
    readme = (tmp_path / "model" / "README.md").read_text()
    assert "> **Warning:** the validation split is tiny" in readme
    assert 'ov.Core().compile_model("model.xml", "CPU")' in readme and "## Plain PyTorch" not in readme
    (tmp_path / "model" / "model.bin").write_bytes(b"\2" * 64)  # changed after the pull: refused before loading
    with pytest.raises(ConfigError, match="model.bin was changed since it was pulled"):
        check_folder(tmp_path / "model")


def files_of(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_pull_refuses_what_it_cannot_serve_and_writes_nothing(store, tmp_path):
    from pipeline.errors import CorruptArtifact
    from pipeline.registry import pull

    engine_run(store, "demo-1")
    engine_run(store, "demo-2", selected=None)
    put(store, "runs/demo-3/plan.json", {"run_id": "demo-3", "plan": []})
    dest = tmp_path / "model"
    refusals = [
        ({"run_id": "demo-9"}, "no finished run 'demo-9' in the store"),
        ({"run_id": "demo-3"}, "run demo-3 has not finished"),
        ({"run_id": "demo-2"}, r"selected no variant \(no variant is within the budget\): pass --variant NAME, "
                               "one of fp32, nncf"),
        ({"run_id": "demo-1", "variant": "nope"}, "has no measured model 'nope'"),
        ({"run_id": "demo-1", "runtime": "torchscript"}, "nncf was measured on openvino, not on torchscript"),
        ({"run_id": "demo-1", "runtime": "tensorrt"}, "unknown runtime 'tensorrt'"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ConfigError, match=message):
            pull(store, kwargs.pop("run_id"), dest, **kwargs)
    assert pull(store, "demo-2", dest, variant="fp32").serving["1"]["file"] == "model.ts"
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        pull(store, "demo-1", dest)
    (store.root / "stages/benchmark/b1/model.bin").write_bytes(b"\3" * 64)  # the bytes at rest changed
    with pytest.raises(CorruptArtifact, match="model.bin is corrupt"):
        pull(store, "demo-1", tmp_path / "other")
    assert files_of(tmp_path) == {"model", "store"}  # neither the folder nor its hidden staging copy is left
